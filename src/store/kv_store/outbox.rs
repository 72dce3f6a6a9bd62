//! The event log (`e/<seq>`), the per-consumer outbox (`o/`), dead letters
//! (`od/`), CRM ids (`ci/`), the unresolved-party index (`pu/`) and
//! [`crate::store::Store::update_activity`].
//!
//! Seqs are allocated under the writer lock from `Writer::last_seq`, which
//! moves only once the batch holding the events is applied: 1, 2, 3, … in
//! commit order, without gaps.
//!
//! Readers (the pull feed, the delivery worker) see events only up to the
//! newest seq made durable, the value of the watch channel, set after the
//! flush: a batch applied but lost in a crash before its flush would
//! otherwise have shown events whose seqs (and ids `evt_<seq>`) the next
//! process hands out again to other events.

use std::collections::BTreeSet;

use super::keys::{
    decode, encode, id_key, list_key, list_prefix, mailbox_listing_key, read_id,
    unresolved_addresses, unresolved_key,
};
use super::KvStore;
use crate::model::{
    ActivityId, DeadLetter, DeliveryState, EmailActivity, EventKind, OutboxEvent, UnixTime,
};
use crate::store::kv::{KeyRange, KvBackend, ScanOrder, WriteBatch};
use crate::store::{DeliveryOutcome, OutboxStats, StoreError};

/// The newest seq in the event log of `kv` (0: none).
pub(super) fn stored_last_seq<B: KvBackend>(kv: &B) -> Result<u64, StoreError> {
    match kv
        .scan_keys(&KeyRange::prefix(b"e/"), ScanOrder::Descending, 1)?
        .first()
    {
        Some(k) => read_id(&k[2..]),
        None => Ok(0),
    }
}

fn limit_or_all(limit: usize) -> usize {
    if limit == 0 {
        usize::MAX
    } else {
        limit
    }
}

impl<B: KvBackend> KvStore<B> {
    fn consumer_list(&self) -> Vec<String> {
        self.consumers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The newest seq readers may see (see the module docs).
    fn durable_seq(&self) -> u64 {
        *self.events_tx.borrow()
    }

    /// Tells watchers about `new` when it moved past `last`. Called with
    /// the writer lock held, after the flush, so the value never goes back.
    pub(super) fn publish_events(&self, last: u64, new: u64) {
        if new != last {
            self.events_tx.send_replace(new);
        }
    }

    /// Keeps `pu/` right for `activity` as this batch leaves it (`previous`:
    /// as stored before).
    pub(super) fn stage_unresolved(
        &self,
        b: &mut WriteBatch,
        activity: &EmailActivity,
        previous: Option<&EmailActivity>,
    ) {
        let now = unresolved_addresses(activity);
        if let Some(old) = previous {
            for addr in unresolved_addresses(old).difference(&now) {
                b.delete(unresolved_key(addr, activity.id));
            }
        }
        for addr in &now {
            b.put(unresolved_key(addr, activity.id), Vec::new());
        }
    }

    /// Adds the events of `changed` (activity as this batch leaves it,
    /// kind, changes) to `b`, numbered after `last`, with a pending delivery
    /// per consumer. Returns the newest seq.
    pub(super) fn stage_events(
        &self,
        b: &mut WriteBatch,
        last: u64,
        changed: Vec<(EmailActivity, EventKind, Vec<String>)>,
        at: UnixTime,
    ) -> Result<u64, StoreError> {
        let consumers = self.consumer_list();
        let mut seq = last;
        for (activity, kind, changes) in changed {
            seq += 1;
            let state = DeliveryState {
                seq,
                activity_id: activity.id,
                queued_at: at,
                attempts: 0,
                next_attempt_at: at,
                last_error: None,
            };
            let event = OutboxEvent {
                seq,
                id: OutboxEvent::id_for(seq),
                kind,
                activity_id: activity.id,
                changes,
                at,
                activity,
            };
            b.put(id_key("e/", seq), encode(&event)?);
            if !consumers.is_empty() {
                let state = encode(&state)?;
                for c in &consumers {
                    b.put(list_key("o/", c, seq), state.clone());
                }
            }
        }
        Ok(seq)
    }

    pub(super) fn replace_activity(
        &self,
        activity: EmailActivity,
        changes: Vec<String>,
        at: UnixTime,
    ) -> Result<Option<u64>, StoreError> {
        self.replace_activity_with(activity, changes, at, |_, _| Ok(()))
    }

    /// [`Self::replace_activity`] with `extra` writes (given the activity as
    /// stored before) in the same batch, under the writer lock.
    pub(super) fn replace_activity_with(
        &self,
        activity: EmailActivity,
        changes: Vec<String>,
        at: UnixTime,
        extra: impl FnOnce(&mut WriteBatch, &EmailActivity) -> Result<(), StoreError>,
    ) -> Result<Option<u64>, StoreError> {
        let mut writer = self.lock();
        let id = activity.id;
        let Some(old) = self.get_json::<EmailActivity>(&id_key("a/", id))? else {
            return Ok(None);
        };
        let mut b = WriteBatch::default();
        b.put(id_key("r/", id), encode(&activity.regarding)?);
        b.put(id_key("a/", id), encode(&activity)?);
        // The per-mailbox listing follows the mailboxes it now has.
        let now: BTreeSet<&str> = activity.mailboxes().into_iter().collect();
        for gone in old.mailboxes().into_iter().filter(|m| !now.contains(m)) {
            b.delete(mailbox_listing_key(gone, id));
        }
        for mailbox in &now {
            b.put(mailbox_listing_key(mailbox, id), Vec::new());
        }
        self.stage_unresolved(&mut b, &activity, Some(&old));
        extra(&mut b, &old)?;
        let last = writer.last_seq;
        let regarding = activity.regarding.clone();
        let seq = if self.event_log_on() {
            self.stage_events(
                &mut b,
                last,
                vec![(activity, EventKind::ActivityUpdated, changes)],
                at,
            )?
        } else {
            last
        };
        self.kv.apply(b)?;
        writer.last_seq = seq;
        self.regarding().written(std::iter::once((id, regarding)));
        self.kv.flush()?;
        self.publish_events(last, seq);
        drop(writer);
        Ok(Some(seq))
    }

    pub(super) fn events_from(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<OutboxEvent>, StoreError> {
        let durable = self.durable_seq();
        if after >= durable {
            return Ok(Vec::new());
        }
        let range = KeyRange::between(id_key("e/", after + 1), id_key("e/", durable + 1));
        self.kv
            .scan(&range, ScanOrder::Ascending, limit_or_all(limit))?
            .iter()
            .map(|(k, v)| decode(k, v))
            .collect()
    }

    pub(super) fn event_at(&self, seq: u64) -> Result<Option<OutboxEvent>, StoreError> {
        if seq > self.durable_seq() {
            return Ok(None);
        }
        self.get_json(&id_key("e/", seq))
    }

    /// A consumer's pending deliveries of durable events.
    fn pending_range(&self, consumer: &str) -> KeyRange {
        KeyRange::between(
            list_prefix("o/", consumer),
            list_key("o/", consumer, self.durable_seq().saturating_add(1)),
        )
    }

    pub(super) fn pending_of(
        &self,
        consumer: &str,
        limit: usize,
    ) -> Result<Vec<DeliveryState>, StoreError> {
        self.kv
            .scan(
                &self.pending_range(consumer),
                ScanOrder::Ascending,
                limit_or_all(limit),
            )?
            .iter()
            .map(|(k, v)| decode(k, v))
            .collect()
    }

    pub(super) fn finish(
        &self,
        consumer: &str,
        outcome: DeliveryOutcome,
    ) -> Result<(), StoreError> {
        let _writer = self.lock();
        let mut b = WriteBatch::default();
        match outcome {
            DeliveryOutcome::Delivered {
                seq,
                activity_id,
                crm_id,
            } => {
                b.delete(list_key("o/", consumer, seq));
                if let Some(c) = crm_id {
                    b.put(list_key("ci/", consumer, activity_id), c.into_bytes());
                }
            }
            DeliveryOutcome::Retry(state) => {
                let k = list_key("o/", consumer, state.seq);
                // Delivered meanwhile (another worker, a replay): keep it gone.
                if self.kv.contains(&k)? {
                    b.put(k, encode(&state)?);
                }
            }
            DeliveryOutcome::DeadLetter(dead) => {
                let k = list_key("o/", consumer, dead.state.seq);
                // Delivered meanwhile: nothing to give up on.
                if self.kv.contains(&k)? {
                    b.delete(k);
                    b.put(list_key("od/", consumer, dead.state.seq), encode(&dead)?);
                }
            }
        }
        if b.is_empty() {
            return Ok(());
        }
        self.write_durably(b)
    }

    pub(super) fn crm_id_of(
        &self,
        consumer: &str,
        activity: ActivityId,
    ) -> Result<Option<String>, StoreError> {
        Ok(self
            .kv
            .get(&list_key("ci/", consumer, activity))?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    pub(super) fn stats_of(&self, consumer: &str) -> Result<OutboxStats, StoreError> {
        let pending = self.pending_range(consumer);
        let oldest = self.kv.scan(&pending, ScanOrder::Ascending, 1)?;
        Ok(OutboxStats {
            depth: self.kv.count(&pending)?,
            oldest_queued_at: match oldest.first() {
                Some((k, v)) => Some(decode::<DeliveryState>(k, v)?.queued_at),
                None => None,
            },
            dead_letters: self
                .kv
                .count(&KeyRange::prefix(&list_prefix("od/", consumer)))?,
        })
    }

    pub(super) fn dead_letters_of(
        &self,
        consumer: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        self.kv
            .scan(
                &KeyRange::prefix(&list_prefix("od/", consumer)),
                ScanOrder::Ascending,
                limit_or_all(limit),
            )?
            .iter()
            .map(|(k, v)| decode(k, v))
            .collect()
    }
}
