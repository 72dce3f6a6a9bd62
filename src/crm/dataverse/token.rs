//! OAuth 2.0 client credentials for the Dataverse Web API: one access token,
//! cached and renewed before it runs out.
//!
//! The token endpoint is Microsoft Entra ID's
//! `POST https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token` with the
//! form `grant_type=client_credentials&client_id&client_secret&scope`; it
//! answers `{"token_type":"Bearer","expires_in":3599,"access_token":"…"}`. A
//! rejected client answers 400/401 with `{"error":"invalid_client",
//! "error_description":"AADSTS7000215: Invalid client secret provided. …"}`.

use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::config::Secret;
use crate::crm::CrmError;
use crate::model::UnixTime;

/// Renew this long before expiry: a tenth of the token's lifetime, at least
/// one second (short-lived test tokens) and at most five minutes (an hour's
/// token is renewed at 55 minutes, as Microsoft's own libraries do).
pub(super) fn refresh_margin(lifetime: Duration) -> Duration {
    (lifetime / 10).clamp(Duration::from_secs(1), Duration::from_secs(300))
}

/// A token in hand.
#[derive(Debug, Clone)]
struct Cached {
    token: Secret,
    /// Renew from this instant on (expiry minus the margin).
    renew_at: Instant,
}

/// The token cache (see the module docs). Cheap to share: the adapter holds
/// one and every request asks it.
#[derive(Debug)]
pub(super) struct TokenSource {
    http: reqwest::Client,
    token_url: String,
    client_id: String,
    client_secret: Secret,
    scope: String,
    cached: tokio::sync::Mutex<Option<Cached>>,
    /// Copy of the cached token's expiry, readable without the async lock.
    expires_at: std::sync::Mutex<Option<UnixTime>>,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    expires_in: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct TokenErrorBody {
    #[serde(default)]
    error: String,
    #[serde(default)]
    error_description: String,
}

impl TokenSource {
    pub(super) fn new(
        http: reqwest::Client,
        token_url: String,
        client_id: String,
        client_secret: Secret,
        scope: String,
    ) -> Self {
        TokenSource {
            http,
            token_url,
            client_id,
            client_secret,
            scope,
            cached: tokio::sync::Mutex::new(None),
            expires_at: std::sync::Mutex::new(None),
        }
    }

    /// When the current token expires (Unix seconds); `None` before the
    /// first one was obtained.
    pub(super) fn expires_at(&self) -> Option<UnixTime> {
        *self.expires_at.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A token that is good for at least the refresh margin.
    pub(super) async fn token(&self) -> Result<Secret, CrmError> {
        let mut cached = self.cached.lock().await;
        if let Some(c) = cached.as_ref() {
            if Instant::now() < c.renew_at {
                return Ok(c.token.clone());
            }
        }
        let fresh = self.fetch().await?;
        let token = fresh.token.clone();
        *cached = Some(fresh);
        Ok(token)
    }

    /// The API refused `rejected` (401): fetch a new token, unless another
    /// request already replaced it.
    pub(super) async fn renew(&self, rejected: &Secret) -> Result<Secret, CrmError> {
        let mut cached = self.cached.lock().await;
        if let Some(c) = cached.as_ref() {
            if c.token.expose() != rejected.expose() && Instant::now() < c.renew_at {
                return Ok(c.token.clone());
            }
        }
        let fresh = self.fetch().await?;
        let token = fresh.token.clone();
        *cached = Some(fresh);
        Ok(token)
    }

    async fn fetch(&self) -> Result<Cached, CrmError> {
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", self.client_id.as_str()),
            ("client_secret", self.client_secret.expose()),
            ("scope", self.scope.as_str()),
        ];
        let started = Instant::now();
        let resp = self
            .http
            .post(&self.token_url)
            .header(reqwest::header::ACCEPT, "application/json")
            .form(&form)
            .send()
            .await
            .map_err(|e| {
                CrmError::transient(format!(
                    "cannot reach the token endpoint {}: {}",
                    self.token_url,
                    super::describe_reqwest(&e)
                ))
            })?;
        let status = resp.status();
        let retry_after = super::retry_after(resp.headers());
        let body = resp.text().await.map_err(|e| {
            CrmError::transient(format!(
                "reading the token endpoint's answer failed: {}",
                super::describe_reqwest(&e)
            ))
        })?;
        if status.is_success() {
            let parsed: TokenResponse = serde_json::from_str(&body).map_err(|e| {
                CrmError::permanent(format!(
                    "the token endpoint {} answered {status} without a usable token ({e})",
                    self.token_url
                ))
            })?;
            // `expires_in` is a number, or a string of digits from older endpoints.
            let lifetime = match parsed.expires_in {
                Some(serde_json::Value::Number(n)) => n.as_u64(),
                Some(serde_json::Value::String(s)) => s.trim().parse().ok(),
                _ => None,
            }
            .map_or(Duration::from_secs(3600), Duration::from_secs);
            let expires_at = crate::model::now() + lifetime.as_secs() as i64;
            *self.expires_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(expires_at);
            return Ok(Cached {
                token: Secret::new(parsed.access_token),
                renew_at: started + lifetime.saturating_sub(refresh_margin(lifetime)),
            });
        }
        let detail: Option<TokenErrorBody> = serde_json::from_str(&body).ok();
        let text = detail
            .as_ref()
            .map(|d| {
                // Entra appends trace and correlation ids on new lines; the
                // first line is the AADSTS code and its explanation.
                let first = d.error_description.lines().next().unwrap_or("").trim();
                match (d.error.is_empty(), first.is_empty()) {
                    (false, false) => format!("{}: {first}", d.error),
                    (false, true) => d.error.clone(),
                    (true, false) => first.to_string(),
                    (true, true) => String::new(),
                }
            })
            .unwrap_or_default();
        let code = detail.as_ref().map(|d| d.error.as_str()).unwrap_or("");
        if status == reqwest::StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
            return Err(CrmError::Transient {
                message: format!("the token endpoint answered {status} {text}")
                    .trim_end()
                    .to_string(),
                retry_after,
            });
        }
        if code == "invalid_client" || code == "unauthorized_client" {
            return Err(CrmError::endpoint(format!(
                "the token endpoint rejected client {} (the client secret was rejected or has expired; create a new secret in the app registration): {text}",
                self.client_id
            )));
        }
        Err(CrmError::endpoint(format!(
            "the token endpoint refused client credentials for client {} ({status}): {}",
            self.client_id,
            if text.is_empty() {
                "no error text"
            } else {
                &text
            }
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn margin_is_a_tenth_within_bounds() {
        assert_eq!(
            refresh_margin(Duration::from_secs(3599)),
            Duration::from_secs(300)
        );
        assert_eq!(
            refresh_margin(Duration::from_secs(600)),
            Duration::from_secs(60)
        );
        assert_eq!(
            refresh_margin(Duration::from_secs(3)),
            Duration::from_secs(1)
        );
    }
}
