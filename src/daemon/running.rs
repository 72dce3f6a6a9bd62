//! One start of the daemon's tasks on one configuration ([`Generation`]):
//! the admin API, the CRM link, one task (and sender) per mailbox, the
//! watchdog and the alert monitor; and the surgical reload of it, which
//! stops, starts or restarts single mailboxes and leaves the rest running.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::graph::{self, GraphApps, GraphMailboxes};
use super::reload::{self, ReloadReport};
use super::{
    build_sender, graph_connector, imap_connector, maildir_connector, pop3_connector, Builders,
    DaemonError,
};
use crate::admin::{self, AdminState};
use crate::alerts::Alerts;
use crate::config::{Config, CrmKind, Mailbox, SharedConfig};
use crate::connector::maildir::MaildirConnector;
use crate::crm::sync::RecordSync;
use crate::crm::webhook::WebhookAdapter;
use crate::crm::worker::OutboxWorker;
use crate::crm::CrmAdapter;
use crate::deployment::Deployment;
use crate::model::ProfileType;
use crate::scheduler::{Backoff, MailboxTask, Runtime, WATCH_EVERY};
use crate::store::Store;
use crate::telemetry;
use crate::testenable::TestEnable;

/// Tasks that stop together: their own cancel token (a child of the
/// daemon's) and tracker, so one part can be drained while the rest runs.
struct Part {
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl Part {
    fn under(parent: &CancellationToken) -> Self {
        Part {
            cancel: parent.child_token(),
            tracker: TaskTracker::new(),
        }
    }

    /// Asks the part's tasks to stop; [`Part::wait`] waits for them.
    fn stop(&self) {
        self.cancel.cancel();
        self.tracker.close();
    }

    async fn wait(&self) {
        self.tracker.wait().await
    }
}

/// Waits for `parts` (already stopped) for at most `grace`; false if some
/// work was still in flight then.
async fn drained<'a>(parts: impl IntoIterator<Item = &'a Part>, grace: Duration) -> bool {
    let all = futures::future::join_all(parts.into_iter().map(Part::wait));
    tokio::time::timeout(grace, all).await.is_ok()
}

/// One start of every task on one configuration; a reload that only
/// touches mailboxes is applied to it in place ([`Generation::apply`]).
pub(super) struct Generation {
    config: Arc<Config>,
    /// What the admin API, the monitor and the watchdog read.
    shared: SharedConfig,
    store: Arc<dyn Store>,
    /// This deployment: the marker its mailboxes hold.
    deployment: Arc<Deployment>,
    runtime: Arc<Runtime>,
    alerts: Arc<Alerts>,
    wakeup: crate::outgoing::SendWakeup,
    test_enable: Arc<TestEnable>,
    /// Each profile's connection semaphore.
    semaphores: HashMap<String, Arc<Semaphore>>,
    graph_mailboxes: GraphMailboxes,
    graph_apps: GraphApps,
    /// The daemon's: cancelling it stops everything.
    cancel: CancellationToken,
    /// The daemon-wide tasks (admin API, CRM link, watchdog, monitor).
    tracker: TaskTracker,
    /// Each mailbox's task and sender.
    mailboxes: HashMap<String, Part>,
    /// The Dataverse Pending Send loop (it reads the mailboxes).
    pending_send: Option<Part>,
}

impl Generation {
    /// Starts everything on `config`.
    pub(super) async fn start(
        config: Arc<Config>,
        store: Arc<dyn Store>,
        deployment: Arc<Deployment>,
        jobs: Arc<crate::jobs::Jobs>,
        prometheus: Option<metrics_exporter_prometheus::PrometheusHandle>,
        reloads: reload::ReloadHandle,
    ) -> Result<Self, DaemonError> {
        let runtime = Arc::new(Runtime::default());
        let alerts = Arc::new(Alerts::new(store.clone(), config.profile_members()));
        // Wakes the senders when the admin API queues an email.
        let wakeup: crate::outgoing::SendWakeup = Arc::new(tokio::sync::Notify::new());
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let shared = SharedConfig::new(config.clone());
        // Before any mailbox commits: every event from now on gets a pending
        // delivery for the configured adapter.
        start_crm_link(&config, &store, &runtime, &tracker, &cancel)?;
        let pending_send = start_pending_send(&config, &store, &alerts, &wakeup, &cancel)?;

        let mut semaphores: HashMap<String, Arc<Semaphore>> = HashMap::new();
        for p in &config.profiles {
            if let Some(n) = p.max_transient_failures {
                tracing::warn!(
                    profile = %p.name,
                    max_transient_failures = n,
                    "max_transient_failures is deprecated and ignored: transient errors are retried forever with back-off up to retry_backoff_max, and stall_alert_after raises an Error alert; remove the key"
                );
            }
            semaphores.insert(
                p.name.clone(),
                Arc::new(Semaphore::new(usize::from(p.max_concurrent_connections))),
            );
        }
        let (graph_mailboxes, graph_apps) = graph::graph_mailboxes(&config);
        // Test & Enable on demand: the mailbox tasks' semaphores and Graph
        // clients, so its connections count against the same limits.
        let test_enable = Arc::new(TestEnable::for_daemon(
            config.clone(),
            store.clone(),
            deployment.clone(),
            alerts.clone(),
            semaphores.clone(),
            Builders::with_graph(store.clone(), graph_mailboxes.clone()),
            runtime.clone(),
            jobs,
            cancel.clone(),
        ));

        // Bound now (a taken port fails the start), served once every
        // mailbox is registered: a configured mailbox is never a 404.
        let mut admin_api = None;
        if config.admin.enabled {
            let listener = tokio::net::TcpListener::bind(config.admin.listen)
                .await
                .map_err(|source| DaemonError::Listen {
                    addr: config.admin.listen.to_string(),
                    source,
                })?;
            let app = admin::router(AdminState {
                config: shared.clone(),
                store: store.clone(),
                runtime: runtime.clone(),
                prometheus,
                shutdown: cancel.clone(),
                send_wakeup: Some(wakeup.clone()),
            })
            .layer(axum::Extension(test_enable.clone()))
            .layer(axum::Extension(deployment.clone()))
            .layer(axum::Extension(reloads));
            admin_api = Some((listener, app));
        }

        let mut generation = Generation {
            config: config.clone(),
            shared: shared.clone(),
            store,
            deployment,
            runtime: runtime.clone(),
            alerts: alerts.clone(),
            wakeup,
            test_enable,
            semaphores,
            graph_mailboxes,
            graph_apps,
            cancel: cancel.clone(),
            tracker,
            mailboxes: HashMap::new(),
            pending_send,
        };
        for mailbox in &config.mailboxes {
            generation.start_mailbox(mailbox, None);
        }
        if let Some((listener, app)) = admin_api {
            let addr = listener
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
            tracing::info!(%addr, "admin API listening");
            let stop = cancel.clone();
            generation.tracker.spawn(async move {
                let served = axum::serve(listener, app)
                    .with_graceful_shutdown(async move { stop.cancelled().await })
                    .await;
                if let Err(e) = served {
                    tracing::error!(error = %e, "admin API stopped");
                }
            });
        }
        runtime.scheduler_running.store(true, Ordering::SeqCst);
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        spawn_watchdog(
            &generation.tracker,
            cancel.clone(),
            runtime.clone(),
            shared.clone(),
        );
        crate::alerts::spawn_monitor(
            &generation.tracker,
            cancel,
            runtime,
            crate::alerts::Monitor::new(shared, alerts),
        );
        tracing::info!(
            mailboxes = config.mailboxes.len(),
            version = env!("CARGO_PKG_VERSION"),
            "crm-mailsync running"
        );
        Ok(generation)
    }

    /// The configuration in force.
    pub(super) fn config(&self) -> &Config {
        &self.config
    }

    pub(super) fn alerts(&self) -> &Alerts {
        &self.alerts
    }

    /// Stops everything: what is in flight commits, within the grace period.
    pub(super) async fn stop(self) {
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        self.runtime
            .scheduler_running
            .store(false, Ordering::SeqCst);
        self.cancel.cancel();
        self.tracker.close();
        let mut parts: Vec<&Part> = self.mailboxes.values().collect();
        parts.extend(self.pending_send.as_ref());
        for p in &parts {
            p.stop();
        }
        let grace = self.config.daemon.shutdown_grace;
        let all = futures::future::join(
            self.tracker.wait(),
            futures::future::join_all(parts.into_iter().map(Part::wait)),
        );
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!(
                ?grace,
                "grace period over; stopping with work in flight (it is re-done on restart)"
            );
        }
    }

    /// Applies a reload that needs no full restart: the removed and
    /// changed mailboxes are drained (what is in flight commits), then the
    /// added and changed ones start on `new`; the others, the admin API,
    /// the CRM link and the Test & Enable jobs are not touched.
    pub(super) async fn apply(&mut self, new: Config, report: &ReloadReport) {
        let new = Arc::new(new);
        let old = std::mem::replace(&mut self.config, new.clone());
        let grace = new.daemon.shutdown_grace;

        let mut stopping: HashMap<String, Part> = report
            .removed
            .iter()
            .chain(&report.restarted)
            .filter_map(|name| self.mailboxes.remove(name).map(|p| (name.clone(), p)))
            .collect();
        for part in stopping.values() {
            part.stop();
        }
        // The Pending Send loop looks senders up among the mailboxes.
        let mailboxes_changed =
            !(report.added.is_empty() && report.removed.is_empty() && report.restarted.is_empty());
        let pending_send = if mailboxes_changed {
            self.pending_send.take()
        } else {
            None
        };
        if let Some(p) = &pending_send {
            p.stop();
        }
        let parts = stopping.values().chain(pending_send.as_ref());
        if !drained(parts, grace).await {
            tracing::warn!(?grace, "reload: grace period over with work in flight; a restarted mailbox starts once its old task has ended");
        }
        for name in &report.removed {
            self.runtime.remove(name);
            self.alerts.mailbox_removed(name, crate::model::now());
        }

        // A profile that changed restarted all its mailboxes (its
        // fingerprint is theirs): they start on a new semaphore and queue.
        let kept: HashSet<String> = reload::unchanged_profiles(&old, &new).into_iter().collect();
        let mut semaphores = HashMap::new();
        for p in &new.profiles {
            let semaphore = match self.semaphores.get(&p.name) {
                Some(s) if kept.contains(&p.name) => s.clone(),
                _ => {
                    self.runtime.forget_profile(&p.name);
                    Arc::new(Semaphore::new(usize::from(p.max_concurrent_connections)))
                }
            };
            semaphores.insert(p.name.clone(), semaphore);
        }
        self.semaphores = semaphores;
        let keep_clients: GraphMailboxes = self
            .graph_mailboxes
            .iter()
            .filter(|(name, _)| report.left_running.contains(name))
            .map(|(n, c)| (n.clone(), c.clone()))
            .collect();
        let keep_apps: GraphApps = self
            .graph_apps
            .iter()
            .filter(|(profile, _)| kept.contains(*profile))
            .map(|(n, a)| (n.clone(), a.clone()))
            .collect();
        (self.graph_mailboxes, self.graph_apps) =
            graph::graph_mailboxes_keeping(&new, &keep_clients, &keep_apps);

        // What the long-lived parts read.
        self.alerts
            .set_members(new.profile_members(), crate::model::now());
        self.test_enable.reconfigure(
            new.clone(),
            self.semaphores.clone(),
            Builders::with_graph(self.store.clone(), self.graph_mailboxes.clone()),
        );
        self.shared.replace(new.clone());

        for mailbox in &new.mailboxes {
            let starts =
                report.added.contains(&mailbox.name) || report.restarted.contains(&mailbox.name);
            if starts {
                // Never two tasks on one mailbox: the new one waits for the
                // old one (at once, unless it outlasted the grace period).
                // Registered at once (listed with its new task when the
                // reload answers) whenever the old one is over already.
                let old = stopping
                    .remove(&mailbox.name)
                    .map(|p| p.tracker)
                    .filter(|t| !t.is_empty());
                self.start_mailbox(mailbox, old);
            }
        }
        if mailboxes_changed {
            match start_pending_send(&new, &self.store, &self.alerts, &self.wakeup, &self.cancel) {
                Ok(p) => self.pending_send = p,
                // The [crm] section did not change, so it started before.
                Err(e) => {
                    tracing::error!(error = %e, "reload: the Pending Send loop did not start")
                }
            }
        }
    }

    /// Registers `mailbox` and starts its task and (where it sends) its
    /// sender, under a part of their own; once the tasks of `after` (the
    /// mailbox's previous run, stopped) have ended.
    fn start_mailbox(&mut self, mailbox: &Mailbox, after: Option<TaskTracker>) {
        let config = self.config.clone();
        let Some(profile) = config.profile_of(mailbox).cloned() else {
            return;
        };
        let Some(connections) = self.semaphores.get(&profile.name).cloned() else {
            return;
        };
        let part = Part::under(&self.cancel);
        let profile = Arc::new(profile);
        let shared_mailbox = Arc::new(mailbox.clone());
        let task = MailboxTask {
            config: config.clone(),
            mailbox: shared_mailbox.clone(),
            profile: profile.clone(),
            store: self.store.clone(),
            runtime: self.runtime.clone(),
            alerts: self.alerts.clone(),
            connections,
            cancel: part.cancel.clone(),
            backoff: Backoff::for_profile(&profile),
            watch_every: WATCH_EVERY,
            deployment: self.deployment.clone(),
        };
        let tracker = &part.tracker;
        let store = self.store.clone();
        let graph_client = self.graph_mailboxes.get(&mailbox.name).cloned();
        {
            let (profile, mailbox) = (profile.clone(), shared_mailbox);
            match profile.kind {
                ProfileType::Maildir => {
                    let make = move || Ok(maildir_connector(&profile, &mailbox, &store));
                    start_task(tracker, task, "maildir", make, after.clone());
                }
                ProfileType::ImapSmtp => {
                    let make = move || imap_connector(&profile, &mailbox, &store);
                    start_task(tracker, task, "imap", make, after.clone());
                }
                ProfileType::Pop3Smtp => {
                    let make = move || pop3_connector(&profile, &mailbox, &store);
                    start_task(tracker, task, "pop3", make, after.clone());
                }
                ProfileType::ExchangeOnline => {
                    let client = graph_client.clone();
                    let make = move || graph_connector(client.clone(), &profile, &mailbox, &store);
                    start_task(tracker, task, "graph", make, after.clone());
                }
                other => {
                    let why = format!("no connector for profile type {other:?} in this build");
                    let make = move || Err::<MaildirConnector, _>(why.clone());
                    start_task(tracker, task, "unavailable", make, after.clone());
                }
            }
        }
        start_sender(
            &config,
            mailbox,
            (&self.store, &self.alerts, &self.wakeup),
            graph_client,
            &part,
            after,
        );
        self.mailboxes.insert(mailbox.name.clone(), part);
    }
}

/// Registers a mailbox and starts its supervised task (once the tasks of
/// `after` have ended); `make` builds its connector (a failure disables the
/// mailbox with the reason until it is re-enabled).
fn start_task<C, F>(
    tracker: &TaskTracker,
    task: MailboxTask,
    protocol: &'static str,
    make: F,
    after: Option<TaskTracker>,
) where
    C: crate::connector::Connector + 'static,
    F: FnMut() -> Result<C, String> + Clone + Send + 'static,
{
    match after {
        None => {
            task.register(protocol);
            tracker.spawn(task.supervise(make));
        }
        Some(old) => {
            tracker.spawn(async move {
                old.wait().await;
                task.register(protocol);
                task.supervise(make).await
            });
        }
    }
}

/// Starts the supervised sender of `mailbox` (once the tasks of `after`
/// have ended) if it sends (outgoing = server-side sync, an SMTP or Graph
/// profile; an address not approved yet is held by the sender itself);
/// otherwise logs why not.
fn start_sender(
    config: &Arc<Config>,
    mailbox: &Mailbox,
    (store, alerts, wakeup): (&Arc<dyn Store>, &Arc<Alerts>, &crate::outgoing::SendWakeup),
    graph_client: Option<Result<Arc<crate::connector::graph::GraphMailbox>, String>>,
    part: &Part,
    after: Option<TaskTracker>,
) {
    if mailbox.outgoing != crate::model::Delivery::ServerSideSync {
        return;
    }
    // Approval is the sender's to wait for: an address approved at run
    // time starts sending without a restart.
    if let Err(why) = crate::outgoing::queue::sends(config, mailbox) {
        tracing::warn!(mailbox = %mailbox.name, "outgoing not started: {why}");
        return;
    }
    let Some(profile) = config.profile_of(mailbox).cloned() else {
        return;
    };
    let (config, store, alerts) = (config.clone(), store.clone(), alerts.clone());
    let (wakeup, stop, mailbox) = (wakeup.clone(), part.cancel.clone(), mailbox.clone());
    let protocol = if profile.graph.is_some() {
        "graph"
    } else {
        "smtp"
    };
    let make = move || {
        let built = build_sender(
            &config,
            &profile,
            &mailbox,
            graph_client.clone(),
            (store.clone(), alerts.clone()),
            wakeup.clone(),
            stop.clone(),
        );
        let (alerts, name, profile_name) =
            (alerts.clone(), mailbox.name.clone(), profile.name.clone());
        async move {
            match built {
                Ok(sender) => sender.run().await,
                Err(why) => alerts.raise(
                    crate::alerts::kind::OUTGOING_TEST,
                    crate::model::AlertLevel::Error,
                    Some(&name),
                    Some(&profile_name),
                    &format!("outgoing test failed: {why}"),
                    crate::model::now(),
                ),
            }
        }
    };
    let supervised = supervise("sender", protocol, part.cancel.clone(), make);
    part.tracker.spawn(async move {
        if let Some(old) = after {
            old.wait().await;
        }
        supervised.await
    });
}

/// Registers the configured CRM adapter as the outbox consumer and starts
/// its outbox worker and record pull loop (builtin: neither, the events stay
/// in the store and the pull feed).
fn start_crm_link(
    config: &Arc<Config>,
    store: &Arc<dyn Store>,
    runtime: &Arc<Runtime>,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
) -> Result<(), DaemonError> {
    store.set_outbox_consumers(
        config
            .crm
            .kind
            .consumer()
            .map(str::to_string)
            .into_iter()
            .collect(),
    );
    match &config.crm.kind {
        CrmKind::Builtin => {}
        CrmKind::Webhook(settings) => {
            let adapter = WebhookAdapter::new(settings).map_err(|e| DaemonError::Crm {
                kind: "webhook",
                message: e.to_string(),
            })?;
            let adapter = Arc::new(adapter);
            // New Error alerts go out as `alert.raised` events too.
            tracker.spawn(crate::crm::alert_events::run(
                adapter.clone(),
                store.clone(),
                settings.alert_group_wait,
                cancel.clone(),
            ));
            start_adapter(adapter, config, store, runtime, tracker, cancel);
        }
        CrmKind::Dataverse(settings) => {
            let adapter = crate::crm::dataverse::DataverseAdapter::new(settings).map_err(|e| {
                DaemonError::Crm {
                    kind: "dataverse",
                    message: e.to_string(),
                }
            })?;
            start_adapter(Arc::new(adapter), config, store, runtime, tracker, cancel);
        }
    }
    Ok(())
}

/// With the Dataverse adapter and a mailbox that sends: the loop that queues
/// the emails the CRM left in Pending Send
/// ([`crate::crm::dataverse::pending`]), as a part of its own: a reload that
/// changes the mailboxes starts it again.
fn start_pending_send(
    config: &Arc<Config>,
    store: &Arc<dyn Store>,
    alerts: &Arc<Alerts>,
    wakeup: &crate::outgoing::SendWakeup,
    cancel: &CancellationToken,
) -> Result<Option<Part>, DaemonError> {
    let CrmKind::Dataverse(settings) = &config.crm.kind else {
        return Ok(None);
    };
    if !config
        .mailboxes
        .iter()
        .any(|m| m.outgoing == crate::model::Delivery::ServerSideSync)
    {
        return Ok(None);
    }
    let part = Part::under(cancel);
    let adapter = Arc::new(
        crate::crm::dataverse::DataverseAdapter::new(settings).map_err(|e| DaemonError::Crm {
            kind: "dataverse",
            message: e.to_string(),
        })?,
    );
    let (config, store, alerts) = (config.clone(), store.clone(), alerts.clone());
    let (wakeup, stop) = (wakeup.clone(), part.cancel.clone());
    let make = move || {
        crate::crm::dataverse::pending::run_pending_send(
            adapter.clone(),
            store.clone(),
            config.clone(),
            alerts.clone(),
            wakeup.clone(),
            stop.clone(),
        )
    };
    part.tracker.spawn(supervise(
        "pending send",
        "dataverse",
        part.cancel.clone(),
        make,
    ));
    Ok(Some(part))
}

/// Starts the supervised outbox worker and record pull loop of an adapter.
fn start_adapter<A: CrmAdapter + 'static>(
    adapter: Arc<A>,
    config: &Arc<Config>,
    store: &Arc<dyn Store>,
    runtime: &Arc<Runtime>,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
) {
    let name = adapter.name();
    metrics::counter!(telemetry::CRM_DELIVERIES, "adapter" => name, "result" => "delivered")
        .increment(0);
    tracing::info!(adapter = name, "CRM link: delivering the outbox");
    let worker = {
        let (adapter, store, config) = (adapter.clone(), store.clone(), config.clone());
        let (health, cancel) = (runtime.outbox.clone(), cancel.clone());
        move || {
            OutboxWorker::new(
                adapter.clone(),
                store.clone(),
                &config.crm.delivery,
                health.clone(),
                cancel.clone(),
            )
            .run()
        }
    };
    tracker.spawn(supervise("outbox worker", name, cancel.clone(), worker));
    let sync = {
        let (store, config, cancel) = (store.clone(), config.clone(), cancel.clone());
        move || {
            RecordSync::new(
                adapter.clone(),
                store.clone(),
                config.crm.clone(),
                cancel.clone(),
            )
            .run()
        }
    };
    tracker.spawn(supervise("record sync", name, cancel.clone(), sync));
}

/// Runs the task `make` builds until it returns or the daemon stops; a
/// panicking task is logged and started again a second later.
async fn supervise<F, Fut>(
    what: &'static str,
    adapter: &'static str,
    cancel: CancellationToken,
    make: F,
) where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        match tokio::spawn(make()).await {
            Ok(()) => return,
            Err(e) => {
                tracing::error!(adapter, task = what, error = %e, "CRM task failed; restarting it");
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Pings the systemd watchdog while no mailbox is stuck, so a wedged daemon is
/// restarted instead of silently not syncing.
fn spawn_watchdog(
    tracker: &TaskTracker,
    cancel: CancellationToken,
    runtime: Arc<Runtime>,
    config: SharedConfig,
) {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    if interval.is_zero() {
        return;
    }
    let every = interval / 2;
    tracker.spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = cancel.cancelled() => return,
            }
            let stuck = runtime.stuck(config.current().daemon.stuck_after);
            if stuck.is_empty() {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            } else {
                tracing::error!(?stuck, "mailboxes stuck; withholding watchdog ping");
            }
        }
    });
}
