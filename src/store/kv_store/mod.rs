//! The semantic layer: every rule of [`Store`] (see [`crate::store`]),
//! written once over any [`KvBackend`].
//!
//! Files by concern: [`keys`] (the key layout), `commit` (deduplication,
//! re-pointing, the batch), `lookup` (correlation indexes and their caches),
//! `records` (the record directory), `outbox` (event log, deliveries, dead
//! letters), `state` (listings, positions, mailbox state, follow-ups,
//! alerts).
//!
//! One writer at a time: every method that writes takes `writer` first, so
//! the reads a write depends on (deduplication, the next event seq, the
//! alert to aggregate) and the batch it produces are one critical section.
//! The lock is never held across an await (the trait is blocking).
//!
//! Regarding records are cached in memory: every correlation lookup needs
//! them and they change only on commit (insert or re-point) or
//! [`Store::update_activity`]. So are smart-matching buckets and candidates
//! (`lookup::CandidateCache`): nearly every incoming reply probes a bucket,
//! and scanning its keys and decoding its candidates' JSON (each carries
//! its body's shingle sample) was about three quarters of a correlation
//! against the sled store.

mod alert_index;
mod alerts;
mod commit;
pub mod keys;
mod lookup;
mod outbox;
mod outgoing;
mod records;
mod state;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use serde::de::DeserializeOwned;

use self::keys::{decode, read_id};
use self::lookup::{CandidateCache, RegardingCache};
use super::kv::{KvBackend, WriteBatch};
use super::sled_backend::SledBackend;
use super::{
    ActivityQuery, AlertEvent, AlertQuery, AlertRetention, CommitBatch, CommitOutcome,
    DeliveryOutcome, OutboxStats, QueueOutcome, RecordChanges, Store, StoreError,
};
use crate::correlate::{Indexes, LookupKeys, TrackedEmail};
use crate::model::{
    ActivityId, Alert, DeadLetter, DeliveryState, EmailActivity, FolderPosition, FollowUp,
    MailboxControl, MailboxState, NewAlert, OutboxEvent, OutgoingEmail, QuarantineEntry, Record,
    SendStatus, SourceKey, UnixTime,
};

/// What only the writer touches.
struct Writer {
    /// The newest event's seq: the next event is `last_seq + 1`. Advanced
    /// only once its batch is applied, so a failed write leaves no gap.
    last_seq: u64,
    /// The newest alert journal seq, advanced the same way.
    last_alert_seq: u64,
}

/// [`Store`] over a [`KvBackend`].
pub struct KvStore<B: KvBackend> {
    kv: B,
    writer: Mutex<Writer>,
    regarding_cache: Mutex<RegardingCache>,
    candidate_cache: Mutex<CandidateCache>,
    /// Consumers that get a pending delivery per new event.
    consumers: Mutex<Vec<String>>,
    /// The newest event seq, sent after every commit that appended events.
    events_tx: tokio::sync::watch::Sender<u64>,
    /// Off only in the commit-path bench (`benches/store.rs`).
    event_log: AtomicBool,
    /// The newest durable alert journal seq, sent after every write that
    /// appended an entry.
    alert_events_tx: tokio::sync::watch::Sender<u64>,
    /// How many alert journal entries are kept at most.
    alert_journal_cap: AtomicU64,
    /// [`AlertRetention::max_age`], in seconds.
    resolved_alert_max_age: AtomicU64,
    /// [`AlertRetention::keep`].
    resolved_alerts_kept: AtomicU64,
}

impl KvStore<SledBackend> {
    /// Opens (creating if needed) the sled store at `path`, with the default
    /// page cache ([`crate::config::DEFAULT_STORE_CACHE_MB`]).
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with_cache_mb(path, crate::config::DEFAULT_STORE_CACHE_MB)
    }

    /// Opens (creating if needed) the sled store at `path` with a page cache
    /// of `cache_mb` MiB (sled's own default, 1 GiB, is far too much beside
    /// other services). A directory it creates is 0700 whatever the umask.
    pub fn open_with_cache_mb(path: &Path, cache_mb: u64) -> Result<Self, StoreError> {
        Self::new(SledBackend::open(path, cache_mb)?)
    }
}

impl<B: KvBackend> KvStore<B> {
    /// The store over `kv` (which may hold an existing store).
    pub fn new(kv: B) -> Result<Self, StoreError> {
        let last_seq = outbox::stored_last_seq(&kv)?;
        let last_alert_seq = alerts::stored_last_alert_seq(&kv)?;
        alert_index::index_existing(&kv)?;
        let retention = AlertRetention::default();
        Ok(KvStore {
            kv,
            writer: Mutex::new(Writer {
                last_seq,
                last_alert_seq,
            }),
            regarding_cache: Mutex::new(RegardingCache::default()),
            candidate_cache: Mutex::new(CandidateCache::default()),
            consumers: Mutex::new(Vec::new()),
            events_tx: tokio::sync::watch::Sender::new(last_seq),
            event_log: AtomicBool::new(true),
            alert_events_tx: tokio::sync::watch::Sender::new(last_alert_seq),
            alert_journal_cap: AtomicU64::new(super::ALERT_JOURNAL_CAP),
            resolved_alert_max_age: AtomicU64::new(retention.max_age.as_secs()),
            resolved_alerts_kept: AtomicU64::new(retention.keep),
        })
    }

    /// The backend, for reads the [`Store`] trait has no method for.
    pub fn backend(&self) -> &B {
        &self.kv
    }

    /// Turns the event log and outbox off (`false`) or on: only for
    /// measuring what they cost on the commit path (`benches/store.rs`).
    /// A store without them breaks the outbox's promise.
    #[doc(hidden)]
    pub fn set_event_log_for_bench(&self, on: bool) {
        self.event_log.store(on, Ordering::Relaxed);
    }

    /// Keeps at most `cap` alert journal entries from the next append on
    /// (default [`super::ALERT_JOURNAL_CAP`]): for tests of the bound.
    #[doc(hidden)]
    pub fn set_alert_journal_cap(&self, cap: u64) {
        self.alert_journal_cap.store(cap.max(1), Ordering::Relaxed);
    }

    /// What [`Store::set_alert_retention`] set last.
    fn alert_retention(&self) -> AlertRetention {
        AlertRetention {
            max_age: std::time::Duration::from_secs(
                self.resolved_alert_max_age.load(Ordering::Relaxed),
            ),
            keep: self.resolved_alerts_kept.load(Ordering::Relaxed),
        }
    }

    fn event_log_on(&self) -> bool {
        self.event_log.load(Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, Writer> {
        // A panic while holding the lock cannot leave the backend
        // half-written (a batch is applied all or nothing) and `last_seq`
        // moves only after a successful apply, so a poisoned lock is safe
        // to reuse.
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get_id(&self, k: &[u8]) -> Result<Option<u64>, StoreError> {
        self.kv.get(k)?.map(|v| read_id(&v)).transpose()
    }

    fn get_json<T: DeserializeOwned>(&self, k: &[u8]) -> Result<Option<T>, StoreError> {
        self.kv.get(k)?.map(|v| decode(k, &v)).transpose()
    }

    /// Ids start at 1: 0 means "not assigned yet" in a
    /// [`super::PendingItem`].
    fn next_id(&self) -> Result<u64, StoreError> {
        Ok(self.kv.generate_id()?.saturating_add(1))
    }

    /// Applies `b` and makes it durable.
    fn write_durably(&self, b: WriteBatch) -> Result<(), StoreError> {
        self.kv.apply(b)?;
        self.kv.flush()
    }
}

use crate::model::now;

impl<B: KvBackend> Store for KvStore<B> {
    fn commit(&self, batch: CommitBatch) -> Result<Vec<CommitOutcome>, StoreError> {
        self.commit_batch(batch)
    }

    fn allocate_id(&self) -> Result<ActivityId, StoreError> {
        self.next_id()
    }

    fn is_seen(&self, source: &SourceKey) -> Result<bool, StoreError> {
        self.source_seen(source)
    }

    fn tracked_by_message_ids(
        &self,
        ids: &[String],
    ) -> Result<HashMap<String, TrackedEmail>, StoreError> {
        self.tracked_by_ids(ids)
    }

    fn lookup_into(&self, keys: &LookupKeys, idx: &mut Indexes<'_>) -> Result<(), StoreError> {
        self.lookup_keys_into(keys, idx)
    }

    fn automatic_since(
        &self,
        mailbox: &str,
        pair: &str,
        since: UnixTime,
        max: usize,
    ) -> Result<usize, StoreError> {
        self.count_automatic(mailbox, pair, since, max)
    }

    fn activity(&self, id: ActivityId) -> Result<Option<EmailActivity>, StoreError> {
        self.get_json(&keys::id_key("a/", id))
    }

    fn activities(&self, q: &ActivityQuery) -> Result<Vec<EmailActivity>, StoreError> {
        self.list_activities(q)
    }

    fn count_activities(&self, mailbox: Option<&str>) -> Result<u64, StoreError> {
        self.activity_count(mailbox)
    }

    fn quarantined(&self, limit: usize) -> Result<Vec<QuarantineEntry>, StoreError> {
        self.quarantine_entries(limit)
    }

    fn folder_positions(
        &self,
        mailbox: &str,
    ) -> Result<HashMap<String, FolderPosition>, StoreError> {
        self.positions_of(mailbox)
    }

    fn mailbox_state(&self, mailbox: &str) -> Result<Option<MailboxState>, StoreError> {
        use crate::model::TestDirection;
        let state: Option<MailboxState> = self.get_json(&keys::key("b/", &[mailbox.as_bytes()]))?;
        let get = |d| self.get_json::<crate::model::TestResult>(&state::test_key(d, mailbox));
        let outgoing = get(TestDirection::Outgoing)?;
        let incoming = get(TestDirection::Incoming)?;
        let act = get(TestDirection::Act)?;
        if state.is_none() && outgoing.is_none() && incoming.is_none() && act.is_none() {
            return Ok(None);
        }
        let mut s = state.unwrap_or_else(|| MailboxState {
            name: mailbox.to_owned(),
            enabled: true,
            ..MailboxState::default()
        });
        if let Some(t) = outgoing {
            s.outgoing_test = t;
        }
        // The mailbox task records its own incoming test in the state; an
        // on-demand test under its own key: the later one is the result.
        for (kept, own) in [(incoming, &mut s.incoming_test), (act, &mut s.act_test)] {
            if let Some(t) = kept {
                if t.completed_on >= own.completed_on {
                    *own = t;
                }
            }
        }
        Ok(Some(s))
    }

    fn follow_ups(&self, mailbox: &str) -> Result<Vec<FollowUp>, StoreError> {
        self.follow_ups_of(mailbox)
    }

    fn named_cursor(&self, name: &str) -> Result<Option<u64>, StoreError> {
        self.get_id(&keys::key("nc/", &[name.as_bytes()]))
    }

    fn put_named_cursor(&self, name: &str, value: u64) -> Result<(), StoreError> {
        let _writer = self.lock();
        let mut b = WriteBatch::default();
        b.put(keys::key("nc/", &[name.as_bytes()]), value.to_be_bytes());
        self.write_durably(b)
    }

    fn mailbox_control(&self, mailbox: &str) -> Result<MailboxControl, StoreError> {
        Ok(self
            .get_json(&keys::key("mc/", &[mailbox.as_bytes()]))?
            .unwrap_or_default())
    }

    fn put_mailbox_control(
        &self,
        mailbox: &str,
        control: &MailboxControl,
    ) -> Result<(), StoreError> {
        let _writer = self.lock();
        let mut b = WriteBatch::default();
        b.put(
            keys::key("mc/", &[mailbox.as_bytes()]),
            keys::encode(control)?,
        );
        self.write_durably(b)
    }

    fn put_mailbox_state(&self, state: &MailboxState) -> Result<(), StoreError> {
        self.write_mailbox_state(state)
    }

    fn raise_alert(&self, alert: NewAlert<'_>, at: UnixTime) -> Result<Alert, StoreError> {
        self.raise(alert, at)
    }

    fn query_alerts(&self, q: &AlertQuery) -> Result<Vec<Alert>, StoreError> {
        self.alert_list(q)
    }

    fn quarantine_entry(&self, id: u64) -> Result<Option<QuarantineEntry>, StoreError> {
        self.get_json(&keys::id_key("q/", id))
    }

    fn commit_quarantine_retry(
        &self,
        id: u64,
        batch: CommitBatch,
    ) -> Result<(Vec<CommitOutcome>, bool), StoreError> {
        self.release_quarantined(id, batch)
    }

    fn alert(&self, id: u64) -> Result<Option<Alert>, StoreError> {
        self.get_json(&keys::id_key("l/", id))
    }

    fn resolve_alerts(&self, subject: &str, kind: &str, at: UnixTime) -> Result<u64, StoreError> {
        self.resolve(subject, kind, at)
    }

    fn acknowledge_alert(&self, id: u64, at: UnixTime) -> Result<Option<Alert>, StoreError> {
        self.acknowledge(id, at)
    }

    fn set_alert_retention(&self, retention: AlertRetention) {
        self.resolved_alert_max_age
            .store(retention.max_age.as_secs(), Ordering::Relaxed);
        self.resolved_alerts_kept
            .store(retention.keep, Ordering::Relaxed);
    }

    fn prune_resolved_alerts(&self, now: UnixTime) -> Result<u64, StoreError> {
        self.prune_resolved(now)
    }

    fn alert_events_after(&self, after: u64, limit: usize) -> Result<Vec<AlertEvent>, StoreError> {
        self.alert_journal_after(after, limit)
    }

    fn last_alert_event_seq(&self) -> u64 {
        *self.alert_events_tx.borrow()
    }

    fn watch_alert_events(&self) -> tokio::sync::watch::Receiver<u64> {
        self.alert_events_tx.subscribe()
    }

    fn alert_events_sent(&self, cursor: &str, upto: u64) -> Result<(), StoreError> {
        self.alert_journal_sent(cursor, upto)
    }

    fn upsert_records(
        &self,
        records: Vec<Record>,
        deleted: &[(String, String)],
        cursor: Option<(&str, &str)>,
        at: UnixTime,
    ) -> Result<RecordChanges, StoreError> {
        self.upsert(records, deleted, cursor, at)
    }

    fn record(&self, kind: &str, id: &str) -> Result<Option<Record>, StoreError> {
        self.get_json(&keys::record_key(kind, id))
    }

    fn records_by_address(&self, address: &str) -> Result<Vec<Record>, StoreError> {
        self.records_at(address)
    }

    fn records(
        &self,
        kind: Option<&str>,
        after: Option<(&str, &str)>,
        limit: usize,
    ) -> Result<Vec<Record>, StoreError> {
        self.record_page(kind, after, limit)
    }

    fn count_records(&self, kind: Option<&str>) -> Result<u64, StoreError> {
        self.record_count(kind)
    }

    fn record_cursor(&self, consumer: &str) -> Result<Option<String>, StoreError> {
        self.cursor_of(consumer)
    }

    fn activities_with_unresolved(&self, address: &str) -> Result<Vec<ActivityId>, StoreError> {
        self.unresolved_at(address)
    }

    fn set_outbox_consumers(&self, consumers: Vec<String>) {
        *self.consumers.lock().unwrap_or_else(|p| p.into_inner()) = consumers;
    }

    fn update_activity(
        &self,
        activity: EmailActivity,
        changes: Vec<String>,
        at: UnixTime,
    ) -> Result<Option<u64>, StoreError> {
        self.replace_activity(activity, changes, at)
    }

    fn events_after(&self, after: u64, limit: usize) -> Result<Vec<OutboxEvent>, StoreError> {
        self.events_from(after, limit)
    }

    fn event(&self, seq: u64) -> Result<Option<OutboxEvent>, StoreError> {
        self.event_at(seq)
    }

    fn last_event_seq(&self) -> Result<u64, StoreError> {
        // What readers may see: the newest seq made durable (see `outbox`).
        Ok(*self.events_tx.borrow())
    }

    fn watch_events(&self) -> tokio::sync::watch::Receiver<u64> {
        self.events_tx.subscribe()
    }

    fn pending_deliveries(
        &self,
        consumer: &str,
        limit: usize,
    ) -> Result<Vec<DeliveryState>, StoreError> {
        self.pending_of(consumer, limit)
    }

    fn finish_delivery(&self, consumer: &str, outcome: DeliveryOutcome) -> Result<(), StoreError> {
        self.finish(consumer, outcome)
    }

    fn crm_id(&self, consumer: &str, activity: ActivityId) -> Result<Option<String>, StoreError> {
        self.crm_id_of(consumer, activity)
    }

    fn outbox_stats(&self, consumer: &str) -> Result<OutboxStats, StoreError> {
        self.stats_of(consumer)
    }

    fn dead_letters(&self, consumer: &str, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        self.dead_letters_of(consumer, limit)
    }

    fn queue_outgoing(
        &self,
        batch: CommitBatch,
        email: OutgoingEmail,
    ) -> Result<QueueOutcome, StoreError> {
        self.queue_outgoing_email(batch, email)
    }

    fn outgoing(&self, id: ActivityId) -> Result<Option<OutgoingEmail>, StoreError> {
        self.outgoing_email(id)
    }

    fn outgoing_by_key(&self, key: &str) -> Result<Option<ActivityId>, StoreError> {
        self.outgoing_id_by_key(key)
    }

    fn outgoing_queued(
        &self,
        mailbox: Option<&str>,
        limit: usize,
    ) -> Result<Vec<OutgoingEmail>, StoreError> {
        self.queued_outgoing(mailbox, limit)
    }

    fn outgoing_list(
        &self,
        mailbox: Option<&str>,
        status: Option<SendStatus>,
        before: Option<ActivityId>,
        limit: usize,
    ) -> Result<Vec<OutgoingEmail>, StoreError> {
        self.list_outgoing(mailbox, status, before, limit)
    }

    fn update_outgoing(
        &self,
        email: &OutgoingEmail,
        activity: Option<(EmailActivity, Vec<String>)>,
        at: UnixTime,
    ) -> Result<Option<u64>, StoreError> {
        self.write_outgoing(email, activity, at)
    }

    fn next_token_counter(&self, user_number: u32) -> Result<u64, StoreError> {
        self.bump_token_counter(user_number)
    }

    fn set_outgoing_test(
        &self,
        mailbox: &str,
        result: &crate::model::TestResult,
    ) -> Result<(), StoreError> {
        self.write_outgoing_test(mailbox, result)
    }

    fn set_test_result(
        &self,
        mailbox: &str,
        direction: crate::model::TestDirection,
        result: &crate::model::TestResult,
    ) -> Result<(), StoreError> {
        self.write_test_result(mailbox, direction, result)
    }
}
