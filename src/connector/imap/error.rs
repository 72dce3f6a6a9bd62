//! IMAP failures and their [`Disposition`].
//!
//! Server texts are kept (shortened) so an operator sees what the server said; the
//! commands we send are never included, because LOGIN/AUTHENTICATE carry secrets.

use std::fmt;
use std::io;

use crate::error::{Classify, Disposition};
use crate::net::NetError;

use super::codec::truncate;

/// Longest server text kept in an error: a parse failure must not drag a message body along.
const MAX_TEXT: usize = 300;

/// Response codes (RFC 5530 and friends) after which retrying later can help.
const TRANSIENT_CODES: &[&str] = &[
    "UNAVAILABLE",
    "INUSE",
    "CONTACTADMIN",
    "SERVERBUG",
    "LIMIT",
    "OVERQUOTA",
];

/// Response codes that will not go away by retrying.
const PERMANENT_CODES: &[&str] = &[
    "AUTHENTICATIONFAILED",
    "AUTHORIZATIONFAILED",
    "EXPIRED",
    "PRIVACYREQUIRED",
    "NOPERM",
    "NONEXISTENT",
    "TRYCREATE",
];

/// A failure of the IMAP layer.
#[derive(Debug, thiserror::Error)]
pub enum ImapError {
    /// Transport failure (connect, TLS); classified by [`NetError`].
    #[error(transparent)]
    Net(#[from] NetError),
    /// Read/write failure or time-out on an established connection.
    #[error("IMAP I/O error during {context}: {source}")]
    Io {
        /// Command or phase that was running.
        context: &'static str,
        /// The underlying error (`TimedOut` for the socket time-outs).
        #[source]
        source: io::Error,
    },
    /// STARTTLS was required but the server does not offer it (or refused it).
    #[error(
        "server {server} does not offer STARTTLS ({detail}); refusing to continue without TLS"
    )]
    NoStartTls {
        /// Host name.
        server: String,
        /// What happened.
        detail: String,
    },
    /// The server rejected the credentials (or the mechanism).
    #[error(
        "authentication ({mechanism}) rejected by server: {}",
        CodeText(code, text)
    )]
    AuthFailed {
        /// SASL mechanism or `LOGIN`.
        mechanism: &'static str,
        /// Response code such as `AUTHENTICATIONFAILED`, if any.
        code: Option<String>,
        /// Server text, plus the decoded SASL error challenge when there was one.
        text: String,
    },
    /// A folder (selected, or the target of a copy/move) does not exist.
    #[error("folder {folder:?} does not exist: {}", CodeText(code, text))]
    FolderMissing {
        /// The folder name as given by the caller.
        folder: String,
        /// `NONEXISTENT` or `TRYCREATE`, if the server sent one.
        code: Option<String>,
        /// Server text.
        text: String,
    },
    /// Tagged `NO`.
    #[error("{command} failed: NO {}", CodeText(code, text))]
    No {
        /// Command verb (never its arguments).
        command: &'static str,
        /// Response code, if any.
        code: Option<String>,
        /// Server text.
        text: String,
    },
    /// Tagged `BAD`: the server did not understand the command.
    #[error("{command} rejected: BAD {}", CodeText(code, text))]
    Bad {
        /// Command verb (never its arguments).
        command: &'static str,
        /// Response code, if any.
        code: Option<String>,
        /// Server text.
        text: String,
    },
    /// The server said `BYE` and closed the connection.
    #[error("server closed the connection: BYE {text}")]
    Bye {
        /// Server text.
        text: String,
    },
    /// The connection ended unexpectedly, or is unusable after an earlier failure.
    #[error("IMAP connection lost{}", if .0.is_empty() { String::new() } else { format!(": {}", .0) })]
    ConnectionLost(String),
    /// The server sent something we could not parse or did not expect.
    #[error("IMAP protocol error: {0}")]
    Protocol(String),
    /// The server lacks something required (mechanism, keyword support…).
    #[error("not supported by the server: {0}")]
    Unsupported(String),
    /// A caller-supplied value cannot be sent (CR/LF in a name, invalid keyword…).
    #[error("invalid argument: {0}")]
    InvalidInput(String),
}

/// Displays `[CODE] text`.
struct CodeText<'a>(&'a Option<String>, &'a String);

impl fmt::Display for CodeText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(code) => write!(f, "[{code}] {}", self.1),
            None => f.write_str(self.1),
        }
    }
}

impl ImapError {
    /// The IMAP response code (`AUTHENTICATIONFAILED`, `TRYCREATE`…) if the server sent one.
    pub fn response_code(&self) -> Option<&str> {
        match self {
            ImapError::AuthFailed { code, .. }
            | ImapError::FolderMissing { code, .. }
            | ImapError::No { code, .. }
            | ImapError::Bad { code, .. } => code.as_deref(),
            _ => None,
        }
    }

    /// True for time-outs of the socket (read, write, connect).
    pub fn is_timeout(&self) -> bool {
        match self {
            ImapError::Io { source, .. } => source.kind() == io::ErrorKind::TimedOut,
            ImapError::Net(NetError::ConnectTimeout { .. }) => true,
            _ => false,
        }
    }

    /// Turns an I/O error into `Io`, or into `Protocol` when it is async-imap's parse
    /// failure (which it reports as `io::ErrorKind::Other` with the buffer in the text).
    pub(crate) fn io(context: &'static str, e: io::Error) -> Self {
        let msg = e.to_string();
        if e.kind() == io::ErrorKind::Other && msg.contains("during parsing of") {
            ImapError::Protocol(truncate(&msg, MAX_TEXT))
        } else {
            ImapError::Io { context, source: e }
        }
    }

    /// Converts an async-imap error of command `command`.
    pub(crate) fn from_async(command: &'static str, e: async_imap::error::Error) -> Self {
        use async_imap::error::Error as E;
        match e {
            E::Io(e) => ImapError::io(command, e),
            E::No(s) => {
                let (code, text) = parse_async_status(&s);
                ImapError::No {
                    command,
                    code,
                    text,
                }
            }
            E::Bad(s) => {
                let (code, text) = parse_async_status(&s);
                ImapError::Bad {
                    command,
                    code,
                    text,
                }
            }
            E::ConnectionLost => ImapError::ConnectionLost(String::new()),
            E::Validate(v) => ImapError::InvalidInput(format!("{command}: {v}")),
            other => ImapError::Protocol(truncate(&other.to_string(), MAX_TEXT)),
        }
    }

    /// Re-labels a `NO`/`BAD` of an authentication command as [`ImapError::AuthFailed`].
    pub(crate) fn into_auth(self, mechanism: &'static str, sasl_error: Option<String>) -> Self {
        match self {
            ImapError::No { code, mut text, .. } | ImapError::Bad { code, mut text, .. } => {
                if let Some(extra) = sasl_error {
                    text = format!("{text} (server challenge: {extra})");
                }
                ImapError::AuthFailed {
                    mechanism,
                    code,
                    text,
                }
            }
            other => other,
        }
    }

    /// Re-labels `NO [NONEXISTENT]`/`NO [TRYCREATE]` as [`ImapError::FolderMissing`].
    pub(crate) fn folder_context(self, folder: &str) -> Self {
        match self {
            ImapError::No {
                code: Some(code),
                text,
                ..
            } if code == "NONEXISTENT" || code == "TRYCREATE" => ImapError::FolderMissing {
                folder: folder.to_string(),
                code: Some(code),
                text,
            },
            other => other,
        }
    }
}

fn code_disposition(code: Option<&str>, default: Disposition) -> Disposition {
    match code {
        Some(c) if PERMANENT_CODES.contains(&c) => Disposition::Permanent,
        Some(c) if TRANSIENT_CODES.contains(&c) => Disposition::Transient,
        _ => default,
    }
}

impl Classify for ImapError {
    fn disposition(&self) -> Disposition {
        match self {
            ImapError::Net(e) => e.disposition(),
            ImapError::Io { .. }
            | ImapError::Bye { .. }
            | ImapError::ConnectionLost(_)
            | ImapError::Protocol(_) => Disposition::Transient,
            ImapError::NoStartTls { .. }
            | ImapError::FolderMissing { .. }
            | ImapError::Unsupported(_)
            | ImapError::InvalidInput(_) => Disposition::Permanent,
            // An auth NO without a code is the classic "wrong password".
            ImapError::AuthFailed { code, .. } => {
                code_disposition(code.as_deref(), Disposition::Permanent)
            }
            // Plain NO is mostly "try again later" (locks, server trouble).
            ImapError::No { code, .. } => code_disposition(code.as_deref(), Disposition::Transient),
            // BAD means we and the server disagree on syntax; retrying with back-off is
            // cheaper than disabling a mailbox over a server quirk.
            ImapError::Bad { code, .. } => {
                code_disposition(code.as_deref(), Disposition::Transient)
            }
        }
    }
}

/// Splits a response text into its response code and the rest. imap-proto parses only
/// a few codes; unknown ones (`[AUTHENTICATIONFAILED]`) stay at the start of the text.
pub(crate) fn split_code(known: Option<String>, info: &str) -> (Option<String>, String) {
    let info = info.trim();
    if known.is_some() {
        return (known, truncate(info, MAX_TEXT));
    }
    if let Some(rest) = info.strip_prefix('[') {
        if let Some(end) = rest.find(']') {
            let inner = &rest[..end];
            let name = inner
                .split_whitespace()
                .next()
                .unwrap_or("")
                .to_ascii_uppercase();
            if !name.is_empty() {
                return (Some(name), truncate(rest[end + 1..].trim(), MAX_TEXT));
            }
        }
    }
    (None, truncate(info, MAX_TEXT))
}

/// Name of a response code parsed by imap-proto.
pub(crate) fn code_name(code: &async_imap::imap_proto::ResponseCode<'_>) -> String {
    use async_imap::imap_proto::ResponseCode as R;
    match code {
        R::Alert => "ALERT",
        R::BadCharset(_) => "BADCHARSET",
        R::Capabilities(_) => "CAPABILITY",
        R::HighestModSeq(_) => "HIGHESTMODSEQ",
        R::Parse => "PARSE",
        R::PermanentFlags(_) => "PERMANENTFLAGS",
        R::ReadOnly => "READ-ONLY",
        R::ReadWrite => "READ-WRITE",
        R::TryCreate => "TRYCREATE",
        R::UidNext(_) => "UIDNEXT",
        R::UidValidity(_) => "UIDVALIDITY",
        R::Unseen(_) => "UNSEEN",
        R::AppendUid(..) => "APPENDUID",
        R::CopyUid(..) => "COPYUID",
        R::UidNotSticky => "UIDNOTSTICKY",
        R::MetadataLongEntries(_) => "METADATA LONGENTRIES",
        R::MetadataMaxSize(_) => "METADATA MAXSIZE",
        R::MetadataTooMany => "METADATA TOOMANY",
        R::MetadataNoPrivate => "METADATA NOPRIVATE",
        _ => "UNKNOWN",
    }
    .to_string()
}

/// Parses async-imap's `"code: {code:?}, info: {information:?}"` error text back into
/// code and server text (it only hands us that string).
pub(crate) fn parse_async_status(s: &str) -> (Option<String>, String) {
    let (code_part, info_part) = match s.split_once(", info: ") {
        Some((c, i)) => (c.trim_start_matches("code: "), i),
        None => return split_code(None, s),
    };
    let known = code_part.strip_prefix("Some(").map(|rest| {
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .collect();
        match name.as_str() {
            "TryCreate" => "TRYCREATE".to_string(),
            "ReadOnly" => "READ-ONLY".to_string(),
            "ReadWrite" => "READ-WRITE".to_string(),
            "Capabilities" => "CAPABILITY".to_string(),
            other => other.to_ascii_uppercase(),
        }
    });
    let info = match info_part
        .strip_prefix("Some(\"")
        .and_then(|r| r.strip_suffix("\")"))
    {
        Some(inner) => inner.replace("\\\"", "\"").replace("\\\\", "\\"),
        None if info_part == "None" => String::new(),
        None => info_part.to_string(),
    };
    split_code(known, &info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn async_status_parsing() {
        let (c, t) = parse_async_status(
            "code: None, info: Some(\"[AUTHENTICATIONFAILED] Authentication failed.\")",
        );
        assert_eq!(c.as_deref(), Some("AUTHENTICATIONFAILED"));
        assert_eq!(t, "Authentication failed.");
        let (c, t) =
            parse_async_status("code: Some(TryCreate), info: Some(\"Mailbox doesn't exist: X\")");
        assert_eq!(c.as_deref(), Some("TRYCREATE"));
        assert_eq!(t, "Mailbox doesn't exist: X");
        let (c, t) = parse_async_status("code: None, info: None");
        assert_eq!((c, t.as_str()), (None, ""));
    }

    #[test]
    fn classification() {
        let no = |code: Option<&str>| ImapError::No {
            command: "SELECT",
            code: code.map(String::from),
            text: "x".into(),
        };
        assert_eq!(
            no(Some("UNAVAILABLE")).disposition(),
            Disposition::Transient
        );
        assert_eq!(
            no(Some("NONEXISTENT")).disposition(),
            Disposition::Permanent
        );
        assert_eq!(no(None).disposition(), Disposition::Transient);
        let auth = |code: Option<&str>| no(code).into_auth("LOGIN", None);
        assert_eq!(auth(None).disposition(), Disposition::Permanent);
        assert_eq!(
            auth(Some("AUTHENTICATIONFAILED")).disposition(),
            Disposition::Permanent
        );
        assert_eq!(auth(Some("EXPIRED")).disposition(), Disposition::Permanent);
        assert_eq!(
            auth(Some("CONTACTADMIN")).disposition(),
            Disposition::Transient
        );
        assert_eq!(auth(Some("INUSE")).disposition(), Disposition::Transient);
        let missing = no(Some("TRYCREATE")).folder_context("Foo");
        assert!(matches!(&missing, ImapError::FolderMissing { folder, .. } if folder == "Foo"));
        assert!(missing.to_string().contains("\"Foo\""));
        let t = ImapError::io("FETCH", io::Error::new(io::ErrorKind::TimedOut, "t"));
        assert!(t.is_timeout());
        assert_eq!(t.disposition(), Disposition::Transient);
        assert_eq!(
            ImapError::Bye { text: "x".into() }.disposition(),
            Disposition::Transient
        );
        let ns = ImapError::NoStartTls {
            server: "h".into(),
            detail: "d".into(),
        };
        assert_eq!(ns.disposition(), Disposition::Permanent);
    }
}
