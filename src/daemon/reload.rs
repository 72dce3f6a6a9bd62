//! Reloading the configuration file without a restart: `crm-mailsync
//! reload`, SIGHUP or `POST /api/v1/reload`. The file is read and validated
//! first; an invalid one is refused with every error listed and nothing
//! changes. A valid one replaces the running configuration: the daemon's
//! tasks drain as at shutdown (what is in flight commits) and start again
//! from the new file in the same process, on the same store; new mailboxes
//! start, removed ones stop, changed ones run with their new settings.

use std::path::PathBuf;

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::config::{self, Config, ConfigError};

/// What a reload changed, by mailbox name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, utoipa::ToSchema)]
pub struct ReloadReport {
    /// The file that was read.
    pub file: String,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Mailboxes whose settings (or their profile's) changed.
    pub changed: Vec<String>,
    pub unchanged: Vec<String>,
    /// Settings that only take effect at the next restart.
    pub needs_restart: Vec<String>,
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
/// profile's included: a changed profile changes its mailboxes).
fn fingerprint(cfg: &Config, m: &config::Mailbox) -> String {
    format!("{m:?}{:?}", cfg.profile_of(m))
}

/// What going from `old` to `new` changes.
pub fn diff(old: &Config, new: &Config, file: &str) -> ReloadReport {
    let mut r = ReloadReport {
        file: file.to_string(),
        ..Default::default()
    };
    for m in &new.mailboxes {
        match old.mailboxes.iter().find(|o| o.name == m.name) {
            None => r.added.push(m.name.clone()),
            Some(o) if fingerprint(old, o) != fingerprint(new, m) => r.changed.push(m.name.clone()),
            Some(_) => r.unchanged.push(m.name.clone()),
        }
    }
    for o in &old.mailboxes {
        if !new.mailboxes.iter().any(|m| m.name == o.name) {
            r.removed.push(o.name.clone());
        }
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

/// Reads and validates the file again: the new configuration and what it
/// changes, or why not.
pub fn load(path: Option<&PathBuf>, old: &Config) -> Result<(Config, ReloadReport), ReloadRefused> {
    let Some(path) = path else {
        return Err(ReloadRefused::NoFile);
    };
    let file = path.display().to_string();
    match config::load(path) {
        Ok(new) => {
            let report = diff(old, &new, &file);
            Ok((new, report))
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
            "reloaded {}: added {}, removed {}, changed {}, unchanged {}{}",
            body["file"].as_str().unwrap_or(""),
            list(&body["added"]),
            list(&body["removed"]),
            list(&body["changed"]),
            body["unchanged"].as_array().map_or(0, Vec::len),
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
