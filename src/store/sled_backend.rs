//! The embedded default backend on sled: one tree (`crm-mailsync`), the
//! keys as the semantic layer writes them, one `apply_batch` per
//! [`WriteBatch`], `flush` for durability. The only place sled's types
//! appear.

use std::path::Path;

use super::kv::{Entry, KeyRange, KvBackend, ScanOrder, WriteBatch};
use super::StoreError;

/// The name of the one tree every key lives in (kept: existing stores).
const TREE: &str = "crm-mailsync";

/// sled behind [`KvBackend`].
pub struct SledBackend {
    db: sled::Db,
    tree: sled::Tree,
}

/// sled's errors as the store's: a held file lock is [`StoreError::Locked`]
/// (another process runs on this store), corruption is permanent, the rest
/// is I/O that may recover.
fn io(e: sled::Error) -> StoreError {
    match e {
        sled::Error::Io(ioe)
            if ioe.kind() == std::io::ErrorKind::WouldBlock || ioe.to_string().contains("lock") =>
        {
            StoreError::Locked(ioe.to_string())
        }
        sled::Error::Corruption { .. } => StoreError::Corrupt(e.to_string()),
        other => StoreError::Io(other.to_string()),
    }
}

impl SledBackend {
    /// Opens (creating if needed) the store at `path` with a page cache of
    /// `cache_mb` MiB (sled's own default, 1 GiB, is far too much beside other
    /// services). A directory it creates is 0700 whatever the umask.
    pub fn open(path: &Path, cache_mb: u64) -> Result<Self, StoreError> {
        crate::private_fs::create_dir_all(path)
            .map_err(|e| StoreError::Io(format!("cannot create {}: {e}", path.display())))?;
        let db = sled::Config::new()
            .path(path)
            .mode(sled::Mode::HighThroughput)
            .cache_capacity(cache_mb.saturating_mul(1024 * 1024))
            .open()
            .map_err(io)?;
        let tree = db.open_tree(TREE).map_err(io)?;
        Ok(SledBackend { db, tree })
    }

    /// Runs `f` over the range's entries in order, up to `limit` (0: all).
    fn each(
        &self,
        range: &KeyRange,
        order: ScanOrder,
        limit: usize,
        mut f: impl FnMut(sled::IVec, sled::IVec),
    ) -> Result<(), StoreError> {
        // sled panics on a range whose end lies before its start.
        if range.is_empty() {
            return Ok(());
        }
        let it = match &range.end {
            Some(end) => self.tree.range(range.start.as_slice()..end.as_slice()),
            None => self.tree.range(range.start.as_slice()..),
        };
        let limit = if limit == 0 { usize::MAX } else { limit };
        match order {
            ScanOrder::Ascending => {
                for kv in it.take(limit) {
                    let (k, v) = kv.map_err(io)?;
                    f(k, v);
                }
            }
            ScanOrder::Descending => {
                for kv in it.rev().take(limit) {
                    let (k, v) = kv.map_err(io)?;
                    f(k, v);
                }
            }
        }
        Ok(())
    }
}

impl KvBackend for SledBackend {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.tree.get(key).map_err(io)?.map(|v| v.to_vec()))
    }

    fn contains(&self, key: &[u8]) -> Result<bool, StoreError> {
        self.tree.contains_key(key).map_err(io)
    }

    fn scan(
        &self,
        range: &KeyRange,
        order: ScanOrder,
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        let mut out = Vec::new();
        self.each(range, order, limit, |k, v| {
            out.push((k.to_vec(), v.to_vec()))
        })?;
        Ok(out)
    }

    fn scan_keys(
        &self,
        range: &KeyRange,
        order: ScanOrder,
        limit: usize,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut out = Vec::new();
        self.each(range, order, limit, |k, _| out.push(k.to_vec()))?;
        Ok(out)
    }

    fn count(&self, range: &KeyRange) -> Result<u64, StoreError> {
        let mut n = 0;
        self.each(range, ScanOrder::Ascending, 0, |_, _| n += 1)?;
        Ok(n)
    }

    fn apply(&self, batch: WriteBatch) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut b = sled::Batch::default();
        for (k, v) in batch.into_writes() {
            match v {
                Some(v) => b.insert(k, v),
                None => b.remove(k),
            }
        }
        self.tree.apply_batch(b).map_err(io)
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map_err(io)?;
        Ok(())
    }

    fn generate_id(&self) -> Result<u64, StoreError> {
        self.db.generate_id().map_err(io)
    }
}
