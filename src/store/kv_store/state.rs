//! Activity listings, quarantine, folder positions, mailbox state,
//! follow-ups (alerts: `alerts`).

use std::collections::HashMap;

use super::keys::{decode, encode, id_key, key, list_key, list_prefix, read_id};
use super::KvStore;
use crate::model::{EmailActivity, FolderPosition, FollowUp, MailboxState, QuarantineEntry};
use crate::store::kv::{KeyRange, KvBackend, ScanOrder, WriteBatch};
use crate::store::{ActivityQuery, StoreError};

/// Where a direction's Test & Enable result is kept.
pub(super) fn test_key(direction: crate::model::TestDirection, mailbox: &str) -> Vec<u8> {
    let prefix = match direction {
        crate::model::TestDirection::Incoming => "it/",
        crate::model::TestDirection::Outgoing => "ot/",
        crate::model::TestDirection::Act => "at/",
    };
    key(prefix, &[mailbox.as_bytes()])
}

impl<B: KvBackend> KvStore<B> {
    pub(super) fn list_activities(
        &self,
        q: &ActivityQuery,
    ) -> Result<Vec<EmailActivity>, StoreError> {
        let before = q.before.unwrap_or(u64::MAX);
        match &q.mailbox {
            Some(m) => {
                let prefix = list_prefix("am/", m);
                let range = KeyRange::between(prefix.clone(), list_key("am/", m, before));
                let mut out = Vec::new();
                for k in self.kv.scan_keys(&range, ScanOrder::Descending, q.limit)? {
                    let id = read_id(&k[prefix.len()..])?;
                    if let Some(a) = self.get_json(&id_key("a/", id))? {
                        out.push(a);
                    }
                }
                Ok(out)
            }
            None => {
                let range = KeyRange::between(b"a/".to_vec(), id_key("a/", before));
                self.kv
                    .scan(&range, ScanOrder::Descending, q.limit)?
                    .iter()
                    .map(|(k, v)| decode(k, v))
                    .collect()
            }
        }
    }

    pub(super) fn activity_count(&self, mailbox: Option<&str>) -> Result<u64, StoreError> {
        let prefix = match mailbox {
            Some(m) => list_prefix("am/", m),
            None => b"a/".to_vec(),
        };
        self.kv.count(&KeyRange::prefix(&prefix))
    }

    pub(super) fn quarantine_entries(
        &self,
        limit: usize,
    ) -> Result<Vec<QuarantineEntry>, StoreError> {
        self.kv
            .scan(
                &KeyRange::prefix(b"q/"),
                ScanOrder::Descending,
                limit.max(1),
            )?
            .iter()
            .map(|(k, v)| decode(k, v))
            .collect()
    }

    pub(super) fn positions_of(
        &self,
        mailbox: &str,
    ) -> Result<HashMap<String, FolderPosition>, StoreError> {
        let prefix = list_prefix("p/", mailbox);
        let mut out = HashMap::new();
        for (k, v) in self
            .kv
            .scan(&KeyRange::prefix(&prefix), ScanOrder::Ascending, 0)?
        {
            let folder = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            out.insert(folder, decode(&k, &v)?);
        }
        Ok(out)
    }

    pub(super) fn follow_ups_of(&self, mailbox: &str) -> Result<Vec<FollowUp>, StoreError> {
        self.kv
            .scan(
                &KeyRange::prefix(&list_prefix("f/", mailbox)),
                ScanOrder::Ascending,
                0,
            )?
            .iter()
            .map(|(k, v)| decode(k, v))
            .collect()
    }

    pub(super) fn write_mailbox_state(&self, state: &MailboxState) -> Result<(), StoreError> {
        let _writer = self.lock();
        let mut b = WriteBatch::default();
        b.put(key("b/", &[state.name.as_bytes()]), encode(state)?);
        self.write_durably(b)
    }

    /// The outgoing Test & Enable result lives under its own key: the
    /// sender writes it while the mailbox task rewrites the whole state, so
    /// neither can overwrite the other's result.
    pub(super) fn write_outgoing_test(
        &self,
        mailbox: &str,
        result: &crate::model::TestResult,
    ) -> Result<(), StoreError> {
        self.write_test_result(mailbox, crate::model::TestDirection::Outgoing, result)
    }

    /// A Test & Enable result under its own key (`it/`, `ot/`, `at/`), for
    /// the same reason as the outgoing one: an on-demand test writes it
    /// while the mailbox task rewrites the whole state.
    pub(super) fn write_test_result(
        &self,
        mailbox: &str,
        direction: crate::model::TestDirection,
        result: &crate::model::TestResult,
    ) -> Result<(), StoreError> {
        let _writer = self.lock();
        let mut b = WriteBatch::default();
        b.put(test_key(direction, mailbox), encode(result)?);
        self.write_durably(b)
    }
}
