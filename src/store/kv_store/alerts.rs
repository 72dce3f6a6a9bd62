//! Alerts: one open alert per (subject, kind), updated while its condition
//! lasts, resolved when it clears, acknowledged by an operator; and the
//! alert journal (`le/<seq>`, head `lh`): an entry in the same batch as
//! every write that makes an alert an Error.
//!
//! Journal seqs are allocated under the writer lock from
//! `Writer::last_alert_seq`, which moves only once the batch is applied;
//! readers see entries up to the seq made durable (the watch channel's
//! value, set after the flush), as with the event log. `lh` keeps the
//! newest seq, so pruning every entry never lets a seq (and the cursor
//! that passed it) be handed out again.

use super::alert_index::OPEN;
use super::keys::{alert_identity, decode, encode, id_key, key, read_id};
use super::KvStore;
use crate::alerts::kind::PROFILE_FAILING;
use crate::model::{Alert, AlertLevel, NewAlert, UnixTime};
use crate::store::kv::{KeyRange, KvBackend, ScanOrder, WriteBatch};
use crate::store::{kind_covers, AlertEvent, AlertEventKind, AlertQuery, AlertState, StoreError};

/// Key of the newest alert journal seq.
const JOURNAL_HEAD: &[u8] = b"lh";
/// Prefix of the alert journal.
const JOURNAL: &str = "le/";
/// The most entries a cap prune deletes in one write (normally one).
const PRUNE_AT_ONCE: usize = 64;

/// The newest alert journal seq of `kv` (0: none).
pub(super) fn stored_last_alert_seq<B: KvBackend>(kv: &B) -> Result<u64, StoreError> {
    let head = kv.get(JOURNAL_HEAD)?.map(|v| read_id(&v)).transpose()?;
    let last_entry = match kv
        .scan_keys(
            &KeyRange::prefix(JOURNAL.as_bytes()),
            ScanOrder::Descending,
            1,
        )?
        .first()
    {
        Some(k) => read_id(&k[JOURNAL.len()..])?,
        None => 0,
    };
    Ok(head.unwrap_or(0).max(last_entry))
}

impl<B: KvBackend> KvStore<B> {
    pub(super) fn raise(&self, new: NewAlert<'_>, at: UnixTime) -> Result<Alert, StoreError> {
        let mut writer = self.lock();
        let ident = alert_identity(new.mailbox, new.profile, new.kind);
        let mut was = None;
        let alert = match self.get_id(&ident)? {
            Some(id) => match self.get_json::<Alert>(&id_key("l/", id))? {
                Some(mut a) => {
                    was = Some(a.level);
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
        // Written on every raise, not only the first: an alert an older
        // binary opened joins the index at its next raise.
        b.put(id_key(OPEN, alert.id), Vec::new());
        let last = writer.last_alert_seq;
        let journaled = match (alert.level, was) {
            (AlertLevel::Error, None) => Some(AlertEventKind::Raised),
            (AlertLevel::Error, Some(l)) if l != AlertLevel::Error => {
                Some(AlertEventKind::Escalated)
            }
            _ => None,
        };
        let seq = match journaled {
            Some(kind) => self.stage_alert_event(&mut b, last, kind, &alert, at)?,
            None => last,
        };
        self.write_durably(b)?;
        writer.last_alert_seq = seq;
        if seq != last {
            self.alert_events_tx.send_replace(seq);
        }
        drop(writer);
        Ok(alert)
    }

    /// Adds the journal entry for `alert` (numbered after `last`), the new
    /// head and the prune of entries past the cap to `b`; the new seq.
    fn stage_alert_event(
        &self,
        b: &mut WriteBatch,
        last: u64,
        kind: AlertEventKind,
        alert: &Alert,
        at: UnixTime,
    ) -> Result<u64, StoreError> {
        let seq = last + 1;
        // The storm rule's fact, read under the same lock: was the
        // profile's alert open when this one became an Error?
        let profile_alert = match (&alert.mailbox, &alert.profile) {
            (Some(_), Some(p)) => self.get_id(&alert_identity(None, Some(p), PROFILE_FAILING))?,
            _ => None,
        };
        let event = AlertEvent {
            seq,
            kind,
            at,
            alert: alert.clone(),
            profile_alert,
        };
        b.put(id_key(JOURNAL, seq), encode(&event)?);
        b.put(JOURNAL_HEAD, seq.to_be_bytes());
        let cap = self
            .alert_journal_cap
            .load(std::sync::atomic::Ordering::Relaxed);
        if seq > cap {
            // Keep seqs (seq - cap, seq]: normally exactly one older entry
            // goes (none once the sender pruned it).
            let old =
                KeyRange::between(JOURNAL.as_bytes().to_vec(), id_key(JOURNAL, seq - cap + 1));
            for k in self
                .kv
                .scan_keys(&old, ScanOrder::Ascending, PRUNE_AT_ONCE)?
            {
                b.delete(k);
            }
        }
        Ok(seq)
    }

    pub(super) fn alert_journal_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<AlertEvent>, StoreError> {
        let durable = *self.alert_events_tx.borrow();
        if after >= durable {
            return Ok(Vec::new());
        }
        let range = KeyRange::between(id_key(JOURNAL, after + 1), id_key(JOURNAL, durable + 1));
        let limit = if limit == 0 { usize::MAX } else { limit };
        self.kv
            .scan(&range, ScanOrder::Ascending, limit)?
            .iter()
            .map(|(k, v)| decode(k, v))
            .collect()
    }

    pub(super) fn alert_journal_sent(&self, cursor: &str, upto: u64) -> Result<(), StoreError> {
        let _writer = self.lock();
        let mut b = WriteBatch::default();
        b.put(key("nc/", &[cursor.as_bytes()]), upto.to_be_bytes());
        let sent = KeyRange::between(
            JOURNAL.as_bytes().to_vec(),
            id_key(JOURNAL, upto.saturating_add(1)),
        );
        for k in self.kv.scan_keys(&sent, ScanOrder::Ascending, 0)? {
            b.delete(k);
        }
        self.write_durably(b)
    }

    pub(super) fn alert_list(&self, q: &AlertQuery) -> Result<Vec<Alert>, StoreError> {
        let mut all = Vec::new();
        if q.state == Some(AlertState::Open) {
            // The open index: never a read of the resolved alerts kept.
            all = self.open_alerts()?;
            all.retain(|a| q.matches(a));
        } else {
            for (k, v) in self
                .kv
                .scan(&KeyRange::prefix(b"l/"), ScanOrder::Ascending, 0)?
            {
                let a = decode::<Alert>(&k, &v)?;
                if q.matches(&a) {
                    all.push(a);
                }
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
        let mut resolved = Vec::new();
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
                    b.delete(id_key(OPEN, id));
                    continue;
                };
                a.resolved_at = Some(at);
                b.put(row, encode(&a)?);
                resolved.push(id);
            }
        }
        if !resolved.is_empty() {
            // The indexes and the prune this makes due, in the same batch.
            self.stage_resolved(&mut b, &resolved, at)?;
            self.write_durably(b)?;
        }
        Ok(resolved.len() as u64)
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
