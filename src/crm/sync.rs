//! The record pull loop: every `record_sync_interval`, the adapter's records
//! changed since the stored cursor, page by page, into the store's record
//! directory. Each page and the cursor after it are one batch
//! ([`Store::upsert_records`]), so a crash mid-sync resumes at the last page
//! written, never skips one.
//!
//! Failures are classified: a transient one (network, 429, 5xx) is retried
//! with back-off (honouring `Retry-After`) until it works; a permanent one
//! (rejected credentials, a malformed page) raises one Error alert
//! (`mailbox = "crm:<adapter>"`) and is tried again at the next interval;
//! the alert is resolved by the next pull that works.
//!
//! After a page changed records, parties of stored activities waiting for
//! those addresses are resolved again ([`resolve_waiting_parties`]).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::worker::alert_scope;
use super::{CrmAdapter, CrmError};
use crate::config::CrmSettings;
use crate::model::{AlertLevel, NewAlert, UnixTime};

/// Alert kind of a record pull that failed for good (resolved by the next
/// successful pull).
const RECORD_PULL_KIND: &str = "crm:record_pull";
use crate::scheduler::Backoff;
use crate::store::{Store, StoreError};
use crate::telemetry;

/// Why a pull stopped.
#[derive(Debug, thiserror::Error)]
enum PullError {
    #[error(transparent)]
    Crm(#[from] CrmError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The record pull loop of one adapter (see the module docs).
pub struct RecordSync<A: CrmAdapter> {
    adapter: Arc<A>,
    store: Arc<dyn Store>,
    settings: CrmSettings,
    cancel: CancellationToken,
    backoff: Backoff,
}

/// Start of the text of the "record sync failed" alert (resolved by it).
fn failed_prefix(adapter: &str) -> String {
    format!("CRM {adapter}: record sync failed")
}

impl<A: CrmAdapter + 'static> RecordSync<A> {
    pub fn new(
        adapter: Arc<A>,
        store: Arc<dyn Store>,
        settings: CrmSettings,
        cancel: CancellationToken,
    ) -> Self {
        RecordSync {
            adapter,
            store,
            settings,
            cancel,
            backoff: Backoff::default(),
        }
    }

    /// Pulls at once, then every `record_sync_interval`, until cancelled.
    pub async fn run(self) {
        let name = self.adapter.name();
        let mut failures = 0u32;
        loop {
            let wait = match self.pull_all().await {
                Ok(changed) => {
                    failures = 0;
                    metrics::counter!(telemetry::CRM_RECORD_PULLS, "adapter" => name, "result" => "ok")
                        .increment(1);
                    if changed > 0 {
                        tracing::info!(adapter = name, changed, "records synced");
                    }
                    let store = self.store.clone();
                    let scope = alert_scope(name);
                    let now = crate::model::now();
                    let _ = tokio::task::spawn_blocking(move || {
                        store.resolve_alerts(&scope, RECORD_PULL_KIND, now)
                    })
                    .await;
                    self.settings.record_sync_interval
                }
                Err(PullError::Crm(CrmError::Transient {
                    message,
                    retry_after,
                })) => {
                    failures = failures.saturating_add(1);
                    metrics::counter!(telemetry::CRM_RECORD_PULLS, "adapter" => name, "result" => "failed")
                        .increment(1);
                    let wait = self
                        .backoff
                        .delay(failures)
                        .max(retry_after.unwrap_or_default());
                    tracing::warn!(adapter = name, error = %message, retry_in = ?wait, "record pull failed; will retry");
                    wait
                }
                Err(PullError::Crm(e)) => {
                    metrics::counter!(telemetry::CRM_RECORD_PULLS, "adapter" => name, "result" => "failed")
                        .increment(1);
                    let text = format!("{}: {e}", failed_prefix(name));
                    tracing::error!(adapter = name, alert = %text, "alert");
                    let store = self.store.clone();
                    let scope = alert_scope(name);
                    let now = crate::model::now();
                    let _ = tokio::task::spawn_blocking(move || {
                        store.raise_alert(
                            NewAlert {
                                kind: RECORD_PULL_KIND,
                                level: AlertLevel::Error,
                                mailbox: Some(&scope),
                                profile: None,
                                text: &text,
                            },
                            now,
                        )
                    })
                    .await;
                    self.settings.record_sync_interval
                }
                Err(PullError::Store(e)) => {
                    tracing::error!(adapter = name, error = %e, "cannot write pulled records");
                    Duration::from_secs(5).min(self.settings.record_sync_interval)
                }
            };
            tokio::select! {
                _ = self.cancel.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Pulls page after page from the stored cursor; returns how many
    /// records changed.
    async fn pull_all(&self) -> Result<u64, PullError> {
        let name = self.adapter.name();
        let store = self.store.clone();
        let mut cursor = tokio::task::spawn_blocking(move || store.record_cursor(name))
            .await
            .map_err(|e| StoreError::Io(e.to_string()))??;
        let mut changed = 0u64;
        loop {
            if self.cancel.is_cancelled() {
                return Ok(changed);
            }
            let page = self.adapter.pull_records(cursor.as_deref()).await?;
            let more = page.more && page.cursor.is_some() && page.cursor != cursor;
            let addresses: BTreeSet<String> = page
                .records
                .iter()
                .flat_map(|r| r.emails.iter().map(|e| crate::model::normalize_address(e)))
                .filter(|e| !e.is_empty())
                .collect();
            let store = self.store.clone();
            let settings = self.settings.clone();
            let next = page.cursor.clone();
            let written = next.clone();
            let delta = tokio::task::spawn_blocking(move || {
                let now = crate::model::now();
                let delta = store.upsert_records(
                    page.records,
                    &page.deleted,
                    written.as_deref().map(|c| (name, c)),
                    now,
                )?;
                if delta.inserted + delta.updated > 0 {
                    resolve_waiting_parties(
                        store.as_ref(),
                        addresses.into_iter().collect(),
                        &settings,
                        now,
                    )?;
                }
                Ok::<_, StoreError>(delta)
            })
            .await
            .map_err(|e| StoreError::Io(e.to_string()))??;
            changed += delta.inserted + delta.updated + delta.deleted;
            if next.is_some() {
                cursor = next;
            }
            if !more {
                return Ok(changed);
            }
        }
    }
}

/// Late party resolution after records changed: activities with an
/// unresolved party at one of `addresses` are resolved again (and their
/// `activity.updated` event written with them).
///
/// See [`crate::crm::parties::resolve_pending`].
pub fn resolve_waiting_parties(
    store: &dyn Store,
    addresses: Vec<String>,
    settings: &CrmSettings,
    at: UnixTime,
) -> Result<usize, StoreError> {
    crate::crm::parties::resolve_pending(store, &addresses, &settings.parties, at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crm::{DeliveryReceipt, RecordPage};
    use crate::model::{OutboxEvent, Record};
    use std::sync::Mutex;

    /// Serves scripted pages and records the cursors asked for.
    struct Pages {
        script: Mutex<Vec<Result<RecordPage, CrmError>>>,
        asked: Mutex<Vec<Option<String>>>,
    }

    impl CrmAdapter for Pages {
        fn name(&self) -> &'static str {
            "pages"
        }
        async fn pull_records(&self, cursor: Option<&str>) -> Result<RecordPage, CrmError> {
            self.asked.lock().unwrap().push(cursor.map(String::from));
            let mut s = self.script.lock().unwrap();
            if s.is_empty() {
                Ok(RecordPage::default())
            } else {
                s.remove(0)
            }
        }
        async fn deliver(
            &self,
            _: &OutboxEvent,
            _: Option<&str>,
        ) -> Result<DeliveryReceipt, CrmError> {
            Ok(DeliveryReceipt::default())
        }
        async fn test(&self) -> Result<String, CrmError> {
            Ok(String::new())
        }
    }

    fn contact(id: &str, email: &str) -> Record {
        Record {
            kind: "contact".into(),
            id: id.into(),
            name: id.into(),
            emails: vec![email.into()],
            owner: None,
            email_enabled: true,
            user_number: None,
            updated_at: 0,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn pages_and_cursor_are_stored_and_failures_retried_or_alerted() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(crate::store::SledStore::open(&dir.path().join("s")).unwrap());
        let adapter = Arc::new(Pages {
            script: Mutex::new(vec![
                Ok(RecordPage {
                    records: vec![contact("c1", "a@x.test"), contact("c2", "b@x.test")],
                    deleted: vec![],
                    cursor: Some("p2".into()),
                    more: true,
                }),
                Err(CrmError::Transient {
                    message: "503".into(),
                    retry_after: Some(Duration::from_secs(30)),
                }),
                Ok(RecordPage {
                    records: vec![contact("c3", "c@x.test")],
                    deleted: vec![("contact".into(), "c1".into())],
                    cursor: Some("p3".into()),
                    more: false,
                }),
                // Next interval: a permanent failure alerts…
                Err(CrmError::endpoint("records_url rejected the request (401)")),
                // …and the next pull that works resolves it.
                Ok(RecordPage::default()),
            ]),
            asked: Mutex::new(vec![]),
        });
        let settings = CrmSettings {
            record_sync_interval: Duration::from_secs(300),
            ..CrmSettings::default()
        };
        let cancel = CancellationToken::new();
        let h = tokio::spawn(
            RecordSync::new(adapter.clone(), store.clone(), settings, cancel.clone()).run(),
        );
        let wait = |n: usize| {
            let adapter = adapter.clone();
            async move {
                for _ in 0..2000 {
                    if adapter.asked.lock().unwrap().len() >= n {
                        break;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        wait(3).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(store.record_cursor("pages").unwrap().as_deref(), Some("p3"));
        assert_eq!(store.count_records(Some("contact")).unwrap(), 2);
        assert!(store.record("contact", "c1").unwrap().is_none());
        assert_eq!(store.records_by_address("C@x.test").unwrap().len(), 1);
        wait(4).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let alerts = store.alerts(10).unwrap();
        assert_eq!(alerts.len(), 1);
        assert!(alerts[0].text.contains("401") && alerts[0].resolved_at.is_none());
        wait(5).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(store.alerts(10).unwrap()[0].resolved_at.is_some());
        let asked = adapter.asked.lock().unwrap().clone();
        assert_eq!(
            asked,
            vec![
                None,
                Some("p2".into()),
                Some("p2".into()),
                Some("p3".into()),
                Some("p3".into())
            ]
        );
        cancel.cancel();
        h.await.unwrap();
    }
}
