//! Error alerts go out as webhook events (`alert.raised`), so the CRM (or
//! whatever the operators' webhook feeds: a pager, a chat) hears of a
//! disabled mailbox or an outage without anyone watching the admin page.
//!
//! The store writes an entry to its alert journal in the same batch as
//! every write that makes an alert an Error, raised as one or escalated in
//! place from a Warning ([`crate::store::AlertEvent`]). This sender reads
//! the journal after its durable cursor, woken by each new entry, so an
//! escalation (same alert id as the Warning) and an Error resolved a moment
//! after it was raised are both sent.
//!
//! At least once and idempotent: entries go in journal order; the cursor
//! moves (and the sent entries are pruned, in the same batch) only after
//! the receiver's 2xx; the `webhook-id` is the entry's own
//! ([`crate::store::AlertEvent::webhook_id`]), the same on every retry, and
//! the body is the alert as the journal holds it, so a retry is byte for
//! byte the same event.
//!
//! Storm rule, decided when the entry is written: a mailbox's Error entry
//! is not sent one by one when its profile's alert (`profile_failing`) was
//! open at that moment; the profile alert, sent when it was raised, names
//! the mailboxes. Deciding at write time rather than at send time makes
//! the outcome the same however late the sender runs (after a receiver
//! outage the profile alert may be resolved already, and its storm should
//! still not arrive one by one).
//!
//! Group wait: the mailboxes of a profile notice an outage one after the
//! other (each at its next poll), so the first ones can become Errors
//! before more than half fail and the profile alert exists. A mailbox's
//! Error entry therefore waits `alert_group_wait` (default 60 s) after it
//! was written, and is not sent when its profile's alert was raised within
//! that time (the next entries of the journal say so). Decided from the
//! journal alone, so again the same however late the sender runs.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::webhook::WebhookAdapter;
use super::CrmError;
use crate::alerts::kind::PROFILE_FAILING;
use crate::model;
use crate::store::{AlertEvent, AlertEventKind, Store, StoreError};

/// Cursor name in the store: the last journal seq sent.
pub const CURSOR: &str = "alert-events:webhook";
/// The cursor of the earlier sender (the last alert id sent): when it
/// exists, the webhook was configured before the journal, so every entry
/// the journal holds is new to the receiver.
const OLD_CURSOR: &str = "alerts:webhook";
/// Look again after this long even without a new entry (a safety net: the
/// store's watch wakes the sender at once).
const LOOK_EVERY: Duration = Duration::from_secs(5);
/// First wait after a failed send; it doubles with every failure after.
const FIRST_WAIT: Duration = Duration::from_secs(1);
/// Longest wait after failed sends.
const LONGEST_WAIT: Duration = Duration::from_secs(300);
/// Entries read per look.
const PAGE: usize = 100;

/// Whether the storm rule holds `event` back: a mailbox alert that became
/// an Error while its profile's alert was open.
pub fn covered_by_profile_alert(event: &AlertEvent) -> bool {
    event.alert.mailbox.is_some() && event.profile_alert.is_some()
}

/// What the group wait makes of a mailbox `event` given `later` entries
/// of the journal (those after it, in order): `Some(true)` when its
/// profile's alert was raised within `wait` after it (not sent),
/// `Some(false)` when the entries pass that time without one (sent),
/// `None` when `later` ends before that time (read on, or wait).
pub fn covered_within(event: &AlertEvent, later: &[AlertEvent], wait: Duration) -> Option<bool> {
    let (Some(_), Some(profile)) = (&event.alert.mailbox, &event.alert.profile) else {
        return Some(false);
    };
    let deadline = event.at.saturating_add(wait_secs(wait));
    for e in later {
        if e.at > deadline {
            return Some(false);
        }
        let a = &e.alert;
        if e.kind == AlertEventKind::Raised
            && a.mailbox.is_none()
            && a.kind == PROFILE_FAILING
            && a.profile.as_ref() == Some(profile)
        {
            return Some(true);
        }
    }
    None
}

/// Whole seconds of `wait`, rounded up (journal times are seconds).
fn wait_secs(wait: Duration) -> i64 {
    i64::try_from(wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).unwrap_or(i64::MAX)
}

/// Where a sender starts without a cursor of its own: after `head` (the
/// newest entry when it was started) for a webhook configured just now,
/// since alerts from before it are not sent; from the start of the journal
/// when the earlier, alert-id based sender ran (the journal then holds only
/// what was written since the upgrade).
pub fn first_cursor(head: u64, had_old_cursor: bool) -> u64 {
    if had_old_cursor {
        0
    } else {
        head
    }
}

/// Sends the alert journal to the webhook until `cancel`.
///
/// Not an `async fn`: the newest journal seq is taken when this is called
/// (the daemon calls it before any mailbox starts), so on the very first
/// run an Error raised while the task is being scheduled is still sent.
pub fn run(
    adapter: Arc<WebhookAdapter>,
    store: Arc<dyn Store>,
    group_wait: Duration,
    cancel: CancellationToken,
) -> impl Future<Output = ()> + Send + 'static {
    let head = store.last_alert_event_seq();
    let mut changes = store.watch_alert_events();
    async move {
        let mut failures = 0u32;
        loop {
            changes.borrow_and_update();
            let wait = match look(&adapter, &store, head, group_wait).await {
                Ok(Looked::More) => {
                    failures = 0;
                    continue;
                }
                Ok(Looked::Done) => {
                    failures = 0;
                    None
                }
                // The entry at the cursor is in its group wait: entries
                // written meanwhile are behind it and change nothing.
                Ok(Looked::Hold(wait)) => {
                    failures = 0;
                    Some(wait)
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let backoff = FIRST_WAIT * 2u32.saturating_pow((failures - 1).min(9));
                    let wait = backoff
                        .min(LONGEST_WAIT)
                        .max(e.retry_after().unwrap_or_default());
                    tracing::warn!(adapter = "webhook", error = %e, retry_in = ?wait, "cannot send alert events; retried");
                    Some(wait)
                }
            };
            match wait {
                None => tokio::select! {
                    _ = changes.changed() => {}
                    _ = tokio::time::sleep(LOOK_EVERY) => {}
                    _ = cancel.cancelled() => return,
                },
                Some(wait) => tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = cancel.cancelled() => return,
                },
            }
        }
    }
}

async fn blocking<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, CrmError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| CrmError::transient(format!("{what} failed: {e}")))?
        .map_err(|e| CrmError::transient(format!("{what}: {e}")))
}

/// How far a look at the journal got.
enum Looked {
    /// A full page went out: there may be more.
    More,
    /// Everything after the cursor went out.
    Done,
    /// The next entry waits this long for its group wait to end.
    Hold(Duration),
}

/// Whether `event` waits for (or is covered by) its profile's alert under
/// the group wait: `Ok(None)` to send it now, `Ok(Some(None))` covered,
/// `Ok(Some(Some(d)))` to look again in `d`.
async fn group_wait_of(
    store: &Arc<dyn Store>,
    event: &AlertEvent,
    wait: Duration,
) -> Result<Option<Option<Duration>>, CrmError> {
    if wait.is_zero() || event.alert.mailbox.is_none() {
        return Ok(None);
    }
    let mut after = event.seq;
    loop {
        let s = store.clone();
        let later = blocking("reading the alert journal", move || {
            s.alert_events_after(after, PAGE)
        })
        .await?;
        match covered_within(event, &later, wait) {
            Some(true) => return Ok(Some(None)),
            Some(false) => return Ok(None),
            None if later.len() == PAGE => {
                after = later.last().map_or(after, |e| e.seq);
            }
            None => {
                let left = event.at.saturating_add(wait_secs(wait)) - model::now();
                if left < 0 {
                    // Its time is over and no profile alert came.
                    return Ok(None);
                }
                // +1: journal times are whole seconds.
                let left = u64::try_from(left).unwrap_or(0).saturating_add(1);
                return Ok(Some(Some(Duration::from_secs(left))));
            }
        }
    }
}

/// One page of the journal after the cursor, sent in order.
async fn look(
    adapter: &WebhookAdapter,
    store: &Arc<dyn Store>,
    head: u64,
    group_wait: Duration,
) -> Result<Looked, CrmError> {
    let s = store.clone();
    let (cursor, events) = blocking("reading the alert journal", move || {
        let cursor = match s.named_cursor(CURSOR)? {
            Some(c) => c,
            None => {
                let c = first_cursor(head, s.named_cursor(OLD_CURSOR)?.is_some());
                s.put_named_cursor(CURSOR, c)?;
                c
            }
        };
        Ok((cursor, s.alert_events_after(cursor, PAGE)?))
    })
    .await?;
    if let Some(first) = events.first() {
        let lost = first.seq.saturating_sub(cursor.saturating_add(1));
        if lost > 0 {
            // Dropped at the journal's cap while the receiver was away.
            tracing::warn!(
                adapter = "webhook",
                lost,
                "alert events dropped unsent: the journal's cap was reached"
            );
        }
    }
    let full = events.len() == PAGE;
    for event in events {
        let grouped = if covered_by_profile_alert(&event) {
            Some(None)
        } else {
            group_wait_of(store, &event, group_wait).await?
        };
        if let Some(Some(wait)) = grouped {
            return Ok(Looked::Hold(wait));
        }
        if grouped.is_some() {
            tracing::debug!(
                adapter = "webhook",
                seq = event.seq,
                "alert event covered by the profile alert"
            );
        } else {
            match adapter.notify_alert_event(&event).await {
                Ok(_) => {
                    #[cfg(feature = "fault-injection")]
                    crate::fault::alert_event_sent_before_recording();
                }
                Err(e @ CrmError::Permanent { .. }) => {
                    // The receiver refuses this one for good: never block
                    // the ones after it.
                    tracing::error!(adapter = "webhook", alert = event.alert.id, seq = event.seq, error = %e, "alert event refused; skipped");
                }
                Err(e) => return Err(e),
            }
        }
        let (s, seq) = (store.clone(), event.seq);
        blocking("storing the alert cursor", move || {
            s.alert_events_sent(CURSOR, seq)
        })
        .await?;
    }
    Ok(if full { Looked::More } else { Looked::Done })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Alert, AlertLevel};
    use crate::store::AlertEventKind;

    fn event(seq: u64, mailbox: Option<&str>, profile_alert: Option<u64>) -> AlertEvent {
        AlertEvent {
            seq,
            kind: AlertEventKind::Raised,
            at: 1,
            alert: Alert {
                id: seq + 100,
                level: AlertLevel::Error,
                kind: if mailbox.is_some() {
                    "sync_failing"
                } else {
                    "profile_failing"
                }
                .into(),
                mailbox: mailbox.map(str::to_string),
                profile: Some("p".into()),
                text: String::new(),
                first_seen: 1,
                last_seen: 1,
                count: 1,
                resolved_at: None,
                acknowledged_at: None,
            },
            profile_alert,
        }
    }

    #[test]
    fn a_mailbox_error_while_its_profile_alert_was_open_is_not_sent_alone() {
        assert!(covered_by_profile_alert(&event(2, Some("a"), Some(1))));
        assert!(
            !covered_by_profile_alert(&event(3, Some("a"), None)),
            "no profile alert open: sent"
        );
        assert!(
            !covered_by_profile_alert(&event(1, None, None)),
            "the profile alert itself is sent"
        );
        // A profile alert entry never carries one, but if it did it would
        // still go: only mailbox alerts are covered.
        assert!(!covered_by_profile_alert(&event(4, None, Some(1))));
    }

    /// `event` at time `at` of profile `profile`.
    fn at(mut e: AlertEvent, at: i64, profile: &str) -> AlertEvent {
        e.at = at;
        e.alert.profile = Some(profile.into());
        e
    }

    #[test]
    fn a_mailbox_error_is_covered_by_its_profile_alert_raised_within_the_group_wait() {
        let wait = Duration::from_secs(60);
        let error = at(event(1, Some("a"), None), 100, "p");
        let profile_alert = |seq, t, p| at(event(seq, None, None), t, p);
        // Raised 59 s later: covered.
        let later = [
            at(event(2, Some("b"), None), 120, "p"),
            profile_alert(3, 159, "p"),
        ];
        assert_eq!(covered_within(&error, &later, wait), Some(true));
        // At the limit still; a second after it, not.
        assert_eq!(
            covered_within(&error, &[profile_alert(2, 160, "p")], wait),
            Some(true)
        );
        assert_eq!(
            covered_within(&error, &[profile_alert(2, 161, "p")], wait),
            Some(false)
        );
        // Another profile's alert does not cover it.
        assert_eq!(
            covered_within(&error, &[profile_alert(2, 110, "q")], wait),
            None,
            "undecided until the wait is over"
        );
        // An escalation of the profile alert is not a raise: the alert was
        // open (and the write-time rule applies) or it is not this one.
        let mut escalated = profile_alert(2, 110, "p");
        escalated.kind = AlertEventKind::Escalated;
        assert_eq!(covered_within(&error, &[escalated], wait), None);
        // Nothing after it yet: undecided.
        assert_eq!(covered_within(&error, &[], wait), None);
        // A profile alert itself is never held.
        assert_eq!(
            covered_within(&profile_alert(1, 100, "p"), &[], wait),
            Some(false)
        );
    }

    #[test]
    fn a_new_webhook_starts_after_the_journal_an_upgraded_one_at_its_start() {
        assert_eq!(first_cursor(7, false), 7, "alerts from before it: not sent");
        assert_eq!(first_cursor(7, true), 0, "the earlier sender ran: all new");
        assert_eq!(first_cursor(0, false), 0);
    }

    /// The storm rule as the store records it and the sender reads it: an
    /// Error before the profile alert goes, the profile alert goes, the
    /// Errors and escalations while it is open do not, and those after it
    /// resolved go again.
    #[test]
    fn the_storm_rule_over_a_real_journal() {
        use crate::model::NewAlert;
        use crate::store::{MemBackend, Store};
        let s = crate::store::KvStore::new(MemBackend::new()).unwrap();
        let raise = |kind, level, mailbox: Option<&str>, at| {
            s.raise_alert(
                NewAlert {
                    kind,
                    level,
                    mailbox,
                    profile: Some("p"),
                    text: "x",
                },
                at,
            )
            .unwrap()
        };
        raise("disabled", AlertLevel::Error, Some("a"), 1);
        raise("sync_failing", AlertLevel::Warning, Some("b"), 2);
        raise("profile_failing", AlertLevel::Error, None, 3);
        raise("sync_failing", AlertLevel::Error, Some("b"), 4);
        raise("disabled", AlertLevel::Error, Some("c"), 5);
        s.resolve_alerts("p", "profile_failing", 6).unwrap();
        raise("disabled", AlertLevel::Error, Some("d"), 7);
        let sent: Vec<(Option<String>, AlertEventKind)> = s
            .alert_events_after(0, 0)
            .unwrap()
            .into_iter()
            .filter(|e| !covered_by_profile_alert(e))
            .map(|e| (e.alert.mailbox, e.kind))
            .collect();
        assert_eq!(
            sent,
            vec![
                (Some("a".into()), AlertEventKind::Raised),
                (None, AlertEventKind::Raised),
                (Some("d".into()), AlertEventKind::Raised),
            ],
            "b's escalation and c are covered by the profile alert"
        );
    }
}
