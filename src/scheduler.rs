//! Scheduler: one task per mailbox, each running sync cycles, waiting (poll or
//! push), and backing off on transient errors according to [`Backoff`].
//!
//! The lifecycle rules:
//! * Transient errors are retried forever with capped, jittered back-off
//!   ([`Backoff::for_profile`]). A mailbox without a successful sync for the
//!   profile's `stall_alert_after` gets an Error alert ("not synced since …")
//!   and is named by `/readyz`; both clear on the next success.
//! * A permanent error (login rejected, certificate invalid, folder gone)
//!   disables the mailbox with an Error alert. The task stays alive, waiting
//!   to be re-enabled without a restart: by `POST
//!   /api/v1/mailboxes/{name}/enable` ([`Runtime::request_enable`]) or when the
//!   content of its password or token file changes. Re-enabling runs Test &
//!   Enable again.
//! * [`MailboxTask::supervise`] restarts a task that panicked, with back-off,
//!   an Error alert naming the panic and a restart metric.
//!
//! Follow-ups (keyword, move, delete) are owed from the commit that records
//! their message: the commit writes them, each cycle starts by carrying out
//! what is still owed, and later commits clear what was done. They never fail
//! a cycle; one refused for a permanent reason is retried on the next cycles
//! and given up with a Warning after `MAX_FOLLOW_UP_FAILURES` (5) attempts.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::alerts::Alerts;
use crate::config::{Config, Mailbox, Profile};
use crate::connector::{Ack, AckKind, Connector, ConnectorError};
use crate::error::{Classify, Disposition};
use crate::model::{
    self, AlertLevel, ApprovalStatus, FollowUp, IncomingDelivery, MailboxState, SourceKey,
    TestResult, TestStatus, UnixTime,
};
use crate::pipeline::{self, ItemResult, PipelineContext, PipelineError};
use crate::store::{CommitBatch, CommitOutcome, Store, StoreError, Tally};
use crate::telemetry;

/// Retry policy for transient failures: exponential with jitter, capped.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
    /// Fraction of the delay added or removed at random (0–1), so mailboxes of
    /// one failing server do not retry in lockstep.
    pub jitter: f64,
}

/// First retry delay; the delay doubles from here up to the profile's cap.
const BACKOFF_BASE: Duration = Duration::from_secs(5);
/// Default cap (the profile's `retry_backoff_max` default).
const BACKOFF_MAX: Duration = Duration::from_secs(900);

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: BACKOFF_BASE,
            max: BACKOFF_MAX,
            jitter: 0.2,
        }
    }
}

impl Backoff {
    /// The profile's policy: capped at its `retry_backoff_max`.
    pub fn for_profile(profile: &Profile) -> Self {
        let max = profile.retry_backoff_max;
        Backoff {
            base: BACKOFF_BASE.min(max),
            max,
            ..Backoff::default()
        }
    }

    /// Delay before retry number `attempt` (1-based). Never above `max`: at
    /// the cap the jitter only shortens.
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(20);
        let raw = self.base.saturating_mul(1u32 << exp).min(self.max);
        let spread = (fastrand::f64() * 2.0 - 1.0) * self.jitter;
        raw.mul_f64((1.0 + spread).max(0.0)).min(self.max)
    }
}

/// What a mailbox task is doing now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Starting,
    Syncing,
    Waiting,
    BackingOff,
    Disabled,
    NotApproved,
    Stopped,
}

/// Live view of one mailbox for the admin API and readiness.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct LiveMailbox {
    pub name: String,
    pub profile: String,
    pub email: String,
    pub protocol: String,
    pub phase: Phase,
    pub backlog: u64,
    pub state: MailboxState,
    /// Set while the mailbox has gone longer than `stall_alert_after` without
    /// a successful sync: the last success (or the task start if none).
    pub not_synced_since: Option<UnixTime>,
    /// Times the supervisor restarted the task after a panic.
    pub restarts: u64,
    /// Why the mailbox processes no mail while the configuration keeps it
    /// from running (not approved, disabled, no incoming delivery); `None`
    /// otherwise. A permanent error's reason is `state.disabled_reason`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_processing_reason: Option<String>,
    #[serde(skip)]
    pub cycle_started: Option<Instant>,
}

/// Shared runtime state.
#[derive(Debug, Default)]
pub struct Runtime {
    pub mailboxes: RwLock<BTreeMap<String, LiveMailbox>>,
    pub scheduler_running: AtomicBool,
    /// The CRM outbox workers' view for `/readyz` (stuck or paused adapters).
    pub outbox: Arc<crate::crm::worker::OutboxHealth>,
    /// Disabled mailboxes waiting to be re-enabled → their wake-up.
    reenable: Mutex<HashMap<String, Arc<Notify>>>,
}

/// Why [`Runtime::request_enable`] refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnableError {
    #[error("no mailbox {0:?}")]
    Unknown(String),
    #[error("mailbox {0:?} is disabled in the configuration (enabled = false or incoming = \"none\"): change the configuration and restart")]
    DisabledByConfig(String),
    #[error("mailbox {name:?} is not disabled (phase {phase:?})")]
    NotDisabled { name: String, phase: Phase },
}

impl Runtime {
    fn update(&self, name: &str, f: impl FnOnce(&mut LiveMailbox)) {
        let mut map = self.mailboxes.write().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = map.get_mut(name) {
            f(m);
        }
    }

    /// Mailboxes whose current sync cycle has run longer than `after`.
    pub fn stuck(&self, after: Duration) -> Vec<String> {
        let map = self.mailboxes.read().unwrap_or_else(|p| p.into_inner());
        map.values()
            .filter(|m| {
                m.phase == Phase::Syncing && m.cycle_started.is_some_and(|t| t.elapsed() > after)
            })
            .map(|m| m.name.clone())
            .collect()
    }

    /// Mailboxes past their `stall_alert_after` without a successful sync:
    /// (name, not synced since, last error).
    pub fn stalled(&self) -> Vec<(String, UnixTime, Option<String>)> {
        let map = self.mailboxes.read().unwrap_or_else(|p| p.into_inner());
        map.values()
            .filter_map(|m| {
                m.not_synced_since
                    .map(|t| (m.name.clone(), t, m.state.last_sync_error.clone()))
            })
            .collect()
    }

    /// A snapshot of every mailbox.
    pub fn snapshot(&self) -> Vec<LiveMailbox> {
        self.mailboxes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Wakes a mailbox disabled by a permanent error so it runs Test & Enable
    /// again.
    pub fn request_enable(&self, name: &str) -> Result<(), EnableError> {
        let phase = {
            let map = self.mailboxes.read().unwrap_or_else(|p| p.into_inner());
            match map.get(name) {
                Some(m) => m.phase,
                None => return Err(EnableError::Unknown(name.to_string())),
            }
        };
        let waiting = self
            .reenable
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned();
        match waiting {
            Some(wake) => {
                // A stored permit: a wake-up racing the task's wait is not lost.
                wake.notify_one();
                Ok(())
            }
            None if phase == Phase::Disabled => {
                Err(EnableError::DisabledByConfig(name.to_string()))
            }
            None => Err(EnableError::NotDisabled {
                name: name.to_string(),
                phase,
            }),
        }
    }

    /// The wake-up of a disabled mailbox, registered from the moment it is
    /// disabled so an enable request right then is not refused or lost.
    fn reenable_handle(&self, name: &str) -> Arc<Notify> {
        let mut map = self.reenable.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(name.to_string()).or_default().clone()
    }

    fn clear_reenable(&self, name: &str) {
        let mut map = self.reenable.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(name);
    }
}

/// Everything a mailbox task needs.
#[derive(Clone)]
pub struct MailboxTask {
    pub config: Arc<Config>,
    pub mailbox: Mailbox,
    pub profile: Profile,
    pub store: Arc<dyn Store>,
    pub runtime: Arc<Runtime>,
    pub alerts: Arc<Alerts>,
    pub connections: Arc<Semaphore>,
    pub cancel: CancellationToken,
    pub backoff: Backoff,
    /// How often a disabled mailbox checks its password/token file.
    pub watch_every: Duration,
}

/// How often a disabled mailbox looks at its secret files by default.
pub const WATCH_EVERY: Duration = Duration::from_secs(3);

/// Alert texts that a successful sync clears (see [`MailboxTask::recovered`]).
const STALL_ALERT: &str = "not synced since ";
const DISABLED_ALERT: &str = "mailbox disabled: ";
const TRANSIENT_ALERT: &str = "transient error, retrying with back-off: ";

/// A task that ran this long without a panic starts its restart back-off over.
const RESTART_RESET_AFTER: Duration = Duration::from_secs(600);

/// Why a cycle failed.
#[derive(Debug, thiserror::Error)]
enum CycleError {
    #[error(transparent)]
    Connector(#[from] ConnectorError),
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("internal task failure: {0}")]
    Join(String),
}

impl Classify for CycleError {
    fn disposition(&self) -> Disposition {
        match self {
            CycleError::Connector(e) => e.disposition(),
            CycleError::Pipeline(e) => e.disposition(),
            CycleError::Store(e) => e.disposition(),
            CycleError::Join(_) => Disposition::Transient,
        }
    }
}

/// The start of the not-approved alert's text (what resolves it).
fn not_approved_prefix(email: &str) -> String {
    format!("email address {email} is not approved")
}

/// Why a mailbox that is not approved processes no mail (its alert text).
fn not_approved_reason(email: &str, approval: ApprovalStatus) -> String {
    let status = match approval {
        ApprovalStatus::Empty => "empty",
        ApprovalStatus::Approved => "approved",
        ApprovalStatus::Pending => "pending",
        ApprovalStatus::Rejected => "rejected",
    };
    format!(
        "{} (approval = \"{status}\"): no mail is processed while process_only_approved = true (\"process emails only for approved users/queues\"); approve the address or turn the setting off",
        not_approved_prefix(email)
    )
}

/// How one enabled stretch of a mailbox ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exit {
    /// A permanent error disabled it: wait to be re-enabled.
    Disabled,
    /// Shutdown, or nothing to run (disabled by config, not approved).
    Stopped,
}

/// Content fingerprint of a watched file (`None`: missing or unreadable).
fn file_fingerprint(path: &std::path::Path) -> Option<u64> {
    let bytes = std::fs::read(path).ok()?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    Some(h.finish())
}

/// The text of a panic payload.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_string()
    }
}

impl MailboxTask {
    /// Registers the mailbox in the runtime view before its task starts.
    pub fn register(&self, protocol: &str) {
        let state = self.load_state();
        let live = LiveMailbox {
            name: self.mailbox.name.clone(),
            profile: self.profile.name.clone(),
            email: self.mailbox.email.clone(),
            protocol: protocol.to_string(),
            phase: Phase::Starting,
            backlog: 0,
            state,
            not_synced_since: None,
            restarts: 0,
            not_processing_reason: None,
            cycle_started: None,
        };
        let mut map = self
            .runtime
            .mailboxes
            .write()
            .unwrap_or_else(|p| p.into_inner());
        map.insert(self.mailbox.name.clone(), live);
    }

    fn load_state(&self) -> MailboxState {
        match self.store.mailbox_state(&self.mailbox.name) {
            Ok(Some(s)) => s,
            Ok(None) => MailboxState {
                name: self.mailbox.name.clone(),
                enabled: true,
                ..Default::default()
            },
            Err(e) => {
                tracing::error!(mailbox = %self.mailbox.name, error = %e, "cannot read mailbox state; starting fresh");
                MailboxState {
                    name: self.mailbox.name.clone(),
                    enabled: true,
                    ..Default::default()
                }
            }
        }
    }

    fn set_phase(&self, phase: Phase, state: &MailboxState) {
        let started = (phase == Phase::Syncing).then(Instant::now);
        self.runtime.update(&self.mailbox.name, |m| {
            m.phase = phase;
            m.state = state.clone();
            m.cycle_started = started;
        });
        let up = if matches!(phase, Phase::Disabled | Phase::NotApproved | Phase::Stopped) {
            0.0
        } else {
            1.0
        };
        metrics::gauge!(telemetry::MAILBOX_UP, "mailbox" => self.mailbox.name.clone()).set(up);
    }

    fn alert(&self, level: AlertLevel, text: &str) {
        self.alerts.raise(
            level,
            Some(&self.mailbox.name),
            Some(&self.profile.name),
            text,
            model::now(),
        );
    }

    /// The files whose change re-enables a disabled mailbox: its own and its
    /// profile's password and token files.
    pub fn watched_files(&self) -> Vec<PathBuf> {
        [
            &self.mailbox.password_file,
            &self.mailbox.token_file,
            &self.profile.password_file,
            &self.profile.token_file,
            &self
                .profile
                .graph
                .as_ref()
                .and_then(|g| g.client_secret_file.clone()),
        ]
        .into_iter()
        .flatten()
        .cloned()
        .collect()
    }

    /// Runs the task under supervision: a panic is caught, alerted, counted
    /// ([`telemetry::TASK_RESTARTS`]) and the task restarted with back-off.
    /// `make` builds the connector (again at every restart and re-enable, so
    /// a changed password file is read).
    pub async fn supervise<C, F>(self, make: F)
    where
        C: Connector + 'static,
        F: FnMut() -> Result<C, String> + Clone + Send + 'static,
    {
        let name = self.mailbox.name.clone();
        let mut restarts = 0u32;
        loop {
            let started = tokio::time::Instant::now();
            let run = tokio::spawn(self.clone().run(make.clone()));
            let payload = match run.await {
                Ok(()) => return,
                Err(e) if e.is_panic() => e.into_panic(),
                Err(_) => return,
            };
            if started.elapsed() >= RESTART_RESET_AFTER {
                restarts = 0;
            }
            restarts = restarts.saturating_add(1);
            let message = panic_message(payload.as_ref());
            metrics::counter!(telemetry::TASK_RESTARTS, "mailbox" => name.clone()).increment(1);
            let delay = self.backoff.delay(restarts);
            self.alert(
                AlertLevel::Error,
                &format!("mailbox task panicked and is restarted with back-off: {message}"),
            );
            self.runtime.update(&name, |m| {
                m.restarts += 1;
                m.phase = Phase::BackingOff;
                m.cycle_started = None;
            });
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.cancel.cancelled() => return,
            }
        }
    }

    /// Runs the mailbox until cancelled: enabled stretches, and between them
    /// (after a permanent error) waits to be re-enabled.
    pub async fn run<C, F>(self, mut make: F)
    where
        C: Connector,
        F: FnMut() -> Result<C, String> + Send,
    {
        if !self.runnable() {
            return;
        }
        let watched = self.watched_files();
        loop {
            // Taken before the connector reads them: a change from here on,
            // even one made while the mailbox was failing, re-enables it.
            let baseline: Vec<Option<u64>> = watched.iter().map(|p| file_fingerprint(p)).collect();
            let exit = match make() {
                Ok(mut connector) => {
                    let exit = self.run_enabled(&mut connector).await;
                    connector.close().await;
                    exit
                }
                Err(why) => {
                    let mut state = self.load_state();
                    self.disable(&mut state, &why);
                    Exit::Disabled
                }
            };
            if exit == Exit::Stopped || !self.wait_for_reenable(&watched, &baseline).await {
                break;
            }
        }
        let state = self.load_state();
        // A mailbox disabled at shutdown stays shown as disabled.
        if state.enabled {
            self.set_phase(Phase::Stopped, &state);
        }
    }

    /// False (with the phase set) for a mailbox the configuration keeps from
    /// running: disabled, no incoming delivery, or not approved.
    fn runnable(&self) -> bool {
        let state = self.load_state();
        let not_processing = |why: String| {
            self.runtime.update(&self.mailbox.name, |m| {
                m.not_processing_reason = Some(why);
            });
        };
        if !self.mailbox.enabled || self.mailbox.incoming == IncomingDelivery::None {
            not_processing(if self.mailbox.enabled {
                "incoming = \"none\" in the configuration: no mail is read".into()
            } else {
                "enabled = false in the configuration".into()
            });
            self.set_phase(Phase::Disabled, &state);
            return false;
        }
        if self.config.process_only_approved && self.mailbox.approval != ApprovalStatus::Approved {
            let why = not_approved_reason(&self.mailbox.email, self.mailbox.approval);
            // One Information alert (as Dynamics raises it), aggregated:
            // raised again at each start, it only counts up.
            self.alert(AlertLevel::Information, &why);
            not_processing(why);
            self.set_phase(Phase::NotApproved, &state);
            return false;
        }
        // Approved now: an alert from a run when it was not is over.
        self.alerts.resolve(
            &self.mailbox.name,
            &not_approved_prefix(&self.mailbox.email),
            model::now(),
        );
        true
    }

    /// Waits until the mailbox is enabled through the API or a watched file's
    /// content differs from `baseline`; false on shutdown.
    async fn wait_for_reenable(&self, watched: &[PathBuf], baseline: &[Option<u64>]) -> bool {
        let name = &self.mailbox.name;
        let wake = self.runtime.reenable_handle(name);
        let why = loop {
            let now: Vec<Option<u64>> = watched.iter().map(|p| file_fingerprint(p)).collect();
            if now != baseline {
                break Some("its password or token file changed");
            }
            tokio::select! {
                _ = wake.notified() => break Some("enabled through the admin API"),
                _ = tokio::time::sleep(self.watch_every) => {}
                _ = self.cancel.cancelled() => break None,
            }
        };
        self.runtime.clear_reenable(name);
        match why {
            Some(why) => {
                tracing::info!(mailbox = %name, "re-enabling the mailbox: {why}");
                true
            }
            None => false,
        }
    }

    /// Test & Enable, then sync cycles until a permanent error or shutdown.
    async fn run_enabled<C: Connector>(&self, connector: &mut C) -> Exit {
        let name = self.mailbox.name.clone();
        let mut state = self.load_state();
        // A restart or re-enable is a fresh Test & Enable: an operator who
        // fixed the cause should not have to re-enable by hand.
        state.enabled = true;
        state.disabled_reason = None;

        // Test & Enable (incoming). The connection the test leaves open is
        // reused by the first cycle: its permit goes with it, so no
        // connection is ever open without one.
        let mut held = self.connections.clone().acquire_owned().await.ok();
        let test = connector.test().await;
        match &test {
            Ok(detail) => {
                state.incoming_test = TestResult {
                    status: TestStatus::Success,
                    completed_on: Some(model::now()),
                    detail: Some(detail.clone()),
                };
                tracing::info!(mailbox = %name, protocol = connector.protocol(), "{detail}");
            }
            Err(e) => {
                state.incoming_test = TestResult {
                    status: TestStatus::Failure,
                    completed_on: Some(model::now()),
                    detail: Some(e.to_string()),
                };
            }
        }
        self.note_token_expiry(connector, &mut state);
        if let Err(e) = &test {
            self.token_alert(e);
        }
        if let Err(e) = test {
            if e.disposition() == Disposition::Permanent {
                self.disable(&mut state, &e.to_string());
                return Exit::Disabled;
            }
        }
        self.save_state(&state);

        // The stall clock: tokio's, so tests can run it on paused time.
        let mut healthy_at = tokio::time::Instant::now();
        let started_wall = model::now();
        // Alerts to resolve at the next success: whatever is open at start
        // (from before a restart or re-enable), then what failures raised.
        let mut alerts_open = true;
        loop {
            if self.cancel.is_cancelled() {
                return Exit::Stopped;
            }
            self.set_phase(Phase::Syncing, &state);
            let permit = match held.take() {
                Some(p) => Some(p),
                None => self.connections.clone().acquire_owned().await.ok(),
            };
            let result = self.cycle(connector, &mut state).await;
            let now = model::now();
            state.last_sync_at = Some(now);
            self.note_token_expiry(connector, &mut state);
            match result {
                Ok(found) => {
                    state.transient_failures = 0;
                    state.last_success_at = Some(now);
                    state.postponed_until = None;
                    state.no_email_cycles = if found == 0 {
                        state.no_email_cycles.saturating_add(1)
                    } else {
                        0
                    };
                    metrics::gauge!(telemetry::LAST_SUCCESS, "mailbox" => name.clone())
                        .set(now as f64);
                    healthy_at = tokio::time::Instant::now();
                    self.alerts.mailbox_recovered(&self.profile.name, &name);
                    if std::mem::take(&mut alerts_open) {
                        self.recovered(now);
                    }
                    self.save_state(&state);
                    self.set_phase(Phase::Waiting, &state);
                    let wait = idle_interval(self.profile.poll_interval, state.no_email_cycles);
                    // A connection kept open between polls (reuse, IDLE) counts
                    // against the profile's limit: keep it only with a permit.
                    // The semaphore is FIFO, so mailboxes queued for a cycle get
                    // their turn when an idling one comes back.
                    // Kept only while no one can be waiting (a free permit
                    // means an empty queue); otherwise closed before the
                    // permit goes, and a permit free after that may IDLE on
                    // a new connection.
                    let permit = match permit {
                        Some(p) if self.connections.available_permits() > 0 => Some(p),
                        other => {
                            connector.close().await;
                            drop(other);
                            if self.profile.idle {
                                self.connections.clone().try_acquire_owned().ok()
                            } else {
                                None
                            }
                        }
                    };
                    let waited = connector
                        .wait_for_changes(wait, permit.is_some(), &self.cancel)
                        .await;
                    // The connection kept through the wait goes into the
                    // next cycle with its permit.
                    held = permit;
                    if let Err(e) = waited {
                        tracing::warn!(mailbox = %name, error = %e, "waiting for changes failed; polling instead");
                    }
                }
                Err(e) => {
                    // Not open beyond the permit (a connector error has
                    // dropped it already; a store or pipeline error has not).
                    connector.close().await;
                    drop(permit);
                    let disposition = e.disposition();
                    if let CycleError::Connector(c) = &e {
                        self.token_alert(c);
                    }
                    metrics::counter!(telemetry::SYNC_ERRORS, "mailbox" => name.clone(), "disposition" => disposition.to_string()).increment(1);
                    state.last_sync_error = Some(e.to_string());
                    state.last_sync_error_at = Some(now);
                    self.alerts.mailbox_failed(&self.profile.name, &name, now);
                    state.transient_failures = state.transient_failures.saturating_add(1);
                    if disposition == Disposition::Permanent {
                        self.disable(&mut state, &e.to_string());
                        return Exit::Disabled;
                    }
                    alerts_open = true;
                    // The server's own Retry-After (Graph) when it asks for longer.
                    let server_wait = match &e {
                        CycleError::Connector(c) => c.retry_after(),
                        _ => None,
                    };
                    let delay = self
                        .backoff
                        .delay(state.transient_failures)
                        .max(server_wait.unwrap_or_default());
                    state.postponed_until = Some(now + delay.as_secs() as i64);
                    self.alert(AlertLevel::Warning, &format!("{TRANSIENT_ALERT}{e}"));
                    if healthy_at.elapsed() >= self.profile.stall_alert_after {
                        let since = state.last_success_at.unwrap_or(started_wall);
                        self.alert(
                            AlertLevel::Error,
                            &format!("{STALL_ALERT}{}: {e}", model::format_time(since)),
                        );
                        self.runtime
                            .update(&name, |m| m.not_synced_since = Some(since));
                    }
                    self.save_state(&state);
                    self.set_phase(Phase::BackingOff, &state);
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.cancel.cancelled() => {}
                    }
                }
            }
        }
    }

    /// After a successful sync that follows failures (or a start): the stall,
    /// disabled and retry alerts are resolved.
    fn recovered(&self, now: UnixTime) {
        let name = &self.mailbox.name;
        self.runtime.update(name, |m| m.not_synced_since = None);
        for prefix in [STALL_ALERT, DISABLED_ALERT, TRANSIENT_ALERT] {
            self.alerts.resolve(name, prefix, now);
        }
    }

    /// Records the OAuth token expiry the connector last logged in with, and
    /// warns ahead of it: an expiring token is the classic "mailbox silently
    /// stopped". The alert text names the expiry, so it is raised once per
    /// token (the store counts repeats) rather than once per cycle.
    fn note_token_expiry<C: Connector>(&self, connector: &C, state: &mut MailboxState) {
        let expiry = connector.token_expires_at();
        state.token_expires_at = expiry;
        let Some(at) = expiry else { return };
        let warn_from = at.saturating_sub(self.profile.token_expiry_warning.as_secs() as i64);
        let now = model::now();
        if now >= warn_from && now < at {
            self.alert(
                AlertLevel::Warning,
                &format!(
                    "{} expires at {}: renew it before then, or the mailbox stops syncing",
                    connector.expiring_credential(),
                    model::format_time(at)
                ),
            );
        }
    }

    /// An Error alert for a rejected OAuth token, saying what to do; the
    /// generic retry/disable alerts do not tell an expired token apart from a
    /// wrong password.
    fn token_alert(&self, e: &ConnectorError) {
        if matches!(e, ConnectorError::TokenRejected { .. })
            || matches!(e, ConnectorError::Graph(g) if g.is_auth_failure())
        {
            self.alert(AlertLevel::Error, &e.to_string());
        }
    }

    fn disable(&self, state: &mut MailboxState, why: &str) {
        state.enabled = false;
        state.disabled_reason = Some(why.to_string());
        state.last_sync_error = Some(why.to_string());
        state.last_sync_error_at = Some(model::now());
        self.alert(
            AlertLevel::Error,
            &format!("{DISABLED_ALERT}{why} (re-enabled when its password, token or client secret file changes, or by POST /api/v1/mailboxes/{}/enable)", self.mailbox.name),
        );
        // Disabled is not stalled: the disable alert says what is wrong.
        self.runtime
            .update(&self.mailbox.name, |m| m.not_synced_since = None);
        self.runtime.reenable_handle(&self.mailbox.name);
        self.save_state(state);
        self.set_phase(Phase::Disabled, state);
    }

    fn save_state(&self, state: &MailboxState) {
        if let Err(e) = self.store.put_mailbox_state(state) {
            tracing::error!(mailbox = %self.mailbox.name, error = %e, "cannot save mailbox state");
        }
    }

    /// One sync cycle: first the follow-ups still owed (by an earlier cycle, or
    /// by a process that died between a commit and its follow-ups), then
    /// batches until the source has nothing more (or shutdown).
    /// Returns how many new messages were recorded.
    async fn cycle<C: Connector>(
        &self,
        connector: &mut C,
        state: &mut MailboxState,
    ) -> Result<u64, CycleError> {
        let mut changes = FollowUpChanges::default();
        let owed = self.store.follow_ups(&self.mailbox.name)?;
        if !owed.is_empty() {
            let acks = owed
                .iter()
                .map(|f| Ack {
                    source: f.source.clone(),
                    kind: f.kind,
                })
                .collect();
            self.follow_up(connector, acks, owed, &mut changes).await;
        }
        let result = self.sync_batches(connector, state, &mut changes).await;
        // What the last follow-ups did, unless a batch commit carried it already.
        if !changes.is_empty() {
            let commit = CommitBatch {
                follow_ups: changes.updated,
                follow_ups_done: changes.done,
                ..Default::default()
            };
            let store = self.store.clone();
            let settled = tokio::task::spawn_blocking(move || store.commit(commit))
                .await
                .map_err(|e| CycleError::Join(e.to_string()))
                .and_then(|r| r.map_err(CycleError::from));
            if let Err(e) = settled {
                // Not lost: the follow-ups stay recorded and are replayed (idempotent).
                tracing::warn!(mailbox = %self.mailbox.name, error = %e, "cannot clear completed follow-ups");
            }
        }
        result
    }

    /// The batches of a cycle. Each commit also records the follow-ups its
    /// messages are owed, and clears those done since the last commit.
    async fn sync_batches<C: Connector>(
        &self,
        connector: &mut C,
        state: &mut MailboxState,
        changes: &mut FollowUpChanges,
    ) -> Result<u64, CycleError> {
        let ctx = Arc::new(PipelineContext::for_mailbox(&self.config, &self.mailbox));
        let mut found = 0u64;
        loop {
            let batch = connector.fetch().await?;
            for (level, text) in &batch.notices {
                self.alert(*level, text);
            }
            let backlog = batch.backlog;
            self.runtime
                .update(&self.mailbox.name, |m| m.backlog = backlog);
            metrics::gauge!(telemetry::BACKLOG, "mailbox" => self.mailbox.name.clone())
                .set(backlog as f64);
            if batch.messages.is_empty() && batch.positions.is_empty() {
                return Ok(found);
            }
            let more = batch.more;
            let messages = batch.messages;
            let store = self.store.clone();
            let ctx2 = ctx.clone();
            let (mut commit, results) = tokio::task::spawn_blocking(move || {
                pipeline::process(store.as_ref(), &ctx2, &messages, model::now())
            })
            .await
            .map_err(|e| CycleError::Join(e.to_string()))??;
            commit.positions = batch
                .positions
                .into_iter()
                .map(|(f, p)| (self.mailbox.name.clone(), f, p))
                .collect();

            let acks: Vec<Ack> = results
                .iter()
                .map(|(source, r)| Ack {
                    source: source.clone(),
                    kind: if matches!(r, ItemResult::Quarantined { .. }) {
                        AckKind::Failed
                    } else {
                        AckKind::Recorded
                    },
                })
                .collect();
            let now = model::now();
            let owed: Vec<FollowUp> = acks
                .iter()
                .filter(|a| connector.wants_follow_up(a.kind))
                .map(|a| FollowUp {
                    source: a.source.clone(),
                    kind: a.kind,
                    recorded_at: now,
                    failures: 0,
                    last_error: None,
                })
                .collect();
            let recorded = results
                .iter()
                .filter(|(_, r)| matches!(r, ItemResult::Correlated { .. }))
                .count() as u64;
            commit.follow_ups = std::mem::take(&mut changes.updated);
            commit.follow_ups.extend(owed.iter().cloned());
            commit.follow_ups_done = std::mem::take(&mut changes.done);
            // The store adds this batch's tally to the counters it writes.
            commit.mailbox_state = Some(state.clone());
            let store = self.store.clone();
            let outcomes = tokio::task::spawn_blocking(move || store.commit(commit))
                .await
                .map_err(|e| CycleError::Join(e.to_string()))??;
            // The same tally for our copy, so it matches what was written.
            Tally::of(&outcomes).add_to(state);
            let live = state.clone();
            self.runtime.update(&self.mailbox.name, |m| m.state = live);
            found += recorded;
            self.record_metrics(&results, &outcomes);

            // Alerts for what the commit recorded, without waiting on the
            // server's follow-ups.
            for notice in pipeline::notices(&results) {
                self.alert(AlertLevel::Warning, notice);
            }
            for (source, r) in &results {
                if let ItemResult::Quarantined { reason } = r {
                    self.alert(
                        AlertLevel::Warning,
                        &format!("message {} quarantined: {reason}", source),
                    );
                }
            }
            #[cfg(feature = "fault-injection")]
            if !owed.is_empty() {
                crate::fault::committed_with_follow_ups();
            }
            self.follow_up(connector, acks, owed, changes).await;
            if !more || self.cancel.is_cancelled() {
                return Ok(found);
            }
        }
    }

    /// Carries out follow-ups whose records (`owed`) are committed, and notes
    /// in `changes` what the next commit clears or updates. Never fails the
    /// cycle: what did not happen stays recorded and is tried again next
    /// cycle; a follow-up refused [`MAX_FOLLOW_UP_FAILURES`] times for a
    /// permanent reason is given up with a Warning, so it cannot pin the
    /// mailbox.
    async fn follow_up<C: Connector>(
        &self,
        connector: &mut C,
        acks: Vec<Ack>,
        owed: Vec<FollowUp>,
        changes: &mut FollowUpChanges,
    ) {
        let report = match connector.acknowledge(acks).await {
            Ok(report) => report,
            Err(e) => {
                tracing::warn!(mailbox = %self.mailbox.name, error = %e, pending = owed.len(), "follow-ups failed; they are retried next cycle");
                return;
            }
        };
        let failed: HashMap<&SourceKey, (&str, Disposition)> = report
            .failed
            .iter()
            .map(|(s, e, d)| (s, (e.as_str(), *d)))
            .collect();
        let obsolete: HashMap<&SourceKey, &str> = report
            .obsolete
            .iter()
            .map(|(s, why)| (s, why.as_str()))
            .collect();
        let mut dropped: BTreeMap<&str, usize> = BTreeMap::new();
        for mut f in owed {
            if let Some(why) = obsolete.get(&f.source) {
                *dropped.entry(why).or_default() += 1;
                changes.done.push(f.source);
                continue;
            }
            let Some((error, disposition)) = failed.get(&f.source).copied() else {
                changes.done.push(f.source);
                continue;
            };
            if disposition == Disposition::Transient {
                // Retried as it is: an outage must not use up its attempts.
                continue;
            }
            f.failures += 1;
            f.last_error = Some(error.to_string());
            if f.failures >= MAX_FOLLOW_UP_FAILURES {
                self.alert(
                    AlertLevel::Warning,
                    &format!(
                        "gave up the follow-up ({}) on message {} after {} failed attempts: {error}",
                        follow_up_action(f.kind),
                        f.source,
                        f.failures
                    ),
                );
                changes.done.push(f.source);
            } else {
                tracing::warn!(mailbox = %self.mailbox.name, source = %f.source, attempt = f.failures, %error, "follow-up failed; retried next cycle");
                changes.updated.push(f);
            }
        }
        for (why, n) in dropped {
            self.alert(
                AlertLevel::Information,
                &format!("{n} follow-up(s) on processed messages dropped: {why}"),
            );
        }
    }

    fn record_metrics(
        &self,
        results: &[(model::SourceKey, ItemResult)],
        outcomes: &[CommitOutcome],
    ) {
        let m = self.mailbox.name.clone();
        let mut outcome_iter = outcomes.iter();
        for (_, r) in results {
            match r {
                ItemResult::AlreadySeen => {}
                ItemResult::Quarantined { .. } => {
                    outcome_iter.next();
                    metrics::counter!(telemetry::FAILED, "mailbox" => m.clone()).increment(1);
                }
                ItemResult::Correlated { decision, .. } => match outcome_iter.next() {
                    Some(CommitOutcome::Inserted(_)) => {
                        metrics::counter!(telemetry::PROCESSED, "mailbox" => m.clone())
                            .increment(1);
                        metrics::counter!(telemetry::CORRELATIONS, "method" => decision.method.as_str()).increment(1);
                    }
                    Some(CommitOutcome::Duplicate(_)) => {
                        metrics::counter!(telemetry::DUPLICATES, "mailbox" => m.clone())
                            .increment(1);
                    }
                    _ => {}
                },
            }
        }
    }
}

/// Permanent failures after which a follow-up is given up with a Warning
/// alert: a keyword or move the server keeps refusing must not be retried
/// forever.
const MAX_FOLLOW_UP_FAILURES: u32 = 5;

/// Follow-up records the next commit removes (`done`: carried out, obsolete
/// or given up) or rewrites (`updated`: a failure counted).
#[derive(Debug, Default)]
struct FollowUpChanges {
    done: Vec<SourceKey>,
    updated: Vec<FollowUp>,
}

impl FollowUpChanges {
    fn is_empty(&self) -> bool {
        self.done.is_empty() && self.updated.is_empty()
    }
}

/// What a follow-up of this kind does, for alerts.
fn follow_up_action(kind: AckKind) -> &'static str {
    match kind {
        AckKind::Recorded => "keyword or delete",
        AckKind::Failed => "move to the failed-mail folder",
    }
}

/// Poll interval, stretched for mailboxes that keep finding nothing (up to 4×).
fn idle_interval(base: Duration, empty_cycles: u32) -> Duration {
    let factor = 1 + (empty_cycles / 10).min(3);
    base * factor
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connector::FetchBatch;
    use crate::store::SledStore;

    /// What the scripted connector answers to `test` and `fetch`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Mode {
        Succeed,
        Transient,
        Permanent,
        Panic,
    }

    #[derive(Debug)]
    struct Script {
        mode: Mode,
        tests: u32,
        /// (paused) time of every fetch, to read the back-off delays off.
        fetches: Vec<tokio::time::Instant>,
        /// The password the connector was last built with.
        secret: Option<String>,
    }

    /// A connector whose answers the test switches; clones share the script,
    /// so the task's rebuilt connectors follow it too.
    #[derive(Debug, Clone)]
    struct Fake(Arc<Mutex<Script>>);

    impl Fake {
        fn new(mode: Mode) -> Self {
            Fake(Arc::new(Mutex::new(Script {
                mode,
                tests: 0,
                fetches: Vec::new(),
                secret: None,
            })))
        }
        fn script(&self) -> std::sync::MutexGuard<'_, Script> {
            self.0.lock().unwrap_or_else(|p| p.into_inner())
        }
        fn set(&self, mode: Mode) {
            self.script().mode = mode;
        }
        fn answer(&self) -> Result<(), ConnectorError> {
            let mode = self.script().mode;
            let disposition = match mode {
                Mode::Succeed => return Ok(()),
                Mode::Panic => panic!("scripted panic in fetch"),
                Mode::Transient => Disposition::Transient,
                Mode::Permanent => Disposition::Permanent,
            };
            Err(ConnectorError::Maildir {
                path: "fake".into(),
                detail: format!("scripted {disposition} failure"),
                disposition,
            })
        }
    }

    impl Connector for Fake {
        fn protocol(&self) -> &'static str {
            "fake"
        }
        async fn fetch(&mut self) -> Result<FetchBatch, ConnectorError> {
            self.script().fetches.push(tokio::time::Instant::now());
            self.answer()?;
            Ok(FetchBatch::default())
        }
        async fn acknowledge(&mut self, _acks: Vec<Ack>) -> Result<AckReport, ConnectorError> {
            Ok(AckReport::default())
        }
        async fn wait_for_changes(
            &mut self,
            max: Duration,
            _keep_connection: bool,
            cancel: &CancellationToken,
        ) -> Result<(), ConnectorError> {
            tokio::select! {
                _ = tokio::time::sleep(max) => {}
                _ = cancel.cancelled() => {}
            }
            Ok(())
        }
        async fn test(&mut self) -> Result<String, ConnectorError> {
            self.script().tests += 1;
            if self.script().mode == Mode::Panic {
                return Ok("fake ok".into());
            }
            self.answer().map(|()| "fake ok".to_string())
        }
        async fn close(&mut self) {}
    }

    struct Harness {
        task: MailboxTask,
        store: Arc<dyn Store>,
        runtime: Arc<Runtime>,
        _dir: tempfile::TempDir,
    }

    impl Harness {
        fn phase(&self) -> Phase {
            self.runtime.snapshot()[0].phase
        }
        fn state(&self) -> MailboxState {
            self.store.mailbox_state("m").unwrap().unwrap()
        }
        fn alerts_starting(&self, prefix: &str) -> Vec<model::Alert> {
            let all = self.store.alerts(1000).unwrap();
            all.into_iter()
                .filter(|a| a.text.starts_with(prefix))
                .collect()
        }
    }

    /// One IMAP mailbox "m" (the connector is the fake) with a password
    /// file; `profile_extra` adds profile keys.
    fn harness(profile_extra: &str) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("password");
        std::fs::write(&pw, "old-secret\n").unwrap();
        let cfg = format!(
            r#"
[daemon]
state_dir = "{state}"
[admin]
enabled = false
[[profiles]]
name = "p"
type = "imap_smtp"
host = "127.0.0.1"
poll_interval = "60s"
{profile_extra}
[[mailboxes]]
name = "m"
profile = "p"
email = "m@example.test"
approval = "approved"
username = "m"
password_file = "{pw}"
"#,
            state = dir.path().join("state").display(),
            pw = pw.display(),
        );
        let path = dir.path().join("config.toml");
        std::fs::write(&path, cfg).unwrap();
        let config = crate::config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        let store: Arc<dyn Store> = Arc::new(SledStore::open(&dir.path().join("store")).unwrap());
        let runtime = Arc::new(Runtime::default());
        let alerts = Arc::new(Alerts::new(store.clone(), HashMap::new()));
        let profile = config.profiles[0].clone();
        let task = MailboxTask {
            mailbox: config.mailboxes[0].clone(),
            backoff: Backoff::for_profile(&profile),
            profile,
            config: Arc::new(config),
            store: store.clone(),
            runtime: runtime.clone(),
            alerts,
            connections: Arc::new(Semaphore::new(1)),
            cancel: CancellationToken::new(),
            watch_every: WATCH_EVERY,
        };
        task.register("fake");
        Harness {
            task,
            store,
            runtime,
            _dir: dir,
        }
    }

    /// Builds connectors the way the daemon does: the password file read
    /// again at every (re)build.
    fn maker(h: &Harness, fake: &Fake) -> impl FnMut() -> Result<Fake, String> + Clone + Send {
        let (profile, mailbox, fake) =
            (h.task.profile.clone(), h.task.mailbox.clone(), fake.clone());
        move || {
            let (_, mailbox) = crate::daemon::with_current_secrets(&profile, &mailbox)?;
            fake.script().secret = mailbox.secret.map(|s| s.expose().to_string());
            Ok(fake.clone())
        }
    }

    async fn stop(h: &Harness, run: tokio::task::JoinHandle<()>) {
        h.task.cancel.cancel();
        run.await.unwrap();
    }

    fn sleep(secs: u64) -> tokio::time::Sleep {
        tokio::time::sleep(Duration::from_secs(secs))
    }

    #[tokio::test(start_paused = true)]
    async fn fifty_transient_failures_in_a_row_do_not_disable_the_mailbox() {
        let h = harness("");
        let fake = Fake::new(Mode::Transient);
        let run = tokio::spawn(h.task.clone().run(maker(&h, &fake)));
        // 50 failures take about 10 h at the 15 min cap; give it 24.
        for _ in 0..24 * 60 {
            if fake.script().fetches.len() >= 50 {
                break;
            }
            sleep(60).await;
        }
        assert!(fake.script().fetches.len() >= 50);
        assert_eq!(h.phase(), Phase::BackingOff);
        let state = h.state();
        assert!(state.enabled, "{state:?}");
        assert!(state.transient_failures >= 50, "{state:?}");
        assert!(h.alerts_starting(DISABLED_ALERT).is_empty());
        assert!(!run.is_finished(), "the task must keep retrying");
        fake.set(Mode::Succeed);
        sleep(16 * 60).await;
        assert_eq!(h.phase(), Phase::Waiting);
        assert_eq!(h.state().transient_failures, 0);
        stop(&h, run).await;
    }

    #[tokio::test(start_paused = true)]
    async fn transient_backoff_is_capped_at_the_profile_setting_with_jitter() {
        let h = harness("retry_backoff_max = \"2m\"");
        let fake = Fake::new(Mode::Transient);
        let run = tokio::spawn(h.task.clone().run(maker(&h, &fake)));
        sleep(6 * 3600).await;
        stop(&h, run).await;
        let times = fake.script().fetches.clone();
        let delays: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(delays.len() > 100, "{} retries in 6 h", delays.len());
        let cap = Duration::from_secs(120);
        assert!(delays.iter().all(|d| *d <= cap), "{delays:?}");
        // It grows from the 5 s base (±20 %) to the cap ...
        assert!(delays[0] >= Duration::from_secs(4) && delays[0] <= Duration::from_secs(6));
        let capped = &delays[10..];
        assert!(capped.iter().all(|d| *d >= cap.mul_f64(0.8)), "{capped:?}");
        // ... and is jittered there, not lockstep.
        let distinct: std::collections::BTreeSet<_> = capped.iter().collect();
        assert!(distinct.len() > 10, "{capped:?}");
        // The default cap is 15 minutes.
        assert_eq!(Backoff::default().max, Duration::from_secs(900));
        assert_eq!(
            Backoff::for_profile(&harness("").task.profile).max,
            Duration::from_secs(900)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn stall_alert_after_the_configured_time_resolves_on_the_next_success() {
        let h = harness("stall_alert_after = \"30m\"\nretry_backoff_max = \"1m\"");
        let fake = Fake::new(Mode::Transient);
        let run = tokio::spawn(h.task.clone().run(maker(&h, &fake)));
        sleep(20 * 60).await;
        assert!(h.runtime.stalled().is_empty(), "not yet 30 min");
        assert!(h.alerts_starting(STALL_ALERT).is_empty());
        sleep(20 * 60).await;
        let stalled = h.runtime.stalled();
        assert_eq!(stalled.len(), 1, "{stalled:?}");
        assert_eq!(stalled[0].0, "m");
        assert!(
            stalled[0]
                .2
                .as_deref()
                .unwrap_or("")
                .contains("scripted transient failure"),
            "{stalled:?}"
        );
        let open = h.alerts_starting(STALL_ALERT);
        assert_eq!(open.len(), 1, "{open:?}");
        assert_eq!(open[0].level, AlertLevel::Error);
        assert!(
            open[0].text.contains("scripted transient failure"),
            "{}",
            open[0].text
        );
        assert_eq!(open[0].resolved_at, None);
        assert_eq!(h.phase(), Phase::BackingOff, "it keeps retrying");

        fake.set(Mode::Succeed);
        sleep(2 * 60).await;
        assert_eq!(h.phase(), Phase::Waiting);
        assert!(h.runtime.stalled().is_empty());
        let resolved = h.alerts_starting(STALL_ALERT);
        assert_eq!(resolved.len(), 1);
        assert!(resolved[0].resolved_at.is_some(), "{resolved:?}");
        assert!(h
            .alerts_starting(TRANSIENT_ALERT)
            .iter()
            .all(|a| a.resolved_at.is_some()));
        stop(&h, run).await;
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_error_disables_and_the_task_waits_to_be_re_enabled() {
        let h = harness("");
        let fake = Fake::new(Mode::Succeed);
        let run = tokio::spawn(h.task.clone().run(maker(&h, &fake)));
        sleep(1).await;
        assert_eq!(h.phase(), Phase::Waiting);
        fake.set(Mode::Permanent);
        sleep(120).await;
        assert_eq!(h.phase(), Phase::Disabled);
        let state = h.state();
        assert!(!state.enabled);
        assert!(
            state
                .disabled_reason
                .as_deref()
                .unwrap_or("")
                .contains("scripted permanent"),
            "{state:?}"
        );
        assert_eq!(h.alerts_starting(DISABLED_ALERT).len(), 1);
        let fetches = fake.script().fetches.len();
        sleep(3600).await;
        assert_eq!(
            fake.script().fetches.len(),
            fetches,
            "no retries while disabled"
        );
        assert!(!run.is_finished(), "the disabled task stays alive");
        stop(&h, run).await;
        assert_eq!(h.phase(), Phase::Disabled);
    }

    #[tokio::test(start_paused = true)]
    async fn enable_request_re_enables_a_disabled_mailbox() {
        let h = harness("");
        let fake = Fake::new(Mode::Permanent);
        let run = tokio::spawn(h.task.clone().run(maker(&h, &fake)));
        sleep(10).await;
        assert_eq!(h.phase(), Phase::Disabled);
        assert_eq!(fake.script().tests, 1);
        assert_eq!(
            h.runtime.request_enable("nope"),
            Err(EnableError::Unknown("nope".into()))
        );
        fake.set(Mode::Succeed);
        h.runtime.request_enable("m").unwrap();
        sleep(10).await;
        assert_eq!(h.phase(), Phase::Waiting);
        assert_eq!(fake.script().tests, 2, "Test & Enable ran again");
        assert!(h.state().enabled);
        assert!(h
            .alerts_starting(DISABLED_ALERT)
            .iter()
            .all(|a| a.resolved_at.is_some()));
        assert!(matches!(
            h.runtime.request_enable("m"),
            Err(EnableError::NotDisabled { .. })
        ));
        stop(&h, run).await;
    }

    #[tokio::test(start_paused = true)]
    async fn secret_file_change_re_enables_a_disabled_mailbox() {
        let h = harness("");
        let fake = Fake::new(Mode::Permanent);
        let run = tokio::spawn(h.task.clone().run(maker(&h, &fake)));
        sleep(10).await;
        assert_eq!(h.phase(), Phase::Disabled);
        assert_eq!(fake.script().secret.as_deref(), Some("old-secret"));
        fake.set(Mode::Succeed);
        sleep(60).await;
        assert_eq!(h.phase(), Phase::Disabled, "nothing changed yet");
        let pw = h.task.mailbox.password_file.clone().unwrap();
        std::fs::write(&pw, "new-secret\n").unwrap();
        sleep(2 * WATCH_EVERY.as_secs()).await;
        assert_eq!(h.phase(), Phase::Waiting);
        assert_eq!(fake.script().tests, 2);
        assert_eq!(fake.script().secret.as_deref(), Some("new-secret"));
        stop(&h, run).await;
    }

    #[tokio::test(start_paused = true)]
    async fn panic_in_a_mailbox_task_restarts_it_with_an_alert_and_a_metric() {
        let prometheus = telemetry::prometheus();
        let mut h = harness("");
        // A name of its own: the metrics recorder is process-wide.
        h.task.mailbox.name = "m-panics".into();
        h.task.register("fake");
        let fake = Fake::new(Mode::Panic);
        let run = tokio::spawn(h.task.clone().supervise(maker(&h, &fake)));
        sleep(60).await;
        let live = h
            .runtime
            .snapshot()
            .into_iter()
            .find(|m| m.name == "m-panics")
            .unwrap();
        assert!(live.restarts >= 2, "{live:?}");
        let alerts: Vec<_> = h
            .store
            .alerts(100)
            .unwrap()
            .into_iter()
            .filter(|a| a.text.contains("panicked"))
            .collect();
        assert_eq!(alerts.len(), 1, "{alerts:?}");
        assert_eq!(alerts[0].level, AlertLevel::Error);
        assert!(
            alerts[0].text.contains("scripted panic in fetch"),
            "{}",
            alerts[0].text
        );
        assert_eq!(alerts[0].count, live.restarts);
        {
            let text = prometheus.expect("recorder installed").render();
            let line = text
                .lines()
                .find(|l| l.starts_with(telemetry::TASK_RESTARTS) && l.contains("m-panics"))
                .unwrap_or_else(|| panic!("no restart metric in {text}"));
            let n: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
            assert_eq!(n as u64, live.restarts, "{line}");
        }
        // Restarted, it syncs again once the cause is gone.
        fake.set(Mode::Succeed);
        sleep(600).await;
        let live = h
            .runtime
            .snapshot()
            .into_iter()
            .find(|m| m.name == "m-panics")
            .unwrap();
        assert_eq!(live.phase, Phase::Waiting);
        h.task.cancel.cancel();
        run.await.unwrap();
    }

    #[test]
    fn old_configs_with_max_transient_failures_still_load() {
        let h = harness("max_transient_failures = 1000");
        assert_eq!(h.task.profile.max_transient_failures, Some(1000));
        assert_eq!(harness("").task.profile.max_transient_failures, None);
    }

    #[test]
    fn backoff_grows_and_caps() {
        let b = Backoff {
            base: Duration::from_secs(5),
            max: Duration::from_secs(300),
            jitter: 0.0,
        };
        assert_eq!(b.delay(1), Duration::from_secs(5));
        assert_eq!(b.delay(2), Duration::from_secs(10));
        assert_eq!(b.delay(4), Duration::from_secs(40));
        assert_eq!(b.delay(30), Duration::from_secs(300));
        let j = Backoff { jitter: 0.2, ..b };
        for _ in 0..100 {
            let d = j.delay(3);
            assert!(
                d >= Duration::from_secs(16) && d <= Duration::from_secs(24),
                "{d:?}"
            );
        }
    }

    use crate::connector::maildir::MaildirConnector;
    use crate::connector::{AckReport, RawMessage};

    /// A task for mailbox "m" (Maildir profile) on a fresh store in `dir`.
    fn task(dir: &std::path::Path, batch_size: usize) -> MailboxTask {
        let text = format!(
            r#"
            [daemon]
            state_dir = "{state}"
            [admin]
            token = "0123456789abcdef"
            [[profiles]]
            name = "local"
            type = "maildir"
            batch_size = {batch_size}
            [[mailboxes]]
            name = "m"
            profile = "local"
            email = "m@us.example"
            approval = "approved"
            path = "{maildir}"
            "#,
            state = dir.join("state").display(),
            maildir = dir.join("Maildir").display(),
        );
        let config = crate::config::from_toml_str(&text, Vec::new(), dir).unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(&dir.join("store")).unwrap());
        let task = MailboxTask {
            mailbox: config.mailboxes[0].clone(),
            profile: config.profiles[0].clone(),
            config: Arc::new(config),
            alerts: Arc::new(Alerts::new(store.clone(), HashMap::new())),
            store,
            runtime: Arc::new(Runtime::default()),
            connections: Arc::new(Semaphore::new(1)),
            cancel: CancellationToken::new(),
            backoff: Backoff::default(),
            watch_every: WATCH_EVERY,
        };
        task.register("test");
        task
    }

    fn mail(i: usize, extra_header: &str) -> String {
        format!("{extra_header}From: c@customer.example\nTo: m@us.example\nSubject: Question {i}\nDate: Mon, 5 Jan 2026 10:00:{i:02} +0000\nMessage-ID: <q{i}@customer.example>\n\nHello {i}.\n")
    }

    fn live_processed(task: &MailboxTask) -> u64 {
        task.runtime.snapshot()[0].state.items_processed
    }

    /// Wraps a connector and notes, at every fetch, what the admin API shows
    /// as `items_processed` at that moment.
    struct Probe<C> {
        inner: C,
        runtime: Arc<Runtime>,
        seen: Vec<u64>,
    }

    impl<C: Connector> Connector for Probe<C> {
        fn protocol(&self) -> &'static str {
            "probe"
        }
        async fn fetch(&mut self) -> Result<FetchBatch, ConnectorError> {
            self.seen
                .push(self.runtime.snapshot()[0].state.items_processed);
            self.inner.fetch().await
        }
        async fn acknowledge(&mut self, acks: Vec<Ack>) -> Result<AckReport, ConnectorError> {
            self.inner.acknowledge(acks).await
        }
        fn wants_follow_up(&self, kind: AckKind) -> bool {
            self.inner.wants_follow_up(kind)
        }
        async fn wait_for_changes(
            &mut self,
            _max: Duration,
            _keep_connection: bool,
            _cancel: &CancellationToken,
        ) -> Result<(), ConnectorError> {
            Ok(())
        }
        async fn test(&mut self) -> Result<String, ConnectorError> {
            Ok(String::new())
        }
        async fn close(&mut self) {}
    }

    /// `items_processed` in `/api/v1/mailboxes` stayed at its old value for a
    /// whole cycle and counted re-delivered copies: it must move with every
    /// batch and count only new activities, as the metrics do.
    #[tokio::test]
    async fn items_processed_is_live_per_batch_and_counts_no_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let maildir = dir.path().join("Maildir");
        for d in ["cur", "new", "tmp"] {
            std::fs::create_dir_all(maildir.join(d)).unwrap();
        }
        // Four emails, two of them delivered twice (another Received line).
        for i in 0..4 {
            let path = maildir.join(format!("new/17670000{i:02}.M{i}P1.a"));
            std::fs::write(path, mail(i, "")).unwrap();
        }
        for i in 0..2 {
            let path = maildir.join(format!("new/17670001{i:02}.M{i}P1.b"));
            std::fs::write(path, mail(i, "Received: from relay by mx\n")).unwrap();
        }
        let task = task(dir.path(), 2);
        let mut probe = Probe {
            inner: MaildirConnector::new(
                "m",
                &maildir,
                Vec::new(),
                2,
                false,
                None,
                task.store.clone(),
            ),
            runtime: task.runtime.clone(),
            seen: Vec::new(),
        };
        let mut state = task.load_state();
        assert_eq!(task.cycle(&mut probe, &mut state).await.unwrap(), 6);
        // Three batches of two, each visible before the next fetch, and the
        // last (two copies) adds nothing.
        assert_eq!(probe.seen, vec![0, 2, 4]);
        assert_eq!(live_processed(&task), 4);
        assert_eq!(state.items_processed, 4);
        let stored = task.store.mailbox_state("m").unwrap().unwrap();
        assert_eq!(stored.items_processed, 4);
        assert_eq!(task.store.count_activities(Some("m")).unwrap(), 4);
    }

    /// A connector whose follow-ups always fail with the given disposition,
    /// delivering one message on its first fetch.
    struct Refusing {
        disposition: Disposition,
        delivered: bool,
        acked: Vec<Vec<SourceKey>>,
    }

    impl Connector for Refusing {
        fn protocol(&self) -> &'static str {
            "refusing"
        }
        async fn fetch(&mut self) -> Result<FetchBatch, ConnectorError> {
            let mut batch = FetchBatch::default();
            if !std::mem::replace(&mut self.delivered, true) {
                batch.messages.push(RawMessage {
                    source: SourceKey {
                        mailbox: "m".into(),
                        folder: "INBOX".into(),
                        uidvalidity: 1,
                        uid: "1".into(),
                    },
                    raw: mail(1, "").into_bytes(),
                    received_at: None,
                    too_large: None,
                    unfetchable: None,
                });
            }
            Ok(batch)
        }
        async fn acknowledge(&mut self, acks: Vec<Ack>) -> Result<AckReport, ConnectorError> {
            self.acked
                .push(acks.iter().map(|a| a.source.clone()).collect());
            let mut report = AckReport::default();
            for a in acks {
                report
                    .failed
                    .push((a.source, "refused".into(), self.disposition));
            }
            Ok(report)
        }
        async fn wait_for_changes(
            &mut self,
            _max: Duration,
            _keep_connection: bool,
            _cancel: &CancellationToken,
        ) -> Result<(), ConnectorError> {
            Ok(())
        }
        async fn test(&mut self) -> Result<String, ConnectorError> {
            Ok(String::new())
        }
        async fn close(&mut self) {}
    }

    /// A follow-up the server refuses for good is retried on the next
    /// cycles, then given up with a Warning; it never fails a cycle. One
    /// that fails for a passing reason (an outage) keeps its attempts.
    #[tokio::test]
    async fn refused_follow_ups_are_retried_a_bounded_number_of_times_then_alerted() {
        for disposition in [Disposition::Permanent, Disposition::Transient] {
            let dir = tempfile::tempdir().unwrap();
            let task = task(dir.path(), 10);
            let mut connector = Refusing {
                disposition,
                delivered: false,
                acked: Vec::new(),
            };
            let mut state = task.load_state();
            for cycle in 1..=MAX_FOLLOW_UP_FAILURES {
                task.cycle(&mut connector, &mut state).await.unwrap();
                assert_eq!(connector.acked.len(), cycle as usize);
                let owed = task.store.follow_ups("m").unwrap();
                if disposition == Disposition::Transient {
                    assert_eq!(owed.len(), 1);
                    assert_eq!(owed[0].failures, 0);
                } else if cycle < MAX_FOLLOW_UP_FAILURES {
                    assert_eq!(owed.len(), 1, "cycle {cycle}");
                    assert_eq!(owed[0].failures, cycle);
                    assert_eq!(owed[0].last_error.as_deref(), Some("refused"));
                } else {
                    assert!(owed.is_empty(), "given up after {cycle} attempts");
                }
            }
            let gave_up = task
                .store
                .alerts(10)
                .unwrap()
                .into_iter()
                .filter(|a| a.level == AlertLevel::Warning && a.text.contains("gave up"))
                .count();
            assert_eq!(
                gave_up,
                usize::from(disposition == Disposition::Permanent),
                "{disposition}"
            );
        }
    }

    /// Follow-ups a crashed process owed are carried out at the start of the
    /// next cycle, before anything is fetched, and cleared; one that can no
    /// longer apply (UIDVALIDITY changed) is dropped with a notice.
    #[tokio::test]
    async fn owed_follow_ups_are_replayed_before_fetching_and_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let maildir = dir.path().join("Maildir");
        for d in ["cur", "new", "tmp"] {
            std::fs::create_dir_all(maildir.join(d)).unwrap();
        }
        let file = maildir.join("new/1767000000.M1P1.a");
        std::fs::write(&file, mail(1, "")).unwrap();
        let task = task(dir.path(), 10);
        let source = |uid: &str| SourceKey {
            mailbox: "m".into(),
            folder: "INBOX".into(),
            uidvalidity: 0,
            uid: uid.into(),
        };
        // What a process that died right after its commit left behind: the
        // activity, and its follow-up (a delete) not yet carried out.
        let mut connector = MaildirConnector::new(
            "m",
            &maildir,
            Vec::new(),
            10,
            true,
            None,
            task.store.clone(),
        );
        let batch = connector.fetch().await.unwrap();
        let (mut commit, _) = pipeline::process(
            task.store.as_ref(),
            &PipelineContext::for_mailbox(&task.config, &task.mailbox),
            &batch.messages,
            0,
        )
        .unwrap();
        commit.follow_ups = vec![FollowUp {
            source: batch.messages[0].source.clone(),
            kind: AckKind::Recorded,
            recorded_at: 0,
            failures: 0,
            last_error: None,
        }];
        task.store.commit(commit).unwrap();
        assert!(file.exists());
        assert!(
            connector.fetch().await.unwrap().messages.is_empty(),
            "seen: never fetched again"
        );
        let mut state = task.load_state();
        task.cycle(&mut connector, &mut state).await.unwrap();
        assert!(!file.exists(), "the owed delete was carried out");
        assert!(task.store.follow_ups("m").unwrap().is_empty());
        // Replaying it again (a crash before the clear) is harmless.
        let report = connector
            .acknowledge(vec![Ack {
                source: batch.messages[0].source.clone(),
                kind: AckKind::Recorded,
            }])
            .await
            .unwrap();
        assert!(report.failed.is_empty() && report.obsolete.is_empty());

        // An obsolete one is dropped with an Information alert.
        struct Obsolete;
        impl Connector for Obsolete {
            fn protocol(&self) -> &'static str {
                "obsolete"
            }
            async fn fetch(&mut self) -> Result<FetchBatch, ConnectorError> {
                Ok(FetchBatch::default())
            }
            async fn acknowledge(&mut self, acks: Vec<Ack>) -> Result<AckReport, ConnectorError> {
                let mut r = AckReport::default();
                r.obsolete.extend(
                    acks.into_iter()
                        .map(|a| (a.source, "UIDVALIDITY changed".into())),
                );
                Ok(r)
            }
            async fn wait_for_changes(
                &mut self,
                _max: Duration,
                _keep_connection: bool,
                _cancel: &CancellationToken,
            ) -> Result<(), ConnectorError> {
                Ok(())
            }
            async fn test(&mut self) -> Result<String, ConnectorError> {
                Ok(String::new())
            }
            async fn close(&mut self) {}
        }
        let owed: Vec<FollowUp> = ["a", "b"]
            .iter()
            .map(|u| FollowUp {
                source: source(u),
                kind: AckKind::Recorded,
                recorded_at: 0,
                failures: 0,
                last_error: None,
            })
            .collect();
        task.store
            .commit(CommitBatch {
                follow_ups: owed,
                ..Default::default()
            })
            .unwrap();
        task.cycle(&mut Obsolete, &mut state).await.unwrap();
        assert!(task.store.follow_ups("m").unwrap().is_empty());
        let alerts = task.store.alerts(10).unwrap();
        assert!(
            alerts.iter().any(|a| a.level == AlertLevel::Information
                && a.text == "2 follow-up(s) on processed messages dropped: UIDVALIDITY changed"),
            "{alerts:?}"
        );
    }

    #[test]
    fn idle_mailboxes_back_off_up_to_four_times() {
        let base = Duration::from_secs(60);
        assert_eq!(idle_interval(base, 0), base);
        assert_eq!(idle_interval(base, 10), base * 2);
        assert_eq!(idle_interval(base, 1000), base * 4);
    }
}
