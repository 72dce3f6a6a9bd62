//! The POP3 connector end to end against the real Dovecot. Each test owns one
//! user (user00091 …) so tests run in parallel.
#![cfg(feature = "real-servers")]

mod common;
mod servers;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use crm_mailsync::connector::pop3::Credentials;
use crm_mailsync::connector::pop3_sync::{Pop3Connector, Pop3Settings};
use crm_mailsync::connector::Connector;
use crm_mailsync::error::{Classify, Disposition};
use crm_mailsync::net::{Endpoint, TlsMode};
use crm_mailsync::store::SledStore;
use servers::*;

fn inbox_count(user: &str) -> usize {
    doveadm_out(&format!("search -u {user} mailbox INBOX all"))
        .lines()
        .count()
}

/// 1,000 messages over POP3 (STLS or implicit TLS): each exactly once, and a
/// restart with 5 new messages adds exactly 5.
fn exactly_once(user: &str, tls: &str, port: u16) {
    let env = env();
    reset_user(user);
    bulk_generate(user, "INBOX", 1000, 51);
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    let cfg = server_config(
        &env,
        dir.path(),
        admin,
        &ServerMailbox {
            kind: "pop3_smtp",
            port,
            tls,
            user,
            password: PASSWORD,
            auth: "password",
            extra_profile: "batch_size = 150",
            extra_mailbox: "",
        },
    );
    let child = start(&cfg);
    wait_for(Duration::from_secs(180), "1000 activities", || {
        activity_total(admin).filter(|n| *n >= 1000)
    });
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(activity_total(admin), Some(1000));
    stop(child);
    for i in 0..5 {
        deliver(user, "INBOX", &message(&format!("pop-late-{i}")));
    }
    let child = start(&cfg);
    wait_for(Duration::from_secs(60), "1005 activities", || {
        activity_total(admin).filter(|n| *n >= 1005)
    });
    std::thread::sleep(Duration::from_secs(3));
    stop(child);
    let all = offline_activities(&cfg);
    assert_eq!(all.len(), 1005);
    let ids: std::collections::HashSet<&str> = all
        .iter()
        .map(|a| a["message_ids"][0].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 1005, "duplicate Message-IDs");
    // Nothing was deleted: delete_after_processing is off by default.
    assert_eq!(inbox_count(user), 1005);
}

#[test]
fn exactly_once_over_pop3_stls() {
    let env = env();
    exactly_once("user00091", "starttls", env.pop3);
}

#[test]
fn exactly_once_over_pop3s() {
    let env = env();
    exactly_once("user00092", "implicit", env.pop3s);
}

/// delete_after_processing: every message is recorded, then removed from the
/// maildrop (DELE after the commit, QUIT commits the deletions).
#[test]
fn delete_after_processing_empties_the_maildrop() {
    let env = env();
    let user = "user00093";
    reset_user(user);
    bulk_generate(user, "INBOX", 120, 52);
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    let cfg = server_config(
        &env,
        dir.path(),
        admin,
        &ServerMailbox {
            kind: "pop3_smtp",
            port: env.pop3,
            tls: "starttls",
            user,
            password: PASSWORD,
            auth: "password",
            extra_profile: "batch_size = 50",
            extra_mailbox: "delete_after_processing = true",
        },
    );
    let child = start(&cfg);
    wait_for(Duration::from_secs(60), "120 activities", || {
        activity_total(admin).filter(|n| *n >= 120)
    });
    wait_for(Duration::from_secs(30), "empty maildrop", || {
        (inbox_count(user) == 0).then_some(())
    });
    stop(child);
    assert_eq!(offline_activities(&cfg).len(), 120);
}

/// XOAUTH2 with the static token, through the daemon.
#[test]
fn xoauth2_login_syncs() {
    let env = env();
    let user = "user00094";
    reset_user(user);
    for i in 0..3 {
        deliver(user, "INBOX", &message(&format!("oauth-{i}")));
    }
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    let cfg = server_config(
        &env,
        dir.path(),
        admin,
        &ServerMailbox {
            kind: "pop3_smtp",
            port: env.pop3s,
            tls: "implicit",
            user,
            password: &env.token,
            auth: "oauth2",
            extra_profile: "",
            extra_mailbox: "",
        },
    );
    let child = start(&cfg);
    wait_for(Duration::from_secs(30), "3 activities", || {
        activity_total(admin).filter(|n| *n >= 3)
    });
    stop(child);
}

fn settings(env: &Env, user: &str, tls: TlsMode, port: u16, creds: Credentials) -> Pop3Settings {
    Pop3Settings {
        mailbox: format!("t-{user}"),
        endpoint: Endpoint {
            host: env.host.clone(),
            port,
            tls,
            tls_server_name: Some(env.server_name.clone()),
            ca_file: Some(env.ca.clone()),
            connect_timeout: Duration::from_secs(5),
            io_timeout: Duration::from_secs(10),
        },
        credentials: creds,
        token_provider: None,
        batch_size: 100,
        max_message_size: 1 << 20,
        delete_after_processing: false,
        transform: None,
    }
}

async fn test_result(s: Pop3Settings) -> Result<String, crm_mailsync::connector::ConnectorError> {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SledStore::open(&dir.path().join("s")).unwrap());
    let mut c = Pop3Connector::new(s, store);
    let r = c.test().await;
    c.close().await;
    r
}

#[tokio::test]
async fn error_classification() {
    let env = env();
    let user = "user00095";
    let pw = |p: &str| Credentials::Password {
        user: user.into(),
        pass: p.into(),
    };
    let e = test_result(settings(
        &env,
        user,
        TlsMode::StartTls,
        env.pop3,
        pw("wrong"),
    ))
    .await
    .unwrap_err();
    assert_eq!(e.disposition(), Disposition::Permanent, "{e}");
    let e = test_result(settings(
        &env,
        user,
        TlsMode::StartTls,
        free_port(),
        pw(PASSWORD),
    ))
    .await
    .unwrap_err();
    assert_eq!(e.disposition(), Disposition::Transient, "{e}");
    let mut s = settings(&env, user, TlsMode::Implicit, env.pop3s, pw(PASSWORD));
    s.endpoint.ca_file = None;
    let e = test_result(s).await.unwrap_err();
    assert_eq!(e.disposition(), Disposition::Permanent, "{e}");
    assert!(e.to_string().contains("certificate"), "{e}");
    let ok = test_result(settings(
        &env,
        user,
        TlsMode::StartTls,
        env.pop3,
        Credentials::OAuth2 {
            user: user.into(),
            token: env.token.clone(),
        },
    ))
    .await
    .unwrap();
    assert!(ok.contains("UIDL yes"), "{ok}");
}

/// SIGKILL at random points of a 2,000-message POP3 sync with
/// delete_after_processing, 5 times: exactly 2,000 activities and, in the end,
/// an empty maildrop (deletions lost to a kill before QUIT are redone).
#[test]
fn sigkill_with_delete_after_processing() {
    const N: u64 = 2000;
    let env = env();
    let user = "user00098";
    reset_user(user);
    bulk_generate(user, "INBOX", N as usize, 53);
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    let cfg = server_config(
        &env,
        dir.path(),
        admin,
        &ServerMailbox {
            kind: "pop3_smtp",
            port: env.pop3,
            tls: "starttls",
            user,
            password: PASSWORD,
            auth: "password",
            extra_profile: "batch_size = 100",
            extra_mailbox: "delete_after_processing = true",
        },
    );
    let mut marks: Vec<u64> = (0..5).map(|_| fastrand::u64(1..N)).collect();
    marks.sort();
    for mark in marks {
        let mut child = start(&cfg);
        wait_for(Duration::from_secs(120), "progress mark", || {
            activity_total(admin).filter(|n| *n >= mark)
        });
        std::thread::sleep(Duration::from_millis(fastrand::u64(0..100)));
        child.kill().unwrap();
        child.wait().unwrap();
    }
    let child = start(&cfg);
    wait_for(Duration::from_secs(120), "all activities", || {
        activity_total(admin).filter(|n| *n >= N)
    });
    wait_for(Duration::from_secs(60), "empty maildrop", || {
        (inbox_count(user) == 0).then_some(())
    });
    std::thread::sleep(Duration::from_millis(1500));
    stop(child);
    let all = offline_activities(&cfg);
    assert_eq!(all.len() as u64, N);
    let ids: std::collections::HashSet<&str> = all
        .iter()
        .map(|a| a["message_ids"][0].as_str().unwrap())
        .collect();
    assert_eq!(ids.len() as u64, N, "duplicate Message-IDs");
}

/// A message with a body of `n` bytes, to go over a small max_message_size.
fn big_message(tag: &str, n: usize) -> Vec<u8> {
    let mut m = message(tag);
    let line = "x".repeat(76) + "\r\n";
    while m.len() < n {
        m.extend_from_slice(line.as_bytes());
    }
    m
}

/// The quarantine list via the API.
fn quarantine(admin: u16) -> Vec<serde_json::Value> {
    get_json(admin, "/api/v1/quarantine")["quarantine"]
        .as_array()
        .unwrap()
        .clone()
}

/// POP3: a message over max_message_size (known from LIST) becomes one
/// quarantine record and one alert, not a warning every cycle, and stays on
/// the server even with delete_after_processing.
#[test]
fn oversized_message_is_recorded_once_and_left_on_the_server() {
    let env = env();
    let user = "user00123";
    reset_user(user);
    deliver(user, "INBOX", &message("small-1"));
    deliver(user, "INBOX", &big_message("big", 20_000));
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    let cfg = server_config(
        &env,
        dir.path(),
        admin,
        &ServerMailbox {
            kind: "pop3_smtp",
            port: env.pop3s,
            tls: "implicit",
            user,
            password: PASSWORD,
            auth: "password",
            extra_profile: "max_message_size = 4096",
            extra_mailbox: "delete_after_processing = true",
        },
    );
    let child = start(&cfg);
    wait_for(Duration::from_secs(30), "1 activity", || {
        activity_total(admin).filter(|n| *n >= 1)
    });
    let q = quarantine(admin);
    assert_eq!(q.len(), 1, "{q:?}");
    let reason = q[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("exceeds the 4096-byte limit")
            && reason.contains("left on the server in INBOX"),
        "{reason}"
    );
    assert_eq!(q[0]["saved_as"], "", "{q:?}");
    // Several more 1-second poll cycles (the small message's deletion is one).
    wait_for(Duration::from_secs(30), "small message deleted", || {
        (inbox_count(user) == 1).then_some(())
    });
    let cycles_before = get_json(admin, "/api/v1/mailboxes/mb")["state"]["last_sync_at"].as_i64();
    wait_for(Duration::from_secs(30), "more cycles", || {
        let now = get_json(admin, "/api/v1/mailboxes/mb")["state"]["last_sync_at"].as_i64();
        (now > cycles_before.map(|t| t + 2)).then_some(())
    });
    assert_eq!(quarantine(admin).len(), 1);
    let alerts = get_json(admin, "/api/v1/alerts");
    let about_big: Vec<_> = alerts["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["text"].as_str().unwrap_or("").contains("4096"))
        .collect();
    assert_eq!(about_big.len(), 1, "{alerts}");
    assert_eq!(about_big[0]["count"], 1, "{alerts}");
    // The big message is still on the server.
    assert_eq!(inbox_count(user), 1);
    stop(child);
}

/// Regression (#17 §3): a `-ERR` to RETR of one message (Dovecot answers
/// so when it cannot read the message file) failed the cycle every time,
/// so nothing after it was processed and the mailbox was eventually
/// disabled. Now it is quarantined with the server's reason, the rest is
/// recorded, and, having no bytes here, it stays on the server even with
/// delete_after_processing.
#[test]
fn retr_err_quarantines_the_message_and_the_rest_syncs() {
    let env = env();
    let user = "user00184";
    reset_user(user);
    deliver(user, "INBOX", &message("pop-readable-1"));
    let bad = deliver(user, "INBOX", &message("pop-unreadable"));
    deliver(user, "INBOX", &message("pop-readable-2"));
    chmod(&inbox_message_file(&env, user, bad), 0o000);
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    let cfg = server_config(
        &env,
        dir.path(),
        admin,
        &ServerMailbox {
            kind: "pop3_smtp",
            port: env.pop3,
            tls: "starttls",
            user,
            password: PASSWORD,
            auth: "password",
            extra_profile: "",
            extra_mailbox: "delete_after_processing = true",
        },
    );
    let child = start(&cfg);
    wait_for(Duration::from_secs(30), "2 activities", || {
        activity_total(admin).filter(|n| *n >= 2)
    });
    let q = wait_for(Duration::from_secs(30), "quarantine record", || {
        let q = quarantine(admin);
        (!q.is_empty()).then_some(q)
    });
    assert_eq!(q.len(), 1, "{q:?}");
    let reason = q[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("rejected RETR") && reason.contains("left on the server in INBOX"),
        "{reason}"
    );
    assert_eq!(q[0]["saved_as"], "", "{q:?}");
    wait_for(Duration::from_secs(30), "readable messages deleted", || {
        (inbox_count(user) == 1).then_some(())
    });
    let before = get_json(admin, "/api/v1/mailboxes/mb")["state"]["last_sync_at"].as_i64();
    wait_for(Duration::from_secs(30), "more cycles", || {
        let now = get_json(admin, "/api/v1/mailboxes/mb")["state"]["last_sync_at"].as_i64();
        (now > before.map(|t| t + 2)).then_some(())
    });
    let mb = get_json(admin, "/api/v1/mailboxes/mb");
    assert_eq!(mb["state"]["enabled"], true, "{mb}");
    assert!(mb["state"]["last_sync_error"].is_null(), "{mb}");
    assert_eq!(quarantine(admin).len(), 1);
    stop(child);
    // Readable again: it was left alone, never deleted.
    chmod(&inbox_message_file(&env, user, bad), 0o600);
    assert_eq!(inbox_count(user), 1);
    assert_eq!(offline_activities(&cfg).len(), 2);
}
