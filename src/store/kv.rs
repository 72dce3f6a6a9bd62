//! The storage backend seam: an ordered key-value map with atomic write
//! batches, below the semantic layer ([`super::KvStore`]).
//!
//! Everything that keeps the store right (deduplication, re-pointing,
//! the event log and its numbering, the outbox, the indexes and the caches
//! in front of them) lives in the semantic layer and is written once. A
//! backend only has to keep bytes in key order and apply a batch of puts and
//! deletes all or nothing; [`super::conformance`] is the one test suite every
//! backend must pass unchanged.
//!
//! # What a backend promises
//! * [`KvBackend::get`] and the scans see every batch applied before them,
//!   and a batch either wholly or not at all (a reader never sees half of
//!   one). A scan need not be a snapshot across batches: the semantic layer
//!   never relies on that.
//! * Scans run in unsigned byte order of the keys, forward or reverse,
//!   within a [`KeyRange`] (start inclusive, end exclusive), at most `limit`
//!   entries (0: all).
//! * [`KvBackend::apply`] is atomic: after a crash the store holds the batch
//!   entirely or not at all. Within one batch the last write to a key wins
//!   ([`WriteBatch`] keeps only that one).
//! * [`KvBackend::flush`] returns once every applied batch is durable.
//!   `apply` need not be durable by itself (sled's is not: it buffers until
//!   `flush`); one that is makes `flush` a no-op.
//! * [`KvBackend::generate_id`] never returns the same id twice, also across
//!   restarts and crashes, and is strictly increasing within one process
//!   (gaps are fine).
//! * Only one process writes a store: the semantic layer caches what it
//!   reads. A backend that can be opened twice must refuse the second open
//!   ([`StoreError::Locked`]), as sled's file lock does.
//!
//! # A PostgreSQL backend
//! The trait maps onto one table, `kv (key bytea primary key, value bytea
//! not null)` (bytea compares as unsigned bytes, so `ORDER BY key` is this
//! order), and a sequence:
//! * `get`: `SELECT value FROM kv WHERE key = $1`;
//! * `scan`: `SELECT key, value FROM kv WHERE key >= $1 AND key < $2 ORDER
//!   BY key [DESC] LIMIT $3` (no upper bound when the range has none);
//!   `count`: the same with `count(*)`;
//! * `apply`: one transaction per batch, `INSERT … ON CONFLICT (key) DO
//!   UPDATE` for puts and `DELETE` for deletes, then `COMMIT` (durable with
//!   `synchronous_commit` on, so `flush` has nothing left to do);
//! * `generate_id`: `SELECT nextval('kv_ids')` (sequences never go back);
//! * the single writer: `pg_try_advisory_lock` held by the session, a failure
//!   mapped to [`StoreError::Locked`].
//!
//! [`SledBackend`](super::SledBackend) is the embedded default and the only
//! place sled's types appear; [`MemBackend`] keeps a `BTreeMap` in memory
//! (tests and the conformance suite; nothing survives the process).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use super::StoreError;

/// A key and its value.
pub type Entry = (Vec<u8>, Vec<u8>);

/// In which key order a scan runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanOrder {
    Ascending,
    Descending,
}

/// Keys from `start` (inclusive) up to `end` (exclusive; `None`: to the
/// last key), in unsigned byte order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRange {
    pub start: Vec<u8>,
    pub end: Option<Vec<u8>>,
}

impl KeyRange {
    /// Every key that starts with `prefix`.
    pub fn prefix(prefix: &[u8]) -> Self {
        KeyRange {
            start: prefix.to_vec(),
            end: prefix_end(prefix),
        }
    }

    /// Keys from `start` on, within `prefix` (`start` should begin with it).
    pub fn prefix_from(prefix: &[u8], start: Vec<u8>) -> Self {
        KeyRange {
            start,
            end: prefix_end(prefix),
        }
    }

    /// Keys from `start` (inclusive) to `end` (exclusive).
    pub fn between(start: Vec<u8>, end: Vec<u8>) -> Self {
        KeyRange {
            start,
            end: Some(end),
        }
    }

    /// Whether `key` lies in the range.
    pub fn contains(&self, key: &[u8]) -> bool {
        key >= self.start.as_slice() && self.end.as_deref().is_none_or(|e| key < e)
    }

    /// Whether no key can lie in the range (its end is not after its start).
    pub fn is_empty(&self) -> bool {
        self.end
            .as_deref()
            .is_some_and(|e| e <= self.start.as_slice())
    }
}

/// The first key after every key that starts with `prefix` (`None`: there
/// is none, the prefix is empty or all `0xff`).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// Puts and deletes applied together by [`KvBackend::apply`]. A later write
/// to the same key replaces an earlier one of the batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteBatch {
    writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

impl WriteBatch {
    /// Sets `key` to `value`.
    pub fn put(&mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.writes.insert(key.into(), Some(value.into()));
    }

    /// Removes `key` (nothing happens if it is absent).
    pub fn delete(&mut self, key: impl Into<Vec<u8>>) {
        self.writes.insert(key.into(), None);
    }

    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    pub fn len(&self) -> usize {
        self.writes.len()
    }

    /// The writes in key order: `Some(value)` puts, `None` deletes.
    pub fn into_writes(self) -> impl Iterator<Item = (Vec<u8>, Option<Vec<u8>>)> {
        self.writes.into_iter()
    }
}

/// An ordered key-value map with atomic batches: all a storage backend has
/// to provide (see the module docs for the promises).
pub trait KvBackend: Send + Sync + 'static {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;

    fn contains(&self, key: &[u8]) -> Result<bool, StoreError> {
        Ok(self.get(key)?.is_some())
    }

    /// Entries within `range`, in `order`, at most `limit` (0: all).
    fn scan(
        &self,
        range: &KeyRange,
        order: ScanOrder,
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError>;

    /// The keys [`KvBackend::scan`] would return (a backend may skip
    /// reading the values).
    fn scan_keys(
        &self,
        range: &KeyRange,
        order: ScanOrder,
        limit: usize,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        Ok(self
            .scan(range, order, limit)?
            .into_iter()
            .map(|(k, _)| k)
            .collect())
    }

    /// How many keys lie within `range`.
    fn count(&self, range: &KeyRange) -> Result<u64, StoreError> {
        Ok(self.scan_keys(range, ScanOrder::Ascending, 0)?.len() as u64)
    }

    /// Applies every write of `batch`, all or nothing.
    fn apply(&self, batch: WriteBatch) -> Result<(), StoreError>;

    /// Makes every applied batch durable.
    fn flush(&self) -> Result<(), StoreError>;

    /// A fresh id, never returned before (see the module docs).
    fn generate_id(&self) -> Result<u64, StoreError>;
}

/// Backend in memory: a `BTreeMap` behind a lock. Cloning it shares the
/// map, so a clone opened by a second [`super::KvStore`] is that store
/// "reopened" (its caches gone, the data kept), as the conformance suite
/// needs.
#[derive(Debug, Clone, Default)]
pub struct MemBackend {
    inner: Arc<MemInner>,
}

#[derive(Debug, Default)]
struct MemInner {
    map: RwLock<BTreeMap<Vec<u8>, Vec<u8>>>,
    ids: AtomicU64,
}

impl MemBackend {
    pub fn new() -> Self {
        Self::default()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<Vec<u8>, Vec<u8>>> {
        // A batch is applied under the write guard without anything that
        // can panic half-way, so a poisoned map is still whole.
        self.inner.map.read().unwrap_or_else(|p| p.into_inner())
    }

    fn range<'a>(
        map: &'a BTreeMap<Vec<u8>, Vec<u8>>,
        range: &KeyRange,
    ) -> Box<dyn DoubleEndedIterator<Item = (&'a Vec<u8>, &'a Vec<u8>)> + 'a> {
        use std::ops::Bound;
        if range.is_empty() {
            return Box::new(std::iter::empty());
        }
        let end = match &range.end {
            Some(e) => Bound::Excluded(e.clone()),
            None => Bound::Unbounded,
        };
        Box::new(map.range((Bound::Included(range.start.clone()), end)))
    }
}

fn take_limit(limit: usize) -> usize {
    if limit == 0 {
        usize::MAX
    } else {
        limit
    }
}

impl KvBackend for MemBackend {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.read().get(key).cloned())
    }

    fn scan(
        &self,
        range: &KeyRange,
        order: ScanOrder,
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        let map = self.read();
        let it = Self::range(&map, range);
        let pair = |(k, v): (&Vec<u8>, &Vec<u8>)| (k.clone(), v.clone());
        Ok(match order {
            ScanOrder::Ascending => it.take(take_limit(limit)).map(pair).collect(),
            ScanOrder::Descending => it.rev().take(take_limit(limit)).map(pair).collect(),
        })
    }

    fn count(&self, range: &KeyRange) -> Result<u64, StoreError> {
        Ok(Self::range(&self.read(), range).count() as u64)
    }

    fn apply(&self, batch: WriteBatch) -> Result<(), StoreError> {
        let mut map = self.inner.map.write().unwrap_or_else(|p| p.into_inner());
        for (k, v) in batch.into_writes() {
            match v {
                Some(v) => {
                    map.insert(k, v);
                }
                None => {
                    map.remove(&k);
                }
            }
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn generate_id(&self) -> Result<u64, StoreError> {
        Ok(self.inner.ids.fetch_add(1, Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_the_first_key_after_the_prefix() {
        assert_eq!(prefix_end(b"a/"), Some(b"a0".to_vec()));
        assert_eq!(prefix_end(&[1, 0xff, 0xff]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xff, 0xff]), None);
        assert_eq!(prefix_end(b""), None);
        let r = KeyRange::prefix(&[7, 0xff]);
        assert!(r.contains(&[7, 0xff]) && r.contains(&[7, 0xff, 0xff, 3]));
        assert!(!r.contains(&[8]) && !r.contains(&[7, 0xfe, 0xff]));
    }

    #[test]
    fn a_later_write_to_a_key_replaces_an_earlier_one_of_the_batch() {
        let mut b = WriteBatch::default();
        b.put(b"k".to_vec(), b"1".to_vec());
        b.delete(b"k".to_vec());
        b.put(b"j".to_vec(), b"2".to_vec());
        b.delete(b"j".to_vec());
        b.put(b"j".to_vec(), b"3".to_vec());
        assert_eq!(b.len(), 2);
        assert_eq!(
            b.into_writes().collect::<Vec<_>>(),
            vec![(b"j".to_vec(), Some(b"3".to_vec())), (b"k".to_vec(), None)]
        );
    }
}
