//! Reloading the configuration file without a restart: `crm-mailsync
//! reload`, SIGHUP or `POST /api/v1/reload`. The file is read and validated
//! first; an invalid one is refused with every error listed and nothing
//! changes. A valid one is applied surgically: new mailboxes start, removed
//! ones stop, changed ones (their settings or their profile's) are drained
//! and start again with the new settings, and the others keep running
//! undisturbed (same task, same connection, no new Test & Enable). The
//! admin API, the Test & Enable jobs and the CRM link keep running.
//!
//! A change to `[admin]`, `[crm]` or `[outgoing]` cannot be applied that way
//! (the API listener, the CRM adapters and the outgoing limits are built
//! once per start): then every task drains and starts again from the new
//! file in the same process, on the same store, and the answer names the
//! reason in `full_restart`. What even that cannot apply (`state_dir`, the
//! store's cache, logging) is listed in `needs_restart`.

use std::path::PathBuf;

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::config::{self, fingerprint, Config, ConfigError};

/// What a reload changed, by mailbox name, and what it did about it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, utoipa::ToSchema)]
pub struct ReloadReport {
    /// The file that was read.
    pub file: String,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Mailboxes whose settings (or their profile's, or the correlation and
    /// approval settings every mailbox uses) changed.
    pub changed: Vec<String>,
    pub unchanged: Vec<String>,
    /// Mailboxes that were drained and started again on the new settings:
    /// the changed ones, or every remaining one on a full restart.
    pub restarted: Vec<String>,
    /// Mailboxes left running undisturbed: their task, connection and
    /// Test & Enable result are the ones from before the reload.
    pub left_running: Vec<String>,
    /// The sections whose change made every task of the daemon drain and
    /// start again (the admin API and the CRM link included; Test & Enable
    /// jobs from before are forgotten). Empty: only the mailboxes named in
    /// `added`, `removed` and `restarted` were touched.
    pub full_restart: Vec<String>,
    /// Settings that only take effect at the next restart.
    pub needs_restart: Vec<String>,
}

impl ReloadReport {
    /// True when the reload drains and starts every task again.
    pub fn is_full(&self) -> bool {
        !self.full_restart.is_empty()
    }
}

/// Why a reload was refused.
#[derive(Debug, Clone, PartialEq)]
pub enum ReloadRefused {
    /// The file is invalid: every error, nothing changed.
    Invalid {
        file: String,
        errors: Vec<ConfigError>,
    },
    /// The daemon was not started from a file it could read again.
    NoFile,
}

/// A reload request and where its answer goes.
pub type ReloadRequest = oneshot::Sender<Result<ReloadReport, ReloadRefused>>;

/// What the admin API holds to ask the daemon for a reload.
#[derive(Clone)]
pub struct ReloadHandle(pub mpsc::Sender<ReloadRequest>);

impl ReloadHandle {
    /// Asks for a reload and waits for the answer; `None` when the daemon
    /// is shutting down.
    pub async fn reload(&self) -> Option<Result<ReloadReport, ReloadRefused>> {
        let (tx, rx) = oneshot::channel();
        self.0.send(tx).await.ok()?;
        rx.await.ok()
    }
}

/// The mailbox's settings as compared between two configurations (its
/// profile's included: a changed profile changes its mailboxes; secrets
/// compared by value).
fn mailbox_fingerprint(cfg: &Config, m: &config::Mailbox) -> String {
    fingerprint(&(m, cfg.profile_of(m)))
}

/// The sections of `old` and `new` that differ and only a full restart of
/// the daemon's tasks applies.
fn full_restart_reasons(old: &Config, new: &Config) -> Vec<String> {
    let mut why = Vec::new();
    if fingerprint(&old.admin) != fingerprint(&new.admin) {
        why.push("[admin] (the admin API is started again)".to_string());
    }
    if fingerprint(&old.crm) != fingerprint(&new.crm) {
        why.push("[crm] (the CRM link is started again)".to_string());
    }
    if old.outgoing != new.outgoing {
        why.push("[outgoing] (the senders and the admin API are started again)".to_string());
    }
    why
}

/// What going from `old` to `new` changes, and what the reload does about
/// it (see the module documentation).
pub fn diff(old: &Config, new: &Config, file: &str) -> ReloadReport {
    let mut r = ReloadReport {
        file: file.to_string(),
        full_restart: full_restart_reasons(old, new),
        ..Default::default()
    };
    // Read by every mailbox task when it starts: a change restarts them all
    // (a task left running would keep the old marker check cadence).
    let every_mailbox = old.correlation != new.correlation
        || old.process_only_approved != new.process_only_approved
        || old.daemon.marker_check_every != new.daemon.marker_check_every;
    for m in &new.mailboxes {
        match old.mailboxes.iter().find(|o| o.name == m.name) {
            None => r.added.push(m.name.clone()),
            Some(o)
                if every_mailbox || mailbox_fingerprint(old, o) != mailbox_fingerprint(new, m) =>
            {
                r.changed.push(m.name.clone())
            }
            Some(_) => r.unchanged.push(m.name.clone()),
        }
    }
    for o in &old.mailboxes {
        if !new.mailboxes.iter().any(|m| m.name == o.name) {
            r.removed.push(o.name.clone());
        }
    }
    if r.is_full() {
        r.restarted = r.changed.iter().chain(&r.unchanged).cloned().collect();
        r.restarted.sort();
    } else {
        r.restarted = r.changed.clone();
        r.left_running = r.unchanged.clone();
    }
    if old.store_path() != new.store_path() {
        r.needs_restart
            .push("daemon.state_dir (the store stays where it is)".into());
    }
    if old.daemon.deployment_id != new.daemon.deployment_id {
        r.needs_restart.push("daemon.deployment_id".into());
    }
    if old.daemon.store_cache_mb != new.daemon.store_cache_mb {
        r.needs_restart.push("daemon.store_cache_mb".into());
    }
    if old.daemon.log_level != new.daemon.log_level
        || old.daemon.log_format != new.daemon.log_format
    {
        r.needs_restart.push("daemon.log_level / log_format".into());
    }
    r
}

/// `new` with the settings only a restart of the process applies (the
/// `needs_restart` ones) as they run: every task, restarted or not, keeps
/// the store's directory and its quarantine next to it.
fn keep_process_settings(old: &Config, mut new: Config) -> Config {
    new.daemon.state_dir = old.daemon.state_dir.clone();
    new.daemon.store_cache_mb = old.daemon.store_cache_mb;
    new.daemon.log_level = old.daemon.log_level.clone();
    new.daemon.log_format = old.daemon.log_format;
    new
}

/// The profiles whose settings are the same in `old` and `new` (their
/// connection semaphore, queue and Graph app are kept by a reload).
pub fn unchanged_profiles(old: &Config, new: &Config) -> Vec<String> {
    new.profiles
        .iter()
        .filter(|p| {
            old.profiles
                .iter()
                .any(|o| o.name == p.name && fingerprint(o) == fingerprint(*p))
        })
        .map(|p| p.name.clone())
        .collect()
}

/// Reads and validates the file again: the configuration to apply and
/// what it changes, or why not.
pub fn load(path: Option<&PathBuf>, old: &Config) -> Result<(Config, ReloadReport), ReloadRefused> {
    let Some(path) = path else {
        return Err(ReloadRefused::NoFile);
    };
    let file = path.display().to_string();
    match config::load(path) {
        Ok(new) => {
            let report = diff(old, &new, &file);
            Ok((keep_process_settings(old, new), report))
        }
        Err(errs) => Err(ReloadRefused::Invalid {
            file,
            errors: errs.0,
        }),
    }
}

/// Asks the daemon running on `cfg` for a reload through its admin API;
/// the answer as text, or (exit status, why not).
pub async fn request(cfg: &Config) -> Result<String, (u8, String)> {
    let unreachable = |why: String| (69u8, why);
    let (base, token) = crate::admin::client_endpoint(cfg)
        .map_err(|why| unreachable(format!("{why}: send the daemon SIGHUP instead")))?;
    let url = format!("{base}/api/v1/reload");
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(120))
        .build()
        .map_err(|e| (70, format!("cannot build an HTTP client: {e}")))?;
    let resp = client
        .post(&url)
        .bearer_auth(token.expose())
        .send()
        .await
        .map_err(|e| {
            unreachable(format!(
                "the daemon's admin API at {url} cannot be reached: {e}"
            ))
        })?;
    let status = resp.status().as_u16();
    let body: serde_json::Value = resp.json().await.unwrap_or(serde_json::Value::Null);
    match status {
        200 => Ok(format!(
            "reloaded {}: added {}, removed {}, changed {}, unchanged {}; {}{}",
            body["file"].as_str().unwrap_or(""),
            list(&body["added"]),
            list(&body["removed"]),
            list(&body["changed"]),
            body["unchanged"].as_array().map_or(0, Vec::len),
            match list(&body["full_restart"]).as_str() {
                "none" => format!(
                    "restarted {}, left running {}",
                    list(&body["restarted"]),
                    body["left_running"].as_array().map_or(0, Vec::len)
                ),
                l => format!("every task restarted, as {l} changed"),
            },
            match list(&body["needs_restart"]).as_str() {
                "none" => String::new(),
                l => format!("; needs a restart to take effect: {l}"),
            }
        )),
        422 => {
            let errors: Vec<String> = body["errors"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| {
                    format!(
                        "  - {}: {}",
                        e["path"].as_str().unwrap_or(""),
                        e["message"].as_str().unwrap_or("")
                    )
                })
                .collect();
            Err((
                crate::config::EXIT_CONFIG as u8,
                format!(
                    "{}\n{}",
                    body["error"].as_str().unwrap_or("refused"),
                    errors.join("\n")
                ),
            ))
        }
        401 => Err((
            crate::config::EXIT_CONFIG as u8,
            "the daemon refused the [admin] token of this configuration".into(),
        )),
        _ => Err((
            70,
            format!(
                "the daemon answered {status}: {}",
                body["error"].as_str().unwrap_or("(no message)")
            ),
        )),
    }
}

/// Names in a JSON array, comma separated ("none" when empty).
fn list(v: &serde_json::Value) -> String {
    let names: Vec<&str> = v
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(serde_json::Value::as_str)
        .collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dir: &std::path::Path, mailboxes: &[(&str, &str)], poll: &str) -> Config {
        let mut text = format!(
            "[daemon]\nstate_dir = \"{}\"\n[admin]\nenabled = false\n[[profiles]]\nname = \"local\"\ntype = \"maildir\"\npoll_interval = \"{poll}\"\n",
            dir.display()
        );
        for (name, path) in mailboxes {
            text.push_str(&format!(
                "[[mailboxes]]\nname = \"{name}\"\nprofile = \"local\"\nemail = \"{name}@example.test\"\napproval = \"approved\"\npath = \"{path}\"\n"
            ));
        }
        config::from_toml_str(&text, [], dir).unwrap()
    }

    #[test]
    fn the_diff_names_added_removed_changed_and_unchanged_mailboxes() {
        let dir = tempfile::tempdir().unwrap();
        let old = cfg(
            dir.path(),
            &[("a", "/m/a"), ("b", "/m/b"), ("c", "/m/c")],
            "1s",
        );
        let new = cfg(
            dir.path(),
            &[("a", "/m/a"), ("b", "/m/b2"), ("d", "/m/d")],
            "1s",
        );
        let r = diff(&old, &new, "f.toml");
        assert_eq!(r.added, vec!["d"]);
        assert_eq!(r.removed, vec!["c"]);
        assert_eq!(r.changed, vec!["b"]);
        assert_eq!(r.unchanged, vec!["a"]);
        assert!(r.needs_restart.is_empty());
        // A profile change changes every mailbox of the profile.
        let slower = cfg(
            dir.path(),
            &[("a", "/m/a"), ("b", "/m/b"), ("c", "/m/c")],
            "5s",
        );
        assert_eq!(diff(&old, &slower, "f").changed, vec!["a", "b", "c"]);
    }

    /// A config of mailbox sections `mailboxes` (TOML, each with its own
    /// keys) on two Maildir profiles, with `top` before them.
    fn parsed(dir: &std::path::Path, top: &str, slow_poll: &str, mailboxes: &str) -> Config {
        let text = format!(
            "{top}\n[daemon]\nstate_dir = \"{}\"\n[admin]\nlisten = \"127.0.0.1:7999\"\ntoken = \"0123456789abcdef\"\n[[profiles]]\nname = \"fast\"\ntype = \"maildir\"\npoll_interval = \"1s\"\n[[profiles]]\nname = \"slow\"\ntype = \"maildir\"\npoll_interval = \"{slow_poll}\"\n{mailboxes}",
            dir.display()
        );
        config::from_toml_str(&text, [], dir).unwrap()
    }

    fn mailbox(name: &str, profile: &str, extra: &str) -> String {
        format!("[[mailboxes]]\nname = \"{name}\"\nprofile = \"{profile}\"\nemail = \"{name}@example.test\"\napproval = \"approved\"\npath = \"/m/{name}\"\n{extra}\n")
    }

    #[test]
    fn a_mailbox_only_reload_restarts_the_changed_and_leaves_the_rest_running() {
        let dir = tempfile::tempdir().unwrap();
        let boxes = |a_extra: &str, with_c: bool| {
            let mut t = mailbox("a", "fast", a_extra)
                + &mailbox("b", "fast", "")
                + &mailbox("s", "slow", "");
            if with_c {
                t.push_str(&mailbox("c", "fast", ""));
            }
            t
        };
        let old = parsed(dir.path(), "", "5s", &boxes("", true));
        let new = parsed(
            dir.path(),
            "",
            "5s",
            &(boxes("folders = [\"Sales\"]", false) + &mailbox("d", "slow", "")),
        );
        let r = diff(&old, &new, "f");
        assert!(r.full_restart.is_empty(), "{r:?}");
        assert!(!r.is_full());
        assert_eq!(r.added, vec!["d"]);
        assert_eq!(r.removed, vec!["c"]);
        assert_eq!(r.restarted, vec!["a"]);
        assert_eq!(r.left_running, vec!["b", "s"]);
        assert_eq!(r.left_running, r.unchanged);
        assert_eq!(unchanged_profiles(&old, &new), vec!["fast", "slow"]);

        // A profile change restarts exactly that profile's mailboxes and
        // gives the profile new connection limits.
        let slower = parsed(dir.path(), "", "9s", &boxes("", true));
        let r = diff(&old, &slower, "f");
        assert_eq!(r.restarted, vec!["s"]);
        assert_eq!(r.left_running, vec!["a", "b", "c"]);
        assert_eq!(unchanged_profiles(&old, &slower), vec!["fast"]);

        // Nothing changed: nothing restarts.
        let same = diff(&old, &old, "f");
        assert!(same.restarted.is_empty() && same.added.is_empty() && same.removed.is_empty());
        assert_eq!(same.left_running, vec!["a", "b", "s", "c"]);
    }

    #[test]
    fn a_changed_secret_changes_the_mailbox_though_its_text_hides_it() {
        let dir = tempfile::tempdir().unwrap();
        let old = parsed(
            dir.path(),
            "",
            "5s",
            &mailbox("a", "fast", "password = \"one\""),
        );
        let new = parsed(
            dir.path(),
            "",
            "5s",
            &mailbox("a", "fast", "password = \"two\""),
        );
        // What is printed is the same…
        assert_eq!(
            format!("{:?}", old.mailboxes),
            format!("{:?}", new.mailboxes)
        );
        // …what is compared is not, and shows no secret.
        let r = diff(&old, &new, "f");
        assert_eq!(r.restarted, vec!["a"]);
        let fp = mailbox_fingerprint(&new, &new.mailboxes[0]);
        assert!(!fp.contains("two"), "{fp}");
        assert!(format!("{:?}", new.mailboxes).contains("Secret(***)"));
    }

    #[test]
    fn settings_every_mailbox_reads_restart_them_all_and_some_sections_everything() {
        let dir = tempfile::tempdir().unwrap();
        let boxes = mailbox("a", "fast", "") + &mailbox("s", "slow", "");
        let old = parsed(dir.path(), "", "5s", &boxes);
        // Approval rule: every mailbox restarts, nothing else.
        let open = parsed(dir.path(), "process_only_approved = false", "5s", &boxes);
        let r = diff(&old, &open, "f");
        assert!(!r.is_full());
        assert_eq!(r.restarted, vec!["a", "s"]);
        assert!(r.left_running.is_empty());
        // The marker check cadence: read by each task when it starts.
        let mut cadence = old.clone();
        cadence.daemon.marker_check_every = std::time::Duration::from_secs(60);
        let r = diff(&old, &cadence, "f");
        assert!(!r.is_full());
        assert_eq!(r.restarted, vec!["a", "s"]);
        assert!(r.left_running.is_empty());

        // [admin] (the listener) and [crm]: every task drains and starts
        // again, and the answer says why.
        let mut moved = old.clone();
        moved.admin.listen = "127.0.0.1:7998".parse().unwrap();
        let r = diff(&old, &moved, "f");
        assert!(r.is_full());
        assert!(r.full_restart[0].contains("[admin]"), "{r:?}");
        assert_eq!(r.restarted, vec!["a", "s"]);
        assert!(r.left_running.is_empty());
        assert_eq!(r.unchanged, vec!["a", "s"]);
        let mut token = old.clone();
        token.admin.token = Some(config::Secret::new("fedcba9876543210"));
        assert!(diff(&old, &token, "f").is_full(), "a new admin token");
        let mut crm = old.clone();
        crm.crm.parties.max_matches += 1;
        let r = diff(&old, &crm, "f");
        assert!(r.full_restart.iter().any(|w| w.contains("[crm]")), "{r:?}");

        // [daemon] timings apply in place; the store and logging need a
        // restart of the process.
        let mut daemon = old.clone();
        daemon.daemon.stuck_after = std::time::Duration::from_secs(1);
        daemon.daemon.log_level = "debug".into();
        let r = diff(&old, &daemon, "f");
        assert!(!r.is_full(), "{r:?}");
        assert!(r.restarted.is_empty());
        assert_eq!(r.needs_restart, vec!["daemon.log_level / log_format"]);
    }

    #[test]
    fn what_only_a_restart_applies_is_kept_as_it_runs() {
        let dir = tempfile::tempdir().unwrap();
        let old = cfg(dir.path(), &[("a", "/m/a")], "1s");
        let path = dir.path().join("new.toml");
        let moved = dir.path().join("elsewhere");
        std::fs::write(
            &path,
            format!(
                "[daemon]\nstate_dir = \"{}\"\nlog_level = \"debug\"\nstuck_after = \"7m\"\n[admin]\nenabled = false\n[[profiles]]\nname = \"local\"\ntype = \"maildir\"\npoll_interval = \"1s\"\n[[mailboxes]]\nname = \"a\"\nprofile = \"local\"\nemail = \"a@example.test\"\napproval = \"approved\"\npath = \"/m/a\"\n",
                moved.display()
            ),
        )
        .unwrap();
        let (new, report) = load(Some(&path), &old).unwrap();
        assert_eq!(report.needs_restart.len(), 2, "{report:?}");
        assert_eq!(new.daemon.state_dir, old.daemon.state_dir);
        assert_eq!(new.quarantine_dir(), old.quarantine_dir());
        assert_eq!(new.daemon.log_level, old.daemon.log_level);
        // What a reload applies is applied.
        assert_eq!(new.daemon.stuck_after, std::time::Duration::from_secs(420));
        assert_eq!(report.left_running, vec!["a"]);
    }

    #[test]
    fn an_invalid_file_is_refused_with_every_error() {
        let dir = tempfile::tempdir().unwrap();
        let old = cfg(dir.path(), &[("a", "/m/a")], "1s");
        let path = dir.path().join("bad.toml");
        std::fs::write(
            &path,
            "[[profiles]]\nname = \"p\"\ntype = \"nonsense\"\n[[mailboxes]]\nname = \"a\"\nprofile = \"missing\"\n",
        )
        .unwrap();
        match load(Some(&path), &old) {
            Err(ReloadRefused::Invalid { errors, .. }) => {
                assert!(errors.len() >= 2, "{errors:?}");
                assert!(errors.iter().any(|e| e.path.contains("type")), "{errors:?}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(load(None, &old).unwrap_err(), ReloadRefused::NoFile);
    }
}
