//! OAuth 2.0 client credentials for the Dataverse Web API, on the shared
//! Microsoft Entra client ([`crate::entra`]): its errors become [`CrmError`]s
//! (a rejected client pauses delivery as an endpoint failure).

use crate::config::Secret;
use crate::crm::CrmError;
use crate::entra::{Credential, EntraError};
use crate::error::{Classify, Disposition};
use crate::model::UnixTime;

/// The token cache (see [`crate::entra::TokenSource`]).
#[derive(Debug)]
pub(super) struct TokenSource(crate::entra::TokenSource);

impl TokenSource {
    pub(super) fn new(
        http: reqwest::Client,
        token_url: String,
        client_id: String,
        client_secret: Secret,
        scope: String,
    ) -> Self {
        TokenSource(crate::entra::TokenSource::new(
            http,
            token_url,
            client_id,
            Credential::Secret(client_secret),
            scope,
        ))
    }

    /// When the current token expires (Unix seconds); `None` before the
    /// first one was obtained.
    pub(super) fn expires_at(&self) -> Option<UnixTime> {
        self.0.expires_at()
    }

    /// A token that is good for at least the refresh margin.
    pub(super) async fn token(&self) -> Result<Secret, CrmError> {
        self.0.token().await.map_err(CrmError::from)
    }

    /// The API refused `rejected` (401): fetch a new token, unless another
    /// request already replaced it.
    pub(super) async fn renew(&self, rejected: &Secret) -> Result<Secret, CrmError> {
        self.0.renew(rejected).await.map_err(CrmError::from)
    }
}

impl From<EntraError> for CrmError {
    fn from(e: EntraError) -> Self {
        match e.disposition() {
            Disposition::Transient => CrmError::Transient {
                retry_after: e.retry_after(),
                message: e.to_string(),
            },
            // Every request needs the token: delivery pauses (nothing is
            // dead-lettered) until the credentials are fixed.
            Disposition::Permanent => CrmError::endpoint(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entra_errors_map_by_disposition() {
        let e = CrmError::from(EntraError::Busy {
            status: 429,
            text: String::new(),
            retry_after: Some(std::time::Duration::from_secs(3)),
        });
        assert_eq!(e.retry_after(), Some(std::time::Duration::from_secs(3)));
        let e = CrmError::from(EntraError::Credential("x".into()));
        assert!(matches!(e, CrmError::Endpoint { .. }));
    }
}
