//! The record directory (`rc/`), its address index (`ra/`), the delta
//! cursors (`rk/`) and the unresolved-party lookup (`pu/`).

use std::collections::HashMap;

use super::keys::{
    address_key, decode, encode, key, list_prefix, normalize_address, read_id, record_addresses,
    record_key,
};
use super::KvStore;
use crate::model::{ActivityId, Record, UnixTime};
use crate::store::kv::{KeyRange, KvBackend, ScanOrder, WriteBatch};
use crate::store::{RecordChanges, StoreError};

/// `rc/<kind>\0` or, for every kind, `rc/`.
fn kind_prefix(kind: Option<&str>) -> Vec<u8> {
    match kind {
        Some(k) => list_prefix("rc/", k),
        None => b"rc/".to_vec(),
    }
}

impl<B: KvBackend> KvStore<B> {
    pub(super) fn upsert(
        &self,
        records: Vec<Record>,
        deleted: &[(String, String)],
        cursor: Option<(&str, &str)>,
        at: UnixTime,
    ) -> Result<RecordChanges, StoreError> {
        let _writer = self.lock();
        let mut b = WriteBatch::default();
        let mut changes = RecordChanges::default();
        // Later entries for the same record win, as in a file read top down
        // (records given after the deletions).
        let mut staged: HashMap<Vec<u8>, Option<Record>> = HashMap::new();
        let mut order = Vec::new();
        let deletions = deleted
            .iter()
            .map(|(kind, id)| (record_key(kind, id), None));
        let upserts = records
            .into_iter()
            .map(|r| (record_key(&r.kind, &r.id), Some(r)));
        for (k, r) in deletions.chain(upserts) {
            if !staged.contains_key(&k) {
                order.push(k.clone());
            }
            staged.insert(k, r);
        }
        for k in order {
            let Some(new) = staged.remove(&k) else {
                continue;
            };
            let old: Option<Record> = self.get_json(&k)?;
            match (old, new) {
                (None, None) => {}
                (Some(old), None) => {
                    for a in record_addresses(&old) {
                        b.delete(address_key(&a, &old.kind, &old.id));
                    }
                    b.delete(k);
                    changes.deleted += 1;
                }
                (old, Some(mut new)) => {
                    if let Some(o) = &old {
                        let mut same = new.clone();
                        same.updated_at = o.updated_at;
                        if &same == o {
                            changes.unchanged += 1;
                            continue;
                        }
                        let keep = record_addresses(&new);
                        for a in record_addresses(o).difference(&keep) {
                            b.delete(address_key(a, &o.kind, &o.id));
                        }
                        changes.updated += 1;
                    } else {
                        changes.inserted += 1;
                    }
                    for a in record_addresses(&new) {
                        b.put(address_key(&a, &new.kind, &new.id), Vec::new());
                    }
                    new.updated_at = at;
                    b.put(k, encode(&new)?);
                }
            }
        }
        if let Some((consumer, c)) = cursor {
            b.put(key("rk/", &[consumer.as_bytes()]), c.as_bytes());
        }
        if !b.is_empty() {
            self.write_durably(b)?;
        }
        Ok(changes)
    }

    pub(super) fn records_at(&self, address: &str) -> Result<Vec<Record>, StoreError> {
        let a = normalize_address(address);
        if a.is_empty() {
            return Ok(Vec::new());
        }
        let prefix = list_prefix("ra/", &a);
        let mut out = Vec::new();
        for k in self
            .kv
            .scan_keys(&KeyRange::prefix(&prefix), ScanOrder::Ascending, 0)?
        {
            let rest = &k[prefix.len()..];
            let Some(z) = rest.iter().position(|b| *b == 0) else {
                return Err(StoreError::Corrupt("address index key without kind".into()));
            };
            let kind = String::from_utf8_lossy(&rest[..z]);
            let id = String::from_utf8_lossy(&rest[z + 1..]);
            if let Some(r) = self.get_json(&record_key(&kind, &id))? {
                out.push(r);
            }
        }
        Ok(out)
    }

    pub(super) fn record_page(
        &self,
        kind: Option<&str>,
        after: Option<(&str, &str)>,
        limit: usize,
    ) -> Result<Vec<Record>, StoreError> {
        let prefix = kind_prefix(kind);
        let start = match after {
            Some((k, id)) => {
                let mut s = record_key(k, id);
                // Just past it.
                s.push(0);
                s.max(prefix.clone())
            }
            None => prefix.clone(),
        };
        self.kv
            .scan(
                &KeyRange::prefix_from(&prefix, start),
                ScanOrder::Ascending,
                limit,
            )?
            .iter()
            .map(|(k, v)| decode(k, v))
            .collect()
    }

    pub(super) fn record_count(&self, kind: Option<&str>) -> Result<u64, StoreError> {
        self.kv.count(&KeyRange::prefix(&kind_prefix(kind)))
    }

    pub(super) fn cursor_of(&self, consumer: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .kv
            .get(&key("rk/", &[consumer.as_bytes()]))?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    pub(super) fn unresolved_at(&self, address: &str) -> Result<Vec<ActivityId>, StoreError> {
        let a = normalize_address(address);
        if a.is_empty() {
            return Ok(Vec::new());
        }
        let prefix = list_prefix("pu/", &a);
        self.kv
            .scan_keys(&KeyRange::prefix(&prefix), ScanOrder::Ascending, 0)?
            .iter()
            .map(|k| read_id(&k[prefix.len()..]))
            .collect()
    }
}
