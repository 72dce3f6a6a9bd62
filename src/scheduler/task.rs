//! One mailbox's task: Test & Enable, the enabled loop (cycle, wait, back
//! off), disabling and re-enabling, and panic supervision.

use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::alerts::{kind, Alerts};
use crate::config::{Config, Mailbox, Profile};
use crate::connector::{Connector, ConnectorError};
use crate::deployment::{self, Claim, Claiming, Deployment};
use crate::error::{Classify, Disposition};
use crate::model::{
    self, AlertLevel, ApprovalStatus, IncomingDelivery, MailboxState, TestResult, UnixTime,
};
use crate::pipeline::PipelineError;
use crate::store::{Store, StoreError};
use crate::telemetry;

use super::backoff::{first_wait, idle_interval, poll_jitter, woken_early, Backoff};
use super::runtime::{ConnectionQueue, LiveMailbox, Phase, Runtime};

/// Everything a mailbox task needs.
#[derive(Clone)]
pub struct MailboxTask {
    pub config: Arc<Config>,
    /// Shared, as the profile: 10,000 mailbox tasks each hold a copy of
    /// the task (and its connector maker one of both) for their whole life.
    pub mailbox: Arc<Mailbox>,
    pub profile: Arc<Profile>,
    pub store: Arc<dyn Store>,
    pub runtime: Arc<Runtime>,
    pub alerts: Arc<Alerts>,
    pub connections: Arc<Semaphore>,
    pub cancel: CancellationToken,
    pub backoff: Backoff,
    /// How often a disabled mailbox checks its password/token file.
    pub watch_every: Duration,
    /// This deployment, whose marker the mailbox must hold.
    pub deployment: Arc<Deployment>,
}

/// How often a disabled mailbox looks at its secret files by default.
pub const WATCH_EVERY: Duration = Duration::from_secs(3);

/// Alert texts: a failing sync is one alert of kind
/// [`kind::SYNC_FAILING`] per mailbox, a Warning that becomes this Error
/// once the mailbox has not synced for `stall_alert_after`.
pub(super) const STALL_ALERT: &str = "not synced since ";
pub(super) const DISABLED_ALERT: &str = "mailbox disabled: ";
pub(super) const TRANSIENT_ALERT: &str = "transient error, retrying with back-off: ";

/// How stale the stored "last polled" stamps (`last_sync_at`,
/// `last_success_at`, `no_email_cycles`) may get. A cycle that found nothing
/// and changed nothing else writes nothing (at 10,000 idle mailboxes a durable
/// write per poll was most of the daemon's CPU): the stamps stay live in the
/// runtime view (admin API) and reach the store with the next write that
/// happens anyway, or after this long. After a SIGKILL the stored stamps may
/// be this much behind; nothing that matters is lost, since positions,
/// activities and follow-ups commit atomically with their batch.
pub(super) const STAMPS_PERSIST_EVERY: Duration = Duration::from_secs(300);

/// True when `a` and `b` differ at most in the stamps of an idle poll.
pub(super) fn only_stamps_differ(a: &MailboxState, b: &MailboxState) -> bool {
    let mut a = a.clone();
    a.last_sync_at = b.last_sync_at;
    a.last_success_at = b.last_success_at;
    a.no_email_cycles = b.no_email_cycles;
    a == *b
}

/// How long a permit is kept after a connection was dropped without a
/// LOGOUT, for its close to reach the server.
const DROPPED_CLOSE_GRACE: Duration = Duration::from_millis(100);

/// A task that ran this long without a panic starts its restart back-off over.
pub(super) const RESTART_RESET_AFTER: Duration = Duration::from_secs(600);

/// Why a cycle failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum CycleError {
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

/// The start of the not-approved alert's text.
pub(super) fn not_approved_prefix(email: &str) -> String {
    format!("email address {email} is not approved")
}

/// Why a mailbox that is not approved processes no mail (its alert text).
pub(super) fn not_approved_reason(email: &str, approval: ApprovalStatus) -> String {
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
pub(super) enum Gate {
    /// The configuration keeps the mailbox from running.
    Off,
    /// An operator's setting holds it (disabled, not approved).
    Hold,
    /// It may run.
    Go,
}

/// How an enabled stretch of a mailbox task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Exit {
    /// A permanent error disabled it: wait to be re-enabled.
    Disabled,
    /// Shutdown, or nothing to run (disabled by config, not approved).
    Stopped,
}

/// Content fingerprint of a watched file (`None`: missing or unreadable).
pub(super) fn file_fingerprint(path: &std::path::Path) -> Option<u64> {
    let bytes = std::fs::read(path).ok()?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    Some(h.finish())
}

/// The text of a panic payload.
pub(super) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
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
            started_at: model::now(),
            task_id: self.runtime.next_task_id(),
            phase: Phase::Starting,
            backlog: 0,
            state,
            approval: self.mailbox.approval,
            disabled_by_operator_at: None,
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

    pub(super) fn load_state(&self) -> MailboxState {
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

    pub(super) fn set_phase(&self, phase: Phase, state: &MailboxState) {
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

    pub(super) fn alert(&self, kind: &str, level: AlertLevel, text: &str) {
        self.alerts.raise(
            kind,
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
    ///
    /// The run is caught in place rather than spawned as a task of its own:
    /// one task (and one copy of the task's settings) per mailbox, which is
    /// what 10,000 mailboxes cost.
    pub async fn supervise<C, F>(self, mut make: F)
    where
        C: Connector + 'static,
        F: FnMut() -> Result<C, String> + Send + 'static,
    {
        use futures::FutureExt;
        let name = self.mailbox.name.clone();
        let mut restarts = 0u32;
        loop {
            let started = tokio::time::Instant::now();
            // Unwind safety: what a panic can leave half-done is shared
            // state behind locks that recover from poisoning, or the store,
            // whose batches apply all or nothing.
            let run = std::panic::AssertUnwindSafe(self.run_with(&mut make));
            let payload = match run.catch_unwind().await {
                Ok(()) => return,
                Err(payload) => payload,
            };
            if started.elapsed() >= RESTART_RESET_AFTER {
                restarts = 0;
            }
            restarts = restarts.saturating_add(1);
            let message = panic_message(payload.as_ref());
            metrics::counter!(telemetry::TASK_RESTARTS, "mailbox" => name.clone()).increment(1);
            let delay = self.backoff.delay(restarts);
            self.alert(
                kind::TASK_PANIC,
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
        self.run_with(&mut make).await
    }

    async fn run_with<C, F>(&self, make: &mut F)
    where
        C: Connector,
        F: FnMut() -> Result<C, String> + Send,
    {
        let watched = self.watched_files();
        let name = self.mailbox.name.clone();
        loop {
            // This stretch's own token: an operator's disable or reject ends
            // it (and every wait in it) without stopping the daemon. Both it
            // and the wake-up exist before the gate reads the operators'
            // settings, so a change made meanwhile is acted on, not lost.
            let stretch = self.cancel.child_token();
            self.runtime.begin_stretch(&name, stretch.clone());
            self.runtime.reenable_handle(&name);
            match self.gate() {
                Gate::Off => {
                    self.runtime.end_stretch(&name);
                    self.runtime.clear_reenable(&name);
                    return;
                }
                Gate::Hold => {
                    if !self.wait_for_control_change().await {
                        break;
                    }
                    continue;
                }
                Gate::Go => self.runtime.clear_reenable(&name),
            }
            // Taken before the connector reads them: a change from here on,
            // even one made while the mailbox was failing, re-enables it.
            let baseline: Vec<Option<u64>> = watched.iter().map(|p| file_fingerprint(p)).collect();
            let task = MailboxTask {
                cancel: stretch.clone(),
                ..self.clone()
            };
            let exit = match make() {
                Ok(mut connector) => {
                    let exit = task.run_enabled(&mut connector).await;
                    connector.close().await;
                    exit
                }
                Err(why) => {
                    let mut state = self.load_state();
                    self.disable(&mut state, &why);
                    Exit::Disabled
                }
            };
            self.runtime.end_stretch(&name);
            if self.cancel.is_cancelled() {
                break;
            }
            if stretch.is_cancelled() {
                // An operator changed the mailbox: the gate decides.
                continue;
            }
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

    /// Whether the mailbox may run now (with the phase set): `Off` for
    /// good when the configuration keeps it from running (disabled, no
    /// incoming delivery), `Hold` while an operator has it disabled or its
    /// address is not approved (until they change that), else `Go`.
    pub(super) fn gate(&self) -> Gate {
        let state = self.load_state();
        let name = &self.mailbox.name;
        let not_processing = |why: Option<String>| {
            self.runtime.update(name, |m| {
                m.not_processing_reason = why;
            });
        };
        let control = self.store.mailbox_control(name).unwrap_or_else(|e| {
            tracing::error!(mailbox = %name, error = %e, "cannot read what operators set on the mailbox; using the configuration");
            Default::default()
        });
        let approval = control.approval.unwrap_or(self.mailbox.approval);
        self.runtime.update(name, |m| {
            m.approval = approval;
            m.disabled_by_operator_at = control.disabled_at;
        });
        if !self.mailbox.enabled || self.mailbox.incoming == IncomingDelivery::None {
            not_processing(Some(if self.mailbox.enabled {
                "incoming = \"none\" in the configuration: no mail is read".into()
            } else {
                "enabled = false in the configuration".into()
            }));
            self.set_phase(Phase::Disabled, &state);
            return Gate::Off;
        }
        if let Some(at) = control.disabled_at {
            not_processing(Some(format!(
                "disabled by an operator at {} (POST /api/v1/mailboxes/{name}/enable enables it)",
                model::format_time(at)
            )));
            self.set_phase(Phase::Disabled, &state);
            return Gate::Hold;
        }
        if self.config.process_only_approved && approval != ApprovalStatus::Approved {
            let why = not_approved_reason(&self.mailbox.email, approval);
            // One Information alert (as Dynamics raises it), aggregated:
            // raised again at each start, it only counts up.
            self.alert(kind::NOT_APPROVED, AlertLevel::Information, &why);
            not_processing(Some(why));
            self.set_phase(Phase::NotApproved, &state);
            return Gate::Hold;
        }
        not_processing(None);
        // Approved now: an alert from a run when it was not is over.
        self.alerts.resolve(name, kind::NOT_APPROVED, model::now());
        Gate::Go
    }

    /// Waits for an operator's change (enable, approve, …); false on
    /// shutdown.
    async fn wait_for_control_change(&self) -> bool {
        let wake = self.runtime.reenable_handle(&self.mailbox.name);
        tokio::select! {
            _ = wake.notified() => true,
            _ = self.cancel.cancelled() => false,
        }
    }

    /// Waits until the mailbox is enabled through the API or a watched file's
    /// content differs from `baseline`; false on shutdown.
    pub(super) async fn wait_for_reenable(
        &self,
        watched: &[PathBuf],
        baseline: &[Option<u64>],
    ) -> bool {
        let name = &self.mailbox.name;
        let wake = self.runtime.reenable_handle(name);
        let why = loop {
            let now: Vec<Option<u64>> = watched.iter().map(|p| file_fingerprint(p)).collect();
            if now != baseline {
                break Some("its password or token file changed");
            }
            tokio::select! {
                _ = wake.notified() => break Some("woken through the admin API"),
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
    pub(super) async fn run_enabled<C: Connector>(&self, connector: &mut C) -> Exit {
        let name = self.mailbox.name.clone();
        let mut state = self.load_state();
        // A restart or re-enable is a fresh Test & Enable: an operator who
        // fixed the cause should not have to re-enable by hand.
        state.enabled = true;
        state.disabled_reason = None;

        // Test & Enable (incoming). Its permit is kept for the first cycle:
        // the connection it opened stays open (IMAP), and a connection is
        // never open without a permit.
        let queue = self.runtime.connection_queue(
            &self.profile.name,
            usize::from(self.profile.max_concurrent_connections),
        );
        // Held while the mailbox works through a backlog in turns.
        let mut backlog: Option<OwnedSemaphorePermit> = None;
        let mut held = queue.acquire(&self.connections).await;
        // One mailbox, one deployment: a passing test also claims it (or
        // finds it ours); another deployment's marker disables it.
        // Boxed, as the cycle below: a task's future is as large as its
        // largest inline step, and 10,000 idle mailboxes keep theirs for
        // good; the test and a cycle need their memory only while they run.
        let test = Box::pin(deployment::test_and_claim(connector, self.claiming()))
            .await
            .map(|(line, claim)| {
                self.claimed(&claim);
                line
            });
        // When the marker is checked next: at once if the test failed.
        let mut marker_due = tokio::time::Instant::now()
            + if test.is_ok() {
                self.config.daemon.marker_check_every
            } else {
                Duration::ZERO
            };
        match &test {
            Ok(detail) => {
                state.incoming_test = TestResult::passed(model::now(), detail.clone());
                tracing::info!(mailbox = %name, protocol = connector.protocol(), "{detail}");
            }
            Err(e) => state.incoming_test = TestResult::failure(model::now(), e),
        }
        self.note_token_expiry(connector, &mut state, true);
        if let Err(e) = &test {
            self.token_alert(e);
        }
        if let Err(e) = test {
            if e.disposition() == Disposition::Permanent {
                self.release(connector, held.take()).await;
                self.disable(&mut state, &e.to_string());
                return Exit::Disabled;
            }
        }
        self.save_state(&state);
        // What the store holds, to tell an idle cycle (nothing to write) from
        // one that changed something.
        let mut persisted = state.clone();
        let mut persisted_at = tokio::time::Instant::now();

        // The stall clock: tokio's, so tests can run it on paused time.
        let mut healthy_at = tokio::time::Instant::now();
        let started_wall = model::now();
        // Alerts to resolve at the next success: whatever is open at start
        // (from before a restart or re-enable), then what failures raised.
        let mut alerts_open = true;
        let mut first = true;
        loop {
            if self.cancel.is_cancelled() {
                self.release(connector, held.take()).await;
                return Exit::Stopped;
            }
            // A permit kept from the test or an idle wait, else a place in
            // the profile's FIFO queue. Phase "syncing" (and the stuck clock)
            // from the moment it is held: a queued mailbox is waiting.
            let permit = match held.take() {
                Some(p) => Some(p),
                None => queue.acquire(&self.connections).await,
            };
            self.set_phase(Phase::Syncing, &state);
            if tokio::time::Instant::now() >= marker_due {
                match Box::pin(deployment::claim(connector, self.claiming())).await {
                    Ok(claim) => {
                        self.claimed(&claim);
                        marker_due =
                            tokio::time::Instant::now() + self.config.daemon.marker_check_every;
                    }
                    Err(e) if e.disposition() == Disposition::Permanent => {
                        self.release(connector, permit).await;
                        drop(backlog.take());
                        // The claim is the incoming test's: it no longer
                        // passes (taken over by another deployment).
                        state.incoming_test = TestResult::failure(model::now(), &e);
                        self.disable(&mut state, &e.to_string());
                        return Exit::Disabled;
                    }
                    // Checked again before the next cycle; the cycle itself
                    // tells whether the server is reachable.
                    Err(e) => {
                        tracing::warn!(mailbox = %name, error = %e, "cannot check the deployment marker; trying again next cycle")
                    }
                }
            }
            let result =
                Box::pin(self.cycle_in_turn(connector, &mut state, &queue, &mut backlog)).await;
            let now = model::now();
            state.last_sync_at = Some(now);
            self.note_token_expiry(connector, &mut state, false);
            match result {
                Ok(turn) => {
                    state.transient_failures = 0;
                    state.last_success_at = Some(now);
                    state.postponed_until = None;
                    state.no_email_cycles = if turn.found == 0 && !turn.yielded {
                        state.no_email_cycles.saturating_add(1)
                    } else {
                        0
                    };
                    metrics::gauge!(telemetry::LAST_SUCCESS, "mailbox" => name.clone())
                        .set(now as f64);
                    healthy_at = tokio::time::Instant::now();
                    self.alerts
                        .mailbox_recovered(&self.profile.name, &name, now);
                    if std::mem::take(&mut alerts_open) {
                        self.recovered(now);
                    }
                    self.alerts.mailbox_synced(&name, now);
                    // An idle cycle writes nothing: see STAMPS_PERSIST_EVERY.
                    if !only_stamps_differ(&state, &persisted)
                        || persisted.last_success_at.is_none()
                        || persisted_at.elapsed() >= STAMPS_PERSIST_EVERY
                    {
                        self.save_state(&state);
                        persisted = state.clone();
                        persisted_at = tokio::time::Instant::now();
                    }
                    self.set_phase(Phase::Waiting, &state);
                    if turn.yielded {
                        // More to fetch, but others are queued for the
                        // profile's connections: close ours, give the permit
                        // back and queue again behind them, first for a
                        // backlog slot (FIFO among the busy mailboxes).
                        self.release(connector, permit).await;
                        drop(backlog.take());
                        backlog = tokio::select! {
                            p = queue.backlog_slot() => p,
                            _ = self.cancel.cancelled() => None,
                        };
                        continue;
                    }
                    backlog = None;
                    let wait = if std::mem::take(&mut first) {
                        first_wait(self.profile.poll_interval)
                    } else {
                        poll_jitter(idle_interval(
                            self.profile.poll_interval,
                            state.no_email_cycles,
                            self.profile.idle_backoff_cap,
                        ))
                    };
                    let waited_from = tokio::time::Instant::now();
                    let (waited, kept) = self.wait(connector, permit, &queue, wait).await;
                    held = kept;
                    match waited {
                        // Back before its time: the server pushed a change
                        // (IDLE): the mailbox is active again, poll at the
                        // base interval.
                        Ok(()) if woken_early(waited_from.elapsed(), wait) => {
                            state.no_email_cycles = 0;
                        }
                        Ok(()) => {}
                        Err(e) => {
                            tracing::warn!(mailbox = %name, error = %e, "waiting for changes failed; polling instead");
                        }
                    }
                }
                Err(e) => {
                    self.release(connector, permit).await;
                    backlog = None;
                    let disposition = e.disposition();
                    if let CycleError::Connector(c) = &e {
                        self.token_alert(c);
                    }
                    metrics::counter!(telemetry::SYNC_ERRORS, "mailbox" => name.clone(), "disposition" => disposition.to_string()).increment(1);
                    state.last_sync_error = Some(e.to_string());
                    state.last_sync_error_at = Some(now);
                    self.alerts
                        .mailbox_failed(&self.profile.name, &name, &e.to_string(), now);
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
                    // One alert per mailbox for the whole outage: a Warning
                    // while it retries, the same alert an Error once the
                    // mailbox has not synced for stall_alert_after.
                    if healthy_at.elapsed() >= self.profile.stall_alert_after {
                        let since = state.last_success_at.unwrap_or(started_wall);
                        self.alert(
                            kind::SYNC_FAILING,
                            AlertLevel::Error,
                            &format!(
                                "{STALL_ALERT}{}: {e} (retrying with back-off; it recovers by itself once the cause is gone)",
                                model::format_time(since)
                            ),
                        );
                        self.runtime
                            .update(&name, |m| m.not_synced_since = Some(since));
                    } else {
                        self.alert(
                            kind::SYNC_FAILING,
                            AlertLevel::Warning,
                            &format!("{TRANSIENT_ALERT}{e}"),
                        );
                    }
                    self.save_state(&state);
                    persisted = state.clone();
                    persisted_at = tokio::time::Instant::now();
                    self.set_phase(Phase::BackingOff, &state);
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.cancel.cancelled() => {}
                    }
                }
            }
        }
    }

    /// Closes the connector's connection, then gives its permit back: in
    /// that order, so the profile never has more connections open than
    /// permits handed out.
    pub(super) async fn release<C: Connector>(
        &self,
        connector: &mut C,
        permit: Option<OwnedSemaphorePermit>,
    ) {
        if connector.holds_connection() {
            // Closed (logged out, the socket shut) before the permit goes:
            // the next holder's connection must not overlap this one.
            connector.close().await;
        }
        drop(permit);
    }

    /// The wait between polls. The connection (and its permit) is kept for
    /// it (connection reuse, IMAP IDLE) only while no other mailbox of the
    /// profile is queued for a permit; one that queues meanwhile makes this
    /// mailbox close its connection and give the permit up, then wait out
    /// the rest without one. Returns the permit still held, for the next
    /// cycle.
    async fn wait<C: Connector>(
        &self,
        connector: &mut C,
        permit: Option<OwnedSemaphorePermit>,
        queue: &ConnectionQueue,
        wait: Duration,
    ) -> (Result<(), ConnectorError>, Option<OwnedSemaphorePermit>) {
        let deadline = tokio::time::Instant::now() + wait;
        let keep = permit.is_some() && connector.holds_connection() && queue.waiting() == 0;
        if keep {
            let interrupted = tokio::select! {
                r = connector.wait_for_changes(wait, true, &self.cancel) => Some(r),
                _ = queue.someone_waits() => None,
            };
            if let Some(r) = interrupted {
                return (r, permit);
            }
            if !connector.holds_connection() {
                // The interrupted wait dropped its connection (mid-IDLE:
                // no LOGOUT). Its close reaches the server a moment later;
                // the permit waits that moment, so the server never sees
                // more than the limit at once.
                tokio::time::sleep(DROPPED_CLOSE_GRACE).await;
            }
        }
        self.release(connector, permit).await;
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        (
            connector.wait_for_changes(left, false, &self.cancel).await,
            None,
        )
    }

    /// After a successful sync that follows failures (or a start): the stall,
    /// disabled and retry alerts are resolved.
    pub(super) fn recovered(&self, now: UnixTime) {
        let name = &self.mailbox.name;
        self.runtime.update(name, |m| m.not_synced_since = None);
        for kind in [
            kind::SYNC_FAILING,
            kind::DISABLED,
            kind::CREDENTIAL_REJECTED,
            kind::INCOMING_TEST,
        ] {
            self.alerts.resolve(name, kind, now);
        }
    }

    /// Records the OAuth token expiry the connector last logged in with, and
    /// warns ahead of it: an expiring token is the classic "mailbox silently
    /// stopped". The alert text names the expiry, so it is raised once per
    /// token (the store counts repeats) rather than once per cycle.
    ///
    /// A warning is resolved only when it can have become stale: at `start`
    /// (one from before a restart) or when the expiry changed (renewed,
    /// gone). Not at every poll: resolving looks through the alerts, and
    /// 10,000 idle mailboxes poll 170 times a second.
    pub(super) fn note_token_expiry<C: Connector>(
        &self,
        connector: &C,
        state: &mut MailboxState,
        start: bool,
    ) {
        let expiry = connector.token_expires_at();
        let changed = start || state.token_expires_at != expiry;
        state.token_expires_at = expiry;
        let now = model::now();
        let Some(at) = expiry else {
            if changed {
                self.alerts
                    .resolve(&self.mailbox.name, kind::CREDENTIAL_EXPIRING, now);
            }
            return;
        };
        let window = self.profile.token_expiry_warning;
        let warn_from = at.saturating_sub(window.as_secs() as i64);
        // A token that lives shorter than the warning window (an hourly
        // access token its tool rewrites) would always be "expiring".
        let short_lived = crate::connector::oauth::renewed_by_its_tool(
            connector.token_issued_at(),
            Some(at),
            window,
        );
        if now < warn_from || short_lived {
            if !changed {
                return;
            }
            // Renewed (or never close): a warning about the old one is over.
            self.alerts
                .resolve(&self.mailbox.name, kind::CREDENTIAL_EXPIRING, now);
        } else if now < at {
            self.alert(
                kind::CREDENTIAL_EXPIRING,
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
    pub(super) fn token_alert(&self, e: &ConnectorError) {
        if matches!(e, ConnectorError::TokenRejected { .. })
            || matches!(e, ConnectorError::Graph(g) if g.is_auth_failure())
        {
            self.alert(kind::CREDENTIAL_REJECTED, AlertLevel::Error, &e.to_string());
        }
    }

    pub(super) fn disable(&self, state: &mut MailboxState, why: &str) {
        state.enabled = false;
        state.disabled_reason = Some(why.to_string());
        state.last_sync_error = Some(why.to_string());
        state.last_sync_error_at = Some(model::now());
        // The disable alert says what is wrong now; the retry alert is over.
        self.alerts
            .resolve(&self.mailbox.name, kind::SYNC_FAILING, model::now());
        self.alert(
            kind::DISABLED,
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

    /// How the mailbox task claims its mailbox: never by force (that is
    /// an operator's Test & Enable).
    fn claiming(&self) -> Claiming<'_> {
        Claiming {
            mailbox: &self.mailbox.name,
            deployment: &self.deployment,
            force: false,
            enabled: self.profile.deployment_marker,
        }
    }

    /// Logs what claiming the mailbox for this deployment did.
    fn claimed(&self, claim: &Claim) {
        let name = &self.mailbox.name;
        let me = &self.deployment.id;
        match claim {
            Claim::Claimed => {
                tracing::info!(mailbox = %name, deployment = %me, "mailbox marked as synchronized by this deployment")
            }
            Claim::TakenOver(old) => {
                tracing::warn!(mailbox = %name, deployment = %me, previous = %old.deployment, "mailbox taken over from another deployment")
            }
            Claim::Ours | Claim::Unsupported(_) => {}
        }
    }

    pub(super) fn save_state(&self, state: &MailboxState) {
        if let Err(e) = self.store.put_mailbox_state(state) {
            tracing::error!(mailbox = %self.mailbox.name, error = %e, "cannot save mailbox state");
        }
    }
}
