//! The alert lifecycle against the real Dovecot: the server goes away for
//! longer than the stall threshold, then comes back. Operators must see one
//! Error alert per mailbox plus one profile alert (not a storm of one alert
//! per failed poll), and everything must recover and resolve by itself.
//! The CRM's webhook hears of the outage once: the profile alert, not one
//! event per mailbox (the storm rule).
//!
//! This file holds one test on purpose: it stops and restarts the shared
//! test servers, which no other test may see (cargo runs test binaries one
//! after the other, and this binary has nothing else in it).
#![cfg(feature = "real-servers")]

mod common;
mod servers;
#[path = "support/webhook_receiver.rs"]
mod webhook_receiver;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use serde_json::Value;
use servers::*;
use webhook_receiver::{Receiver, SECRETS};

const USERS: [&str; 4] = ["user00140", "user00141", "user00142", "user00143"];

/// Restarts the test servers when dropped, so a failing assertion does not
/// leave them down for whatever runs next.
struct ServersDown(bool);

impl ServersDown {
    fn stop() -> Self {
        script("down.sh", &[]);
        ServersDown(true)
    }

    fn start(&mut self) {
        if std::mem::take(&mut self.0) {
            script("up.sh", &["--no-install"]);
        }
    }
}

impl Drop for ServersDown {
    fn drop(&mut self) {
        self.start();
    }
}

fn config(
    env: &Env,
    dir: &std::path::Path,
    port: u16,
    maildir: &std::path::Path,
    webhook: &str,
) -> std::path::PathBuf {
    let secret_file = dir.join("webhook.secret");
    std::fs::write(&secret_file, format!("{}\n{}\n", SECRETS[0], SECRETS[1])).unwrap();
    let mut cfg = format!(
        r#"
[daemon]
state_dir = "{state}"
log_format = "json"
log_level = "warn"
shutdown_grace = "10s"

[admin]
listen = "127.0.0.1:{port}"
token = "{TOKEN}"

[crm]
type = "webhook"
url = "{webhook}"
secret_file = "{secret}"
timeout = "5s"
# The mailboxes notice the outage seconds apart, and their stall threshold
# here is only 4 s: the first Errors come before the profile alert.
alert_group_wait = "15s"

[[profiles]]
name = "dovecot"
type = "imap_smtp"
host = "{host}"
port = {imaps}
tls = "implicit"
ca_file = "{ca}"
tls_server_name = "{sn}"
auth = "password"
poll_interval = "1s"
connect_timeout = "2s"
io_timeout = "10s"
retry_backoff_max = "1s"
stall_alert_after = "4s"

[[profiles]]
name = "local"
type = "maildir"
poll_interval = "1s"

[[mailboxes]]
name = "local"
profile = "local"
email = "local@example.test"
approval = "approved"
path = "{maildir}"
"#,
        state = dir.join("state").display(),
        host = env.host,
        imaps = env.imaps,
        ca = env.ca.display(),
        sn = env.server_name,
        maildir = maildir.display(),
        secret = secret_file.display(),
    );
    for user in USERS {
        cfg.push_str(&format!(
            r#"
[[mailboxes]]
name = "{user}"
profile = "dovecot"
email = "{user}@example.test"
approval = "approved"
username = "{user}"
password = "{PASSWORD}"
"#
        ));
    }
    let path = dir.join("config.toml");
    std::fs::write(&path, cfg).unwrap();
    path
}

/// Activities per mailbox.
fn per_mailbox(port: u16) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for a in all_activities(port) {
        *out.entry(a["source"]["mailbox"].as_str().unwrap_or("").to_string())
            .or_default() += 1;
    }
    out
}

fn alerts(port: u16, query: &str) -> Vec<Value> {
    let v = get_json(port, &format!("/api/v1/alerts?limit=1000{query}"));
    v["alerts"].as_array().unwrap().clone()
}

/// (subject, kind, level) of alerts: a mailbox alert's subject is its
/// mailbox, a profile alert's its profile.
fn keys(list: &[Value]) -> Vec<(String, String, String)> {
    let mut out: Vec<_> = list
        .iter()
        .map(|a| {
            let subject = a["mailbox"]
                .as_str()
                .or(a["profile"].as_str())
                .unwrap_or("");
            (
                subject.to_string(),
                a["kind"].as_str().unwrap().to_string(),
                a["level"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn dovecot_down_past_the_threshold_gives_one_error_per_mailbox_and_one_profile_alert_and_all_resolve_when_it_is_back(
) {
    let env = env();
    for user in USERS {
        reset_user(user);
        deliver(user, "INBOX", &message(&format!("before-{user}")));
    }
    let dir = tempfile::tempdir().unwrap();
    let maildir = dir.path().join("local");
    make_maildir(&maildir);
    let port = free_port();
    let receiver = Receiver::start();
    let cfg = config(&env, dir.path(), port, &maildir, &receiver.url());
    let sent_alerts = || receiver.hook.seen.lock().unwrap().alerts.clone();
    let mut daemon = Running(Some(start(&cfg)));

    let synced = |n: usize| {
        move || {
            get(port, "/healthz", None)?;
            let counts = per_mailbox(port);
            USERS
                .iter()
                .all(|u| counts.get(*u) == Some(&n))
                .then_some(())
        }
    };
    wait_for(
        Duration::from_secs(30),
        "the first message of every mailbox",
        synced(1),
    );
    assert!(
        alerts(port, "&state=open").is_empty(),
        "a healthy start raises nothing: {:?}",
        alerts(port, "")
    );

    // Dovecot goes away; every poll of every mailbox fails from now on.
    let mut down = ServersDown::stop();
    let expected: Vec<(String, String, String)> = USERS
        .iter()
        .map(|u| (u.to_string(), "sync_failing".into(), "error".into()))
        .chain([("dovecot".into(), "profile_failing".into(), "error".into())])
        .collect();
    let mut expected = expected;
    expected.sort();
    wait_for(
        Duration::from_secs(40),
        "the Error alerts of the outage",
        || {
            let errors = alerts(port, "&state=open&level=error");
            (keys(&errors) == expected).then_some(())
        },
    );
    // Some more failed polls: the same alerts count up, none is added.
    let before = alerts(port, "&state=open");
    std::thread::sleep(Duration::from_secs(4));
    let during = alerts(port, "&state=open");
    assert_eq!(
        keys(&during),
        expected,
        "exactly one open alert per failing mailbox plus the profile's, no storm: {during:#?}"
    );
    for a in &during {
        let was = before
            .iter()
            .find(|b| b["id"] == a["id"])
            .unwrap_or_else(|| panic!("alert {} appeared during the outage: {a}", a["id"]));
        if a["kind"] == "sync_failing" {
            assert!(
                a["count"].as_u64() > was["count"].as_u64(),
                "failed polls are counted on the one alert: {was} → {a}"
            );
            let text = a["text"].as_str().unwrap();
            assert!(text.starts_with("not synced since "), "{text}");
        }
    }
    let profile = during
        .iter()
        .find(|a| a["kind"] == "profile_failing")
        .unwrap();
    assert_eq!(profile["mailbox"], Value::Null);
    let text = profile["text"].as_str().unwrap();
    assert!(
        text.starts_with("4 of 4 mailboxes of profile \"dovecot\" failed"),
        "{text}"
    );
    assert!(
        alerts(port, "&mailbox=local").is_empty(),
        "the Maildir mailbox of another profile is not touched"
    );
    // The webhook hears of it once, from the profile alert (raised at the
    // first failures, before any mailbox stalled): the mailboxes' Error
    // alerts are covered by it.
    let events = wait_for(
        Duration::from_secs(20),
        "the profile alert's webhook event",
        || {
            let a = sent_alerts();
            (!a.is_empty()).then_some(a)
        },
    );
    let data = &events[0]["data"];
    assert_eq!(data["kind"], "profile_failing", "{events:#?}");
    assert_eq!(data["profile"], "dovecot", "{data}");
    assert_eq!(data["mailbox"], Value::Null, "{data}");
    assert!(
        data["text"]
            .as_str()
            .unwrap()
            .contains("of 4 mailboxes of profile \"dovecot\" failed"),
        "{data}"
    );
    let (status, _) = get(port, "/readyz", None).unwrap();
    assert_eq!(
        status, 503,
        "mailboxes that cannot sync make the daemon unready"
    );

    // Dovecot is back: the mailboxes recover on their own, new mail arrives,
    // and every alert of the outage resolves.
    down.start();
    for user in USERS {
        deliver(user, "INBOX", &message(&format!("after-{user}")));
    }
    wait_for(
        Duration::from_secs(40),
        "the mail delivered after the outage",
        synced(2),
    );
    let all = wait_for(Duration::from_secs(20), "the alerts to resolve", || {
        let open = alerts(port, "&state=open");
        open.is_empty().then(|| alerts(port, ""))
    });
    assert_eq!(
        keys(&all),
        expected,
        "the same alerts, now resolved: {all:#?}"
    );
    for a in &all {
        assert!(a["resolved_at"].as_i64() >= a["last_seen"].as_i64(), "{a}");
    }
    let resolved = alerts(port, "&state=resolved&level=error");
    assert_eq!(resolved.len(), expected.len());
    for user in USERS {
        let m = get_json(port, &format!("/api/v1/mailboxes/{user}"));
        assert_eq!(m["not_synced_since"], Value::Null, "{m}");
        assert_ne!(m["phase"], "backing_off", "{m}");
    }
    daemon.stop();
    // Stopped: whatever the sender had to send is sent.
    let events = sent_alerts();
    assert_eq!(
        events.len(),
        1,
        "one webhook event for the whole outage, none per mailbox: {events:#?}"
    );
    assert!(receiver.hook.seen.lock().unwrap().problems.is_empty());
}
