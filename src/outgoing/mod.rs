//! The outgoing side: email the CRM asks the daemon to send.
//!
//! ```text
//! queue (API, CLI, CRM pending send) ─► compose (token, Message-ID,
//! threading) ─► store: activity + queue row, one batch ─► sender (per
//! mailbox: "sending, attempt N" durable ─► SMTP ─► sent) ─► Sent copy
//! (APPEND, Message-ID read-back) ─► every status change an event the CRM gets
//! ```
//!
//! * [`queue`] validates a request against the send rules (mailbox known,
//!   outgoing = server-side sync, address approved, never answering
//!   automatic mail), composes it and queues it with its activity.
//! * [`compose`] builds the MIME with lettre: From, token in the subject,
//!   generated Message-ID, `In-Reply-To`/`References`, alternatives,
//!   attachments under the `[outgoing]` policy.
//! * [`smtp`] is the transport (lettre, TLS with verification, pools).
//! * [`sender`] is the per-mailbox loop: rate limit, retries, crash
//!   recovery by the Sent folder, the Sent copy.

pub mod compose;
pub mod control;
pub mod queue;
pub mod sender;
pub mod sent_copy;
pub mod smtp;
pub mod transport;

use serde::{Deserialize, Serialize};

use crate::model::ActivityId;

/// An attachment of a request, base64 in JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AttachmentRequest {
    pub filename: String,
    /// MIME type; guessed from the extension when absent.
    #[serde(default)]
    pub content_type: Option<String>,
    /// The bytes, standard base64.
    pub content_base64: String,
}

/// A request to send one email (`POST /api/v1/outgoing`, `crm-mailsync
/// send FILE.json`, an email the CRM left in Pending Send).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OutgoingRequest {
    /// Configured mailbox name that sends it.
    pub mailbox: String,
    /// `kind:id` of the record it is regarding.
    #[serde(default)]
    pub regarding: Option<String>,
    #[serde(default)]
    pub to: Vec<String>,
    #[serde(default)]
    pub cc: Vec<String>,
    #[serde(default)]
    pub bcc: Vec<String>,
    #[serde(default)]
    pub subject: String,
    #[serde(default)]
    pub text: Option<String>,
    #[serde(default)]
    pub html: Option<String>,
    #[serde(default)]
    pub attachments: Vec<AttachmentRequest>,
    /// Activity this email answers: threading headers and, when the request
    /// has none, its regarding come from it.
    #[serde(default)]
    pub in_reply_to: Option<ActivityId>,
    /// A retried request with the same key returns the first email.
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// The CRM's id of this email when the CRM created it (Dataverse
    /// `activityid`); the adapter updates that email instead of creating one.
    #[serde(default)]
    pub crm_email_id: Option<String>,
    /// Sent by a CRM workflow, not typed by a person: marked
    /// `Auto-Submitted: auto-generated` so auto-replies do not answer it.
    #[serde(default)]
    pub automated: bool,
}

/// An email queued (or found queued under its idempotency key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Queued {
    pub id: ActivityId,
    pub message_id: String,
    /// The subject as sent, token included.
    pub subject: String,
    pub token: Option<String>,
    pub status: crate::model::SendStatus,
    /// True when the idempotency key matched an email queued before.
    pub existing: bool,
}

/// Wakes the senders when an email is queued in this process.
pub type SendWakeup = std::sync::Arc<tokio::sync::Notify>;
