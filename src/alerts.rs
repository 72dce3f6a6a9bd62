//! Alerts: what the operator sees on the mailbox and the profile (Dynamics levels
//! Error / Warning / Information), aggregated so a flapping mailbox produces one
//! alert with a count, not thousands.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::model::{AlertLevel, UnixTime};
use crate::store::Store;

/// Raises alerts and applies the profile-wide rule: when more than half of a
/// profile's mailboxes fail within an hour, the profile owner gets an alert.
pub struct Alerts {
    store: Arc<dyn Store>,
    /// profile → mailboxes of that profile.
    profile_members: HashMap<String, Vec<String>>,
    /// profile → mailbox → last failure.
    failures: Mutex<HashMap<String, HashMap<String, Instant>>>,
}

/// Window of the profile-wide failure rule.
const PROFILE_WINDOW: Duration = Duration::from_secs(3600);

impl Alerts {
    /// `members` lists each profile's mailboxes.
    pub fn new(store: Arc<dyn Store>, members: HashMap<String, Vec<String>>) -> Self {
        Alerts {
            store,
            profile_members: members,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Records an alert and logs it at the matching level. Failing to store an
    /// alert must not take the mailbox down, so that only logs.
    pub fn raise(
        &self,
        level: AlertLevel,
        mailbox: Option<&str>,
        profile: Option<&str>,
        text: &str,
        now: UnixTime,
    ) {
        match level {
            AlertLevel::Error => tracing::error!(mailbox, profile, alert = text, "alert"),
            AlertLevel::Warning => tracing::warn!(mailbox, profile, alert = text, "alert"),
            AlertLevel::Information => tracing::info!(mailbox, profile, alert = text, "alert"),
        }
        if let Err(e) = self.store.raise_alert(level, mailbox, profile, text, now) {
            tracing::error!(error = %e, "cannot store alert");
        }
    }

    /// Notes a failed cycle of `mailbox`; raises the profile alert when the
    /// share of failing mailboxes within the window passes one half.
    pub fn mailbox_failed(&self, profile: &str, mailbox: &str, now: UnixTime) {
        let total = self.profile_members.get(profile).map_or(0, Vec::len);
        let failing = {
            let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
            let entry = map.entry(profile.to_string()).or_default();
            entry.insert(mailbox.to_string(), Instant::now());
            entry.retain(|_, t| t.elapsed() <= PROFILE_WINDOW);
            entry.len()
        };
        if total > 0 && failing * 2 > total {
            let text = format!(
                "{failing} of {total} mailboxes of profile {profile:?} failed within the last hour"
            );
            self.raise(AlertLevel::Warning, None, Some(profile), &text, now);
        }
    }

    /// Resolves the open alerts of `mailbox` whose text starts with `prefix`
    /// (the condition cleared); failing to store that only logs.
    pub fn resolve(&self, mailbox: &str, prefix: &str, now: UnixTime) {
        match self.store.resolve_alerts(mailbox, prefix, now) {
            Ok(0) => {}
            Ok(n) => tracing::info!(mailbox, resolved = n, alert = prefix, "alert resolved"),
            Err(e) => tracing::error!(error = %e, "cannot resolve alerts"),
        }
    }

    /// Forgets a mailbox's failure after a successful cycle.
    pub fn mailbox_recovered(&self, profile: &str, mailbox: &str) {
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = map.get_mut(profile) {
            entry.remove(mailbox);
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
        alerts.mailbox_failed("p", "a", 1);
        alerts.mailbox_failed("p", "b", 2);
        assert!(
            store.alerts(10).unwrap().is_empty(),
            "2 of 4 is not more than half"
        );
        alerts.mailbox_recovered("p", "a");
        alerts.mailbox_failed("p", "c", 3);
        assert!(
            store.alerts(10).unwrap().is_empty(),
            "a recovered: still 2 of 4"
        );
        alerts.mailbox_failed("p", "a", 4);
        let all = store.alerts(10).unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].profile.as_deref(), Some("p"));
        assert!(all[0].text.starts_with("3 of 4"), "{}", all[0].text);
    }
}
