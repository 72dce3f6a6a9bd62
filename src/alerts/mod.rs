//! Alerts: what the operator sees on the mailbox and the profile (Dynamics levels
//! Error / Warning / Information). Each alert is keyed by its subject and
//! [`kind`], so a flapping mailbox produces one alert with a count, not
//! thousands, and the code that sees the condition clear resolves exactly it.

mod monitor;

pub use monitor::{spawn_monitor, Monitor};

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::model::{AlertLevel, NewAlert, UnixTime};
use crate::store::Store;

/// The kinds of alert: with the subject, an alert's key. Stable strings:
/// the API filters and the web page show them.
pub mod kind {
    /// Sync cycles fail (Warning while retrying; Error once the mailbox has
    /// not synced for `stall_alert_after`). Resolved by the next success.
    pub const SYNC_FAILING: &str = "sync_failing";
    /// A permanent error disabled the mailbox. Resolved when it is enabled.
    pub const DISABLED: &str = "disabled";
    /// The server or Entra refused the OAuth token or client secret.
    pub const CREDENTIAL_REJECTED: &str = "credential_rejected";
    /// The token or client secret expires soon. Resolved once renewed.
    pub const CREDENTIAL_EXPIRING: &str = "credential_expiring";
    /// The mailbox task panicked and was restarted.
    pub const TASK_PANIC: &str = "task_panic";
    /// The mailbox's email address is not approved.
    pub const NOT_APPROVED: &str = "not_approved";
    /// Messages quarantined; one alert per reason class
    /// (`quarantine:unparseable`, `quarantine:too_large`, `quarantine:unfetchable`).
    pub const QUARANTINE: &str = "quarantine";
    /// What the connector reports about the mailbox (missing tracked
    /// folder, resync after a lost sync state): `connector:<what>`.
    pub const CONNECTOR: &str = "connector";
    /// The pipeline's notices (mail loops held back).
    pub const PIPELINE_NOTICE: &str = "pipeline_notice";
    /// Follow-ups (flag, move, delete) the server keeps refusing.
    pub const FOLLOW_UP: &str = "follow_up";
    /// More than half a profile's mailboxes failed within an hour: one
    /// profile alert instead of a storm. Resolved when half or fewer fail.
    pub const PROFILE_FAILING: &str = "profile_failing";
    /// Outgoing Test & Enable failed (the sender's start-up test, or an
    /// on-demand one). Resolved by the next passing outgoing test.
    pub const OUTGOING_TEST: &str = "outgoing_test";
    /// An on-demand incoming Test & Enable failed. Resolved by the next
    /// passing incoming test, or the mailbox's next successful sync.
    pub const INCOMING_TEST: &str = "incoming_test";
    /// An on-demand Test & Enable passed but the mailbox could not be
    /// enabled (disabled in the configuration, not approved). Resolved by
    /// the next test that enables it.
    pub const NOT_ENABLED: &str = "not_enabled";
    /// An outgoing email failed for good.
    pub const OUTGOING_FAILED: &str = "outgoing_failed";
    /// A sync cycle has run longer than `stuck_after` (a hung connection).
    pub const STUCK: &str = "stuck";
    /// No successful sync for longer than `stall_alert_after` plus the
    /// longest idle wait, without a failure to say why (a task that went
    /// quiet). Failures raise [`SYNC_FAILING`] instead.
    pub const STALLED: &str = "stalled";
    /// The backlog kept growing for a while.
    pub const BACKLOG: &str = "backlog";
    /// The CRM link cannot deliver or sync.
    pub const CRM: &str = "crm";
    /// Daemon-level conditions (a reload refused, …).
    pub const DAEMON: &str = "daemon";
}

/// Raises alerts and applies the profile-wide rule: when more than half of a
/// profile's mailboxes fail within an hour, the profile gets one Error alert.
pub struct Alerts {
    store: Arc<dyn Store>,
    /// profile → mailboxes of that profile (a reload replaces it).
    profile_members: RwLock<HashMap<String, Vec<String>>>,
    /// profile → its failing mailboxes.
    failures: Mutex<HashMap<String, Failing>>,
    /// mailbox → alert kinds its next successful sync resolves (raised by
    /// someone else than its task, e.g. a failed on-demand test).
    at_next_success: Mutex<HashMap<String, Vec<&'static str>>>,
}

/// A profile's failing mailboxes: mailbox → (last failure, its error).
type Failing = HashMap<String, (Instant, String)>;

/// Window of the profile-wide failure rule.
const PROFILE_WINDOW: Duration = Duration::from_secs(3600);

impl Alerts {
    /// `members` lists each profile's mailboxes.
    pub fn new(store: Arc<dyn Store>, members: HashMap<String, Vec<String>>) -> Self {
        Alerts {
            store,
            profile_members: RwLock::new(members),
            failures: Mutex::new(HashMap::new()),
            at_next_success: Mutex::new(HashMap::new()),
        }
    }

    /// Has the next successful sync of `mailbox` resolve its alert of
    /// `kind`: for alerts its task did not raise (a Test & Enable that
    /// failed while the mailbox kept running), which its task would
    /// otherwise not know to resolve.
    pub fn resolve_at_next_success(&self, mailbox: &str, kind: &'static str) {
        let mut map = self
            .at_next_success
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let kinds = map.entry(mailbox.to_string()).or_default();
        if !kinds.contains(&kind) {
            kinds.push(kind);
        }
    }

    /// A sync of `mailbox` succeeded: resolves what
    /// [`Alerts::resolve_at_next_success`] was asked to.
    pub fn mailbox_synced(&self, mailbox: &str, now: UnixTime) {
        let kinds = self
            .at_next_success
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(mailbox);
        for kind in kinds.unwrap_or_default() {
            self.resolve(mailbox, kind, now);
        }
    }

    /// Replaces each profile's mailboxes (a reload added or removed some):
    /// the profile rule counts the new members, and a mailbox no longer in
    /// its profile stops counting as failing there (its profile alert is
    /// resolved if half or fewer of the members fail now).
    pub fn set_members(&self, members: HashMap<String, Vec<String>>, now: UnixTime) {
        let mut fewer_failing: Vec<String> = Vec::new();
        {
            let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
            failures.retain(|profile, failing| {
                let before = failing.len();
                let names = members.get(profile);
                failing.retain(|m, _| names.is_some_and(|n| n.contains(m)));
                let total = names.map_or(0, Vec::len);
                if failing.len() < before && failing.len() * 2 <= total {
                    fewer_failing.push(profile.clone());
                }
                names.is_some()
            });
            *self
                .profile_members
                .write()
                .unwrap_or_else(|p| p.into_inner()) = members;
        }
        for profile in fewer_failing {
            self.resolve(&profile, kind::PROFILE_FAILING, now);
        }
    }

    /// Resolves the open alerts of a mailbox that a reload removed: nobody
    /// can act on them any more, and nothing would ever resolve them.
    pub fn mailbox_removed(&self, mailbox: &str, now: UnixTime) {
        let query = crate::store::AlertQuery {
            mailbox: Some(mailbox.to_string()),
            state: Some(crate::store::AlertState::Open),
            limit: 10_000,
            ..Default::default()
        };
        let open = match self.store.query_alerts(&query) {
            Ok(open) => open,
            Err(e) => {
                tracing::error!(mailbox, error = %e, "cannot read the removed mailbox's alerts");
                return;
            }
        };
        let mut kinds: Vec<String> = open
            .into_iter()
            // The query also matches a profile's alert of the same name.
            .filter(|a| a.mailbox.as_deref() == Some(mailbox))
            .map(|a| a.kind)
            .collect();
        kinds.sort();
        kinds.dedup();
        for kind in kinds {
            self.resolve(mailbox, &kind, now);
        }
    }

    /// How many mailboxes `profile` has.
    fn members_of(&self, profile: &str) -> usize {
        self.profile_members
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(profile)
            .map_or(0, Vec::len)
    }

    /// The store the alerts are kept in.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Records an alert (updating the open one of the same subject and kind)
    /// and logs it at the matching level. Failing to store an alert must not
    /// take the mailbox down, so that only logs.
    pub fn raise(
        &self,
        kind: &str,
        level: AlertLevel,
        mailbox: Option<&str>,
        profile: Option<&str>,
        text: &str,
        now: UnixTime,
    ) {
        match level {
            AlertLevel::Error => tracing::error!(mailbox, profile, kind, alert = text, "alert"),
            AlertLevel::Warning => tracing::warn!(mailbox, profile, kind, alert = text, "alert"),
            AlertLevel::Information => {
                tracing::info!(mailbox, profile, kind, alert = text, "alert")
            }
        }
        let new = NewAlert {
            kind,
            level,
            mailbox,
            profile,
            text,
        };
        if let Err(e) = self.store.raise_alert(new, now) {
            tracing::error!(error = %e, "cannot store alert");
        }
    }

    /// Notes a failed cycle of `mailbox` (with its error); raises the
    /// profile alert when the share of failing mailboxes within the window
    /// passes one half.
    pub fn mailbox_failed(&self, profile: &str, mailbox: &str, error: &str, now: UnixTime) {
        let total = self.members_of(profile);
        let (failing, names, latest) = {
            let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
            let entry = map.entry(profile.to_string()).or_default();
            entry.insert(mailbox.to_string(), (Instant::now(), error.to_string()));
            entry.retain(|_, (t, _)| t.elapsed() <= PROFILE_WINDOW);
            let mut names: Vec<&str> = entry.keys().map(String::as_str).collect();
            names.sort_unstable();
            let shown: Vec<String> = names.iter().take(5).map(|n| format!("{n:?}")).collect();
            let more = names.len().saturating_sub(shown.len());
            let mut listed = shown.join(", ");
            if more > 0 {
                listed.push_str(&format!(" and {more} more"));
            }
            (entry.len(), listed, error.to_string())
        };
        // A profile of one mailbox has no storm to replace: its mailbox
        // alert says it all.
        if total > 1 && failing * 2 > total {
            let text = format!(
                "{failing} of {total} mailboxes of profile {profile:?} failed within the last hour ({names}); latest error: {latest}. A shared cause is likely: the server, the network or the profile's credentials"
            );
            self.raise(
                kind::PROFILE_FAILING,
                AlertLevel::Error,
                None,
                Some(profile),
                &text,
                now,
            );
        }
    }

    /// Resolves the open alerts of `subject` (a mailbox, or a profile for a
    /// profile alert) of `kind` (or its family, see
    /// [`crate::store::kind_covers`]): the condition cleared. Failing to
    /// store that only logs.
    pub fn resolve(&self, subject: &str, kind: &str, now: UnixTime) {
        match self.store.resolve_alerts(subject, kind, now) {
            Ok(0) => {}
            Ok(n) => tracing::info!(subject, resolved = n, kind, "alert resolved"),
            Err(e) => tracing::error!(error = %e, "cannot resolve alerts"),
        }
    }

    /// Forgets a mailbox's failure after a successful cycle, and resolves the
    /// profile alert once half or fewer of the profile's mailboxes fail.
    pub fn mailbox_recovered(&self, profile: &str, mailbox: &str, now: UnixTime) {
        let total = self.members_of(profile);
        let failing = {
            let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
            match map.get_mut(profile) {
                Some(entry) => {
                    if entry.remove(mailbox).is_none() {
                        // Was not failing: nothing changed for the profile.
                        return;
                    }
                    entry.retain(|_, (t, _)| t.elapsed() <= PROFILE_WINDOW);
                    entry.len()
                }
                None => return,
            }
        };
        if failing * 2 <= total {
            self.resolve(profile, kind::PROFILE_FAILING, now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledStore;

    #[test]
    fn profile_alert_only_past_half() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        let members = HashMap::from([(
            "p".to_string(),
            vec!["a".into(), "b".into(), "c".into(), "d".into()],
        )]);
        let alerts = Alerts::new(store.clone(), members);
        alerts.mailbox_failed("p", "a", "refused", 1);
        alerts.mailbox_failed("p", "b", "refused", 2);
        assert!(
            store.alerts(10).unwrap().is_empty(),
            "2 of 4 is not more than half"
        );
        alerts.mailbox_recovered("p", "a", 3);
        alerts.mailbox_failed("p", "c", "refused", 3);
        assert!(
            store.alerts(10).unwrap().is_empty(),
            "a recovered: still 2 of 4"
        );
        alerts.mailbox_failed("p", "a", "refused", 4);
        alerts.mailbox_failed("p", "b", "connection refused", 5);
        let all = store.alerts(10).unwrap();
        assert_eq!(all.len(), 1, "one profile alert, updated: {all:?}");
        let a = &all[0];
        assert_eq!(a.profile.as_deref(), Some("p"));
        assert_eq!(a.mailbox, None);
        assert_eq!(
            (a.level, a.kind.as_str(), a.count),
            (AlertLevel::Error, kind::PROFILE_FAILING, 2)
        );
        assert!(a.text.starts_with("3 of 4"), "{}", a.text);
        assert!(a.text.contains("\"a\", \"b\", \"c\""), "{}", a.text);
        assert!(
            a.text.contains("latest error: connection refused"),
            "{}",
            a.text
        );

        alerts.mailbox_recovered("p", "a", 6);
        assert_eq!(
            store.alerts(10).unwrap()[0].resolved_at,
            Some(6),
            "b and c still fail: 2 of 4 is half, so the profile alert is over"
        );
    }

    /// Regression: a Test & Enable that failed while the mailbox kept
    /// running left its Error open until someone tested again, though the
    /// mailbox synced fine after it.
    #[test]
    fn an_incoming_test_alert_of_a_running_mailbox_resolves_at_its_next_sync() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        let alerts = Alerts::new(store.clone(), HashMap::new());
        for m in ["a", "b"] {
            alerts.raise(
                kind::INCOMING_TEST,
                AlertLevel::Error,
                Some(m),
                Some("p"),
                "incoming test failed",
                1,
            );
            alerts.resolve_at_next_success(m, kind::INCOMING_TEST);
        }
        alerts.resolve_at_next_success("a", kind::INCOMING_TEST);
        alerts.mailbox_synced("a", 5);
        let resolved = |m: &str| {
            store
                .alerts(10)
                .unwrap()
                .into_iter()
                .find(|x| x.mailbox.as_deref() == Some(m))
                .unwrap()
                .resolved_at
        };
        assert_eq!(resolved("a"), Some(5));
        assert_eq!(resolved("b"), None, "b has not synced yet");
        // Once: a new failed test after it is again for the next sync.
        alerts.mailbox_synced("b", 6);
        assert_eq!(resolved("b"), Some(6));
    }

    #[test]
    fn profile_alert_resolves_when_half_or_fewer_fail() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        let members = HashMap::from([("p".to_string(), vec!["a".into(), "b".into(), "c".into()])]);
        let alerts = Alerts::new(store.clone(), members);
        for m in ["a", "b", "c"] {
            alerts.mailbox_failed("p", m, "down", 1);
        }
        assert!(store.alerts(10).unwrap()[0].is_open());
        alerts.mailbox_recovered("p", "a", 2);
        assert!(store.alerts(10).unwrap()[0].is_open(), "2 of 3 still fail");
        alerts.mailbox_recovered("p", "b", 3);
        let a = &store.alerts(10).unwrap()[0];
        assert_eq!(a.resolved_at, Some(3), "1 of 3 fails: resolved");
    }

    #[test]
    fn a_removed_mailbox_leaves_no_open_alert_and_others_keep_theirs() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        // A profile named like the mailbox: its alert is not the mailbox's.
        let members = HashMap::from([("gone".to_string(), vec!["other".into()])]);
        let alerts = Alerts::new(store.clone(), members);
        for (mailbox, kind) in [
            ("gone", kind::DISABLED),
            ("gone", "quarantine:unparseable"),
            ("other", kind::DISABLED),
        ] {
            alerts.raise(kind, AlertLevel::Error, Some(mailbox), Some("gone"), "x", 1);
        }
        alerts.raise(
            kind::PROFILE_FAILING,
            AlertLevel::Error,
            None,
            Some("gone"),
            "y",
            1,
        );
        alerts.mailbox_removed("gone", 2);
        let open: Vec<(Option<String>, String)> = store
            .alerts(10)
            .unwrap()
            .into_iter()
            .filter(|a| a.is_open())
            .map(|a| (a.mailbox, a.kind))
            .collect();
        assert_eq!(open.len(), 2, "{open:?}");
        assert!(open.contains(&(Some("other".into()), kind::DISABLED.into())));
        assert!(open.contains(&(None, kind::PROFILE_FAILING.into())));
    }

    #[test]
    fn a_reload_changes_who_counts_for_the_profile_alert() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        let four = |names: &[&str]| {
            HashMap::from([(
                "p".to_string(),
                names.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
            )])
        };
        let alerts = Alerts::new(store.clone(), four(&["a", "b", "c", "d"]));
        alerts.mailbox_failed("p", "a", "down", 1);
        alerts.mailbox_failed("p", "b", "down", 1);
        assert!(store.alerts(10).unwrap().is_empty(), "2 of 4");
        // c and d removed: the two failing ones are all the profile has.
        alerts.set_members(four(&["a", "b"]), 2);
        alerts.mailbox_failed("p", "b", "down", 2);
        let all = store.alerts(10).unwrap();
        assert_eq!(all.len(), 1, "{all:?}");
        assert!(all[0].text.starts_with("2 of 2"), "{}", all[0].text);
        // a replaced by e: a's failure no longer counts, and 1 of 2 is
        // not more than half.
        alerts.set_members(four(&["b", "e"]), 3);
        assert_eq!(
            store.alerts(10).unwrap()[0].resolved_at,
            Some(3),
            "1 of 2 fails"
        );
    }
}
