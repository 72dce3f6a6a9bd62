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

/// A secret value (password, token). Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The secret itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

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
}

/// Folder-level tracking: mail in `folder` is regarding `regarding`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FolderRule {
    pub folder: String,
    pub regarding: RecordRef,
}

/// Which incoming emails are tracked (the user's "Track" option).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrackFilter {
    /// All email messages.
    All,
    /// Only responses to tracked email (the message must correlate).
    ResponsesOnly,
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
}

impl Config {
    /// The profile a mailbox uses. Validation guarantees it exists.
    pub fn profile_of(&self, mailbox: &Mailbox) -> Option<&Profile> {
        self.profiles.iter().find(|p| p.name == mailbox.profile)
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

fn toml_to_json(text: &str) -> Result<Value, ConfigErrors> {
    let built = config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Toml))
        .build()
        .and_then(|c| c.try_deserialize::<Value>());
    built.map_err(|e| {
        ConfigErrors(vec![ConfigError {
            path: String::new(),
            message: format!("TOML syntax error: {e}"),
        }])
    })
}

/// Applies `CRM_MAILSYNC__SECTION__KEY=value` overrides. Array entries are addressed
/// by index (`CRM_MAILSYNC__MAILBOXES__0__PASSWORD_FILE`). Values stay strings: a
/// password `007` must not become the number 7; the typed readers (bool, int,
/// duration, threshold) parse strings themselves.
fn apply_env_overrides(root: &mut Value, env: impl IntoIterator<Item = (String, String)>) {
    let prefix = format!("{ENV_PREFIX}__");
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(&prefix))
        .collect();
    vars.sort();
    for (key, raw) in vars {
        let parts: Vec<String> = key[prefix.len()..]
            .split("__")
            .map(|p| p.to_ascii_lowercase())
            .collect();
        if parts.iter().any(|p| p.is_empty()) {
            continue;
        }
        set_path(root, &parts, Value::String(raw));
    }
}

fn set_path(node: &mut Value, parts: &[String], value: Value) {
    let Some((first, rest)) = parts.split_first() else {
        *node = value;
        return;
    };
    if let Value::Array(items) = node {
        if let Ok(i) = first.parse::<usize>() {
            if let Some(item) = items.get_mut(i) {
                set_path(item, rest, value);
            }
        }
        return;
    }
    if !node.is_object() {
        *node = Value::Object(Map::new());
    }
    if let Value::Object(map) = node {
        let child = map.entry(first.clone()).or_insert(Value::Null);
        set_path(child, rest, value);
    }
}

/// Collects errors while reading one table; reports unknown keys at `finish`.
struct Table<'a> {
    path: String,
    map: Option<&'a Map<String, Value>>,
    used: HashSet<&'static str>,
}

/// Errors collected across the whole validation.
#[derive(Default)]
struct Errors(Vec<ConfigError>);

impl Errors {
    fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigError {
            path: path.into(),
            message: message.into(),
        });
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

impl<'a> Table<'a> {
    fn new(path: String, value: Option<&'a Value>, errs: &mut Errors) -> Self {
        let map = match value {
            None | Some(Value::Null) => None,
            Some(Value::Object(m)) => Some(m),
            Some(_) => {
                errs.push(path.clone(), "expected a table");
                None
            }
        };
        Table {
            path,
            map,
            used: HashSet::new(),
        }
    }

    fn raw(&mut self, key: &'static str) -> Option<&'a Value> {
        self.used.insert(key);
        self.map.and_then(|m| m.get(key)).filter(|v| !v.is_null())
    }

    fn key(&self, key: &str) -> String {
        join(&self.path, key)
    }

    fn string(&mut self, key: &'static str, errs: &mut Errors) -> Option<String> {
        match self.raw(key)? {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            other => {
                errs.push(
                    self.key(key),
                    format!("expected a string, found {}", kind_of(other)),
                );
                None
            }
        }
    }

    fn nonempty_string(&mut self, key: &'static str, errs: &mut Errors) -> Option<String> {
        let s = self.string(key, errs)?;
        if s.trim().is_empty() {
            errs.push(self.key(key), "must not be empty");
            return None;
        }
        Some(s)
    }

    fn required_string(&mut self, key: &'static str, errs: &mut Errors) -> Option<String> {
        if self.raw(key).is_none() {
            errs.push(self.key(key), "is required");
            return None;
        }
        self.nonempty_string(key, errs)
    }

    fn bool(&mut self, key: &'static str, default: bool, errs: &mut Errors) -> bool {
        match self.raw(key) {
            None => default,
            Some(Value::Bool(b)) => *b,
            Some(Value::String(s)) if s == "true" || s == "false" => s == "true",
            Some(other) => {
                errs.push(
                    self.key(key),
                    format!("expected true or false, found {}", kind_of(other)),
                );
                default
            }
        }
    }

    fn int(
        &mut self,
        key: &'static str,
        default: i64,
        min: i64,
        max: i64,
        errs: &mut Errors,
    ) -> i64 {
        let v = match self.raw(key) {
            None => return default,
            Some(Value::Number(n)) => n.as_i64(),
            Some(Value::String(s)) => s.trim().parse::<i64>().ok(),
            Some(_) => None,
        };
        match v {
            Some(i) if (min..=max).contains(&i) => i,
            Some(i) => {
                errs.push(self.key(key), format!("{i} is out of range {min}..={max}"));
                default
            }
            None => {
                errs.push(self.key(key), "expected a whole number");
                default
            }
        }
    }

    fn duration(
        &mut self,
        key: &'static str,
        default: Duration,
        min: Duration,
        max: Duration,
        errs: &mut Errors,
    ) -> Duration {
        let parsed = match self.raw(key) {
            None => return default,
            Some(Value::Number(n)) => n
                .as_u64()
                .map(Duration::from_secs)
                .ok_or_else(|| "expected a positive number of seconds".to_string()),
            Some(Value::String(s)) => humantime::parse_duration(s.trim())
                .map_err(|e| format!("invalid duration {s:?} ({e}); use e.g. \"30s\", \"5m\"")),
            Some(other) => Err(format!(
                "expected a duration like \"5m\", found {}",
                kind_of(other)
            )),
        };
        match parsed {
            Ok(d) if d >= min && d <= max => d,
            Ok(d) => {
                errs.push(
                    self.key(key),
                    format!(
                        "{} is out of range {}..={}",
                        humantime::format_duration(d),
                        humantime::format_duration(min),
                        humantime::format_duration(max)
                    ),
                );
                default
            }
            Err(m) => {
                errs.push(self.key(key), m);
                default
            }
        }
    }

    fn choice<T: Copy>(
        &mut self,
        key: &'static str,
        default: T,
        options: &[(&str, T)],
        errs: &mut Errors,
    ) -> T {
        let Some(s) = self.string(key, errs) else {
            return default;
        };
        match options.iter().find(|(name, _)| *name == s) {
            Some((_, v)) => *v,
            None => {
                let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
                errs.push(
                    self.key(key),
                    format!("unknown value {s:?}; expected one of {}", names.join(", ")),
                );
                default
            }
        }
    }

    fn array(&mut self, key: &'static str, errs: &mut Errors) -> Vec<&'a Value> {
        match self.raw(key) {
            None => Vec::new(),
            Some(Value::Array(a)) => a.iter().collect(),
            Some(other) => {
                errs.push(
                    self.key(key),
                    format!("expected an array, found {}", kind_of(other)),
                );
                Vec::new()
            }
        }
    }

    fn string_list(&mut self, key: &'static str, errs: &mut Errors) -> Vec<String> {
        let path = self.key(key);
        let mut out = Vec::new();
        for (i, v) in self.array(key, errs).into_iter().enumerate() {
            match v {
                Value::String(s) => out.push(s.clone()),
                other => errs.push(
                    format!("{path}[{i}]"),
                    format!("expected a string, found {}", kind_of(other)),
                ),
            }
        }
        out
    }

    fn sub(&mut self, key: &'static str, errs: &mut Errors) -> Table<'a> {
        let v = self.raw(key);
        Table::new(self.key(key), v, errs)
    }

    /// Reports keys nobody asked for: typos must not pass silently.
    fn finish(self, errs: &mut Errors) {
        if let Some(map) = self.map {
            let mut unknown: Vec<&String> = map
                .keys()
                .filter(|k| !self.used.contains(k.as_str()))
                .collect();
            unknown.sort();
            for k in unknown {
                errs.push(join(&self.path, k), "unknown key");
            }
        }
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "a table",
    }
}

/// Reads a secret given inline (`key`), from a file (`key_file`) or from an
/// environment variable (`key_env`); at most one of the three.
fn secret(
    t: &mut Table<'_>,
    key: &'static str,
    file_key: &'static str,
    env_key: &'static str,
    base_dir: &Path,
    errs: &mut Errors,
) -> Option<Secret> {
    let inline = t.string(key, errs);
    let file = t.string(file_key, errs);
    let env = t.string(env_key, errs);
    let given = [inline.is_some(), file.is_some(), env.is_some()]
        .iter()
        .filter(|b| **b)
        .count();
    if given > 1 {
        errs.push(
            t.key(key),
            format!("give only one of {key}, {file_key}, {env_key}"),
        );
        return None;
    }
    if let Some(s) = inline {
        return Some(Secret::new(s));
    }
    if let Some(f) = file {
        return match read_secret_file(&secret_path(&f, base_dir)) {
            Ok(s) => Some(s),
            Err(e) => {
                errs.push(t.key(file_key), e);
                None
            }
        };
    }
    if let Some(var) = env {
        return match std::env::var(&var) {
            Ok(s) if !s.is_empty() => Some(Secret::new(s)),
            _ => {
                errs.push(
                    t.key(env_key),
                    format!("environment variable {var} is not set or empty"),
                );
                None
            }
        };
    }
    None
}

/// Where a `password_file` value points: as given, else relative to the
/// config file's directory.
fn secret_path(f: &str, base_dir: &Path) -> PathBuf {
    let p = PathBuf::from(f);
    if p.is_relative() && !p.exists() {
        base_dir.join(f)
    } else {
        p
    }
}

/// The resolved `password_file` of a table (already validated by [`secret`]).
fn secret_file_of(t: &mut Table<'_>, file_key: &'static str, base_dir: &Path) -> Option<PathBuf> {
    match t.raw(file_key) {
        Some(Value::String(f)) => Some(secret_path(f, base_dir)),
        _ => None,
    }
}

/// Reads a secret file (`password_file`): the content without its trailing
/// line break. Also used to pick up a changed password without a restart.
pub fn read_secret_file(p: &Path) -> Result<Secret, String> {
    match std::fs::read_to_string(p) {
        Ok(s) if !s.trim().is_empty() => {
            Ok(Secret::new(s.trim_end_matches(['\r', '\n']).to_string()))
        }
        Ok(_) => Err(format!("{} is empty", p.display())),
        Err(e) => Err(format!("cannot read {}: {e}", p.display())),
    }
}

/// Reads `token_file` (an OAuth2 token re-read before every login; checked
/// here so a typo fails at startup) and `token_expires_at` (RFC 3339).
fn token_source(
    t: &mut Table<'_>,
    has_secret: bool,
    base_dir: &Path,
    errs: &mut Errors,
) -> (Option<PathBuf>, Option<crate::model::UnixTime>) {
    let file = t.string("token_file", errs).map(|f| {
        let p = PathBuf::from(&f);
        if p.is_relative() && !p.exists() && base_dir.join(&f).exists() {
            base_dir.join(&f)
        } else {
            p
        }
    });
    if let Some(p) = &file {
        if has_secret {
            errs.push(
                t.key("token_file"),
                "give either token_file or password/password_file/password_env",
            );
        } else if let Err(e) = crate::connector::oauth::TokenFile::new(p, None).read() {
            errs.push(t.key("token_file"), e.detail);
        }
    }
    let expires =
        t.string("token_expires_at", errs).and_then(
            |s| match chrono::DateTime::parse_from_rfc3339(&s) {
                Ok(d) => Some(d.timestamp()),
                Err(_) => {
                    errs.push(
                        t.key("token_expires_at"),
                        format!("{s:?} is not an RFC 3339 time like 2026-01-31T12:00:00Z"),
                    );
                    None
                }
            },
        );
    (file, expires)
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
    d.finish(&mut errs);
    let daemon = DaemonSettings {
        state_dir,
        log_format,
        log_level,
        shutdown_grace,
        stuck_after,
        store_cache_mb,
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

    let process_only_approved = top.bool("process_only_approved", true, &mut errs);

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
        })
    } else {
        Err(ConfigErrors(errs.0))
    }
}

fn correlation_settings(
    mut c: Table<'_>,
    base_dir: &Path,
    errs: &mut Errors,
) -> CorrelationSettings {
    let mut s = CorrelationSettings::default();
    let names: Vec<(&str, CorrelationMethod)> = [
        CorrelationMethod::Folder,
        CorrelationMethod::InReplyTo,
        CorrelationMethod::TrackingToken,
        CorrelationMethod::ConversationIndex,
        CorrelationMethod::SmartMatching,
    ]
    .iter()
    .map(|m| (m.as_str(), *m))
    .collect();
    let path = c.key("order");
    let order = c.string_list("order", errs);
    if !order.is_empty() {
        let mut seen = HashSet::new();
        let mut parsed = Vec::new();
        for (i, name) in order.iter().enumerate() {
            match names.iter().find(|(n, _)| n == name) {
                Some((_, m)) if seen.insert(*m) => parsed.push(*m),
                Some(_) => errs.push(format!("{path}[{i}]"), format!("{name:?} is listed twice")),
                None => {
                    let all: Vec<&str> = names.iter().map(|(n, _)| *n).collect();
                    errs.push(
                        format!("{path}[{i}]"),
                        format!(
                            "unknown method {name:?}; expected one of {}",
                            all.join(", ")
                        ),
                    );
                }
            }
        }
        s.order = parsed;
    }
    // `smart_matching = true` (short form) or a `[correlation.smart_matching]` table.
    let short_form = match c.map.and_then(|m| m.get("smart_matching")) {
        Some(Value::Bool(_)) => true,
        // An environment override is a string.
        Some(Value::String(s)) => s == "true" || s == "false",
        _ => false,
    };
    if short_form {
        s.smart_matching = c.bool("smart_matching", s.smart_matching, errs);
    } else {
        let mut sm = c.sub("smart_matching", errs);
        s.smart_matching = sm.bool("enabled", s.smart_matching, errs);
        s.smart = smart_settings(&mut sm, errs);
        sm.finish(errs);
    }
    s.max_tracked_folders = c.int(
        "max_tracked_folders",
        s.max_tracked_folders as i64,
        1,
        1000,
        errs,
    ) as usize;
    let mut tt = c.sub("tracking_token", errs);
    tracking_token_settings(&mut tt, base_dir, &mut s, errs);
    tt.finish(errs);
    c.finish(errs);
    s
}

fn smart_settings(t: &mut Table<'_>, errs: &mut Errors) -> SmartSettings {
    let d = SmartSettings::default();
    let mode = t.choice(
        "mode",
        d.mode,
        &[
            ("dynamics", SmartMode::Dynamics),
            ("scored", SmartMode::Scored),
        ],
        errs,
    );
    let threshold = match t.raw("threshold") {
        None => d.threshold,
        Some(Value::Number(n)) => match n.as_f64() {
            Some(x) if (0.0..=1.0).contains(&x) => x as f32,
            _ => {
                errs.push(t.key("threshold"), format!("{n} is out of range 0..=1"));
                d.threshold
            }
        },
        // An environment override is a string.
        Some(Value::String(s)) => match s.trim().parse::<f64>() {
            Ok(x) if (0.0..=1.0).contains(&x) => x as f32,
            _ => {
                errs.push(
                    t.key("threshold"),
                    format!("{s:?} is not a number between 0 and 1"),
                );
                d.threshold
            }
        },
        Some(other) => {
            errs.push(
                t.key("threshold"),
                format!(
                    "expected a number between 0 and 1, found {}",
                    kind_of(other)
                ),
            );
            d.threshold
        }
    };
    SmartSettings {
        mode,
        threshold,
        window_days: t.int("window_days", i64::from(d.window_days), 1, 3650, errs) as u32,
        hash_max_count: t.int("hash_max_count", d.hash_max_count as i64, 1, 100, errs) as usize,
        hash_delta_subject_count: t.int(
            "hash_delta_subject_count",
            d.hash_delta_subject_count as i64,
            0,
            100,
            errs,
        ) as usize,
        hash_min_address_count: t.int(
            "hash_min_address_count",
            d.hash_min_address_count as i64,
            0,
            100,
            errs,
        ) as usize,
    }
}

fn tracking_token_settings(
    t: &mut Table<'_>,
    base_dir: &Path,
    s: &mut CorrelationSettings,
    errs: &mut Errors,
) {
    let d = TokenSettings::default();
    let prefix = t.string("prefix", errs).unwrap_or(d.prefix);
    let base_number = t.int(
        "base_number",
        i64::from(d.base_number),
        0,
        i64::from(token::MAX_BASE_NUMBER),
        errs,
    ) as u32;
    let user_digits = t.int("user_digits", i64::from(d.user_digits), 1, 10, errs) as u8;
    let counter_digits = t.int("counter_digits", i64::from(d.counter_digits), 1, 9, errs) as u8;
    let previous_prefixes = t.string_list("previous_prefixes", errs);
    let signing = t.string("signing_key_file", errs).and_then(|f| {
        let mut p = PathBuf::from(&f);
        if p.is_relative() && !p.exists() {
            p = base_dir.join(&f);
        }
        match std::fs::read_to_string(&p) {
            Ok(text) => {
                // First line: the current key; further lines: retired keys still accepted.
                let mut keys = text
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(|l| l.as_bytes().to_vec());
                let current = keys.next().unwrap_or_default();
                if current.len() < token::MIN_KEY_LEN {
                    errs.push(
                        t.key("signing_key_file"),
                        format!(
                            "{}: the key must be at least {} bytes",
                            p.display(),
                            token::MIN_KEY_LEN
                        ),
                    );
                    return None;
                }
                Some(token::SigningKey {
                    current,
                    previous: keys.collect(),
                })
            }
            Err(e) => {
                errs.push(
                    t.key("signing_key_file"),
                    format!("cannot read {}: {e}", p.display()),
                );
                None
            }
        }
    });
    s.require_signature = t.bool("require_signature", false, errs);
    if s.require_signature && signing.is_none() {
        errs.push(t.key("require_signature"), "needs signing_key_file");
    }
    s.token = TokenSettings {
        prefix,
        base_number,
        user_digits,
        counter_digits,
        previous_prefixes,
        signing,
    };
    // The token module names the field in each problem ("prefix: …").
    for problem in s.token.validate() {
        let (field, msg) = problem.split_once(": ").unwrap_or(("", problem.as_str()));
        let path = if field.is_empty() {
            t.path.clone()
        } else if field.starts_with("signing") {
            t.key("signing_key_file")
        } else {
            t.key(field)
        };
        errs.push(path, msg.to_string());
    }
}

fn profile(mut t: Table<'_>, base_dir: &Path, errs: &mut Errors) -> Option<Profile> {
    let _ = base_dir;
    let name = t.required_string("name", errs);
    let kind_s = t.required_string("type", errs);
    let kind = kind_s.as_deref().and_then(|k| {
        let parsed = ProfileType::parse(k);
        if parsed.is_none() {
            errs.push(t.key("type"), format!("unknown profile type {k:?}; expected one of exchange_online, exchange_server, imap_smtp, pop3_smtp, maildir"));
        }
        parsed
    });
    let host = t.nonempty_string("host", errs);
    let port_i = t.int("port", 0, 0, 65_535, errs);
    let tls = t.choice(
        "tls",
        TlsMode::StartTls,
        &[
            ("implicit", TlsMode::Implicit),
            ("starttls", TlsMode::StartTls),
            ("plain", TlsMode::Plain),
        ],
        errs,
    );
    let allow_insecure = t.bool("allow_insecure", false, errs);
    if tls == TlsMode::Plain && !allow_insecure {
        errs.push(
            t.key("tls"),
            "\"plain\" sends passwords unencrypted; set allow_insecure = true to allow it",
        );
    }
    let ca_file = t.string("ca_file", errs).map(PathBuf::from);
    if let Some(ca) = &ca_file {
        if !ca.exists() {
            errs.push(t.key("ca_file"), format!("{} does not exist", ca.display()));
        }
    }
    let tls_server_name = t.nonempty_string("tls_server_name", errs);
    let auth = t.choice(
        "auth",
        AuthKind::Password,
        &[
            ("password", AuthKind::Password),
            ("oauth2", AuthKind::OAuth2),
        ],
        errs,
    );
    let username = t.nonempty_string("username", errs);
    let secret = secret(
        &mut t,
        "password",
        "password_file",
        "password_env",
        base_dir,
        errs,
    );
    let password_file = secret_file_of(&mut t, "password_file", base_dir);
    let (token_file, token_expires_at) = token_source(&mut t, secret.is_some(), base_dir, errs);
    if auth != AuthKind::OAuth2 && (token_file.is_some() || token_expires_at.is_some()) {
        errs.push(
            t.key(if token_file.is_some() {
                "token_file"
            } else {
                "token_expires_at"
            }),
            "is for OAuth2 tokens; set auth = \"oauth2\" or remove it",
        );
    }
    let token_expiry_warning = t.duration(
        "token_expiry_warning",
        SECS(7 * 86_400),
        SECS(0),
        SECS(365 * 86_400),
        errs,
    );
    let poll_interval = t.duration("poll_interval", SECS(60), SECS(1), SECS(1440 * 60), errs);
    let max_conn = t.int("max_concurrent_connections", 10, 1, 300, errs) as u16;
    let connect_timeout = t.duration("connect_timeout", SECS(30), SECS(1), SECS(100), errs);
    let io_timeout = t.duration("io_timeout", SECS(120), SECS(1), SECS(3600), errs);
    let process_email_from = t.string("process_email_from", errs).and_then(|s| {
        let date_part = s.get(..10).unwrap_or(&s);
        match chrono::NaiveDate::parse_from_str(date_part, "%Y-%m-%d") {
            Ok(d) => Some(d),
            Err(_) => {
                errs.push(
                    t.key("process_email_from"),
                    format!("{s:?} is not a date like 2026-01-31"),
                );
                None
            }
        }
    });
    let move_failed_to = t.nonempty_string("move_failed_to", errs);
    let batch_size = t.int("batch_size", 200, 1, 10_000, errs) as usize;
    let max_message_size = t.int("max_message_size", 50 * 1024 * 1024, 1024, 1 << 34, errs) as u64;
    // Absent: the documented default for IMAP profiles (set below, once the
    // type is known); an empty string switches the keyword off.
    let keyword_given = t.raw("processed_keyword").is_some();
    let mut processed_keyword = t
        .string("processed_keyword", errs)
        .filter(|k| !k.trim().is_empty());
    if let Some(k) = &processed_keyword {
        if k.chars()
            .any(|c| c.is_whitespace() || "(){%*\"\\]".contains(c))
        {
            errs.push(
                t.key("processed_keyword"),
                format!("{k:?} is not a valid IMAP keyword"),
            );
        }
    }
    let idle = t.bool("idle", true, errs);
    let retry_backoff_max = t.duration("retry_backoff_max", SECS(900), SECS(1), SECS(86_400), errs);
    let stall_alert_after = t.duration(
        "stall_alert_after",
        SECS(3600),
        SECS(1),
        SECS(30 * 86_400),
        errs,
    );
    // Deprecated: still range-checked so a typo is reported, then ignored.
    let max_transient_failures = t
        .raw("max_transient_failures")
        .is_some()
        .then(|| t.int("max_transient_failures", 10, 1, 1000, errs) as u32);
    let missing_message_retries = t.int("missing_message_retries", 3, 1, 1000, errs) as u32;

    if let Some(kind) = kind {
        let needs_server = !matches!(kind, ProfileType::Maildir);
        if needs_server && host.is_none() {
            errs.push(
                t.key("host"),
                format!(
                    "is required for a {} profile",
                    kind_s.as_deref().unwrap_or("")
                ),
            );
        }
        if !needs_server && host.is_some() {
            errs.push(
                t.key("host"),
                "a maildir profile has no server; remove host",
            );
        }
        if matches!(
            kind,
            ProfileType::ExchangeOnline | ProfileType::ExchangeServer
        ) {
            errs.push(t.key("type"), "Exchange connectors are not available in this version; use imap_smtp with XOAUTH2 for Exchange Online");
        }
        if kind == ProfileType::ImapSmtp && !keyword_given {
            processed_keyword = Some(crate::connector::imap::CRM_KEYWORD.to_string());
        }
        if kind == ProfileType::Pop3Smtp && processed_keyword.is_some() {
            errs.push(
                t.key("processed_keyword"),
                "POP3 has no keywords; remove processed_keyword",
            );
        }
        if kind == ProfileType::Pop3Smtp && move_failed_to.is_some() {
            errs.push(
                t.key("move_failed_to"),
                "POP3 is email-only with no folders; remove move_failed_to",
            );
        }
    }
    let port = match (port_i, kind) {
        (0, Some(ProfileType::ImapSmtp)) => Some(if tls == TlsMode::Implicit { 993 } else { 143 }),
        (0, Some(ProfileType::Pop3Smtp)) => Some(if tls == TlsMode::Implicit { 995 } else { 110 }),
        (0, _) => None,
        (p, _) => Some(p as u16),
    };
    t.finish(errs);
    Some(Profile {
        name: name?,
        kind: kind?,
        host,
        port,
        tls,
        allow_insecure,
        ca_file,
        tls_server_name,
        auth,
        username,
        secret,
        token_file,
        token_expires_at,
        token_expiry_warning,
        poll_interval,
        max_concurrent_connections: max_conn,
        connect_timeout,
        io_timeout,
        process_email_from,
        move_failed_to,
        batch_size,
        max_message_size,
        processed_keyword,
        idle,
        retry_backoff_max,
        stall_alert_after,
        max_transient_failures,
        password_file,
        missing_message_retries,
    })
}

fn mailbox(
    mut t: Table<'_>,
    profiles: &[Profile],
    corr: &CorrelationSettings,
    base_dir: &Path,
    errs: &mut Errors,
) -> Option<Mailbox> {
    let name = t.required_string("name", errs);
    let profile_name = t.required_string("profile", errs);
    let profile = profile_name.as_ref().and_then(|n| {
        let p = profiles.iter().find(|p| &p.name == n);
        if p.is_none() {
            let known: Vec<&str> = profiles.iter().map(|p| p.name.as_str()).collect();
            errs.push(
                t.key("profile"),
                format!(
                    "no profile named {n:?} (known: {})",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            );
        }
        p
    });
    let email = t.required_string("email", errs);
    if let Some(e) = &email {
        if !looks_like_email(e) {
            errs.push(t.key("email"), format!("{e:?} is not an email address"));
        }
    }
    let owner_kind = t.choice(
        "owner_kind",
        OwnerKind::User,
        &[("user", OwnerKind::User), ("queue", OwnerKind::Queue)],
        errs,
    );
    let owner_id = t
        .string("owner_id", errs)
        .or_else(|| name.clone())
        .unwrap_or_default();
    let user_number = t.int("user_number", 0, 0, i64::from(u32::MAX), errs) as u32;
    let incoming = t.choice(
        "incoming",
        IncomingDelivery::ServerSideSync,
        &[
            ("none", IncomingDelivery::None),
            ("server_side_sync", IncomingDelivery::ServerSideSync),
            ("forward_mailbox", IncomingDelivery::ForwardMailbox),
        ],
        errs,
    );
    let deliveries = [
        ("none", Delivery::None),
        ("server_side_sync", Delivery::ServerSideSync),
    ];
    let outgoing = t.choice("outgoing", Delivery::None, &deliveries, errs);
    let act = t.choice("act", Delivery::None, &deliveries, errs);
    let approval = t.choice(
        "approval",
        ApprovalStatus::Empty,
        &[
            ("empty", ApprovalStatus::Empty),
            ("approved", ApprovalStatus::Approved),
            ("pending", ApprovalStatus::Pending),
            ("rejected", ApprovalStatus::Rejected),
        ],
        errs,
    );
    let enabled = t.bool("enabled", true, errs);
    let path = t.string("path", errs).map(PathBuf::from);
    let username = t.nonempty_string("username", errs);
    let errors_before_secret = errs.0.len();
    let secret = secret(
        &mut t,
        "password",
        "password_file",
        "password_env",
        base_dir,
        errs,
    );
    // A secret that was given but could not be read is already reported;
    // "a password is required" on top of it would only be noise.
    let secret_reported = errs.0.len() > errors_before_secret;
    let password_file = secret_file_of(&mut t, "password_file", base_dir);
    let (token_file, token_expires_at) = token_source(&mut t, secret.is_some(), base_dir, errs);
    if let Some(p) = profile.filter(|p| p.auth != AuthKind::OAuth2) {
        if token_file.is_some() || token_expires_at.is_some() {
            errs.push(
                t.key(if token_file.is_some() {
                    "token_file"
                } else {
                    "token_expires_at"
                }),
                format!(
                    "is for OAuth2 tokens; profile {:?} has auth = \"password\"",
                    p.name
                ),
            );
        }
    }
    let delete_after_processing = t.bool(
        "delete_after_processing",
        incoming == IncomingDelivery::ForwardMailbox,
        errs,
    );
    let track = t.choice(
        "track",
        TrackFilter::All,
        &[
            ("all", TrackFilter::All),
            ("responses_only", TrackFilter::ResponsesOnly),
        ],
        errs,
    );
    let extra_folders = t.string_list("folders", errs);
    let automatic_mail = automatic_mail(t.sub("automatic_mail", errs), errs);

    let mut tracked_folders = Vec::new();
    let tf_path = t.key("tracked_folders");
    for (i, v) in t.array("tracked_folders", errs).into_iter().enumerate() {
        let mut ft = Table::new(format!("{tf_path}[{i}]"), Some(v), errs);
        let folder = ft.required_string("folder", errs);
        let regarding =
            ft.required_string("regarding", errs)
                .and_then(|r| match r.parse::<RecordRef>() {
                    Ok(r) => Some(r),
                    Err(m) => {
                        errs.push(ft.key("regarding"), m);
                        None
                    }
                });
        ft.finish(errs);
        if let (Some(folder), Some(regarding)) = (folder, regarding) {
            if tracked_folders
                .iter()
                .any(|r: &FolderRule| r.folder == folder)
            {
                errs.push(
                    format!("{tf_path}[{i}].folder"),
                    format!("folder {folder:?} is tracked twice"),
                );
            }
            tracked_folders.push(FolderRule { folder, regarding });
        }
    }
    if tracked_folders.len() > corr.max_tracked_folders {
        errs.push(
            tf_path.clone(),
            format!(
                "{} tracked folders exceed the limit of {} (correlation.max_tracked_folders)",
                tracked_folders.len(),
                corr.max_tracked_folders
            ),
        );
    }

    if let Some(p) = profile {
        match p.kind {
            ProfileType::Maildir => {
                if path.is_none() {
                    errs.push(
                        t.key("path"),
                        "is required for a mailbox on a maildir profile",
                    );
                }
            }
            _ => {
                if path.is_some() {
                    errs.push(t.key("path"), "only maildir mailboxes have a path");
                }
                if username.is_none() && p.username.is_none() {
                    errs.push(
                        t.key("username"),
                        format!("is required (or set it on profile {:?})", p.name),
                    );
                }
                if secret.is_none()
                    && !secret_reported
                    && p.secret.is_none()
                    && token_file.is_none()
                    && p.token_file.is_none()
                {
                    let what = if p.auth == AuthKind::OAuth2 {
                        "an OAuth2 access token"
                    } else {
                        "a password"
                    };
                    let keys = if p.auth == AuthKind::OAuth2 {
                        "token_file, password, password_file or password_env"
                    } else {
                        "password, password_file or password_env"
                    };
                    errs.push(
                        t.key("password"),
                        format!(
                            "{what} is required: {keys} (here or on profile {:?})",
                            p.name
                        ),
                    );
                }
            }
        }
        if !p.kind.has_folders() {
            if !tracked_folders.is_empty() {
                errs.push(
                    tf_path.clone(),
                    "POP3 is email-only: folder tracking needs an IMAP or Exchange profile",
                );
            }
            if !extra_folders.is_empty() {
                errs.push(t.key("folders"), "POP3 has only the inbox: remove folders");
            }
        }
        if !p.kind.supports_act() && act != Delivery::None {
            errs.push(
                t.key("act"),
                format!(
                    "appointments, contacts and tasks need an Exchange profile; {:?} is email-only",
                    p.name
                ),
            );
        }
    }
    if owner_kind == OwnerKind::Queue && !tracked_folders.is_empty() {
        errs.push(tf_path, "folder tracking is for user mailboxes, not queues");
    }
    t.finish(errs);
    Some(Mailbox {
        name: name?,
        profile: profile_name?,
        email: email?,
        owner_kind,
        owner_id,
        user_number,
        incoming,
        outgoing,
        act,
        approval,
        enabled,
        path,
        username,
        secret,
        token_file,
        token_expires_at,
        password_file,
        tracked_folders,
        extra_folders,
        delete_after_processing,
        track,
        automatic_mail,
    })
}

/// `mailboxes[i].automatic_mail`: the action per class of automatic mail
/// that correlates to nothing, and the loop detector.
fn automatic_mail(mut t: Table<'_>, errs: &mut Errors) -> crate::filter::AutomaticMailPolicy {
    use crate::filter::{AutomaticAction, AutomaticMailPolicy};
    let d = AutomaticMailPolicy::default();
    let actions = [
        ("track", AutomaticAction::Track),
        ("track_no_reply", AutomaticAction::TrackNoReply),
        ("skip", AutomaticAction::Skip),
    ];
    let policy = AutomaticMailPolicy {
        auto_reply: t.choice("auto_reply", d.auto_reply, &actions, errs),
        bounce: t.choice("bounce", d.bounce, &actions, errs),
        bulk: t.choice("bulk", d.bulk, &actions, errs),
        list: t.choice("list", d.list, &actions, errs),
        loop_limit: t.int("loop_limit", i64::from(d.loop_limit), 1, 10_000, errs) as u32,
        loop_window: t
            .duration(
                "loop_window",
                Duration::from_secs(d.loop_window as u64),
                Duration::from_secs(60),
                Duration::from_secs(7 * 24 * 3600),
                errs,
            )
            .as_secs() as i64,
    };
    t.finish(errs);
    policy
}

/// A local part, `@` and a domain. A domain without a dot (`alice@localhost`,
/// `sales@crm`) is legal on internal networks.
fn looks_like_email(s: &str) -> bool {
    match s.rsplit_once('@') {
        Some((local, domain)) => {
            !local.is_empty() && !domain.is_empty() && !s.contains(char::is_whitespace)
        }
        None => false,
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
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigErrors> {
        from_toml_str(text, Vec::new(), Path::new("."))
    }

    const MINIMAL: &str = r#"
        [admin]
        token = "0123456789abcdef"
        [[profiles]]
        name = "local"
        type = "maildir"
        [[mailboxes]]
        name = "support"
        profile = "local"
        email = "support@example.test"
        path = "fixtures/demo-maildir"
    "#;

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let cfg = parse(MINIMAL).unwrap();
        assert_eq!(cfg.admin.listen.to_string(), "127.0.0.1:8025");
        assert_eq!(cfg.profiles[0].max_concurrent_connections, 10);
        assert_eq!(cfg.profiles[0].poll_interval, Duration::from_secs(60));
        assert_eq!(cfg.mailboxes[0].approval, ApprovalStatus::Empty);
        assert!(cfg.process_only_approved);
        assert_eq!(cfg.daemon.state_dir, PathBuf::from("./data"));
    }

    #[test]
    fn automatic_mail_actions_are_read_with_defaults_and_key_paths() {
        use crate::filter::{AutomaticAction, AutomaticMailPolicy};
        let cfg = parse(MINIMAL).unwrap();
        assert_eq!(
            cfg.mailboxes[0].automatic_mail,
            AutomaticMailPolicy::default()
        );
        let ok = format!(
            "{MINIMAL}\nautomatic_mail = {{ auto_reply = \"track_no_reply\", list = \"track\", loop_limit = 3, loop_window = \"10m\" }}\n"
        );
        let a = parse(&ok).unwrap().mailboxes[0].automatic_mail.clone();
        assert_eq!(a.auto_reply, AutomaticAction::TrackNoReply);
        assert_eq!(a.list, AutomaticAction::Track);
        assert_eq!(
            (a.bounce, a.bulk),
            (AutomaticAction::Skip, AutomaticAction::Skip)
        );
        assert_eq!((a.loop_limit, a.loop_window), (3, 600));
        let bad = format!(
            "{MINIMAL}\nautomatic_mail = {{ bulk = \"drop\", loop_limit = 0, loop_window = \"1s\", spam = \"skip\" }}\n"
        );
        let errs = parse(&bad).unwrap_err();
        let paths: Vec<&str> = errs.0.iter().map(|e| e.path.as_str()).collect();
        for p in [
            "mailboxes[0].automatic_mail.bulk",
            "mailboxes[0].automatic_mail.loop_limit",
            "mailboxes[0].automatic_mail.loop_window",
            "mailboxes[0].automatic_mail.spam",
        ] {
            assert!(paths.contains(&p), "{p} missing from {paths:?}");
        }
        assert!(
            errs.0[0].message.contains("track, track_no_reply, skip"),
            "{errs:?}"
        );
    }

    #[test]
    fn correlation_tables_are_read_and_every_error_has_its_key_path() {
        let ok = format!(
            "{MINIMAL}\n[correlation.smart_matching]\nenabled = true\nmode = \"dynamics\"\nhash_min_address_count = 3\n[correlation.tracking_token]\nprefix = \"TKT-\"\nuser_digits = 4\nprevious_prefixes = [\"CRM:\"]\n"
        );
        let cfg = parse(&ok).unwrap();
        assert!(cfg.correlation.smart_matching);
        assert_eq!(cfg.correlation.smart.mode, SmartMode::Dynamics);
        assert_eq!(cfg.correlation.smart.hash_min_address_count, 3);
        assert_eq!(cfg.correlation.token.prefix, "TKT-");
        assert_eq!(cfg.correlation.token.user_digits, 4);
        // The short form still works.
        let short = format!("{MINIMAL}\n[correlation]\nsmart_matching = true\n");
        assert!(parse(&short).unwrap().correlation.smart_matching);

        let bad = format!(
            "{MINIMAL}\n[correlation.smart_matching]\nmode = \"fuzzy\"\nthreshold = 1.5\nwindow_days = 0\n[correlation.tracking_token]\nprefix = \"\"\ncounter_digits = 12\nbase_number = -1\nprevious_prefixes = [\"X1\"]\nrequire_signature = true\nsigning_key_file = \"/nonexistent/key\"\ntypo = 1\n"
        );
        let errs = parse(&bad).unwrap_err();
        let paths: Vec<&str> = errs.0.iter().map(|e| e.path.as_str()).collect();
        for p in [
            "correlation.smart_matching.mode",
            "correlation.smart_matching.threshold",
            "correlation.smart_matching.window_days",
            "correlation.tracking_token.prefix",
            "correlation.tracking_token.counter_digits",
            "correlation.tracking_token.base_number",
            "correlation.tracking_token.previous_prefixes[0]",
            "correlation.tracking_token.signing_key_file",
            "correlation.tracking_token.require_signature",
            "correlation.tracking_token.typo",
        ] {
            assert!(paths.contains(&p), "{p} missing from {paths:?}");
        }
    }

    #[test]
    fn reports_every_error_with_its_key_path() {
        let text = r#"
            [admin]
            token = "0123456789abcdef"
            listen = "0.0.0.0:8025"
            [[profiles]]
            name = "imap"
            type = "imap_smtp"
            host = "mail.example.test"
            max_concurrent_connections = 500
            [[mailboxes]]
            name = "a"
            profile = "nope"
            email = "a@example.test"
            pasword = "typo"
        "#;
        let errs = parse(text).unwrap_err().0;
        let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
        assert!(paths.contains(&"admin.listen"), "{errs:?}");
        assert!(
            paths.contains(&"profiles[0].max_concurrent_connections"),
            "{errs:?}"
        );
        assert!(paths.contains(&"mailboxes[0].profile"), "{errs:?}");
        assert!(paths.contains(&"mailboxes[0].pasword"), "{errs:?}");
        assert_eq!(errs.len(), 4, "{errs:?}");
    }

    #[test]
    fn unreadable_secret_is_reported_once() {
        let text = MINIMAL
            .replace(
                "type = \"maildir\"",
                "type = \"imap_smtp\"\nhost = \"h.example\"",
            )
            .replace(
                "path = \"fixtures/demo-maildir\"",
                "username = \"u\"\npassword_env = \"CRM_MAILSYNC_TEST_SURELY_UNSET\"",
            );
        let errs = parse(&text).unwrap_err().0;
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].path, "mailboxes[0].password_env");
    }

    /// Regression (#17 §7): documented as defaulting to `$CRMTracked`, but
    /// without the key no keyword was set.
    #[test]
    fn processed_keyword_defaults_to_crm_tracked_for_imap_and_empty_turns_it_off() {
        let imap = |extra: &str| {
            MINIMAL
                .replace(
                    "type = \"maildir\"",
                    &format!("type = \"imap_smtp\"\nhost = \"h.example\"\n{extra}"),
                )
                .replace(
                    "path = \"fixtures/demo-maildir\"",
                    "username = \"u\"\npassword = \"p\"",
                )
        };
        let keyword = |text: &str| parse(text).unwrap().profiles[0].processed_keyword.clone();
        assert_eq!(keyword(&imap("")).as_deref(), Some("$CRMTracked"));
        assert_eq!(keyword(&imap("processed_keyword = \"\"")), None);
        assert_eq!(
            keyword(&imap("processed_keyword = \"$Done\"")).as_deref(),
            Some("$Done")
        );
        // Profiles without keywords get none by default, and may say "" too.
        assert_eq!(keyword(MINIMAL), None);
        let pop3 = imap("").replace("imap_smtp", "pop3_smtp");
        assert_eq!(keyword(&pop3), None);
        assert_eq!(
            keyword(&pop3.replace("host =", "processed_keyword = \"\"\nhost =")),
            None
        );
    }

    #[test]
    fn toml_syntax_error_is_a_config_error() {
        let errs = parse("[admin\ntoken = 1").unwrap_err().0;
        assert_eq!(errs.len(), 1);
        assert!(errs[0].message.contains("TOML"), "{errs:?}");
    }

    #[test]
    fn environment_overrides_file_values() {
        let env = vec![
            (
                "CRM_MAILSYNC__ADMIN__LISTEN".to_string(),
                "127.0.0.1:9999".to_string(),
            ),
            (
                "CRM_MAILSYNC__MAILBOXES__0__APPROVAL".to_string(),
                "approved".to_string(),
            ),
            ("OTHER".to_string(), "x".to_string()),
        ];
        let cfg = from_toml_str(MINIMAL, env, Path::new(".")).unwrap();
        assert_eq!(cfg.admin.listen.port(), 9999);
        assert_eq!(cfg.mailboxes[0].approval, ApprovalStatus::Approved);
    }

    #[test]
    fn environment_override_password_007_keeps_its_zeros() {
        let text = MINIMAL
            .replace(
                "type = \"maildir\"",
                "type = \"imap_smtp\"\nhost = \"h.example\"",
            )
            .replace(
                "path = \"fixtures/demo-maildir\"",
                "username = \"u\"\npassword = \"from-file\"",
            );
        let env = vec![
            (
                "CRM_MAILSYNC__MAILBOXES__0__PASSWORD".to_string(),
                "007".to_string(),
            ),
            (
                "CRM_MAILSYNC__MAILBOXES__0__USERNAME".to_string(),
                "0042".to_string(),
            ),
            // Typed keys still read their string overrides.
            (
                "CRM_MAILSYNC__PROFILES__0__MAX_CONCURRENT_CONNECTIONS".to_string(),
                "3".to_string(),
            ),
            (
                "CRM_MAILSYNC__ADMIN__ALLOW_REMOTE".to_string(),
                "false".to_string(),
            ),
            (
                "CRM_MAILSYNC__CORRELATION__SMART_MATCHING".to_string(),
                "true".to_string(),
            ),
            (
                "CRM_MAILSYNC__DAEMON__STORE_CACHE_MB".to_string(),
                "0128".to_string(),
            ),
        ];
        let cfg = from_toml_str(&text, env, Path::new(".")).unwrap();
        let mb = &cfg.mailboxes[0];
        assert_eq!(mb.secret.as_ref().map(Secret::expose), Some("007"));
        assert_eq!(mb.username.as_deref(), Some("0042"));
        assert_eq!(cfg.profiles[0].max_concurrent_connections, 3);
        assert!(cfg.correlation.smart_matching);
        assert_eq!(cfg.daemon.store_cache_mb, 128);
    }

    #[test]
    fn environment_override_threshold_is_read_as_a_number() {
        let env = vec![(
            "CRM_MAILSYNC__CORRELATION__SMART_MATCHING__THRESHOLD".to_string(),
            "0.5".to_string(),
        )];
        let cfg = from_toml_str(MINIMAL, env, Path::new(".")).unwrap();
        assert_eq!(cfg.correlation.smart.threshold, 0.5);
    }

    #[test]
    fn store_cache_defaults_small_and_is_validated() {
        assert_eq!(parse(MINIMAL).unwrap().daemon.store_cache_mb, 256);
        let text = format!("[daemon]\nstore_cache_mb = 512\n{MINIMAL}");
        assert_eq!(parse(&text).unwrap().daemon.store_cache_mb, 512);
        for bad in ["0", "1000000", "\"big\""] {
            let text = format!("[daemon]\nstore_cache_mb = {bad}\n{MINIMAL}");
            let errs = parse(&text).unwrap_err().0;
            assert_eq!(errs.len(), 1, "{bad}: {errs:?}");
            assert_eq!(errs[0].path, "daemon.store_cache_mb");
        }
    }

    #[test]
    fn email_at_a_dotless_domain_like_localhost_is_accepted() {
        for email in ["alice@localhost", "sales@crm"] {
            let text = MINIMAL.replace("support@example.test", email);
            let cfg = parse(&text).unwrap_or_else(|e| panic!("{email}: {e}"));
            assert_eq!(cfg.mailboxes[0].email, email);
        }
        for bad in ["alice", "alice@", "@localhost", "a b@localhost"] {
            let text = MINIMAL.replace("support@example.test", bad);
            let errs = parse(&text).unwrap_err().0;
            assert_eq!(errs[0].path, "mailboxes[0].email", "{bad}: {errs:?}");
        }
    }

    #[test]
    fn pop3_rejects_folder_tracking_and_act() {
        let text = r#"
            [admin]
            token = "0123456789abcdef"
            [[profiles]]
            name = "pop"
            type = "pop3_smtp"
            host = "pop.example.test"
            username = "u"
            password = "p"
            [[mailboxes]]
            name = "a"
            profile = "pop"
            email = "a@example.test"
            act = "server_side_sync"
            tracked_folders = [{ folder = "INBOX/Customers", regarding = "account:1" }]
        "#;
        let errs = parse(text).unwrap_err().0;
        assert!(
            errs.iter()
                .any(|e| e.path == "mailboxes[0].tracked_folders" && e.message.contains("POP3")),
            "{errs:?}"
        );
        assert!(
            errs.iter().any(|e| e.path == "mailboxes[0].act"),
            "{errs:?}"
        );
    }

    #[test]
    fn oauth_token_file_and_expiry_are_checked_with_their_key_paths() {
        let dir = tempfile::tempdir().unwrap();
        let tok = dir.path().join("tok.json");
        std::fs::write(&tok, r#"{"access_token":"t","expires_in":60}"#).unwrap();
        let base = |auth: &str, mailbox_extra: &str| {
            format!(
                r#"
                [admin]
                token = "0123456789abcdef"
                [[profiles]]
                name = "imap"
                type = "imap_smtp"
                host = "imap.example.test"
                auth = "{auth}"
                username = "u"
                token_expiry_warning = "3d"
                [[mailboxes]]
                name = "a"
                profile = "imap"
                email = "a@example.test"
                {mailbox_extra}
                "#
            )
        };
        let ok = base(
            "oauth2",
            &format!(
                "token_file = \"{}\"\ntoken_expires_at = \"2030-01-01T00:00:00Z\"",
                tok.display()
            ),
        );
        let cfg = parse(&ok).unwrap();
        assert_eq!(cfg.mailboxes[0].token_file.as_deref(), Some(tok.as_path()));
        assert_eq!(cfg.mailboxes[0].token_expires_at, Some(1_893_456_000));
        assert_eq!(
            cfg.profiles[0].token_expiry_warning,
            Duration::from_secs(3 * 86_400)
        );

        let cases = [
            (
                base(
                    "password",
                    &format!("token_file = \"{}\"\npassword = \"p\"", tok.display()),
                ),
                "mailboxes[0].token_file",
            ),
            (
                base("oauth2", "token_file = \"/nonexistent/tok\""),
                "mailboxes[0].token_file",
            ),
            (
                base(
                    "oauth2",
                    &format!("token_file = \"{}\"\npassword = \"p\"", tok.display()),
                ),
                "mailboxes[0].token_file",
            ),
            (
                base("oauth2", "password = \"p\"\ntoken_expires_at = \"soon\""),
                "mailboxes[0].token_expires_at",
            ),
            (base("oauth2", ""), "mailboxes[0].password"),
        ];
        for (text, path) in cases {
            let errs = parse(&text).unwrap_err().0;
            assert!(errs.iter().any(|e| e.path == path), "{path}: {errs:?}");
        }
    }

    #[test]
    fn plaintext_needs_explicit_opt_in_and_secrets_are_not_printed() {
        let text = MINIMAL.replace("type = \"maildir\"", "type = \"imap_smtp\"\nhost = \"h.example\"\ntls = \"plain\"\npassword = \"hunter2-secret\"\nusername = \"u\"").replace("path = \"fixtures/demo-maildir\"", "");
        let errs = parse(&text).unwrap_err();
        assert!(
            errs.0.iter().any(|e| e.path == "profiles[0].tls"),
            "{errs:?}"
        );
        assert!(!format!("{errs} {errs:?}").contains("hunter2"));
    }
}
