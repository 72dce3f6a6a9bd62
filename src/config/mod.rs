//! Configuration: a TOML file plus `CRM_MAILSYNC__…` environment overrides, read
//! into a raw tree, then validated into typed settings.
//!
//! Validation never stops at the first mistake: every problem is collected with
//! its key path (`mailboxes[2].profile`) so an operator fixes them all in one go.
//! `check-config` and the daemon share this code and exit with 64 (EX_USAGE).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Map, Value};

use crate::correlate::token::{self, TokenSettings};
use crate::correlate::{CorrelationSettings, SmartMode, SmartSettings};
use crate::model::{
    ApprovalStatus, CorrelationMethod, Delivery, IncomingDelivery, OwnerKind, ProfileType,
    RecordRef,
};
use crate::net::TlsMode;

mod correlation;
mod crm;
mod graph;
mod mailbox;
mod outgoing;
mod profile;
mod raw;
mod secret;
mod shared;
mod smtp;

use correlation::*;
use crm::*;
use mailbox::*;
use profile::*;
use raw::*;
use secret::*;

pub use crm::{
    default_retry_schedule, CrmKind, CrmSettings, DataverseSettings, DeliverySettings,
    PartySettings, WebhookSettings,
};
pub use graph::{GraphCredential, GraphProfile, DEFAULT_CATEGORY, GRAPH_URL, LOGIN_URL};
pub use outgoing::{OutgoingSettings, DEFAULT_BLOCKED_EXTENSIONS};
pub use secret::{fingerprint, read_secret_file, Secret};
pub use shared::SharedConfig;
pub use smtp::{SentCopyMode, SmtpSettings, UnknownDelivery};

/// Exit status for configuration errors (sysexits EX_USAGE... EX_CONFIG is 78; the
/// product contract says 64).
pub const EXIT_CONFIG: i32 = 64;

/// Environment variable prefix for overrides: `CRM_MAILSYNC__ADMIN__LISTEN=…`.
pub const ENV_PREFIX: &str = "CRM_MAILSYNC";

/// One configuration problem, with the key path it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every problem found in a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} configuration error(s):", self.0.len())?;
        for e in &self.0 {
            writeln!(f, "  - {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Pretty on a terminal, JSON otherwise.
    Auto,
    Pretty,
    Json,
}

/// Process-wide settings.
#[derive(Debug, Clone)]
pub struct DaemonSettings {
    /// Where the store, quarantine and other state live.
    pub state_dir: PathBuf,
    pub log_format: LogFormat,
    pub log_level: String,
    /// How long SIGTERM waits for in-flight work.
    pub shutdown_grace: Duration,
    /// A mailbox whose sync cycle runs longer than this is "stuck" for `/readyz`.
    pub stuck_after: Duration,
    /// Page cache of the embedded store, in MiB (sled's own default is 1 GiB).
    pub store_cache_mb: u64,
    /// This deployment's id in the markers of the mailboxes it syncs;
    /// `None`: generated once and kept in the state directory.
    pub deployment_id: Option<String>,
    /// How often a running mailbox checks that its marker still names this
    /// deployment (another one may have taken it over).
    pub marker_check_every: Duration,
    /// Resolved alerts older than this are deleted.
    pub resolved_alert_retention: Duration,
    /// At most this many resolved alerts are kept (the newest).
    pub resolved_alerts_kept: u64,
}

impl DaemonSettings {
    /// The store's retention of resolved alerts.
    pub fn alert_retention(&self) -> crate::store::AlertRetention {
        crate::store::AlertRetention {
            max_age: self.resolved_alert_retention,
            keep: self.resolved_alerts_kept,
        }
    }
}

/// Admin HTTP API settings.
#[derive(Debug, Clone)]
pub struct AdminSettings {
    pub enabled: bool,
    pub listen: SocketAddr,
    pub token: Option<Secret>,
}

/// How a mailbox authenticates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthKind {
    Password,
    OAuth2,
}

/// A validated email server profile.
#[derive(Debug, Clone)]
pub struct Profile {
    pub name: String,
    pub kind: ProfileType,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub tls: TlsMode,
    pub allow_insecure: bool,
    pub ca_file: Option<PathBuf>,
    pub tls_server_name: Option<String>,
    pub auth: AuthKind,
    /// Profile-level credentials, used by mailboxes that have none of their own.
    pub username: Option<String>,
    pub secret: Option<Secret>,
    /// OAuth2 access token file, re-read before every login (`auth = "oauth2"`).
    pub token_file: Option<PathBuf>,
    /// Expiry of a static or bare-file token, when the operator knows it.
    pub token_expires_at: Option<crate::model::UnixTime>,
    /// Warn this long before a known token expiry.
    pub token_expiry_warning: Duration,
    pub poll_interval: Duration,
    /// Idle back-off cap: a mailbox that keeps finding nothing polls less
    /// often, one more `poll_interval` every 10 empty polls, up to this many
    /// times `poll_interval` (1 = never back off); new mail or a push
    /// wake-up (IDLE) brings it back to `poll_interval`.
    pub idle_backoff_cap: u32,
    pub max_concurrent_connections: u16,
    pub connect_timeout: Duration,
    pub io_timeout: Duration,
    /// Mail older than this date (UTC midnight) is not processed.
    pub process_email_from: Option<chrono::NaiveDate>,
    pub move_failed_to: Option<String>,
    /// Messages fetched and committed per batch.
    pub batch_size: usize,
    pub max_message_size: u64,
    /// Keyword set on processed messages where the server allows it: IMAP
    /// profiles default to `$CRMTracked`, `processed_keyword = ""` turns it off.
    pub processed_keyword: Option<String>,
    pub idle: bool,
    /// Mailboxes of this profile hold this deployment's marker and refuse
    /// another deployment's ([`crate::deployment`]). Off only for a mailbox
    /// no other deployment can reach (the demo's read-only fixture).
    pub deployment_marker: bool,
    /// Longest wait between retries after transient errors (the back-off cap).
    pub retry_backoff_max: Duration,
    /// A mailbox without a successful sync for this long gets an Error alert
    /// and is named by `/readyz` (it keeps retrying).
    pub stall_alert_after: Duration,
    /// The deprecated `max_transient_failures`, if set: accepted so old
    /// configs load, otherwise ignored (transient errors never disable a
    /// mailbox any more); the daemon logs a deprecation warning.
    pub max_transient_failures: Option<u32>,
    /// The file the profile password came from, watched so a disabled mailbox
    /// is re-enabled when it changes.
    pub password_file: Option<PathBuf>,
    /// Cycles a message the server lists but will not deliver is tried before
    /// it is quarantined (IMAP; the position never skips it silently).
    pub missing_message_retries: u32,
    /// SMTP submission (`imap_smtp`, `pop3_smtp`); `None` for other types.
    pub smtp: Option<SmtpSettings>,
    /// Microsoft Graph (`exchange_online`); `None` for other types.
    pub graph: Option<GraphProfile>,
}

/// Folder-level tracking: mail in `folder` is regarding `regarding`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FolderRule {
    pub folder: String,
    pub regarding: RecordRef,
}

/// Which emails are tracked (the user's "Track" option in Dynamics). Mail
/// that correlates to tracked email (a response) is tracked under every
/// filter but `none`; mail in a tracked folder under every filter (see
/// [`crate::filter::track_verdict`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrackFilter {
    /// All email messages.
    All,
    /// Only responses to tracked email (the message must correlate).
    /// `responses_only` is the deprecated spelling.
    ResponsesToCrmEmail,
    /// Responses, and mail whose sender resolves to a contact, account or lead.
    FromCrmRecords,
    /// Responses, and mail whose sender resolves to an email-enabled record
    /// of any kind of the party order.
    FromEmailEnabledRecords,
    /// Nothing is tracked (only mail the user files into a tracked folder).
    None,
}

impl TrackFilter {
    /// The configuration spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            TrackFilter::All => "all",
            TrackFilter::ResponsesToCrmEmail => "responses_to_crm_email",
            TrackFilter::FromCrmRecords => "from_crm_records",
            TrackFilter::FromEmailEnabledRecords => "from_email_enabled_records",
            TrackFilter::None => "none",
        }
    }

    /// Whether the filter needs the sender resolved before it can decide.
    pub fn needs_sender(self) -> bool {
        matches!(
            self,
            TrackFilter::FromCrmRecords | TrackFilter::FromEmailEnabledRecords
        )
    }
}

/// A validated mailbox.
#[derive(Debug, Clone)]
pub struct Mailbox {
    pub name: String,
    pub profile: String,
    pub email: String,
    pub owner_kind: OwnerKind,
    pub owner_id: String,
    /// User number for tracking tokens.
    pub user_number: u32,
    pub incoming: IncomingDelivery,
    pub outgoing: Delivery,
    pub act: Delivery,
    pub approval: ApprovalStatus,
    pub enabled: bool,
    /// Maildir root, for `maildir` profiles.
    pub path: Option<PathBuf>,
    pub username: Option<String>,
    pub secret: Option<Secret>,
    /// OAuth2 access token file (overrides the profile's credentials).
    pub token_file: Option<PathBuf>,
    /// Expiry of this mailbox's static or bare-file token.
    pub token_expires_at: Option<crate::model::UnixTime>,
    /// The file this mailbox's password came from (watched, see [`Profile::password_file`]).
    pub password_file: Option<PathBuf>,
    pub tracked_folders: Vec<FolderRule>,
    /// Folders synced besides INBOX and the tracked folders.
    pub extra_folders: Vec<String>,
    pub delete_after_processing: bool,
    pub track: TrackFilter,
    /// What happens to automatic mail (`automatic_mail`).
    pub automatic_mail: crate::filter::AutomaticMailPolicy,
    /// Most emails this mailbox sends per minute (a runaway CRM workflow
    /// cannot flood its recipients).
    pub send_rate_per_minute: u32,
}

/// The whole validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub source: Option<PathBuf>,
    pub daemon: DaemonSettings,
    pub admin: AdminSettings,
    pub correlation: CorrelationSettings,
    /// Only approved mailboxes process mail (Dynamics default: on).
    pub process_only_approved: bool,
    pub profiles: Vec<Profile>,
    pub mailboxes: Vec<Mailbox>,
    /// `[crm]`: the CRM adapter, delivery and party resolution.
    pub crm: CrmSettings,
    /// `[outgoing]`: attachment policy of outgoing email.
    pub outgoing: OutgoingSettings,
}

impl Config {
    /// The profile a mailbox uses. Validation guarantees it exists.
    pub fn profile_of(&self, mailbox: &Mailbox) -> Option<&Profile> {
        self.profiles.iter().find(|p| p.name == mailbox.profile)
    }

    /// Each profile's mailboxes, by name (what the profile alert counts).
    pub fn profile_members(&self) -> HashMap<String, Vec<String>> {
        let mut members: HashMap<String, Vec<String>> = HashMap::new();
        for m in &self.mailboxes {
            members
                .entry(m.profile.clone())
                .or_default()
                .push(m.name.clone());
        }
        members
    }

    /// Path of the embedded store.
    pub fn store_path(&self) -> PathBuf {
        self.daemon.state_dir.join("store")
    }

    /// Where raw bytes of quarantined messages are kept.
    pub fn quarantine_dir(&self) -> PathBuf {
        self.daemon.state_dir.join("quarantine")
    }
}

/// Loads, merges environment overrides into, and validates a configuration file.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    load_with_env(path, std::env::vars())
}

/// As [`load`], with the environment given explicitly (for tests).
pub fn load_with_env(
    path: &Path,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            path: String::new(),
            message: format!("cannot read {}: {e}", path.display()),
        }])
    })?;
    let base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut cfg = from_toml_str(&text, env, &base_dir)?;
    cfg.source = Some(path.to_path_buf());
    Ok(cfg)
}

/// Parses and validates TOML text. Relative paths in the file are taken relative
/// to the current directory (how operators and the README run it); `base_dir`
/// is only used to find `*_file` secrets that do not exist relative to it.
pub fn from_toml_str(
    text: &str,
    env: impl IntoIterator<Item = (String, String)>,
    base_dir: &Path,
) -> Result<Config, ConfigErrors> {
    let mut root: Value = toml_to_json(text)?;
    apply_env_overrides(&mut root, env);
    validate(&root, base_dir)
}

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// Default store page cache, a quarter of sled's own 1 GiB. Not smaller: sled
/// 0.34 pages out by allocating a replacement page and deferring the old one
/// to epoch reclamation, so a cache below the working set churns and grows
/// the process (a 98,000-message Maildir sync peaked at 345 MB RSS with 256,
/// 398 MB with 1024 and over 860 MB with 64).
pub const DEFAULT_STORE_CACHE_MB: u64 = 256;

fn validate(root: &Value, base_dir: &Path) -> Result<Config, ConfigErrors> {
    let mut errs = Errors::default();
    let mut top = Table::new(String::new(), Some(root), &mut errs);

    // [daemon]
    let mut d = top.sub("daemon", &mut errs);
    let state_dir = PathBuf::from(
        d.string("state_dir", &mut errs)
            .unwrap_or_else(|| "./data".into()),
    );
    let log_format = d.choice(
        "log_format",
        LogFormat::Auto,
        &[
            ("auto", LogFormat::Auto),
            ("pretty", LogFormat::Pretty),
            ("json", LogFormat::Json),
        ],
        &mut errs,
    );
    let log_level = d
        .string("log_level", &mut errs)
        .unwrap_or_else(|| "info".into());
    if tracing_subscriber::EnvFilter::try_new(&log_level).is_err() {
        errs.push(
            "daemon.log_level",
            format!("invalid log filter {log_level:?}"),
        );
    }
    let shutdown_grace = d.duration("shutdown_grace", SECS(30), SECS(1), SECS(600), &mut errs);
    let stuck_after = d.duration("stuck_after", SECS(900), SECS(10), SECS(86_400), &mut errs);
    let store_cache_mb = d.int(
        "store_cache_mb",
        DEFAULT_STORE_CACHE_MB as i64,
        8,
        65_536,
        &mut errs,
    ) as u64;
    let deployment_id = d.string("deployment_id", &mut errs);
    if let Some(id) = &deployment_id {
        if !crate::deployment::valid_id(id) {
            errs.push(
                "daemon.deployment_id",
                format!("{id:?} is not a deployment id: 8 to 64 letters, digits, '.', '_' or '-' (or leave it out to have one generated)"),
            );
        }
    }
    let marker_check_every = d.duration(
        "marker_check_every",
        SECS(600),
        SECS(1),
        SECS(86_400),
        &mut errs,
    );
    let resolved_alert_retention = d.duration(
        "resolved_alert_retention",
        crate::store::DEFAULT_RESOLVED_ALERT_RETENTION,
        SECS(3_600),
        SECS(3_650 * 86_400),
        &mut errs,
    );
    let resolved_alerts_kept = d.int(
        "resolved_alerts_kept",
        crate::store::DEFAULT_RESOLVED_ALERTS_KEPT as i64,
        100,
        10_000_000,
        &mut errs,
    ) as u64;
    d.finish(&mut errs);
    let daemon = DaemonSettings {
        state_dir,
        log_format,
        log_level,
        shutdown_grace,
        stuck_after,
        store_cache_mb,
        deployment_id,
        marker_check_every,
        resolved_alert_retention,
        resolved_alerts_kept,
    };

    // [admin]
    let mut a = top.sub("admin", &mut errs);
    let enabled = a.bool("enabled", true, &mut errs);
    let listen_s = a
        .string("listen", &mut errs)
        .unwrap_or_else(|| "127.0.0.1:8025".into());
    let listen = match listen_s.parse::<SocketAddr>() {
        Ok(l) => l,
        Err(_) => {
            errs.push(
                "admin.listen",
                format!("{listen_s:?} is not an address like 127.0.0.1:8025"),
            );
            SocketAddr::from(([127, 0, 0, 1], 8025))
        }
    };
    let allow_remote = a.bool("allow_remote", false, &mut errs);
    if !listen.ip().is_loopback() && !allow_remote {
        errs.push("admin.listen", format!("{listen} is not a loopback address; set admin.allow_remote = true to expose the admin API"));
    }
    let token = secret(
        &mut a,
        "token",
        "token_file",
        "token_env",
        base_dir,
        &mut errs,
    );
    if enabled && token.is_none() {
        errs.push(
            "admin.token",
            "is required when the admin API is enabled (token, token_file or token_env)",
        );
    }
    if let Some(t) = &token {
        if t.expose().len() < 12 {
            errs.push("admin.token", "must be at least 12 characters");
        }
    }
    a.finish(&mut errs);
    let admin = AdminSettings {
        enabled,
        listen,
        token,
    };

    // [correlation]
    let correlation = correlation_settings(top.sub("correlation", &mut errs), base_dir, &mut errs);

    // `process_email_only_for_approved` is the (and Dynamics')
    // longer name; either works, the longer one wins when both are given.
    let process_only_approved = top.bool("process_only_approved", true, &mut errs);
    let process_only_approved = top.bool(
        "process_email_only_for_approved",
        process_only_approved,
        &mut errs,
    );

    // [crm]
    let crm = crm_settings(top.sub("crm", &mut errs), base_dir, &mut errs);

    // [outgoing]
    let outgoing = outgoing::outgoing_settings(top.sub("outgoing", &mut errs), &mut errs);

    // [[profiles]]
    let mut profiles = Vec::new();
    let mut profile_names: HashMap<String, usize> = HashMap::new();
    for (i, v) in top.array("profiles", &mut errs).into_iter().enumerate() {
        let path = format!("profiles[{i}]");
        if let Some(p) = profile(
            Table::new(path.clone(), Some(v), &mut errs),
            base_dir,
            &mut errs,
        ) {
            if profile_names.insert(p.name.clone(), i).is_some() {
                errs.push(
                    format!("{path}.name"),
                    format!("duplicate profile name {:?}", p.name),
                );
            }
            profiles.push(p);
        }
    }

    // [[mailboxes]]
    let mut mailboxes = Vec::new();
    let mut mailbox_names = HashSet::new();
    let raw_mailboxes = top.array("mailboxes", &mut errs);
    if raw_mailboxes.is_empty() {
        errs.push("mailboxes", "at least one mailbox is required");
    }
    for (i, v) in raw_mailboxes.into_iter().enumerate() {
        let path = format!("mailboxes[{i}]");
        if let Some(m) = mailbox(
            Table::new(path.clone(), Some(v), &mut errs),
            &profiles,
            &correlation,
            base_dir,
            &mut errs,
        ) {
            if !mailbox_names.insert(m.name.clone()) {
                errs.push(
                    format!("{path}.name"),
                    format!("duplicate mailbox name {:?}", m.name),
                );
            }
            mailboxes.push(m);
        }
    }
    top.finish(&mut errs);

    if errs.0.is_empty() {
        Ok(Config {
            source: None,
            daemon,
            admin,
            correlation,
            process_only_approved,
            profiles,
            mailboxes,
            crm,
            outgoing,
        })
    } else {
        Err(ConfigErrors(errs.0))
    }
}

/// Summary of a valid configuration, for `check-config`.
pub fn summary(cfg: &Config) -> BTreeMap<&'static str, String> {
    let mut m = BTreeMap::new();
    m.insert("profiles", cfg.profiles.len().to_string());
    m.insert("mailboxes", cfg.mailboxes.len().to_string());
    m.insert("state_dir", cfg.daemon.state_dir.display().to_string());
    m.insert(
        "admin",
        if cfg.admin.enabled {
            cfg.admin.listen.to_string()
        } else {
            "disabled".into()
        },
    );
    m
}

#[cfg(test)]
mod tests;
