//! Scheduler: one task per mailbox, each running sync cycles, waiting (poll or
//! push), and backing off on transient errors according to [`Backoff`].
//!
//! The lifecycle rules are Dynamics': a permanent error disables the mailbox at
//! once with an Error alert; transient errors are retried with back-off and
//! become permanent after `max_transient_failures` in a row.
//!
//! Follow-ups (keyword, move, delete) are owed from the commit that records
//! their message: the commit writes them, each cycle starts by carrying out
//! what is still owed, and later commits clear what was done. They never fail
//! a cycle; one refused for a permanent reason is retried on the next cycles
//! and given up with a Warning after `MAX_FOLLOW_UP_FAILURES` (5) attempts.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::alerts::Alerts;
use crate::config::{Config, Mailbox, Profile};
use crate::connector::{Ack, AckKind, Connector, ConnectorError};
use crate::error::{Classify, Disposition};
use crate::model::{
    self, AlertLevel, ApprovalStatus, FollowUp, IncomingDelivery, MailboxState, SourceKey,
    TestResult, TestStatus,
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

impl Default for Backoff {
    fn default() -> Self {
        // Dynamics retries roughly every 5 minutes; start faster, end there.
        Backoff {
            base: Duration::from_secs(5),
            max: Duration::from_secs(300),
            jitter: 0.2,
        }
    }
}

impl Backoff {
    /// Delay before retry number `attempt` (1-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(20);
        let raw = self.base.saturating_mul(1u32 << exp).min(self.max);
        let spread = (fastrand::f64() * 2.0 - 1.0) * self.jitter;
        raw.mul_f64((1.0 + spread).max(0.0)).min(self.max)
    }
}

/// What a mailbox task is doing now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
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
#[derive(Debug, Clone, Serialize)]
pub struct LiveMailbox {
    pub name: String,
    pub profile: String,
    pub email: String,
    pub protocol: String,
    pub phase: Phase,
    pub backlog: u64,
    pub state: MailboxState,
    #[serde(skip)]
    pub cycle_started: Option<Instant>,
}

/// Shared runtime state.
#[derive(Debug, Default)]
pub struct Runtime {
    pub mailboxes: RwLock<BTreeMap<String, LiveMailbox>>,
    pub scheduler_running: AtomicBool,
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

    /// A snapshot of every mailbox.
    pub fn snapshot(&self) -> Vec<LiveMailbox> {
        self.mailboxes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }
}

/// Everything a mailbox task needs.
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
}

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

    /// Runs the mailbox until cancelled or disabled.
    pub async fn run<C: Connector>(self, mut connector: C) {
        let name = self.mailbox.name.clone();
        let mut state = self.load_state();
        // A restart is a fresh Test & Enable: an operator who fixed the cause and
        // restarted should not have to re-enable by hand.
        state.enabled = true;
        state.disabled_reason = None;

        if !self.mailbox.enabled || self.mailbox.incoming == IncomingDelivery::None {
            self.set_phase(Phase::Disabled, &state);
            return;
        }
        if self.config.process_only_approved && self.mailbox.approval != ApprovalStatus::Approved {
            self.alert(
                AlertLevel::Warning,
                &format!(
                    "email address {} is not approved ({:?}); mail is not processed while \"process emails only for approved users/queues\" is on",
                    self.mailbox.email, self.mailbox.approval
                ),
            );
            self.set_phase(Phase::NotApproved, &state);
            return;
        }

        // Test & Enable (incoming).
        let test = {
            let _permit = self.connections.acquire().await;
            connector.test().await
        };
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
        self.note_token_expiry(&connector, &mut state);
        if let Err(e) = &test {
            self.token_alert(e);
        }
        if let Err(e) = test {
            if e.disposition() == Disposition::Permanent {
                self.disable(&mut state, &e.to_string());
                connector.close().await;
                return;
            }
        }
        self.save_state(&state);

        loop {
            if self.cancel.is_cancelled() {
                break;
            }
            self.set_phase(Phase::Syncing, &state);
            let result = {
                let _permit = self.connections.acquire().await;
                self.cycle(&mut connector, &mut state).await
            };
            let now = model::now();
            state.last_sync_at = Some(now);
            self.note_token_expiry(&connector, &mut state);
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
                    self.alerts.mailbox_recovered(&self.profile.name, &name);
                    self.save_state(&state);
                    self.set_phase(Phase::Waiting, &state);
                    let wait = idle_interval(self.profile.poll_interval, state.no_email_cycles);
                    // A connection kept open between polls (reuse, IDLE) counts
                    // against the profile's limit: keep it only with a permit.
                    // The semaphore is FIFO, so mailboxes queued for a cycle get
                    // their turn when an idling one comes back.
                    let permit = self.connections.clone().try_acquire_owned().ok();
                    let waited = connector
                        .wait_for_changes(wait, permit.is_some(), &self.cancel)
                        .await;
                    drop(permit);
                    if let Err(e) = waited {
                        tracing::warn!(mailbox = %name, error = %e, "waiting for changes failed; polling instead");
                    }
                }
                Err(e) => {
                    let disposition = e.disposition();
                    if let CycleError::Connector(c) = &e {
                        self.token_alert(c);
                    }
                    metrics::counter!(telemetry::SYNC_ERRORS, "mailbox" => name.clone(), "disposition" => disposition.to_string()).increment(1);
                    state.last_sync_error = Some(e.to_string());
                    state.last_sync_error_at = Some(now);
                    self.alerts.mailbox_failed(&self.profile.name, &name, now);
                    state.transient_failures = state.transient_failures.saturating_add(1);
                    let exhausted = state.transient_failures >= self.profile.max_transient_failures;
                    if disposition == Disposition::Permanent || exhausted {
                        let why = if exhausted && disposition == Disposition::Transient {
                            format!(
                                "{e} (gave up after {} transient failures in a row)",
                                state.transient_failures
                            )
                        } else {
                            e.to_string()
                        };
                        self.disable(&mut state, &why);
                        break;
                    }
                    let delay = self.backoff.delay(state.transient_failures);
                    state.postponed_until = Some(now + delay.as_secs() as i64);
                    self.alert(
                        AlertLevel::Warning,
                        &format!("transient error, retrying with back-off: {e}"),
                    );
                    self.save_state(&state);
                    self.set_phase(Phase::BackingOff, &state);
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.cancel.cancelled() => {}
                    }
                }
            }
        }
        connector.close().await;
        if state.enabled {
            self.set_phase(Phase::Stopped, &state);
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
                    "the OAuth access token expires at {}: renew it before then, or the mailbox stops syncing",
                    model::format_time(at)
                ),
            );
        }
    }

    /// An Error alert for a rejected OAuth token, saying what to do; the
    /// generic retry/disable alerts do not tell an expired token apart from a
    /// wrong password.
    fn token_alert(&self, e: &ConnectorError) {
        if matches!(e, ConnectorError::TokenRejected { .. }) {
            self.alert(AlertLevel::Error, &e.to_string());
        }
    }

    fn disable(&self, state: &mut MailboxState, why: &str) {
        state.enabled = false;
        state.disabled_reason = Some(why.to_string());
        state.last_sync_error = Some(why.to_string());
        state.last_sync_error_at = Some(model::now());
        self.alert(AlertLevel::Error, &format!("mailbox disabled: {why}"));
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

            #[cfg(feature = "fault-injection")]
            if !owed.is_empty() {
                crate::fault::committed_with_follow_ups();
            }
            self.follow_up(connector, acks, owed, changes).await;
            for (source, r) in &results {
                if let ItemResult::Quarantined { reason } = r {
                    self.alert(
                        AlertLevel::Warning,
                        &format!("message {} quarantined: {reason}", source),
                    );
                }
            }
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
    use crate::connector::{AckReport, FetchBatch, RawMessage};
    use crate::store::SledStore;

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
