//! OAuth 2.0 access tokens for SASL XOAUTH2/OAUTHBEARER.
//!
//! Connectors ask a [`TokenProvider`] before every connect, never once at
//! startup: access tokens live about an hour, so whatever renews them (a
//! sidecar, a cron job, later our own refresh flow) must be picked up without
//! a restart. [`StaticToken`] serves a token from the configuration;
//! [`TokenFile`] re-reads a file on every request (it is small and read once
//! per login, so there is no cache to go stale).

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use crate::config::Secret;
use crate::connector::ConnectorError;
use crate::model::UnixTime;

/// An access token and, when known, when it stops working.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessToken {
    /// The bearer token.
    pub token: Secret,
    /// Expiry (Unix seconds), if the issuer or the operator told us.
    pub expires_at: Option<UnixTime>,
    /// When it was written (a token file's modification time), if known.
    pub issued_at: Option<UnixTime>,
}

impl AccessToken {
    /// See [`renewed_by_its_tool`].
    pub fn renewed_by_its_tool(&self, window: std::time::Duration) -> bool {
        renewed_by_its_tool(self.issued_at, self.expires_at, window)
    }
}

/// True for a token written at `issued_at` and expiring at `expires_at`
/// that lives shorter than `window` and a day at most: a short-lived access
/// token (an hour, typically) that the tool writing the file renews by
/// itself. Warning `window` ahead of its expiry would be a Warning at all
/// times; a renewal that stops shows as a rejected token naming the expiry
/// instead.
pub fn renewed_by_its_tool(
    issued_at: Option<UnixTime>,
    expires_at: Option<UnixTime>,
    window: std::time::Duration,
) -> bool {
    // Longer than a day is not an access token a tool renews hourly.
    const A_DAY: i64 = 86_400;
    match (issued_at, expires_at) {
        (Some(issued), Some(expires)) => {
            let lifetime = expires.saturating_sub(issued);
            lifetime <= A_DAY && lifetime < i64::try_from(window.as_secs()).unwrap_or(i64::MAX)
        }
        _ => false,
    }
}

/// Why no token could be had. Transient: a token file being rewritten, or
/// missing until the renewing job's next run, is worth retrying.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("OAuth token from {source_name}: {detail}")]
pub struct TokenError {
    /// Where the token was to come from (a file path).
    pub source_name: String,
    /// What went wrong.
    pub detail: String,
}

/// Future returned by [`TokenProvider::token`].
pub type TokenFuture<'a> =
    Pin<Box<dyn Future<Output = Result<AccessToken, TokenError>> + Send + 'a>>;

/// Source of OAuth 2.0 access tokens, asked before every authentication.
///
/// Asynchronous so a refresh-token flow (an HTTP call) can implement it later.
pub trait TokenProvider: Send + Sync + fmt::Debug {
    /// The token to authenticate with now.
    fn token(&self) -> TokenFuture<'_>;

    /// Whether the token can change while the daemon runs. A rejected token
    /// from such a provider is worth retrying (someone may rotate it); a
    /// rejected static token is not.
    fn rotates(&self) -> bool;

    /// Where the token comes from, for messages to the operator (never the token).
    fn describe(&self) -> String;
}

/// A token fixed in the configuration (inline or from the environment).
#[derive(Debug, Clone)]
pub struct StaticToken {
    token: AccessToken,
}

impl StaticToken {
    /// A provider that always returns `token`.
    pub fn new(token: Secret, expires_at: Option<UnixTime>) -> Self {
        StaticToken {
            token: AccessToken {
                token,
                expires_at,
                issued_at: None,
            },
        }
    }
}

impl TokenProvider for StaticToken {
    fn token(&self) -> TokenFuture<'_> {
        let t = self.token.clone();
        Box::pin(async move { Ok(t) })
    }

    fn rotates(&self) -> bool {
        false
    }

    fn describe(&self) -> String {
        "the configured password/password_env".into()
    }
}

/// A token in a file, re-read on every request.
///
/// The file holds either the bare token, or JSON as written by most token
/// tools: `{"access_token": "...", "expires_at": "RFC 3339"}` or
/// `{"access_token": "...", "expires_in": seconds}` (counted from the file's
/// modification time, i.e. when the token was written).
#[derive(Debug, Clone)]
pub struct TokenFile {
    path: PathBuf,
    /// Expiry from the configuration, for a bare token (JSON expiry wins: it is
    /// written together with the token it belongs to).
    configured_expiry: Option<UnixTime>,
}

impl TokenFile {
    /// A provider reading `path`.
    pub fn new(path: impl Into<PathBuf>, configured_expiry: Option<UnixTime>) -> Self {
        TokenFile {
            path: path.into(),
            configured_expiry,
        }
    }

    /// Reads and parses the file now.
    pub fn read(&self) -> Result<AccessToken, TokenError> {
        let err = |detail: String| TokenError {
            source_name: self.path.display().to_string(),
            detail,
        };
        let text = std::fs::read_to_string(&self.path).map_err(|e| err(e.to_string()))?;
        let mtime = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_secs() as i64);
        let mut token = parse_token_file(&text, mtime).map_err(err)?;
        if token.expires_at.is_none() {
            token.expires_at = self.configured_expiry;
        }
        Ok(token)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl TokenProvider for TokenFile {
    fn token(&self) -> TokenFuture<'_> {
        // A few hundred bytes from a local file: not worth a blocking-pool hop.
        let r = self.read();
        Box::pin(async move { r })
    }

    fn rotates(&self) -> bool {
        true
    }

    fn describe(&self) -> String {
        format!("token file {}", self.path.display())
    }
}

/// Labels an authentication failure with the token it was made with, so the
/// operator learns the token (and whether it expired) is the problem, and so
/// a rotating token source is retried. Other errors pass through.
pub fn label_auth_error(
    provider: &dyn TokenProvider,
    token: &AccessToken,
    error: ConnectorError,
    now: UnixTime,
) -> ConnectorError {
    if !error.is_auth_failure() || matches!(error, ConnectorError::TokenRejected { .. }) {
        return error;
    }
    ConnectorError::TokenRejected {
        error: Box::new(error),
        provider: provider.describe(),
        expired_at: token.expires_at.filter(|t| *t <= now),
        rotates: provider.rotates(),
    }
}

/// Parses token file content: JSON (`access_token` with `expires_at` or
/// `expires_in`) or a bare token on the first line. `mtime` anchors `expires_in`.
pub fn parse_token_file(text: &str, mtime: Option<UnixTime>) -> Result<AccessToken, String> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err("the file is empty".into());
    }
    if !trimmed.starts_with('{') {
        let line = trimmed.lines().next().unwrap_or_default().trim();
        return Ok(AccessToken {
            token: Secret::new(line),
            expires_at: None,
            issued_at: mtime,
        });
    }
    let v: serde_json::Value =
        serde_json::from_str(trimmed).map_err(|e| format!("not valid JSON: {e}"))?;
    let token = match v.get("access_token") {
        Some(serde_json::Value::String(s)) if !s.trim().is_empty() => s.trim().to_string(),
        _ => return Err("JSON without a non-empty \"access_token\" string".into()),
    };
    let expires_at = match (v.get("expires_at"), v.get("expires_in")) {
        (Some(serde_json::Value::String(s)), _) => Some(
            chrono::DateTime::parse_from_rfc3339(s)
                .map_err(|e| format!("\"expires_at\" {s:?} is not an RFC 3339 time: {e}"))?
                .timestamp(),
        ),
        (Some(serde_json::Value::Number(n)), _) => Some(
            n.as_i64()
                .ok_or_else(|| format!("\"expires_at\" {n} is not whole Unix seconds"))?,
        ),
        (Some(other), _) => {
            return Err(format!(
                "\"expires_at\" must be an RFC 3339 string, found {other}"
            ))
        }
        (None, Some(n)) => {
            let secs = n
                .as_i64()
                .ok_or_else(|| format!("\"expires_in\" {n} is not whole seconds"))?;
            let written = mtime.ok_or("\"expires_in\" needs the file's modification time")?;
            Some(written.saturating_add(secs))
        }
        (None, None) => None,
    };
    Ok(AccessToken {
        token: Secret::new(token),
        expires_at,
        issued_at: mtime,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: an hourly access token that its tool rewrites was
    /// "expiring within 7 days" at all times, a Warning that never went.
    #[test]
    fn an_hourly_token_from_a_file_is_renewed_by_its_tool_a_long_lived_one_is_not() {
        let week = std::time::Duration::from_secs(7 * 86_400);
        let hourly =
            parse_token_file(r#"{"access_token":"t","expires_in":3600}"#, Some(1_000)).unwrap();
        assert_eq!(
            (hourly.issued_at, hourly.expires_at),
            (Some(1_000), Some(4_600))
        );
        assert!(hourly.renewed_by_its_tool(week));
        let quarterly =
            parse_token_file(r#"{"access_token":"t","expires_in":7776000}"#, Some(1_000)).unwrap();
        assert!(
            !quarterly.renewed_by_its_tool(week),
            "a person renews this one"
        );
        // Three days: longer than an access token lives; warned ahead.
        let days =
            parse_token_file(r#"{"access_token":"t","expires_in":259200}"#, Some(1_000)).unwrap();
        assert!(!days.renewed_by_its_tool(week));
        // Without a write time (a token in the configuration) it is a
        // person's to renew: warned ahead as before.
        let configured = AccessToken {
            token: Secret::new("t"),
            expires_at: Some(4_600),
            issued_at: None,
        };
        assert!(!configured.renewed_by_its_tool(week));
    }

    #[test]
    fn bare_token_is_the_first_line_trimmed() {
        let t = parse_token_file("  abc.def \n", None).unwrap();
        assert_eq!(t.token.expose(), "abc.def");
        assert_eq!(t.expires_at, None);
        assert!(parse_token_file(" \n", None).is_err());
    }

    #[test]
    fn json_expiry_as_rfc3339_or_relative_to_mtime() {
        let t = parse_token_file(
            r#"{"access_token":"tok","expires_at":"2030-01-02T03:04:05Z"}"#,
            None,
        )
        .unwrap();
        assert_eq!(t.token.expose(), "tok");
        assert_eq!(t.expires_at, Some(1_893_553_445));
        let t =
            parse_token_file(r#"{"access_token":"tok","expires_in":3600}"#, Some(1000)).unwrap();
        assert_eq!(t.expires_at, Some(4600));
        let t = parse_token_file(r#"{"access_token":"tok"}"#, Some(1000)).unwrap();
        assert_eq!(t.expires_at, None);
    }

    #[test]
    fn bad_json_is_an_error_that_never_shows_the_token() {
        for bad in [
            r#"{"access_token":""}"#,
            r#"{"token":"secret-xyz"}"#,
            r#"{"access_token":"secret-xyz","expires_at":"tomorrow"}"#,
            r#"{"access_token":"secret-xyz","expires_at":true}"#,
            r#"{"access_token":"secret-xyz""#,
        ] {
            let e = parse_token_file(bad, Some(0)).unwrap_err();
            assert!(!e.contains("secret-xyz"), "{e}");
        }
    }

    #[tokio::test]
    async fn token_file_is_reread_on_every_request() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "first\n").unwrap();
        let p = TokenFile::new(&path, Some(42));
        let t = p.token().await.unwrap();
        assert_eq!(t.token.expose(), "first");
        // A bare token takes the configured expiry.
        assert_eq!(t.expires_at, Some(42));
        assert!(p.rotates());
        std::fs::write(
            &path,
            r#"{"access_token":"second","expires_at":"2030-01-01T00:00:00Z"}"#,
        )
        .unwrap();
        let t = p.token().await.unwrap();
        assert_eq!(t.token.expose(), "second");
        assert_eq!(t.expires_at, Some(1_893_456_000));
        std::fs::remove_file(&path).unwrap();
        let e = p.token().await.unwrap_err();
        assert!(e.to_string().contains("token"), "{e}");
    }

    #[test]
    fn rejected_tokens_say_expired_and_rotating_ones_are_retried() {
        use crate::connector::imap::ImapError;
        use crate::error::{Classify, Disposition};
        let auth = || {
            ConnectorError::Imap(ImapError::AuthFailed {
                mechanism: "XOAUTH2",
                code: Some("AUTHENTICATIONFAILED".into()),
                text: "Authentication failed.".into(),
            })
        };
        let expired = AccessToken {
            token: Secret::new("t"),
            expires_at: Some(100),
            issued_at: None,
        };
        let file = TokenFile::new("/run/tok", None);
        let e = label_auth_error(&file, &expired, auth(), 200);
        assert_eq!(e.disposition(), Disposition::Transient, "{e}");
        assert_eq!(e.expired_token(), Some(100));
        let text = e.to_string();
        assert!(text.contains("expired at 1970-01-01T00:01:40Z"), "{text}");
        assert!(
            text.contains("/run/tok") && text.contains("AUTHENTICATIONFAILED"),
            "{text}"
        );
        // Not yet expired: rejected, but not called expired.
        let e = label_auth_error(&file, &expired, auth(), 50);
        assert_eq!(e.expired_token(), None);
        assert!(!e.to_string().contains("expired"), "{e}");
        // A static token stays permanent: it cannot change without a restart.
        let fixed = StaticToken::new(Secret::new("t"), Some(100));
        let e = label_auth_error(&fixed, &expired, auth(), 200);
        assert_eq!(e.disposition(), Disposition::Permanent, "{e}");
        // Network trouble is not a token problem.
        let net = ConnectorError::Imap(ImapError::ConnectionLost(String::new()));
        let e = label_auth_error(&file, &expired, net, 200);
        assert!(!e.is_auth_failure(), "{e}");
    }

    #[tokio::test]
    async fn static_token_does_not_rotate() {
        let p = StaticToken::new(Secret::new("s"), None);
        assert_eq!(p.token().await.unwrap().token.expose(), "s");
        assert!(!p.rotates());
    }
}
