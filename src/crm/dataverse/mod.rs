//! `[crm] type = "dataverse"`: Dynamics 365 / Dataverse over its Web API v9.2.
//!
//! - Authentication: OAuth 2.0 client credentials ([`token`]), the token
//!   cached and renewed before expiry; a 401 from the API renews it once and
//!   repeats the request.
//! - Records ([`records`]): `contacts`, `accounts`, `leads`, `systemusers`,
//!   `queues`, delta-pulled by `modifiedon`, paged by `@odata.nextLink`.
//! - Activities ([`emails`]): each `activity.created` becomes one `email`
//!   row (looked up by `messageid` first, so a retried create never makes a
//!   second one); `activity.updated` re-points it or replaces its parties.
//! - Outgoing email ([`send_status`], [`pending`]): an activity with a send
//!   state writes its status into the email's `statecode`/`statuscode`, and
//!   updates the CRM's own email when it came from Pending Send; the
//!   Pending Send emails of sending mailboxes are polled and queued.
//!
//! Wire format as in Microsoft's Web API documentation: headers `Accept:
//! application/json`, `OData-MaxVersion: 4.0`, `OData-Version: 4.0`; errors
//! `{"error":{"code":"0x…","message":"…"}}`; `429` with `Retry-After` seconds.

mod emails;
pub mod pending;
mod records;
pub mod send_status;
mod token;

/// The Dataverse stand-in of the integration tests, for the unit tests here.
#[cfg(test)]
#[path = "../../../tests/support/dataverse_standin.rs"]
pub(crate) mod standin;

#[cfg(test)]
mod outgoing_tests;

use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode};
use serde::Deserialize;

use crate::config::DataverseSettings;
use crate::crm::{CrmAdapter, CrmError, DeliveryReceipt, RecordPage};
use crate::model::{OutboxEvent, UnixTime};

pub use emails::{correlation_method_value, synthetic_message_id};

/// The Web API path under the environment URL.
const API_PATH: &str = "/api/data/v9.2";

/// The Dataverse adapter (see the module docs).
#[derive(Debug)]
pub struct DataverseAdapter {
    http: reqwest::Client,
    /// Environment URL without a trailing `/`.
    url: String,
    /// `<url>/api/data/v9.2`.
    api: String,
    tokens: token::TokenSource,
    page_size: u32,
}

/// A Dataverse error body, `{"error":{"code":"0x…","message":"…"}}`.
#[derive(Debug, Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Debug, Deserialize)]
struct ErrorDetail {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

/// A response that was not an error: status, headers, body.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

/// What a request is for, in the operator's words ("creating email …").
type Purpose<'a> = &'a str;

impl DataverseAdapter {
    /// Builds the adapter: HTTPS with certificate verification (rustls with
    /// the system roots plus `ca_file`), plaintext `http://` only to loopback
    /// or with `allow_insecure`. Does not contact anything yet.
    pub fn new(settings: &DataverseSettings) -> Result<Self, CrmError> {
        for (key, url) in [("url", &settings.url), ("token_url", &settings.token_url)] {
            check_url(key, url, settings.allow_insecure)?;
        }
        let tls = crate::net::client_config(settings.ca_file.as_deref())
            .map_err(|e| CrmError::permanent(format!("Dataverse TLS setup: {e}")))?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls((*tls).clone())
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout.min(Duration::from_secs(30)))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("crm-mailsync/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| CrmError::permanent(format!("Dataverse HTTP client setup: {e}")))?;
        let url = settings.url.trim_end_matches('/').to_string();
        Ok(DataverseAdapter {
            tokens: token::TokenSource::new(
                http.clone(),
                settings.token_url.clone(),
                settings.client_id.clone(),
                settings.client_secret.clone(),
                settings.scope.clone(),
            ),
            http,
            api: format!("{url}{API_PATH}"),
            url,
            page_size: settings.page_size.clamp(1, 5000),
        })
    }

    /// When the current access token expires (Unix seconds), for the
    /// daemon's "token about to expire" alert; `None` before the first
    /// request.
    pub fn token_expires_at(&self) -> Option<UnixTime> {
        self.tokens.expires_at()
    }

    /// One API request with the bearer token: a 401 renews the token once
    /// and repeats the request; every failure is classified (see
    /// [`classify`]). `path_or_url` is relative to `…/api/data/v9.2/` or,
    /// for `@odata.nextLink`, a full URL (checked to be on this environment).
    async fn request(
        &self,
        method: Method,
        path_or_url: &str,
        headers: &[(&str, String)],
        body: Option<&serde_json::Value>,
        purpose: Purpose<'_>,
    ) -> Result<Answer, CrmError> {
        self.request_accepting(method, path_or_url, headers, body, purpose, &[])
            .await
    }

    /// [`Self::request`], with the error statuses in `accept` returned as
    /// answers (a 404 the caller handles itself).
    async fn request_accepting(
        &self,
        method: Method,
        path_or_url: &str,
        headers: &[(&str, String)],
        body: Option<&serde_json::Value>,
        purpose: Purpose<'_>,
        accept: &[StatusCode],
    ) -> Result<Answer, CrmError> {
        let url = if path_or_url.starts_with("https://") || path_or_url.starts_with("http://") {
            if !path_or_url.starts_with(&format!("{}/", self.api)) {
                return Err(CrmError::permanent(format!(
                    "{purpose}: Dataverse returned a link outside {} ({path_or_url}); not following it with our token",
                    self.api
                )));
            }
            path_or_url.to_string()
        } else {
            format!("{}/{}", self.api, path_or_url.trim_start_matches('/'))
        };
        let mut token = self.tokens.token().await?;
        let mut renewed = false;
        loop {
            let mut req = self
                .http
                .request(method.clone(), &url)
                .bearer_auth(token.expose())
                .header("Accept", "application/json")
                .header("OData-MaxVersion", "4.0")
                .header("OData-Version", "4.0");
            for (k, v) in headers {
                req = req.header(*k, v.as_str());
            }
            if let Some(b) = body {
                req = req
                    .header("Content-Type", "application/json; charset=utf-8")
                    .body(b.to_string());
            }
            let resp = req.send().await.map_err(|e| {
                CrmError::transient(format!(
                    "{purpose}: Dataverse at {} did not answer: {}",
                    self.url,
                    describe_reqwest(&e)
                ))
            })?;
            let status = resp.status();
            let resp_headers = resp.headers().clone();
            let text = resp.text().await.map_err(|e| {
                CrmError::transient(format!(
                    "{purpose}: reading Dataverse's answer failed: {}",
                    describe_reqwest(&e)
                ))
            })?;
            if status == StatusCode::UNAUTHORIZED {
                if !renewed {
                    tracing::info!(
                        adapter = "dataverse",
                        "access token refused (401); renewing it and repeating the request"
                    );
                    token = self.tokens.renew(&token).await?;
                    renewed = true;
                    continue;
                }
                return Err(CrmError::endpoint(format!(
                    "{purpose}: Dataverse credentials rejected: a freshly issued token was refused with 401{}; check that the app registration is an application user in this environment with a security role",
                    www_authenticate_error(&resp_headers)
                )));
            }
            if status.is_success() || accept.contains(&status) {
                return Ok(Answer {
                    status,
                    headers: resp_headers,
                    body: text,
                });
            }
            return Err(classify(status, &resp_headers, &text, purpose));
        }
    }

    async fn get_json(
        &self,
        path_or_url: &str,
        headers: &[(&str, String)],
        purpose: Purpose<'_>,
    ) -> Result<serde_json::Value, CrmError> {
        let answer = self
            .request(Method::GET, path_or_url, headers, None, purpose)
            .await?;
        serde_json::from_str(&answer.body).map_err(|e| {
            CrmError::permanent(format!(
                "{purpose}: Dataverse answered {} with a body that is not the expected JSON ({e})",
                answer.status
            ))
        })
    }
}

impl CrmAdapter for DataverseAdapter {
    fn name(&self) -> &'static str {
        "dataverse"
    }

    async fn pull_records(&self, cursor: Option<&str>) -> Result<RecordPage, CrmError> {
        records::pull(self, cursor).await
    }

    async fn deliver(
        &self,
        event: &OutboxEvent,
        crm_id: Option<&str>,
    ) -> Result<DeliveryReceipt, CrmError> {
        emails::deliver(self, event, crm_id).await
    }

    async fn test(&self) -> Result<String, CrmError> {
        let who = self
            .get_json("WhoAmI", &[], "testing the connection (WhoAmI)")
            .await?;
        let user_id = who
            .get("UserId")
            .and_then(|v| v.as_str())
            .ok_or_else(|| {
                CrmError::permanent(
                    "WhoAmI answered without a UserId; is this a Dataverse Web API endpoint?",
                )
            })?
            .to_string();
        let org = who
            .get("OrganizationId")
            .and_then(|v| v.as_str())
            .unwrap_or("unknown organization")
            .to_string();
        if !is_guid(&user_id) {
            return Err(CrmError::permanent(format!(
                "WhoAmI answered a UserId that is not a GUID: {user_id:?}"
            )));
        }
        let name = self
            .get_json(
                &format!("systemusers({user_id})?$select=fullname"),
                &[],
                "reading the application user's name",
            )
            .await
            .ok()
            .and_then(|u| u.get("fullname").and_then(|n| n.as_str()).map(String::from))
            .unwrap_or_else(|| "(name not readable)".into());
        Ok(format!(
            "connected to {} (organization {org}) as user {name} ({user_id})",
            self.url
        ))
    }
}

/// Plaintext only to loopback, or when the operator allowed it.
fn check_url(key: &str, url: &str, allow_insecure: bool) -> Result<(), CrmError> {
    let parsed = reqwest::Url::parse(url)
        .map_err(|e| CrmError::permanent(format!("[crm] {key} {url:?} is not a URL: {e}")))?;
    match parsed.scheme() {
        "https" => Ok(()),
        "http" => {
            if !crate::net::plaintext_off_loopback(&parsed) || allow_insecure {
                Ok(())
            } else {
                Err(CrmError::permanent(format!(
                    "[crm] {key} {url:?}: plaintext http:// is allowed only to loopback; use https:// or set allow_insecure = true"
                )))
            }
        }
        other => Err(CrmError::permanent(format!(
            "[crm] {key} {url:?}: scheme {other} is not http(s)"
        ))),
    }
}

/// Maps a non-success answer (other than the 401 handled by the caller) to
/// transient or permanent; the message ends in Dataverse's own code and text.
fn classify(status: StatusCode, headers: &HeaderMap, body: &str, purpose: Purpose<'_>) -> CrmError {
    let detail = match serde_json::from_str::<ErrorBody>(body) {
        Ok(b) if !b.error.code.is_empty() || !b.error.message.is_empty() => {
            format!("{}: {}", b.error.code, b.error.message)
        }
        _ => {
            let t: String = body.trim().chars().take(300).collect();
            if t.is_empty() {
                "no error body".into()
            } else {
                t
            }
        }
    };
    let message = format!("{purpose}: Dataverse answered {status}: {detail}");
    if status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
        || status == StatusCode::REQUEST_TIMEOUT
    {
        CrmError::Transient {
            message,
            retry_after: retry_after(headers),
        }
    } else if status == StatusCode::FORBIDDEN {
        // The application user lacks a privilege: every request fails alike,
        // so delivery pauses (nothing is dead-lettered) until a role is given.
        CrmError::endpoint(message)
    } else {
        CrmError::permanent(message)
    }
}

/// `Retry-After` as seconds (Dataverse) or an HTTP date; fractions allowed.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = v.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0)
            .then(|| Duration::from_secs_f64(secs.min(86_400.0)));
    }
    let at = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    let wait = at.timestamp() - crate::model::now();
    Some(Duration::from_secs(wait.clamp(0, 86_400) as u64))
}

/// The `error`/`error_description` of a `WWW-Authenticate: Bearer …` header,
/// as " (invalid_token: …)", or nothing.
fn www_authenticate_error(headers: &HeaderMap) -> String {
    headers
        .get(reqwest::header::WWW_AUTHENTICATE)
        .and_then(|v: &HeaderValue| v.to_str().ok())
        .map(|v| format!(" ({v})"))
        .unwrap_or_default()
}

/// A transport error without the URL's query (it may carry a skiptoken
/// cookie, never a secret, but it is long) and with its cause chain.
fn describe_reqwest(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    let mut out = kind.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}

/// Whether `s` is a GUID in the 8-4-4-4-12 hex form Dataverse uses.
pub(crate) fn is_guid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() == 5
        && parts
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(p, n)| p.len() == n && p.chars().all(|c| c.is_ascii_hexdigit()))
}

/// An OData string literal: single quotes, a `'` inside doubled.
pub(crate) fn odata_string(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Percent-encodes a query value (everything but RFC 3986 unreserved).
pub(crate) fn query_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3 / 2);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A record kind's Dataverse table: (logical name, entity set name).
///
/// The directory's kinds map to the standard tables (`user` → `systemuser`,
/// `case` → `incident`); any other kind is taken as the table's logical
/// name with the usual English plural for its entity set (`opportunity` →
/// `opportunities`, `new_project` → `new_projects`).
pub fn table_of(kind: &str) -> (String, String) {
    let logical = match kind {
        "user" => "systemuser",
        "case" => "incident",
        other => other,
    }
    .to_string();
    let set = if let Some(stem) = logical
        .strip_suffix('y')
        .filter(|s| !s.ends_with(['a', 'e', 'i', 'o', 'u']))
    {
        format!("{stem}ies")
    } else if logical.ends_with('s')
        || logical.ends_with("sh")
        || logical.ends_with("ch")
        || logical.ends_with('x')
    {
        format!("{logical}es")
    } else {
        format!("{logical}s")
    };
    (logical, set)
}

/// The directory's record kind of a Dataverse table (logical name): the
/// inverse of [`table_of`] (`incident` → `case`, `systemuser` → `user`).
pub fn kind_of(logical: &str) -> String {
    match logical {
        "systemuser" => "user",
        "incident" => "case",
        other => other,
    }
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_invert_tables() {
        for kind in ["case", "user", "contact", "opportunity", "queue"] {
            assert_eq!(kind_of(&table_of(kind).0), kind);
        }
    }

    #[test]
    fn tables_and_entity_sets() {
        assert_eq!(table_of("case"), ("incident".into(), "incidents".into()));
        assert_eq!(
            table_of("opportunity"),
            ("opportunity".into(), "opportunities".into())
        );
        assert_eq!(
            table_of("user"),
            ("systemuser".into(), "systemusers".into())
        );
        assert_eq!(table_of("contact"), ("contact".into(), "contacts".into()));
        assert_eq!(table_of("queue"), ("queue".into(), "queues".into()));
        assert_eq!(table_of("address"), ("address".into(), "addresses".into()));
    }

    #[test]
    fn odata_quoting_and_encoding() {
        assert_eq!(odata_string("o'brien@x"), "'o''brien@x'");
        assert_eq!(query_encode("a b'<c>"), "a%20b%27%3Cc%3E");
        assert!(is_guid("00aa00aa-bb11-cc22-dd33-44ee44ee44ee"));
        assert!(!is_guid("case-42"));
    }

    #[test]
    fn errors_keep_dataverse_code_and_text() {
        let body =
            r#"{"error":{"code":"0x80040217","message":"incident With Id = 1 Does Not Exist"}}"#;
        let e = classify(
            StatusCode::BAD_REQUEST,
            &HeaderMap::new(),
            body,
            "creating email",
        );
        assert!(matches!(e, CrmError::Permanent { .. }));
        assert!(e
            .to_string()
            .ends_with("0x80040217: incident With Id = 1 Does Not Exist"));
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("7"));
        let e = classify(StatusCode::TOO_MANY_REQUESTS, &h, "", "x");
        assert_eq!(e.retry_after(), Some(Duration::from_secs(7)));
        let e = classify(StatusCode::SERVICE_UNAVAILABLE, &HeaderMap::new(), "", "x");
        assert!(matches!(e, CrmError::Transient { .. }));
    }

    #[test]
    fn plaintext_only_to_loopback() {
        assert!(check_url("url", "http://127.0.0.1:9/", false).is_ok());
        assert!(check_url("url", "http://localhost:9/", false).is_ok());
        assert!(check_url("url", "http://crm.example.com/", false).is_err());
        assert!(check_url("url", "http://crm.example.com/", true).is_ok());
        assert!(check_url("url", "https://crm.example.com/", false).is_ok());
    }
}
