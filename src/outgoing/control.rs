//! Operator control of queued email: cancel one still waiting, retry one
//! that failed.
//!
//! Each change writes the queue row and the activity's [`SendState`] in one
//! [`Store::update_outgoing`] batch, so the CRM gets an `activity.updated`
//! event (`changes = ["send_status"]`) for it like for the sender's changes.
//!
//! The check of the current status and the write are two store calls (the
//! store has no compare-and-set for queue rows), so both happen under
//! [`lock_row`]: a sender that takes the same lock to re-read the row and
//! write `sending` can never send an email a cancel has just answered for.

use super::SendWakeup;
use crate::error::{Classify, Disposition};
use crate::model::{ActivityId, OutgoingEmail, SendState, SendStatus, UnixTime};
use crate::store::{Store, StoreError};

/// Why a cancel or retry was refused; nothing was changed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No outgoing email with this id (HTTP 404).
    #[error("no outgoing email {0}")]
    NotFound(ActivityId),
    /// The email is not in the status the action needs (HTTP 409).
    #[error("{}", wrong_status_message(*.id, *.status, .wanted))]
    WrongStatus {
        id: ActivityId,
        status: SendStatus,
        /// The status the action needs (`pending_send` to cancel, `failed`
        /// to retry).
        wanted: &'static str,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Classify for ControlError {
    fn disposition(&self) -> Disposition {
        match self {
            ControlError::Store(e) => e.disposition(),
            ControlError::NotFound(_) | ControlError::WrongStatus { .. } => Disposition::Permanent,
        }
    }
}

/// A sentence saying the current status and what the action allows.
fn wrong_status_message(id: ActivityId, status: SendStatus, wanted: &str) -> String {
    let now = format!("outgoing email {id} is {status}");
    match wanted {
        "pending_send" => format!(
            "{now}; only an email still pending_send can be canceled ({})",
            match status {
                SendStatus::Sending => "its SMTP transaction has started and cannot be taken back",
                SendStatus::Sent => "it has been delivered to the server",
                SendStatus::Failed => "a failed email is not sent again unless retried",
                SendStatus::Canceled => "it is canceled already",
                SendStatus::PendingSend => "it is pending_send now; try again",
            }
        ),
        "failed" => format!(
            "{now}; only a failed email can be retried ({})",
            match status {
                SendStatus::PendingSend | SendStatus::Sending =>
                    "it is still queued and will be sent",
                SendStatus::Sent => "it has been delivered to the server",
                SendStatus::Canceled => "a canceled email stays canceled; queue a new one",
                SendStatus::Failed => "it is failed now; try again",
            }
        ),
        other => format!("{now}; this needs it to be {other}"),
    }
}

/// Cancels an email still `pending_send`: it is never sent.
pub fn cancel(
    store: &dyn Store,
    id: ActivityId,
    now: UnixTime,
) -> Result<OutgoingEmail, ControlError> {
    change(
        store,
        id,
        SendStatus::PendingSend,
        "pending_send",
        now,
        |row| {
            row.status = SendStatus::Canceled;
            Some("canceled by an operator before it was sent".to_string())
        },
    )
}

/// Queues a `failed` email again: `pending_send`, due at once, its attempts
/// kept (they count the SMTP transactions ever started for it).
pub fn retry(
    store: &dyn Store,
    id: ActivityId,
    now: UnixTime,
) -> Result<OutgoingEmail, ControlError> {
    change(store, id, SendStatus::Failed, "failed", now, |row| {
        row.status = SendStatus::PendingSend;
        row.next_attempt_at = now;
        row.retry_from = Some(now);
        // A new attempt: an earlier transport acceptance proves nothing now.
        row.accepted_at = None;
        // The failure stays readable on the row until the next attempt
        // replaces it; the activity says why it is pending again.
        Some(match &row.last_error {
            Some(e) => format!("retry requested by an operator after: {e}"),
            None => "retry requested by an operator".to_string(),
        })
    })
}

/// Serialises the status changes of one email within this process: held
/// around "read the row, check its status, write the change". The sender
/// takes it for its `pending_send → sending` step (re-reading the row under
/// it), so a cancel and the start of an attempt are never interleaved.
/// Sharded by id: emails of different mailboxes rarely wait on each other.
pub fn lock_row(id: ActivityId) -> std::sync::MutexGuard<'static, ()> {
    const SHARDS: usize = 64;
    static LOCKS: [std::sync::Mutex<()>; SHARDS] = [const { std::sync::Mutex::new(()) }; SHARDS];
    let lock = &LOCKS[(id % SHARDS as u64) as usize];
    // The guarded data is `()`: a panic while it was held leaves nothing
    // inconsistent, so a poisoned lock is used as is.
    lock.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Reads the row, checks its status, applies `apply` (which sets the new
/// status and returns the activity's reason) and writes row and activity
/// in one batch.
fn change(
    store: &dyn Store,
    id: ActivityId,
    from: SendStatus,
    wanted: &'static str,
    now: UnixTime,
    apply: impl FnOnce(&mut OutgoingEmail) -> Option<String>,
) -> Result<OutgoingEmail, ControlError> {
    let _row = lock_row(id);
    let mut row = store.outgoing(id)?.ok_or(ControlError::NotFound(id))?;
    if row.status != from {
        return Err(ControlError::WrongStatus {
            id,
            status: row.status,
            wanted,
        });
    }
    let mut activity = store.activity(id)?.ok_or_else(|| {
        StoreError::Corrupt(format!(
            "outgoing email {id} has a queue row but no activity"
        ))
    })?;
    let reason = apply(&mut row);
    let send = activity
        .send
        .get_or_insert_with(|| SendState::new(from, row.queued_at));
    send.set(row.status, reason, now);
    send.attempts = row.attempts;
    store.update_outgoing(&row, Some((activity, vec!["send_status".into()])), now)?;
    Ok(row)
}

/// Wakes the senders waiting on `wakeup`, and leaves a wake-up for a
/// sender busy right now, so an email queued (or retried) while it scans is
/// not left for the periodic scan.
pub fn wake_senders(wakeup: &SendWakeup) {
    wakeup.notify_waiters();
    wakeup.notify_one();
}

/// Queue rows written straight into a store, for tests of the control
/// functions and the admin API.
#[cfg(test)]
pub(crate) mod test_support {
    use crate::model::{
        CorrelationMethod, Direction, EmailActivity, OutgoingEmail, RecordRef, SendState,
        SendStatus, SentCopy, SourceKey,
    };
    use crate::store::{CommitBatch, PendingItem, QueueOutcome, Store};

    /// Queues an email of `mailbox` in `status` (with its activity) and
    /// returns its id.
    pub(crate) fn queue_row(store: &dyn Store, mailbox: &str, status: SendStatus) -> u64 {
        let id = store.allocate_id().unwrap();
        let at = 1_767_000_000;
        let message_id = format!("{id:x}.{id}@example.test");
        let mut send = SendState::new(SendStatus::PendingSend, at);
        send.set(status, None, at);
        send.token = Some(format!("CRM:000100{id}"));
        let activity = EmailActivity {
            id,
            mailbox: mailbox.into(),
            source: SourceKey {
                mailbox: mailbox.into(),
                folder: "$outgoing".into(),
                uidvalidity: 0,
                uid: message_id.clone(),
            },
            message_ids: vec![format!("<{message_id}>")],
            in_reply_to: vec![],
            references: vec![],
            direction: Direction::Outgoing,
            subject: format!("Your case [CRM:000100{id}]"),
            from: vec![format!("{mailbox}@example.test")],
            to: vec!["customer@example.com".into()],
            cc: vec![],
            sent_at: Some(at),
            received_at: at,
            regarding: Some("case:42".parse::<RecordRef>().unwrap()),
            method: CorrelationMethod::Custom,
            score: 1.0,
            reasons: vec!["queued by the CRM regarding case:42".into()],
            correlated_with: None,
            content_hash: format!("hash-{id}"),
            size: 10,
            also_seen_as: vec![],
            forwarded_by: None,
            automatic: None,
            no_reply: false,
            parties: vec![],
            send: Some(send),
        };
        let row = OutgoingEmail {
            activity_id: id,
            mailbox: mailbox.into(),
            message_id,
            envelope_from: format!("{mailbox}@example.test"),
            recipients: vec!["customer@example.com".into()],
            mime: "Subject: x\r\n\r\nbody\r\n".into(),
            status,
            attempts: u32::from(status != SendStatus::PendingSend),
            next_attempt_at: at,
            last_error: (status == SendStatus::Failed).then(|| "550 mailbox unavailable".into()),
            sent_copy: SentCopy::NotNeeded,
            server_message_ids: vec![],
            idempotency_key: None,
            in_reply_to: None,
            queued_at: at,
            sent_at: None,
            retry_from: None,
            accepted_at: None,
            server_item_id: None,
        };
        let outcome = store
            .queue_outgoing(
                CommitBatch {
                    items: vec![PendingItem::Activity(Box::new(activity))],
                    ..Default::default()
                },
                row,
            )
            .unwrap();
        assert_eq!(outcome, QueueOutcome::Queued(id));
        id
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::queue_row;
    use super::*;
    use crate::model::EventKind;
    use crate::store::SledStore;

    const NOW: UnixTime = 1_767_000_500;

    fn open() -> (tempfile::TempDir, SledStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(&dir.path().join("s")).unwrap();
        (dir, store)
    }

    /// The last event is an `activity.updated` of `id` with `send_status`,
    /// carrying `status`.
    fn last_event_says(store: &SledStore, id: ActivityId, status: SendStatus) {
        let events = store.events_after(0, 0).unwrap();
        let last = events.last().unwrap();
        assert_eq!(last.kind, EventKind::ActivityUpdated);
        assert_eq!(last.activity_id, id);
        assert_eq!(last.changes, vec!["send_status".to_string()]);
        let send = last.activity.send.as_ref().unwrap();
        assert_eq!(send.status, status);
        assert_eq!(send.dynamics_statuscode, status.dynamics_statuscode());
        assert_eq!(send.status_at, NOW);
    }

    #[test]
    fn cancel_takes_a_pending_email_off_the_queue_with_an_event() {
        let (_d, store) = open();
        let id = queue_row(&store, "support", SendStatus::PendingSend);
        assert_eq!(store.outgoing_queued(Some("support"), 0).unwrap().len(), 1);
        let row = cancel(&store, id, NOW).unwrap();
        assert_eq!(row.status, SendStatus::Canceled);
        assert_eq!(store.outgoing(id).unwrap().unwrap(), row);
        assert!(store
            .outgoing_queued(Some("support"), 0)
            .unwrap()
            .is_empty());
        let send = store.activity(id).unwrap().unwrap().send.unwrap();
        assert_eq!(send.status, SendStatus::Canceled);
        assert_eq!(send.dynamics_status, "Canceled");
        assert!(send.reason.unwrap().contains("canceled"));
        last_event_says(&store, id, SendStatus::Canceled);
    }

    #[test]
    fn cancel_refuses_every_other_status_and_changes_nothing() {
        let (_d, store) = open();
        for status in [
            SendStatus::Sending,
            SendStatus::Sent,
            SendStatus::Failed,
            SendStatus::Canceled,
        ] {
            let id = queue_row(&store, "support", status);
            let events = store.last_event_seq().unwrap();
            let before = store.outgoing(id).unwrap();
            match cancel(&store, id, NOW) {
                Err(e @ ControlError::WrongStatus { .. }) => {
                    let text = e.to_string();
                    assert!(text.contains(&format!("is {status}")), "{text}");
                    assert!(text.contains("only an email still pending_send"), "{text}");
                }
                other => panic!("{status}: {other:?}"),
            }
            assert_eq!(store.outgoing(id).unwrap(), before);
            assert_eq!(store.last_event_seq().unwrap(), events);
        }
        assert!(matches!(
            cancel(&store, 999, NOW),
            Err(ControlError::NotFound(999))
        ));
    }

    #[test]
    fn retry_queues_a_failed_email_again_keeping_its_attempts() {
        let (_d, store) = open();
        let id = queue_row(&store, "support", SendStatus::Failed);
        assert!(store.outgoing_queued(None, 0).unwrap().is_empty());
        let row = retry(&store, id, NOW).unwrap();
        assert_eq!(row.status, SendStatus::PendingSend);
        assert_eq!(row.next_attempt_at, NOW);
        assert_eq!(row.attempts, 1);
        let queued = store.outgoing_queued(Some("support"), 0).unwrap();
        assert_eq!(queued, vec![row]);
        let send = store.activity(id).unwrap().unwrap().send.unwrap();
        assert_eq!(send.status, SendStatus::PendingSend);
        assert_eq!(send.dynamics_statuscode, 6);
        assert_eq!(send.attempts, 1);
        assert!(send.reason.unwrap().contains("550 mailbox unavailable"));
        last_event_says(&store, id, SendStatus::PendingSend);
    }

    #[test]
    fn retry_refuses_every_other_status() {
        let (_d, store) = open();
        for status in [
            SendStatus::PendingSend,
            SendStatus::Sending,
            SendStatus::Sent,
            SendStatus::Canceled,
        ] {
            let id = queue_row(&store, "support", status);
            let err = retry(&store, id, NOW).unwrap_err();
            assert!(
                matches!(err, ControlError::WrongStatus { wanted: "failed", status: s, .. } if s == status),
                "{err:?}"
            );
            assert!(err
                .to_string()
                .contains("only a failed email can be retried"));
            assert_eq!(store.outgoing(id).unwrap().unwrap().status, status);
        }
        assert!(matches!(
            retry(&store, 7777, NOW),
            Err(ControlError::NotFound(7777))
        ));
    }

    #[test]
    fn a_cancel_waits_for_a_sender_holding_the_row() {
        let (_d, store) = open();
        let store = std::sync::Arc::new(store);
        let id = queue_row(store.as_ref(), "support", SendStatus::PendingSend);
        let sender = lock_row(id);
        let (tx, rx) = std::sync::mpsc::channel();
        let s = store.clone();
        let canceling = std::thread::spawn(move || tx.send(cancel(s.as_ref(), id, NOW)).unwrap());
        assert!(rx
            .recv_timeout(std::time::Duration::from_millis(100))
            .is_err());
        // The sender started the attempt meanwhile: the cancel must see it.
        let mut row = store.outgoing(id).unwrap().unwrap();
        row.status = SendStatus::Sending;
        store.update_outgoing(&row, None, NOW).unwrap();
        drop(sender);
        let outcome = rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap();
        assert!(
            matches!(
                outcome,
                Err(ControlError::WrongStatus {
                    status: SendStatus::Sending,
                    ..
                })
            ),
            "{outcome:?}"
        );
        canceling.join().unwrap();
    }

    #[tokio::test]
    async fn a_wake_up_left_while_the_sender_is_busy_is_found_later() {
        let wakeup: SendWakeup = std::sync::Arc::new(tokio::sync::Notify::new());
        // Busy: not waiting when woken, finds the wake-up when it waits.
        wake_senders(&wakeup);
        tokio::time::timeout(std::time::Duration::from_secs(1), wakeup.notified())
            .await
            .unwrap();
    }
}
