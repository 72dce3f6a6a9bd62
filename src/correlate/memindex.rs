//! An in-memory correlation index: the same keys the store keeps, in hash
//! maps. The pipeline uses it as the overlay for a batch under construction
//! (replies see parents staged in the same batch), benches and tests as a
//! store-free index. (The sled backend keeps its own caches of what it
//! read: regarding records, smart-matching candidates, posting lists.)

// foldhash instead of the std SipHash: every message probes these maps
// with short keys (Message-IDs, token digits, u64 buckets) and SipHash was a
// measurable share of correlation; foldhash is still seeded per map, so
// crafted Message-IDs cannot pick their buckets in advance.
use foldhash::HashMap;

use super::{
    normalize_message_id, shingle_candidate_ids, IndexEntry, Indexes, LookupKeys, SmartCandidate,
    TrackedEmail, MAX_SHINGLE_POSTINGS,
};
use crate::model::{ActivityId, RecordRef};

/// Newest candidates returned per smart-matching bucket: keeps a lookup
/// bounded however common a subject is.
pub const MAX_CANDIDATES_PER_BUCKET: usize = 32;

/// In-memory correlation index.
#[derive(Debug, Clone, Default)]
pub struct MemIndex {
    regarding: HashMap<ActivityId, Option<RecordRef>>,
    /// Candidate data, once per activity (buckets and shingles hold ids),
    /// its `regarding` kept equal to the entry of `regarding`, so loading a
    /// candidate takes one lookup.
    candidates: HashMap<ActivityId, SmartCandidate>,
    by_message_id: HashMap<String, ActivityId>,
    by_token: HashMap<String, ActivityId>,
    by_thread_root: HashMap<String, ActivityId>,
    /// Oldest first.
    buckets: HashMap<u64, Vec<ActivityId>>,
    /// Fingerprint shingle → activities, oldest first.
    by_shingle: HashMap<u64, Vec<ActivityId>>,
}

impl MemIndex {
    /// Records an activity's Message-IDs (first writer keeps an id, as in the store).
    pub fn insert_message_ids(
        &mut self,
        ids: &[String],
        activity: ActivityId,
        regarding: Option<RecordRef>,
    ) {
        self.set_regarding(activity, regarding);
        for id in ids {
            self.by_message_id
                .entry(normalize_message_id(id))
                .or_insert(activity);
        }
    }

    /// Records a tracked activity's token, conversation and smart-matching entries.
    pub fn insert_entry(&mut self, e: &IndexEntry, regarding: Option<RecordRef>) {
        // Counters wrap: the newest carrier of a digit run wins.
        for d in &e.token_digits {
            self.by_token.insert(d.clone(), e.activity);
        }
        if let Some(root) = &e.thread_root {
            self.by_thread_root
                .entry(root.clone())
                .or_insert(e.activity);
        }
        self.candidates.insert(e.activity, e.candidate.clone());
        self.set_regarding(e.activity, regarding);
        for b in &e.buckets {
            self.buckets.entry(*b).or_default().push(e.activity);
        }
        for h in &e.shingle_keys {
            self.by_shingle.entry(*h).or_default().push(e.activity);
        }
    }

    fn push_candidate(&self, activity: ActivityId, idx: &mut Indexes<'_>) {
        if idx.candidates.iter().any(|x| x.activity == activity) {
            return;
        }
        if let Some(c) = self.candidates.get(&activity) {
            idx.candidates.push(c.clone());
        }
    }

    /// Re-points an activity (a message moved to another tracked folder).
    pub fn set_regarding(&mut self, activity: ActivityId, regarding: Option<RecordRef>) {
        if let Some(c) = self.candidates.get_mut(&activity) {
            c.regarding.clone_from(&regarding);
        }
        self.regarding.insert(activity, regarding);
    }

    fn tracked(&self, activity: ActivityId) -> TrackedEmail {
        TrackedEmail {
            activity,
            regarding: self.regarding.get(&activity).cloned().flatten(),
        }
    }

    /// Resolves `keys`, adding only what `idx` does not have yet, so it can
    /// layer over a store lookup (and staged correlation can resolve its
    /// keys stage by stage into one slice).
    pub fn fill(&self, keys: &LookupKeys, idx: &mut Indexes<'_>) {
        idx.derived = Some(keys.derived.clone());
        // First, on what `idx` holds already (the store's answer, earlier
        // stages): everything added below is current.
        self.override_regarding(idx);
        // Up to the first hit, as the store (see `LookupKeys`).
        if let Some((k, a)) = keys
            .message_ids
            .iter()
            .find_map(|k| self.by_message_id.get(k).map(|a| (k, a)))
        {
            idx.by_message_id
                .entry(k.clone())
                .or_insert_with(|| self.tracked(*a));
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
                for a in list.iter().rev().take(MAX_CANDIDATES_PER_BUCKET) {
                    self.push_candidate(*a, idx);
                }
            }
        }
        for h in &keys.shingles {
            if let Some(list) = self.by_shingle.get(h) {
                let postings = idx.by_shingle.entry(*h).or_default();
                for a in list.iter().take(MAX_SHINGLE_POSTINGS) {
                    if postings.len() < MAX_SHINGLE_POSTINGS
                        && !postings.iter().any(|t| t.activity == *a)
                    {
                        postings.push(self.tracked(*a));
                    }
                }
            }
        }
        for (a, _) in shingle_candidate_ids(&idx.by_shingle) {
            self.push_candidate(a, idx);
        }
    }

    /// Applies regarding records known here (re-points staged in this batch)
    /// over what the store returned.
    fn override_regarding(&self, idx: &mut Indexes<'_>) {
        let tracked = idx
            .by_message_id
            .values_mut()
            .chain(idx.by_token.values_mut())
            .chain(idx.by_thread_root.values_mut())
            .chain(idx.by_shingle.values_mut().flatten());
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
