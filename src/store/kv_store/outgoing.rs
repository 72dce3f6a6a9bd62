//! The outgoing queue: `og/<id>` email row (JSON), `oq/<mailbox>\0<id>`
//! still queued (empty), `ok/<idempotency key>` → id, `ou/<user number>`
//! tracking-token counter.

use super::keys::{decode, encode, id_key, key, list_key, list_prefix, mid_key, read_id};
use super::KvStore;
use crate::model::{ActivityId, EmailActivity, OutgoingEmail, SendStatus, UnixTime};
use crate::store::kv::{KeyRange, KvBackend, ScanOrder, WriteBatch};
use crate::store::{CommitBatch, CommitOutcome, QueueOutcome, StoreError};

fn idempotency_key(k: &str) -> Vec<u8> {
    key("ok/", &[k.as_bytes()])
}

fn counter_key(user: u32) -> Vec<u8> {
    key("ou/", &[user.to_string().as_bytes()])
}

/// The queue row and its `oq/` entry as `email` leaves them.
fn stage_row(b: &mut WriteBatch, email: &OutgoingEmail) -> Result<(), StoreError> {
    b.put(id_key("og/", email.activity_id), encode(email)?);
    let queued = list_key("oq/", &email.mailbox, email.activity_id);
    // A sent email whose Sent copy is owed stays listed: the sender's
    // follow-up finds it there after a crash.
    if email.status.is_queued() || email.sent_copy == crate::model::SentCopy::Owed {
        b.put(queued, Vec::new());
    } else {
        b.delete(queued);
    }
    Ok(())
}

impl<B: KvBackend> KvStore<B> {
    pub(super) fn queue_outgoing_email(
        &self,
        batch: CommitBatch,
        email: OutgoingEmail,
    ) -> Result<QueueOutcome, StoreError> {
        let ik = email.idempotency_key.as_deref().map(idempotency_key);
        let id = email.activity_id;
        let result = self.commit_batch_with(
            batch,
            || match &ik {
                Some(k) => self.get_id(k),
                None => Ok(None),
            },
            |b, outcomes| {
                let inserted = outcomes
                    .iter()
                    .any(|o| matches!(o, CommitOutcome::Inserted(i) if *i == id));
                if !inserted {
                    return Err(StoreError::Corrupt(format!(
                        "outgoing email {id} was not inserted as a new activity ({outcomes:?})"
                    )));
                }
                if let Some(k) = &ik {
                    b.put(k.clone(), id.to_be_bytes());
                }
                stage_row(b, &email)
            },
        )?;
        Ok(match result {
            Ok(_) => QueueOutcome::Queued(id),
            Err(existing) => QueueOutcome::Existing(existing),
        })
    }

    pub(super) fn outgoing_email(
        &self,
        id: ActivityId,
    ) -> Result<Option<OutgoingEmail>, StoreError> {
        self.get_json(&id_key("og/", id))
    }

    pub(super) fn outgoing_id_by_key(&self, k: &str) -> Result<Option<ActivityId>, StoreError> {
        self.get_id(&idempotency_key(k))
    }

    pub(super) fn queued_outgoing(
        &self,
        mailbox: Option<&str>,
        limit: usize,
    ) -> Result<Vec<OutgoingEmail>, StoreError> {
        let prefix = match mailbox {
            Some(m) => list_prefix("oq/", m),
            None => b"oq/".to_vec(),
        };
        let keys = self
            .kv
            .scan_keys(&KeyRange::prefix(&prefix), ScanOrder::Ascending, 0)?;
        let mut ids: Vec<u64> = keys
            .iter()
            .filter_map(|k| k.len().checked_sub(8).map(|at| &k[at..]))
            .map(read_id)
            .collect::<Result<_, _>>()?;
        // Over all mailboxes the keys sort by mailbox first.
        ids.sort_unstable();
        let mut out = Vec::new();
        for id in ids {
            if limit != 0 && out.len() >= limit {
                break;
            }
            if let Some(e) = self.outgoing_email(id)? {
                out.push(e);
            }
        }
        Ok(out)
    }

    pub(super) fn list_outgoing(
        &self,
        mailbox: Option<&str>,
        status: Option<SendStatus>,
        before: Option<ActivityId>,
        limit: usize,
    ) -> Result<Vec<OutgoingEmail>, StoreError> {
        let end = id_key("og/", before.unwrap_or(u64::MAX));
        let range = KeyRange::between(b"og/".to_vec(), end);
        let mut out = Vec::new();
        // Filtered while scanning: the listing is for operators, not a hot path.
        for (k, v) in self.kv.scan(&range, ScanOrder::Descending, 0)? {
            let e: OutgoingEmail = decode(&k, &v)?;
            if mailbox.is_some_and(|m| m != e.mailbox) || status.is_some_and(|s| s != e.status) {
                continue;
            }
            out.push(e);
            if limit != 0 && out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    pub(super) fn write_outgoing(
        &self,
        email: &OutgoingEmail,
        activity: Option<(EmailActivity, Vec<String>)>,
        at: UnixTime,
    ) -> Result<Option<u64>, StoreError> {
        match activity {
            None => {
                let _writer = self.lock();
                let mut b = WriteBatch::default();
                stage_row(&mut b, email)?;
                self.write_durably(b)?;
                Ok(None)
            }
            Some((activity, changes)) => {
                let id = activity.id;
                let ids = activity.message_ids.clone();
                self.replace_activity_with(activity, changes, at, |b, old| {
                    for mid in ids.iter().filter(|m| !old.message_ids.contains(m)) {
                        let k = mid_key(mid);
                        // First writer keeps a Message-ID, as on commit.
                        if !self.kv.contains(&k)? {
                            b.put(k, id.to_be_bytes());
                        }
                    }
                    stage_row(b, email)
                })
            }
        }
    }

    pub(super) fn bump_token_counter(&self, user: u32) -> Result<u64, StoreError> {
        let _writer = self.lock();
        let k = counter_key(user);
        let next = self.get_id(&k)?.unwrap_or(0).wrapping_add(1);
        let mut b = WriteBatch::default();
        b.put(k, next.to_be_bytes());
        self.write_durably(b)?;
        Ok(next)
    }
}
