//! The IMAP connector end to end against the real Dovecot: the daemon binary
//! syncing real mailboxes, and the connector's error classification.
//! Each test owns one user (user00070 …) so tests run in parallel.
#![cfg(feature = "real-servers")]

mod common;
mod servers;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use crm_mailsync::connector::imap::{Credentials, ImapConnector, ImapSettings};
use crm_mailsync::connector::Connector;
use crm_mailsync::error::{Classify, Disposition};
use crm_mailsync::net::{Endpoint, TlsMode};
use crm_mailsync::store::SledStore;
use servers::*;

const TRACKED: &str = r#"tracked_folders = [
  { folder = "INBOX/T1", regarding = "account:t1" },
  { folder = "INBOX/T2", regarding = "account:t2" },
  { folder = "INBOX/T3", regarding = "contact:t3" },
]"#;

/// 700 in INBOX + 100/110/90 in three tracked folders, then the daemon syncs
/// them; each message becomes exactly one activity, tracked folders apply
/// their rule, and a restart plus new mail adds exactly the new mail.
fn exactly_once(user: &str, tls: &str, port: u16) {
    let env = env();
    reset_user(user);
    bulk_generate(user, "INBOX", 700, 11);
    bulk_generate(user, "INBOX/T1", 100, 12);
    bulk_generate(user, "INBOX/T2", 110, 13);
    bulk_generate(user, "INBOX/T3", 90, 14);
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    let cfg = server_config(
        &env,
        dir.path(),
        admin,
        &ServerMailbox {
            kind: "imap_smtp",
            port,
            tls,
            user,
            password: PASSWORD,
            auth: "password",
            extra_profile: "batch_size = 150\nprocessed_keyword = \"$CRMTracked\"",
            extra_mailbox: TRACKED,
        },
    );
    let child = start(&cfg);
    wait_for(Duration::from_secs(180), "1000 activities", || {
        activity_total(admin).filter(|n| *n >= 1000)
    });
    // A few more poll cycles must not add anything.
    std::thread::sleep(Duration::from_secs(3));
    let acts = all_activities(admin);
    assert_eq!(acts.len(), 1000);
    let mut ids = std::collections::HashSet::new();
    let mut per_regarding: HashMap<String, usize> = HashMap::new();
    for a in &acts {
        let mid = a["message_ids"][0].as_str().unwrap_or_default().to_string();
        assert!(ids.insert(mid.clone()), "duplicate activity for {mid}");
        let folder = a["source"]["folder"].as_str().unwrap().to_string();
        if folder != "INBOX" {
            let r = a["regarding"].as_str().unwrap_or("none").to_string();
            *per_regarding.entry(format!("{folder}={r}")).or_default() += 1;
        }
    }
    // Folder rules win for messages that start a conversation; replies may be
    // correlated to their parent instead, so count the folder ones at least.
    for (key, min) in [
        ("INBOX/T1=account:t1", 50),
        ("INBOX/T2=account:t2", 50),
        ("INBOX/T3=contact:t3", 40),
    ] {
        let n = per_regarding.get(key).copied().unwrap_or(0);
        assert!(n >= min, "{key}: {n} < {min}; {per_regarding:?}");
    }
    stop(child);

    // Restart with the same state, plus 5 new messages: exactly 1005.
    for i in 0..5 {
        deliver(user, "INBOX/T2", &message(&format!("late-{i}")));
    }
    let child = start(&cfg);
    wait_for(Duration::from_secs(60), "1005 activities", || {
        activity_total(admin).filter(|n| *n >= 1005)
    });
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(activity_total(admin), Some(1005));
    stop(child);

    // Processed messages carry the keyword.
    let flagged = doveadm_out(&format!(
        "search -u {user} mailbox INBOX keyword '$CRMTracked'"
    ));
    assert_eq!(flagged.lines().count(), 700, "{flagged}");
}

#[test]
fn exactly_once_over_imap_starttls() {
    let env = env();
    exactly_once("user00070", "starttls", env.imap);
}

#[test]
fn exactly_once_over_imaps() {
    let env = env();
    exactly_once("user00071", "implicit", env.imaps);
}

/// Server-side UIDVALIDITY reset: the folder is re-scanned, nothing is
/// recorded twice, new mail still arrives, and an Information alert says why.
#[test]
fn uidvalidity_reset_creates_no_duplicates() {
    let env = env();
    let user = "user00072";
    reset_user(user);
    bulk_generate(user, "INBOX", 60, 21);
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    let cfg = server_config(
        &env,
        dir.path(),
        admin,
        &ServerMailbox {
            kind: "imap_smtp",
            port: env.imap,
            tls: "starttls",
            user,
            password: PASSWORD,
            auth: "password",
            extra_profile: "batch_size = 25",
            extra_mailbox: "",
        },
    );
    let child = start(&cfg);
    wait_for(Duration::from_secs(60), "60 activities", || {
        activity_total(admin).filter(|n| *n >= 60)
    });
    let out = script("reset-uidvalidity.sh", &[user]);
    assert_ne!(
        field(&out, "old_uidvalidity"),
        field(&out, "new_uidvalidity")
    );
    deliver(user, "INBOX", &message("after-reset"));
    wait_for(Duration::from_secs(60), "61 activities", || {
        activity_total(admin).filter(|n| *n >= 61)
    });
    wait_for(Duration::from_secs(30), "UIDVALIDITY alert", || {
        let alerts = get_json(admin, "/api/v1/alerts");
        alerts["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| {
                a["level"] == "information"
                    && a["text"].as_str().unwrap_or("").contains("UIDVALIDITY")
            })
            .then_some(())
    });
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(activity_total(admin), Some(61));
    stop(child);
}

/// A message delivered while the daemon IDLEs is stored quickly. The poll
/// interval is 10 minutes, so only IDLE can deliver it in time.
#[test]
fn idle_delivers_within_two_seconds() {
    let env = env();
    let user = "user00073";
    reset_user(user);
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    let cfg = server_config(
        &env,
        dir.path(),
        admin,
        &ServerMailbox {
            kind: "imap_smtp",
            port: env.imap,
            tls: "starttls",
            user,
            password: PASSWORD,
            auth: "password",
            extra_profile: "idle = true",
            extra_mailbox: "",
        },
    )
    .to_string_lossy()
    .into_owned();
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("poll_interval = \"1s\"", "poll_interval = \"10m\"");
    std::fs::write(&cfg, text).unwrap();
    let child = start(std::path::Path::new(&cfg));
    wait_for(Duration::from_secs(30), "mailbox waiting", || {
        let (_, m) = get(admin, "/api/v1/mailboxes", Some(TOKEN))?;
        m.contains("\"waiting\"").then_some(())
    });
    let rounds = 200;
    let mut lat = Vec::with_capacity(rounds);
    for i in 0..rounds {
        let before = activity_total(admin).unwrap();
        deliver(user, "INBOX", &message(&format!("idle-{i}")));
        let t = Instant::now();
        wait_for(Duration::from_secs(30), "IDLE delivery", || {
            activity_total(admin).filter(|n| *n > before)
        });
        lat.push(t.elapsed());
    }
    stop(child);
    lat.sort();
    let p50 = lat[rounds / 2];
    let p99 = lat[rounds * 99 / 100];
    let max = lat[rounds - 1];
    println!("IDLE delivery latency over {rounds}: p50 {p50:?} p99 {p99:?} max {max:?}");
    assert!(p50 < Duration::from_secs(2), "p50 {p50:?}");
    assert!(max < Duration::from_secs(15), "max {max:?}");
}

fn settings(env: &Env, user: &str, tls: TlsMode, port: u16, creds: Credentials) -> ImapSettings {
    ImapSettings {
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
        max_message_size: 1 << 20,
        folders: vec![],
        batch_size: 100,
        process_email_from: None,
        move_failed_to: None,
        processed_keyword: None,
        delete_after_processing: false,
        idle: false,
        transform: None,
        missing_message_retries: 3,
    }
}

async fn test_result(s: ImapSettings) -> Result<String, crm_mailsync::connector::ConnectorError> {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SledStore::open(&dir.path().join("s")).unwrap());
    let mut c = ImapConnector::new(s, store);
    let r = c.test().await;
    c.close().await;
    r
}

#[tokio::test]
async fn error_classification() {
    let env = env();
    let user = "user00074";
    let pw = |p: &str| Credentials::Password {
        user: user.into(),
        pass: p.into(),
    };
    // Wrong password: permanent.
    let e = test_result(settings(
        &env,
        user,
        TlsMode::StartTls,
        env.imap,
        pw("wrong"),
    ))
    .await
    .unwrap_err();
    assert_eq!(e.disposition(), Disposition::Permanent, "{e}");
    assert!(e.to_string().contains("AUTHENTICATIONFAILED"), "{e}");
    // Nothing listening (server stopped): transient.
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
    // Unknown CA: permanent, naming the certificate problem.
    let mut s = settings(&env, user, TlsMode::Implicit, env.imaps, pw(PASSWORD));
    s.endpoint.ca_file = None;
    let e = test_result(s).await.unwrap_err();
    assert_eq!(e.disposition(), Disposition::Permanent, "{e}");
    assert!(e.to_string().contains("certificate"), "{e}");
    // A tracked folder that does not exist no longer fails Test & Enable
    // (#17 §7): the rest of the mailbox syncs, the test line names it.
    let mut s = settings(&env, user, TlsMode::StartTls, env.imap, pw(PASSWORD));
    s.folders = vec!["INBOX/DoesNotExist".into()];
    let line = test_result(s).await.unwrap();
    assert!(
        line.contains("1 missing on the server: INBOX/DoesNotExist"),
        "{line}"
    );
    // The right password works, over both TLS modes.
    test_result(settings(
        &env,
        user,
        TlsMode::StartTls,
        env.imap,
        pw(PASSWORD),
    ))
    .await
    .unwrap();
    test_result(settings(
        &env,
        user,
        TlsMode::Implicit,
        env.imaps,
        pw(PASSWORD),
    ))
    .await
    .unwrap();
}

#[tokio::test]
async fn xoauth2_with_static_token() {
    let env = env();
    let user = "user00074";
    let ok = test_result(settings(
        &env,
        user,
        TlsMode::Implicit,
        env.imaps,
        Credentials::OAuth2 {
            user: user.into(),
            token: env.token.clone(),
        },
    ))
    .await
    .unwrap();
    assert!(ok.contains("logged in"), "{ok}");
    let e = test_result(settings(
        &env,
        user,
        TlsMode::StartTls,
        env.imap,
        Credentials::OAuth2 {
            user: user.into(),
            token: "not-the-token".into(),
        },
    ))
    .await
    .unwrap_err();
    assert_eq!(e.disposition(), Disposition::Permanent, "{e}");
}

/// Wrong password through the daemon: the mailbox is disabled with the reason.
#[test]
fn daemon_disables_mailbox_on_wrong_password() {
    let env = env();
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    let cfg = server_config(
        &env,
        dir.path(),
        admin,
        &ServerMailbox {
            kind: "imap_smtp",
            port: env.imap,
            tls: "starttls",
            user: "user00075",
            password: "wrong",
            auth: "password",
            extra_profile: "",
            extra_mailbox: "",
        },
    );
    let child = start(&cfg);
    let m = wait_for(Duration::from_secs(30), "mailbox disabled", || {
        let (_, m) = get(admin, "/api/v1/mailboxes", Some(TOKEN))?;
        m.contains("\"disabled\"").then_some(m)
    });
    assert!(m.contains("AUTHENTICATIONFAILED"), "{m}");
    stop(child);
}

/// Checks a finished state: exactly `n` activities, each source and each
/// Message-ID once.
fn assert_exactly_once(cfg: &std::path::Path, n: usize, what: &str) {
    let all = offline_activities(cfg);
    assert_eq!(all.len(), n, "{what}: {} activities", all.len());
    let sources: std::collections::HashSet<String> = all
        .iter()
        .map(|a| a["source"]["uid"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(sources.len(), n, "{what}: duplicate sources");
    let ids: std::collections::HashSet<String> = all
        .iter()
        .map(|a| a["message_ids"][0].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), n, "{what}: duplicate Message-IDs");
}

/// SIGKILL at a random point of a 5,000-message initial IMAP sync, restart,
/// let it finish: exactly 5,000 activities. Twenty rounds over one loaded
/// mailbox, each with a fresh state dir.
#[test]
fn sigkill_during_initial_sync_20_times() {
    const N: u64 = 5000;
    let env = env();
    let user = "user00076";
    reset_user(user);
    bulk_generate(user, "INBOX", N as usize, 31);
    let dir = tempfile::tempdir().unwrap();
    let mut mid_sync = 0;
    for round in 0..20 {
        let round_dir = dir.path().join(format!("round{round}"));
        std::fs::create_dir_all(&round_dir).unwrap();
        let admin = free_port();
        let cfg = server_config(
            &env,
            &round_dir,
            admin,
            &ServerMailbox {
                kind: "imap_smtp",
                port: env.imap,
                tls: "starttls",
                user,
                password: PASSWORD,
                auth: "password",
                extra_profile: "batch_size = 250",
                extra_mailbox: "",
            },
        );
        let mut child = start(&cfg);
        let mark = fastrand::u64(1..N);
        let seen = wait_for(Duration::from_secs(120), "progress mark", || {
            activity_total(admin).filter(|n| *n >= mark)
        });
        // A little random extra so kills also land mid-fetch, not only right
        // after a commit.
        std::thread::sleep(Duration::from_millis(fastrand::u64(0..150)));
        child.kill().unwrap();
        child.wait().unwrap();
        if seen < N {
            mid_sync += 1;
        }
        let child = start(&cfg);
        wait_for(Duration::from_secs(180), "all activities", || {
            activity_total(admin).filter(|n| *n >= N)
        });
        std::thread::sleep(Duration::from_millis(1500));
        stop(child);
        assert_exactly_once(&cfg, N as usize, &format!("round {round}"));
    }
    assert!(
        mid_sync >= 15,
        "only {mid_sync} of 20 kills landed mid-sync"
    );
}

/// A private Dovecot (own state dir and ports), stopped and purged on drop.
struct PrivateServers {
    vars: Vec<(String, String)>,
}

impl PrivateServers {
    fn start(tag: &str) -> Self {
        let dir = format!("/tmp/cms-{tag}-{}", std::process::id());
        let mut vars = vec![("TESTSERVERS_DIR".to_string(), dir)];
        for k in ["IMAP", "IMAPS", "POP3", "POP3S", "SMTP", "SMTPS"] {
            vars.push((format!("TESTSERVERS_{k}_PORT"), free_port().to_string()));
        }
        let s = PrivateServers { vars };
        s.run("up.sh", &["--no-install"]);
        s
    }

    fn port(&self, k: &str) -> u16 {
        let key = format!("TESTSERVERS_{k}_PORT");
        self.vars
            .iter()
            .find(|(n, _)| *n == key)
            .and_then(|(_, v)| v.parse().ok())
            .unwrap()
    }

    fn run(&self, name: &str, args: &[&str]) -> String {
        let out = std::process::Command::new(format!("{SCRIPTS}/{name}"))
            .args(args)
            .envs(self.vars.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .output()
            .unwrap();
        assert!(out.status.success(), "{name} {args:?}: {}", out.status);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for PrivateServers {
    fn drop(&mut self) {
        let _ = std::process::Command::new(format!("{SCRIPTS}/down.sh"))
            .arg("--purge")
            .envs(self.vars.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .status();
    }
}

/// Dovecot restarted twice during a 5,000-message initial sync: the daemon
/// backs off, reconnects and ends with exactly 5,000 activities.
#[test]
fn dovecot_restart_mid_fetch() {
    const N: u64 = 5000;
    let mut env = env();
    let servers = PrivateServers::start("conn");
    env.imap = servers.port("IMAP");
    let load = servers.run(
        "bulk-load.sh",
        &["alice", "--generate", &N.to_string(), "--seed", "41"],
    );
    assert_eq!(field(&load, "added").as_deref(), Some("5000"), "{load}");
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    let cfg = server_config(
        &env,
        dir.path(),
        admin,
        &ServerMailbox {
            kind: "imap_smtp",
            port: env.imap,
            tls: "starttls",
            user: "alice",
            password: PASSWORD,
            auth: "password",
            extra_profile: "batch_size = 100",
            extra_mailbox: "",
        },
    );
    // The private CA differs from the shared instance's.
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        &env.ca.display().to_string(),
        &format!("{}/tls/ca.pem", servers.vars[0].1),
    );
    std::fs::write(&cfg, text).unwrap();
    let child = start(&cfg);
    let mut restarts = 0;
    for mark in [1000, 3000] {
        let seen = wait_for(Duration::from_secs(120), "progress mark", || {
            activity_total(admin).filter(|n| *n >= mark)
        });
        if seen < N {
            restarts += 1;
        }
        servers.run("up.sh", &["--no-install", "--restart"]);
    }
    wait_for(Duration::from_secs(240), "all activities", || {
        activity_total(admin).filter(|n| *n >= N)
    });
    std::thread::sleep(Duration::from_millis(1500));
    stop(child);
    assert_exactly_once(&cfg, N as usize, "after Dovecot restarts");
    assert!(restarts >= 1, "no restart landed mid-sync");
}

/// A message the pipeline cannot parse is quarantined and moved to the
/// configured failed-mail folder (created on demand); good mail gets the keyword.
#[test]
fn failed_message_is_moved_to_undeliverable() {
    let env = env();
    let user = "user00077";
    reset_user(user);
    deliver(user, "INBOX", b"garbage without any header section\r\n");
    deliver(user, "INBOX", &message("good"));
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    let cfg = server_config(
        &env,
        dir.path(),
        admin,
        &ServerMailbox {
            kind: "imap_smtp",
            port: env.imap,
            tls: "starttls",
            user,
            password: PASSWORD,
            auth: "password",
            extra_profile:
                "move_failed_to = \"Undeliverable\"\nprocessed_keyword = \"$CRMTracked\"",
            extra_mailbox: "",
        },
    );
    let child = start(&cfg);
    wait_for(Duration::from_secs(30), "moved to Undeliverable", || {
        let n = doveadm_out(&format!("search -u {user} mailbox Undeliverable all"))
            .lines()
            .count();
        (n == 1).then_some(())
    });
    stop(child);
    assert_eq!(
        doveadm_out(&format!("search -u {user} mailbox INBOX all"))
            .lines()
            .count(),
        1
    );
    assert_eq!(
        doveadm_out(&format!(
            "search -u {user} mailbox INBOX keyword '$CRMTracked'"
        ))
        .lines()
        .count(),
        1
    );
    assert_eq!(offline_activities(&cfg).len(), 1);
}

/// "Process email from": the first sync takes only mail received on or after
/// the date (Dovecot's own SEARCH SINCE count is the reference).
#[test]
fn first_sync_honours_process_email_from() {
    let env = env();
    let user = "user00078";
    reset_user(user);
    bulk_generate(user, "INBOX", 400, 61);
    let expected = doveadm_out(&format!("search -u {user} mailbox INBOX since 2025-12-01"))
        .lines()
        .count() as u64;
    assert!(expected > 0 && expected < 400, "{expected}");
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    let cfg = server_config(
        &env,
        dir.path(),
        admin,
        &ServerMailbox {
            kind: "imap_smtp",
            port: env.imap,
            tls: "starttls",
            user,
            password: PASSWORD,
            auth: "password",
            extra_profile: "process_email_from = \"2025-12-01\"\nbatch_size = 50",
            extra_mailbox: "",
        },
    );
    let child = start(&cfg);
    wait_for(Duration::from_secs(60), "the recent mail", || {
        activity_total(admin).filter(|n| *n >= expected)
    });
    std::thread::sleep(Duration::from_secs(3));
    stop(child);
    assert_eq!(offline_activities(&cfg).len() as u64, expected);
}

/// Three IDLE-capable mailboxes on a profile limited to one connection: the
/// permit is shared in turn (no starvation), every message arrives.
#[test]
fn connection_limit_shared_by_idling_mailboxes() {
    let env = env();
    let users = ["user00079", "user00080", "user00097"];
    for (i, u) in users.iter().enumerate() {
        reset_user(u);
        bulk_generate(u, "INBOX", 30, 70 + i as u32);
    }
    let extra: String = users[1..]
        .iter()
        .map(|u| {
            format!(
                "\n[[mailboxes]]\nname = \"{u}\"\nprofile = \"srv\"\nemail = \"{u}@example.test\"\napproval = \"approved\"\nusername = \"{u}\"\npassword = \"{PASSWORD}\"\n"
            )
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    let cfg = server_config(
        &env,
        dir.path(),
        admin,
        &ServerMailbox {
            kind: "imap_smtp",
            port: env.imap,
            tls: "starttls",
            user: users[0],
            password: PASSWORD,
            auth: "password",
            extra_profile: "max_concurrent_connections = 1\nidle = true",
            extra_mailbox: &extra,
        },
    );
    let child = start(&cfg);
    wait_for(Duration::from_secs(60), "90 activities", || {
        activity_total(admin).filter(|n| *n >= 90)
    });
    for u in users {
        deliver(u, "INBOX", &message(&format!("limit-{u}")));
    }
    wait_for(Duration::from_secs(60), "93 activities", || {
        activity_total(admin).filter(|n| *n >= 93)
    });
    stop(child);
    assert_eq!(offline_activities(&cfg).len(), 93);
}

/// New mail in several folders is processed in arrival order: a reply that
/// lands in INBOX after its parent was filed in a tracked folder is linked to
/// the parent (and inherits its regarding), although INBOX is scanned first.
#[test]
fn folders_are_merged_in_arrival_order() {
    let env = env();
    let user = "user00099";
    reset_user(user);
    let tag = format!("{}-{}", std::process::id(), fastrand::u32(..));
    let parent = format!(
        "From: Customer <c@customer.example>\r\nTo: {user}@example.test\r\nSubject: Contract {tag}\r\nDate: Thu, 01 Jan 2026 10:00:00 +0000\r\nMessage-ID: <parent-{tag}@customer.example>\r\n\r\nHere is the contract.\r\n"
    );
    let reply = format!(
        "From: Customer <c@customer.example>\r\nTo: {user}@example.test\r\nSubject: Re: Contract {tag}\r\nDate: Thu, 01 Jan 2026 10:05:00 +0000\r\nMessage-ID: <reply-{tag}@customer.example>\r\nIn-Reply-To: <parent-{tag}@customer.example>\r\nReferences: <parent-{tag}@customer.example>\r\n\r\nSigned copy attached.\r\n"
    );
    deliver(user, "INBOX/T1", parent.as_bytes());
    // INTERNALDATE has one-second resolution.
    std::thread::sleep(Duration::from_millis(1100));
    deliver(user, "INBOX", reply.as_bytes());
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    let cfg = server_config(
        &env,
        dir.path(),
        admin,
        &ServerMailbox {
            kind: "imap_smtp",
            port: env.imap,
            tls: "starttls",
            user,
            password: PASSWORD,
            auth: "password",
            // One message per batch: the merge must work across batches too.
            extra_profile: "batch_size = 1",
            extra_mailbox: r#"tracked_folders = [{ folder = "INBOX/T1", regarding = "account:t1" }]"#,
        },
    );
    let child = start(&cfg);
    wait_for(Duration::from_secs(30), "2 activities", || {
        activity_total(admin).filter(|n| *n >= 2)
    });
    stop(child);
    let all = offline_activities(&cfg);
    let by_id = |id: &str| {
        all.iter()
            .find(|a| a["message_ids"][0].as_str() == Some(id))
            .unwrap_or_else(|| panic!("no activity {id}: {all:?}"))
            .clone()
    };
    let p = by_id(&format!("parent-{tag}@customer.example"));
    let r = by_id(&format!("reply-{tag}@customer.example"));
    assert_eq!(p["regarding"], "account:t1", "{p}");
    assert_eq!(r["method"], "in_reply_to", "{r}");
    assert_eq!(r["correlated_with"], p["id"], "{r}");
    assert_eq!(r["regarding"], "account:t1", "{r}");
}

/// Folder tracking over IMAP: a message MOVEd from one tracked folder to
/// another is re-pointed to the new folder's record; moving it on to an
/// untracked folder does not untrack it. Still one activity throughout.
#[test]
fn message_moved_between_tracked_folders_is_re_pointed() {
    let env = env();
    let user = "user00120";
    reset_user(user);
    let msg = message("moving");
    deliver(user, "INBOX/T1", &msg);
    deliver(user, "INBOX/T2", &message("anchor-t2"));
    deliver(user, "INBOX/T3", &message("anchor-t3"));
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    let cfg = server_config(
        &env,
        dir.path(),
        admin,
        &ServerMailbox {
            kind: "imap_smtp",
            port: env.imap,
            tls: "starttls",
            user,
            password: PASSWORD,
            auth: "password",
            extra_profile: "idle = false",
            extra_mailbox: TRACKED,
        },
    );
    let child = start(&cfg);
    let regarding_of_moving = || {
        // The API may not be up yet right after start.
        activity_total(admin)?;
        let all = all_activities(admin);
        let moving: Vec<_> = all
            .iter()
            .filter(|a| a["subject"] == "moving")
            .cloned()
            .collect();
        assert!(moving.len() <= 1, "duplicate activity: {moving:?}");
        moving
            .first()
            .and_then(|a| a["regarding"].as_str().map(str::to_string))
    };
    wait_for(Duration::from_secs(30), "first sync", || {
        regarding_of_moving().filter(|r| r == "account:t1")
    });
    assert!(doveadm(&format!(
        "move -u {user} INBOX/T2 mailbox INBOX/T1 all"
    )));
    wait_for(Duration::from_secs(30), "re-point to account:t2", || {
        regarding_of_moving().filter(|r| r == "account:t2")
    });
    let moved = all_activities(admin)
        .into_iter()
        .find(|a| a["subject"] == "moving")
        .unwrap();
    assert_eq!(moved["method"], "folder");
    assert!(
        moved["reasons"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r.as_str().unwrap().contains("INBOX/T2")),
        "{moved}"
    );
    // Leaving tracked folders (to INBOX) keeps the record.
    assert!(doveadm(&format!(
        "move -u {user} INBOX mailbox INBOX/T2 subject moving"
    )));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(regarding_of_moving().as_deref(), Some("account:t2"));
    stop(child);
    assert_eq!(offline_activities(&cfg).len(), 3);
}

/// An OAuth2 mailbox reading its token from `token_file`: a rejected, expired
/// token gives an Error alert that says so, is retried (a file can be
/// rotated), and writing the right token makes the mailbox recover without a
/// restart; the new token's expiry shows in the API with a Warning ahead of it.
#[test]
fn rotated_token_file_recovers_without_restart() {
    let env = env();
    let user = "user00121";
    reset_user(user);
    deliver(user, "INBOX", &message("oauth-rotation"));
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token.json");
    std::fs::write(
        &token_file,
        r#"{"access_token":"wrong-token","expires_at":"2020-01-01T00:00:00Z"}"#,
    )
    .unwrap();
    let admin = free_port();
    let extra = format!("token_file = \"{}\"", token_file.display());
    let cfg = server_config(
        &env,
        dir.path(),
        admin,
        &ServerMailbox {
            kind: "imap_smtp",
            port: env.imaps,
            tls: "implicit",
            user,
            password: "",
            auth: "oauth2",
            extra_profile: "",
            extra_mailbox: &extra,
        },
    );
    let child = start(&cfg);
    let alerts = |level: &str, needle: &str| -> Option<String> {
        // None while the daemon is still starting.
        let (_, body) = get(admin, "/api/v1/alerts", Some(TOKEN))?;
        let list: serde_json::Value = serde_json::from_str(&body).ok()?;
        list["alerts"].as_array()?.iter().find_map(|a| {
            let text = a["text"].as_str()?;
            (a["level"].as_str()? == level && text.contains(needle)).then(|| text.to_string())
        })
    };
    let expired = wait_for(Duration::from_secs(30), "expired-token alert", || {
        alerts("error", "expired at 2020-01-01T00:00:00Z")
    });
    assert!(
        expired.contains(&token_file.display().to_string()),
        "{expired}"
    );
    let mb = get_json(admin, "/api/v1/mailboxes/mb");
    assert_eq!(mb["state"]["enabled"], true, "{mb}");
    assert_eq!(mb["state"]["token_expires_at"], 1_577_836_800, "{mb}");
    assert_eq!(activity_total(admin), Some(0));

    // Rotate: the right token, expiring in three days.
    let expires = chrono::Utc::now().timestamp() + 3 * 86_400;
    let expires_s = chrono::DateTime::from_timestamp(expires, 0)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    std::fs::write(
        &token_file,
        format!(
            r#"{{"access_token":"{}","expires_at":"{expires_s}"}}"#,
            env.token
        ),
    )
    .unwrap();
    wait_for(Duration::from_secs(90), "activity after rotation", || {
        activity_total(admin).filter(|n| *n >= 1)
    });
    // The API's state is refreshed when the cycle ends, after the commit.
    let mb = wait_for(Duration::from_secs(30), "new expiry in the API", || {
        let mb = get_json(admin, "/api/v1/mailboxes/mb");
        (mb["state"]["token_expires_at"] == expires).then_some(mb)
    });
    assert_eq!(mb["state"]["enabled"], true, "{mb}");
    let warning = alerts("warning", "OAuth access token expires at").expect("expiry warning");
    assert!(warning.contains(&expires_s), "{warning}");
    stop(child);
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

/// A message over max_message_size is not downloaded: it becomes a quarantine
/// record without bytes that says why and where it is, is moved to
/// move_failed_to, and the folder position moves past it.
#[test]
fn oversized_message_is_recorded_not_downloaded() {
    let env = env();
    let user = "user00122";
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
            kind: "imap_smtp",
            port: env.imaps,
            tls: "implicit",
            user,
            password: PASSWORD,
            auth: "password",
            extra_profile: "max_message_size = 4096\nmove_failed_to = \"Undeliverable\"",
            extra_mailbox: "",
        },
    );
    let child = start(&cfg);
    let q = wait_for(Duration::from_secs(30), "quarantine record", || {
        let q = get(admin, "/api/v1/quarantine", Some(TOKEN))
            .and_then(|(_, b)| serde_json::from_str::<serde_json::Value>(&b).ok())?;
        let list = q["quarantine"].as_array()?.clone();
        (!list.is_empty()).then_some(list)
    });
    assert_eq!(q.len(), 1, "{q:?}");
    let reason = q[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("exceeds the 4096-byte limit")
            && reason.contains("left on the server in INBOX"),
        "{reason}"
    );
    assert!(q[0]["size"].as_u64().unwrap() > 20_000, "{q:?}");
    assert_eq!(q[0]["saved_as"], "", "{q:?}");
    // Never downloaded: nothing saved in the quarantine directory.
    let saved = std::fs::read_dir(dir.path().join("state/quarantine"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(saved, 0);
    wait_for(Duration::from_secs(30), "moved to Undeliverable", || {
        let n = doveadm_out(&format!("search -u {user} mailbox Undeliverable all"))
            .lines()
            .count();
        (n == 1).then_some(())
    });
    // The position moved on: new mail is processed, the big one is not retried.
    deliver(user, "INBOX", &message("small-2"));
    wait_for(Duration::from_secs(30), "2 activities", || {
        activity_total(admin).filter(|n| *n >= 2)
    });
    assert_eq!(quarantine(admin).len(), 1);
    stop(child);
}

/// Regression (#17 §7): `processed_keyword` was documented with `$CRMTracked`
/// as its default, but without the key no keyword was set. Now the key's
/// absence sets `$CRMTracked` (Dovecot's PERMANENTFLAGS allow `\*`), and
/// `processed_keyword = ""` opts out.
#[test]
fn processed_keyword_is_on_by_default_and_off_when_empty() {
    let env = env();
    for (user, extra_profile, want) in [
        ("user00181", "idle = false", 1),
        ("user00182", "idle = false\nprocessed_keyword = \"\"", 0),
    ] {
        reset_user(user);
        deliver(user, "INBOX", &message("keyword-default"));
        let dir = tempfile::tempdir().unwrap();
        let admin = free_port();
        let cfg = server_config(
            &env,
            dir.path(),
            admin,
            &ServerMailbox {
                kind: "imap_smtp",
                port: env.imap,
                tls: "starttls",
                user,
                password: PASSWORD,
                auth: "password",
                extra_profile,
                extra_mailbox: "",
            },
        );
        let child = start(&cfg);
        wait_for(Duration::from_secs(30), "1 activity", || {
            activity_total(admin).filter(|n| *n >= 1)
        });
        // The keyword follows the commit; give the follow-up a moment.
        let keyworded = || {
            doveadm_out(&format!(
                "search -u {user} mailbox INBOX keyword '$CRMTracked'"
            ))
            .lines()
            .count()
        };
        if want == 1 {
            wait_for(Duration::from_secs(15), "keyword set", || {
                (keyworded() == 1).then_some(())
            });
        } else {
            std::thread::sleep(Duration::from_secs(2));
        }
        stop(child);
        assert_eq!(keyworded(), want, "{user}: {extra_profile}");
    }
}

/// Regression (#17 §3): one message Dovecot cannot read (its file made
/// unreadable behind its back; Dovecot then drops the connection on FETCH)
/// failed every cycle, and after `max_transient_failures` the mailbox was
/// disabled. Now the others are recorded, the bad one is retried and then
/// quarantined with the server's reason (a Warning says so), the mailbox
/// stays enabled without a failed cycle, and new mail keeps arriving.
#[test]
fn unreadable_message_is_quarantined_after_retries_and_the_rest_syncs() {
    let env = env();
    let user = "user00183";
    reset_user(user);
    deliver(user, "INBOX", &message("readable-1"));
    let bad = deliver(user, "INBOX", &message("unreadable"));
    deliver(user, "INBOX", &message("readable-2"));
    let file = inbox_message_file(&env, user, bad);
    chmod(&file, 0o000);
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    let cfg = server_config(
        &env,
        dir.path(),
        admin,
        &ServerMailbox {
            kind: "imap_smtp",
            port: env.imap,
            tls: "starttls",
            user,
            password: PASSWORD,
            auth: "password",
            extra_profile: "idle = false\nmissing_message_retries = 1",
            extra_mailbox: "",
        },
    );
    let child = start(&cfg);
    wait_for(Duration::from_secs(30), "2 activities", || {
        activity_total(admin).filter(|n| *n >= 2)
    });
    let q = wait_for(Duration::from_secs(30), "quarantine record", || {
        let q = get(admin, "/api/v1/quarantine", Some(TOKEN))
            .and_then(|(_, b)| serde_json::from_str::<serde_json::Value>(&b).ok())?;
        let list = q["quarantine"].as_array()?.clone();
        (!list.is_empty()).then_some(list)
    });
    // Dovecot may have moved it from new/ to cur/ meanwhile.
    chmod(&inbox_message_file(&env, user, bad), 0o600);
    assert_eq!(q.len(), 1, "{q:?}");
    let reason = q[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains(&format!("UID {bad} failed 2 times"))
            && reason.contains("left on the server in INBOX"),
        "{reason}"
    );
    assert_eq!(q[0]["saved_as"], "", "{q:?}");
    // The Warning is raised right after the batch that quarantined it
    // commits: wait for it rather than race it.
    wait_for(Duration::from_secs(10), "the quarantine Warning", || {
        let alerts = get_json(admin, "/api/v1/alerts");
        alerts["alerts"]
            .as_array()?
            .iter()
            .any(|a| {
                a["level"] == "warning" && a["text"].as_str().unwrap_or("").contains("quarantined")
            })
            .then_some(())
    });
    // Never a failed cycle, never disabled.
    let mb = get_json(admin, "/api/v1/mailboxes/mb");
    assert_eq!(mb["state"]["enabled"], true, "{mb}");
    assert!(mb["state"]["last_sync_error"].is_null(), "{mb}");
    deliver(user, "INBOX", &message("readable-3"));
    wait_for(Duration::from_secs(30), "3 activities", || {
        activity_total(admin).filter(|n| *n >= 3)
    });
    stop(child);
    assert_eq!(offline_activities(&cfg).len(), 3);
    // The message is still on the server.
    assert_eq!(
        doveadm_out(&format!("search -u {user} mailbox INBOX all"))
            .lines()
            .count(),
        4
    );
}

/// Regression (#17 §7): a tracked folder that does not exist disabled the
/// whole mailbox, INBOX included. Now a Warning names it and the nearest
/// existing folders, and INBOX and the other tracked folders keep syncing.
#[test]
fn missing_tracked_folder_warns_and_the_rest_keeps_syncing() {
    let env = env();
    let user = "user00185";
    reset_user(user);
    doveadm(&format!("mailbox delete -u {user} -s 'INBOX/Customers'"));
    deliver(user, "INBOX", &message("inbox-mail"));
    deliver(user, "INBOX/T1", &message("t1-mail"));
    deliver(user, "INBOX/Customers", &message("customers-mail"));
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    let cfg = server_config(
        &env,
        dir.path(),
        admin,
        &ServerMailbox {
            kind: "imap_smtp",
            port: env.imap,
            tls: "starttls",
            user,
            password: PASSWORD,
            auth: "password",
            extra_profile: "idle = false",
            extra_mailbox: r#"tracked_folders = [
  { folder = "INBOX/T1", regarding = "account:t1" },
  { folder = "INBOX/Custmers", regarding = "account:typo" },
]"#,
        },
    );
    let child = start(&cfg);
    wait_for(Duration::from_secs(30), "2 activities", || {
        activity_total(admin).filter(|n| *n >= 2)
    });
    let warning = wait_for(Duration::from_secs(15), "missing-folder warning", || {
        let (_, body) = get(admin, "/api/v1/alerts", Some(TOKEN))?;
        let list: serde_json::Value = serde_json::from_str(&body).ok()?;
        list["alerts"].as_array()?.iter().find_map(|a| {
            let text = a["text"].as_str()?;
            (a["level"] == "warning" && text.contains("INBOX/Custmers")).then(|| text.to_string())
        })
    });
    assert!(
        warning.contains("does not exist")
            && warning.contains("nearest existing: \"INBOX/Customers\"")
            && warning.contains("keeps syncing"),
        "{warning}"
    );
    let mb = get_json(admin, "/api/v1/mailboxes/mb");
    assert_eq!(mb["state"]["enabled"], true, "{mb}");
    // New mail still arrives.
    deliver(user, "INBOX", &message("inbox-mail-2"));
    wait_for(Duration::from_secs(30), "3 activities", || {
        activity_total(admin).filter(|n| *n >= 3)
    });
    stop(child);
    let all = offline_activities(&cfg);
    assert_eq!(all.len(), 3);
    let t1 = all.iter().find(|a| a["subject"] == "t1-mail").unwrap();
    assert_eq!(t1["regarding"], "account:t1", "{t1}");
    doveadm(&format!("mailbox delete -u {user} -s 'INBOX/Customers'"));
}
