//! Queueing: the send rules, composition, and one store batch.

use super::{OutgoingRequest, Queued};
use crate::config::Config;
use crate::model::{ActivityId, UnixTime};
use crate::store::{Store, StoreError};

/// Why a request was refused; nothing was queued.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// No configured mailbox of that name (HTTP 404).
    #[error("no mailbox named {0:?} is configured")]
    UnknownMailbox(String),
    /// The mailbox may not send (outgoing not server-side sync, address not
    /// approved, disabled) (HTTP 409), with what to do.
    #[error("{0}")]
    NotAllowed(String),
    /// The email answers automatic mail (HTTP 409).
    #[error("activity {0} is automatic mail (auto-reply, bounce, list); it is never answered")]
    AnswersAutomatic(ActivityId),
    /// The request itself is wrong, every problem listed (HTTP 400/422).
    #[error("{}", .0.join("; "))]
    Invalid(Vec<String>),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Validates `req` against the send rules, composes it and queues it with
/// its activity in one batch (see [`Store::queue_outgoing`]).
pub fn queue(
    store: &dyn Store,
    cfg: &Config,
    req: &OutgoingRequest,
    now: UnixTime,
) -> Result<Queued, QueueError> {
    let _ = (store, cfg, req, now);
    Err(QueueError::Invalid(vec![
        "the outgoing queue is being built".into(),
    ]))
}
