//! The outbox worker: one per configured CRM adapter, delivering the store's
//! outbox (the pending [`DeliveryState`]s of the adapter's consumer) through
//! [`CrmAdapter::deliver`].
//!
//! The rules it keeps:
//! * **Order per activity.** Pending deliveries are read in seq order; an
//!   event waits while an earlier event of the same activity is pending
//!   (waiting for its retry, or not tried yet), while events of other
//!   activities proceed.
//! * **At least once.** An event is delivered first and recorded
//!   ([`Store::finish_delivery`]) after: a crash between the CRM's answer and
//!   the record sends the same event (same id, same body) again on restart.
//!   That is the contract: the CRM dedupes by the event id.
//! * **Transient failures** (network, time-out, 429, 5xx) are retried on the
//!   configured schedule ([`RetryPolicy`]), never sooner than the CRM's
//!   `Retry-After`. A `Retry-After` holds the whole adapter, not only that
//!   event: no request goes to the CRM before it has passed (a rate limit
//!   like Dataverse's service protection applies to every request, and
//!   hammering it on other events prolongs it). An event still undelivered `dead_letter_after` after it
//!   was queued is moved to the dead letters on its next failure, with one
//!   Error alert naming the event, the activity and the last error.
//! * **A permanent failure of one event** (the CRM refuses it, e.g. 400)
//!   dead-letters it at once, with an Error alert carrying the CRM's message.
//!   Later events of the same activity then proceed.
//! * **A permanent failure of the endpoint** ([`CrmError::Endpoint`]: 410,
//!   rejected credentials) pauses delivery: one Error alert, nothing dropped
//!   or dead-lettered (the events are not at fault), and one probe (the
//!   oldest due event) at the schedule's longest interval. When a probe
//!   succeeds the pause ends, the alert is resolved and delivery goes on.
//!   `/readyz` reports the adapter as not ready while paused.
//!
//! Alerts of the CRM link carry `mailbox = "crm:<adapter>"` (the store
//! resolves alerts by mailbox), e.g. `crm:webhook`.
//!
//! Store calls block, so they run on `spawn_blocking`, as in the scheduler.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;

use super::{CrmAdapter, CrmError};
use crate::config::DeliverySettings;
use crate::model::{
    format_time, ActivityId, AlertLevel, DeadLetter, DeliveryState, NewAlert, UnixTime,
};

/// Alert kind of a paused CRM adapter (resolved by the next delivery).
const PAUSED_KIND: &str = "crm:delivery_paused";
/// Alert kind of events given up as dead letters (one alert per adapter).
const DEAD_LETTER_KIND: &str = "crm:dead_letter";
use crate::store::{DeliveryOutcome, Store, StoreError};
use crate::telemetry;

/// Pending deliveries read per pass: the oldest this many. Order per
/// activity holds within the window (an activity's earlier events always
/// sort before its later ones), and a larger backlog is worked off window by
/// window.
const WINDOW: usize = 10_000;

/// The worker wakes at least this often to refresh the outbox gauges (the
/// oldest event's age grows while nothing happens).
const REFRESH_EVERY: Duration = Duration::from_secs(15);

/// Wait after a failed store call before the next pass.
const STORE_RETRY: Duration = Duration::from_secs(5);

/// The retry schedule of the outbox as a policy object: the wait after the
/// 1st, 2nd, … failure of an event; the last wait repeats. A CRM's
/// `Retry-After` is honoured as a lower bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    schedule: Vec<Duration>,
}

impl RetryPolicy {
    /// A policy over `schedule` (an empty schedule retries every 5 s).
    pub fn new(schedule: Vec<Duration>) -> Self {
        let schedule = if schedule.is_empty() {
            vec![Duration::from_secs(5)]
        } else {
            schedule
        };
        RetryPolicy { schedule }
    }

    /// The wait after failure number `failures` (1-based), at least
    /// `retry_after`.
    pub fn delay(&self, failures: u32, retry_after: Option<Duration>) -> Duration {
        let i = (failures.max(1) as usize - 1).min(self.schedule.len() - 1);
        let planned = self.schedule[i];
        retry_after.map_or(planned, |r| planned.max(r))
    }

    /// The longest wait of the schedule: how often a paused adapter probes.
    pub fn longest(&self) -> Duration {
        self.schedule.iter().copied().max().unwrap_or_default()
    }
}

/// The worker's clock: wall time, or (in tests) wall time at start plus
/// tokio's (pausable) time since then.
#[derive(Debug, Clone, Copy)]
pub enum Clock {
    System,
    /// Follows `tokio::time`, so paused-time tests control it.
    Tokio {
        base: Duration,
        start: tokio::time::Instant,
    },
}

impl Clock {
    /// A clock following tokio time from now on.
    pub fn tokio() -> Self {
        Clock::Tokio {
            base: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default(),
            start: tokio::time::Instant::now(),
        }
    }

    /// Time since the Unix epoch.
    pub fn now(&self) -> Duration {
        match self {
            Clock::System => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default(),
            Clock::Tokio { base, start } => *base + start.elapsed(),
        }
    }

    /// Whole seconds since the Unix epoch.
    pub fn unix(&self) -> UnixTime {
        self.now().as_secs() as UnixTime
    }
}

/// The first whole second at which `delay` from `now` has passed (0: now).
fn due_at(now: Duration, delay: Duration) -> UnixTime {
    if delay.is_zero() {
        return now.as_secs() as UnixTime;
    }
    let t = now + delay;
    let secs = t.as_secs() + u64::from(t.subsec_nanos() > 0);
    secs as UnixTime
}

/// What `/readyz` needs to know about each adapter's outbox.
#[derive(Debug, Default)]
pub struct OutboxHealth {
    adapters: Mutex<BTreeMap<String, AdapterHealth>>,
}

#[derive(Debug, Clone, Default)]
struct AdapterHealth {
    oldest_queued_at: Option<UnixTime>,
    paused: Option<String>,
    stuck_after: Duration,
}

impl OutboxHealth {
    fn update(&self, adapter: &str, f: impl FnOnce(&mut AdapterHealth)) {
        let mut map = self.adapters.lock().unwrap_or_else(|p| p.into_inner());
        f(map.entry(adapter.to_string()).or_default());
    }

    /// Why an adapter is not ready at `now`: its oldest undelivered event is
    /// older than its `stuck_after`, or delivery is paused by a permanent
    /// endpoint failure. Empty when all is well.
    pub fn problems(&self, now: UnixTime) -> Vec<String> {
        let map = self.adapters.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        for (name, h) in map.iter() {
            if let Some(reason) = &h.paused {
                out.push(format!(
                    "CRM adapter {name:?} is paused by a permanent endpoint failure: {reason}"
                ));
            }
            if let Some(q) = h.oldest_queued_at {
                if now.saturating_sub(q) > h.stuck_after.as_secs() as i64 {
                    out.push(format!(
                        "CRM adapter {name:?} is stuck: its oldest undelivered event was queued at {} (more than {} ago)",
                        format_time(q),
                        humantime::format_duration(h.stuck_after)
                    ));
                }
            }
        }
        out
    }
}

/// The mailbox field of the CRM link's alerts (see the module docs).
pub fn alert_scope(adapter: &str) -> String {
    format!("crm:{adapter}")
}

/// The metric label of a failure.
fn failure_label(e: &CrmError) -> &'static str {
    match e {
        CrmError::Transient { .. } => "transient",
        CrmError::Permanent { .. } => "permanent",
        CrmError::Endpoint { .. } => "endpoint",
    }
}

/// Runs a blocking store call off the runtime threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Io(format!("store task failed: {e}")))?
}

/// What one pass over the outbox did.
#[derive(Debug, Default)]
struct Pass {
    /// Something was delivered or dead-lettered: look again at once (the
    /// next event of that activity may be due).
    progressed: bool,
    /// The earliest time a waiting event is due.
    next_due: Option<UnixTime>,
}

/// The outbox worker of one adapter (see the module docs).
pub struct OutboxWorker<A: CrmAdapter> {
    adapter: Arc<A>,
    store: Arc<dyn Store>,
    policy: RetryPolicy,
    dead_letter_after: Duration,
    health: Arc<OutboxHealth>,
    cancel: CancellationToken,
    clock: Clock,
    /// The endpoint failure delivery is paused by, and when to probe next.
    paused: Option<(String, UnixTime)>,
    /// No request before this time (the CRM's `Retry-After`).
    hold_until: Option<UnixTime>,
    /// Whether a "delivery paused" alert left open by an earlier run was
    /// looked for (at the first delivery that works).
    stale_pause_checked: bool,
}

impl<A: CrmAdapter + 'static> OutboxWorker<A> {
    pub fn new(
        adapter: Arc<A>,
        store: Arc<dyn Store>,
        settings: &DeliverySettings,
        health: Arc<OutboxHealth>,
        cancel: CancellationToken,
    ) -> Self {
        health.update(adapter.name(), |h| h.stuck_after = settings.stuck_after);
        OutboxWorker {
            adapter,
            store,
            policy: RetryPolicy::new(settings.retry_schedule.clone()),
            dead_letter_after: settings.dead_letter_after,
            health,
            cancel,
            clock: Clock::System,
            paused: None,
            hold_until: None,
            stale_pause_checked: false,
        }
    }

    /// Uses `clock` instead of wall time (tests on paused tokio time).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    fn consumer(&self) -> &'static str {
        self.adapter.name()
    }

    /// Delivers until the cancellation token fires; an in-flight request is
    /// finished and recorded, no new one is started.
    pub async fn run(mut self) {
        let mut events = self.store.watch_events();
        let consumer = self.consumer();
        tracing::info!(adapter = consumer, "outbox worker started");
        loop {
            if self.cancel.is_cancelled() {
                break;
            }
            let wait = match self.pass().await {
                Ok(pass) => {
                    self.refresh_gauges().await;
                    if pass.progressed {
                        Duration::ZERO
                    } else {
                        let now = self.clock.now();
                        pass.next_due
                            .map(|t| Duration::from_secs(t.max(0) as u64).saturating_sub(now))
                            .unwrap_or(REFRESH_EVERY)
                            .min(REFRESH_EVERY)
                    }
                }
                Err(e) => {
                    tracing::error!(adapter = consumer, error = %e, "outbox pass failed; retrying");
                    STORE_RETRY
                }
            };
            if wait.is_zero() {
                tokio::task::yield_now().await;
                continue;
            }
            tokio::select! {
                _ = self.cancel.cancelled() => break,
                changed = events.changed() => {
                    if changed.is_err() {
                        // The store is gone (shutdown): stop waking on it.
                        tokio::select! {
                            _ = self.cancel.cancelled() => break,
                            _ = tokio::time::sleep(wait) => {}
                        }
                    }
                }
                _ = tokio::time::sleep(wait) => {}
            }
        }
        tracing::info!(adapter = consumer, "outbox worker stopped");
    }

    /// One look at the outbox: delivers every event that is due and not
    /// waiting behind an earlier event of its activity.
    async fn pass(&mut self) -> Result<Pass, StoreError> {
        let consumer = self.consumer();
        let store = self.store.clone();
        let pending = blocking(move || store.pending_deliveries(consumer, WINDOW)).await?;
        let mut pass = Pass::default();
        // Activities with an earlier event still pending: theirs wait.
        let mut waiting: HashSet<ActivityId> = HashSet::new();
        for state in pending {
            if self.cancel.is_cancelled() {
                break;
            }
            if !waiting.insert(state.activity_id) {
                continue;
            }
            let now = self.clock.unix();
            if let Some(hold) = self.hold_until {
                if now < hold {
                    pass.next_due = Some(pass.next_due.map_or(hold, |d| d.min(hold)));
                    break;
                }
                self.hold_until = None;
            }
            if let Some((_, probe_at)) = &self.paused {
                if now < *probe_at {
                    pass.next_due = Some(*probe_at);
                    break;
                }
            } else if state.next_attempt_at > now {
                pass.next_due = Some(
                    pass.next_due
                        .map_or(state.next_attempt_at, |d| d.min(state.next_attempt_at)),
                );
                continue;
            }
            let activity = state.activity_id;
            match self.attempt(state).await? {
                Attempt::Done => {
                    pass.progressed = true;
                    waiting.remove(&activity);
                }
                Attempt::Retry(at) => {
                    pass.next_due = Some(pass.next_due.map_or(at, |d| d.min(at)));
                }
                Attempt::Paused(at) => {
                    pass.next_due = Some(at);
                    break;
                }
            }
        }
        Ok(pass)
    }

    /// Delivers one event and records the outcome.
    async fn attempt(&mut self, mut state: DeliveryState) -> Result<Attempt, StoreError> {
        let consumer = self.consumer();
        let store = self.store.clone();
        let (seq, activity) = (state.seq, state.activity_id);
        let (event, crm_id) =
            blocking(move || Ok((store.event(seq)?, store.crm_id(consumer, activity)?))).await?;
        let Some(event) = event else {
            // The log lost an event its outbox still names: nothing to
            // send, keep it for the operator.
            let reason = format!("event evt_{seq} is missing from the event log");
            self.dead_letter(state, reason.clone(), reason).await?;
            return Ok(Attempt::Done);
        };
        let result = self.adapter.deliver(&event, crm_id.as_deref()).await;
        let now = self.clock.now();
        let now_unix = now.as_secs() as UnixTime;
        match result {
            Ok(receipt) => {
                #[cfg(feature = "fault-injection")]
                crate::fault::delivered_before_recording();
                let store = self.store.clone();
                blocking(move || {
                    store.finish_delivery(
                        consumer,
                        DeliveryOutcome::Delivered {
                            seq,
                            activity_id: activity,
                            crm_id: receipt.crm_id,
                        },
                    )
                })
                .await?;
                metrics::counter!(telemetry::CRM_DELIVERIES, "adapter" => consumer, "result" => "delivered")
                    .increment(1);
                tracing::debug!(adapter = consumer, event = %event.id, activity, "delivered");
                let was_paused = self.paused.take();
                if was_paused.is_some() || !self.stale_pause_checked {
                    if let Some((reason, _)) = was_paused {
                        tracing::info!(adapter = consumer, %reason, "CRM delivery works again; pause over");
                    }
                    self.stale_pause_checked = true;
                    self.health.update(consumer, |h| h.paused = None);
                    let store = self.store.clone();
                    let scope = alert_scope(consumer);
                    blocking(move || store.resolve_alerts(&scope, PAUSED_KIND, now_unix)).await?;
                }
                Ok(Attempt::Done)
            }
            Err(e) => {
                metrics::counter!(telemetry::CRM_DELIVERIES, "adapter" => consumer, "result" => "failed", "disposition" => failure_label(&e))
                    .increment(1);
                state.attempts = state.attempts.saturating_add(1);
                state.last_error = Some(e.to_string());
                match &e {
                    CrmError::Permanent { message } => {
                        let alert = format!(
                            "CRM {consumer}: the CRM refused event {} (activity {activity}); moved to the dead letters: {message}",
                            event.id
                        );
                        self.dead_letter(state, message.clone(), alert).await?;
                        Ok(Attempt::Done)
                    }
                    CrmError::Transient { message, .. } => {
                        let age = now_unix.saturating_sub(state.queued_at);
                        if age >= self.dead_letter_after.as_secs() as i64 {
                            let alert = format!(
                                "CRM {consumer}: event {} (activity {activity}) undelivered for {}; moved to the dead letters; last error: {message}",
                                event.id,
                                humantime::format_duration(Duration::from_secs(age.max(0) as u64))
                            );
                            let reason = format!(
                                "undelivered after {} attempts in {}: {message}",
                                state.attempts,
                                humantime::format_duration(self.dead_letter_after)
                            );
                            self.dead_letter(state, reason, alert).await?;
                            return Ok(Attempt::Done);
                        }
                        let delay = self.policy.delay(state.attempts, e.retry_after());
                        state.next_attempt_at = due_at(now, delay);
                        if let Some(wait) = e.retry_after() {
                            self.hold_until = Some(due_at(now, wait));
                        }
                        tracing::warn!(adapter = consumer, event = %event.id, activity, attempts = state.attempts, retry_in = ?delay, error = %message, "delivery failed; will retry");
                        let at = state.next_attempt_at;
                        self.reschedule(state).await?;
                        Ok(Attempt::Retry(at))
                    }
                    CrmError::Endpoint { message } => {
                        let probe_at = due_at(now, self.policy.longest());
                        state.next_attempt_at = probe_at;
                        self.reschedule(state).await?;
                        if self.paused.is_none() {
                            let text = format!(
                                "{} (probing every {}): {message}",
                                self.paused_prefix(),
                                humantime::format_duration(self.policy.longest())
                            );
                            tracing::error!(adapter = consumer, alert = %text, "alert");
                            let store = self.store.clone();
                            let scope = alert_scope(consumer);
                            blocking(move || {
                                store.raise_alert(
                                    NewAlert {
                                        kind: PAUSED_KIND,
                                        level: AlertLevel::Error,
                                        mailbox: Some(&scope),
                                        profile: None,
                                        text: &text,
                                    },
                                    now_unix,
                                )
                            })
                            .await?;
                        }
                        self.health
                            .update(consumer, |h| h.paused = Some(message.clone()));
                        self.paused = Some((message.clone(), probe_at));
                        Ok(Attempt::Paused(probe_at))
                    }
                }
            }
        }
    }

    /// Start of the text of the "delivery paused" alert (resolved by it).
    fn paused_prefix(&self) -> String {
        format!("CRM {}: delivery paused", self.consumer())
    }

    async fn reschedule(&self, state: DeliveryState) -> Result<(), StoreError> {
        let consumer = self.consumer();
        let store = self.store.clone();
        blocking(move || store.finish_delivery(consumer, DeliveryOutcome::Retry(state))).await
    }

    /// Moves an event to the dead letters with an Error alert.
    async fn dead_letter(
        &self,
        state: DeliveryState,
        reason: String,
        alert: String,
    ) -> Result<(), StoreError> {
        let consumer = self.consumer();
        let now = self.clock.unix();
        tracing::error!(adapter = consumer, seq = state.seq, alert = %alert, "alert");
        let store = self.store.clone();
        let scope = alert_scope(consumer);
        blocking(move || {
            store.finish_delivery(
                consumer,
                DeliveryOutcome::DeadLetter(DeadLetter {
                    consumer: consumer.to_string(),
                    state,
                    dead_at: now,
                    reason,
                }),
            )?;
            store.raise_alert(
                NewAlert {
                    kind: DEAD_LETTER_KIND,
                    level: AlertLevel::Error,
                    mailbox: Some(&scope),
                    profile: None,
                    text: &alert,
                },
                now,
            )?;
            Ok(())
        })
        .await
    }

    /// Outbox gauges and the readiness view, from the store's stats.
    async fn refresh_gauges(&self) {
        let consumer = self.consumer();
        let store = self.store.clone();
        match blocking(move || store.outbox_stats(consumer)).await {
            Ok(stats) => {
                let now = self.clock.unix();
                let age = stats
                    .oldest_queued_at
                    .map_or(0, |q| now.saturating_sub(q).max(0));
                metrics::gauge!(telemetry::OUTBOX_DEPTH, "adapter" => consumer)
                    .set(stats.depth as f64);
                metrics::gauge!(telemetry::OUTBOX_OLDEST_AGE, "adapter" => consumer)
                    .set(age as f64);
                metrics::gauge!(telemetry::OUTBOX_DEAD_LETTERS, "adapter" => consumer)
                    .set(stats.dead_letters as f64);
                self.health
                    .update(consumer, |h| h.oldest_queued_at = stats.oldest_queued_at);
            }
            Err(e) => tracing::warn!(adapter = consumer, error = %e, "cannot read outbox stats"),
        }
    }
}

/// How one attempt ended.
enum Attempt {
    /// Delivered or dead-lettered: the activity's next event may go.
    Done,
    /// To be retried at this time.
    Retry(UnixTime),
    /// Delivery paused by an endpoint failure; probe at this time.
    Paused(UnixTime),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crm::{DeliveryReceipt, RecordPage};
    use crate::model::OutboxEvent;
    use std::collections::VecDeque;

    #[test]
    fn schedule_repeats_its_last_wait_and_honours_retry_after() {
        let p = RetryPolicy::new(crate::config::default_retry_schedule());
        assert_eq!(p.delay(1, None), Duration::ZERO);
        assert_eq!(p.delay(2, None), Duration::from_secs(5));
        assert_eq!(p.delay(3, None), Duration::from_secs(300));
        assert_eq!(p.delay(7, None), Duration::from_secs(36_000));
        assert_eq!(p.delay(8, None), Duration::from_secs(36_000));
        assert_eq!(p.delay(1000, None), Duration::from_secs(36_000));
        // Retry-After is a lower bound, never a shortcut.
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(30))),
            Duration::from_secs(30)
        );
        assert_eq!(
            p.delay(3, Some(Duration::from_secs(30))),
            Duration::from_secs(300)
        );
        assert_eq!(p.longest(), Duration::from_secs(36_000));
        assert_eq!(
            RetryPolicy::new(vec![]).delay(3, None),
            Duration::from_secs(5)
        );
    }

    #[test]
    fn due_time_rounds_up_so_the_wait_is_at_least_the_delay() {
        let now = Duration::from_millis(10_400);
        assert_eq!(due_at(now, Duration::ZERO), 10);
        assert_eq!(due_at(now, Duration::from_secs(1)), 12);
        assert_eq!(due_at(Duration::from_secs(10), Duration::from_secs(1)), 11);
    }

    /// What the fake CRM answers, per delivery, in order; `Ok` once the
    /// script runs out.
    struct FakeCrm {
        script: Mutex<VecDeque<Result<(), CrmError>>>,
        /// (event id, activity id, tokio time of the attempt), every attempt.
        attempts: Mutex<Vec<(String, ActivityId, tokio::time::Instant)>>,
        delivered: Mutex<Vec<String>>,
    }

    impl FakeCrm {
        fn new(script: Vec<Result<(), CrmError>>) -> Arc<Self> {
            Arc::new(FakeCrm {
                script: Mutex::new(script.into()),
                attempts: Mutex::new(Vec::new()),
                delivered: Mutex::new(Vec::new()),
            })
        }
        fn delivered(&self) -> Vec<String> {
            self.delivered.lock().unwrap().clone()
        }
        fn attempt_times(&self, id: &str) -> Vec<tokio::time::Instant> {
            let a = self.attempts.lock().unwrap();
            a.iter().filter(|x| x.0 == id).map(|x| x.2).collect()
        }
    }

    impl CrmAdapter for FakeCrm {
        fn name(&self) -> &'static str {
            "fake"
        }
        async fn pull_records(&self, _: Option<&str>) -> Result<RecordPage, CrmError> {
            Ok(RecordPage::default())
        }
        async fn deliver(
            &self,
            event: &OutboxEvent,
            _: Option<&str>,
        ) -> Result<DeliveryReceipt, CrmError> {
            self.attempts.lock().unwrap().push((
                event.id.clone(),
                event.activity_id,
                tokio::time::Instant::now(),
            ));
            let next = self.script.lock().unwrap().pop_front().unwrap_or(Ok(()));
            next.map(|()| {
                self.delivered.lock().unwrap().push(event.id.clone());
                DeliveryReceipt {
                    crm_id: Some(format!("crm-{}", event.activity_id)),
                }
            })
        }
        async fn test(&self) -> Result<String, CrmError> {
            Ok("fake".into())
        }
    }

    fn activity(id: ActivityId, uid: &str) -> crate::model::EmailActivity {
        crate::model::EmailActivity {
            id,
            mailbox: "support".into(),
            source: crate::model::SourceKey {
                mailbox: "support".into(),
                folder: "INBOX".into(),
                uidvalidity: 1,
                uid: uid.into(),
            },
            message_ids: vec![format!("<{uid}@example.test>")],
            in_reply_to: vec![],
            references: vec![],
            direction: crate::model::Direction::Incoming,
            subject: format!("subject {uid}"),
            from: vec!["a@example.test".into()],
            to: vec!["support@example.test".into()],
            cc: vec![],
            sent_at: Some(1_767_000_000),
            received_at: 1_767_000_000,
            regarding: None,
            method: crate::model::CorrelationMethod::None,
            score: 0.0,
            reasons: vec![],
            correlated_with: None,
            content_hash: format!("hash-{uid}"),
            size: 10,
            also_seen_as: vec![],
            forwarded_by: None,
            automatic: None,
            no_reply: false,
            parties: vec![],
            send: None,
        }
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        store: Arc<dyn Store>,
        health: Arc<OutboxHealth>,
        cancel: CancellationToken,
    }

    /// A store with the fake consumer and `n` activities (ids 1..=n), each
    /// with one `activity.created` event (seq = id).
    fn fixture(n: u64) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(crate::store::SledStore::open(&dir.path().join("s")).unwrap());
        store.set_outbox_consumers(vec!["fake".into()]);
        for i in 1..=n {
            let id = store.allocate_id().unwrap();
            let batch = crate::store::CommitBatch {
                items: vec![crate::store::PendingItem::Activity(Box::new(activity(
                    id,
                    &format!("m{i}"),
                )))],
                ..Default::default()
            };
            store.commit(batch).unwrap();
        }
        Fixture {
            _dir: dir,
            store,
            health: Arc::new(OutboxHealth::default()),
            cancel: CancellationToken::new(),
        }
    }

    fn settings(schedule: &[u64], dead_letter_after: u64) -> DeliverySettings {
        DeliverySettings {
            retry_schedule: schedule.iter().map(|s| Duration::from_secs(*s)).collect(),
            dead_letter_after: Duration::from_secs(dead_letter_after),
            stuck_after: Duration::from_secs(3600),
        }
    }

    fn spawn(f: &Fixture, crm: &Arc<FakeCrm>, s: &DeliverySettings) -> tokio::task::JoinHandle<()> {
        let w = OutboxWorker::new(
            crm.clone(),
            f.store.clone(),
            s,
            f.health.clone(),
            f.cancel.clone(),
        )
        .with_clock(Clock::tokio());
        tokio::spawn(w.run())
    }

    /// Advances paused time in small steps (letting blocking store calls
    /// finish) until `done` or `limit` passes.
    async fn run_until(limit: Duration, mut done: impl FnMut() -> bool) {
        let end = tokio::time::Instant::now() + limit;
        while !done() && tokio::time::Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn ids(range: std::ops::RangeInclusive<u64>) -> Vec<String> {
        range.map(OutboxEvent::id_for).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn delivers_every_event_in_order_and_records_the_crm_id() {
        let f = fixture(5);
        let crm = FakeCrm::new(vec![]);
        let h = spawn(&f, &crm, &settings(&[0, 5], 3600));
        run_until(Duration::from_secs(10), || crm.delivered().len() == 5).await;
        assert_eq!(crm.delivered(), ids(1..=5));
        assert!(f.store.pending_deliveries("fake", 0).unwrap().is_empty());
        assert_eq!(f.store.crm_id("fake", 3).unwrap().as_deref(), Some("crm-3"));
        f.cancel.cancel();
        h.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failures_follow_the_schedule_and_retry_after() {
        let f = fixture(1);
        let crm = FakeCrm::new(vec![
            Err(CrmError::transient("503")),
            Err(CrmError::transient("503")),
            Err(CrmError::Transient {
                message: "429".into(),
                retry_after: Some(Duration::from_secs(20)),
            }),
        ]);
        let h = spawn(&f, &crm, &settings(&[0, 5, 10], 3600));
        run_until(Duration::from_secs(120), || crm.delivered().len() == 1).await;
        assert_eq!(crm.delivered(), ids(1..=1));
        let t = crm.attempt_times("evt_1");
        assert_eq!(t.len(), 4, "{t:?}");
        let gaps: Vec<Duration> = t.windows(2).map(|w| w[1] - w[0]).collect();
        // 1st failure: at once (within the second), 2nd: 5 s, 3rd: 10 s by
        // the schedule but 20 s asked for by Retry-After.
        assert!(gaps[0] <= Duration::from_secs(1), "{gaps:?}");
        assert!(
            gaps[1] >= Duration::from_secs(5) && gaps[1] <= Duration::from_secs(7),
            "{gaps:?}"
        );
        assert!(
            gaps[2] >= Duration::from_secs(20) && gaps[2] <= Duration::from_secs(22),
            "{gaps:?}"
        );
        f.cancel.cancel();
        h.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_holds_every_request_of_the_adapter() {
        let f = fixture(3);
        let crm = FakeCrm::new(vec![Err(CrmError::Transient {
            message: "429 Too Many Requests".into(),
            retry_after: Some(Duration::from_secs(20)),
        })]);
        let start = tokio::time::Instant::now();
        let h = spawn(&f, &crm, &settings(&[0, 5], 3600));
        run_until(Duration::from_secs(60), || crm.delivered().len() == 3).await;
        assert_eq!(crm.delivered(), ids(1..=3));
        // Nothing at all was sent during the 20 s the CRM asked for.
        for id in ["evt_1", "evt_2", "evt_3"] {
            let t = crm.attempt_times(id);
            let after = t.last().unwrap().duration_since(start);
            assert!(after >= Duration::from_secs(20), "{id} at {after:?}");
        }
        assert_eq!(crm.attempt_times("evt_2").len(), 1);
        f.cancel.cancel();
        h.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_alert_left_open_by_an_earlier_run_is_resolved_when_delivery_works() {
        let f = fixture(1);
        f.store
            .raise_alert(
                NewAlert {
                    kind: PAUSED_KIND,
                    level: AlertLevel::Error,
                    mailbox: Some("crm:fake"),
                    profile: None,
                    text: "CRM fake: delivery paused (probing every 10h): 410 Gone",
                },
                1,
            )
            .unwrap();
        let crm = FakeCrm::new(vec![]);
        let h = spawn(&f, &crm, &settings(&[0], 3600));
        run_until(Duration::from_secs(5), || crm.delivered().len() == 1).await;
        run_until(Duration::from_secs(1), || false).await;
        assert!(f.store.alerts(10).unwrap()[0].resolved_at.is_some());
        f.cancel.cancel();
        h.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn an_activity_waits_behind_its_failing_event_while_others_proceed() {
        let f = fixture(3);
        // evt_4: a later event of activity 1 (parties resolved later).
        let mut a = f.store.activity(1).unwrap().unwrap();
        a.reasons.push("updated".into());
        assert_eq!(
            f.store
                .update_activity(a, vec!["parties".into()], 0)
                .unwrap(),
            Some(4)
        );
        // evt_1 fails twice; the others go at once.
        let crm = FakeCrm::new(vec![
            Err(CrmError::transient("down")),
            Ok(()),
            Ok(()),
            Err(CrmError::transient("down")),
        ]);
        let h = spawn(&f, &crm, &settings(&[0, 5], 3600));
        run_until(Duration::from_secs(60), || crm.delivered().len() == 4).await;
        let order = crm.delivered();
        assert_eq!(order, vec!["evt_2", "evt_3", "evt_1", "evt_4"], "{order:?}");
        // evt_4 was never tried before evt_1 was delivered.
        let first_4 = crm.attempt_times("evt_4")[0];
        let last_1 = *crm.attempt_times("evt_1").last().unwrap();
        assert!(first_4 >= last_1);
        f.cancel.cancel();
        h.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_event_is_dead_lettered_at_once_with_an_alert() {
        let f = fixture(2);
        let crm = FakeCrm::new(vec![Err(CrmError::permanent(
            "webhook answered 400 Bad Request: missing field subject",
        ))]);
        let h = spawn(&f, &crm, &settings(&[0, 5], 3600));
        run_until(Duration::from_secs(10), || crm.delivered().len() == 1).await;
        assert_eq!(crm.delivered(), ids(2..=2));
        let dead = f.store.dead_letters("fake", 0).unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].state.seq, 1);
        assert!(dead[0].reason.contains("missing field subject"));
        let alerts = f.store.alerts(10).unwrap();
        assert_eq!(alerts.len(), 1);
        assert_eq!(alerts[0].level, AlertLevel::Error);
        assert!(alerts[0].text.contains("evt_1"), "{}", alerts[0].text);
        assert!(alerts[0].text.contains("missing field subject"));
        f.cancel.cancel();
        h.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn an_event_failing_past_the_dead_letter_age_moves_to_the_dead_letters() {
        let f = fixture(1);
        let crm = FakeCrm::new(vec![
            Err(CrmError::transient("503 Service Unavailable"));
            100
        ]);
        let h = spawn(&f, &crm, &settings(&[0, 5], 30));
        run_until(Duration::from_secs(120), || {
            !f.store.dead_letters("fake", 0).unwrap().is_empty()
        })
        .await;
        let dead = f.store.dead_letters("fake", 0).unwrap();
        assert_eq!(dead.len(), 1);
        assert!(dead[0].reason.contains("503"));
        assert!(f.store.pending_deliveries("fake", 0).unwrap().is_empty());
        let alerts = f.store.alerts(10).unwrap();
        assert_eq!(alerts.len(), 1, "{alerts:?}");
        assert!(alerts[0].text.contains("evt_1") && alerts[0].text.contains("activity 1"));
        assert!(alerts[0].text.contains("503 Service Unavailable"));
        // Tried at 0, ~0, 5, 10, … until 30 s had passed: not afterwards.
        let n = crm.attempt_times("evt_1").len();
        assert!((6..=9).contains(&n), "{n} attempts");
        f.cancel.cancel();
        h.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn an_endpoint_failure_pauses_probes_at_the_longest_wait_and_resumes() {
        let f = fixture(3);
        let crm = FakeCrm::new(vec![
            Err(CrmError::endpoint("webhook answered 410 Gone")),
            Err(CrmError::endpoint("webhook answered 410 Gone")),
        ]);
        let h = spawn(&f, &crm, &settings(&[0, 5, 60], 10));
        run_until(Duration::from_secs(30), || false).await;
        // One attempt only (no other event tried while paused), one alert,
        // not ready.
        assert_eq!(crm.attempts.lock().unwrap().len(), 1);
        let alerts = f.store.alerts(10).unwrap();
        assert_eq!(alerts.len(), 1);
        assert!(alerts[0].text.contains("delivery paused") && alerts[0].text.contains("410"));
        let problems = f.health.problems(Clock::tokio().unix());
        assert!(
            problems.iter().any(|p| p.contains("paused")),
            "{problems:?}"
        );
        // The probe at 60 s fails again (still one alert), the one at 120 s
        // works: everything goes, nothing dead-lettered though older than
        // dead_letter_after (the endpoint was at fault, not the events).
        run_until(Duration::from_secs(200), || crm.delivered().len() == 3).await;
        assert_eq!(crm.delivered(), ids(1..=3));
        let t = crm.attempt_times("evt_1");
        assert_eq!(t.len(), 3);
        assert!(t[1] - t[0] >= Duration::from_secs(60));
        assert!(t[2] - t[1] >= Duration::from_secs(60));
        assert!(f.store.dead_letters("fake", 0).unwrap().is_empty());
        let alerts = f.store.alerts(10).unwrap();
        assert_eq!(alerts.len(), 1);
        assert!(alerts[0].resolved_at.is_some(), "{alerts:?}");
        assert!(f.health.problems(Clock::tokio().unix()).is_empty());
        f.cancel.cancel();
        h.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn new_events_wake_the_worker_and_shutdown_stops_it() {
        let f = fixture(1);
        let crm = FakeCrm::new(vec![]);
        let h = spawn(&f, &crm, &settings(&[0], 3600));
        run_until(Duration::from_secs(5), || crm.delivered().len() == 1).await;
        let mut a = f.store.activity(1).unwrap().unwrap();
        a.reasons.push("x".into());
        f.store
            .update_activity(a, vec!["parties".into()], 0)
            .unwrap();
        let start = tokio::time::Instant::now();
        run_until(Duration::from_secs(5), || crm.delivered().len() == 2).await;
        // Woken by the commit, not by the 15 s refresh.
        assert!(start.elapsed() < Duration::from_secs(2));
        f.cancel.cancel();
        h.await.unwrap();
    }

    #[test]
    fn readiness_reports_an_outbox_older_than_stuck_after() {
        let h = OutboxHealth::default();
        h.update("webhook", |a| {
            a.stuck_after = Duration::from_secs(60);
            a.oldest_queued_at = Some(1000);
        });
        assert!(h.problems(1050).is_empty());
        let p = h.problems(1100);
        assert_eq!(p.len(), 1);
        assert!(p[0].contains("stuck") && p[0].contains("webhook"), "{p:?}");
    }
}
