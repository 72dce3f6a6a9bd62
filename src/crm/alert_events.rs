//! New Error alerts go out as webhook events (`alert.raised`), so the CRM
//! (or whatever the operators' webhook feeds: a pager, a chat) hears of a
//! disabled mailbox or an outage without anyone watching the admin page.
//!
//! At least once and idempotent: alerts are sent in id order and a durable
//! cursor (the last alert id sent) moves only after the receiver's 2xx; the
//! `webhook-id` is `alert_<id>` on every retry. While a profile alert is
//! open, the Error alerts of that profile's mailboxes are not sent one by
//! one: the profile alert, which names them, replaces the storm.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::webhook::WebhookAdapter;
use super::CrmError;
use crate::alerts::kind;
use crate::model::{Alert, AlertLevel};
use crate::store::{AlertQuery, AlertState, Store};

/// Cursor name in the store.
const CURSOR: &str = "alerts:webhook";
/// How often new alerts are looked for.
const LOOK_EVERY: Duration = Duration::from_secs(5);
/// Longest wait after failed sends.
const LONGEST_WAIT: Duration = Duration::from_secs(300);

/// The open Error alerts after `after` to send, in id order, and the new
/// cursor once they are sent: alerts left out because a profile alert
/// covers them advance it too.
pub fn due(open_errors: &[Alert], after: u64) -> (Vec<Alert>, u64) {
    let storming: Vec<&str> = open_errors
        .iter()
        .filter(|a| a.kind == kind::PROFILE_FAILING)
        .filter_map(|a| a.profile.as_deref())
        .collect();
    let mut new: Vec<&Alert> = open_errors.iter().filter(|a| a.id > after).collect();
    new.sort_by_key(|a| a.id);
    let cursor = new.last().map_or(after, |a| a.id);
    let send = new
        .into_iter()
        .filter(|a| {
            a.mailbox.is_none() || !a.profile.as_deref().is_some_and(|p| storming.contains(&p))
        })
        .cloned()
        .collect();
    (send, cursor)
}

/// Sends new Error alerts to the webhook until `cancel`.
pub async fn run(adapter: Arc<WebhookAdapter>, store: Arc<dyn Store>, cancel: CancellationToken) {
    // Alerts from before this feature (or before the webhook was configured)
    // are not sent: the cursor starts at the newest alert there is.
    let mut failures = 0u32;
    loop {
        let wait = match look(&adapter, &store).await {
            Ok(()) => {
                failures = 0;
                LOOK_EVERY
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                let backoff = LOOK_EVERY * 2u32.saturating_pow(failures.min(6));
                let wait = backoff
                    .min(LONGEST_WAIT)
                    .max(e.retry_after().unwrap_or_default());
                tracing::warn!(adapter = "webhook", error = %e, retry_in = ?wait, "cannot send alert events; retried");
                wait
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = cancel.cancelled() => return,
        }
    }
}

async fn look(adapter: &WebhookAdapter, store: &Arc<dyn Store>) -> Result<(), CrmError> {
    let s = store.clone();
    let (send, mut cursor, to) = tokio::task::spawn_blocking(move || {
        let open = s.query_alerts(&AlertQuery {
            level: Some(AlertLevel::Error),
            state: Some(AlertState::Open),
            limit: usize::MAX,
            ..Default::default()
        })?;
        let after = match s.named_cursor(CURSOR)? {
            Some(c) => c,
            None => {
                // First run: start after what is there now.
                let newest = s.alerts(1)?.first().map_or(0, |a| a.id);
                let newest = newest.max(open.iter().map(|a| a.id).max().unwrap_or(0));
                s.put_named_cursor(CURSOR, newest)?;
                newest
            }
        };
        let (send, to) = due(&open, after);
        Ok::<_, crate::store::StoreError>((send, after, to))
    })
    .await
    .map_err(|e| CrmError::transient(format!("alert look-up failed: {e}")))?
    .map_err(|e| CrmError::transient(format!("cannot read alerts: {e}")))?;
    for alert in &send {
        match adapter.notify_alert(alert).await {
            Ok(_) => {}
            Err(e @ CrmError::Permanent { .. }) => {
                // The receiver refuses this one for good: never block the
                // ones after it.
                tracing::error!(adapter = "webhook", alert = alert.id, error = %e, "alert event refused; skipped");
            }
            Err(e) => return Err(e),
        }
        cursor = alert.id;
        save(store, cursor).await?;
    }
    if to > cursor {
        save(store, to).await?;
    }
    Ok(())
}

async fn save(store: &Arc<dyn Store>, cursor: u64) -> Result<(), CrmError> {
    let s = store.clone();
    tokio::task::spawn_blocking(move || s.put_named_cursor(CURSOR, cursor))
        .await
        .map_err(|e| CrmError::transient(format!("cursor write failed: {e}")))?
        .map_err(|e| CrmError::transient(format!("cannot store the alert cursor: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(id: u64, kind: &str, mailbox: Option<&str>, profile: &str) -> Alert {
        Alert {
            id,
            level: AlertLevel::Error,
            kind: kind.into(),
            mailbox: mailbox.map(str::to_string),
            profile: Some(profile.into()),
            text: String::new(),
            first_seen: 1,
            last_seen: 1,
            count: 1,
            resolved_at: None,
            acknowledged_at: None,
        }
    }

    #[test]
    fn new_errors_go_in_id_order_and_a_profile_alert_replaces_its_mailboxes() {
        let open = vec![
            alert(9, "sync_failing", Some("b"), "p"),
            alert(3, "disabled", Some("old"), "q"),
            alert(7, "sync_failing", Some("a"), "p"),
            alert(10, "profile_failing", None, "p"),
            alert(8, "disabled", Some("c"), "q"),
        ];
        let (send, cursor) = due(&open, 5);
        let ids: Vec<u64> = send.iter().map(|a| a.id).collect();
        assert_eq!(
            ids,
            vec![8, 10],
            "a and b are covered by p's profile alert; 3 was sent"
        );
        assert_eq!(cursor, 10);
        let (send, cursor) = due(&open, 10);
        assert!(send.is_empty());
        assert_eq!(cursor, 10);
        let no_storm = vec![alert(7, "sync_failing", Some("a"), "p")];
        assert_eq!(due(&no_storm, 0).0.len(), 1);
    }
}
