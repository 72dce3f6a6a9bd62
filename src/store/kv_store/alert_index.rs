//! The two alert indexes and the retention of resolved alerts.
//!
//! `lo/<id>` (empty) lists the open alerts, so the common query (the web
//! page and the alert monitor ask for open alerts every few seconds) reads
//! only those, however many resolved ones are kept. `lr/<resolved_at><id>`
//! (empty, the time sign-flipped so it sorts) lists the resolved ones oldest
//! first, and `lrn` counts them: pruning by age or by count reads only the
//! entries it deletes. Both are written in the batch that opens, resolves or
//! prunes an alert.
//!
//! Resolved alerts are pruned past [`AlertRetention`]: older than its age,
//! or beyond the newest `keep`. Open alerts are never pruned (they are not
//! in `lr/`). A resolve prunes what is due in its own batch (a bounded
//! number), [`Store::prune_resolved_alerts`](crate::store::Store) the rest.

use super::keys::{decode, id_key, read_id, sortable_time};
use super::KvStore;
use crate::model::{Alert, UnixTime};
use crate::store::kv::{KeyRange, KvBackend, ScanOrder, WriteBatch};
use crate::store::{AlertRetention, StoreError};

/// Prefix of the open alert index.
pub(super) const OPEN: &str = "lo/";
/// Prefix of the resolved alert index.
const RESOLVED: &str = "lr/";
/// Key of how many entries `lr/` holds.
const RESOLVED_COUNT: &[u8] = b"lrn";
/// The most resolved alerts one write of a prune pass deletes (a pass
/// writes as many as it needs, releasing the writer lock between them).
const PRUNE_BATCH: usize = 1_000;
/// What a resolve prunes at most beyond the alerts it resolves itself.
const PRUNE_WITH_RESOLVE: usize = 64;

/// `lr/<resolved_at><id>`.
pub(super) fn resolved_key(at: UnixTime, id: u64) -> Vec<u8> {
    let mut k = RESOLVED.as_bytes().to_vec();
    k.extend_from_slice(&sortable_time(at));
    k.extend_from_slice(&id.to_be_bytes());
    k
}

/// Builds the indexes of a store written before them (alerts, no count):
/// every alert row once, in one batch. A store without alerts gets nothing,
/// so a reopen before the first resolve repeats this over its open alerts
/// only (it rewrites the same keys).
pub(super) fn index_existing<B: KvBackend>(kv: &B) -> Result<(), StoreError> {
    if kv.get(RESOLVED_COUNT)?.is_some() {
        return Ok(());
    }
    let rows = kv.scan(&KeyRange::prefix(b"l/"), ScanOrder::Ascending, 0)?;
    if rows.is_empty() {
        return Ok(());
    }
    let mut b = WriteBatch::default();
    let mut resolved = 0u64;
    for (k, v) in rows {
        let a = decode::<Alert>(&k, &v)?;
        match a.resolved_at {
            None => b.put(id_key(OPEN, a.id), Vec::new()),
            Some(t) => {
                b.put(resolved_key(t, a.id), Vec::new());
                resolved += 1;
            }
        }
    }
    b.put(RESOLVED_COUNT, resolved.to_be_bytes());
    kv.apply(b)?;
    kv.flush()
}

impl<B: KvBackend> KvStore<B> {
    /// How many resolved alerts the store keeps (`lrn`).
    pub(super) fn resolved_count(&self) -> Result<u64, StoreError> {
        Ok(self.get_id(RESOLVED_COUNT)?.unwrap_or(0))
    }

    /// Adds to `b` what a resolve of `ids` at `at` writes to the indexes
    /// (`count` resolved alerts stored before it), and the prune of what is
    /// then due, with the new count.
    pub(super) fn stage_resolved(
        &self,
        b: &mut WriteBatch,
        ids: &[u64],
        at: UnixTime,
    ) -> Result<(), StoreError> {
        for id in ids {
            b.delete(id_key(OPEN, *id));
            b.put(resolved_key(at, *id), Vec::new());
        }
        let count = self.resolved_count()? + ids.len() as u64;
        let (count, _) = self.stage_prune(b, count, at, ids.len() + PRUNE_WITH_RESOLVE)?;
        b.put(RESOLVED_COUNT, count.to_be_bytes());
        Ok(())
    }

    /// Adds to `b` the deletion of at most `limit` stored resolved alerts
    /// due at `now`, oldest resolved first: those resolved before `now`
    /// minus the retention age, and the oldest beyond the newest `keep` of
    /// `count`. Returns the count left and how many went.
    fn stage_prune(
        &self,
        b: &mut WriteBatch,
        count: u64,
        now: UnixTime,
        limit: usize,
    ) -> Result<(u64, u64), StoreError> {
        let AlertRetention { max_age, keep } = self.alert_retention();
        let excess = count.saturating_sub(keep);
        let age = i64::try_from(max_age.as_secs()).unwrap_or(i64::MAX);
        let too_old = resolved_key(now.saturating_sub(age), 0);
        // Without an excess only the entries before the cutoff can go: an
        // empty range, one seek, on nearly every resolve.
        let range = if excess > 0 {
            KeyRange::prefix(RESOLVED.as_bytes())
        } else {
            KeyRange::between(RESOLVED.as_bytes().to_vec(), too_old.clone())
        };
        let mut pruned = 0u64;
        for k in self.kv.scan_keys(&range, ScanOrder::Ascending, limit)? {
            if pruned >= excess && k >= too_old {
                break;
            }
            let id = read_id(&k[k.len().saturating_sub(8)..])?;
            b.delete(id_key("l/", id));
            b.delete(k);
            pruned += 1;
        }
        Ok((count.saturating_sub(pruned), pruned))
    }

    /// See [`crate::store::Store::prune_resolved_alerts`].
    pub(super) fn prune_resolved(&self, now: UnixTime) -> Result<u64, StoreError> {
        let mut total = 0;
        loop {
            let _writer = self.lock();
            let mut b = WriteBatch::default();
            let (count, pruned) =
                self.stage_prune(&mut b, self.resolved_count()?, now, PRUNE_BATCH)?;
            if pruned == 0 {
                return Ok(total);
            }
            b.put(RESOLVED_COUNT, count.to_be_bytes());
            self.write_durably(b)?;
            total += pruned;
            if pruned < PRUNE_BATCH as u64 {
                return Ok(total);
            }
        }
    }

    /// The open alerts, by id (an alert indexed but missing is skipped).
    pub(super) fn open_alerts(&self) -> Result<Vec<Alert>, StoreError> {
        let mut open = Vec::new();
        for k in self
            .kv
            .scan_keys(&KeyRange::prefix(OPEN.as_bytes()), ScanOrder::Ascending, 0)?
        {
            let id = read_id(&k[OPEN.len()..])?;
            if let Some(a) = self.get_json::<Alert>(&id_key("l/", id))? {
                open.push(a);
            }
        }
        Ok(open)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::model::{AlertLevel, NewAlert};
    use crate::store::kv::{Entry, MemBackend};
    use crate::store::{AlertQuery, AlertState, Store};

    /// [`MemBackend`] counting the rows it hands out (a get that finds one
    /// and every entry a scan returns): what a query reads, not its time.
    #[derive(Clone, Default)]
    struct Counting {
        inner: MemBackend,
        rows: Arc<AtomicU64>,
    }

    impl KvBackend for Counting {
        fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
            let v = self.inner.get(key)?;
            self.rows
                .fetch_add(u64::from(v.is_some()), Ordering::Relaxed);
            Ok(v)
        }
        fn scan(
            &self,
            range: &KeyRange,
            order: ScanOrder,
            limit: usize,
        ) -> Result<Vec<Entry>, StoreError> {
            let found = self.inner.scan(range, order, limit)?;
            self.rows.fetch_add(found.len() as u64, Ordering::Relaxed);
            Ok(found)
        }
        fn apply(&self, batch: WriteBatch) -> Result<(), StoreError> {
            self.inner.apply(batch)
        }
        fn flush(&self) -> Result<(), StoreError> {
            Ok(())
        }
        fn generate_id(&self) -> Result<u64, StoreError> {
            self.inner.generate_id()
        }
    }

    fn raise_and_resolve<B: KvBackend>(s: &KvStore<B>, mailbox: &str, at: UnixTime) {
        s.raise_alert(
            NewAlert {
                kind: "t",
                level: AlertLevel::Warning,
                mailbox: Some(mailbox),
                profile: None,
                text: "transient",
            },
            at,
        )
        .unwrap();
        assert_eq!(s.resolve_alerts(mailbox, "t", at + 1).unwrap(), 1);
    }

    fn keep(n: u64) -> AlertRetention {
        AlertRetention {
            max_age: Duration::from_secs(3_650 * 86_400),
            keep: n,
        }
    }

    /// 50,000 resolved and 10 open alerts: the open query reads the 10
    /// index keys and the 10 rows; every alert (what the open query read
    /// before the index) is 50,010 rows.
    #[test]
    fn the_open_query_reads_only_the_open_alerts() {
        let kv = Counting::default();
        let s = KvStore::new(kv.clone()).unwrap();
        s.set_alert_retention(keep(100_000));
        for i in 0..50_000 {
            raise_and_resolve(&s, &format!("m{i}"), i);
        }
        for i in 0..10 {
            s.raise_alert(
                NewAlert {
                    kind: "t",
                    level: AlertLevel::Error,
                    mailbox: Some(&format!("open{i}")),
                    profile: None,
                    text: "down",
                },
                60_000,
            )
            .unwrap();
        }
        let read = |q: &AlertQuery| {
            kv.rows.store(0, Ordering::Relaxed);
            let n = s.query_alerts(q).unwrap().len();
            (n, kv.rows.load(Ordering::Relaxed))
        };
        let open = read(&AlertQuery {
            state: Some(AlertState::Open),
            limit: 1_000,
            ..Default::default()
        });
        let all = read(&AlertQuery::latest(100_000));
        eprintln!("state=open: {} alerts, {} rows read", open.0, open.1);
        eprintln!("every alert: {} alerts, {} rows read", all.0, all.1);
        assert_eq!(open, (10, 20));
        assert_eq!(all, (50_010, 50_010));
    }

    /// A pass prunes everything due, over several batches.
    #[test]
    fn a_prune_pass_goes_on_past_one_batch() {
        let s = KvStore::new(MemBackend::new()).unwrap();
        s.set_alert_retention(keep(100_000));
        let n = 2 * PRUNE_BATCH as i64 + 500;
        for i in 0..n {
            raise_and_resolve(&s, &format!("m{i}"), i);
        }
        s.set_alert_retention(keep(10));
        assert_eq!(s.prune_resolved_alerts(n).unwrap(), n as u64 - 10);
        assert_eq!(s.resolved_count().unwrap(), 10);
        let left = s.alerts(100_000).unwrap();
        assert_eq!(left.len(), 10);
        assert!(left.iter().all(|a| a.last_seen >= n - 10), "the newest");
    }

    /// A resolve prunes at most its own count plus a few: a store far past
    /// its bounds is trimmed by the pass, not by one slow resolve.
    #[test]
    fn a_resolve_prunes_a_bounded_number() {
        let s = KvStore::new(MemBackend::new()).unwrap();
        s.set_alert_retention(keep(100_000));
        for i in 0..200 {
            raise_and_resolve(&s, &format!("m{i}"), i);
        }
        s.set_alert_retention(keep(10));
        raise_and_resolve(&s, "last", 1_000);
        assert_eq!(
            s.resolved_count().unwrap(),
            201 - 1 - PRUNE_WITH_RESOLVE as u64
        );
        assert_eq!(
            s.alerts(100_000).unwrap().len() as u64,
            s.resolved_count().unwrap()
        );
    }
}
