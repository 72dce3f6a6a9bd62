//! The transport seam: how a mailbox's email leaves.
//!
//! * [`TransportSettings::Smtp`]: SMTP submission; a `250` after DATA is
//!   delivery to the server, the Sent copy (if the profile has a Sent
//!   folder) is looked for or APPENDed over IMAP afterwards.
//! * [`TransportSettings::Graph`]: Microsoft Graph `sendMail` with the MIME
//!   base64-encoded (our Message-ID, token and threading headers survive).
//!   `202 Accepted` is not delivery: the email stays `sending` until the
//!   sent item shows up in Sent Items, which Exchange files itself (no
//!   APPEND, no copy worker).
//!
//! The sender ([`super::sender`]) runs the same durable steps over either;
//! this module hides which wire is used.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use super::sent_copy::SentFolder;
use super::smtp::{SmtpClient, SmtpError, SmtpTarget};
use crate::config::{SentCopyMode, SmtpSettings, UnknownDelivery};
use crate::connector::graph::{GraphError, GraphMailbox};
use crate::connector::imap::Credentials;
use crate::connector::oauth::TokenProvider;
use crate::error::{Classify, Disposition};
use crate::model::OutgoingEmail;
use crate::net::Endpoint;

/// How a sender's email leaves, built from the profile.
// One per sender, built once at start: boxing would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum TransportSettings {
    /// SMTP submission (`imap_smtp`, `pop3_smtp` profiles).
    Smtp(SmtpTransportSettings),
    /// Microsoft Graph `sendMail` (`exchange_online` profiles).
    Graph(GraphTransportSettings),
}

/// SMTP submission and the Sent folder over IMAP.
#[derive(Debug, Clone)]
pub struct SmtpTransportSettings {
    pub smtp: SmtpSettings,
    pub endpoint: Endpoint,
    pub allow_insecure: bool,
    /// IMAP server of the Sent folder (`None`: no Sent copy).
    pub imap_endpoint: Option<Endpoint>,
    pub credentials: Credentials,
    pub token_provider: Option<Arc<dyn TokenProvider>>,
}

/// Microsoft Graph `sendMail` through the mailbox's shared client (its
/// four-requests-in-flight limit covers the connector and the sender).
#[derive(Debug, Clone)]
pub struct GraphTransportSettings {
    /// The mailbox's Graph client, shared with its connector.
    pub mailbox: Arc<GraphMailbox>,
    /// An email a crash left in `sending` before Graph answered, and not
    /// in Sent Items: `fail` (delivery unknown) or `resend`.
    pub unknown_delivery: UnknownDelivery,
    /// Transient failures (429 after the client's own retries, 5xx,
    /// network) are retried with back-off for this long.
    pub retry_for: Duration,
    /// After `202 Accepted`, how long the sent item is looked for in Sent
    /// Items before the email fails.
    pub confirm_for: Duration,
    /// Longest wait between two looks (they start 1 s apart and double).
    pub confirm_every_max: Duration,
}

impl GraphTransportSettings {
    /// Defaults for `mailbox`: unknown delivery fails, transient failures
    /// retried for an hour (as SMTP's `send_retry_for`), the sent item
    /// looked for during 10 minutes, at most a minute apart.
    pub fn new(mailbox: Arc<GraphMailbox>) -> Self {
        GraphTransportSettings {
            mailbox,
            unknown_delivery: UnknownDelivery::Fail,
            retry_for: Duration::from_secs(3600),
            confirm_for: Duration::from_secs(600),
            confirm_every_max: Duration::from_secs(60),
        }
    }
}

impl TransportSettings {
    /// What to do with an email a crash left in `sending` with no proof.
    pub fn unknown_delivery(&self) -> UnknownDelivery {
        match self {
            TransportSettings::Smtp(s) => s.smtp.unknown_delivery,
            TransportSettings::Graph(g) => g.unknown_delivery,
        }
    }

    /// How long transient failures are retried (`send_retry_for`).
    pub fn retry_for(&self) -> Duration {
        match self {
            TransportSettings::Smtp(s) => s.smtp.retry_for,
            TransportSettings::Graph(g) => g.retry_for,
        }
    }

    /// How long after a `202 Accepted` the sent item is looked for before
    /// the email fails (zero for SMTP, which never answers that way).
    pub fn confirm_for(&self) -> Duration {
        match self {
            TransportSettings::Smtp(_) => Duration::ZERO,
            TransportSettings::Graph(g) => g.confirm_for,
        }
    }

    /// Longest wait between two looks for an accepted email.
    pub fn confirm_every_max(&self) -> Duration {
        match self {
            TransportSettings::Smtp(_) => Duration::from_secs(60),
            TransportSettings::Graph(g) => g.confirm_every_max,
        }
    }

    /// Emails sent at once.
    pub fn parallel(&self) -> usize {
        match self {
            TransportSettings::Smtp(s) => s.smtp.pool_size.max(1) as usize,
            // More would only wait for the mailbox's request permits.
            TransportSettings::Graph(g) => g.mailbox.max_in_flight(),
        }
    }
}

/// Why an email (or the test message) did not go out.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Smtp(#[from] SmtpError),
    /// A Graph read (token, Inbox, Sent Items) failed.
    #[error(transparent)]
    Graph(GraphError),
    /// `sendMail` failed; the text says what to do for sending.
    #[error("{}", graph_send_text(.0))]
    GraphSend(GraphError),
    /// The test message could not be composed.
    #[error("composing the test message: {0}")]
    Compose(String),
}

impl Classify for SendError {
    fn disposition(&self) -> Disposition {
        match self {
            SendError::Smtp(e) => e.disposition(),
            SendError::Graph(e) | SendError::GraphSend(e) => e.disposition(),
            SendError::Compose(_) => Disposition::Permanent,
        }
    }
}

impl SendError {
    /// The reason shown on a failed or deferred email: the server's own
    /// words where there are some.
    pub fn server_text(&self) -> String {
        match self {
            SendError::Smtp(e) => e.server_text(),
            other => other.to_string(),
        }
    }

    /// A wait the server asked for (Graph's `Retry-After`).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            SendError::Graph(e) | SendError::GraphSend(e) => e.retry_after(),
            _ => None,
        }
    }
}

/// What a failed `sendMail` means for the operator: Graph's code and words,
/// and for the refusals a person can fix, what to do.
fn graph_send_text(e: &GraphError) -> String {
    match e {
        GraphError::AccessDenied {
            user,
            status,
            code,
            message,
            ..
        } => format!(
            "Microsoft Graph refused sendMail for mailbox {user} ({status} {code}: {message}): grant the app Mail.Send (application permission) with admin consent and include this mailbox in its RBAC for Applications scope"
        ),
        GraphError::Refused {
            status,
            code,
            message,
            ..
        } => {
            let is = |c: &str| code.eq_ignore_ascii_case(c);
            let hint = if is("ErrorMimeContentInvalidBase64String")
                || is("ErrorMimeContentConversionFailed")
            {
                "; Exchange could not read the MIME body (report this as a bug)"
            } else if is("ErrorInvalidRecipients") {
                "; check the recipients' addresses"
            } else if *status == 413 || is("ErrorMessageSizeExceeded") {
                "; the message is larger than sendMail accepts (about 4 MB, base64 included): send smaller attachments"
            } else if is("ErrorSendAsDenied") {
                "; the From address must be the mailbox's own (or one it may send as)"
            } else {
                ""
            };
            format!("Microsoft Graph refused the message ({status} {code}: {message}){hint}")
        }
        other => other.to_string(),
    }
}

/// What the transport said to a submitted email.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Submitted {
    /// The server took responsibility for it (SMTP `250`): sent.
    Delivered(String),
    /// Taken for later processing (Graph `202`): sent only once its Sent
    /// copy is found.
    Accepted,
}

/// A Sent copy found by the transport.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Found {
    /// The Message-ID it is stored under (no angle brackets), if known.
    pub message_id: Option<String>,
    /// The provider's id of the copy (Graph's immutable id), if it has one
    /// worth keeping.
    pub item_id: Option<String>,
}

/// The live transport of one sender.
// One per sender, built once at start: boxing would buy nothing.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Transport {
    Smtp {
        client: SmtpClient,
        /// The Sent folder (when the profile has one).
        sent: Option<Arc<SentFolder>>,
        settings: SmtpTransportSettings,
    },
    Graph(Arc<GraphMailbox>),
}

impl Transport {
    /// Prepares the transport; nothing connects yet.
    pub(crate) fn new(settings: &TransportSettings) -> Result<Self, String> {
        let s = match settings {
            TransportSettings::Smtp(s) => s,
            TransportSettings::Graph(g) => return Ok(Transport::Graph(g.mailbox.clone())),
        };
        let client = SmtpClient::new(SmtpTarget {
            endpoint: s.endpoint.clone(),
            allow_insecure: s.allow_insecure,
            credentials: s.credentials.clone(),
            token_provider: s.token_provider.clone(),
            pool_size: s.smtp.pool_size,
            hello_name: None,
        })
        .map_err(|e| e.to_string())?;
        let sent = match (&s.imap_endpoint, &s.smtp.sent_folder) {
            (Some(ep), Some(folder)) => Some(Arc::new(SentFolder::new(
                ep.clone(),
                s.credentials.clone(),
                s.token_provider.clone(),
                folder.clone(),
            ))),
            _ => None,
        };
        Ok(Transport::Smtp {
            client,
            sent,
            settings: s.clone(),
        })
    }

    /// Where Sent copies are looked for (the folder's name); `None` when
    /// there is nowhere to look.
    pub(crate) fn sent_place(&self) -> Option<String> {
        match self {
            Transport::Smtp { sent, .. } => sent.as_ref().map(|f| f.folder().to_string()),
            Transport::Graph(_) => Some("Sent Items".into()),
        }
    }

    /// True when acceptance is not delivery (Graph's `202`): the email
    /// stays `sending` until its Sent copy is found.
    pub(crate) fn confirms_later(&self) -> bool {
        matches!(self, Transport::Graph(_))
    }

    /// What an attempt is, for "the daemon stopped during …".
    pub(crate) fn attempt_words(&self) -> &'static str {
        match self {
            Transport::Smtp { .. } => "the SMTP transaction",
            Transport::Graph(_) => "the Microsoft Graph sendMail request",
        }
    }

    /// True when the daemon itself owes a Sent copy after sending (SMTP
    /// with a Sent folder; Exchange files Graph's itself).
    pub(crate) fn owes_copy(&self) -> bool {
        self.sent_folder().is_some()
    }

    /// The Sent folder of the copy worker, if the daemon files copies.
    pub(crate) fn sent_folder(&self) -> Option<(&Arc<SentFolder>, SentCopyMode)> {
        match self {
            Transport::Smtp { sent, settings, .. } => {
                sent.as_ref().map(|f| (f, settings.smtp.sent_copy))
            }
            Transport::Graph(_) => None,
        }
    }

    /// Submits `row`'s bytes (the same ones every attempt).
    pub(crate) async fn submit(&self, row: &OutgoingEmail) -> Result<Submitted, SendError> {
        match self {
            Transport::Smtp { client, .. } => {
                let reply = client
                    .send(&row.envelope_from, &row.recipients, row.mime.as_bytes())
                    .await?;
                Ok(Submitted::Delivered(format!(
                    "{} {}",
                    reply.code, reply.text
                )))
            }
            Transport::Graph(g) => {
                let mime = with_bcc(&row.mime, &row.recipients);
                g.send_mime(mime.as_bytes())
                    .await
                    .map_err(SendError::GraphSend)?;
                Ok(Submitted::Accepted)
            }
        }
    }

    /// The Sent copy of `row`, if there is one (and somewhere to look).
    pub(crate) async fn find(&self, row: &OutgoingEmail) -> Result<Option<Found>, String> {
        match self {
            Transport::Smtp { sent, .. } => {
                let Some(folder) = sent else { return Ok(None) };
                let marker = super::compose::marker_of(&row.message_id);
                folder
                    .find(marker, &row.message_id)
                    .await
                    .map(|f| {
                        f.map(|f| Found {
                            message_id: f.message_id,
                            item_id: None,
                        })
                    })
                    .map_err(|e| e.to_string())
            }
            Transport::Graph(g) => {
                // Graph stores internetMessageId with its angle brackets.
                let wanted = format!("<{}>", row.message_id);
                let item = g.find_sent(&wanted).await.map_err(|e| e.to_string())?;
                Ok(item.map(|item| Found {
                    message_id: Some(bare_id(&item.internet_message_id).to_string())
                        .filter(|m| !m.is_empty()),
                    item_id: Some(item.id),
                }))
            }
        }
    }

    /// Test & Enable without a message: connect and authenticate. Returns
    /// what was shown ("connected to … and authenticated").
    pub(crate) async fn test_connection(&self) -> Result<String, SendError> {
        match self {
            Transport::Smtp { client, .. } => {
                client.test_connection().await?;
                Ok(format!(
                    "connected to {} and authenticated",
                    self.describe()
                ))
            }
            Transport::Graph(g) => {
                let inbox = g.probe_inbox().await.map_err(SendError::Graph)?;
                Ok(format!(
                    "got a Graph access token and reached mailbox {} ({inbox})",
                    g.user()
                ))
            }
        }
    }

    /// Sends the Test & Enable message (composed by the sender); returns
    /// how it went ("through host:port (250 …)").
    pub(crate) async fn send_test(
        &self,
        envelope_from: &str,
        recipients: &[String],
        mime: &[u8],
    ) -> Result<String, SendError> {
        match self {
            Transport::Smtp { client, .. } => {
                let reply = client.send(envelope_from, recipients, mime).await?;
                Ok(format!(
                    "through {} ({} {})",
                    self.describe(),
                    reply.code,
                    reply.text
                ))
            }
            Transport::Graph(g) => {
                g.send_mime(mime).await.map_err(SendError::GraphSend)?;
                Ok(format!("through {} (202 Accepted)", self.describe()))
            }
        }
    }

    /// Words for the wire in the test message's text and the test detail.
    pub(crate) fn describe(&self) -> String {
        match self {
            Transport::Smtp { settings, .. } => {
                format!("{}:{}", settings.endpoint.host, settings.endpoint.port)
            }
            Transport::Graph(g) => format!("Microsoft Graph (sendMail as {})", g.user()),
        }
    }

    /// Closes kept connections.
    pub(crate) async fn close(&self) {
        if let Transport::Smtp { sent: Some(s), .. } = self {
            s.close().await;
        }
    }
}

/// A Message-ID without its angle brackets.
fn bare_id(id: &str) -> &str {
    id.trim().trim_start_matches('<').trim_end_matches('>')
}

/// The MIME Graph gets: ours plus a `Bcc:` header for the envelope
/// recipients in neither To nor Cc. SMTP carries Bcc in the envelope only;
/// `sendMail` takes its recipients from the headers (and Exchange keeps Bcc
/// out of what the recipients get). The same bytes every attempt: the
/// result depends on the row alone.
pub(crate) fn with_bcc<'a>(mime: &'a str, recipients: &[String]) -> Cow<'a, str> {
    let Some(parsed) = mail_parser::MessageParser::default().parse_headers(mime.as_bytes()) else {
        return Cow::Borrowed(mime);
    };
    let listed: Vec<String> = [parsed.to(), parsed.cc()]
        .into_iter()
        .flatten()
        .flat_map(|a| a.iter())
        .filter_map(|a| a.address())
        .map(str::to_ascii_lowercase)
        .collect();
    let bcc: Vec<&str> = recipients
        .iter()
        .map(String::as_str)
        .filter(|r| !listed.contains(&r.to_ascii_lowercase()))
        .collect();
    if bcc.is_empty() {
        return Cow::Borrowed(mime);
    }
    // The header fields end at the first empty line.
    let end = mime.find("\r\n\r\n").map_or(mime.len(), |i| i + 2);
    let mut out = String::with_capacity(mime.len() + 16 + bcc.len() * 32);
    out.push_str(&mime[..end]);
    out.push_str("Bcc: ");
    out.push_str(&bcc.join(",\r\n "));
    out.push_str("\r\n");
    out.push_str(&mime[end..]);
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bcc_recipients_become_a_bcc_header_for_graph_only_when_missing() {
        let mime = "From: a@x.test\r\nTo: Carol <carol@c.example>\r\nCc: d@c.example\r\nSubject: s\r\n\r\nbody\r\n";
        let same = with_bcc(mime, &["carol@c.example".into(), "D@c.example".into()]);
        assert_eq!(same, mime);
        let out = with_bcc(
            mime,
            &[
                "carol@c.example".into(),
                "audit@x.test".into(),
                "boss@x.test".into(),
            ],
        );
        assert!(
            out.ends_with("Subject: s\r\nBcc: audit@x.test,\r\n boss@x.test\r\n\r\nbody\r\n"),
            "{out}"
        );
    }

    #[test]
    fn send_refusals_say_what_to_do() {
        let denied = GraphError::AccessDenied {
            what: "sending".into(),
            user: "support@x.test".into(),
            status: 403,
            code: "ErrorAccessDenied".into(),
            message: "Access is denied.".into(),
        };
        let t = SendError::GraphSend(denied).to_string();
        assert!(
            t.contains("Mail.Send") && t.contains("ErrorAccessDenied"),
            "{t}"
        );
        let bad = GraphError::Refused {
            what: "sending".into(),
            status: 400,
            code: "ErrorMimeContentInvalidBase64String".into(),
            message: "Invalid base64 string for MIME content.".into(),
        };
        let e = SendError::GraphSend(bad);
        assert_eq!(e.disposition(), Disposition::Permanent);
        let t = e.server_text();
        assert!(t.contains("ErrorMimeContentInvalidBase64String"), "{t}");
    }
}
