//! An in-memory correlation index: the same keys the store keeps, in hash
//! maps. The pipeline uses it as the overlay for a batch under construction
//! (replies see parents staged in the same batch), the sled backend as its
//! cache, and benches and tests as a store-free index.

use std::collections::HashMap;

use super::{normalize_message_id, IndexEntry, Indexes, LookupKeys, SmartCandidate, TrackedEmail};
use crate::model::{ActivityId, RecordRef};

/// Newest candidates returned per smart-matching bucket: keeps a lookup
/// bounded however common a subject is.
pub const MAX_CANDIDATES_PER_BUCKET: usize = 32;

/// In-memory correlation index.
#[derive(Debug, Clone, Default)]
pub struct MemIndex {
    regarding: HashMap<ActivityId, Option<RecordRef>>,
    by_message_id: HashMap<String, ActivityId>,
    by_token: HashMap<String, ActivityId>,
    by_thread_root: HashMap<String, ActivityId>,
    /// Oldest first.
    buckets: HashMap<u64, Vec<SmartCandidate>>,
}

impl MemIndex {
    /// Records an activity's Message-IDs (first writer keeps an id, as in the store).
    pub fn insert_message_ids(
        &mut self,
        ids: &[String],
        activity: ActivityId,
        regarding: Option<RecordRef>,
    ) {
        self.regarding.insert(activity, regarding);
        for id in ids {
            self.by_message_id
                .entry(normalize_message_id(id))
                .or_insert(activity);
        }
    }

    /// Records a tracked activity's token, conversation and smart-matching entries.
    pub fn insert_entry(&mut self, e: &IndexEntry, regarding: Option<RecordRef>) {
        self.regarding.insert(e.activity, regarding);
        // Counters wrap: the newest carrier of a digit run wins.
        for d in &e.token_digits {
            self.by_token.insert(d.clone(), e.activity);
        }
        if let Some(root) = &e.thread_root {
            self.by_thread_root
                .entry(root.clone())
                .or_insert(e.activity);
        }
        for b in &e.buckets {
            let mut c = e.candidate.clone();
            c.regarding = None;
            self.buckets.entry(*b).or_default().push(c);
        }
    }

    /// Re-points an activity (a message moved to another tracked folder).
    pub fn set_regarding(&mut self, activity: ActivityId, regarding: Option<RecordRef>) {
        self.regarding.insert(activity, regarding);
    }

    fn tracked(&self, activity: ActivityId) -> TrackedEmail {
        TrackedEmail {
            activity,
            regarding: self.regarding.get(&activity).cloned().flatten(),
        }
    }

    /// Resolves `keys`, adding only what `idx` does not have yet, so it can
    /// layer over a store lookup.
    pub fn fill(&self, keys: &LookupKeys, idx: &mut Indexes<'_>) {
        for k in &keys.message_ids {
            if let Some(a) = self.by_message_id.get(k) {
                idx.by_message_id
                    .entry(k.clone())
                    .or_insert_with(|| self.tracked(*a));
            }
        }
        for k in &keys.token_digits {
            if let Some(a) = self.by_token.get(k) {
                // A newer carrier in this batch beats the store's older one.
                idx.by_token.insert(k.clone(), self.tracked(*a));
            }
        }
        if let Some(root) = &keys.thread_root {
            if let Some(a) = self.by_thread_root.get(root) {
                idx.by_thread_root
                    .entry(root.clone())
                    .or_insert_with(|| self.tracked(*a));
            }
        }
        for b in &keys.buckets {
            if let Some(list) = self.buckets.get(b) {
                for c in list.iter().rev().take(MAX_CANDIDATES_PER_BUCKET) {
                    if idx.candidates.iter().any(|x| x.activity == c.activity) {
                        continue;
                    }
                    let mut c = c.clone();
                    c.regarding = self.regarding.get(&c.activity).cloned().flatten();
                    idx.candidates.push(c);
                }
            }
        }
        self.override_regarding(idx);
    }

    /// Applies regarding records known here (re-points staged in this batch)
    /// over what the store returned.
    fn override_regarding(&self, idx: &mut Indexes<'_>) {
        let tracked = idx
            .by_message_id
            .values_mut()
            .chain(idx.by_token.values_mut())
            .chain(idx.by_thread_root.values_mut());
        for t in tracked {
            if let Some(r) = self.regarding.get(&t.activity) {
                t.regarding = r.clone();
            }
        }
        for c in &mut idx.candidates {
            if let Some(r) = self.regarding.get(&c.activity) {
                c.regarding = r.clone();
            }
        }
    }

    /// Resolves `keys` into a fresh [`Indexes`] (no folder rules).
    pub fn lookup(&self, keys: &LookupKeys) -> Indexes<'static> {
        let mut idx = Indexes::default();
        self.fill(keys, &mut idx);
        idx
    }
}
