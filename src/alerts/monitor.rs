//! The alert monitor: what no single sync cycle can see. Every few seconds
//! it looks at the live view of all mailboxes and raises (and resolves)
//! alerts for a cycle that hangs, a mailbox that went quiet without a
//! failure to say why, and a backlog that keeps growing — the "mailbox
//! silently stopped while health looked green" cases.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{kind, Alerts};
use crate::config::SharedConfig;
use crate::model::{format_time, AlertLevel, UnixTime};
use crate::scheduler::{longest_poll_wait, LiveMailbox, Phase, Runtime};

/// How often the monitor looks.
const CHECK_EVERY: Duration = Duration::from_secs(10);
/// A backlog this large that grew at every look for [`BACKLOG_WINDOW`]
/// raises a Warning.
const BACKLOG_ALERT_AT: u64 = 1_000;
const BACKLOG_WINDOW: Duration = Duration::from_secs(600);

/// What the monitor remembers between looks.
pub struct Monitor {
    /// Read at each look: a reload's new settings apply from the next one.
    config: SharedConfig,
    alerts: Arc<Alerts>,
    /// mailbox → (backlog at the start of its growth, when it started, last
    /// backlog seen).
    growth: HashMap<String, (u64, Instant, u64)>,
    /// (mailbox, kind) of the open alerts this monitor owns: only these are
    /// resolved (each resolve takes the store's writer lock and scans the
    /// subject's keys; 10,000 mailboxes must not cost 30,000 of them every
    /// look). `None` until the first look read the
    /// ones left open by an earlier run.
    open: Option<HashSet<(String, &'static str)>>,
}

impl Monitor {
    pub fn new(config: impl Into<SharedConfig>, alerts: Arc<Alerts>) -> Self {
        Monitor {
            config: config.into(),
            alerts,
            growth: HashMap::new(),
            open: None,
        }
    }

    /// The open alerts of the monitor's kinds, read from the store once.
    fn open_alerts(&mut self) -> &mut HashSet<(String, &'static str)> {
        let alerts = &self.alerts;
        self.open.get_or_insert_with(|| {
            let q = crate::store::AlertQuery {
                state: Some(crate::store::AlertState::Open),
                limit: usize::MAX,
                ..Default::default()
            };
            let open = alerts.store().query_alerts(&q).unwrap_or_default();
            open.into_iter()
                .filter_map(|a| {
                    let k = [kind::STUCK, kind::STALLED, kind::BACKLOG]
                        .into_iter()
                        .find(|k| *k == a.kind)?;
                    Some((a.mailbox?, k))
                })
                .collect()
        })
    }

    fn resolve(&mut self, mailbox: &str, kind: &'static str, now: UnixTime) {
        let alerts = self.alerts.clone();
        if self.open_alerts().remove(&(mailbox.to_string(), kind)) {
            alerts.resolve(mailbox, kind, now);
        }
    }

    /// One look at every mailbox, at wall time `now` and monotonic `at`.
    pub fn check(&mut self, mailboxes: &[LiveMailbox], now: UnixTime, at: Instant) {
        let config = self.config.current();
        let stuck_after = config.daemon.stuck_after;
        for m in mailboxes {
            let name = m.name.as_str();
            let profile = config.profiles.iter().find(|p| p.name == m.profile);
            // A hung cycle.
            match m.cycle_started.filter(|_| m.phase == Phase::Syncing) {
                Some(started) if at.saturating_duration_since(started) > stuck_after => {
                    let text = format!(
                        "a sync cycle has been running for {} (longer than stuck_after, {}): the server or the network may hang; /readyz reports it too",
                        humantime::format_duration(round(at.saturating_duration_since(started))),
                        humantime::format_duration(stuck_after)
                    );
                    self.raise(kind::STUCK, AlertLevel::Error, m, &text, now);
                }
                _ => self.resolve(name, kind::STUCK, now),
            }
            // Quiet: running, no failure recorded since the last success,
            // yet no success for too long.
            let running = matches!(m.phase, Phase::Syncing | Phase::Waiting);
            // Past the longest idle wait of its profile's back-off only.
            let quiet_for = profile.map(|p| {
                p.stall_alert_after
                    + longest_poll_wait(p.poll_interval, p.idle_backoff_cap)
                    + stuck_after
            });
            let last_ok = m.state.last_success_at;
            match (running, quiet_for, last_ok) {
                (true, Some(limit), Some(ok)) if now - ok > limit.as_secs() as i64 => {
                    let text = format!(
                        "no successful sync since {} and no error to say why (phase {:?}): the mailbox task may be stuck waiting; restart the daemon if this lasts",
                        format_time(ok),
                        m.phase
                    );
                    self.raise(kind::STALLED, AlertLevel::Error, m, &text, now);
                }
                _ => self.resolve(name, kind::STALLED, now),
            }
            self.backlog(m, now, at);
        }
    }

    fn backlog(&mut self, m: &LiveMailbox, now: UnixTime, at: Instant) {
        let entry = self
            .growth
            .entry(m.name.clone())
            .or_insert((m.backlog, at, m.backlog));
        if m.backlog < entry.2 || m.backlog == 0 {
            // Shrinking (or empty): growth starts over from here.
            *entry = (m.backlog, at, m.backlog);
        } else {
            entry.2 = m.backlog;
        }
        let (from, since, current) = *entry;
        if current >= BACKLOG_ALERT_AT
            && current > from
            && at.saturating_duration_since(since) >= BACKLOG_WINDOW
        {
            let text = format!(
                "the backlog grew from {from} to {current} messages in {} and is still growing: mail arrives faster than it is processed (batch_size, poll_interval, max_concurrent_connections), or the CRM link holds it up",
                humantime::format_duration(round(at.saturating_duration_since(since)))
            );
            self.raise(kind::BACKLOG, AlertLevel::Warning, m, &text, now);
        } else if current < BACKLOG_ALERT_AT / 2 || current < from {
            self.resolve(&m.name, kind::BACKLOG, now);
        }
    }

    fn raise(
        &mut self,
        kind: &'static str,
        level: AlertLevel,
        m: &LiveMailbox,
        text: &str,
        now: UnixTime,
    ) {
        self.open_alerts().insert((m.name.clone(), kind));
        self.alerts
            .raise(kind, level, Some(&m.name), Some(&m.profile), text, now);
    }
}

/// Whole seconds, for messages.
fn round(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs())
}

/// Runs the monitor until `cancel`.
pub fn spawn_monitor(
    tracker: &TaskTracker,
    cancel: CancellationToken,
    runtime: Arc<Runtime>,
    mut monitor: Monitor,
) {
    tracker.spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(CHECK_EVERY) => {}
                _ = cancel.cancelled() => return,
            }
            let snapshot = runtime.snapshot();
            // Alerts are store writes: off the async threads.
            let looked = tokio::task::spawn_blocking(move || {
                monitor.check(&snapshot, crate::model::now(), Instant::now());
                monitor
            })
            .await;
            match looked {
                Ok(m) => monitor = m,
                Err(e) => {
                    tracing::error!(error = %e, "the alert monitor failed; stale and hung mailboxes are no longer reported");
                    return;
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Alert, ApprovalStatus, MailboxState, NewAlert};
    use crate::store::{SledStore, Store};

    fn setup(dir: &std::path::Path) -> (Monitor, Arc<dyn Store>) {
        setup_with(dir, "")
    }

    /// `profile` holds more keys of the mailbox's profile.
    fn setup_with(dir: &std::path::Path, profile: &str) -> (Monitor, Arc<dyn Store>) {
        let text = format!(
            r#"
[daemon]
state_dir = "{state}"
stuck_after = "10s"
[admin]
enabled = false
[[profiles]]
name = "local"
type = "maildir"
poll_interval = "1s"
stall_alert_after = "1s"
{profile}
[[mailboxes]]
name = "m"
profile = "local"
email = "m@example.test"
approval = "approved"
path = "{state}/m"
"#,
            state = dir.display()
        );
        let config = Arc::new(crate::config::from_toml_str(&text, [], dir).unwrap());
        let store: Arc<dyn Store> = Arc::new(SledStore::open(&dir.join("store")).unwrap());
        let alerts = Arc::new(Alerts::new(store.clone(), HashMap::new()));
        (Monitor::new(config, alerts), store)
    }

    fn live(phase: Phase, last_success_at: Option<UnixTime>, backlog: u64) -> LiveMailbox {
        LiveMailbox {
            name: "m".into(),
            profile: "local".into(),
            email: "m@example.test".into(),
            protocol: "maildir".into(),
            started_at: 0,
            task_id: 1,
            phase,
            backlog,
            state: MailboxState {
                name: "m".into(),
                enabled: true,
                last_success_at,
                ..Default::default()
            },
            approval: ApprovalStatus::Approved,
            disabled_by_operator_at: None,
            not_synced_since: None,
            restarts: 0,
            not_processing_reason: None,
            cycle_started: None,
        }
    }

    fn of_kind(store: &Arc<dyn Store>, kind: &str) -> Vec<Alert> {
        store
            .alerts(100)
            .unwrap()
            .into_iter()
            .filter(|a| a.kind == kind)
            .collect()
    }

    #[test]
    fn a_cycle_running_past_stuck_after_raises_an_error_that_resolves_when_it_ends() {
        let dir = tempfile::tempdir().unwrap();
        let (mut monitor, store) = setup(dir.path());
        let t0 = Instant::now();
        let now = 1_000_000;
        let mut m = live(Phase::Syncing, Some(now), 0);
        m.cycle_started = Some(t0);
        monitor.check(&[m.clone()], now, t0 + Duration::from_secs(9));
        assert!(
            of_kind(&store, kind::STUCK).is_empty(),
            "9 s is not past 10 s"
        );
        monitor.check(&[m.clone()], now + 11, t0 + Duration::from_secs(11));
        monitor.check(&[m.clone()], now + 21, t0 + Duration::from_secs(21));
        let stuck = of_kind(&store, kind::STUCK);
        assert_eq!(stuck.len(), 1, "{stuck:?}");
        assert_eq!((stuck[0].level, stuck[0].count), (AlertLevel::Error, 2));
        assert!(
            stuck[0]
                .text
                .starts_with("a sync cycle has been running for 21s"),
            "{}",
            stuck[0].text
        );
        m.phase = Phase::Waiting;
        m.cycle_started = None;
        monitor.check(&[m], now + 22, t0 + Duration::from_secs(22));
        assert_eq!(of_kind(&store, kind::STUCK)[0].resolved_at, Some(now + 22));
    }

    #[test]
    fn a_quiet_mailbox_without_successes_is_stalled_but_one_backing_off_is_left_to_its_failure_alert(
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (mut monitor, store) = setup(dir.path());
        let at = Instant::now();
        let now = 2_000_000;
        // Limit: stall_alert_after 1 s + 4 × poll 1 s × 1.1 (jitter) +
        // stuck_after 10 s = 15.4 s.
        monitor.check(&[live(Phase::Waiting, Some(now - 15), 0)], now, at);
        monitor.check(&[live(Phase::BackingOff, Some(now - 100), 0)], now, at);
        monitor.check(&[live(Phase::Disabled, Some(now - 100), 0)], now, at);
        assert!(of_kind(&store, kind::STALLED).is_empty());
        monitor.check(&[live(Phase::Waiting, Some(now - 16), 0)], now, at);
        let stalled = of_kind(&store, kind::STALLED);
        assert_eq!(stalled.len(), 1);
        assert!(
            stalled[0].text.starts_with("no successful sync since "),
            "{}",
            stalled[0].text
        );
        monitor.check(&[live(Phase::Waiting, Some(now + 5), 0)], now + 5, at);
        assert_eq!(of_kind(&store, kind::STALLED)[0].resolved_at, Some(now + 5));
    }

    /// Regression: the quiet limit assumed an idle back-off of 4 poll
    /// intervals whatever the profile's `idle_backoff_cap`, so with a larger
    /// cap every idle mailbox was reported stalled between two polls.
    #[test]
    fn an_idle_mailbox_within_its_profiles_idle_backoff_cap_is_not_stalled() {
        let dir = tempfile::tempdir().unwrap();
        let (mut monitor, store) = setup_with(dir.path(), "idle_backoff_cap = 60");
        let at = Instant::now();
        let now = 2_500_000;
        // Limit: 1 s + 60 × 1 s × 1.1 + 10 s = 77 s.
        monitor.check(&[live(Phase::Waiting, Some(now - 77), 0)], now, at);
        assert!(of_kind(&store, kind::STALLED).is_empty());
        monitor.check(&[live(Phase::Waiting, Some(now - 78), 0)], now, at);
        assert_eq!(of_kind(&store, kind::STALLED).len(), 1);
    }

    #[test]
    fn a_backlog_growing_for_ten_minutes_warns_and_the_warning_resolves_once_it_shrinks() {
        let dir = tempfile::tempdir().unwrap();
        let (mut monitor, store) = setup(dir.path());
        let t0 = Instant::now();
        let now = 3_000_000;
        let at = |min: u64| t0 + Duration::from_secs(60 * min);
        for (min, backlog) in [(0, 1200), (5, 1500), (9, 1700)] {
            monitor.check(&[live(Phase::Syncing, Some(now), backlog)], now, at(min));
        }
        assert!(
            of_kind(&store, kind::BACKLOG).is_empty(),
            "not ten minutes yet"
        );
        // A dip starts the growth over.
        monitor.check(&[live(Phase::Syncing, Some(now), 1600)], now, at(10));
        monitor.check(&[live(Phase::Syncing, Some(now), 1800)], now, at(11));
        assert!(
            of_kind(&store, kind::BACKLOG).is_empty(),
            "growing only since minute 10"
        );
        monitor.check(&[live(Phase::Syncing, Some(now), 2500)], now, at(20));
        let backlog = of_kind(&store, kind::BACKLOG);
        assert_eq!(backlog.len(), 1);
        assert_eq!(backlog[0].level, AlertLevel::Warning);
        assert!(
            backlog[0]
                .text
                .starts_with("the backlog grew from 1600 to 2500 messages in 10m"),
            "{}",
            backlog[0].text
        );
        monitor.check(&[live(Phase::Syncing, Some(now), 400)], now + 1, at(21));
        assert_eq!(of_kind(&store, kind::BACKLOG)[0].resolved_at, Some(now + 1));
    }

    #[test]
    fn an_alert_left_open_by_an_earlier_run_is_resolved_at_the_first_look() {
        let dir = tempfile::tempdir().unwrap();
        let (mut monitor, store) = setup(dir.path());
        store
            .raise_alert(
                NewAlert {
                    kind: kind::STALLED,
                    level: AlertLevel::Error,
                    mailbox: Some("m"),
                    profile: Some("local"),
                    text: "no successful sync since …",
                },
                1,
            )
            .unwrap();
        monitor.check(
            &[live(Phase::Waiting, Some(4_000_000), 0)],
            4_000_000,
            Instant::now(),
        );
        assert_eq!(
            of_kind(&store, kind::STALLED)[0].resolved_at,
            Some(4_000_000)
        );
    }
}
