//! `crm-mailsync test-enable --config FILE MAILBOX` (or `--profile NAME`):
//! Test & Enable of one mailbox (or of every mailbox of a profile) from the
//! command line, in this process against the store, or through the running
//! daemon's admin API when the daemon holds the store.
//!
//! Exit status: [`EXIT_OK`] every direction that ran passed and the mailbox
//! (every mailbox) is enabled; [`EXIT_FAILED`] a direction failed or a
//! mailbox could not be enabled (the output says what and what to do); 64
//! a configuration problem or an unknown mailbox or profile (or the daemon
//! refused the token);
//! [`EXIT_UNAVAILABLE`] the store is held by a daemon whose API cannot be
//! reached; [`EXIT_OTHER`] anything else (2 is clap's: bad arguments).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::TestEnable;
use crate::config::{Config, EXIT_CONFIG};
use crate::deployment::Deployment;
use crate::store::{SledStore, StoreError};

/// Every direction that ran passed and the mailbox is enabled.
pub const EXIT_OK: u8 = 0;
/// A test ran and failed, or the mailbox could not be enabled.
pub const EXIT_FAILED: u8 = 1;
/// Anything else went wrong (the store cannot be opened, the daemon's
/// answer makes no sense) (EX_SOFTWARE).
pub const EXIT_OTHER: u8 = 70;
/// The daemon holds the store and its API cannot be reached (EX_UNAVAILABLE).
pub const EXIT_UNAVAILABLE: u8 = 69;

/// How long the CLI waits for the daemon's job before giving up.
const API_WAIT: Duration = Duration::from_secs(600);

/// A failure with its exit status.
struct Failure {
    code: u8,
    message: String,
}

fn fail(code: u8, message: impl Into<String>) -> Failure {
    Failure {
        code,
        message: message.into(),
    }
}

/// What to test.
#[derive(Debug, Clone)]
pub enum Target {
    Mailbox(String),
    /// Every mailbox of the profile.
    Profile(String),
}

impl Target {
    fn words(&self) -> String {
        match self {
            Target::Mailbox(m) => format!("mailbox {m}"),
            Target::Profile(p) => format!("profile {p}"),
        }
    }
}

/// Runs the test; prints the result (JSON with `json`), returns the exit status.
/// With `force` a mailbox another deployment syncs is taken over.
pub fn run(cfg: Config, target: &Target, json: bool, force: bool) -> u8 {
    match run_inner(cfg, target, force) {
        Ok((job, how)) => {
            if json {
                println!("{job}");
            } else {
                print!("{}", render(&job, target, &how));
            }
            let all = job["total"].as_u64();
            if all.is_some() && job["succeeded"].as_u64() == all {
                EXIT_OK
            } else {
                EXIT_FAILED
            }
        }
        Err(f) => {
            eprintln!("crm-mailsync test-enable: {}", f.message);
            f.code
        }
    }
}

fn run_inner(cfg: Config, target: &Target, force: bool) -> Result<(Value, String), Failure> {
    let known = match target {
        Target::Mailbox(m) => cfg.mailboxes.iter().any(|x| &x.name == m),
        Target::Profile(p) => cfg.profiles.iter().any(|x| &x.name == p),
    };
    if !known {
        let names: Vec<&str> = match target {
            Target::Mailbox(_) => cfg.mailboxes.iter().map(|m| m.name.as_str()).collect(),
            Target::Profile(_) => cfg.profiles.iter().map(|p| p.name.as_str()).collect(),
        };
        return Err(fail(
            EXIT_CONFIG as u8,
            format!(
                "no {} in the configuration (it has: {})",
                match target {
                    Target::Mailbox(m) => format!("mailbox {m:?}"),
                    Target::Profile(p) => format!("profile {p:?}"),
                },
                names.join(", ")
            ),
        ));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| fail(EXIT_OTHER, format!("cannot start the async runtime: {e}")))?;
    let path = cfg.store_path();
    match SledStore::open_with_cache_mb(&path, cfg.daemon.store_cache_mb) {
        Ok(store) => {
            let deployment =
                Deployment::load_or_create(&cfg).map_err(|e| fail(EXIT_OTHER, e.to_string()))?;
            let te = TestEnable::standalone(Arc::new(cfg), Arc::new(store), Arc::new(deployment));
            let job = rt
                .block_on(async {
                    match target {
                        Target::Mailbox(m) => te.test_now(m, force).await,
                        Target::Profile(p) => te.test_profile_now(p, force).await,
                    }
                })
                .map_err(|e| fail(EXIT_CONFIG as u8, e.to_string()))?;
            let job = serde_json::to_value(&job).map_err(|e| fail(EXIT_OTHER, e.to_string()))?;
            Ok((
                job,
                format!("in this process, against the store at {}", path.display()),
            ))
        }
        Err(StoreError::Locked(_)) => {
            let (job, url) = rt.block_on(through_api(&cfg, target, force))?;
            Ok((
                job,
                format!("by the running daemon, through its admin API at {url}"),
            ))
        }
        Err(e) => Err(fail(
            EXIT_OTHER,
            format!("cannot open the store at {}: {e}", path.display()),
        )),
    }
}

/// Starts the job on the daemon and polls it until done.
async fn through_api(
    cfg: &Config,
    target: &Target,
    force: bool,
) -> Result<(Value, String), Failure> {
    let unavailable = |why: String| {
        fail(
            EXIT_UNAVAILABLE,
            format!("the store is in use by the daemon and {why}"),
        )
    };
    let (base, token) =
        crate::admin::client_endpoint(cfg).map_err(|why| unavailable(why.to_string()))?;
    let mut start = reqwest::Url::parse(&base).map_err(|e| fail(EXIT_OTHER, e.to_string()))?;
    start
        .path_segments_mut()
        .map_err(|()| fail(EXIT_OTHER, "cannot build the API address"))?
        .extend(match target {
            Target::Mailbox(m) => ["api", "v1", "mailboxes", m.as_str(), "test"],
            Target::Profile(p) => ["api", "v1", "profiles", p.as_str(), "test"],
        });
    if force {
        start.set_query(Some("force=true"));
    }
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| fail(EXIT_OTHER, format!("cannot build an HTTP client: {e}")))?;
    let call = |req: reqwest::RequestBuilder| async {
        let resp =
            req.bearer_auth(token.expose()).send().await.map_err(|e| {
                unavailable(format!("its admin API at {base} cannot be reached: {e}"))
            })?;
        let status = resp.status().as_u16();
        let text = resp.text().await.map_err(|e| {
            unavailable(format!("its admin API at {base} broke off the answer: {e}"))
        })?;
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        match status {
            200 | 202 => Ok(body),
            401 => Err(fail(
                EXIT_CONFIG as u8,
                "the daemon refused the [admin] token of this configuration",
            )),
            _ => {
                let error = body["error"].as_str().unwrap_or(text.trim()).to_string();
                let code = if status == 404 {
                    EXIT_CONFIG as u8
                } else {
                    EXIT_OTHER
                };
                Err(fail(code, format!("the daemon answered {status}: {error}")))
            }
        }
    };
    let started = call(client.post(start.clone())).await?;
    let id = started["job"]
        .as_str()
        .ok_or_else(|| {
            fail(
                EXIT_OTHER,
                format!("the daemon's answer names no job: {started}"),
            )
        })?
        .to_string();
    let mut poll = reqwest::Url::parse(&base).map_err(|e| fail(EXIT_OTHER, e.to_string()))?;
    poll.path_segments_mut()
        .map_err(|()| fail(EXIT_OTHER, "cannot build the API address"))?
        .extend(["api", "v1", "jobs", &id]);
    let deadline = Instant::now() + API_WAIT;
    loop {
        let job = call(client.get(poll.clone())).await?;
        if job["state"] == "done" {
            return Ok((job, base));
        }
        if Instant::now() > deadline {
            return Err(fail(
                EXIT_OTHER,
                format!("job {id} still running after {API_WAIT:?}; see GET /api/v1/jobs/{id}"),
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The job as text: per mailbox, one line per direction with its cause;
/// for a profile, the summary last.
fn render(job: &Value, target: &Target, how: &str) -> String {
    let mut out = format!("Test & Enable of {} ({how}):\n", target.words());
    let results = job["results"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    for r in results {
        if matches!(target, Target::Profile(_)) {
            out.push_str(&format!(
                "mailbox {}:\n",
                r["mailbox"].as_str().unwrap_or("?")
            ));
        }
        for key in ["incoming", "outgoing", "act"] {
            let t = &r[key];
            let status = t["status"].as_str().unwrap_or("?");
            let detail = t["detail"].as_str().unwrap_or("");
            out.push_str(&format!("  {key:<9} {status:<8} {detail}\n"));
        }
        let enabled = if r["enabled"] == true { "yes" } else { "no" };
        out.push_str(&format!("  {:<9} {enabled}\n", "enabled"));
        if let Some(e) = r["error"].as_str() {
            out.push_str(&format!("  {:<9} {e}\n", "what to do"));
        }
    }
    if matches!(target, Target::Profile(_)) || results.is_empty() {
        let summary = job["summary"].as_str().unwrap_or("not tested");
        out.push_str(&format!("{summary}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_output_has_a_line_per_direction_with_its_cause() {
        let job = serde_json::json!({
            "succeeded": 0,
            "results": [{
                "mailbox": "m",
                "incoming": {"status": "success", "completed_on": 1, "detail": "IMAP logged in"},
                "outgoing": {"status": "failure", "completed_on": 1, "detail": "SMTP connection failed: refused"},
                "act": {"status": "not_run", "completed_on": null, "detail": "act = \"none\""},
                "enabled": true,
                "error": "Test & Enable: outgoing failed: …"
            }]
        });
        let text = render(&job, &Target::Mailbox("m".into()), "here");
        assert!(
            text.contains("  incoming  success  IMAP logged in\n"),
            "{text}"
        );
        assert!(
            text.contains("  outgoing  failure  SMTP connection failed: refused\n"),
            "{text}"
        );
        assert!(text.contains("  act       not_run"), "{text}");
        assert!(text.contains("  enabled   yes\n"), "{text}");
        assert!(
            text.contains("what to do Test & Enable: outgoing failed"),
            "{text}"
        );
    }
}
