//! Connectors: where mail comes from. One module per protocol, one trait over them.
//!
//! A connector only moves bytes and positions; parsing, correlation and
//! persistence are the pipeline's. The cycle is:
//! [`Connector::fetch`] a bounded batch (skipping sources the store has seen) →
//! the pipeline commits activities and the batch's positions together →
//! [`Connector::acknowledge`] (delete, flag, move) only after that commit is
//! durable; the follow-ups owed are recorded in that same commit and replayed
//! until done, so they happen at least once.

pub mod forward;
pub mod graph;
pub mod imap;
pub mod maildir;
pub mod oauth;
pub mod pop3;
pub mod pop3_sync;

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::deployment::{Marker, MarkerSlot};
use crate::error::{Classify, Disposition};
use crate::model::{AlertLevel, FolderPosition, SourceKey, UnixTime};
use crate::net::NetError;
use crate::store::StoreError;

/// Login credentials, shared by the protocols. `Debug` never shows the
/// password or token.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    /// User name and password (IMAP `AUTHENTICATE PLAIN`/`LOGIN`, POP3 SASL
    /// PLAIN or USER/PASS).
    Password {
        /// Login name.
        user: String,
        /// Password.
        pass: String,
    },
    /// User name and OAuth 2.0 access token (`XOAUTH2`, else `OAUTHBEARER`).
    OAuth2 {
        /// Login name (the mailbox address).
        user: String,
        /// Bearer access token.
        token: String,
    },
}

impl std::fmt::Debug for Credentials {
    // Hand-written so a `{:?}` of a config never prints a secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Password { user, .. } => f
                .debug_struct("Password")
                .field("user", user)
                .field("pass", &"<redacted>")
                .finish(),
            Credentials::OAuth2 { user, .. } => f
                .debug_struct("OAuth2")
                .field("user", user)
                .field("token", &"<redacted>")
                .finish(),
        }
    }
}

/// One fetched message.
#[derive(Debug, Clone)]
pub struct RawMessage {
    pub source: SourceKey,
    pub raw: Vec<u8>,
    /// Server receive time (IMAP INTERNALDATE, file mtime) if known.
    pub received_at: Option<UnixTime>,
    /// Size of a message that was not downloaded because it exceeds
    /// `max_message_size` (`raw` is empty): the pipeline records it in the
    /// quarantine, so the position advances and the operator sees it once.
    pub too_large: Option<u64>,
    /// Why a message could not be downloaded (`raw` is empty): the server
    /// refused or failed it, after retries where the protocol allows them.
    /// The pipeline records it in the quarantine without bytes, the message
    /// stays on the server, and the rest of the batch goes on.
    pub unfetchable: Option<String>,
}

/// A bounded group of new messages and the positions to commit with them.
#[derive(Debug, Default)]
pub struct FetchBatch {
    pub messages: Vec<RawMessage>,
    /// (folder, position) reached once this batch is committed.
    pub positions: Vec<(String, FolderPosition)>,
    /// More messages are waiting: fetch again without sleeping.
    pub more: bool,
    /// Messages known to be waiting after this batch.
    pub backlog: u64,
    /// Things the operator should know (e.g. a UIDVALIDITY change).
    pub notices: Vec<Notice>,
}

/// Something a connector tells the operator, raised as a mailbox alert of
/// kind `connector:<what>` (the connector names the condition; what to do
/// about it is the pipeline's business).
#[derive(Debug, Clone, PartialEq)]
pub struct Notice {
    pub level: AlertLevel,
    /// The condition, e.g. `uidvalidity_changed:INBOX`: with the mailbox, the
    /// alert's key, so a repeat updates the same alert.
    pub what: String,
    pub text: String,
}

impl Notice {
    /// A notice of `level` about the condition `what`.
    pub fn new(level: AlertLevel, what: impl Into<String>, text: impl Into<String>) -> Self {
        Notice {
            level,
            what: what.into(),
            text: text.into(),
        }
    }
}

pub use crate::model::AckKind;

/// Follow-up for one message.
#[derive(Debug, Clone)]
pub struct Ack {
    pub source: SourceKey,
    pub kind: AckKind,
}

/// What became of the follow-ups of one [`Connector::acknowledge`] call:
/// every ack listed in neither field is done.
#[derive(Debug, Default)]
pub struct AckReport {
    /// Follow-ups that failed: (source, error, its disposition). They stay
    /// pending; the scheduler decides how often they are retried.
    pub failed: Vec<(SourceKey, String, Disposition)>,
    /// Follow-ups that can never apply any more (the folder's UIDVALIDITY
    /// changed, so the UID names another message or none; the folder is
    /// gone): dropped, with why.
    pub obsolete: Vec<(SourceKey, String)>,
}

impl AckReport {
    /// Marks every ack of `sources` as failed with `error`.
    pub fn fail_all<'a>(
        &mut self,
        sources: impl IntoIterator<Item = &'a SourceKey>,
        error: &ConnectorError,
    ) {
        let text = error.to_string();
        let disposition = error.disposition();
        self.failed.extend(
            sources
                .into_iter()
                .map(|s| (s.clone(), text.clone(), disposition)),
        );
    }
}

/// Connector failure; the disposition decides retry or disable.
#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Imap(#[from] imap::ImapError),
    #[error(transparent)]
    Pop3(#[from] pop3::Pop3Error),
    /// Microsoft Graph (Exchange Online), including its Entra token.
    #[error("{}", graph_text(.0))]
    Graph(#[from] graph::GraphError),
    /// No OAuth token could be had (token file missing or unreadable).
    #[error(transparent)]
    Token(#[from] oauth::TokenError),
    /// The server refused an OAuth access token.
    #[error("{}", token_rejected_text(error, provider, *expired_at, *rotates))]
    TokenRejected {
        /// The authentication failure as the protocol reported it.
        error: Box<ConnectorError>,
        /// Where the token came from ([`oauth::TokenProvider::describe`]).
        provider: String,
        /// The token's expiry if it is known and has passed.
        expired_at: Option<UnixTime>,
        /// A rotated token is picked up on the next attempt (token file).
        rotates: bool,
    },
    #[error("maildir {path}: {detail}")]
    Maildir {
        path: String,
        detail: String,
        disposition: Disposition,
    },
    /// The mailbox's deployment marker names another deployment.
    #[error(transparent)]
    OtherDeployment(Box<crate::deployment::OtherDeployment>),
    /// A deployment marker written did not read back (a server that
    /// accepted the write and lost it).
    #[error("{0}")]
    MarkerLost(String),
}

impl Classify for ConnectorError {
    fn disposition(&self) -> Disposition {
        match self {
            ConnectorError::Net(e) => e.disposition(),
            ConnectorError::Store(e) => e.disposition(),
            ConnectorError::Imap(e) => e.disposition(),
            ConnectorError::Pop3(e) => e.disposition(),
            ConnectorError::Graph(e) => e.disposition(),
            ConnectorError::Maildir { disposition, .. } => *disposition,
            // Retrying cannot help: an operator decides which deployment
            // syncs the mailbox.
            ConnectorError::OtherDeployment(_) => Disposition::Permanent,
            ConnectorError::MarkerLost(_) => Disposition::Transient,
            // A token source that can change (a file someone rotates) gets
            // retried with back-off, so the mailbox recovers by itself once a
            // fresh token is written; the stall alert says so if nobody
            // does. A static token cannot change without a
            // restart: retrying it is pointless.
            ConnectorError::Token(_) => Disposition::Transient,
            ConnectorError::TokenRejected { rotates, error, .. } => {
                if *rotates {
                    Disposition::Transient
                } else {
                    error.disposition()
                }
            }
        }
    }
}

impl ConnectorError {
    /// The marker of the deployment that holds the mailbox, when that is
    /// what this error is.
    pub fn other_deployment(&self) -> Option<&crate::deployment::Marker> {
        match self {
            ConnectorError::OtherDeployment(o) => Some(&o.marker),
            _ => None,
        }
    }

    /// True when the server rejected the login (password or token), as opposed to
    /// a network or server problem.
    pub fn is_auth_failure(&self) -> bool {
        matches!(
            self,
            ConnectorError::Imap(imap::ImapError::AuthFailed { .. })
                | ConnectorError::Pop3(pop3::Pop3Error::Auth { .. })
                | ConnectorError::TokenRejected { .. }
        ) || matches!(self, ConnectorError::Graph(e) if e.is_auth_failure())
    }

    /// The server's own `Retry-After` (Graph), if it sent one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ConnectorError::Graph(e) => e.retry_after(),
            _ => None,
        }
    }

    /// The expiry of the OAuth token the server rejected, if it had passed.
    pub fn expired_token(&self) -> Option<UnixTime> {
        match self {
            ConnectorError::TokenRejected { expired_at, .. } => *expired_at,
            _ => None,
        }
    }
}

/// A Graph error; a client Entra rejected says so first, with the AADSTS
/// code and what to do already in the error's own text.
fn graph_text(e: &graph::GraphError) -> String {
    if matches!(e, graph::GraphError::Token(t) if t.is_rejected()) {
        format!("Microsoft Entra rejected the app's credentials: {e}")
    } else {
        e.to_string()
    }
}

fn token_rejected_text(
    error: &ConnectorError,
    provider: &str,
    expired_at: Option<UnixTime>,
    rotates: bool,
) -> String {
    let todo = if rotates {
        format!("write a fresh access token to {provider}; it is read again on the next retry, no restart needed")
    } else {
        format!("renew the token in {provider} and restart, or switch to token_file so renewals are picked up without a restart")
    };
    match expired_at {
        Some(t) => format!(
            "the OAuth access token expired at {} and the server rejected it: {todo} ({error})",
            crate::model::format_time(t)
        ),
        None => format!("the server rejected the OAuth access token: {todo} ({error})"),
    }
}

/// A mail source for one mailbox.
///
/// Methods return `Send` futures so each mailbox can run as its own task.
pub trait Connector: Send {
    /// Short protocol name for logs and metrics.
    fn protocol(&self) -> &'static str;

    /// Fetches the next batch of unseen messages (empty when there is nothing new).
    fn fetch(&mut self) -> impl Future<Output = Result<FetchBatch, ConnectorError>> + Send;

    /// Follows up on committed messages. Called only after the commit is
    /// durable, also for follow-ups recorded by an earlier process: it works
    /// from the source keys alone and is idempotent (a keyword set twice, a
    /// move or delete of a message already gone, succeed quietly). `Err`
    /// means none is known to be done (e.g. the connection failed); per-ack
    /// failures are in the report.
    fn acknowledge(
        &mut self,
        acks: Vec<Ack>,
    ) -> impl Future<Output = Result<AckReport, ConnectorError>> + Send;

    /// Whether an ack of this kind does anything here and must therefore be
    /// recorded in the store until done. A connector with its own durable
    /// record of what is owed (POP3 deletes every seen message it lists)
    /// says no.
    fn wants_follow_up(&self, kind: AckKind) -> bool {
        let _ = kind;
        true
    }

    /// Whether this source holds a server connection between calls (IMAP,
    /// POP3): only then is a connection permit worth keeping across the
    /// wait between polls. A local source (Maildir) says no.
    fn holds_connection(&self) -> bool {
        true
    }

    /// Waits until new mail may be there: push (IMAP IDLE) where possible, else
    /// `max`. Returns early when `cancel` fires. Without `keep_connection` the
    /// caller holds no connection permit for the wait: close any open
    /// connection and do not push, so idle mailboxes stay within the
    /// profile's connection limit.
    fn wait_for_changes(
        &mut self,
        max: Duration,
        keep_connection: bool,
        cancel: &CancellationToken,
    ) -> impl Future<Output = Result<(), ConnectorError>> + Send;

    /// Test & Enable for the incoming direction: connect, authenticate, look;
    /// returns a human-readable success line.
    fn test(&mut self) -> impl Future<Output = Result<String, ConnectorError>> + Send;

    /// Closes connections politely (logout/quit).
    fn close(&mut self) -> impl Future<Output = ()> + Send;

    /// Expiry of the credential a person must renew, if known: the OAuth
    /// token used at the last login (IMAP, POP3), the Entra app's client
    /// secret (Graph; its hourly access tokens renew by themselves).
    fn token_expires_at(&self) -> Option<UnixTime> {
        None
    }

    /// When the credential of [`Connector::token_expires_at`] was written
    /// (a token file's modification time), if known: with the expiry it
    /// tells a short-lived token its tool renews from one a person must.
    fn token_issued_at(&self) -> Option<UnixTime> {
        None
    }

    /// What [`Connector::token_expires_at`] is the expiry of, for the
    /// Warning ahead of it.
    fn expiring_credential(&self) -> &'static str {
        "the OAuth access token"
    }

    /// The deployment marker the mailbox holds (see [`crate::deployment`]).
    /// A protocol with nowhere to keep one says why.
    fn read_marker(&mut self) -> impl Future<Output = Result<MarkerSlot, ConnectorError>> + Send {
        let why = format!(
            "{} has nowhere to keep a marker, so a second deployment reading this mailbox cannot be detected",
            self.protocol()
        );
        async move { Ok(MarkerSlot::Unsupported(why)) }
    }

    /// Replaces the mailbox's deployment marker with `marker`. Only called
    /// where [`Connector::read_marker`] is supported.
    fn write_marker(
        &mut self,
        marker: &Marker,
    ) -> impl Future<Output = Result<(), ConnectorError>> + Send {
        let _ = marker;
        let protocol = self.protocol();
        async move {
            Err(ConnectorError::MarkerLost(format!(
                "{protocol} cannot keep a deployment marker"
            )))
        }
    }
}
