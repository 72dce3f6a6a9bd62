//! Test & Enable on demand: for one mailbox, or every mailbox of a profile,
//! as a job ([`crate::jobs`]).
//!
//! Per mailbox, one direction after the other:
//! * **incoming** on a freshly built connector (so a password file changed
//!   since start is read): connect, TLS, authenticate, open the inbox (IMAP),
//!   STAT/UIDL (POP3), the inbox (Graph), the directory (Maildir);
//! * **outgoing** where the mailbox sends (`outgoing = "server_side_sync"`):
//!   authenticate and send a test message to the mailbox itself, through a
//!   sender built like the daemon's;
//! * **ACT** where configured (this version syncs email only, so it stays
//!   `not_run`).
//!
//! Each result is stored on the mailbox state with its time and concrete
//! cause. When every direction that ran passed, the mailbox is enabled: a
//! mailbox a permanent error disabled is woken to run again, a running one
//! keeps running, and without a daemon (the CLI) the stored state says
//! enabled. A failure raises an Error alert saying what failed and what to
//! do (the next passing test of that direction resolves it) and enables
//! nothing; a mailbox that is running is left running (its own next login
//! meets the cause, and disables it if it is permanent), and without a
//! daemon the stored state says not enabled, with the cause.
//!
//! Every connection is made under a permit of the profile's connection
//! semaphore, the one its mailbox tasks use, and closed before the permit
//! is given back: a test never takes the profile past
//! `max_concurrent_connections`. It queues for the permit in the profile's
//! [`ConnectionQueue`], as the mailbox tasks do, so one that holds a permit
//! only to idle (IMAP IDLE) gives it up at once instead of at the end of
//! its wait. A profile job runs that many mailboxes at once and waits for
//! permits like everyone else.

pub mod cli;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::alerts::{kind, Alerts};
use crate::config::{Config, Mailbox, Profile};
use crate::connector::ConnectorError;
use crate::daemon::{Builders, ProbeError};
use crate::deployment::{Claiming, Deployment};
use crate::error::{Classify, Disposition};
use crate::jobs::{Job, JobHandle, JobKind, Jobs, MailboxTestOutcome};
use crate::model::{
    self, AlertLevel, ApprovalStatus, Delivery, IncomingDelivery, TestDirection, TestResult,
    TestStatus,
};
use crate::net::NetError;
use crate::scheduler::{ConnectionQueue, EnableError, Phase, Runtime};
use crate::store::Store;

/// Start of the Error alert of a failed incoming test (kind
/// [`kind::INCOMING_TEST`], resolved by the next passing one or the
/// mailbox's next successful sync).
pub const INCOMING_ALERT: &str = "Test & Enable: incoming failed";
/// Start of the Error alert of a failed outgoing test (kind
/// [`kind::OUTGOING_TEST`], shared with the sender's start-up test).
pub const OUTGOING_ALERT: &str = "Test & Enable: outgoing failed";
/// Start of the Error alert of a mailbox whose tests passed but that could
/// not be enabled (kind [`kind::NOT_ENABLED`]).
pub const ENABLE_ALERT: &str = "Test & Enable: not enabled";

/// Why a test could not be started.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartError {
    #[error("no mailbox {0:?}")]
    UnknownMailbox(String),
    #[error("no profile {0:?}")]
    UnknownProfile(String),
}

/// A connection queue of the runner's own (no daemon).
fn own_queue(_profile: &str, limit: usize) -> Arc<ConnectionQueue> {
    Arc::new(ConnectionQueue::new(limit))
}

/// Where enabling a mailbox goes.
enum Enabler {
    /// The daemon's mailbox tasks: a disabled one is woken.
    Runtime(Arc<Runtime>),
    /// No daemon (the CLI): the stored state is set enabled, which the
    /// daemon's next start honours.
    Store,
}

/// Runs Test & Enable jobs.
pub struct TestEnable {
    /// What a reload replaces ([`TestEnable::reconfigure`]); a test uses
    /// the settings in force when it started.
    settings: RwLock<Arc<Settings>>,
    store: Arc<dyn Store>,
    /// Whose marker a passing test leaves in the mailbox.
    deployment: Arc<Deployment>,
    alerts: Arc<Alerts>,
    enabler: Enabler,
    /// The daemon's job registry (kept across full reloads).
    jobs: Arc<Jobs>,
    cancel: CancellationToken,
}

/// The configuration a test runs on.
struct Settings {
    config: Arc<Config>,
    /// Each profile's connections (shared with its mailbox tasks).
    limits: HashMap<String, Limit>,
    builders: Builders,
}

/// A profile's connection semaphore and the queue its mailbox tasks wait
/// in for it: a test waits there too, so idle holders make room for it.
struct Limit {
    connections: Arc<Semaphore>,
    queue: Arc<ConnectionQueue>,
}

/// Each profile's [`Limit`]: its semaphore from `semaphores` (a profile
/// without one is not limited) and its queue from `queue_of`.
fn limits(
    config: &Config,
    semaphores: &HashMap<String, Arc<Semaphore>>,
    queue_of: impl Fn(&str, usize) -> Arc<ConnectionQueue>,
) -> HashMap<String, Limit> {
    config
        .profiles
        .iter()
        .filter_map(|p| {
            let connections = semaphores.get(&p.name)?.clone();
            let queue = queue_of(&p.name, usize::from(p.max_concurrent_connections));
            Some((p.name.clone(), Limit { connections, queue }))
        })
        .collect()
}

impl TestEnable {
    /// The daemon's runner: its mailbox tasks' semaphores, connection
    /// queues and runtime view, and the daemon's job registry, so jobs
    /// outlive a full reload.
    #[allow(clippy::too_many_arguments)]
    pub fn for_daemon(
        config: Arc<Config>,
        store: Arc<dyn Store>,
        deployment: Arc<Deployment>,
        alerts: Arc<Alerts>,
        semaphores: HashMap<String, Arc<Semaphore>>,
        builders: Builders,
        runtime: Arc<Runtime>,
        jobs: Arc<Jobs>,
        cancel: CancellationToken,
    ) -> Self {
        let limits = limits(&config, &semaphores, |p, n| runtime.connection_queue(p, n));
        TestEnable {
            settings: RwLock::new(Arc::new(Settings {
                config,
                limits,
                builders,
            })),
            store,
            deployment,
            alerts,
            enabler: Enabler::Runtime(runtime),
            jobs,
            cancel,
        }
    }

    /// A runner without a daemon (the CLI, with the store to itself): its
    /// own semaphores, each of the profile's size, and queues (nothing
    /// else waits in them: first come, first served).
    pub fn standalone(
        config: Arc<Config>,
        store: Arc<dyn Store>,
        deployment: Arc<Deployment>,
    ) -> Self {
        let semaphores = config
            .profiles
            .iter()
            .map(|p| {
                let n = usize::from(p.max_concurrent_connections);
                (p.name.clone(), Arc::new(Semaphore::new(n)))
            })
            .collect();
        let limits = limits(&config, &semaphores, own_queue);
        TestEnable {
            alerts: Arc::new(Alerts::new(store.clone(), config.profile_members())),
            settings: RwLock::new(Arc::new(Settings {
                builders: Builders::new(&config, store.clone()),
                config,
                limits,
            })),
            store,
            deployment,
            enabler: Enabler::Store,
            jobs: Arc::new(Jobs::default()),
            cancel: CancellationToken::new(),
        }
    }

    /// Runs the tests started from now on with a reloaded configuration,
    /// its profiles' semaphores (and the daemon's connection queues for
    /// them) and connector builders; jobs started before finish on the old
    /// ones and stay queryable. Called after the daemon forgot the queues
    /// of changed profiles and before their tasks start: the queue made
    /// here is the one they get.
    pub fn reconfigure(
        &self,
        config: Arc<Config>,
        semaphores: HashMap<String, Arc<Semaphore>>,
        builders: Builders,
    ) {
        let limits = match &self.enabler {
            Enabler::Runtime(rt) => limits(&config, &semaphores, |p, n| rt.connection_queue(p, n)),
            Enabler::Store => limits(&config, &semaphores, own_queue),
        };
        *self.settings.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(Settings {
            config,
            limits,
            builders,
        });
    }

    fn settings(&self) -> Arc<Settings> {
        self.settings
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The job with this id, as it is now.
    pub fn job(&self, id: &str) -> Option<Job> {
        self.jobs.get(id)
    }

    /// Starts Test & Enable of one mailbox; returns the job as started.
    /// With `force` a mailbox another deployment syncs is taken over.
    pub fn start_mailbox(
        self: &Arc<Self>,
        name: &str,
        force: bool,
    ) -> Result<Arc<JobHandle>, StartError> {
        let mailbox = self.mailbox(name)?;
        let job = self.jobs.start(JobKind::MailboxTest, name, 1);
        self.spawn(job.clone(), vec![mailbox], 1, force);
        Ok(job)
    }

    /// Runs Test & Enable of one mailbox here and now (the CLI); returns
    /// the finished job.
    pub async fn test_now(&self, name: &str, force: bool) -> Result<Job, StartError> {
        let mailbox = self.mailbox(name)?;
        let job = self.jobs.start(JobKind::MailboxTest, name, 1);
        self.run(&job, vec![mailbox], 1, force).await;
        job.finish();
        Ok(job.snapshot())
    }

    /// Runs Test & Enable of every mailbox of a profile here and now (the
    /// CLI), as many at once as its connection limit allows.
    pub async fn test_profile_now(&self, name: &str, force: bool) -> Result<Job, StartError> {
        let (mailboxes, workers) = self.profile_members(name)?;
        let job = self.jobs.start(JobKind::ProfileTest, name, mailboxes.len());
        self.run(&job, mailboxes, workers, force).await;
        job.finish();
        Ok(job.snapshot())
    }

    /// A profile's mailboxes and how many may be tested at once.
    fn profile_members(&self, name: &str) -> Result<(Vec<Mailbox>, usize), StartError> {
        let settings = self.settings();
        let profile = settings
            .config
            .profiles
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| StartError::UnknownProfile(name.to_string()))?;
        let mailboxes = settings
            .config
            .mailboxes
            .iter()
            .filter(|m| m.profile == name)
            .cloned()
            .collect();
        Ok((
            mailboxes,
            usize::from(profile.max_concurrent_connections).max(1),
        ))
    }

    fn mailbox(&self, name: &str) -> Result<Mailbox, StartError> {
        self.settings()
            .config
            .mailboxes
            .iter()
            .find(|m| m.name == name)
            .cloned()
            .ok_or_else(|| StartError::UnknownMailbox(name.to_string()))
    }

    /// Starts Test & Enable of every mailbox of a profile, as many at once
    /// as the profile's connection limit allows.
    pub fn start_profile(
        self: &Arc<Self>,
        name: &str,
        force: bool,
    ) -> Result<Arc<JobHandle>, StartError> {
        let (mailboxes, workers) = self.profile_members(name)?;
        let job = self.jobs.start(JobKind::ProfileTest, name, mailboxes.len());
        self.spawn(job.clone(), mailboxes, workers, force);
        Ok(job)
    }

    fn spawn(
        self: &Arc<Self>,
        job: Arc<JobHandle>,
        mailboxes: Vec<Mailbox>,
        workers: usize,
        force: bool,
    ) {
        let me = self.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = me.run(&job, mailboxes, workers, force) => {}
                // The summary counts what was not tested.
                _ = me.cancel.cancelled() => {}
            }
            job.finish();
            if let Some(summary) = job.snapshot().summary {
                tracing::info!(job = %job.id(), "Test & Enable done: {summary}");
            }
        });
    }

    /// Tests `mailboxes` with `workers` at a time and records each outcome.
    pub async fn run(&self, job: &JobHandle, mailboxes: Vec<Mailbox>, workers: usize, force: bool) {
        let queue = std::sync::Mutex::new(mailboxes.into_iter());
        let next = || queue.lock().unwrap_or_else(|p| p.into_inner()).next();
        let worker = || async {
            while let Some(mailbox) = next() {
                let outcome = self.test_mailbox(&mailbox, job, force).await;
                job.record(outcome);
            }
        };
        futures::future::join_all((0..workers.max(1)).map(|_| worker())).await;
    }

    /// Test & Enable of one mailbox: every direction, stored, alerted, and
    /// the mailbox enabled when all passed. The incoming test also claims
    /// the mailbox for this deployment ([`crate::deployment`]); `force`
    /// takes it over from another one.
    pub async fn test_mailbox(
        &self,
        mailbox: &Mailbox,
        job: &JobHandle,
        force: bool,
    ) -> MailboxTestOutcome {
        let name = &mailbox.name;
        let settings = self.settings();
        let Some(profile) = settings.config.profile_of(mailbox) else {
            return MailboxTestOutcome {
                mailbox: name.clone(),
                incoming: TestResult::default(),
                outgoing: TestResult::default(),
                act: TestResult::default(),
                enabled: false,
                error: Some(format!("mailbox {name:?} has no profile")),
            };
        };
        let mut problems: Vec<String> = Vec::new();

        let incoming = if mailbox.incoming == IncomingDelivery::None {
            not_run("incoming = \"none\": this mailbox reads no mail")
        } else {
            let tested = {
                let _permit = self.permit(&settings, profile, job).await;
                let claim = Claiming {
                    mailbox: name,
                    deployment: &self.deployment,
                    force,
                    enabled: profile.deployment_marker,
                };
                settings
                    .builders
                    .incoming_test(profile, mailbox, claim)
                    .await
            };
            match tested {
                Ok(detail) => {
                    tracing::info!(mailbox = %name, "Test & Enable: incoming: {detail}");
                    self.alerts.resolve(name, kind::INCOMING_TEST, model::now());
                    passed(detail)
                }
                Err(e) => {
                    let text = format!(
                        "{INCOMING_ALERT}: {e}: {}",
                        incoming_advice(profile, mailbox, &e)
                    );
                    self.alert(kind::INCOMING_TEST, profile, name, &text);
                    // A mailbox that keeps running (the test failed on a
                    // blip) shows the cause cleared by syncing again.
                    self.alerts
                        .resolve_at_next_success(name, kind::INCOMING_TEST);
                    problems.push(text);
                    match &e {
                        ProbeError::Connector(c) => TestResult::failure(model::now(), c),
                        ProbeError::Build(_) => failed(e.to_string()),
                    }
                }
            }
        };
        self.save(name, TestDirection::Incoming, &incoming);

        let outgoing = if mailbox.outgoing != Delivery::ServerSideSync {
            not_run("outgoing = \"none\": this mailbox sends no email")
        } else {
            match self.outgoing_test(profile, mailbox, job).await {
                Ok(detail) => {
                    tracing::info!(mailbox = %name, "Test & Enable: outgoing: {detail}");
                    // Also the sender's own start-up test alert: the same kind.
                    self.alerts.resolve(name, kind::OUTGOING_TEST, model::now());
                    passed(detail)
                }
                Err((detail, advice)) => {
                    let text = format!("{OUTGOING_ALERT}: {detail}: {advice}");
                    self.alert(kind::OUTGOING_TEST, profile, name, &text);
                    problems.push(text);
                    failed(detail)
                }
            }
        };
        self.save(name, TestDirection::Outgoing, &outgoing);

        // The configuration accepts only act = "none" in this version.
        let act = not_run("act = \"none\": appointments, contacts and tasks are not synchronized");
        self.save(name, TestDirection::Act, &act);

        let all_passed = problems.is_empty();
        let (enabled, why_not) = if all_passed {
            self.enable(mailbox)
        } else {
            (self.after_failure(mailbox, &problems), None)
        };
        if let Some(why) = &why_not {
            let text = format!("{ENABLE_ALERT}: {why}");
            self.alert(kind::NOT_ENABLED, profile, name, &text);
            problems.push(text);
        } else if all_passed {
            self.alerts.resolve(name, kind::NOT_ENABLED, model::now());
        }
        MailboxTestOutcome {
            mailbox: name.clone(),
            incoming,
            outgoing,
            act,
            enabled,
            error: (!problems.is_empty()).then(|| problems.join("; ")),
        }
    }

    /// A connection permit of the profile, counted as the job's: queued
    /// for in the profile's connection queue, so a mailbox task idling on
    /// a permit gives it up for the test.
    async fn permit<'a>(
        &self,
        settings: &Settings,
        profile: &Profile,
        job: &'a JobHandle,
    ) -> (
        crate::jobs::Held<'a>,
        Option<tokio::sync::OwnedSemaphorePermit>,
    ) {
        let permit = match settings.limits.get(&profile.name) {
            Some(l) => l.queue.acquire(&l.connections).await,
            None => None,
        };
        // Dropped first (tuple order): the job's count goes down before the
        // permit is free again, so it never shows more than the limit.
        (job.connections.hold(), permit)
    }

    /// The outgoing test: `Err((cause, what to do))`.
    async fn outgoing_test(
        &self,
        profile: &Profile,
        mailbox: &Mailbox,
        job: &JobHandle,
    ) -> Result<String, (String, String)> {
        let settings = self.settings();
        let approval = crate::outgoing::queue::effective_approval(self.store.as_ref(), mailbox)
            .map_err(|e| {
                (
                    format!("cannot read the mailbox's settings: {e}"),
                    "check the store, then test again".to_string(),
                )
            })?;
        if let Err(why) = crate::outgoing::queue::send_allowed(&settings.config, mailbox, approval)
        {
            return Err((why, "fix that and test again".into()));
        }
        let sender = settings
            .builders
            .sender(&settings.config, profile, mailbox, self.alerts.clone())
            .map_err(|e| {
                (
                    e,
                    "fix the configuration (or the file it names) and test again".to_string(),
                )
            })?;
        let _permit = self.permit(&settings, profile, job).await;
        let result = sender.probe(None).await;
        sender.close().await;
        drop(sender);
        result.map_err(|e| {
            let advice = outgoing_advice(profile, mailbox, &e);
            (e.to_string(), advice)
        })
    }

    fn alert(&self, kind: &str, profile: &Profile, mailbox: &str, text: &str) {
        self.alerts.raise(
            kind,
            AlertLevel::Error,
            Some(mailbox),
            Some(&profile.name),
            text,
            model::now(),
        );
    }

    fn save(&self, mailbox: &str, direction: TestDirection, result: &TestResult) {
        if let Err(e) = self.store.set_test_result(mailbox, direction, result) {
            tracing::error!(mailbox, error = %e, "cannot record the Test & Enable result");
        }
    }

    /// Whether the mailbox is enabled after a failed test. The daemon's
    /// tasks are left as they are (a running mailbox keeps running: its own
    /// next login tells whether the cause reaches it, and disables it for a
    /// permanent one), so this is whether it runs. Without a daemon the
    /// stored state records it as not enabled, with the cause, until a
    /// test passes (the daemon's start runs its own test anyway).
    fn after_failure(&self, mailbox: &Mailbox, problems: &[String]) -> bool {
        if !mailbox.enabled {
            return false;
        }
        match &self.enabler {
            Enabler::Runtime(rt) => rt
                .snapshot()
                .iter()
                .find(|m| m.name == mailbox.name)
                .is_some_and(|m| {
                    m.state.enabled
                        && !matches!(
                            m.phase,
                            Phase::Disabled | Phase::NotApproved | Phase::Stopped
                        )
                }),
            Enabler::Store => {
                let mut state = match self.store.mailbox_state(&mailbox.name) {
                    Ok(s) => s.unwrap_or_else(|| model::MailboxState {
                        name: mailbox.name.clone(),
                        ..Default::default()
                    }),
                    Err(e) => {
                        tracing::error!(mailbox = %mailbox.name, error = %e, "cannot read the mailbox state");
                        return false;
                    }
                };
                state.enabled = false;
                state.disabled_reason = Some(problems.join("; "));
                if let Err(e) = self.store.put_mailbox_state(&state) {
                    tracing::error!(mailbox = %mailbox.name, error = %e, "cannot record the mailbox as not enabled");
                }
                false
            }
        }
    }

    /// Enables a mailbox whose tests passed: (enabled, why not).
    fn enable(&self, mailbox: &Mailbox) -> (bool, Option<String>) {
        let name = &mailbox.name;
        if !mailbox.enabled {
            return (
                false,
                Some(format!(
                    "mailbox {name:?} is disabled in the configuration (enabled = false): set enabled = true and restart"
                )),
            );
        }
        // What operators set at run time wins over the configuration.
        let mut control = match self.store.mailbox_control(name) {
            Ok(c) => c,
            Err(e) => {
                return (
                    false,
                    Some(format!("cannot read the mailbox's settings: {e}")),
                )
            }
        };
        let approval = control.approval.unwrap_or(mailbox.approval);
        if self.settings().config.process_only_approved && approval != ApprovalStatus::Approved {
            return (
                false,
                Some(format!(
                    "the email address {} of mailbox {name:?} is not approved, and only approved mailboxes process email (process_only_approved): approve the address (POST /api/v1/mailboxes/{name}/approve), then test again",
                    mailbox.email
                )),
            );
        }
        if control.disabled_at.take().is_some() {
            // Disabled by an operator: a passing Test & Enable enables it,
            // as in Dynamics.
            if let Err(e) = self.store.put_mailbox_control(name, &control) {
                return (
                    false,
                    Some(format!("cannot record the mailbox as enabled: {e}")),
                );
            }
            if let Enabler::Runtime(rt) = &self.enabler {
                rt.control_changed(name);
                tracing::info!(mailbox = %name, "Test & Enable passed: the mailbox an operator disabled runs again");
                return (true, None);
            }
        }
        if mailbox.incoming == IncomingDelivery::None {
            // Nothing to wake: the sender runs by itself.
            return (true, None);
        }
        match &self.enabler {
            Enabler::Runtime(rt) => match rt.request_enable(name) {
                Ok(()) => {
                    tracing::info!(mailbox = %name, "Test & Enable passed: the disabled mailbox runs again");
                    (true, None)
                }
                // Running (or backing off) already: it keeps running.
                Err(EnableError::NotDisabled { phase, .. })
                    if !matches!(phase, Phase::Stopped | Phase::NotApproved) =>
                {
                    (true, None)
                }
                Err(e) => (false, Some(e.to_string())),
            },
            Enabler::Store => match self.store.mailbox_state(name) {
                Ok(state) => {
                    let mut state = state.unwrap_or_else(|| model::MailboxState {
                        name: name.clone(),
                        ..Default::default()
                    });
                    state.enabled = true;
                    state.disabled_reason = None;
                    match self.store.put_mailbox_state(&state) {
                        Ok(()) => (true, None),
                        Err(e) => (
                            false,
                            Some(format!("cannot record the mailbox as enabled: {e}")),
                        ),
                    }
                }
                Err(e) => (false, Some(format!("cannot read the mailbox state: {e}"))),
            },
        }
    }
}

fn passed(detail: String) -> TestResult {
    TestResult::passed(model::now(), detail)
}

fn failed(detail: String) -> TestResult {
    TestResult::failed(model::now(), detail)
}

fn not_run(why: &str) -> TestResult {
    TestResult {
        status: TestStatus::NotRun,
        completed_on: None,
        detail: Some(why.to_string()),
        held_by: None,
    }
}

/// Where the mailbox's login secret comes from, for "check …".
fn secret_source(profile: &Profile, mailbox: &Mailbox) -> String {
    let user = mailbox
        .username
        .as_deref()
        .or(profile.username.as_deref())
        .unwrap_or("?");
    let what = if let Some(f) = &mailbox.token_file {
        format!(
            "the access token in {} (token_file of mailbox {:?})",
            f.display(),
            mailbox.name
        )
    } else if let Some(f) = &mailbox.password_file {
        format!(
            "the password in {} (password_file of mailbox {:?})",
            f.display(),
            mailbox.name
        )
    } else if mailbox.secret.is_some() {
        format!(
            "the password of mailbox {:?} in the configuration (password or password_env)",
            mailbox.name
        )
    } else if let Some(f) = &profile.token_file {
        format!(
            "the access token in {} (token_file of profile {:?})",
            f.display(),
            profile.name
        )
    } else if let Some(f) = &profile.password_file {
        format!(
            "the password in {} (password_file of profile {:?})",
            f.display(),
            profile.name
        )
    } else {
        format!(
            "the password of profile {:?} in the configuration",
            profile.name
        )
    };
    format!("check {what} and the username {user:?}")
}

/// The network error underneath a connector error, if any.
fn net_error(e: &ConnectorError) -> Option<&NetError> {
    match e {
        ConnectorError::Net(n)
        | ConnectorError::Imap(crate::connector::imap::ImapError::Net(n))
        | ConnectorError::Pop3(crate::connector::pop3::Pop3Error::Net(n)) => Some(n),
        _ => None,
    }
}

/// What to do about a failed incoming test.
fn incoming_advice(profile: &Profile, mailbox: &Mailbox, e: &ProbeError) -> String {
    let again = format!(
        "then test again (POST /api/v1/mailboxes/{}/test or crm-mailsync test-enable)",
        mailbox.name
    );
    let server = format!(
        "{}:{}",
        profile.host.as_deref().unwrap_or("?"),
        profile
            .port
            .map(|p| p.to_string())
            .unwrap_or_else(|| "?".into())
    );
    let e = match e {
        ProbeError::Build(_) => {
            return format!("fix the configuration (or the file it names), {again}")
        }
        ProbeError::Connector(c) => c,
    };
    if let ConnectorError::OtherDeployment(_) = e {
        // The refusal itself says what to do (stop the other, or force).
        return format!(
            "not enabled here; decide which deployment synchronizes mailbox {:?}",
            mailbox.name
        );
    }
    let what = if e.is_auth_failure() {
        secret_source(profile, mailbox)
    } else if let Some(n) = net_error(e) {
        match n {
            NetError::Connect { .. } | NetError::ConnectTimeout { .. } => format!(
                "check that the server at {server} is running and reachable from here (profile {:?}: host, port)",
                profile.name
            ),
            NetError::Certificate { .. } | NetError::ServerName(_) => format!(
                "check the server's certificate, or the profile {:?}'s ca_file and tls_server_name",
                profile.name
            ),
            NetError::Handshake { .. } => format!(
                "check that tls = {:?} of profile {:?} is what {server} speaks (implicit TLS or STARTTLS)",
                format!("{:?}", profile.tls).to_ascii_lowercase(),
                profile.name
            ),
            NetError::CaFile { .. } | NetError::TlsSetup(_) => {
                format!("fix the TLS settings of profile {:?}", profile.name)
            }
        }
    } else if let ConnectorError::Token(_) = e {
        secret_source(profile, mailbox)
    } else if e.disposition() == Disposition::Transient {
        format!("the server at {server} had a passing problem; if it persists, check the server")
    } else {
        "the server's answer above says what it refused; fix that".to_string()
    };
    format!("{what}, {again}")
}

/// What to do about a failed outgoing test.
fn outgoing_advice(
    profile: &Profile,
    mailbox: &Mailbox,
    e: &crate::outgoing::transport::SendError,
) -> String {
    use crate::outgoing::smtp::SmtpError;
    use crate::outgoing::transport::SendError;
    let again = format!(
        "then test again (POST /api/v1/mailboxes/{}/test or crm-mailsync test-enable)",
        mailbox.name
    );
    let server = profile
        .smtp
        .as_ref()
        .map(|s| format!("{}:{}", s.host, s.port))
        .unwrap_or_else(|| "the SMTP server".into());
    let what = match e {
        SendError::Smtp(SmtpError::Auth(_) | SmtpError::AuthRetry(_)) => {
            secret_source(profile, mailbox)
        }
        SendError::Smtp(SmtpError::Network(_) | SmtpError::Timeout(_)) => format!(
            "check that the SMTP server at {server} is running and reachable from here (profile {:?}: smtp_host, smtp_port)",
            profile.name
        ),
        SendError::Smtp(SmtpError::Tls(_)) => format!(
            "check the SMTP server's certificate and smtp_tls of profile {:?}",
            profile.name
        ),
        SendError::Smtp(SmtpError::Rejected { .. } | SmtpError::Deferred { .. }) => format!(
            "the SMTP server refused a message from {} to itself: check that the mailbox may send as that address",
            mailbox.email
        ),
        SendError::Smtp(SmtpError::Config(_)) | SendError::Compose(_) => {
            format!("fix the outgoing settings of profile {:?}", profile.name)
        }
        SendError::Graph(_) | SendError::GraphSend(_) => {
            "check the Entra app's credentials and its Mail.Send permission".to_string()
        }
    };
    format!("{what}, {again}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &std::path::Path, extra: &str) -> Config {
        let pw = dir.join("pw");
        std::fs::write(&pw, "secret\n").unwrap();
        let text = format!(
            r#"
[daemon]
state_dir = "{state}"
[admin]
enabled = false
[[profiles]]
name = "p"
type = "imap_smtp"
host = "127.0.0.1"
port = 1
tls = "plain"
allow_insecure = true
[[mailboxes]]
name = "m"
profile = "p"
email = "m@example.test"
approval = "approved"
username = "m"
password_file = "{pw}"
{extra}
"#,
            state = dir.join("state").display(),
            pw = pw.display(),
        );
        let path = dir.join("c.toml");
        std::fs::write(&path, text).unwrap();
        crate::config::load(&path).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn an_authentication_failure_says_which_password_to_check() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), "");
        let e = ProbeError::Connector(ConnectorError::Imap(
            crate::connector::imap::ImapError::AuthFailed {
                mechanism: "LOGIN",
                code: Some("AUTHENTICATIONFAILED".into()),
                text: "Authentication failed.".into(),
            },
        ));
        let advice = incoming_advice(&cfg.profiles[0], &cfg.mailboxes[0], &e);
        assert!(advice.starts_with("check the password in "), "{advice}");
        assert!(
            advice.contains("password_file of mailbox \"m\""),
            "{advice}"
        );
        assert!(advice.contains("username \"m\""), "{advice}");
        assert!(advice.contains("POST /api/v1/mailboxes/m/test"), "{advice}");
    }

    #[test]
    fn a_refused_connection_says_which_server_to_check() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), "");
        let e = ProbeError::Connector(ConnectorError::Net(NetError::Connect {
            addr: "127.0.0.1:1".into(),
            source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        }));
        let advice = incoming_advice(&cfg.profiles[0], &cfg.mailboxes[0], &e);
        assert!(
            advice.starts_with("check that the server at 127.0.0.1:1 is running"),
            "{advice}"
        );
    }

    #[tokio::test]
    async fn a_refused_incoming_test_fails_alerts_and_leaves_the_mailbox_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Arc::new(config(dir.path(), ""));
        let store: Arc<dyn Store> =
            Arc::new(crate::store::SledStore::open(&dir.path().join("store")).unwrap());
        let off = model::MailboxState {
            name: "m".into(),
            enabled: false,
            disabled_reason: Some("earlier".into()),
            ..Default::default()
        };
        store.put_mailbox_state(&off).unwrap();
        let te = Arc::new(TestEnable::standalone(
            cfg,
            store.clone(),
            Deployment::for_tests(),
        ));
        let job = te.start_mailbox("m", false).unwrap();
        while !job.is_done() {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let got = te.job(&job.id()).unwrap();
        assert_eq!((got.total, got.completed, got.failed), (1, 1, 1));
        let r = &got.results[0];
        assert_eq!(r.incoming.status, TestStatus::Failure);
        assert!(!r.enabled);
        assert_eq!(r.outgoing.status, TestStatus::NotRun);
        assert_eq!(got.peak_connections, 1);
        let state = store.mailbox_state("m").unwrap().unwrap();
        assert_eq!(state.incoming_test, r.incoming);
        assert!(!state.enabled);
        let alerts = store.alerts(10).unwrap();
        assert!(
            alerts
                .iter()
                .any(|a| a.level == AlertLevel::Error && a.text.starts_with(INCOMING_ALERT)),
            "{alerts:?}"
        );
        assert!(matches!(
            te.start_mailbox("nope", false).map(|_| ()),
            Err(StartError::UnknownMailbox(_))
        ));
        assert!(matches!(
            te.start_profile("nope", false).map(|_| ()),
            Err(StartError::UnknownProfile(_))
        ));
    }
}
