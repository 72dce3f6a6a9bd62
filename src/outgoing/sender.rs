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

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::compose::{self, Draft};
use super::sent_copy::{SentCopyFound, SentFolder};
use super::smtp::{SmtpClient, SmtpError, SmtpTarget};
use super::SendWakeup;
use crate::alerts::Alerts;
use crate::config::{
    Config, Mailbox, OutgoingSettings, Profile, SentCopyMode, SmtpSettings, UnknownDelivery,
};
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
    pub smtp: SmtpSettings,
    pub endpoint: Endpoint,
    pub allow_insecure: bool,
    pub imap_endpoint: Option<Endpoint>,
    pub credentials: Credentials,
    pub token_provider: Option<Arc<dyn TokenProvider>>,
    pub rate_per_minute: u32,
    pub backoff: Backoff,
    pub policy: OutgoingSettings,
    /// Send a message to the mailbox itself at start (Test & Enable).
    pub test_message: bool,
}

impl SenderSettings {
    /// The settings of `mailbox` (with its profile's current secrets).
    pub fn new(
        cfg: &Config,
        profile: &Profile,
        mailbox: &Mailbox,
        credentials: Credentials,
        token_provider: Option<Arc<dyn TokenProvider>>,
    ) -> Result<Self, String> {
        let smtp = profile.smtp.clone().ok_or_else(|| {
            format!(
                "profile {:?} has no SMTP submission; only imap_smtp and pop3_smtp profiles send",
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
        Ok(SenderSettings {
            mailbox: mailbox.name.clone(),
            profile: profile.name.clone(),
            address: mailbox.email.clone(),
            smtp,
            endpoint,
            allow_insecure: profile.allow_insecure,
            imap_endpoint,
            credentials,
            token_provider,
            rate_per_minute: mailbox.send_rate_per_minute,
            backoff: Backoff {
                base: Duration::from_secs(1),
                max: profile.retry_backoff_max.min(Duration::from_secs(300)),
                jitter: 0.2,
            },
            policy: cfg.outgoing.clone(),
            test_message: true,
        })
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
    smtp: SmtpClient,
    sent: Option<Arc<SentFolder>>,
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
        let smtp = SmtpClient::new(SmtpTarget {
            endpoint: settings.endpoint.clone(),
            allow_insecure: settings.allow_insecure,
            credentials: settings.credentials.clone(),
            token_provider: settings.token_provider.clone(),
            pool_size: settings.smtp.pool_size,
            hello_name: None,
        })
        .map_err(|e| e.to_string())?;
        let sent = match (&settings.imap_endpoint, &settings.smtp.sent_folder) {
            (Some(ep), Some(folder)) => Some(Arc::new(SentFolder::new(
                ep.clone(),
                settings.credentials.clone(),
                settings.token_provider.clone(),
                folder.clone(),
            ))),
            _ => None,
        };
        let rate = Mutex::new(RateLimit::new(settings.rate_per_minute));
        let (copies, rx) = tokio::sync::mpsc::unbounded_channel();
        Ok(Sender {
            settings,
            store,
            alerts,
            wakeup,
            cancel,
            smtp,
            sent,
            rate,
            copies,
            copy_queue: std::sync::Mutex::new(Some(rx)),
            copying: std::sync::Mutex::new(std::collections::HashSet::new()),
        })
    }

    /// Test & Enable, then sends until the daemon stops.
    pub async fn run(self) {
        let me = Arc::new(self);
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
        loop {
            if me.cancel.is_cancelled() {
                break;
            }
            let next = me.clone().scan().await;
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
        if let Some(s) = &me.sent {
            s.close().await;
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
    pub async fn test_and_enable(&self) -> Result<String, SmtpError> {
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
        let result: Result<String, SmtpError> = async {
            self.smtp.test_connection().await?;
            if let Some(at) = recent_test {
                return Ok(format!(
                    "connected to {}:{} and authenticated (test message not repeated: the last test passed at {})",
                    s.endpoint.host,
                    s.endpoint.port,
                    chrono::DateTime::from_timestamp(at, 0)
                        .map(|d| d.to_rfc3339())
                        .unwrap_or_default()
                ));
            }
            if !s.test_message {
                return Ok(format!(
                    "connected to {}:{} and authenticated",
                    s.endpoint.host, s.endpoint.port
                ));
            }
            let now = model::now();
            let draft = Draft {
                from: s.address.clone(),
                to: vec![s.address.clone()],
                subject: "crm-mailsync outgoing test".into(),
                text: Some(format!(
                    "Test message of mailbox {:?}: the CRM's email is sent through {}:{}.\r\nNo action needed.",
                    s.mailbox, s.endpoint.host, s.endpoint.port
                )),
                message_id: compose::new_message_id(&s.address),
                automated: true,
                date: now,
                ..Draft::default()
            };
            let c = compose::compose(&draft, &s.policy)
                .map_err(|e| SmtpError::Config(e.join("; ")))?;
            let reply = self
                .smtp
                .send(&c.envelope_from, &c.recipients, c.mime.as_bytes())
                .await?;
            Ok(format!(
                "sent a test message to {} through {}:{} ({} {})",
                s.address, s.endpoint.host, s.endpoint.port, reply.code, reply.text
            ))
        }
        .await;
        let now = model::now();
        let test = match &result {
            Ok(detail) => TestResult {
                status: TestStatus::Success,
                completed_on: Some(now),
                detail: Some(detail.clone()),
            },
            Err(e) => TestResult {
                status: TestStatus::Failure,
                completed_on: Some(now),
                detail: Some(e.to_string()),
            },
        };
        if let Err(e) = self.store.set_outgoing_test(&s.mailbox, &test) {
            tracing::error!(mailbox = %s.mailbox, error = %e, "cannot record the outgoing test");
        }
        match &result {
            Ok(detail) => {
                tracing::info!(mailbox = %s.mailbox, "outgoing test: {detail}");
                self.alerts.resolve(&s.mailbox, TEST_ALERT, now);
            }
            Err(e) => self.alerts.raise(
                AlertLevel::Error,
                Some(&s.mailbox),
                Some(&s.profile),
                &format!("{TEST_ALERT}: {e}; queued email waits and the test is retried"),
                now,
            ),
        }
        result
    }

    /// One pass over the mailbox's queue; returns when the earliest
    /// deferred email is due, if any.
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
        let parallel = self.settings.smtp.pool_size.max(1) as usize;
        for row in rows {
            if self.cancel.is_cancelled() {
                break;
            }
            if row.status.is_queued() && row.next_attempt_at > now {
                next_due =
                    Some(next_due.map_or(row.next_attempt_at, |n| n.min(row.next_attempt_at)));
                continue;
            }
            if row.status == SendStatus::PendingSend {
                // The rate limit counts SMTP transactions, not copies.
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
                let _ = tasks.join_next().await;
            }
            let me = self.clone();
            tasks.spawn(async move { me.process(row).await });
        }
        while tasks.join_next().await.is_some() {}
        next_due.map(|t| Duration::from_secs(u64::try_from(t - model::now()).unwrap_or(0)))
    }

    async fn process(&self, row: OutgoingEmail) -> Outcome {
        let result = match row.status {
            SendStatus::Sending => self.resolve_interrupted(row).await,
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
        row.status = status;
        let activity = self.store.activity(row.activity_id)?.map(|mut a| {
            let mut send = a
                .send
                .take()
                .unwrap_or_else(|| model::SendState::new(status, row.queued_at));
            send.set(status, reason, now);
            send.attempts = row.attempts;
            a.send = Some(send);
            (a, vec!["send_status".to_string()])
        });
        self.store.update_outgoing(row, activity, now)?;
        Ok(())
    }

    async fn send_one(&self, mut row: OutgoingEmail) -> Result<Outcome, StoreError> {
        let s = &self.settings;
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
            let attempt = row.attempts;
            // Durable before the transaction: a crash from here on is
            // resolved by the Sent folder, never by a blind resend.
            let reason = format!("attempt {attempt}, Message-ID <{}>", row.message_id);
            self.transition(&mut row, SendStatus::Sending, Some(reason), now)?;
        }
        let attempt = row.attempts;
        let retry_until =
            row.retry_from.unwrap_or(row.queued_at) + s.smtp.retry_for.as_secs() as i64;
        let result = self
            .smtp
            .send(&row.envelope_from, &row.recipients, row.mime.as_bytes())
            .await;
        let now = model::now();
        match result {
            Ok(_) => {
                row.sent_at = Some(now);
                row.last_error = None;
                row.sent_copy = if self.sent.is_some() {
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
            Err(e) => {
                let text = e.server_text();
                let permanent = e.disposition() == Disposition::Permanent;
                let delay = s.backoff.delay(attempt);
                let gives_up = now + delay.as_secs() as i64 > retry_until;
                row.last_error = Some(text.clone());
                if permanent || gives_up {
                    let reason = if permanent {
                        text.clone()
                    } else {
                        format!(
                            "gave up after {attempt} attempts over {}: {text}",
                            humantime::format_duration(s.smtp.retry_for)
                        )
                    };
                    self.transition(&mut row, SendStatus::Failed, Some(reason.clone()), now)?;
                    metrics::counter!(telemetry::OUTGOING_SENDS, "mailbox" => s.mailbox.clone(), "result" => "failed").increment(1);
                    self.alerts.raise(
                        AlertLevel::Error,
                        Some(&s.mailbox),
                        Some(&s.profile),
                        &format!(
                            "{FAILED_ALERT} {} to {} failed: {reason}",
                            row.activity_id,
                            row.recipients.join(", ")
                        ),
                        now,
                    );
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

    /// An email a crash left in `sending`: delivered or not?
    async fn resolve_interrupted(&self, mut row: OutgoingEmail) -> Result<Outcome, StoreError> {
        let s = &self.settings;
        let marker = compose::marker_of(&row.message_id).to_owned();
        let found = match &self.sent {
            Some(folder) => match folder.find(&marker, &row.message_id).await {
                Ok(f) => f,
                Err(e) => {
                    // Cannot look now: no decision without the proof.
                    tracing::warn!(mailbox = %s.mailbox, email = row.activity_id, error = %e, "cannot search the Sent folder for an interrupted send; trying again later");
                    row.next_attempt_at = model::now() + 5;
                    self.store.update_outgoing(&row, None, model::now())?;
                    return Ok(Outcome::Untouched);
                }
            },
            None => None,
        };
        let now = model::now();
        if let Some(found) = found {
            row.sent_at = Some(now);
            row.sent_copy = SentCopy::Done;
            self.note_server_id(&mut row, &found);
            let reason = format!(
                "found in {} after an interrupted attempt {}",
                self.sent.as_ref().map_or("", |f| f.folder()),
                row.attempts
            );
            self.transition(&mut row, SendStatus::Sent, Some(reason), now)?;
            return Ok(Outcome::Sent);
        }
        // With the daemon's own APPEND the copy only exists after step 4;
        // with `server`, a missing copy is real evidence. Either way nothing
        // proves delivery.
        match s.smtp.unknown_delivery {
            UnknownDelivery::Resend => {
                tracing::warn!(mailbox = %s.mailbox, email = row.activity_id, "interrupted send not found in the Sent folder; sending again (unknown_delivery = \"resend\")");
                // Still `sending` in the store: send_one re-reads it as such.
                self.send_one(row).await
            }
            UnknownDelivery::Fail => {
                let reason = format!(
                    "delivery unknown: the daemon stopped during the SMTP transaction of attempt {} and {}; check whether the recipient got it, then POST /api/v1/outgoing/{}/retry to send it again",
                    row.attempts,
                    match &self.sent {
                        Some(f) => format!("the {:?} folder has no copy", f.folder()),
                        None => "the profile has no Sent folder to look in".into(),
                    },
                    row.activity_id
                );
                row.last_error = Some(reason.clone());
                self.transition(&mut row, SendStatus::Failed, Some(reason.clone()), now)?;
                self.alerts.raise(
                    AlertLevel::Warning,
                    Some(&s.mailbox),
                    Some(&s.profile),
                    &format!("{FAILED_ALERT} {}: {reason}", row.activity_id),
                    now,
                );
                Ok(Outcome::Failed)
            }
        }
    }

    /// Records a Message-ID the server stored the copy under, if it differs.
    fn note_server_id(&self, row: &mut OutgoingEmail, found: &SentCopyFound) -> bool {
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
        let Some(folder) = &self.sent else {
            row.sent_copy = SentCopy::NotNeeded;
            self.store.update_outgoing(&row, None, model::now())?;
            return Ok(true);
        };
        let marker = compose::marker_of(&row.message_id).to_owned();
        let result = match self.settings.smtp.sent_copy {
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
                if self.note_server_id(&mut row, &found) {
                    // The rewritten id is indexed with the activity, so a
                    // reply to it correlates too.
                    let activity = self.store.activity(row.activity_id)?.map(|mut a| {
                        for id in &row.server_message_ids {
                            if !a.message_ids.iter().any(|m| m.eq_ignore_ascii_case(id)) {
                                a.message_ids.push(id.clone());
                            }
                        }
                        (a, vec!["message_ids".to_string()])
                    });
                    self.store.update_outgoing(&row, activity, now)?;
                } else {
                    self.store.update_outgoing(&row, None, now)?;
                }
            }
            Ok(None) => {
                let waited = now - row.sent_at.unwrap_or(now);
                if waited > self.settings.smtp.retry_for.as_secs() as i64 {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outgoing::queue::{self, tests as q};
    use crate::outgoing::smtp::smtp_stub::{Script, SmtpStub, Stage};
    use crate::store::SledStore;
    use std::collections::HashMap;

    fn sender(store: Arc<dyn Store>, port: u16, unknown: UnknownDelivery) -> Arc<Sender> {
        let endpoint = Endpoint {
            host: "127.0.0.1".into(),
            port,
            tls: crate::net::TlsMode::Plain,
            tls_server_name: None,
            ca_file: None,
            connect_timeout: Duration::from_secs(5),
            io_timeout: Duration::from_secs(5),
        };
        let settings = SenderSettings {
            mailbox: "support".into(),
            profile: "mail".into(),
            address: "support@example.test".into(),
            smtp: SmtpSettings {
                host: "127.0.0.1".into(),
                port,
                tls: crate::net::TlsMode::Plain,
                sent_folder: None,
                sent_copy: SentCopyMode::None,
                unknown_delivery: unknown,
                retry_for: Duration::from_secs(3600),
                pool_size: 2,
            },
            endpoint,
            allow_insecure: true,
            imap_endpoint: None,
            credentials: Credentials::Password {
                user: "u".into(),
                pass: "p".into(),
            },
            token_provider: None,
            rate_per_minute: 1000,
            backoff: Backoff {
                base: Duration::from_secs(30),
                max: Duration::from_secs(60),
                jitter: 0.0,
            },
            policy: OutgoingSettings::default(),
            test_message: false,
        };
        let alerts = Arc::new(Alerts::new(store.clone(), HashMap::new()));
        Arc::new(
            Sender::new(
                settings,
                store,
                alerts,
                Arc::new(tokio::sync::Notify::new()),
                CancellationToken::new(),
            )
            .unwrap(),
        )
    }

    /// A queued email, then left in `sending` as a crash mid-transaction does.
    fn interrupted(store: &dyn Store, cfg: &Config) -> u64 {
        let id = queue::queue(store, cfg, &q::request(), model::now())
            .unwrap()
            .id;
        let mut row = store.outgoing(id).unwrap().unwrap();
        row.status = SendStatus::Sending;
        row.attempts = 1;
        store.update_outgoing(&row, None, model::now()).unwrap();
        id
    }

    #[tokio::test]
    async fn interrupted_send_without_proof_is_delivery_unknown_never_resent() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(&dir.path().join("s")).unwrap());
        let cfg = q::config(dir.path());
        let id = interrupted(store.as_ref(), &cfg);
        let stub = SmtpStub::start(Script::default()).await;
        sender(store.clone(), stub.port, UnknownDelivery::Fail)
            .scan()
            .await;
        let row = store.outgoing(id).unwrap().unwrap();
        assert_eq!(row.status, SendStatus::Failed);
        let reason = row.last_error.unwrap();
        assert!(reason.starts_with("delivery unknown"), "{reason}");
        assert!(
            reason.contains(&format!("/api/v1/outgoing/{id}/retry")),
            "{reason}"
        );
        assert!(stub.messages().is_empty(), "never a silent second send");
        let a = store.activity(id).unwrap().unwrap();
        assert_eq!(a.send.unwrap().status, SendStatus::Failed);
    }

    #[tokio::test]
    async fn interrupted_send_is_sent_again_when_resend_is_configured() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(&dir.path().join("s")).unwrap());
        let cfg = q::config(dir.path());
        let id = interrupted(store.as_ref(), &cfg);
        let stub = SmtpStub::start(Script::default()).await;
        sender(store.clone(), stub.port, UnknownDelivery::Resend)
            .scan()
            .await;
        let row = store.outgoing(id).unwrap().unwrap();
        assert_eq!((row.status, row.attempts), (SendStatus::Sent, 2));
        assert_eq!(stub.messages().len(), 1);
        let sent = String::from_utf8_lossy(&stub.messages()[0]).to_string();
        assert!(
            sent.contains(&row.message_id),
            "the same bytes, the same Message-ID"
        );
    }

    #[tokio::test]
    async fn deferred_email_waits_its_back_off_and_a_5xx_fails_it_once() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(&dir.path().join("s")).unwrap());
        let cfg = q::config(dir.path());
        let id = queue::queue(store.as_ref(), &cfg, &q::request(), model::now())
            .unwrap()
            .id;
        let busy = SmtpStub::start(Script::reply(Stage::Data, 451, "4.3.0 try later")).await;
        let s = sender(store.clone(), busy.port, UnknownDelivery::Fail);
        s.clone().scan().await;
        let row = store.outgoing(id).unwrap().unwrap();
        assert_eq!((row.status, row.attempts), (SendStatus::PendingSend, 1));
        assert!(
            row.last_error.as_deref().unwrap().contains("451"),
            "{row:?}"
        );
        assert!(row.next_attempt_at >= model::now() + 25, "back-off of 30 s");
        // Not due: a second scan leaves it alone.
        s.clone().scan().await;
        assert_eq!(store.outgoing(id).unwrap().unwrap().attempts, 1);
        let mut due = store.outgoing(id).unwrap().unwrap();
        due.next_attempt_at = 0;
        store.update_outgoing(&due, None, model::now()).unwrap();
        let reject = SmtpStub::start(Script::reply(Stage::Rcpt, 550, "5.1.1 no such user")).await;
        sender(store.clone(), reject.port, UnknownDelivery::Fail)
            .scan()
            .await;
        let row = store.outgoing(id).unwrap().unwrap();
        assert_eq!((row.status, row.attempts), (SendStatus::Failed, 2));
        let a = store.activity(id).unwrap().unwrap();
        let send = a.send.unwrap();
        assert!(send.reason.unwrap().contains("5.1.1 no such user"));
        assert_eq!((send.dynamics_statuscode, send.attempts), (8, 2));
        let alerts = store.alerts(10).unwrap();
        assert!(
            alerts.iter().any(|a| a.text.contains("no such user")),
            "{alerts:?}"
        );
    }

    #[test]
    fn rate_limit_allows_the_configured_starts_per_sliding_minute() {
        let mut r = RateLimit::new(3);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(r.take(t0), Duration::ZERO);
        }
        let wait = r.take(t0 + Duration::from_secs(10));
        assert_eq!(wait, Duration::from_secs(50));
        assert_eq!(r.take(t0 + Duration::from_secs(60)), Duration::ZERO);
    }
}
