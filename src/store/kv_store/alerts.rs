//! Alerts: one open alert per (subject, kind), updated while its condition
//! lasts, resolved when it clears, acknowledged by an operator.

use super::keys::{alert_identity, decode, encode, id_key, key, read_id};
use super::KvStore;
use crate::model::{Alert, NewAlert, UnixTime};
use crate::store::kv::{KeyRange, KvBackend, ScanOrder, WriteBatch};
use crate::store::{kind_covers, AlertQuery, StoreError};

impl<B: KvBackend> KvStore<B> {
    pub(super) fn raise(&self, new: NewAlert<'_>, at: UnixTime) -> Result<Alert, StoreError> {
        let _writer = self.lock();
        let ident = alert_identity(new.mailbox, new.profile, new.kind);
        let alert = match self.get_id(&ident)? {
            Some(id) => match self.get_json::<Alert>(&id_key("l/", id))? {
                Some(mut a) => {
                    a.count += 1;
                    a.last_seen = at;
                    if new.level < a.level {
                        // Escalated (Error sorts first): an acknowledgement
                        // of the milder condition does not cover it.
                        a.acknowledged_at = None;
                    }
                    a.level = new.level;
                    a.text = new.text.to_string();
                    a
                }
                None => {
                    return Err(StoreError::Corrupt(format!(
                        "alert {id} is indexed but missing"
                    )))
                }
            },
            None => Alert {
                id: self.next_id()?,
                level: new.level,
                kind: new.kind.to_string(),
                mailbox: new.mailbox.map(str::to_string),
                profile: new.profile.map(str::to_string),
                text: new.text.to_string(),
                first_seen: at,
                last_seen: at,
                count: 1,
                resolved_at: None,
                acknowledged_at: None,
            },
        };
        let mut b = WriteBatch::default();
        b.put(ident, alert.id.to_be_bytes());
        b.put(id_key("l/", alert.id), encode(&alert)?);
        self.write_durably(b)?;
        Ok(alert)
    }

    pub(super) fn alert_list(&self, q: &AlertQuery) -> Result<Vec<Alert>, StoreError> {
        let mut all = Vec::new();
        for (k, v) in self
            .kv
            .scan(&KeyRange::prefix(b"l/"), ScanOrder::Ascending, 0)?
        {
            let a = decode::<Alert>(&k, &v)?;
            if q.matches(&a) {
                all.push(a);
            }
        }
        all.sort_by(|a, b| b.last_seen.cmp(&a.last_seen).then(b.id.cmp(&a.id)));
        all.truncate(q.limit.max(1));
        Ok(all)
    }

    pub(super) fn resolve(
        &self,
        subject: &str,
        kind: &str,
        at: UnixTime,
    ) -> Result<u64, StoreError> {
        let _writer = self.lock();
        let mut b = WriteBatch::default();
        let mut resolved = 0u64;
        // Only open alerts have a key under `lj/`: the subject's keys are
        // exactly its open alerts, found without reading the others (this
        // runs at every recovery of every mailbox).
        for scope in ["m", "p", "d"] {
            let prefix = key("lj/", &[scope.as_bytes(), subject.as_bytes(), b""]);
            for (k, v) in self
                .kv
                .scan(&KeyRange::prefix(&prefix), ScanOrder::Ascending, 0)?
            {
                let Ok(this_kind) = std::str::from_utf8(&k[prefix.len()..]) else {
                    continue;
                };
                if !kind_covers(kind, this_kind) {
                    continue;
                }
                let id = read_id(&v)?;
                let row = id_key("l/", id);
                b.delete(k);
                let Some(mut a) = self.get_json::<Alert>(&row)? else {
                    continue;
                };
                a.resolved_at = Some(at);
                b.put(row, encode(&a)?);
                resolved += 1;
            }
        }
        if resolved > 0 {
            self.write_durably(b)?;
        }
        Ok(resolved)
    }

    pub(super) fn acknowledge(&self, id: u64, at: UnixTime) -> Result<Option<Alert>, StoreError> {
        let _writer = self.lock();
        let k = id_key("l/", id);
        let Some(mut a) = self.get_json::<Alert>(&k)? else {
            return Ok(None);
        };
        if a.acknowledged_at.is_none() {
            a.acknowledged_at = Some(at);
            let mut b = WriteBatch::default();
            b.put(k, encode(&a)?);
            self.write_durably(b)?;
        }
        Ok(Some(a))
    }
}
