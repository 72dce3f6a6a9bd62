//! One mailbox, one deployment: two daemons (two deployments, each with its
//! own store) on the same mailbox. The first claims it (a marker in the
//! mailbox), the second refuses it (disabled, an Error alert naming the
//! other deployment, nothing ingested) until an operator forces a take-over
//! with Test & Enable; then the first finds the new marker at its next
//! check and disables its side (the story is tests/common/deployment_story.rs,
//! which tests/graph.rs tells for Exchange Online). On the real Dovecot (a
//! hidden folder: it has no METADATA) and on a Maildir (a file).
//!
//! User: user00200 (the profile test of tests/test_enable.rs also logs in
//! as it; the guard below removes the markers this test leaves).

mod common;
#[path = "common/deployment_story.rs"]
mod deployment_story;
mod servers;

use std::path::{Path, PathBuf};

use common::*;
use deployment_story::*;
use serde_json::Value;

// --- Maildir -------------------------------------------------------------

struct Maildir(PathBuf);

impl MarkedMailbox for Maildir {
    fn name(&self) -> &str {
        "mb"
    }

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

    impl MarkedMailbox for Dovecot {
        fn name(&self) -> &str {
            "mb"
        }

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
