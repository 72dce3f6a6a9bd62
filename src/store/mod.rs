//! Persistence behind one trait, so a PostgreSQL backend can join the embedded
//! sled one without the rest of the crate noticing.
//!
//! The contract that keeps "nothing lost, nothing duplicated":
//! * [`Store::commit`] applies a whole [`CommitBatch`] (activities, quarantine
//!   entries, folder positions, mailbox state) atomically and makes it durable
//!   before returning; connectors acknowledge (delete, flag, move) only after.
//! * Correlation indexes ([`CommitBatch::index`]) are written in the same batch
//!   as their activity, so a crash never leaves an index without its activity.
//! * A duplicate found in a tracked folder (decision method `folder`) re-points
//!   the existing activity to that folder's record; other duplicates change
//!   nothing but `also_seen_as` (so a copy in another mailbox lists the
//!   activity under that mailbox too).
//! * Deduplication happens inside `commit`, under the store's own lock, by source
//!   key, then Message-ID + [`same_email`] (sender, date, subject: copies of one
//!   email delivered to several mailboxes differ in their bytes), then, for mail
//!   without a Message-ID, content hash; concurrent mailboxes cannot race it.
//! * Follow-ups owed on a batch's messages ([`CommitBatch::follow_ups`]) are
//!   written in the same batch, so one that a crash interrupted is found
//!   again ([`Store::follow_ups`]); a later batch removes them once done.
//! * The mailbox counters written with a batch count its outcomes ([`Tally`]),
//!   exactly as the metrics do: only new activities are "processed".
//! * Every commit that creates or changes an activity (inserted, re-pointed,
//!   `also_seen_as` grown, parties changed) appends one [`OutboxEvent`] per
//!   activity to the event log, numbered in commit order, and one pending
//!   [`DeliveryState`] per outbox consumer ([`Store::set_outbox_consumers`]),
//!   in the same atomic batch. A delivery's outcome
//!   ([`Store::finish_delivery`]) is again one batch: the pending entry goes
//!   away (or is rescheduled, or moves to the dead letters) together with the
//!   CRM id it produced.
//! * An outgoing email is queued ([`Store::queue_outgoing`]) in one batch
//!   with the activity it is (and its index entries and `activity.created`
//!   event) and its client idempotency key, so a retried request never
//!   queues twice; every later status change ([`Store::update_outgoing`])
//!   writes the queue row, the activity and its `activity.updated` event
//!   together.
//! * A write that makes an alert an Error (raised as one, or a Warning
//!   escalated in place) appends an [`AlertEvent`] to the alert journal in
//!   the same atomic batch, numbered by its own gapless sequence, so the
//!   webhook hears of every Error alert however briefly it was open
//!   ([`Store::alert_events_after`]). Entries a consumer has sent are pruned
//!   with its cursor ([`Store::alert_events_sent`]); the journal never keeps
//!   more than [`ALERT_JOURNAL_CAP`] entries (the oldest go first), so it
//!   stays bounded without a consumer.
//! * Resolved alerts are kept for [`AlertRetention`] (30 days, the newest
//!   10,000 at most, by default): a resolve deletes, in its own batch, the
//!   resolved alerts then due (a bounded number, oldest resolved first), and
//!   [`Store::prune_resolved_alerts`] the rest. Open alerts are never
//!   pruned, and an index of them (written in the batch that opens or
//!   resolves one) answers the open-alert query without reading the
//!   resolved ones.
//! * The record directory keeps an address index (`address → records`)
//!   written in the same batch as the records, so a lookup is one prefix
//!   read, never a scan.

//!
//! # Layers
//! The rules above live once, in the semantic layer [`KvStore`], generic
//! over a small ordered key-value backend with atomic batches
//! ([`KvBackend`], see [`kv`] for its promises and how PostgreSQL maps onto
//! it). [`SledBackend`] is the embedded default ([`SledStore`]), and
//! [`MemBackend`] an in-memory one. [`conformance`] is the test suite every
//! backend must pass unchanged.

pub mod conformance;
pub mod kv;
pub mod kv_store;
pub mod sled_backend;

use std::collections::HashMap;

use crate::correlate::{IndexEntry, Indexes, LookupKeys, TrackedEmail};
use crate::error::{Classify, Disposition};
use crate::model::{
    ActivityId, Alert, AlertLevel, DeadLetter, DeliveryState, EmailActivity, FolderPosition,
    FollowUp, MailboxControl, MailboxState, NewAlert, OutboxEvent, OutgoingEmail, QuarantineEntry,
    Record, SendStatus, SourceKey, UnixTime,
};
use serde::{Deserialize, Serialize};

pub use kv::{KvBackend, MemBackend};
pub use kv_store::KvStore;
pub use sled_backend::SledBackend;

/// The embedded default store: the semantic layer on sled.
/// [`SledStore::open`] and [`SledStore::open_with_cache_mb`] open one.
pub type SledStore = KvStore<SledBackend>;

/// Store failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store is in use by another process (is the daemon running?): {0}")]
    Locked(String),
    #[error("store I/O error: {0}")]
    Io(String),
    #[error("store data is corrupt: {0}")]
    Corrupt(String),
}

impl Classify for StoreError {
    fn disposition(&self) -> Disposition {
        match self {
            // A full disk or a flaky volume may recover; corrupt data will not.
            StoreError::Io(_) | StoreError::Locked(_) => Disposition::Transient,
            StoreError::Corrupt(_) => Disposition::Permanent,
        }
    }
}

/// One item of a commit batch.
#[derive(Debug, Clone)]
pub enum PendingItem {
    /// A new email; `id` comes from [`Store::allocate_id`] (0: the store assigns one).
    Activity(Box<EmailActivity>),
    /// A message that could not be processed; `id` is assigned by the store.
    Quarantine(QuarantineEntry),
}

/// Everything one processed message group changes, committed at once.
#[derive(Debug, Clone, Default)]
pub struct CommitBatch {
    pub items: Vec<PendingItem>,
    /// (mailbox, folder, position) to record.
    pub positions: Vec<(String, String, FolderPosition)>,
    /// The mailbox's state as before this batch: the store adds the batch's
    /// [`Tally`] to its counters before writing it, so they count exactly
    /// what the commit decided (duplicates are not "processed").
    pub mailbox_state: Option<MailboxState>,
    /// Correlation index entries of tracked activities in `items`; written only
    /// for activities that are inserted (not for duplicates), in the same batch.
    pub index: Vec<IndexEntry>,
    /// Follow-ups owed on this batch's messages, written (or replaced, keyed
    /// by source) with it.
    pub follow_ups: Vec<FollowUp>,
    /// Follow-ups carried out or given up since an earlier commit: removed
    /// before `follow_ups` are written, so one owed again stays.
    pub follow_ups_done: Vec<SourceKey>,
    /// Loop-detector marks of automatic activities in `items`; written only
    /// for activities that are inserted, in the same batch.
    pub automatic: Vec<AutomaticMark>,
}

/// An automatic message between two addresses, as the loop detector counts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AutomaticMark {
    pub mailbox: String,
    /// The two addresses, as `filter::loop_pair` writes them.
    pub pair: String,
    pub at: UnixTime,
    pub activity: ActivityId,
}

/// What a batch's outcomes add to its mailbox's counters: new activities and
/// quarantined messages. Derived from the outcomes the commit itself decides,
/// by the store for the state it writes and by the caller for its own copy,
/// so both stay exact (the metrics count the same outcomes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub inserted: u64,
    pub quarantined: u64,
}

impl Tally {
    /// Counts a commit's outcomes.
    pub fn of(outcomes: &[CommitOutcome]) -> Self {
        let mut t = Tally::default();
        for o in outcomes {
            match o {
                CommitOutcome::Inserted(_) => t.inserted += 1,
                CommitOutcome::Quarantined(_) => t.quarantined += 1,
                CommitOutcome::Duplicate(_) | CommitOutcome::AlreadySeen(_) => {}
            }
        }
        t
    }

    /// Adds the counts to a mailbox's `items_processed` / `items_failed`.
    pub fn add_to(self, state: &mut MailboxState) {
        state.items_processed = state.items_processed.saturating_add(self.inserted);
        state.items_failed = state.items_failed.saturating_add(self.quarantined);
    }
}

/// What must agree, besides a shared Message-ID, for two copies to be one
/// email: sender, date and subject (white space collapsed). Not the bytes:
/// a copy delivered to a second mailbox may carry a disclaimer footer, another
/// transfer encoding or another `Received` chain. This only guards against
/// different emails that reuse a Message-ID.
pub fn email_identity(from: &[String], sent_at: Option<UnixTime>, subject: &str) -> String {
    let subject: Vec<&str> = subject.split_whitespace().collect();
    format!("{sent_at:?}\n{from:?}\n{}", subject.join(" "))
}

/// Whether two activities sharing a Message-ID are copies of one email
/// (see [`email_identity`]).
pub fn same_email(a: &EmailActivity, b: &EmailActivity) -> bool {
    email_identity(&a.from, a.sent_at, &a.subject) == email_identity(&b.from, b.sent_at, &b.subject)
}

/// What happened to one item of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitOutcome {
    Inserted(ActivityId),
    /// The same email was already recorded; this source was added to it.
    Duplicate(ActivityId),
    /// This exact source was processed before (a replay after a crash).
    AlreadySeen(ActivityId),
    Quarantined(u64),
}

/// Query for listing activities.
#[derive(Debug, Clone, Default)]
pub struct ActivityQuery {
    pub mailbox: Option<String>,
    /// Only ids strictly below this (pagination, newest first).
    pub before: Option<ActivityId>,
    pub limit: usize,
}

/// Open or resolved, for [`AlertQuery`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AlertState {
    Open,
    Resolved,
}

/// Query for listing alerts; `None` fields do not filter.
#[derive(Debug, Clone, Default)]
pub struct AlertQuery {
    pub level: Option<AlertLevel>,
    /// Alerts about this mailbox (a profile alert matches its profile's name).
    pub mailbox: Option<String>,
    pub state: Option<AlertState>,
    pub limit: usize,
}

impl AlertQuery {
    /// The latest `limit` alerts, unfiltered.
    pub fn latest(limit: usize) -> Self {
        AlertQuery {
            limit,
            ..Default::default()
        }
    }

    /// True when `a` passes the filters.
    pub fn matches(&self, a: &Alert) -> bool {
        self.level.is_none_or(|l| a.level == l)
            && self.mailbox.as_deref().is_none_or(|m| {
                a.mailbox.as_deref() == Some(m)
                    || (a.mailbox.is_none() && a.profile.as_deref() == Some(m))
            })
            && self.state.is_none_or(|st| match st {
                AlertState::Open => a.is_open(),
                AlertState::Resolved => !a.is_open(),
            })
    }
}

/// True when an alert of `kind` is covered by `pattern`: the same kind, or
/// `pattern` is its family (`quarantine` covers `quarantine:unparseable`).
pub fn kind_covers(pattern: &str, kind: &str) -> bool {
    kind == pattern
        || kind
            .strip_prefix(pattern)
            .is_some_and(|rest| rest.starts_with(':'))
}

/// What a record upsert changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecordChanges {
    pub inserted: u64,
    pub updated: u64,
    /// Unchanged records given again (no write).
    pub unchanged: u64,
    pub deleted: u64,
}

/// The outcome of one delivery attempt, applied in one batch.
#[derive(Debug, Clone, PartialEq)]
pub enum DeliveryOutcome {
    /// Delivered: the pending entry is removed; `crm_id` (when given) is
    /// remembered for the activity.
    Delivered {
        seq: u64,
        activity_id: ActivityId,
        crm_id: Option<String>,
    },
    /// Failed, to be tried again: the entry is replaced by this one.
    Retry(DeliveryState),
    /// Given up: the pending entry moves to the dead letters.
    DeadLetter(DeadLetter),
}

/// The most alert journal entries kept: appending past it drops the
/// oldest in the same batch. Without a consumer (no webhook) the journal
/// stays this size at most; with one, what it sent is pruned at once and
/// only an outage of the receiver spanning this many new Error alerts
/// (counted by escalation, not by repeats) would drop unsent ones.
pub const ALERT_JOURNAL_CAP: u64 = 10_000;

/// How long resolved alerts are kept, and how many at most: past either
/// bound the oldest resolved go first (open alerts are never pruned).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlertRetention {
    /// A resolved alert is deleted once resolved longer ago than this.
    pub max_age: std::time::Duration,
    /// At most this many resolved alerts are kept (the newest).
    pub keep: u64,
}

/// The default [`AlertRetention::max_age`]: 30 days.
pub const DEFAULT_RESOLVED_ALERT_RETENTION: std::time::Duration =
    std::time::Duration::from_secs(30 * 86_400);

/// The default [`AlertRetention::keep`].
pub const DEFAULT_RESOLVED_ALERTS_KEPT: u64 = 10_000;

impl Default for AlertRetention {
    fn default() -> Self {
        AlertRetention {
            max_age: DEFAULT_RESOLVED_ALERT_RETENTION,
            keep: DEFAULT_RESOLVED_ALERTS_KEPT,
        }
    }
}

/// Why an alert journal entry was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertEventKind {
    /// A new alert, raised as an Error.
    Raised,
    /// An open alert raised again at Error after a milder level (a
    /// `sync_failing` Warning past `stall_alert_after`): same alert id.
    Escalated,
}

/// One entry of the alert journal: an alert became an Error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertEvent {
    /// 1, 2, 3, … in write order, without gaps, never reused (not even
    /// after every entry was pruned).
    pub seq: u64,
    /// A raise or an escalation.
    pub kind: AlertEventKind,
    /// When it became an Error (the raise's time).
    pub at: UnixTime,
    /// The alert as that write left it.
    pub alert: Alert,
    /// For a mailbox alert: the id of its profile's open `profile_failing`
    /// alert at that moment, if any (what the webhook's storm rule reads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile_alert: Option<u64>,
}

impl AlertEvent {
    /// The webhook-id of this entry, the same on every retry and unique per
    /// entry: `alert_<id>` for a raise (one per alert), and
    /// `alert_<id>_escalated_<seq>` for an escalation, a separate event of
    /// the same alert.
    pub fn webhook_id(&self) -> String {
        match self.kind {
            AlertEventKind::Raised => format!("alert_{}", self.alert.id),
            AlertEventKind::Escalated => {
                format!("alert_{}_escalated_{}", self.alert.id, self.seq)
            }
        }
    }
}

/// How much is waiting for one consumer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutboxStats {
    /// Undelivered events.
    pub depth: u64,
    /// `queued_at` of the oldest undelivered event.
    pub oldest_queued_at: Option<UnixTime>,
    pub dead_letters: u64,
}

/// The persistence interface. Methods are blocking; async callers use
/// `spawn_blocking` for [`Store::commit`], which waits for the disk.
pub trait Store: Send + Sync + 'static {
    /// Applies a batch atomically and durably (see the module docs).
    fn commit(&self, batch: CommitBatch) -> Result<Vec<CommitOutcome>, StoreError>;

    /// A fresh activity id, so a batch can link replies to parents committed in
    /// the same batch. Unused ids (duplicates) leave harmless gaps.
    fn allocate_id(&self) -> Result<ActivityId, StoreError>;

    /// Whether a source was processed (as an activity or quarantined).
    fn is_seen(&self, source: &SourceKey) -> Result<bool, StoreError>;

    /// Tracked emails known under these normalised Message-IDs.
    fn tracked_by_message_ids(
        &self,
        ids: &[String],
    ) -> Result<HashMap<String, TrackedEmail>, StoreError>;

    /// Resolves every key correlation asked for (Message-IDs, token digits,
    /// Thread-Index root, smart-matching buckets, fingerprint shingles)
    /// without scanning, adding to `idx` what it does not hold yet: staged
    /// correlation resolves its keys stage by stage into one slice.
    fn lookup_into(&self, keys: &LookupKeys, idx: &mut Indexes<'_>) -> Result<(), StoreError>;

    /// [`Store::lookup_into`] a fresh slice.
    fn lookup(&self, keys: &LookupKeys) -> Result<Indexes<'static>, StoreError> {
        let mut idx = Indexes::default();
        self.lookup_into(keys, &mut idx)?;
        Ok(idx)
    }

    /// How many [`AutomaticMark`]s of `mailbox` and `pair` were committed
    /// with a time at or after `since`, counting no further than `max` (an
    /// indexed range read, not a scan of the activities).
    fn automatic_since(
        &self,
        mailbox: &str,
        pair: &str,
        since: UnixTime,
        max: usize,
    ) -> Result<usize, StoreError>;

    fn activity(&self, id: ActivityId) -> Result<Option<EmailActivity>, StoreError>;

    /// Activities newest first.
    fn activities(&self, q: &ActivityQuery) -> Result<Vec<EmailActivity>, StoreError>;

    fn count_activities(&self, mailbox: Option<&str>) -> Result<u64, StoreError>;

    fn quarantined(&self, limit: usize) -> Result<Vec<QuarantineEntry>, StoreError>;

    /// One quarantine entry by id.
    fn quarantine_entry(&self, id: u64) -> Result<Option<QuarantineEntry>, StoreError>;

    /// Commits `batch` (the quarantined message `id` processed again) and,
    /// in the same atomic batch, removes the quarantine entry when the
    /// batch recorded its source as an activity (inserted or a duplicate of
    /// one). When the message is still unprocessable (the batch quarantines
    /// it again) the entry stays as it is. Returns the outcomes and whether
    /// the entry was released.
    fn commit_quarantine_retry(
        &self,
        id: u64,
        batch: CommitBatch,
    ) -> Result<(Vec<CommitOutcome>, bool), StoreError>;

    fn folder_positions(
        &self,
        mailbox: &str,
    ) -> Result<HashMap<String, FolderPosition>, StoreError>;

    fn mailbox_state(&self, mailbox: &str) -> Result<Option<MailboxState>, StoreError>;

    /// Follow-ups still owed on a mailbox's messages (in source key order).
    fn follow_ups(&self, mailbox: &str) -> Result<Vec<FollowUp>, StoreError>;

    /// A named cursor (e.g. the last alert a consumer was told of); `None`
    /// when never set.
    fn named_cursor(&self, name: &str) -> Result<Option<u64>, StoreError>;

    /// Stores a named cursor, durably.
    fn put_named_cursor(&self, name: &str, value: u64) -> Result<(), StoreError>;

    /// What operators set on the mailbox at run time (default: nothing).
    fn mailbox_control(&self, mailbox: &str) -> Result<MailboxControl, StoreError>;

    /// Stores what operators set on the mailbox, durably.
    fn put_mailbox_control(
        &self,
        mailbox: &str,
        control: &MailboxControl,
    ) -> Result<(), StoreError>;

    /// Writes mailbox state outside a commit (errors, back-off), durably.
    fn put_mailbox_state(&self, state: &MailboxState) -> Result<(), StoreError>;

    /// Raises an alert. The open alert with the same subject (mailbox, or
    /// profile for a profile alert) and kind is updated instead: count and
    /// last seen go up, level and text become the new ones (a failure that
    /// escalates from Warning to Error stays one alert).
    fn raise_alert(&self, alert: NewAlert<'_>, at: UnixTime) -> Result<Alert, StoreError>;

    /// Alerts passing `q`'s filters, most recently seen first.
    fn query_alerts(&self, q: &AlertQuery) -> Result<Vec<Alert>, StoreError>;

    /// The latest `limit` alerts, most recently seen first.
    fn alerts(&self, limit: usize) -> Result<Vec<Alert>, StoreError> {
        self.query_alerts(&AlertQuery::latest(limit))
    }

    /// One alert by id.
    fn alert(&self, id: u64) -> Result<Option<Alert>, StoreError>;

    /// Marks the open alerts of `subject` (a mailbox, or a profile for
    /// profile alerts) whose kind `kind` covers ([`kind_covers`]) as
    /// resolved at `at`; raising the same kind again opens a new alert.
    /// Returns how many were resolved.
    fn resolve_alerts(&self, subject: &str, kind: &str, at: UnixTime) -> Result<u64, StoreError>;

    /// Marks alert `id` acknowledged at `at` (kept if already); `None` when
    /// there is no such alert.
    fn acknowledge_alert(&self, id: u64, at: UnixTime) -> Result<Option<Alert>, StoreError>;

    /// Keeps resolved alerts within `retention` from the next resolve or
    /// prune on (default [`AlertRetention::default`]).
    fn set_alert_retention(&self, retention: AlertRetention);

    /// Deletes every resolved alert past the retention at `now` (resolved
    /// before `now` minus its age, or beyond the newest it keeps), oldest
    /// resolved first, in atomic batches; open alerts stay. Returns how
    /// many went. A resolve prunes what it makes due itself: this catches
    /// up on what time alone made due, and after a lower retention.
    fn prune_resolved_alerts(&self, now: UnixTime) -> Result<u64, StoreError>;

    // --- Alert journal ----------------------------------------------------

    /// Alert journal entries with `seq > after`, in order, at most `limit`
    /// (0: all); only entries made durable, and only those not pruned yet.
    fn alert_events_after(&self, after: u64, limit: usize) -> Result<Vec<AlertEvent>, StoreError>;

    /// The newest durable alert journal seq (0: none yet); kept across
    /// pruning and restarts.
    fn last_alert_event_seq(&self) -> u64;

    /// Sees the newest durable alert journal seq after every write that
    /// appended one (the webhook sender's wake-up).
    fn watch_alert_events(&self) -> tokio::sync::watch::Receiver<u64>;

    /// A consumer sent (or skipped for good) every entry up to `upto`:
    /// stores `upto` as the named cursor `cursor` and prunes those entries,
    /// in one batch. The journal has one consumer (the webhook sender); a
    /// second would have to prune below the lower of the two cursors.
    fn alert_events_sent(&self, cursor: &str, upto: u64) -> Result<(), StoreError>;

    // --- Record directory -------------------------------------------------

    /// Upserts records (a record given again unchanged is not written) and
    /// deletes `(kind, id)`s, with their address index entries, and stores
    /// `cursor` as `(consumer, cursor)` for the next delta pull, all in one
    /// batch. `updated_at` is set to `at` on what changed.
    fn upsert_records(
        &self,
        records: Vec<Record>,
        deleted: &[(String, String)],
        cursor: Option<(&str, &str)>,
        at: UnixTime,
    ) -> Result<RecordChanges, StoreError>;

    fn record(&self, kind: &str, id: &str) -> Result<Option<Record>, StoreError>;

    /// Records carrying this address (case-insensitive), by kind then id: an
    /// indexed read.
    fn records_by_address(&self, address: &str) -> Result<Vec<Record>, StoreError>;

    /// Records by kind then id, after `(kind, id)` (exclusive), at most
    /// `limit` (0: all); only of `kind` when given.
    fn records(
        &self,
        kind: Option<&str>,
        after: Option<(&str, &str)>,
        limit: usize,
    ) -> Result<Vec<Record>, StoreError>;

    fn count_records(&self, kind: Option<&str>) -> Result<u64, StoreError>;

    /// The delta-sync cursor stored for a consumer by [`Store::upsert_records`].
    fn record_cursor(&self, consumer: &str) -> Result<Option<String>, StoreError>;

    /// Ids of activities with a party of this address (case-insensitive)
    /// that is unresolved, oldest first: what a new record may resolve.
    fn activities_with_unresolved(&self, address: &str) -> Result<Vec<ActivityId>, StoreError>;

    // --- Event log and outbox ---------------------------------------------

    /// Which consumers (CRM adapters) get a pending delivery for each new
    /// event from now on. Set once at start, before the first commit.
    fn set_outbox_consumers(&self, consumers: Vec<String>);

    /// Replaces an activity outside the ingest path (parties resolved later,
    /// an admin's correction) and appends its `activity.updated` event with
    /// `changes`, in one batch. Returns the event's seq (`None`: the activity
    /// does not exist).
    fn update_activity(
        &self,
        activity: EmailActivity,
        changes: Vec<String>,
        at: UnixTime,
    ) -> Result<Option<u64>, StoreError>;

    /// Events with `seq > after`, in order, at most `limit` (0: all).
    fn events_after(&self, after: u64, limit: usize) -> Result<Vec<OutboxEvent>, StoreError>;

    fn event(&self, seq: u64) -> Result<Option<OutboxEvent>, StoreError>;

    /// The newest event's seq (0: none yet).
    fn last_event_seq(&self) -> Result<u64, StoreError>;

    /// Sees the newest seq after every commit that appended events (for the
    /// pull feed's long-poll and the outbox worker's wake-up).
    fn watch_events(&self) -> tokio::sync::watch::Receiver<u64>;

    /// Undelivered events of a consumer, in seq order, at most `limit`
    /// (0: all).
    fn pending_deliveries(
        &self,
        consumer: &str,
        limit: usize,
    ) -> Result<Vec<DeliveryState>, StoreError>;

    /// Applies a delivery attempt's outcome in one batch.
    fn finish_delivery(&self, consumer: &str, outcome: DeliveryOutcome) -> Result<(), StoreError>;

    /// The CRM's id for an activity, as a consumer's delivery reported it.
    fn crm_id(&self, consumer: &str, activity: ActivityId) -> Result<Option<String>, StoreError>;

    fn outbox_stats(&self, consumer: &str) -> Result<OutboxStats, StoreError>;

    /// Dead letters of a consumer, oldest first, at most `limit` (0: all).
    fn dead_letters(&self, consumer: &str, limit: usize) -> Result<Vec<DeadLetter>, StoreError>;

    // --- Outgoing email -----------------------------------------------------

    /// Queues an outgoing email: commits `batch` (its activity, whose id is
    /// `email.activity_id`, with index entries and `activity.created`
    /// event) and writes `email` (queue row, idempotency key) in one
    /// batch. When `email.idempotency_key` is already known nothing is
    /// written and the existing email's id is returned.
    fn queue_outgoing(
        &self,
        batch: CommitBatch,
        email: OutgoingEmail,
    ) -> Result<QueueOutcome, StoreError>;

    fn outgoing(&self, id: ActivityId) -> Result<Option<OutgoingEmail>, StoreError>;

    /// The email queued under a client idempotency key.
    fn outgoing_by_key(&self, key: &str) -> Result<Option<ActivityId>, StoreError>;

    /// Emails with work owed (pending send, sending, or sent with the Sent
    /// copy still owed) of `mailbox` (all mailboxes when `None`), oldest
    /// first, at most `limit` (0: all): an indexed read, finished ones are
    /// not looked at.
    fn outgoing_queued(
        &self,
        mailbox: Option<&str>,
        limit: usize,
    ) -> Result<Vec<OutgoingEmail>, StoreError>;

    /// Outgoing emails newest first, with ids below `before`, of `mailbox`
    /// and `status` when given, at most `limit` (0: all).
    fn outgoing_list(
        &self,
        mailbox: Option<&str>,
        status: Option<SendStatus>,
        before: Option<ActivityId>,
        limit: usize,
    ) -> Result<Vec<OutgoingEmail>, StoreError>;

    /// Writes `email`'s queue row and, when `activity` is given, replaces
    /// its activity (indexing Message-IDs it gained, e.g. the id the server
    /// stored the Sent copy under) and appends the `activity.updated` event
    /// with `changes`, all in one batch. Returns the event's seq, if any.
    fn update_outgoing(
        &self,
        email: &OutgoingEmail,
        activity: Option<(EmailActivity, Vec<String>)>,
        at: UnixTime,
    ) -> Result<Option<u64>, StoreError>;

    /// The next value (1, 2, …) of a user's tracking-token counter, durable
    /// before it returns, so no two emails get the same one (an unused value
    /// is a harmless gap; the token wraps it modulo its width).
    fn next_token_counter(&self, user_number: u32) -> Result<u64, StoreError>;

    /// Records the outgoing Test & Enable result of `mailbox`;
    /// [`Store::mailbox_state`] returns it in `outgoing_test` whatever the
    /// mailbox task writes.
    fn set_outgoing_test(
        &self,
        mailbox: &str,
        result: &crate::model::TestResult,
    ) -> Result<(), StoreError>;

    /// Records a Test & Enable result of `mailbox` for one direction (an
    /// on-demand test); [`Store::mailbox_state`] returns it, or the result
    /// the mailbox task wrote into the state when that one is later.
    fn set_test_result(
        &self,
        mailbox: &str,
        direction: crate::model::TestDirection,
        result: &crate::model::TestResult,
    ) -> Result<(), StoreError>;
}

/// What [`Store::queue_outgoing`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueOutcome {
    /// Queued as this activity id.
    Queued(ActivityId),
    /// The idempotency key was known: the email queued with it before.
    Existing(ActivityId),
}
