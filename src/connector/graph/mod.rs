//! Exchange Online through Microsoft Graph: the HTTP client shared with the
//! sender ([`client`]), its errors ([`error`]), and the incoming connector
//! ([`GraphConnector`]).
//!
//! Incoming mail: per configured folder (display paths, `Inbox/Orders`) a
//! `messages/delta` round with `Prefer: odata.maxpagesize`, following
//! `@odata.nextLink` until `@odata.deltaLink`. The position committed with a
//! batch is the link the next request would use (a page whose messages did
//! not all fit is asked again; seen ids are skipped without a download).
//! Messages come as raw MIME from `/messages/{id}/$value`; Graph has no size
//! property on a message, so `max_message_size` is checked against the
//! `$value` answer's `Content-Length` (or the bytes read) and a larger message
//! is not read further. `process_email_from` becomes the one filter delta
//! supports (`receivedDateTime ge …`); Graph then lists at most 5,000
//! messages per folder in the round.
//!
//! Limits: at most [`MAX_IN_FLIGHT`] requests per mailbox (Graph's Outlook
//! limit, shared with the sender through [`GraphMailbox`]), Graph's 10,000
//! requests per 10 minutes per app and mailbox, the app's own budget
//! ([`GraphApp::new`]); throttled answers wait for `Retry-After` inside the
//! call a few times, then fail as transient with it.
//!
//! The deployment marker ([`crate::deployment`]) is an extended property of
//! the mailbox's root folder ([`marker`]).

mod ack;
pub mod client;
mod connector;
mod delta;
pub mod error;
mod folders;
pub mod marker;

pub use client::{GraphApp, GraphMailbox, MAX_IN_FLIGHT};
pub use connector::GraphConnector;
pub use error::GraphError;

/// The settings the daemon builds from an `exchange_online` profile and
/// mailbox, for one mailbox.
#[derive(Debug, Clone)]
pub struct GraphSettings {
    /// Mailbox name (store key, `SourceKey.mailbox`).
    pub mailbox: String,
    /// The `{id}` in `/users/{id}`: the mailbox's email or user id.
    pub user: String,
    /// `https://graph.microsoft.com/v1.0` (a stand-in: `http://127.0.0.1:P/v1.0`).
    pub graph_url: String,
    /// Display paths; the first is `Inbox`; children `Inbox/Orders/2026`.
    pub folders: Vec<String>,
    /// `Prefer: odata.maxpagesize` of delta pages.
    pub page_size: u32,
    /// New messages per fetch batch.
    pub batch_size: usize,
    /// Larger messages (by `$value`'s size) → `RawMessage::too_large`.
    pub max_message_size: u64,
    /// Category added on a recorded message (`None` = none).
    pub processed_category: Option<String>,
    /// Delete recorded messages instead of categorizing them.
    pub delete_after_processing: bool,
    /// Display path quarantined messages are moved to; created if missing.
    pub move_failed_to: Option<String>,
    /// Time-out of each request (the profile's io_timeout).
    pub request_timeout: std::time::Duration,
    /// Connect time-out (applied by whoever builds the HTTP client).
    pub connect_timeout: std::time::Duration,
    /// First round only: `$filter=receivedDateTime ge …`.
    pub process_email_from: Option<chrono::NaiveDate>,
    /// Requests in flight at most (the profile's `max_concurrent_requests`,
    /// 1..=[`MAX_IN_FLIGHT`]), shared by the connector and the sender.
    pub max_in_flight: usize,
    /// Graph's limit per app and mailbox: at most `.0` requests in any
    /// `.1` (10,000 per 10 minutes).
    pub request_limit: (u32, std::time::Duration),
    /// The client secret's expiry date from the config: the Warning ahead
    /// of it (the hourly access tokens renew by themselves).
    pub client_secret_expires_at: Option<crate::model::UnixTime>,
}

/// A message found in Sent Items.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentItem {
    /// Its (immutable) id there.
    pub id: String,
    /// Its `internetMessageId`, with angle brackets.
    pub internet_message_id: String,
}

#[cfg(test)]
mod tests;
