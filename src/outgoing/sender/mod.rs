//! The per-mailbox sender: takes queued email, sends it exactly once when
//! the daemon survives, and never twice silently when it does not.
//!
//! Per email, in order, each step durable before the next:
//! 1. `sending, attempt N` (queue row + activity event, one batch);
//! 2. the SMTP transaction (the same bytes, so the same Message-ID, every time);
//! 3. `sent` at once (the smallest window for a crash), with the Sent copy
//!    owed when the profile has a Sent folder;
//! 4. the Sent copy: looked for first, APPENDed only when absent, the
//!    Message-ID the server stored read back and indexed.
//!
//! An email a crash left in `sending` is looked for in the Sent folder
//! before anything else: found → `sent`; not found → `failed` with
//! "delivery unknown" for a person (`unknown_delivery = "fail"`, the
//! default) or sent again (`"resend"`). The window that remains (accepted
//! by the server, crash before step 3, no copy the server filed itself) is
//! documented in the README.
//!
//! Over Microsoft Graph ([`super::transport`]) step 2 is `sendMail`, whose
//! `202 Accepted` is not delivery: the email stays `sending` with
//! "accepted at T" durable (`OutgoingEmail::accepted_at`) and is looked
//! for in Sent Items at each due scan, with a back-off, until it shows up
//! (`sent`, its Sent Items id recorded) or `confirm_for` runs out
//! (`failed`, saying what to check). Exchange files that copy itself, so
//! steps 3–4 are one. A crash leaves nothing new: an accepted email keeps
//! being confirmed, one not accepted yet is resolved as above.

use crate::model::ApprovalStatus;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::compose::{self, Draft};
use super::transport::{
    Found, SendError, SmtpTransportSettings, Submitted, Transport, TransportSettings,
};
use super::SendWakeup;
use crate::alerts::{kind, Alerts};
use crate::config::{Config, Mailbox, OutgoingSettings, Profile, SentCopyMode, UnknownDelivery};
use crate::connector::imap::Credentials;
use crate::connector::oauth::TokenProvider;
use crate::error::{Classify, Disposition};
use crate::model::{self, AlertLevel, OutgoingEmail, SendStatus, SentCopy, TestResult, TestStatus};
use crate::net::Endpoint;
use crate::scheduler::Backoff;
use crate::store::{Store, StoreError};
use crate::telemetry;

/// How often the queue is scanned when nothing wakes the sender.
pub const SCAN_EVERY: Duration = Duration::from_secs(5);

/// Prefix of the alerts a failed email raises (resolved by nothing: each
/// one names its email).
const FAILED_ALERT: &str = "outgoing email";
/// A passed Test & Enable younger than this (seconds) is not followed by
/// another test message.
const TEST_MESSAGE_EVERY: i64 = 86_400;

/// Prefix of the outgoing Test & Enable alert, resolved when a test passes.
const TEST_ALERT: &str = "outgoing test failed";

/// Everything a sender needs, built from the config.
#[derive(Debug, Clone)]
pub struct SenderSettings {
    pub mailbox: String,
    pub profile: String,
    pub address: String,
    /// SMTP or Microsoft Graph, with their own settings.
    pub transport: TransportSettings,
    pub rate_per_minute: u32,
    pub backoff: Backoff,
    pub policy: OutgoingSettings,
    /// Send a message to the mailbox itself at start (Test & Enable).
    pub test_message: bool,
    /// The configuration's approval of the address where only approved
    /// mailboxes send (`process_only_approved`); `None`: approval does not
    /// matter. An operator's approve or reject overrides it.
    pub configured_approval: Option<ApprovalStatus>,
}

impl SenderSettings {
    /// The SMTP settings of `mailbox` (with its profile's current secrets).
    pub fn new(
        cfg: &Config,
        profile: &Profile,
        mailbox: &Mailbox,
        credentials: Credentials,
        token_provider: Option<Arc<dyn TokenProvider>>,
    ) -> Result<Self, String> {
        let smtp = profile.smtp.clone().ok_or_else(|| {
            format!(
                "profile {:?} has no SMTP submission; only imap_smtp and pop3_smtp profiles send over SMTP (exchange_online sends over Microsoft Graph)",
                profile.name
            )
        })?;
        let same_host = profile.host.as_deref() == Some(smtp.host.as_str());
        let endpoint = Endpoint {
            host: smtp.host.clone(),
            port: smtp.port,
            tls: smtp.tls,
            // The IMAP certificate name only applies to the same host.
            tls_server_name: profile.tls_server_name.clone().filter(|_| same_host),
            ca_file: profile.ca_file.clone(),
            connect_timeout: profile.connect_timeout,
            io_timeout: profile.io_timeout,
        };
        let imap_endpoint = match smtp.sent_copy {
            SentCopyMode::None => None,
            _ => Some(crate::daemon::endpoint(profile)?),
        };
        let transport = TransportSettings::Smtp(SmtpTransportSettings {
            smtp,
            endpoint,
            allow_insecure: profile.allow_insecure,
            imap_endpoint,
            credentials,
            token_provider,
        });
        Ok(Self::with_transport(cfg, profile, mailbox, transport))
    }

    /// The settings of `mailbox` sending over `transport`.
    pub fn with_transport(
        cfg: &Config,
        profile: &Profile,
        mailbox: &Mailbox,
        transport: TransportSettings,
    ) -> Self {
        SenderSettings {
            mailbox: mailbox.name.clone(),
            profile: profile.name.clone(),
            address: mailbox.email.clone(),
            transport,
            rate_per_minute: mailbox.send_rate_per_minute,
            backoff: Backoff {
                base: Duration::from_secs(1),
                max: profile.retry_backoff_max.min(Duration::from_secs(300)),
                jitter: 0.2,
            },
            policy: cfg.outgoing.clone(),
            test_message: true,
            configured_approval: cfg.process_only_approved.then_some(mailbox.approval),
        }
    }
}

/// At most `per_minute` starts in any 60 seconds (a sliding window, so a
/// runaway workflow cannot burst past it at a minute boundary).
#[derive(Debug)]
struct RateLimit {
    per_minute: usize,
    starts: VecDeque<Instant>,
}

impl RateLimit {
    fn new(per_minute: u32) -> Self {
        RateLimit {
            per_minute: per_minute.max(1) as usize,
            starts: VecDeque::new(),
        }
    }

    /// How long until one more start is allowed (zero: now, and counted).
    fn take(&mut self, now: Instant) -> Duration {
        let window = Duration::from_secs(60);
        while self
            .starts
            .front()
            .is_some_and(|t| now.duration_since(*t) >= window)
        {
            self.starts.pop_front();
        }
        if self.starts.len() < self.per_minute {
            self.starts.push_back(now);
            return Duration::ZERO;
        }
        self.starts.front().map_or(Duration::ZERO, |t| {
            window.saturating_sub(now.duration_since(*t))
        })
    }
}

/// One mailbox's sender.
pub struct Sender {
    settings: SenderSettings,
    store: Arc<dyn Store>,
    alerts: Arc<Alerts>,
    wakeup: SendWakeup,
    cancel: CancellationToken,
    transport: Transport,
    rate: Mutex<RateLimit>,
    /// Sent copies owed, made one after another by the copy worker so a
    /// slow or failing IMAP server never holds up SMTP: (row, first attempt).
    copies: tokio::sync::mpsc::UnboundedSender<(OutgoingEmail, bool)>,
    copy_queue:
        std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<(OutgoingEmail, bool)>>>,
    /// Emails handed to the copy worker and not done yet (a scan does not
    /// hand them over twice).
    copying: std::sync::Mutex<std::collections::HashSet<model::ActivityId>>,
}

impl std::fmt::Debug for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender")
            .field("mailbox", &self.settings.mailbox)
            .finish()
    }
}

/// How one email went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Sent,
    Deferred,
    Failed,
    /// Nothing done (not due, store or IMAP trouble: tried again later).
    Untouched,
    /// Accepted by a transport that confirms later (Graph `202`), or still
    /// being confirmed: looked at again at this time.
    Confirming(model::UnixTime),
}

impl Sender {
    /// A sender; connects on first use.
    pub fn new(
        settings: SenderSettings,
        store: Arc<dyn Store>,
        alerts: Arc<Alerts>,
        wakeup: SendWakeup,
        cancel: CancellationToken,
    ) -> Result<Self, String> {
        let transport = Transport::new(&settings.transport)?;
        let rate = Mutex::new(RateLimit::new(settings.rate_per_minute));
        let (copies, rx) = tokio::sync::mpsc::unbounded_channel();
        Ok(Sender {
            settings,
            store,
            alerts,
            wakeup,
            cancel,
            transport,
            rate,
            copies,
            copy_queue: std::sync::Mutex::new(Some(rx)),
            copying: std::sync::Mutex::new(std::collections::HashSet::new()),
        })
    }

    /// Test & Enable, then sends until the daemon stops.
    pub async fn run(self) {
        let me = Arc::new(self);
        if !me.wait_until_released().await {
            return;
        }
        // Outgoing Test & Enable; a failing test is retried with back-off,
        // queued email waits (the alert says why).
        let mut attempt = 0u32;
        loop {
            match me.test_and_enable().await {
                Ok(_) => break,
                Err(_) => {
                    attempt += 1;
                    let wait = me
                        .settings
                        .backoff
                        .delay(attempt)
                        .max(Duration::from_secs(5));
                    tokio::select! {
                        _ = me.cancel.cancelled() => return,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
        tracing::info!(mailbox = %me.settings.mailbox, "outgoing: sending queued email");
        let worker = me.clone().start_copy_worker();
        let mut held = false;
        loop {
            if me.cancel.is_cancelled() {
                break;
            }
            // An operator's disable or reject holds the queue (nothing is
            // lost: the email waits, queued) until they change it back.
            let next = match me.held_by_operator() {
                Some(why) => {
                    if !std::mem::replace(&mut held, true) {
                        tracing::info!(mailbox = %me.settings.mailbox, "outgoing: holding queued email: {why}");
                    }
                    None
                }
                None => {
                    if std::mem::take(&mut held) {
                        tracing::info!(mailbox = %me.settings.mailbox, "outgoing: sending queued email again");
                    }
                    me.clone().scan().await
                }
            };
            let wait = next.unwrap_or(SCAN_EVERY).min(SCAN_EVERY);
            tokio::select! {
                _ = me.cancel.cancelled() => break,
                _ = me.wakeup.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
        if let Some(w) = worker {
            let _ = w.await;
        }
        me.transport.close().await;
    }

    /// Waits while the mailbox's email is held (not approved yet, disabled
    /// by an operator): nothing is sent, not even the test message, until
    /// it is lifted. False on shutdown.
    async fn wait_until_released(&self) -> bool {
        let mut said = false;
        while let Some(why) = self.held_by_operator() {
            if !std::mem::replace(&mut said, true) {
                tracing::info!(mailbox = %self.settings.mailbox, "outgoing: waiting before the first send: {why}");
            }
            tokio::select! {
                _ = self.cancel.cancelled() => return false,
                _ = self.wakeup.notified() => {}
                _ = tokio::time::sleep(SCAN_EVERY) => {}
            }
        }
        true
    }

    /// Why this mailbox's outgoing email is held (disabled by an operator,
    /// its address rejected, or not approved yet where only approved
    /// mailboxes send), if it is.
    fn held_by_operator(&self) -> Option<String> {
        let control = match self.store.mailbox_control(&self.settings.mailbox) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(mailbox = %self.settings.mailbox, error = %e, "outgoing: cannot read the mailbox's settings; sending as configured");
                return None;
            }
        };
        if let Some(at) = control.disabled_at {
            return Some(format!(
                "the mailbox was disabled by an operator at {}",
                crate::model::format_time(at)
            ));
        }
        match (control.approval, self.settings.configured_approval) {
            (Some(a), _) if a != ApprovalStatus::Approved => Some(format!(
                "its email address is {} by an operator",
                format!("{a:?}").to_ascii_lowercase()
            )),
            (None, Some(a)) if a != ApprovalStatus::Approved => Some(format!(
                "its email address is not approved (approval = {:?} in the configuration) and only approved mailboxes send: approve it (POST /api/v1/mailboxes/{}/approve)",
                format!("{a:?}").to_ascii_lowercase(),
                self.settings.mailbox
            )),
            _ => None,
        }
    }

    /// Starts the task that makes the Sent copies handed to it, in order;
    /// after an IMAP failure it waits (back-off) before the next one.
    fn start_copy_worker(self: Arc<Self>) -> Option<tokio::task::JoinHandle<()>> {
        let mut rx = self
            .copy_queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()?;
        Some(tokio::spawn(async move {
            let mut failures = 0u32;
            loop {
                let next = tokio::select! {
                    _ = self.cancel.cancelled() => None,
                    n = rx.recv() => n,
                };
                let Some((row, first)) = next else { break };
                let id = row.activity_id;
                let made = match self.file_copy(row, first).await {
                    Ok(made) => made,
                    Err(e) => {
                        tracing::error!(mailbox = %self.settings.mailbox, error = %e, "outgoing: store error on a Sent copy; retried at the next scan");
                        false
                    }
                };
                self.done_copying(id);
                if made {
                    failures = 0;
                    continue;
                }
                failures += 1;
                let wait = self.settings.backoff.delay(failures);
                tokio::select! {
                    _ = self.cancel.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }))
    }

    /// Hands a sent email's copy to the copy worker, once.
    fn enqueue_copy(&self, row: OutgoingEmail, first_attempt: bool) {
        let fresh = self
            .copying
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(row.activity_id);
        if fresh && self.copies.send((row.clone(), first_attempt)).is_err() {
            self.done_copying(row.activity_id);
        }
    }

    fn done_copying(&self, id: model::ActivityId) {
        self.copying
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&id);
    }

    /// Connect, authenticate, send a test message from the mailbox to
    /// itself; records `outgoing_test` with the concrete cause.
    pub async fn test_and_enable(&self) -> Result<String, SendError> {
        let s = &self.settings;
        // One test message a day at most: a daemon restarted in a loop
        // (a crash, a supervisor) must not keep mailing its own mailbox.
        let recent_test = self
            .store
            .mailbox_state(&s.mailbox)
            .ok()
            .flatten()
            .map(|st| st.outgoing_test)
            .filter(|t| t.status == TestStatus::Success)
            .and_then(|t| t.completed_on)
            .filter(|at| model::now() - at < TEST_MESSAGE_EVERY);
        let result = self.probe(recent_test).await;
        let now = model::now();
        let test = match &result {
            Ok(detail) => TestResult::passed(now, detail.clone()),
            Err(e) => TestResult::failed(now, e.to_string()),
        };
        if let Err(e) = self.store.set_outgoing_test(&s.mailbox, &test) {
            tracing::error!(mailbox = %s.mailbox, error = %e, "cannot record the outgoing test");
        }
        match &result {
            Ok(detail) => {
                tracing::info!(mailbox = %s.mailbox, "outgoing test: {detail}");
                self.alerts.resolve(&s.mailbox, kind::OUTGOING_TEST, now);
            }
            Err(e) => self.alerts.raise(
                kind::OUTGOING_TEST,
                AlertLevel::Error,
                Some(&s.mailbox),
                Some(&s.profile),
                &format!("{TEST_ALERT}: {e}; queued email waits and the test is retried"),
                now,
            ),
        }
        result
    }

    /// The outgoing test itself, recording nothing: connect, authenticate
    /// and send a test message from the mailbox to itself, unless a test
    /// passed at `passed_at` (then the message is not repeated). On-demand
    /// Test & Enable passes `None`: the operator asked for the message.
    pub async fn probe(&self, passed_at: Option<model::UnixTime>) -> Result<String, SendError> {
        let s = &self.settings;
        let connected = self.transport.test_connection().await?;
        if let Some(at) = passed_at {
            return Ok(format!(
                "{connected} (test message not repeated: the last test passed at {})",
                chrono::DateTime::from_timestamp(at, 0)
                    .map(|d| d.to_rfc3339())
                    .unwrap_or_default()
            ));
        }
        if !s.test_message {
            return Ok(connected);
        }
        let now = model::now();
        let draft = Draft {
            from: s.address.clone(),
            to: vec![s.address.clone()],
            subject: "crm-mailsync outgoing test".into(),
            text: Some(format!(
                "Test message of mailbox {:?}: the CRM's email is sent through {}.\r\nNo action needed.",
                s.mailbox,
                self.transport.describe()
            )),
            message_id: compose::new_message_id(&s.address),
            automated: true,
            date: now,
            ..Draft::default()
        };
        let c =
            compose::compose(&draft, &s.policy).map_err(|e| SendError::Compose(e.join("; ")))?;
        let how = self
            .transport
            .send_test(&c.envelope_from, &c.recipients, c.mime.as_bytes())
            .await?;
        Ok(format!("sent a test message to {} {how}", s.address))
    }

    /// Closes the connections the sender keeps (the Sent folder's).
    pub async fn close(&self) {
        self.transport.close().await;
    }

    /// One pass over the mailbox's queue; returns when the earliest
    /// deferred (or to be confirmed) email is due, if any.
    async fn scan(self: Arc<Self>) -> Option<Duration> {
        let rows = match self.store.outgoing_queued(Some(&self.settings.mailbox), 0) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(mailbox = %self.settings.mailbox, error = %e, "cannot read the outgoing queue");
                return None;
            }
        };
        let now = model::now();
        let mut next_due: Option<i64> = None;
        let mut tasks = JoinSet::new();
        let parallel = self.settings.transport.parallel();
        for row in rows {
            if self.cancel.is_cancelled() {
                break;
            }
            if row.status.is_queued() && row.next_attempt_at > now {
                earliest(&mut next_due, row.next_attempt_at);
                continue;
            }
            if row.status == SendStatus::PendingSend {
                // The rate limit counts submissions, not copies or looks.
                loop {
                    let wait = self.rate.lock().await.take(Instant::now());
                    if wait.is_zero() {
                        break;
                    }
                    tokio::select! {
                        _ = self.cancel.cancelled() => return None,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
            while tasks.len() >= parallel {
                if let Some(Ok(Outcome::Confirming(t))) = tasks.join_next().await {
                    earliest(&mut next_due, t);
                }
            }
            let me = self.clone();
            tasks.spawn(async move { me.process(row).await });
        }
        while let Some(done) = tasks.join_next().await {
            if let Ok(Outcome::Confirming(t)) = done {
                earliest(&mut next_due, t);
            }
        }
        next_due.map(|t| Duration::from_secs(u64::try_from(t - model::now()).unwrap_or(0)))
    }

    async fn process(&self, row: OutgoingEmail) -> Outcome {
        let result = match row.status {
            SendStatus::Sending => self.resolve_sending(row).await,
            SendStatus::PendingSend => self.send_one(row).await,
            SendStatus::Sent if row.sent_copy == SentCopy::Owed => {
                // Owed from before (a crash, an IMAP failure): look first.
                self.enqueue_copy(row, false);
                Ok(Outcome::Untouched)
            }
            _ => Ok(Outcome::Untouched),
        };
        match result {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(mailbox = %self.settings.mailbox, error = %e, "outgoing: store error; retried at the next scan");
                Outcome::Untouched
            }
        }
    }

    /// Moves `row` (and its activity, with an event) to `status`.
    fn transition(
        &self,
        row: &mut OutgoingEmail,
        status: SendStatus,
        reason: Option<String>,
        now: i64,
    ) -> Result<(), StoreError> {
        self.transition_indexing(row, status, reason, now, false)
    }

    /// [`Self::transition`]; with `index_ids`, the Message-IDs the server
    /// stored the copy under are added to the activity's, so a reply to
    /// them correlates too.
    fn transition_indexing(
        &self,
        row: &mut OutgoingEmail,
        status: SendStatus,
        reason: Option<String>,
        now: i64,
        index_ids: bool,
    ) -> Result<(), StoreError> {
        row.status = status;
        let activity = self.store.activity(row.activity_id)?.map(|mut a| {
            let mut send = a
                .send
                .take()
                .unwrap_or_else(|| model::SendState::new(status, row.queued_at));
            send.set(status, reason, now);
            send.attempts = row.attempts;
            a.send = Some(send);
            let mut changes = vec!["send_status".to_string()];
            if index_ids && add_ids(&mut a, &row.server_message_ids) {
                changes.push("message_ids".to_string());
            }
            (a, changes)
        });
        self.store.update_outgoing(row, activity, now)?;
        Ok(())
    }

    async fn send_one(&self, mut row: OutgoingEmail) -> Result<Outcome, StoreError> {
        let s = &self.settings;
        if self.transport.confirms_later()
            && row.status == SendStatus::PendingSend
            && row.attempts > 0
        {
            // The answer to an earlier attempt may have been lost (a
            // time-out after Graph took it): look before sending again.
            match self.transport.find(&row).await {
                Ok(Some(found)) => {
                    let reason = format!(
                        "found in {} before attempt {} (an earlier attempt went through)",
                        self.sent_place(),
                        row.attempts + 1
                    );
                    return self.confirmed(row, found, reason);
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(mailbox = %s.mailbox, email = row.activity_id, error = %e, "cannot look for an earlier attempt in the Sent copies; sending again");
                }
            }
        }
        let now = model::now();
        {
            // A cancel through the API checks and writes under the same
            // lock: either it wins and nothing is sent, or it sees `sending`.
            let _row_lock = super::control::lock_row(row.activity_id);
            match self.store.outgoing(row.activity_id)? {
                Some(fresh) if fresh.status == row.status => row = fresh,
                _ => return Ok(Outcome::Untouched),
            }
            row.attempts += 1;
            row.accepted_at = None;
            let attempt = row.attempts;
            // Durable before the transaction: a crash from here on is
            // resolved by the Sent folder, never by a blind resend.
            let reason = format!("attempt {attempt}, Message-ID <{}>", row.message_id);
            self.transition(&mut row, SendStatus::Sending, Some(reason), now)?;
        }
        let attempt = row.attempts;
        let retry_for = s.transport.retry_for();
        let retry_until = row.retry_from.unwrap_or(row.queued_at) + retry_for.as_secs() as i64;
        let result = self.transport.submit(&row).await;
        let now = model::now();
        match result {
            Ok(Submitted::Delivered(_)) => {
                row.sent_at = Some(now);
                row.last_error = None;
                row.sent_copy = if self.transport.owes_copy() {
                    SentCopy::Owed
                } else {
                    SentCopy::NotNeeded
                };
                self.transition(&mut row, SendStatus::Sent, None, now)?;
                metrics::counter!(telemetry::OUTGOING_SENDS, "mailbox" => s.mailbox.clone(), "result" => "sent").increment(1);
                if row.sent_copy == SentCopy::Owed {
                    self.enqueue_copy(row, true);
                }
                Ok(Outcome::Sent)
            }
            Ok(Submitted::Accepted) => {
                // Not delivery yet: durable "accepted", then the sent item
                // is looked for (a crash from here on keeps confirming).
                row.accepted_at = Some(now);
                row.last_error = None;
                let first_look = now + 1;
                row.next_attempt_at = first_look;
                let reason = format!(
                    "accepted by {} at {}, attempt {attempt}, Message-ID <{}>; waiting for it in {}",
                    self.transport.describe(),
                    rfc3339(now),
                    row.message_id,
                    self.sent_place()
                );
                self.transition(&mut row, SendStatus::Sending, Some(reason), now)?;
                metrics::counter!(telemetry::OUTGOING_SENDS, "mailbox" => s.mailbox.clone(), "result" => "accepted").increment(1);
                Ok(Outcome::Confirming(first_look))
            }
            Err(e) => {
                let text = e.server_text();
                let permanent = e.disposition() == Disposition::Permanent;
                // The server's own wait (Graph's Retry-After) when longer.
                let delay = s
                    .backoff
                    .delay(attempt)
                    .max(e.retry_after().unwrap_or_default());
                let gives_up = now + delay.as_secs() as i64 > retry_until;
                row.last_error = Some(text.clone());
                if permanent || gives_up {
                    let reason = if permanent {
                        text.clone()
                    } else {
                        format!(
                            "gave up after {attempt} attempts over {}: {text}",
                            humantime::format_duration(retry_for)
                        )
                    };
                    self.fail(&mut row, reason, AlertLevel::Error, now)?;
                    Ok(Outcome::Failed)
                } else {
                    row.next_attempt_at = now + delay.as_secs().max(1) as i64;
                    let reason = format!(
                        "attempt {attempt} failed: {text}; retrying in {}",
                        humantime::format_duration(Duration::from_secs(delay.as_secs().max(1)))
                    );
                    tracing::warn!(mailbox = %s.mailbox, email = row.activity_id, "{reason}");
                    self.transition(&mut row, SendStatus::PendingSend, Some(reason), now)?;
                    metrics::counter!(telemetry::OUTGOING_SENDS, "mailbox" => s.mailbox.clone(), "result" => "deferred").increment(1);
                    Ok(Outcome::Deferred)
                }
            }
        }
    }

    /// `failed` with `reason`, counted, and an alert naming the email.
    fn fail(
        &self,
        row: &mut OutgoingEmail,
        reason: String,
        level: AlertLevel,
        now: i64,
    ) -> Result<(), StoreError> {
        let s = &self.settings;
        self.transition(row, SendStatus::Failed, Some(reason.clone()), now)?;
        metrics::counter!(telemetry::OUTGOING_SENDS, "mailbox" => s.mailbox.clone(), "result" => "failed").increment(1);
        let text = if level == AlertLevel::Error {
            format!(
                "{FAILED_ALERT} {} to {} failed: {reason}",
                row.activity_id,
                row.recipients.join(", ")
            )
        } else {
            format!("{FAILED_ALERT} {}: {reason}", row.activity_id)
        };
        self.alerts.raise(
            kind::OUTGOING_FAILED,
            level,
            Some(&s.mailbox),
            Some(&s.profile),
            &text,
            now,
        );
        Ok(())
    }

    /// Where Sent copies are looked for, in words.
    fn sent_place(&self) -> String {
        self.transport
            .sent_place()
            .unwrap_or_else(|| "the Sent folder".into())
    }

    /// Found in the Sent copies: `sent`, the ids the copy has there
    /// recorded (and a rewritten Message-ID indexed).
    fn confirmed(
        &self,
        mut row: OutgoingEmail,
        found: Found,
        reason: String,
    ) -> Result<Outcome, StoreError> {
        let now = model::now();
        row.sent_at = Some(now);
        row.sent_copy = SentCopy::Done;
        row.last_error = None;
        row.next_attempt_at = now;
        let new_id = self.note_server_id(&mut row, &found);
        if found.item_id.is_some() {
            row.server_item_id = found.item_id;
        }
        self.transition_indexing(&mut row, SendStatus::Sent, Some(reason), now, new_id)?;
        if row.accepted_at.is_some() {
            metrics::counter!(telemetry::OUTGOING_SENDS, "mailbox" => self.settings.mailbox.clone(), "result" => "sent").increment(1);
        }
        Ok(Outcome::Sent)
    }

    /// An email in `sending` at a scan: accepted by a transport that
    /// confirms later (look for it again, until the limit), or left there
    /// by a crash (delivered or not?).
    async fn resolve_sending(&self, mut row: OutgoingEmail) -> Result<Outcome, StoreError> {
        let s = &self.settings;
        let looked = self.transport.find(&row).await;
        let now = model::now();
        let confirm_for = s.transport.confirm_for().as_secs() as i64;
        let found = match looked {
            Ok(f) => f,
            Err(e) => {
                if let Some(at) = row.accepted_at.filter(|at| now - at >= confirm_for) {
                    let reason = self.unconfirmed_reason(&row, at, Some(&e));
                    self.fail(&mut row, reason, AlertLevel::Error, now)?;
                    return Ok(Outcome::Failed);
                }
                // Cannot look now: no decision without the proof.
                tracing::warn!(mailbox = %s.mailbox, email = row.activity_id, error = %e, "cannot search the Sent copies for an email in sending; trying again later");
                row.next_attempt_at = now + 5;
                self.store.update_outgoing(&row, None, now)?;
                return Ok(match row.accepted_at {
                    Some(_) => Outcome::Confirming(row.next_attempt_at),
                    None => Outcome::Untouched,
                });
            }
        };
        if let Some(found) = found {
            let reason = match row.accepted_at {
                Some(at) => format!(
                    "found in {} {} after {} accepted attempt {}",
                    self.sent_place(),
                    humantime::format_duration(Duration::from_secs(
                        u64::try_from(now - at).unwrap_or(0)
                    )),
                    self.transport.describe(),
                    row.attempts
                ),
                None => format!(
                    "found in {} after an interrupted attempt {}",
                    self.sent_place(),
                    row.attempts
                ),
            };
            return self.confirmed(row, found, reason);
        }
        if let Some(at) = row.accepted_at {
            if now - at >= confirm_for {
                let reason = self.unconfirmed_reason(&row, at, None);
                self.fail(&mut row, reason, AlertLevel::Error, now)?;
                return Ok(Outcome::Failed);
            }
            // Looked at again with a back-off: 1 s, 2 s, 4 s… after the
            // acceptance, at most `confirm_every_max` apart.
            let max = s.transport.confirm_every_max().as_secs().max(1) as i64;
            row.next_attempt_at = now + (now - at).clamp(1, max);
            self.store.update_outgoing(&row, None, now)?;
            return Ok(Outcome::Confirming(row.next_attempt_at));
        }
        // With the daemon's own APPEND the copy only exists after step 4;
        // with `server`, a missing copy is real evidence. Either way nothing
        // proves delivery.
        match s.transport.unknown_delivery() {
            UnknownDelivery::Resend => {
                tracing::warn!(mailbox = %s.mailbox, email = row.activity_id, "interrupted send not found in the Sent copies; sending again (unknown_delivery = \"resend\")");
                // Still `sending` in the store: send_one re-reads it as such.
                self.send_one(row).await
            }
            UnknownDelivery::Fail => {
                let reason = format!(
                    "delivery unknown: the daemon stopped during {} of attempt {} and {}; check whether the recipient got it, then POST /api/v1/outgoing/{}/retry to send it again",
                    self.transport.attempt_words(),
                    row.attempts,
                    match self.transport.sent_place() {
                        Some(f) => format!("the {f:?} folder has no copy"),
                        None => "the profile has no Sent folder to look in".into(),
                    },
                    row.activity_id
                );
                row.last_error = Some(reason.clone());
                self.fail(&mut row, reason, AlertLevel::Warning, now)?;
                Ok(Outcome::Failed)
            }
        }
    }

    /// Why an accepted email that never showed up failed, with what to check.
    fn unconfirmed_reason(&self, row: &OutgoingEmail, at: i64, error: Option<&str>) -> String {
        let limit = humantime::format_duration(self.settings.transport.confirm_for());
        format!(
            "not confirmed: {} accepted attempt {} at {} (Message-ID <{}>) but it did not appear in {} within {limit}{}; check the mailbox's Sent Items and the message trace in the Exchange admin center (an outbound spam or transport rule may hold it), then POST /api/v1/outgoing/{}/retry if it was not delivered",
            self.transport.describe(),
            row.attempts,
            rfc3339(at),
            row.message_id,
            self.sent_place(),
            error.map(|e| format!(" (last look failed: {e})")).unwrap_or_default(),
            row.activity_id
        )
    }

    /// Records a Message-ID the server stored the copy under, if it differs.
    fn note_server_id(&self, row: &mut OutgoingEmail, found: &Found) -> bool {
        match &found.message_id {
            Some(id)
                if !id.eq_ignore_ascii_case(&row.message_id)
                    && !row
                        .server_message_ids
                        .iter()
                        .any(|m| m.eq_ignore_ascii_case(id)) =>
            {
                row.server_message_ids.push(id.clone());
                true
            }
            _ => false,
        }
    }

    /// The Sent copy of a sent email (follow-up, at least once: unless
    /// this is the first attempt right after sending, `file` looks before
    /// it appends, so never two copies). `Ok(false)`: the IMAP server
    /// failed; the copy stays owed.
    async fn file_copy(
        &self,
        mut row: OutgoingEmail,
        first_attempt: bool,
    ) -> Result<bool, StoreError> {
        let Some((folder, mode)) = self.transport.sent_folder() else {
            row.sent_copy = SentCopy::NotNeeded;
            self.store.update_outgoing(&row, None, model::now())?;
            return Ok(true);
        };
        let marker = compose::marker_of(&row.message_id).to_owned();
        let result = match mode {
            SentCopyMode::Append => folder
                .file(&marker, &row.message_id, row.mime.as_bytes(), first_attempt)
                .await
                .map(Some),
            // The server files it itself, perhaps a moment later.
            _ => folder.find(&marker, &row.message_id).await,
        };
        let now = model::now();
        match result {
            Ok(Some(found)) => {
                row.sent_copy = SentCopy::Done;
                let found = Found {
                    message_id: found.message_id,
                    item_id: None,
                };
                if self.note_server_id(&mut row, &found) {
                    // The rewritten id is indexed with the activity, so a
                    // reply to it correlates too.
                    let activity = self.store.activity(row.activity_id)?.map(|mut a| {
                        add_ids(&mut a, &row.server_message_ids);
                        (a, vec!["message_ids".to_string()])
                    });
                    self.store.update_outgoing(&row, activity, now)?;
                } else {
                    self.store.update_outgoing(&row, None, now)?;
                }
            }
            Ok(None) => {
                let waited = now - row.sent_at.unwrap_or(now);
                if waited > self.settings.transport.retry_for().as_secs() as i64 {
                    tracing::warn!(mailbox = %self.settings.mailbox, email = row.activity_id, "the server never filed a Sent copy; no longer looking");
                    row.sent_copy = SentCopy::NotNeeded;
                    self.store.update_outgoing(&row, None, now)?;
                }
            }
            Err(e) => {
                tracing::warn!(mailbox = %self.settings.mailbox, email = row.activity_id, error = %e, "Sent copy not made yet; retried after a back-off");
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// Adds the `ids` the activity does not have yet; true when it changed.
fn add_ids(a: &mut model::EmailActivity, ids: &[String]) -> bool {
    let mut changed = false;
    for id in ids {
        if !a.message_ids.iter().any(|m| m.eq_ignore_ascii_case(id)) {
            a.message_ids.push(id.clone());
            changed = true;
        }
    }
    changed
}

/// Keeps the earlier of `next` and `t`.
fn earliest(next: &mut Option<i64>, t: i64) {
    *next = Some(next.map_or(t, |n| n.min(t)));
}

/// A time for people (UTC, RFC 3339).
fn rfc3339(t: i64) -> String {
    chrono::DateTime::from_timestamp(t, 0)
        .map(|d| d.to_rfc3339())
        .unwrap_or_else(|| t.to_string())
}

#[cfg(test)]
mod graph_tests;
#[cfg(test)]
mod tests;
