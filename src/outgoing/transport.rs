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

use std::sync::Arc;
use std::time::Duration;

use super::sent_copy::SentFolder;
use super::smtp::{SmtpClient, SmtpError, SmtpTarget};
use crate::config::{SentCopyMode, SmtpSettings, UnknownDelivery};
use crate::connector::imap::Credentials;
use crate::connector::oauth::TokenProvider;
use crate::error::{Classify, Disposition};
use crate::model::OutgoingEmail;
use crate::net::Endpoint;

/// How a sender's email leaves, built from the profile.
#[derive(Debug, Clone)]
pub enum TransportSettings {
    /// SMTP submission (`imap_smtp`, `pop3_smtp` profiles).
    Smtp(SmtpTransportSettings),
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

impl TransportSettings {
    /// What to do with an email a crash left in `sending` with no proof.
    pub fn unknown_delivery(&self) -> UnknownDelivery {
        match self {
            TransportSettings::Smtp(s) => s.smtp.unknown_delivery,
        }
    }

    /// How long transient failures are retried (`send_retry_for`).
    pub fn retry_for(&self) -> Duration {
        match self {
            TransportSettings::Smtp(s) => s.smtp.retry_for,
        }
    }

    /// How long after a `202 Accepted` the sent item is looked for before
    /// the email fails (zero for SMTP, which never answers that way).
    pub fn confirm_for(&self) -> Duration {
        match self {
            TransportSettings::Smtp(_) => Duration::ZERO,
        }
    }

    /// Longest wait between two looks for an accepted email.
    pub fn confirm_every_max(&self) -> Duration {
        match self {
            TransportSettings::Smtp(_) => Duration::from_secs(60),
        }
    }

    /// Emails sent at once.
    pub fn parallel(&self) -> usize {
        match self {
            TransportSettings::Smtp(s) => s.smtp.pool_size.max(1) as usize,
        }
    }
}

/// Why an email (or the test message) did not go out.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Smtp(#[from] SmtpError),
    /// The test message could not be composed.
    #[error("composing the test message: {0}")]
    Compose(String),
}

impl Classify for SendError {
    fn disposition(&self) -> Disposition {
        match self {
            SendError::Smtp(e) => e.disposition(),
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
        None
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
pub(crate) enum Transport {
    Smtp {
        client: SmtpClient,
        /// The Sent folder (when the profile has one).
        sent: Option<Arc<SentFolder>>,
        settings: SmtpTransportSettings,
    },
}

impl Transport {
    /// Prepares the transport; nothing connects yet.
    pub(crate) fn new(settings: &TransportSettings) -> Result<Self, String> {
        match settings {
            TransportSettings::Smtp(s) => {
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
        }
    }

    /// Where Sent copies are looked for (the folder's name); `None` when
    /// there is nowhere to look.
    pub(crate) fn sent_place(&self) -> Option<String> {
        match self {
            Transport::Smtp { sent, .. } => sent.as_ref().map(|f| f.folder().to_string()),
        }
    }

    /// True when acceptance is not delivery (Graph's `202`): the email
    /// stays `sending` until its Sent copy is found.
    pub(crate) fn confirms_later(&self) -> bool {
        match self {
            Transport::Smtp { .. } => false,
        }
    }

    /// What an attempt is, for "the daemon stopped during …".
    pub(crate) fn attempt_words(&self) -> &'static str {
        match self {
            Transport::Smtp { .. } => "the SMTP transaction",
        }
    }

    /// True when the daemon itself owes a Sent copy after sending (SMTP
    /// with a Sent folder; Exchange files Graph's itself).
    pub(crate) fn owes_copy(&self) -> bool {
        match self {
            Transport::Smtp { sent, .. } => sent.is_some(),
        }
    }

    /// The Sent folder of the copy worker, if the daemon files copies.
    pub(crate) fn sent_folder(&self) -> Option<(&Arc<SentFolder>, SentCopyMode)> {
        match self {
            Transport::Smtp { sent, settings, .. } => {
                sent.as_ref().map(|f| (f, settings.smtp.sent_copy))
            }
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
        }
    }

    /// Words for the wire in the test message's text and the test detail.
    pub(crate) fn describe(&self) -> String {
        match self {
            Transport::Smtp { settings, .. } => {
                format!("{}:{}", settings.endpoint.host, settings.endpoint.port)
            }
        }
    }

    /// Closes kept connections.
    pub(crate) async fn close(&self) {
        match self {
            Transport::Smtp { sent, .. } => {
                if let Some(s) = sent {
                    s.close().await;
                }
            }
        }
    }
}
