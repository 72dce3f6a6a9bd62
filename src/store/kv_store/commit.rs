//! [`crate::store::Store::commit`]: deduplication, re-pointing on a folder
//! move, `also_seen_as`, and everything a batch writes with its activities
//! (indexes, loop marks, positions, mailbox state, follow-ups, events), as
//! one backend batch.

use std::collections::{BTreeSet, HashMap, HashSet};

use super::keys::{
    automatic_prefix, encode, id_key, key, mailbox_listing_key, mid_key, sortable_time,
    source_bytes,
};
use super::lookup::Postings;
use super::{now, KvStore};
use crate::model::{CorrelationMethod, EmailActivity, EventKind};
use crate::store::kv::{KvBackend, WriteBatch};
use crate::store::{same_email, CommitBatch, CommitOutcome, PendingItem, StoreError, Tally};

/// Pending view of a batch under construction, so later items see earlier ones.
#[derive(Default)]
pub(super) struct Overlay {
    sources: HashMap<Vec<u8>, u64>,
    quarantine_sources: HashMap<Vec<u8>, u64>,
    message_ids: HashMap<Vec<u8>, u64>,
    hashes: HashMap<Vec<u8>, u64>,
    activities: HashMap<u64, EmailActivity>,
    /// Activities this batch touched, in the order it first did, with what
    /// changed (`None`: inserted by this batch).
    touched: Vec<(u64, Option<BTreeSet<String>>)>,
    /// Stored versions of activities this batch changed, as before it.
    previous: HashMap<u64, EmailActivity>,
    quarantine_rows: Vec<(u64, Vec<u8>)>,
    /// Thread-Index root keys written by this batch (first writer wins).
    thread_roots: Vec<Vec<u8>>,
}

impl<B: KvBackend> KvStore<B> {
    pub(super) fn commit_batch(
        &self,
        batch: CommitBatch,
    ) -> Result<Vec<CommitOutcome>, StoreError> {
        match self.commit_batch_with(batch, || Ok(None), |_, _| Ok(()))? {
            Ok(outcomes) => Ok(outcomes),
            // `precheck` above never stops a commit.
            Err(_) => Ok(Vec::new()),
        }
    }

    /// [`Self::commit_batch`] with two hooks, both under the writer lock:
    /// `precheck` runs first and may stop the commit (`Some(id)`: nothing is
    /// written, `Err(id)` is returned); `extra` adds its own writes to the
    /// batch, knowing the outcomes, so they land atomically with it.
    pub(super) fn commit_batch_with(
        &self,
        batch: CommitBatch,
        precheck: impl FnOnce() -> Result<Option<u64>, StoreError>,
        extra: impl FnOnce(&mut WriteBatch, &[CommitOutcome]) -> Result<(), StoreError>,
    ) -> Result<Result<Vec<CommitOutcome>, u64>, StoreError> {
        let mut writer = self.lock();
        if let Some(existing) = precheck()? {
            return Ok(Err(existing));
        }
        let mut ov = Overlay::default();
        let mut outcomes = Vec::with_capacity(batch.items.len());
        for item in batch.items {
            match item {
                PendingItem::Activity(a) => outcomes.push(self.stage_activity(*a, &mut ov)?),
                PendingItem::Quarantine(mut q) => {
                    let sk = key("qs/", &[&source_bytes(&q.source)]);
                    if let Some(id) = ov
                        .quarantine_sources
                        .get(&sk)
                        .copied()
                        .map_or_else(|| self.get_id(&sk), |i| Ok(Some(i)))?
                    {
                        outcomes.push(CommitOutcome::Quarantined(id));
                        continue;
                    }
                    q.id = self.next_id()?;
                    ov.quarantine_sources.insert(sk, q.id);
                    outcomes.push(CommitOutcome::Quarantined(q.id));
                    ov.quarantine_rows.push((q.id, encode(&q)?));
                }
            }
        }
        let mut b = WriteBatch::default();
        for (k, id) in ov
            .sources
            .iter()
            .chain(&ov.quarantine_sources)
            .chain(&ov.message_ids)
            .chain(&ov.hashes)
        {
            b.put(k.clone(), id.to_be_bytes());
        }
        let inserted: HashSet<u64> = outcomes
            .iter()
            .filter_map(|o| match o {
                CommitOutcome::Inserted(id) => Some(*id),
                _ => None,
            })
            .collect();
        for e in batch
            .index
            .iter()
            .filter(|e| inserted.contains(&e.activity))
        {
            let id = e.activity.to_be_bytes();
            // Counters wrap, so the newest carrier of a token wins.
            for d in &e.token_digits {
                b.put(key("t/", &[d.as_bytes()]), id);
            }
            if let Some(root) = &e.thread_root {
                let k = key("x/", &[root.as_bytes()]);
                if !ov.thread_roots.contains(&k) && !self.kv.contains(&k)? {
                    ov.thread_roots.push(k.clone());
                    b.put(k, id);
                }
            }
            let mut c = e.candidate.clone();
            c.regarding = None;
            let c = encode(&c)?;
            for bucket in &e.buckets {
                b.put(Postings::Bucket.key(*bucket, e.activity), c.clone());
            }
            for h in &e.shingle_keys {
                b.put(Postings::Shingle.key(*h, e.activity), Vec::new());
            }
            if !e.shingle_keys.is_empty() {
                b.put(id_key("sc/", e.activity), c);
            }
        }
        for m in batch
            .automatic
            .iter()
            .filter(|m| inserted.contains(&m.activity))
        {
            let mut k = automatic_prefix(&m.mailbox, &m.pair);
            k.extend_from_slice(&sortable_time(m.at));
            k.extend_from_slice(&m.activity.to_be_bytes());
            b.put(k, Vec::new());
        }
        let mut changed = Vec::new();
        for (id, how) in &ov.touched {
            let Some(a) = ov.activities.get(id) else {
                continue;
            };
            self.stage_unresolved(&mut b, a, ov.previous.get(id));
            match how {
                None => changed.push((a.clone(), EventKind::ActivityCreated, Vec::new())),
                Some(what) => changed.push((
                    a.clone(),
                    EventKind::ActivityUpdated,
                    what.iter().cloned().collect(),
                )),
            }
        }
        let last_seq = writer.last_seq;
        let new_seq = if self.event_log_on() {
            self.stage_events(&mut b, last_seq, changed, now())?
        } else {
            last_seq
        };
        for (id, a) in &ov.activities {
            b.put(id_key("r/", *id), encode(&a.regarding)?);
            b.put(id_key("a/", *id), encode(a)?);
            // Listed under every mailbox it was delivered to (a duplicate
            // only ever adds one).
            for mailbox in a.mailboxes() {
                b.put(mailbox_listing_key(mailbox, *id), Vec::new());
            }
        }
        for (id, row) in ov.quarantine_rows {
            b.put(id_key("q/", id), row);
        }
        for (mailbox, folder, pos) in &batch.positions {
            b.put(
                key("p/", &[mailbox.as_bytes(), folder.as_bytes()]),
                encode(pos)?,
            );
        }
        if let Some(mut state) = batch.mailbox_state {
            Tally::of(&outcomes).add_to(&mut state);
            b.put(key("b/", &[state.name.as_bytes()]), encode(&state)?);
        }
        for source in &batch.follow_ups_done {
            b.delete(key("f/", &[&source_bytes(source)]));
        }
        // After the removals: one owed again in this batch stays.
        for f in &batch.follow_ups {
            b.put(key("f/", &[&source_bytes(&f.source)]), encode(f)?);
        }
        extra(&mut b, &outcomes)?;
        self.kv.apply(b)?;
        writer.last_seq = new_seq;
        // Reads see the batch from here on, durable or not, so the caches
        // must too (a failed flush below must not leave a cached list
        // without what the backend now holds).
        {
            let mut cache = self.candidates();
            cache.generation += 1;
            for e in batch
                .index
                .iter()
                .filter(|e| inserted.contains(&e.activity))
            {
                cache.committed(e);
            }
        }
        self.regarding()
            .written(ov.activities.into_iter().map(|(id, a)| (id, a.regarding)));
        self.kv.flush()?;
        // Under the lock, so the watch never goes back.
        self.publish_events(last_seq, new_seq);
        drop(writer);
        Ok(Ok(outcomes))
    }

    /// See [`Store::commit_quarantine_retry`].
    pub(super) fn release_quarantined(
        &self,
        id: u64,
        batch: CommitBatch,
    ) -> Result<(Vec<CommitOutcome>, bool), StoreError> {
        let released = std::cell::Cell::new(false);
        let outcomes = self.commit_batch_with(
            batch,
            || Ok(None),
            |b, outcomes| {
                let recorded = outcomes
                    .iter()
                    .any(|o| matches!(o, CommitOutcome::Inserted(_) | CommitOutcome::Duplicate(_)));
                if !recorded {
                    return Ok(());
                }
                let k = id_key("q/", id);
                let Some(q) = self.get_json::<crate::model::QuarantineEntry>(&k)? else {
                    return Ok(());
                };
                b.delete(k);
                b.delete(key("qs/", &[&source_bytes(&q.source)]));
                released.set(true);
                Ok(())
            },
        )?;
        // `precheck` above never stops a commit.
        Ok((outcomes.unwrap_or_default(), released.get()))
    }

    pub(super) fn source_seen(&self, source: &crate::model::SourceKey) -> Result<bool, StoreError> {
        let sb = source_bytes(source);
        Ok(self.kv.contains(&key("s/", &[&sb]))? || self.kv.contains(&key("qs/", &[&sb]))?)
    }

    /// Decides insert / duplicate / already-seen for one activity and records the
    /// result in the overlay (written by the caller in one batch).
    fn stage_activity(
        &self,
        mut a: EmailActivity,
        ov: &mut Overlay,
    ) -> Result<CommitOutcome, StoreError> {
        let sk = key("s/", &[&source_bytes(&a.source)]);
        if let Some(id) = ov
            .sources
            .get(&sk)
            .copied()
            .map_or_else(|| self.get_id(&sk), |i| Ok(Some(i)))?
        {
            return Ok(CommitOutcome::AlreadySeen(id));
        }
        // The batch's own writes first, then the backend.
        let lookup =
            |k: &[u8], staged: &HashMap<Vec<u8>, u64>| -> Result<Option<u64>, StoreError> {
                match staged.get(k) {
                    Some(id) => Ok(Some(*id)),
                    None => self.get_id(k),
                }
            };
        let mut duplicate_of = None;
        for mid in &a.message_ids {
            if let Some(id) = lookup(&mid_key(mid), &ov.message_ids)? {
                let same = match ov.activities.get(&id) {
                    Some(e) => same_email(e, &a),
                    None => self
                        .get_json::<EmailActivity>(&id_key("a/", id))?
                        .is_some_and(|e| same_email(&e, &a)),
                };
                if same {
                    duplicate_of = Some(id);
                    break;
                }
            }
        }
        let hk = key("h/", &[a.content_hash.as_bytes()]);
        if duplicate_of.is_none() && a.message_ids.is_empty() {
            duplicate_of = lookup(&hk, &ov.hashes)?;
        }
        if let Some(id) = duplicate_of {
            let mut existing = match ov.activities.remove(&id) {
                Some(e) => e,
                None => {
                    let stored = self
                        .get_json::<EmailActivity>(&id_key("a/", id))?
                        .ok_or_else(|| {
                            StoreError::Corrupt(format!("activity {id} is indexed but missing"))
                        })?;
                    ov.previous.insert(id, stored.clone());
                    stored
                }
            };
            let mut what = BTreeSet::new();
            what.insert("also_seen_as".to_string());
            existing.also_seen_as.push(a.source.clone());
            // Moving a message into another tracked folder re-points it; leaving
            // a tracked folder (any other decision) changes nothing.
            if a.method == CorrelationMethod::Folder
                && a.regarding.is_some()
                && existing.regarding != a.regarding
            {
                existing.regarding = a.regarding.clone();
                existing.method = CorrelationMethod::Folder;
                existing.score = a.score;
                existing.correlated_with = None;
                existing
                    .reasons
                    .push(format!("moved to tracked folder {:?}", a.source.folder));
                existing.reasons.extend(a.reasons.iter().cloned());
                what.insert("regarding".to_string());
            }
            match ov.touched.iter_mut().find(|(t, _)| *t == id) {
                // Inserted by this batch: still one `activity.created`.
                Some((_, None)) => {}
                Some((_, Some(w))) => w.extend(what),
                None => ov.touched.push((id, Some(what))),
            }
            ov.activities.insert(id, existing);
            ov.sources.insert(sk, id);
            return Ok(CommitOutcome::Duplicate(id));
        }
        if a.id == 0 {
            a.id = self.next_id()?;
        }
        let id = a.id;
        for mid in &a.message_ids {
            let k = mid_key(mid);
            // First writer keeps a Message-ID: a later, different message reusing it
            // must not steal the thread.
            if lookup(&k, &ov.message_ids)?.is_none() {
                ov.message_ids.insert(k, id);
            }
        }
        if lookup(&hk, &ov.hashes)?.is_none() {
            ov.hashes.insert(hk, id);
        }
        ov.sources.insert(sk, id);
        ov.activities.insert(id, a);
        ov.touched.push((id, None));
        Ok(CommitOutcome::Inserted(id))
    }
}
