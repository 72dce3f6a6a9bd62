//! The CRM on the other end of the sync: one seam, [`CrmAdapter`], with one
//! module per CRM (`builtin`, `webhook`, `dataverse`).
//!
//! An adapter only speaks its CRM's wire format. What is delivered, in which
//! order, how often it is retried and when it is given up on is decided
//! above it (the outbox worker, over the store's outbox): an adapter
//! classifies each failure ([`CrmError`], transient or permanent) and
//! reports the CRM's id for what it created.

pub mod alert_events;
pub mod dataverse;
pub mod import;
pub mod parties;
pub mod sync;
pub mod webhook;
pub mod worker;

use std::future::Future;
use std::time::Duration;

use crate::error::{Classify, Disposition};
use crate::model::{OutboxEvent, Record};

/// A CRM failure, classified once (see [`crate::error`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CrmError {
    /// Worth retrying: network trouble, time-out, 429, 5xx. `retry_after` is
    /// the CRM's own `Retry-After` when it sent one (honoured over the
    /// back-off schedule).
    #[error("{message}")]
    Transient {
        message: String,
        retry_after: Option<Duration>,
    },
    /// Retrying the same request cannot succeed: rejected credentials, an
    /// endpoint that is gone (410), a request the CRM refuses (400 with its
    /// error text). The message is written for the operator and ends in the
    /// CRM's own error text.
    #[error("{message}")]
    Permanent { message: String },
    /// Permanent for every request, not for one event: the endpoint is gone
    /// (410) or the credentials are rejected (401/403). The outbox worker
    /// pauses delivery (nothing is dropped or dead-lettered), raises one
    /// Error alert and probes at the retry schedule's longest interval until
    /// delivery works again.
    #[error("{message}")]
    Endpoint { message: String },
}

impl CrmError {
    pub fn transient(message: impl Into<String>) -> Self {
        CrmError::Transient {
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn permanent(message: impl Into<String>) -> Self {
        CrmError::Permanent {
            message: message.into(),
        }
    }

    pub fn endpoint(message: impl Into<String>) -> Self {
        CrmError::Endpoint {
            message: message.into(),
        }
    }

    /// The CRM's `Retry-After`, if it asked for one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            CrmError::Transient { retry_after, .. } => *retry_after,
            CrmError::Permanent { .. } | CrmError::Endpoint { .. } => None,
        }
    }
}

impl Classify for CrmError {
    fn disposition(&self) -> Disposition {
        match self {
            CrmError::Transient { .. } => Disposition::Transient,
            CrmError::Permanent { .. } | CrmError::Endpoint { .. } => Disposition::Permanent,
        }
    }
}

/// One page of a record delta sync.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordPage {
    /// Records created or changed since the cursor asked for (upserted).
    pub records: Vec<Record>,
    /// `(kind, id)` of records deleted since then.
    pub deleted: Vec<(String, String)>,
    /// Where the next pull starts; stored with the records in one batch.
    pub cursor: Option<String>,
    /// Whether more pages follow now (pull again at once with `cursor`).
    pub more: bool,
}

/// What the CRM says about a delivered event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeliveryReceipt {
    /// The CRM's id for the activity (Dataverse `activityid`), if it has one;
    /// stored so later events for the activity update that record.
    pub crm_id: Option<String>,
}

/// A CRM adapter (see the module docs). Futures are `Send` so the outbox
/// worker can run on any runtime thread.
pub trait CrmAdapter: Send + Sync {
    /// Short name for logs, metrics and the outbox's consumer key
    /// (`webhook`, `dataverse`).
    fn name(&self) -> &'static str;

    /// Records and users changed since `cursor` (`None`: everything), one
    /// page at a time. Adapters without a record source return an empty
    /// page.
    fn pull_records(
        &self,
        cursor: Option<&str>,
    ) -> impl Future<Output = Result<RecordPage, CrmError>> + Send;

    /// Delivers one event. `crm_id` is what an earlier delivery for the same
    /// activity returned (so an update goes to that record). Must be
    /// idempotent: the same event may be delivered again after a crash or a
    /// lost response, and the CRM must still hold one record for it.
    fn deliver(
        &self,
        event: &OutboxEvent,
        crm_id: Option<&str>,
    ) -> impl Future<Output = Result<DeliveryReceipt, CrmError>> + Send;

    /// Test & Enable for the CRM link: authenticate and look, without
    /// changing anything; a human-readable success line.
    fn test(&self) -> impl Future<Output = Result<String, CrmError>> + Send;
}
