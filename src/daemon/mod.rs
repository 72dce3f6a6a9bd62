//! The long-running service: opens the store, starts the admin API and one task
//! per mailbox, tells systemd it is ready, and drains in-flight work on
//! SIGTERM/SIGINT.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

mod graph;
pub mod reload;

use crate::admin::{self, AdminState};
use crate::alerts::Alerts;
use crate::config::{read_secret_file, AuthKind, Config, CrmKind, Mailbox, Profile};
use crate::connector::graph::GraphConnector;
use crate::connector::imap::{Credentials, ImapConnector, ImapSettings};
use crate::connector::maildir::MaildirConnector;
use crate::connector::oauth::{StaticToken, TokenFile, TokenProvider};
use crate::connector::pop3::Credentials as Pop3Credentials;
use crate::connector::pop3_sync::{Pop3Connector, Pop3Settings};
use crate::crm::sync::RecordSync;
use crate::crm::webhook::WebhookAdapter;
use crate::crm::worker::OutboxWorker;
use crate::crm::CrmAdapter;
use crate::deployment::{Claiming, Deployment};
use crate::model::{IncomingDelivery, ProfileType};
use crate::net::Endpoint;
use crate::scheduler::{Backoff, MailboxTask, Runtime, WATCH_EVERY};
use crate::store::{SledStore, Store};
use crate::telemetry;

/// Startup failure.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("CRM link ([crm] type = {kind:?}): {message}")]
    Crm { kind: &'static str, message: String },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Deployment(#[from] crate::deployment::DeploymentIdError),
}

/// Runs until a shutdown signal; returns after in-flight work drained (or the
/// grace period ran out).
pub async fn run(config: Config) -> Result<(), DaemonError> {
    run_from(config, None).await
}

/// Runs the daemon on `config`, read from `path`: on SIGHUP, `crm-mailsync
/// reload` or `POST /api/v1/reload` the file is read again and, when valid,
/// the daemon's tasks drain and start again from it (see [`reload`]).
pub async fn run_from(config: Config, path: Option<std::path::PathBuf>) -> Result<(), DaemonError> {
    let mut config = Arc::new(config);
    let store: Arc<dyn Store> = Arc::new(SledStore::open_with_cache_mb(
        &config.store_path(),
        config.daemon.store_cache_mb,
    )?);
    let deployment = Arc::new(Deployment::load_or_create(&config)?);
    tracing::info!(deployment = %deployment.id, "this deployment's id (in the marker of every mailbox it syncs)");
    let prometheus = telemetry::prometheus();
    telemetry::describe(
        &config
            .mailboxes
            .iter()
            .map(|m| m.name.clone())
            .collect::<Vec<_>>(),
    );
    let (reload_tx, mut reload_rx) = tokio::sync::mpsc::channel(4);
    let reloads = reload::ReloadHandle(reload_tx);
    let mut hangup = hangup_signal();
    loop {
        let run = Inner {
            config: config.clone(),
            store: store.clone(),
            prometheus: prometheus.clone(),
            reloads: reloads.clone(),
            deployment: deployment.clone(),
        };
        match run.run(&mut reload_rx, path.as_ref(), &mut hangup).await? {
            Next::Shutdown => return Ok(()),
            Next::Reload(new, report) => {
                telemetry::describe(&report.added);
                tracing::info!(
                    added = ?report.added,
                    removed = ?report.removed,
                    changed = ?report.changed,
                    "configuration reloaded"
                );
                config = Arc::new(*new);
            }
        }
    }
}

/// What a run of the daemon's tasks ended with.
enum Next {
    Shutdown,
    Reload(Box<Config>, reload::ReloadReport),
}

/// One run of every task on one configuration.
struct Inner {
    config: Arc<Config>,
    store: Arc<dyn Store>,
    prometheus: Option<metrics_exporter_prometheus::PrometheusHandle>,
    reloads: reload::ReloadHandle,
    deployment: Arc<Deployment>,
}

#[cfg(unix)]
type Hangup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangup = Option<()>;

#[cfg(unix)]
fn hangup_signal() -> Hangup {
    use tokio::signal::unix::{signal, SignalKind};
    signal(SignalKind::hangup())
        .map_err(|e| tracing::warn!(error = %e, "cannot listen for SIGHUP; reload through the API"))
        .ok()
}

#[cfg(not(unix))]
fn hangup_signal() -> Hangup {
    None
}

/// The next SIGHUP (never, without one).
async fn next_hangup(h: &mut Hangup) {
    #[cfg(unix)]
    if let Some(s) = h.as_mut() {
        if s.recv().await.is_some() {
            return;
        }
    }
    let _ = h;
    std::future::pending::<()>().await
}

impl Inner {
    async fn run(
        self,
        reload_rx: &mut tokio::sync::mpsc::Receiver<reload::ReloadRequest>,
        path: Option<&std::path::PathBuf>,
        hangup: &mut Hangup,
    ) -> Result<Next, DaemonError> {
        let Inner {
            config,
            store,
            prometheus,
            reloads,
            deployment,
        } = self;
        let runtime = Arc::new(Runtime::default());
        let mut members: HashMap<String, Vec<String>> = HashMap::new();
        for m in &config.mailboxes {
            members
                .entry(m.profile.clone())
                .or_default()
                .push(m.name.clone());
        }
        let alerts = Arc::new(Alerts::new(store.clone(), members));
        // Wakes the senders when the admin API queues an email.
        let wakeup: crate::outgoing::SendWakeup = Arc::new(tokio::sync::Notify::new());
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        // Before any mailbox commits: every event from now on gets a pending
        // delivery for the configured adapter.
        start_crm_link(&config, &store, &runtime, &tracker, &cancel)?;
        start_pending_send(&config, &store, &alerts, &wakeup, &tracker, &cancel)?;

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
        let graph_clients = graph::graph_mailboxes(&config);
        // Test & Enable on demand: the mailbox tasks' semaphores and Graph
        // clients, so its connections count against the same limits.
        let test_enable = Arc::new(crate::testenable::TestEnable::for_daemon(
            config.clone(),
            store.clone(),
            deployment.clone(),
            alerts.clone(),
            semaphores.clone(),
            Builders::with_graph(store.clone(), graph_clients.clone()),
            runtime.clone(),
            cancel.clone(),
        ));

        if config.admin.enabled {
            let listener = tokio::net::TcpListener::bind(config.admin.listen)
                .await
                .map_err(|source| DaemonError::Listen {
                    addr: config.admin.listen.to_string(),
                    source,
                })?;
            let addr = listener
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
            tracing::info!(%addr, "admin API listening");
            let app = admin::router(AdminState {
                config: config.clone(),
                store: store.clone(),
                runtime: runtime.clone(),
                prometheus,
                shutdown: cancel.clone(),
                send_wakeup: Some(wakeup.clone()),
            })
            .layer(axum::Extension(test_enable.clone()))
            .layer(axum::Extension(reloads.clone()));
            let stop = cancel.clone();
            tracker.spawn(async move {
                let served = axum::serve(listener, app)
                    .with_graceful_shutdown(async move { stop.cancelled().await })
                    .await;
                if let Err(e) = served {
                    tracing::error!(error = %e, "admin API stopped");
                }
            });
        }

        for mailbox in &config.mailboxes {
            let Some(profile) = config.profile_of(mailbox).cloned() else {
                continue;
            };
            let Some(connections) = semaphores.get(&profile.name).cloned() else {
                continue;
            };
            let task = MailboxTask {
                config: config.clone(),
                mailbox: mailbox.clone(),
                profile: profile.clone(),
                store: store.clone(),
                runtime: runtime.clone(),
                alerts: alerts.clone(),
                connections,
                cancel: cancel.clone(),
                backoff: Backoff::for_profile(&profile),
                watch_every: WATCH_EVERY,
                deployment: deployment.clone(),
            };
            let store = store.clone();
            let mailbox = mailbox.clone();
            match profile.kind {
                ProfileType::Maildir => {
                    let make = move || Ok(maildir_connector(&profile, &mailbox, &store));
                    start_mailbox(&tracker, task, "maildir", make);
                }
                ProfileType::ImapSmtp => {
                    let make = move || imap_connector(&profile, &mailbox, &store);
                    start_mailbox(&tracker, task, "imap", make);
                }
                ProfileType::Pop3Smtp => {
                    let make = move || pop3_connector(&profile, &mailbox, &store);
                    start_mailbox(&tracker, task, "pop3", make);
                }
                ProfileType::ExchangeOnline => {
                    let client = graph_clients.get(&mailbox.name).cloned();
                    let make = move || graph_connector(client.clone(), &profile, &mailbox, &store);
                    start_mailbox(&tracker, task, "graph", make);
                }
                other => {
                    let why = format!("no connector for profile type {other:?} in this build");
                    let make = move || Err::<MaildirConnector, _>(why.clone());
                    start_mailbox(&tracker, task, "unavailable", make);
                }
            }
        }
        start_senders(
            &config,
            &store,
            &alerts,
            &wakeup,
            &graph_clients,
            &tracker,
            &cancel,
        );
        runtime.scheduler_running.store(true, Ordering::SeqCst);
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        spawn_watchdog(
            &tracker,
            cancel.clone(),
            runtime.clone(),
            config.daemon.stuck_after,
        );
        crate::alerts::spawn_monitor(
            &tracker,
            cancel.clone(),
            runtime.clone(),
            crate::alerts::Monitor::new(config.clone(), alerts.clone()),
        );
        tracing::info!(
            mailboxes = config.mailboxes.len(),
            version = env!("CARGO_PKG_VERSION"),
            "crm-mailsync running"
        );

        let next = wait_for_next(&config, path, reload_rx, hangup, &alerts).await;
        match &next {
            Next::Shutdown => tracing::info!("shutting down: draining in-flight work"),
            Next::Reload(..) => {
                tracing::info!("reloading the configuration: draining in-flight work")
            }
        }
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        runtime.scheduler_running.store(false, Ordering::SeqCst);
        cancel.cancel();
        tracker.close();
        if tokio::time::timeout(config.daemon.shutdown_grace, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(grace = ?config.daemon.shutdown_grace, "grace period over; stopping with work in flight (it is re-done on restart)");
        }
        if matches!(next, Next::Shutdown) {
            tracing::info!("stopped");
        }
        Ok(next)
    }
}

/// Waits for a shutdown signal or a reload (SIGHUP, the API). A reload of a
/// file that is invalid is refused (every error to the caller, an Error
/// alert) and the daemon runs on as it is.
async fn wait_for_next(
    config: &Config,
    path: Option<&std::path::PathBuf>,
    reload_rx: &mut tokio::sync::mpsc::Receiver<reload::ReloadRequest>,
    hangup: &mut Hangup,
    alerts: &Alerts,
) -> Next {
    use crate::alerts::kind;
    loop {
        let answer = tokio::select! {
            _ = wait_for_shutdown_signal() => return Next::Shutdown,
            _ = next_hangup(hangup) => {
                tracing::info!("SIGHUP: reloading the configuration");
                None
            }
            request = reload_rx.recv() => match request {
                Some(tx) => Some(tx),
                None => return Next::Shutdown,
            },
        };
        let loaded = reload::load(path, config);
        let now = crate::model::now();
        match &loaded {
            Ok(_) => alerts.resolve("", kind::DAEMON, now),
            Err(reload::ReloadRefused::Invalid { file, errors }) => {
                let listed: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
                alerts.raise(
                    kind::DAEMON,
                    crate::model::AlertLevel::Error,
                    None,
                    None,
                    &format!(
                        "the configuration file {file} was not reloaded ({} error(s); the daemon runs on the previous one): {}",
                        errors.len(),
                        listed.join("; ")
                    ),
                    now,
                );
            }
            Err(reload::ReloadRefused::NoFile) => {
                tracing::warn!(
                    "reload asked, but the daemon was not started from a configuration file"
                );
            }
        }
        let reply = loaded.clone().map(|(_, report)| report);
        if let Some(tx) = answer {
            let _ = tx.send(reply);
        }
        if let Ok((new, report)) = loaded {
            return Next::Reload(Box::new(new), report);
        }
    }
}

/// Starts one supervised sender per mailbox that may send (outgoing =
/// server-side sync, approved, an SMTP profile); the others are logged once.
fn start_senders(
    config: &Arc<Config>,
    store: &Arc<dyn Store>,
    alerts: &Arc<Alerts>,
    wakeup: &crate::outgoing::SendWakeup,
    graph_clients: &graph::GraphMailboxes,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
) {
    for mailbox in &config.mailboxes {
        if mailbox.outgoing != crate::model::Delivery::ServerSideSync {
            continue;
        }
        // Approval is the sender's to wait for: an address approved at
        // run time starts sending without a restart.
        if let Err(why) = crate::outgoing::queue::sends(config, mailbox) {
            tracing::warn!(mailbox = %mailbox.name, "outgoing not started: {why}");
            continue;
        }
        let Some(profile) = config.profile_of(mailbox).cloned() else {
            continue;
        };
        let (config, store, alerts) = (config.clone(), store.clone(), alerts.clone());
        let (wakeup, stop, mailbox) = (wakeup.clone(), cancel.clone(), mailbox.clone());
        let graph_client = graph_clients.get(&mailbox.name).cloned();
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
        tracker.spawn(supervise("sender", protocol, cancel.clone(), make));
    }
}

/// The sender of `mailbox` with its current secrets (SMTP, or Graph where
/// the profile is Exchange Online), as the daemon and Test & Enable build it.
fn build_sender(
    config: &Config,
    profile: &Profile,
    mailbox: &Mailbox,
    graph_client: Option<Result<Arc<crate::connector::graph::GraphMailbox>, String>>,
    (store, alerts): (Arc<dyn Store>, Arc<Alerts>),
    wakeup: crate::outgoing::SendWakeup,
    stop: CancellationToken,
) -> Result<crate::outgoing::sender::Sender, String> {
    use crate::outgoing::sender::{Sender, SenderSettings};
    use crate::outgoing::transport::{GraphTransportSettings, TransportSettings};
    let (p, m) = with_current_secrets(profile, mailbox)?;
    let settings = match (&p.graph, graph_client) {
        (Some(g), Some(client)) => {
            let mut t = GraphTransportSettings::new(client?);
            t.unknown_delivery = g.unknown_delivery;
            t.retry_for = g.send_retry_for;
            t.confirm_for = g.confirm_sent_within;
            SenderSettings::with_transport(config, &p, &m, TransportSettings::Graph(t))
        }
        _ => {
            let credentials = imap_settings(&p, &m)?.credentials;
            SenderSettings::new(config, &p, &m, credentials, token_provider(&p, &m))?
        }
    };
    Sender::new(settings, store, alerts, wakeup, stop)
}

/// A Maildir connector for `mailbox`.
fn maildir_connector(
    profile: &Profile,
    mailbox: &Mailbox,
    store: &Arc<dyn Store>,
) -> MaildirConnector {
    let mut folders: Vec<String> = mailbox
        .tracked_folders
        .iter()
        .map(|r| r.folder.clone())
        .collect();
    folders.extend(mailbox.extra_folders.iter().cloned());
    let root = mailbox.path.clone().unwrap_or_default();
    MaildirConnector::new(
        &mailbox.name,
        &root,
        folders,
        profile.batch_size,
        mailbox.delete_after_processing,
        profile.move_failed_to.clone(),
        store.clone(),
    )
}

/// An IMAP connector for `mailbox`, its password file read now.
fn imap_connector(
    profile: &Profile,
    mailbox: &Mailbox,
    store: &Arc<dyn Store>,
) -> Result<ImapConnector, String> {
    let (profile, mailbox) = with_current_secrets(profile, mailbox)?;
    imap_settings(&profile, &mailbox).map(|settings| ImapConnector::new(settings, store.clone()))
}

/// A POP3 connector for `mailbox`, its password file read now.
fn pop3_connector(
    profile: &Profile,
    mailbox: &Mailbox,
    store: &Arc<dyn Store>,
) -> Result<Pop3Connector, String> {
    let (profile, mailbox) = with_current_secrets(profile, mailbox)?;
    pop3_settings(&profile, &mailbox).map(|settings| Pop3Connector::new(settings, store.clone()))
}

/// A Microsoft Graph connector for `mailbox` over its (shared) Graph client.
fn graph_connector(
    client: Option<Result<Arc<crate::connector::graph::GraphMailbox>, String>>,
    profile: &Profile,
    mailbox: &Mailbox,
    store: &Arc<dyn Store>,
) -> Result<GraphConnector, String> {
    let client = client.unwrap_or_else(|| Err("no Graph client was built".to_string()))?;
    Ok(GraphConnector::new(
        client,
        graph::graph_settings(profile, mailbox),
        store.clone(),
    ))
}

/// Why an incoming test with a freshly built connector failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The connector could not be built (a password file unreadable, no
    /// connector for the profile type).
    #[error("{0}")]
    Build(String),
    /// The server (or the Maildir) said no.
    #[error(transparent)]
    Connector(#[from] crate::connector::ConnectorError),
}

/// Builds connectors and senders for Test & Enable exactly as the mailbox
/// tasks and senders are built, with the secrets read again at each build.
pub struct Builders {
    store: Arc<dyn Store>,
    graph_clients: graph::GraphMailboxes,
}

impl Builders {
    /// Builders for `config`'s mailboxes (Graph clients built here share
    /// nothing with the daemon's; the daemon passes its own through
    /// [`Builders::with_graph`]).
    pub fn new(config: &Config, store: Arc<dyn Store>) -> Self {
        Builders {
            graph_clients: graph::graph_mailboxes(config),
            store,
        }
    }

    fn with_graph(store: Arc<dyn Store>, graph_clients: graph::GraphMailboxes) -> Self {
        Builders {
            store,
            graph_clients,
        }
    }

    /// The incoming Test & Enable of `mailbox` on a fresh connector:
    /// connect, TLS, authenticate, open the inbox (or UIDL, or the Graph
    /// inbox), then log out. Returns the connector's success line.
    pub async fn incoming_test(
        &self,
        profile: &Profile,
        mailbox: &Mailbox,
        claim: Claiming<'_>,
    ) -> Result<String, ProbeError> {
        let store = &self.store;
        match profile.kind {
            ProfileType::Maildir => probe(maildir_connector(profile, mailbox, store), claim).await,
            ProfileType::ImapSmtp => {
                let connector =
                    imap_connector(profile, mailbox, store).map_err(ProbeError::Build)?;
                probe(connector, claim).await
            }
            ProfileType::Pop3Smtp => {
                let connector =
                    pop3_connector(profile, mailbox, store).map_err(ProbeError::Build)?;
                probe(connector, claim).await
            }
            ProfileType::ExchangeOnline => {
                let client = self.graph_clients.get(&mailbox.name).cloned();
                let connector =
                    graph_connector(client, profile, mailbox, store).map_err(ProbeError::Build)?;
                probe(connector, claim).await
            }
            other => Err(ProbeError::Build(format!(
                "no connector for profile type {other:?} in this build"
            ))),
        }
    }

    /// A sender for the outgoing Test & Enable of `mailbox` (its secrets
    /// read now); it sends nothing but what it is asked to.
    pub fn sender(
        &self,
        config: &Config,
        profile: &Profile,
        mailbox: &Mailbox,
        alerts: Arc<Alerts>,
    ) -> Result<crate::outgoing::sender::Sender, String> {
        build_sender(
            config,
            profile,
            mailbox,
            self.graph_clients.get(&mailbox.name).cloned(),
            (self.store.clone(), alerts),
            Arc::new(tokio::sync::Notify::new()),
            CancellationToken::new(),
        )
    }
}

/// Runs a connector's test, claims the mailbox for the deployment, and
/// closes the connector: the connection is over when this returns, so it is
/// never open beyond the caller's connection permit.
async fn probe<C: crate::connector::Connector>(
    mut connector: C,
    claim: Claiming<'_>,
) -> Result<String, ProbeError> {
    let tested = match connector.test().await {
        Ok(detail) => crate::deployment::claim(&mut connector, claim)
            .await
            .map(|c| format!("{detail}; {}", c.describe(claim.deployment))),
        Err(e) => Err(e),
    };
    connector.close().await;
    Ok(tested?)
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
/// ([`crate::crm::dataverse::pending`]).
fn start_pending_send(
    config: &Arc<Config>,
    store: &Arc<dyn Store>,
    alerts: &Arc<Alerts>,
    wakeup: &crate::outgoing::SendWakeup,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
) -> Result<(), DaemonError> {
    let CrmKind::Dataverse(settings) = &config.crm.kind else {
        return Ok(());
    };
    if !config
        .mailboxes
        .iter()
        .any(|m| m.outgoing == crate::model::Delivery::ServerSideSync)
    {
        return Ok(());
    }
    let adapter = Arc::new(
        crate::crm::dataverse::DataverseAdapter::new(settings).map_err(|e| DaemonError::Crm {
            kind: "dataverse",
            message: e.to_string(),
        })?,
    );
    let (config, store, alerts) = (config.clone(), store.clone(), alerts.clone());
    let (wakeup, stop) = (wakeup.clone(), cancel.clone());
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
    tracker.spawn(supervise("pending send", "dataverse", cancel.clone(), make));
    Ok(())
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

/// Where and how to connect for a server profile.
pub fn endpoint(profile: &Profile) -> Result<Endpoint, String> {
    let host = profile
        .host
        .clone()
        .ok_or_else(|| format!("profile {:?} has no host", profile.name))?;
    let port = profile
        .port
        .ok_or_else(|| format!("profile {:?} has no port", profile.name))?;
    Ok(Endpoint {
        host,
        port,
        tls: profile.tls,
        tls_server_name: profile.tls_server_name.clone(),
        ca_file: profile.ca_file.clone(),
        connect_timeout: profile.connect_timeout,
        io_timeout: profile.io_timeout,
    })
}

/// Login name and secret of a mailbox (its own, else the profile's).
pub fn login(profile: &Profile, mailbox: &Mailbox) -> Result<(String, String), String> {
    let user = mailbox
        .username
        .clone()
        .or_else(|| profile.username.clone())
        .ok_or_else(|| format!("mailbox {:?} has no username", mailbox.name))?;
    let secret = mailbox
        .secret
        .as_ref()
        .or(profile.secret.as_ref())
        .map(|s| s.expose().to_string());
    match secret {
        Some(s) => Ok((user, s)),
        // The token comes from the provider at every login.
        None if token_provider(profile, mailbox).is_some() => Ok((user, String::new())),
        None => Err(format!(
            "mailbox {:?} has no password or token",
            mailbox.name
        )),
    }
}

/// Where an OAuth2 mailbox gets its access token: the mailbox's own token
/// (file or static) before the profile's. `None` for password logins.
pub fn token_provider(profile: &Profile, mailbox: &Mailbox) -> Option<Arc<dyn TokenProvider>> {
    if profile.auth != AuthKind::OAuth2 {
        return None;
    }
    let own = (
        &mailbox.token_file,
        &mailbox.secret,
        mailbox.token_expires_at,
    );
    let shared = (
        &profile.token_file,
        &profile.secret,
        profile.token_expires_at,
    );
    for (file, secret, expiry) in [own, shared] {
        if let Some(f) = file {
            return Some(Arc::new(TokenFile::new(f, expiry)));
        }
        if let Some(s) = secret {
            return Some(Arc::new(StaticToken::new(s.clone(), expiry)));
        }
    }
    None
}

/// The IMAP connector settings of a mailbox.
pub fn imap_settings(profile: &Profile, mailbox: &Mailbox) -> Result<ImapSettings, String> {
    let (user, secret) = login(profile, mailbox)?;
    let credentials = match profile.auth {
        AuthKind::Password => Credentials::Password { user, pass: secret },
        AuthKind::OAuth2 => Credentials::OAuth2 {
            user,
            token: secret,
        },
    };
    let mut folders: Vec<String> = mailbox
        .tracked_folders
        .iter()
        .map(|r| r.folder.clone())
        .collect();
    folders.extend(mailbox.extra_folders.iter().cloned());
    let forward = mailbox.incoming == IncomingDelivery::ForwardMailbox;
    Ok(ImapSettings {
        mailbox: mailbox.name.clone(),
        endpoint: endpoint(profile)?,
        credentials,
        token_provider: token_provider(profile, mailbox),
        max_message_size: profile.max_message_size,
        folders,
        batch_size: profile.batch_size,
        process_email_from: profile.process_email_from,
        move_failed_to: profile.move_failed_to.clone(),
        processed_keyword: profile.processed_keyword.clone(),
        delete_after_processing: mailbox.delete_after_processing,
        idle: profile.idle,
        transform: forward.then_some(crate::connector::forward::unwrap_forwarded as fn(_) -> _),
        missing_message_retries: profile.missing_message_retries,
    })
}

/// The POP3 connector settings of a mailbox.
pub fn pop3_settings(profile: &Profile, mailbox: &Mailbox) -> Result<Pop3Settings, String> {
    let (user, secret) = login(profile, mailbox)?;
    let credentials = match profile.auth {
        AuthKind::Password => Pop3Credentials::Password { user, pass: secret },
        AuthKind::OAuth2 => Pop3Credentials::OAuth2 {
            user,
            token: secret,
        },
    };
    let forward = mailbox.incoming == IncomingDelivery::ForwardMailbox;
    Ok(Pop3Settings {
        mailbox: mailbox.name.clone(),
        endpoint: endpoint(profile)?,
        credentials,
        token_provider: token_provider(profile, mailbox),
        batch_size: profile.batch_size,
        max_message_size: profile.max_message_size,
        delete_after_processing: mailbox.delete_after_processing,
        transform: forward.then_some(crate::connector::forward::unwrap_forwarded as fn(_) -> _),
    })
}

/// Registers a mailbox and starts its supervised task; `make` builds its
/// connector (a failure disables the mailbox with the reason until it is
/// re-enabled).
fn start_mailbox<C, F>(tracker: &TaskTracker, task: MailboxTask, protocol: &'static str, make: F)
where
    C: crate::connector::Connector + 'static,
    F: FnMut() -> Result<C, String> + Clone + Send + 'static,
{
    task.register(protocol);
    tracker.spawn(task.supervise(make));
}

/// The profile and mailbox with their `password_file`s read again, so a
/// re-enabled mailbox logs in with the password written since startup.
pub fn with_current_secrets(
    profile: &Profile,
    mailbox: &Mailbox,
) -> Result<(Profile, Mailbox), String> {
    let mut profile = profile.clone();
    let mut mailbox = mailbox.clone();
    if let Some(f) = &profile.password_file {
        profile.secret = Some(read_secret_file(f)?);
    }
    if let Some(f) = &mailbox.password_file {
        mailbox.secret = Some(read_secret_file(f)?);
    }
    if let Some(graph) = profile.graph.as_mut() {
        if let Some(f) = &graph.client_secret_file {
            graph.credential = crate::config::GraphCredential::Secret(read_secret_file(f)?);
        }
    }
    Ok((profile, mailbox))
}

/// Pings the systemd watchdog while no mailbox is stuck, so a wedged daemon is
/// restarted instead of silently not syncing.
fn spawn_watchdog(
    tracker: &TaskTracker,
    cancel: CancellationToken,
    runtime: Arc<Runtime>,
    stuck_after: Duration,
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
            let stuck = runtime.stuck(stuck_after);
            if stuck.is_empty() {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            } else {
                tracing::error!(?stuck, "mailboxes stuck; withholding watchdog ping");
            }
        }
    });
}

async fn wait_for_shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
