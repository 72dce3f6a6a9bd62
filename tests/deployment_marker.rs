//! One mailbox, one deployment: two daemons (two deployments, each with its
//! own store) on the same mailbox. The first claims it (a marker in the
//! mailbox), the second refuses it (disabled, an Error alert naming the
//! other deployment, nothing ingested) until an operator forces a take-over
//! with Test & Enable; then the first finds the new marker at its next
//! check and disables its side. On the real Dovecot (a hidden folder: it
//! has no METADATA) and on a Maildir (a file).
//!
//! User: user00200 (the profile test of tests/test_enable.rs also logs in
//! as it; the guard below removes the markers this test leaves).

mod common;
mod servers;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::Value;

const A: &str = "deployment-a-0001";
const B: &str = "deployment-b-0002";

/// A daemon of deployment `id` (the environment overrides the id every
/// test daemon otherwise shares).
fn start_as(config: &Path, id: &str, admin: u16) -> Running {
    let child = daemon_command()
        .env(DEPLOYMENT_ID_ENV, id)
        .args(["run", "--config"])
        .arg(config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let running = Running(Some(child));
    wait_for(Duration::from_secs(30), "admin API", || {
        get(admin, "/healthz", None).filter(|(s, _)| *s == 200)
    });
    running
}

fn mailbox(admin: u16) -> Value {
    get_json(admin, "/api/v1/mailboxes/mb")
}

/// The mailbox's phase; empty until its task shows in the runtime view
/// (the admin API answers before every task has started).
fn phase(admin: u16) -> String {
    match get(admin, "/api/v1/mailboxes/mb", Some(TOKEN)) {
        Some((200, body)) => serde_json::from_str::<Value>(&body).unwrap()["phase"]
            .as_str()
            .unwrap_or("")
            .to_string(),
        _ => String::new(),
    }
}

/// Open Error alerts of the mailbox whose text mentions `needle`.
fn alerts_naming(admin: u16, needle: &str) -> Vec<Value> {
    get_json(admin, "/api/v1/alerts?mailbox=mb&state=open&level=error")["alerts"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|a| a["text"].as_str().is_some_and(|t| t.contains(needle)))
        .collect()
}

/// Starts a Test & Enable job and waits for it.
fn test_job(admin: u16, query: &str) -> Value {
    let (status, started) = request(
        admin,
        "POST",
        &format!("/api/v1/mailboxes/mb/test{query}"),
        None,
    );
    assert_eq!(status, 202, "{started}");
    let id = started["job"].as_str().unwrap().to_string();
    wait_for(Duration::from_secs(60), "the test job", || {
        let job = get_json(admin, &format!("/api/v1/jobs/{id}"));
        (job["state"] == "done").then_some(job)
    })
}

/// The one result of a mailbox test job.
fn result(job: &Value) -> Value {
    job["results"][0].clone()
}

/// Both deployments refuse and take over the same way; what differs is
/// where the marker is and how the test looks at it.
trait Mailbox {
    /// The deployment id the mailbox's marker names now (and that there is
    /// exactly one marker).
    fn marker(&self) -> Option<String>;
    /// Puts one new message into the mailbox.
    fn deliver(&self, tag: &str);
}

/// The whole story, for either kind of mailbox.
fn one_mailbox_one_deployment(mb: &dyn Mailbox, config_a: &Path, config_b: &Path) {
    let (admin_a, admin_b) = (admin_port(config_a), admin_port(config_b));
    mb.deliver("first");
    mb.deliver("second");

    // A claims the mailbox and syncs it.
    let mut a = start_as(config_a, A, admin_a);
    wait_for(Duration::from_secs(60), "A: 2 activities", || {
        (activity_total(admin_a) == Some(2)).then_some(())
    });
    assert_eq!(mb.marker().as_deref(), Some(A));
    let detail = mailbox(admin_a)["state"]["incoming_test"]["detail"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(
        detail.contains(&format!("marked as synchronized by deployment {A}")),
        "{detail}"
    );

    // B refuses it at its start: disabled, an Error alert naming A and what
    // to do, nothing ingested.
    let mut b = start_as(config_b, B, admin_b);
    wait_for(Duration::from_secs(60), "B disabled", || {
        (phase(admin_b) == "disabled").then_some(())
    });
    let refusal = alerts_naming(admin_b, A);
    assert_eq!(refusal.len(), 1, "{refusal:?}");
    let text = refusal[0]["text"].as_str().unwrap();
    assert!(text.contains("another crm-mailsync deployment"), "{text}");
    assert!(text.contains("test?force=true"), "{text}");
    assert_eq!(activity_total(admin_b), Some(0));
    assert_eq!(
        mb.marker().as_deref(),
        Some(A),
        "B must not touch A's marker"
    );

    // Test & Enable without force: the incoming test fails, naming A.
    let job = test_job(admin_b, "");
    let r = result(&job);
    assert_eq!(r["incoming"]["status"], "failure", "{job}");
    assert!(
        r["incoming"]["detail"].as_str().unwrap().contains(A),
        "{job}"
    );
    assert_eq!(r["enabled"], false, "{job}");
    assert_eq!(phase(admin_b), "disabled");
    assert_eq!(activity_total(admin_b), Some(0));
    assert_eq!(mb.marker().as_deref(), Some(A));

    // Forced: B takes the mailbox over and runs.
    let job = test_job(admin_b, "?force=true");
    let r = result(&job);
    assert_eq!(r["incoming"]["status"], "success", "{job}");
    let detail = r["incoming"]["detail"].as_str().unwrap();
    assert!(
        detail.contains(&format!("taken over from deployment {A}")),
        "{detail}"
    );
    assert_eq!(r["enabled"], true, "{job}");
    assert_eq!(mb.marker().as_deref(), Some(B));
    wait_for(Duration::from_secs(60), "B: 2 activities", || {
        (activity_total(admin_b) == Some(2)).then_some(())
    });

    // A finds B's marker at its next check and disables its side.
    wait_for(Duration::from_secs(60), "A disabled", || {
        (phase(admin_a) == "disabled").then_some(())
    });
    let taken = alerts_naming(admin_a, B);
    assert_eq!(taken.len(), 1, "{taken:?}");

    // New mail now reaches B only.
    mb.deliver("third");
    wait_for(Duration::from_secs(60), "B: 3 activities", || {
        (activity_total(admin_b) == Some(3)).then_some(())
    });
    assert_eq!(activity_total(admin_a), Some(2));
    assert_eq!(phase(admin_a), "disabled");
    assert_eq!(mb.marker().as_deref(), Some(B));
    b.stop();
    a.stop();
}

// --- Maildir -------------------------------------------------------------

struct Maildir(PathBuf);

impl Mailbox for Maildir {
    fn marker(&self) -> Option<String> {
        let path = self.0.join(".crm-mailsync-deployment");
        let text = std::fs::read_to_string(&path).ok()?;
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the marker file's mode");
        let v: Value = serde_json::from_str(&text).unwrap();
        v["deployment"].as_str().map(str::to_string)
    }

    fn deliver(&self, tag: &str) {
        std::fs::write(
            self.0.join("new").join(format!("1769000000.{tag}.gen")),
            format!("Message-ID: <{tag}@example.test>\nFrom: x@customer.example\nTo: mb@example.test\nSubject: {tag}\n\nhello\n"),
        )
        .unwrap();
    }
}

fn maildir_config(dir: &Path, maildir: &Path) -> PathBuf {
    let port = free_port();
    let text = format!(
        r#"
[daemon]
state_dir = "{state}"
log_format = "json"
log_level = "warn"
shutdown_grace = "10s"
marker_check_every = "1s"

[admin]
listen = "127.0.0.1:{port}"
token = "{TOKEN}"

[[profiles]]
name = "local"
type = "maildir"
poll_interval = "1s"

[[mailboxes]]
name = "mb"
profile = "local"
email = "mb@example.test"
approval = "approved"
path = "{maildir}"
"#,
        state = dir.join("state").display(),
        maildir = maildir.display(),
    );
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn a_maildir_syncs_with_one_deployment_and_a_forced_take_over_disables_the_other() {
    let tmp = tempfile::tempdir().unwrap();
    let maildir = tmp.path().join("Maildir");
    make_maildir(&maildir);
    let config_a = maildir_config(&tmp.path().join("a"), &maildir);
    let config_b = maildir_config(&tmp.path().join("b"), &maildir);
    one_mailbox_one_deployment(&Maildir(maildir), &config_a, &config_b);
}

// --- IMAP (Dovecot) -------------------------------------------------------

#[cfg(feature = "real-servers")]
mod imap {
    use super::servers::*;
    use super::*;

    const USER: &str = "user00200";

    /// Removes the marker folder before and after (also after a failure),
    /// so the other tests' deployment finds the user unclaimed.
    struct Unclaimed;

    impl Unclaimed {
        fn new() -> Self {
            reset_user(USER);
            doveadm(&format!("mailbox delete -u {USER} -s CRM-Mailsync"));
            Unclaimed
        }
    }

    impl Drop for Unclaimed {
        fn drop(&mut self) {
            doveadm(&format!("expunge -u {USER} mailbox CRM-Mailsync all"));
            doveadm(&format!("mailbox delete -u {USER} -s CRM-Mailsync"));
        }
    }

    struct Dovecot(Env);

    impl Mailbox for Dovecot {
        fn marker(&self) -> Option<String> {
            let root = self.0.dir.join("mail").join(USER).join("Maildir");
            let folder = root.join(".CRM-Mailsync");
            let mut ids = Vec::new();
            for sub in ["cur", "new"] {
                let Ok(entries) = std::fs::read_dir(folder.join(sub)) else {
                    continue;
                };
                for e in entries {
                    let text = std::fs::read_to_string(e.unwrap().path()).unwrap();
                    if let Some(id) = text
                        .lines()
                        .find_map(|l| l.strip_prefix("X-CRM-Mailsync-Deployment: "))
                    {
                        ids.push(id.trim().to_string());
                    }
                }
            }
            if ids.is_empty() {
                return None;
            }
            assert_eq!(ids.len(), 1, "one marker message, not {ids:?}");
            // Hidden: created, not subscribed (clients show subscribed folders).
            let subscribed =
                std::fs::read_to_string(root.join("subscriptions")).unwrap_or_default();
            assert!(
                !subscribed.lines().any(|l| l.trim() == "CRM-Mailsync"),
                "the marker folder must not be subscribed: {subscribed}"
            );
            ids.pop()
        }

        fn deliver(&self, tag: &str) {
            deliver(
                USER,
                "INBOX",
                format!("Message-ID: <{tag}.marker@example.test>\r\nFrom: x@customer.example\r\nTo: {USER}@example.test\r\nSubject: {tag}\r\n\r\nhello\r\n").as_bytes(),
            );
        }
    }

    fn config(env: &Env, dir: &Path) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        let path = server_config(
            env,
            dir,
            free_port(),
            &ServerMailbox {
                kind: "imap_smtp",
                port: env.imap,
                tls: "plain",
                user: USER,
                password: PASSWORD,
                auth: "password",
                extra_profile: "",
                extra_mailbox: "",
            },
        );
        // Checked every second, so the take-over shows at once.
        let text = std::fs::read_to_string(&path).unwrap().replacen(
            "shutdown_grace = \"10s\"",
            "shutdown_grace = \"10s\"\nmarker_check_every = \"1s\"",
            1,
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn an_imap_mailbox_syncs_with_one_deployment_and_a_forced_take_over_disables_the_other() {
        let env = env();
        let _unclaimed = Unclaimed::new();
        let tmp = tempfile::tempdir().unwrap();
        let config_a = config(&env, &tmp.path().join("a"));
        let config_b = config(&env, &tmp.path().join("b"));
        one_mailbox_one_deployment(&Dovecot(env), &config_a, &config_b);
    }
}
