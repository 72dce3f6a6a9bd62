//! Correlation lookups: every key correlation asks for resolved by an
//! indexed read, with the caches in front of the hot ones (regarding
//! records, smart-matching posting lists and candidates).

use std::collections::HashMap;
use std::sync::{Arc, MutexGuard};

use super::keys::{automatic_prefix, id_key, key, mid_key, read_id, sortable_time};
use super::KvStore;
use crate::correlate::memindex::MAX_CANDIDATES_PER_BUCKET;
use crate::correlate::{
    shingle_candidate_ids, CandidateData, IndexEntry, Indexes, LookupKeys, SmartCandidate,
    TrackedEmail, MAX_SHINGLE_POSTINGS,
};
use crate::model::{ActivityId, RecordRef, UnixTime};
use crate::store::kv::{KeyRange, KvBackend, ScanOrder};
use crate::store::StoreError;

/// Cached regarding records beyond this count are dropped (and re-read).
const REGARDING_CACHE_MAX: usize = 1 << 20;

/// Cached smart-matching candidates beyond this count are dropped (and
/// re-read): one holds a body's shingle sample, about 1.2 KB, so the cache
/// stays under about 80 MB.
const CANDIDATE_CACHE_MAX: usize = 1 << 16;

/// Cached posting lists beyond this count are dropped (and re-read); one
/// holds at most 32 ids.
const POSTINGS_CACHE_MAX: usize = 1 << 18;

/// The two kinds of posting list correlation reads: a key per member,
/// `<prefix><list><id>`, ids ascending in key order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Postings {
    /// `sb/<bucket><id>`, valued with the candidate's JSON; a lookup takes
    /// the newest [`MAX_CANDIDATES_PER_BUCKET`].
    Bucket,
    /// `sh/<shingle><id>`, empty values; a lookup takes the oldest
    /// [`MAX_SHINGLE_POSTINGS`], as the in-memory index does.
    Shingle,
}

impl Postings {
    /// `<prefix><list>`: the keys of a list's members start with it.
    fn list_prefix(self, list: u64) -> Vec<u8> {
        let mut k = match self {
            Postings::Bucket => b"sb/".to_vec(),
            Postings::Shingle => b"sh/".to_vec(),
        };
        k.extend_from_slice(&list.to_be_bytes());
        k
    }

    pub(super) fn key(self, list: u64, id: ActivityId) -> Vec<u8> {
        let mut k = self.list_prefix(list);
        k.extend_from_slice(&id.to_be_bytes());
        k
    }

    fn limit(self) -> usize {
        match self {
            Postings::Bucket => MAX_CANDIDATES_PER_BUCKET,
            Postings::Shingle => MAX_SHINGLE_POSTINGS,
        }
    }

    /// Adds `id` to a list as read (ascending, at most [`Self::limit`]).
    fn add(self, ids: &mut Vec<ActivityId>, id: ActivityId) {
        // A lookup may have cached the list after the commit's write
        // already, and ids are allocated before commits, so they need not
        // arrive in order.
        let Err(at) = ids.binary_search(&id) else {
            return;
        };
        ids.insert(at, id);
        if ids.len() > self.limit() {
            match self {
                Postings::Bucket => {
                    ids.remove(0);
                }
                Postings::Shingle => {
                    ids.pop();
                }
            }
        }
    }
}

/// Smart-matching data read from the tree, kept for the next lookups.
///
/// A candidate's data never changes once written (its regarding record,
/// which can, comes from the regarding cache), and posting lists only gain
/// members, each on commit: [`crate::store::Store::commit`] adds them to the cached lists
/// itself. A lookup that read the tree while a commit ran cannot know
/// whether it saw that commit, so it caches what it read only when
/// `generation` (bumped by every commit) did not move meanwhile.
#[derive(Default)]
pub(super) struct CandidateCache {
    pub(super) generation: u64,
    data: HashMap<ActivityId, Arc<CandidateData>>,
    /// What a lookup reads of a posting list (empty: no member).
    postings: HashMap<(Postings, u64), Vec<ActivityId>>,
}

impl CandidateCache {
    fn put_data(&mut self, id: ActivityId, data: Arc<CandidateData>) {
        if self.data.len() >= CANDIDATE_CACHE_MAX {
            self.data.clear();
        }
        self.data.insert(id, data);
    }

    /// Caches a posting list as read at generation `read_at`.
    fn put_postings(&mut self, list: (Postings, u64), ids: Vec<ActivityId>, read_at: u64) {
        if read_at != self.generation {
            return;
        }
        if self.postings.len() >= POSTINGS_CACHE_MAX {
            self.postings.clear();
        }
        self.postings.insert(list, ids);
    }

    /// What a commit wrote for `e`: its data, and its id in the cached
    /// lists it joins (a list not cached is read whole when asked for).
    pub(super) fn committed(&mut self, e: &IndexEntry) {
        self.put_data(e.activity, e.candidate.data.clone());
        let lists = (e.buckets.iter().map(|b| (Postings::Bucket, *b)))
            .chain(e.shingle_keys.iter().map(|h| (Postings::Shingle, *h)));
        for list in lists {
            if let Some(ids) = self.postings.get_mut(&list) {
                list.0.add(ids, e.activity);
            }
        }
    }
}

/// Regarding records by activity, as last written.
///
/// A writer (commit, `update_activity`) puts what it wrote after applying
/// its batch and bumps `generation`. A reader that missed reads the
/// backend and caches what it read only when `generation` did not move
/// meanwhile: otherwise a value read just before a re-point could land
/// after the writer's and stay stale.
#[derive(Default)]
pub(super) struct RegardingCache {
    pub(super) generation: u64,
    map: HashMap<ActivityId, Option<RecordRef>>,
}

impl RegardingCache {
    fn put(&mut self, id: ActivityId, regarding: Option<RecordRef>) {
        if self.map.len() >= REGARDING_CACHE_MAX {
            self.map.clear();
        }
        self.map.insert(id, regarding);
    }

    /// What a writer wrote.
    pub(super) fn written(
        &mut self,
        entries: impl Iterator<Item = (ActivityId, Option<RecordRef>)>,
    ) {
        self.generation += 1;
        for (id, r) in entries {
            self.put(id, r);
        }
    }
}

impl<B: KvBackend> KvStore<B> {
    pub(super) fn regarding(&self) -> MutexGuard<'_, RegardingCache> {
        // Entries are inserted whole, so a poisoned cache is still consistent.
        self.regarding_cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// The regarding record of an activity (`None`: no such activity):
    /// cache, then `r/`, then the activity itself (stores written before
    /// `r/` existed).
    fn regarding_of(&self, id: ActivityId) -> Result<Option<Option<RecordRef>>, StoreError> {
        let read_at = {
            let cache = self.regarding();
            if let Some(r) = cache.map.get(&id) {
                return Ok(Some(r.clone()));
            }
            cache.generation
        };
        let r = match self.get_json::<Option<RecordRef>>(&id_key("r/", id))? {
            Some(r) => r,
            None => match self.get_json::<crate::model::EmailActivity>(&id_key("a/", id))? {
                Some(a) => a.regarding,
                None => return Ok(None),
            },
        };
        let mut cache = self.regarding();
        if cache.generation == read_at {
            cache.put(id, r.clone());
        }
        Ok(Some(r))
    }

    pub(super) fn candidates(&self) -> MutexGuard<'_, CandidateCache> {
        // Entries are inserted whole, so a poisoned cache is still consistent.
        self.candidate_cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// What a lookup reads of a posting list ([`Postings`]): cached, or
    /// read from its keys (values unread) and cached.
    fn posting_ids(&self, kind: Postings, list: u64) -> Result<Vec<ActivityId>, StoreError> {
        let read_at = {
            let cache = self.candidates();
            if let Some(ids) = cache.postings.get(&(kind, list)) {
                return Ok(ids.clone());
            }
            cache.generation
        };
        let prefix = kind.list_prefix(list);
        let order = match kind {
            Postings::Bucket => ScanOrder::Descending,
            Postings::Shingle => ScanOrder::Ascending,
        };
        let mut ids = self
            .kv
            .scan_keys(&KeyRange::prefix(&prefix), order, kind.limit())?
            .iter()
            .map(|k| read_id(&k[prefix.len()..]))
            .collect::<Result<Vec<_>, _>>()?;
        if kind == Postings::Bucket {
            ids.reverse();
        }
        self.candidates()
            .put_postings((kind, list), ids.clone(), read_at);
        Ok(ids)
    }

    /// A candidate's data: cached, or decoded from the entry at `key` (its
    /// `sb/` or `sc/` one) and cached. Data never changes once written, so
    /// what was read is right whenever it is cached.
    fn candidate_data(
        &self,
        id: ActivityId,
        key: impl FnOnce() -> Vec<u8>,
    ) -> Result<Option<Arc<CandidateData>>, StoreError> {
        if let Some(d) = self.candidates().data.get(&id) {
            return Ok(Some(d.clone()));
        }
        let Some(c) = self.get_json::<SmartCandidate>(&key())? else {
            return Ok(None);
        };
        self.candidates().put_data(id, c.data.clone());
        Ok(Some(c.data))
    }

    /// The tracked email known under a Message-ID.
    fn tracked_by_message_id(&self, id: &str) -> Result<Option<TrackedEmail>, StoreError> {
        match self.get_id(&mid_key(id))? {
            Some(aid) => self.tracked(aid),
            None => Ok(None),
        }
    }

    fn tracked(&self, id: ActivityId) -> Result<Option<TrackedEmail>, StoreError> {
        Ok(self.regarding_of(id)?.map(|regarding| TrackedEmail {
            activity: id,
            regarding,
        }))
    }

    pub(super) fn tracked_by_ids(
        &self,
        ids: &[String],
    ) -> Result<HashMap<String, TrackedEmail>, StoreError> {
        let mut out = HashMap::new();
        for id in ids {
            if let Some(t) = self.tracked_by_message_id(id)? {
                out.insert(crate::correlate::normalize_message_id(id), t);
            }
        }
        Ok(out)
    }

    pub(super) fn lookup_keys_into(
        &self,
        keys: &LookupKeys,
        idx: &mut Indexes<'_>,
    ) -> Result<(), StoreError> {
        // Found by `lookup_keys` already; the token method reuses them.
        idx.derived = Some(keys.derived.clone());
        // In order, up to the first tracked one (see `LookupKeys`): a long
        // References chain costs one read when In-Reply-To is tracked.
        for id in &keys.message_ids {
            if let Some(t) = self.tracked_by_message_id(id)? {
                idx.by_message_id.entry(id.clone()).or_insert(t);
                break;
            }
        }
        for d in &keys.token_digits {
            if let Some(aid) = self.get_id(&key("t/", &[d.as_bytes()]))? {
                if let Some(t) = self.tracked(aid)? {
                    idx.by_token.insert(d.clone(), t);
                }
            }
        }
        if let Some(root) = &keys.thread_root {
            if let Some(aid) = self.get_id(&key("x/", &[root.as_bytes()]))? {
                if let Some(t) = self.tracked(aid)? {
                    idx.by_thread_root.insert(root.clone(), t);
                }
            }
        }
        for bucket in &keys.buckets {
            let ids = self.posting_ids(Postings::Bucket, *bucket)?;
            // Ids grow with time: newest first, as the scan gave them.
            for aid in ids.into_iter().rev() {
                if idx.candidates.iter().any(|x| x.activity == aid) {
                    continue;
                }
                let Some(data) = self.candidate_data(aid, || Postings::Bucket.key(*bucket, aid))?
                else {
                    continue;
                };
                idx.candidates.push(SmartCandidate {
                    activity: aid,
                    regarding: self.regarding_of(aid)?.flatten(),
                    data,
                });
            }
        }
        for h in &keys.shingles {
            let mut postings = Vec::new();
            for aid in self.posting_ids(Postings::Shingle, *h)? {
                if let Some(t) = self.tracked(aid)? {
                    postings.push(t);
                }
            }
            if !postings.is_empty() {
                idx.by_shingle.insert(*h, postings);
            }
        }
        for (aid, _) in shingle_candidate_ids(&idx.by_shingle) {
            if idx.candidates.iter().any(|x| x.activity == aid) {
                continue;
            }
            if let Some(data) = self.candidate_data(aid, || id_key("sc/", aid))? {
                idx.candidates.push(SmartCandidate {
                    activity: aid,
                    regarding: self.regarding_of(aid)?.flatten(),
                    data,
                });
            }
        }
        Ok(())
    }

    pub(super) fn count_automatic(
        &self,
        mailbox: &str,
        pair: &str,
        since: UnixTime,
        max: usize,
    ) -> Result<usize, StoreError> {
        if max == 0 {
            return Ok(0);
        }
        let prefix = automatic_prefix(mailbox, pair);
        let mut from = prefix.clone();
        from.extend_from_slice(&sortable_time(since));
        let range = KeyRange::prefix_from(&prefix, from);
        Ok(self.kv.scan_keys(&range, ScanOrder::Ascending, max)?.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_read_while_a_commit_ran_is_not_cached() {
        let mut cache = CandidateCache::default();
        let read_at = cache.generation;
        cache.generation += 1;
        cache.put_postings((Postings::Bucket, 7), vec![1], read_at);
        assert!(cache.postings.is_empty());
        cache.put_postings((Postings::Bucket, 7), vec![1, 2], cache.generation);
        assert_eq!(cache.postings[&(Postings::Bucket, 7)], vec![1, 2]);
    }

    #[test]
    fn posting_lists_keep_what_a_lookup_reads() {
        let mut newest: Vec<u64> = (1..=MAX_CANDIDATES_PER_BUCKET as u64)
            .map(|i| i * 2)
            .collect();
        Postings::Bucket.add(&mut newest, 5);
        assert_eq!(newest.len(), MAX_CANDIDATES_PER_BUCKET);
        assert_eq!(newest[..3], [4, 5, 6]);
        Postings::Bucket.add(&mut newest, 5);
        assert_eq!(newest.len(), MAX_CANDIDATES_PER_BUCKET);
        let mut oldest: Vec<u64> = (1..=MAX_SHINGLE_POSTINGS as u64).map(|i| i * 2).collect();
        Postings::Shingle.add(&mut oldest, 5);
        assert_eq!(oldest.len(), MAX_SHINGLE_POSTINGS);
        assert_eq!(oldest[..4], [2, 4, 5, 6]);
        assert_eq!(oldest.last(), Some(&(2 * MAX_SHINGLE_POSTINGS as u64 - 2)));
    }

    /// A regarding record read from the backend just before a re-point
    /// must not land in the cache after the writer's value.
    #[test]
    fn a_regarding_read_while_a_write_ran_is_not_cached() {
        let store = KvStore::new(crate::store::MemBackend::new()).unwrap();
        let read_at = store.regarding().generation;
        store
            .regarding()
            .written(std::iter::once((7, Some("case:new".parse().unwrap()))));
        // What the stale reader would do after reading the backend:
        let mut cache = store.regarding();
        if cache.generation == read_at {
            cache.put(7, Some("case:old".parse().unwrap()));
        }
        assert_eq!(cache.map[&7], Some("case:new".parse().unwrap()));
    }
}
