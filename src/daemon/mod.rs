//! The long-running service: opens the store, starts the admin API and one task
//! per mailbox, tells systemd it is ready, applies configuration reloads, and
//! drains in-flight work on SIGTERM/SIGINT.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

mod graph;
pub mod reload;
mod running;

use crate::alerts::Alerts;
use crate::config::{read_secret_file, AuthKind, Config, Mailbox, Profile};
use crate::connector::graph::GraphConnector;
use crate::connector::imap::{Credentials, ImapConnector, ImapSettings};
use crate::connector::maildir::MaildirConnector;
use crate::connector::oauth::{StaticToken, TokenFile, TokenProvider};
use crate::connector::pop3::Credentials as Pop3Credentials;
use crate::connector::pop3_sync::{Pop3Connector, Pop3Settings};
use crate::deployment::{Claiming, Deployment};
use crate::model::{IncomingDelivery, ProfileType};
use crate::net::Endpoint;
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
/// applied: only the mailboxes it adds, removes or changes are touched, or
/// every task drains and starts again where a section changed that only
/// that applies (see [`reload`]).
pub async fn run_from(config: Config, path: Option<std::path::PathBuf>) -> Result<(), DaemonError> {
    let mut config = Arc::new(config);
    let store: Arc<dyn Store> = Arc::new(SledStore::open_with_cache_mb(
        &config.store_path(),
        config.daemon.store_cache_mb,
    )?);
    let deployment = Arc::new(Deployment::load_or_create(&config)?);
    tracing::info!(deployment = %deployment.id, "this deployment's id (in the marker of every mailbox it syncs)");
    // Test & Enable jobs stay queryable across reloads, full ones included.
    let jobs = Arc::new(crate::jobs::Jobs::default());
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
        keep_alerts_within(&store, &config.daemon);
        let mut generation = running::Generation::start(
            config.clone(),
            store.clone(),
            deployment.clone(),
            jobs.clone(),
            prometheus.clone(),
            reloads.clone(),
        )
        .await?;
        loop {
            let next = wait_for_next(
                generation.config(),
                path.as_ref(),
                &mut reload_rx,
                &mut hangup,
                generation.alerts(),
            )
            .await;
            let (new, report, answer) = match next {
                Next::Shutdown => {
                    tracing::info!("shutting down: draining in-flight work");
                    generation.stop().await;
                    tracing::info!("stopped");
                    return Ok(());
                }
                Next::Reload(new, report, answer) => (new, report, answer),
            };
            telemetry::describe(&report.added);
            tracing::info!(
                added = ?report.added,
                removed = ?report.removed,
                restarted = ?report.restarted,
                left_running = report.left_running.len(),
                full_restart = ?report.full_restart,
                "configuration reloaded"
            );
            if report.is_full() {
                // Answered first: the admin API that carries the answer
                // drains with everything else.
                if let Some(tx) = answer {
                    let _ = tx.send(Ok(*report));
                }
                tracing::info!("reloading the configuration: draining every task");
                generation.stop().await;
                config = Arc::new(*new);
                break;
            }
            keep_alerts_within(&store, &new.daemon);
            // Answered once applied: a caller then sees the new mailboxes.
            generation.apply(*new, &report).await;
            if let Some(tx) = answer {
                let _ = tx.send(Ok(*report));
            }
        }
    }
}

/// Sets the store's retention of resolved alerts from `daemon` and prunes,
/// in the background, what it makes due (what time alone made due since the
/// last resolve, or all past a lowered bound); resolves prune the rest.
fn keep_alerts_within(store: &Arc<dyn Store>, daemon: &crate::config::DaemonSettings) {
    store.set_alert_retention(daemon.alert_retention());
    let store = store.clone();
    tokio::task::spawn_blocking(
        move || match store.prune_resolved_alerts(crate::model::now()) {
            Ok(0) => {}
            Ok(n) => tracing::info!(pruned = n, "resolved alerts past their retention deleted"),
            Err(e) => tracing::warn!(error = %e, "cannot prune resolved alerts"),
        },
    );
}

/// What the daemon waits for next.
enum Next {
    Shutdown,
    /// A valid new configuration, what it changes, and where the answer
    /// goes (none for SIGHUP).
    Reload(
        Box<Config>,
        Box<reload::ReloadReport>,
        Option<reload::ReloadRequest>,
    ),
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
        match loaded {
            Ok((new, report)) => return Next::Reload(Box::new(new), Box::new(report), answer),
            Err(refused) => {
                if let Some(tx) = answer {
                    let _ = tx.send(Err(refused));
                }
            }
        }
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
            graph_clients: graph::graph_mailboxes(config).0,
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
    let tested = crate::deployment::test_and_claim(&mut connector, claim)
        .await
        .map(|(line, _)| line);
    connector.close().await;
    Ok(tested?)
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
