//! Graph errors and their classification by HTTP status and Graph error code
//! (`{"error":{"code":"…","message":"…"}}`), per Graph's "Microsoft Graph
//! error responses and resource types" and the Outlook mail API's own codes.

use std::time::Duration;

use reqwest::header::HeaderMap;
use reqwest::StatusCode;

use crate::entra::EntraError;
use crate::error::{Classify, Disposition};

/// What a request was about, which decides what a 404 means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The mailbox or one of its folders (a 404 means the mailbox is not there).
    Mailbox,
    /// One message (a 404 means the message is gone).
    Message,
}

/// What to do about missing rights; the alert says it.
pub const GRANT_ACCESS: &str = "grant Mail.ReadWrite (application) with admin consent and include this mailbox in the app's RBAC for Applications scope";

/// A failed Graph request.
#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    /// No access token could be had.
    #[error("{}", token_text(.0))]
    Token(EntraError),
    /// A freshly issued token was refused (401 twice).
    #[error("{what}: Graph refused a freshly issued access token ({code}: {message}); check that the app registration's tenant is the mailbox's tenant and that the token's scope is https://graph.microsoft.com/.default")]
    TokenRejected {
        what: String,
        code: String,
        message: String,
    },
    /// Network trouble or a time-out.
    #[error("{what}: Graph did not answer: {detail}")]
    Unreachable { what: String, detail: String },
    /// Throttled or a server failure (429, 503, 504, other 5xx, throttling
    /// codes), after the retries inside the call.
    #[error("{what}: Graph answered {status} {code}: {message}")]
    Busy {
        what: String,
        status: u16,
        code: String,
        message: String,
        retry_after: Option<Duration>,
    },
    /// The app may not read this mailbox.
    #[error(
        "{what}: access denied for mailbox {user} ({status} {code}: {message}): {GRANT_ACCESS}"
    )]
    AccessDenied {
        what: String,
        user: String,
        status: u16,
        code: String,
        message: String,
    },
    /// The mailbox does not exist (or is not an Exchange Online mailbox).
    #[error("{what}: mailbox not found: {user} ({status} {code}: {message}); check the mailbox's address, that it is an Exchange Online mailbox and that it has a license")]
    MailboxNotFound {
        what: String,
        user: String,
        status: u16,
        code: String,
        message: String,
    },
    /// The message (or folder) is not there any more.
    #[error("{what}: not found ({code}: {message})")]
    Gone {
        what: String,
        code: String,
        message: String,
    },
    /// The delta state is no longer valid (410, `syncStateNotFound`,
    /// `resyncRequired`): the folder's round starts from scratch.
    #[error("{what}: Graph requires a full resync ({status} {code}: {message})")]
    Resync {
        what: String,
        status: u16,
        code: String,
        message: String,
    },
    /// Any other refusal that repeating cannot fix.
    #[error("{what}: Graph answered {status} {code}: {message}")]
    Refused {
        what: String,
        status: u16,
        code: String,
        message: String,
    },
    /// An answer that is not what Graph documents.
    #[error("{what}: unexpected answer from Graph: {detail}")]
    BadAnswer { what: String, detail: String },
}

fn token_text(e: &EntraError) -> String {
    format!("getting a Graph access token: {e}")
}

impl Classify for GraphError {
    fn disposition(&self) -> Disposition {
        match self {
            GraphError::Token(e) => e.disposition(),
            GraphError::Unreachable { .. }
            | GraphError::Busy { .. }
            | GraphError::Resync { .. } => Disposition::Transient,
            GraphError::TokenRejected { .. }
            | GraphError::AccessDenied { .. }
            | GraphError::MailboxNotFound { .. }
            | GraphError::Gone { .. }
            | GraphError::Refused { .. }
            | GraphError::BadAnswer { .. } => Disposition::Permanent,
        }
    }
}

impl GraphError {
    /// Graph's (or the token endpoint's) own `Retry-After`.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            GraphError::Busy { retry_after, .. } => *retry_after,
            GraphError::Token(e) => e.retry_after(),
            _ => None,
        }
    }

    /// True when the client or its token was rejected (an authentication
    /// failure the operator fixes in the app registration).
    pub fn is_auth_failure(&self) -> bool {
        match self {
            GraphError::Token(e) => e.is_rejected(),
            GraphError::TokenRejected { .. } => true,
            _ => false,
        }
    }

    /// The message or folder is not there (any more).
    pub fn is_gone(&self) -> bool {
        matches!(self, GraphError::Gone { .. })
    }

    /// The delta state must be dropped.
    pub fn is_resync(&self) -> bool {
        matches!(self, GraphError::Resync { .. })
    }

    /// The Graph error code (or the AADSTS code of a token rejection).
    pub fn code(&self) -> Option<&str> {
        match self {
            GraphError::Token(e) => e.aadsts(),
            GraphError::TokenRejected { code, .. }
            | GraphError::Busy { code, .. }
            | GraphError::AccessDenied { code, .. }
            | GraphError::MailboxNotFound { code, .. }
            | GraphError::Gone { code, .. }
            | GraphError::Resync { code, .. }
            | GraphError::Refused { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// `{"error":{"code","message"}}`, or the start of a body that is not.
pub(crate) fn error_parts(body: &[u8]) -> (String, String) {
    #[derive(serde::Deserialize)]
    struct Body {
        error: Detail,
    }
    #[derive(serde::Deserialize)]
    struct Detail {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    match serde_json::from_slice::<Body>(body) {
        Ok(b) => (b.error.code, b.error.message),
        Err(_) => {
            let t: String = String::from_utf8_lossy(body)
                .trim()
                .chars()
                .take(300)
                .collect();
            (
                String::new(),
                if t.is_empty() {
                    "no error body".into()
                } else {
                    t
                },
            )
        }
    }
}

/// Codes Graph uses for throttling and overload, whatever the status.
const BUSY_CODES: &[&str] = &[
    "TooManyRequests",
    "ServiceUnavailable",
    "ServerBusy",
    "MailboxConcurrency",
    "ApplicationThrottled",
    "ErrorServerBusy",
    "ErrorTooManyObjectsOpened",
    "ErrorTimeoutExpired",
    "ErrorInternalServerTransientError",
    "activityLimitReached",
    "generalException",
    "timeout",
];

/// Status and code → error. `what` is the operator's words for the
/// request, `user` the mailbox.
pub fn classify(
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    target: Target,
    what: &str,
    user: &str,
) -> GraphError {
    let (code, message) = error_parts(body);
    let what = what.to_string();
    let s = status.as_u16();
    let code_is = |list: &[&str]| list.iter().any(|c| c.eq_ignore_ascii_case(&code));
    if status == StatusCode::GONE
        || code_is(&["syncStateNotFound", "resyncRequired", "syncStateInvalid"])
    {
        return GraphError::Resync {
            what,
            status: s,
            code,
            message,
        };
    }
    if status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
        || status == StatusCode::REQUEST_TIMEOUT
        || code_is(BUSY_CODES)
    {
        return GraphError::Busy {
            what,
            status: s,
            code,
            message,
            retry_after: crate::entra::retry_after(headers),
        };
    }
    if code_is(&[
        "MailboxNotEnabledForRESTAPI",
        "ErrorInvalidUser",
        "ErrorNonExistentMailbox",
        "MailboxNotSupportedForRESTAPI",
        "ErrorMailboxNotFound",
    ]) {
        return GraphError::MailboxNotFound {
            what,
            user: user.to_string(),
            status: s,
            code,
            message,
        };
    }
    if status == StatusCode::FORBIDDEN
        || code_is(&[
            "ErrorAccessDenied",
            "Authorization_RequestDenied",
            "AccessDenied",
            "ErrorAccessDeniedForMailbox",
        ])
    {
        return GraphError::AccessDenied {
            what,
            user: user.to_string(),
            status: s,
            code,
            message,
        };
    }
    if status == StatusCode::UNAUTHORIZED {
        return GraphError::TokenRejected {
            what,
            code,
            message,
        };
    }
    if status == StatusCode::NOT_FOUND || code_is(&["ErrorItemNotFound", "ResourceNotFound"]) {
        return match target {
            Target::Message => GraphError::Gone {
                what,
                code,
                message,
            },
            Target::Mailbox if code_is(&["ErrorItemNotFound", "ErrorFolderNotFound"]) => {
                GraphError::Gone {
                    what,
                    code,
                    message,
                }
            }
            Target::Mailbox => GraphError::MailboxNotFound {
                what,
                user: user.to_string(),
                status: s,
                code,
                message,
            },
        };
    }
    // 400 and the rest (ErrorMimeContentInvalidBase64String, invalidRequest,
    // ErrorInvalidRecipients…): the same request fails the same way again.
    GraphError::Refused {
        what,
        status: s,
        code,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(status: u16, code: &str, target: Target) -> GraphError {
        let body = format!(r#"{{"error":{{"code":"{code}","message":"m"}}}}"#);
        classify(
            StatusCode::from_u16(status).unwrap(),
            &HeaderMap::new(),
            body.as_bytes(),
            target,
            "w",
            "u@x",
        )
    }

    #[test]
    fn classification_table() {
        use Disposition::*;
        use Target::*;
        let table: &[(u16, &str, Target, Disposition, &str)] = &[
            (429, "TooManyRequests", Mailbox, Transient, "Busy"),
            (503, "ServiceUnavailable", Mailbox, Transient, "Busy"),
            (504, "", Message, Transient, "Busy"),
            (500, "generalException", Mailbox, Transient, "Busy"),
            (502, "", Mailbox, Transient, "Busy"),
            (429, "ApplicationThrottled", Mailbox, Transient, "Busy"),
            (429, "MailboxConcurrency", Mailbox, Transient, "Busy"),
            (503, "ServerBusy", Mailbox, Transient, "Busy"),
            (404, "ErrorItemNotFound", Message, Permanent, "Gone"),
            (404, "ResourceNotFound", Message, Permanent, "Gone"),
            (
                404,
                "ResourceNotFound",
                Mailbox,
                Permanent,
                "MailboxNotFound",
            ),
            (
                404,
                "MailboxNotEnabledForRESTAPI",
                Mailbox,
                Permanent,
                "MailboxNotFound",
            ),
            (
                404,
                "ErrorInvalidUser",
                Message,
                Permanent,
                "MailboxNotFound",
            ),
            (403, "ErrorAccessDenied", Mailbox, Permanent, "AccessDenied"),
            (
                403,
                "Authorization_RequestDenied",
                Mailbox,
                Permanent,
                "AccessDenied",
            ),
            (403, "", Message, Permanent, "AccessDenied"),
            (410, "", Mailbox, Transient, "Resync"),
            (400, "syncStateNotFound", Mailbox, Transient, "Resync"),
            (400, "resyncRequired", Mailbox, Transient, "Resync"),
            (
                400,
                "ErrorMimeContentInvalidBase64String",
                Mailbox,
                Permanent,
                "Refused",
            ),
            (400, "ErrorInvalidRecipients", Mailbox, Permanent, "Refused"),
            (
                401,
                "InvalidAuthenticationToken",
                Mailbox,
                Permanent,
                "TokenRejected",
            ),
        ];
        for (status, code, target, disposition, variant) in table {
            let e = c(*status, code, *target);
            assert_eq!(e.disposition(), *disposition, "{status} {code}: {e}");
            assert!(
                format!("{e:?}").starts_with(variant),
                "{status} {code}: {e:?}"
            );
        }
        assert!(c(403, "ErrorAccessDenied", Target::Mailbox)
            .to_string()
            .contains("RBAC for Applications"));
        assert!(c(401, "InvalidAuthenticationToken", Target::Mailbox).is_auth_failure());
    }

    #[test]
    fn retry_after_fractional_and_date() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", "0.5".parse().unwrap());
        let e = classify(
            StatusCode::TOO_MANY_REQUESTS,
            &h,
            b"",
            Target::Mailbox,
            "w",
            "u",
        );
        assert_eq!(e.retry_after(), Some(Duration::from_millis(500)));
        let at = chrono::Utc::now() + chrono::Duration::seconds(30);
        h.insert("retry-after", at.to_rfc2822().parse().unwrap());
        let e = classify(
            StatusCode::SERVICE_UNAVAILABLE,
            &h,
            b"",
            Target::Mailbox,
            "w",
            "u",
        );
        let wait = e.retry_after().unwrap();
        assert!(wait <= Duration::from_secs(30) && wait >= Duration::from_secs(28));
    }
}
