//! Test & Enable on demand against the real Dovecot and SMTP sink, through
//! the daemon binary: a mailbox test via the API (wrong password, fixed
//! password, SMTP down), a profile-wide test over the 200 generated users
//! within the profile's connection limit (counted by the job and, on the
//! wire, by a proxy in front of Dovecot), and `crm-mailsync test-enable`
//! against a stopped and a running daemon; a test while idling mailboxes
//! hold every connection of the profile (they make room for it at once).
//!
//! Users: alice (API), bob (SMTP down), carol (CLI), user00001 … user00200
//! (profile test; nothing of theirs is fetched or changed), user00121 and
//! user00122 (a test against idling mailboxes).
#![cfg(feature = "real-servers")]

mod common;
mod servers;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::Value;
use servers::*;

fn smtp_port() -> u16 {
    std::env::var("SMTP_PORT")
        .expect("SMTP_PORT unset: source the test servers' env")
        .parse()
        .unwrap()
}

fn sink_dir() -> PathBuf {
    PathBuf::from(std::env::var("TESTSERVERS_SMTP_OUT").expect("TESTSERVERS_SMTP_OUT unset"))
}

/// A daemon config: one IMAP profile `srv` (plaintext IMAP on `imap_port`,
/// SMTP and the poll interval per `profile_extra`) and the given
/// `[[mailboxes]]` entries.
fn config(dir: &Path, admin: u16, imap_port: u16, profile_extra: &str, mailboxes: &str) -> PathBuf {
    let env = env();
    let text = format!(
        r#"
[daemon]
state_dir = "{state}"
log_format = "json"
log_level = "warn"
shutdown_grace = "10s"

[admin]
listen = "127.0.0.1:{admin}"
token = "{TOKEN}"

[[profiles]]
name = "srv"
type = "imap_smtp"
host = "{host}"
port = {imap_port}
tls = "plain"
allow_insecure = true
ca_file = "{ca}"
tls_server_name = "{sn}"
connect_timeout = "5s"
io_timeout = "30s"
{profile_extra}

{mailboxes}
"#,
        state = dir.join("state").display(),
        host = env.host,
        ca = env.ca.display(),
        sn = env.server_name,
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A mailbox entry logging in as `user` with the password in `pw_file`.
fn mailbox(user: &str, pw_file: &Path, extra: &str) -> String {
    format!(
        "[[mailboxes]]\nname = \"{user}\"\nprofile = \"srv\"\nemail = \"{user}@example.test\"\napproval = \"approved\"\nusername = \"{user}\"\npassword_file = \"{}\"\n{extra}\n",
        pw_file.display()
    )
}

fn write_password(path: &Path, password: &str) {
    std::fs::write(path, format!("{password}\n")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

fn start_daemon(cfg: &Path, admin: u16) -> Running {
    let daemon = Running(Some(start(cfg)));
    wait_for(Duration::from_secs(30), "admin API", || {
        get(admin, "/healthz", None).filter(|(s, _)| *s == 200)
    });
    daemon
}

fn mailbox_view(admin: u16, name: &str) -> Value {
    get_json(admin, &format!("/api/v1/mailboxes/{name}"))
}

/// Starts a test job with `POST path` (202) and waits until it is done.
fn run_job(admin: u16, path: &str, within: Duration) -> Value {
    let (status, started) = request(admin, "POST", path, None);
    assert_eq!(status, 202, "{path}: {started}");
    let id = started["job"].as_str().unwrap().to_string();
    assert_eq!(started["state"], "running", "{started}");
    wait_for(within, &format!("job {id} done"), || {
        let job = get_json(admin, &format!("/api/v1/jobs/{id}"));
        (job["state"] == "done").then_some(job)
    })
}

/// The alerts of a mailbox whose text starts with `prefix`.
fn alerts(admin: u16, mailbox: &str, prefix: &str) -> Vec<Value> {
    get_json(admin, "/api/v1/alerts?limit=10000")["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["mailbox"] == mailbox && a["text"].as_str().unwrap().starts_with(prefix))
        .cloned()
        .collect()
}

/// Sink files addressed to `rcpt` whose message contains `needle`.
fn sink_messages(rcpt: &str, needle: &str) -> usize {
    let Ok(entries) = std::fs::read_dir(sink_dir()) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "eml"))
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter(|t| t.contains(needle) && t.contains(rcpt))
        .count()
}

#[test]
fn a_wrong_password_fails_with_an_authentication_alert_and_the_fixed_one_enables_and_syncs() {
    let user = "alice";
    reset_user(user);
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    let pw = dir.path().join("alice.pw");
    write_password(&pw, "not-the-password");
    let smtp = format!(
        "poll_interval = \"2s\"\nsmtp_port = {}\nsmtp_tls = \"starttls\"",
        smtp_port()
    );
    let cfg = config(
        dir.path(),
        admin,
        env().imap,
        &smtp,
        &mailbox(user, &pw, "outgoing = \"server_side_sync\""),
    );
    let mut daemon = start_daemon(&cfg, admin);
    // The task's own start-up test fails: the mailbox is disabled.
    wait_for(Duration::from_secs(20), "alice disabled", || {
        (mailbox_view(admin, user)["phase"] == "disabled").then_some(())
    });

    let job = run_job(
        admin,
        "/api/v1/mailboxes/alice/test",
        Duration::from_secs(30),
    );
    assert_eq!(job["kind"], "mailbox_test");
    assert_eq!(job["target"], user);
    assert_eq!(
        (job["total"].as_u64(), job["failed"].as_u64()),
        (Some(1), Some(1)),
        "{job}"
    );
    let r = &job["results"][0];
    assert_eq!(r["incoming"]["status"], "failure", "{job}");
    let cause = r["incoming"]["detail"].as_str().unwrap();
    assert!(cause.contains("authentication"), "{cause}");
    assert!(r["incoming"]["completed_on"].is_number(), "{job}");
    assert_eq!(r["enabled"], false, "{job}");
    let what = r["error"].as_str().unwrap();
    assert!(
        what.contains(&format!("check the password in {}", pw.display())),
        "{what}"
    );
    let open = alerts(admin, user, "Test & Enable: incoming failed");
    assert_eq!(open.len(), 1, "{open:?}");
    assert_eq!(open[0]["level"], "error");
    assert!(
        open[0]["text"].as_str().unwrap().contains("authentication"),
        "{open:?}"
    );
    assert!(open[0]["resolved_at"].is_null(), "{open:?}");
    let m = mailbox_view(admin, user);
    assert_eq!(m["state"]["enabled"], false, "{m}");
    assert_eq!(m["phase"], "disabled", "{m}");
    assert_eq!(m["state"]["incoming_test"]["status"], "failure", "{m}");

    // Fixed: the test passes, sends its message, and the mailbox runs again.
    write_password(&pw, PASSWORD);
    let before = sink_messages("alice@example.test", "crm-mailsync outgoing test");
    let job = run_job(
        admin,
        "/api/v1/mailboxes/alice/test",
        Duration::from_secs(30),
    );
    let r = &job["results"][0];
    assert_eq!(job["succeeded"], 1, "{job}");
    assert_eq!(r["incoming"]["status"], "success", "{job}");
    assert!(
        r["incoming"]["detail"]
            .as_str()
            .unwrap()
            .contains("logged in"),
        "{job}"
    );
    assert_eq!(r["outgoing"]["status"], "success", "{job}");
    assert!(
        r["outgoing"]["detail"]
            .as_str()
            .unwrap()
            .starts_with("sent a test message to alice@example.test"),
        "{job}"
    );
    assert_eq!(r["act"]["status"], "not_run", "{job}");
    assert_eq!(r["enabled"], true, "{job}");
    assert!(r.get("error").is_none(), "{job}");
    assert_eq!(job["peak_connections"], 1, "{job}");
    wait_for(
        Duration::from_secs(10),
        "the test message in the sink",
        || {
            (sink_messages("alice@example.test", "crm-mailsync outgoing test") > before)
                .then_some(())
        },
    );
    let started = job["started_at"].as_i64().unwrap();
    let m = wait_for(Duration::from_secs(20), "alice running", || {
        let m = mailbox_view(admin, user);
        (m["state"]["enabled"] == true && m["phase"] != "disabled" && m["phase"] != "starting")
            .then_some(m)
    });
    assert_eq!(m["state"]["incoming_test"]["status"], "success", "{m}");
    assert!(
        m["state"]["incoming_test"]["completed_on"]
            .as_i64()
            .unwrap()
            >= started,
        "{m}"
    );
    assert_eq!(m["state"]["outgoing_test"]["status"], "success", "{m}");
    let resolved = alerts(admin, user, "Test & Enable: incoming failed");
    assert!(
        resolved.iter().all(|a| a["resolved_at"].is_number()),
        "{resolved:?}"
    );

    // ... and syncs.
    deliver(user, "INBOX", &message("after-test-and-enable"));
    wait_for(
        Duration::from_secs(20),
        "the new message as an activity",
        || {
            let acts = get_json(admin, "/api/v1/activities?mailbox=alice&limit=100");
            acts["activities"]
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a["subject"] == "after-test-and-enable")
                .then_some(())
        },
    );

    // A running mailbox tested again keeps running.
    let job = run_job(
        admin,
        "/api/v1/mailboxes/alice/test",
        Duration::from_secs(30),
    );
    assert_eq!(job["succeeded"], 1, "{job}");
    assert_eq!(job["results"][0]["enabled"], true, "{job}");
    assert_ne!(mailbox_view(admin, user)["phase"], "disabled");
    daemon.stop();
}

#[test]
fn with_the_smtp_server_down_only_outgoing_fails() {
    let user = "bob";
    reset_user(user);
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    let pw = dir.path().join("bob.pw");
    write_password(&pw, PASSWORD);
    // Nothing listens there.
    let closed = free_port();
    let smtp = format!("poll_interval = \"2s\"\nsmtp_port = {closed}\nsmtp_tls = \"starttls\"");
    let cfg = config(
        dir.path(),
        admin,
        env().imap,
        &smtp,
        &mailbox(user, &pw, "outgoing = \"server_side_sync\""),
    );
    let mut daemon = start_daemon(&cfg, admin);
    let job = run_job(admin, "/api/v1/mailboxes/bob/test", Duration::from_secs(30));
    let r = &job["results"][0];
    assert_eq!(r["incoming"]["status"], "success", "{job}");
    assert_eq!(r["outgoing"]["status"], "failure", "{job}");
    let cause = r["outgoing"]["detail"].as_str().unwrap();
    assert!(cause.contains("SMTP connection failed"), "{cause}");
    assert_eq!(
        (job["succeeded"].as_u64(), job["failed"].as_u64()),
        (Some(0), Some(1))
    );
    // Incoming works, so the mailbox keeps syncing.
    assert_eq!(r["enabled"], true, "{job}");
    let what = r["error"].as_str().unwrap();
    assert!(
        what.starts_with("Test & Enable: outgoing failed: "),
        "{what}"
    );
    assert!(
        what.contains(&format!(
            "check that the SMTP server at 127.0.0.1:{closed} is running"
        )),
        "{what}"
    );
    assert_eq!(
        alerts(admin, user, "Test & Enable: outgoing failed").len(),
        1
    );
    assert!(alerts(admin, user, "Test & Enable: incoming failed").is_empty());
    let m = mailbox_view(admin, user);
    assert_eq!(m["state"]["incoming_test"]["status"], "success", "{m}");
    assert_eq!(m["state"]["outgoing_test"]["status"], "failure", "{m}");
    assert_ne!(m["phase"], "disabled", "{m}");
    // Unknown names are 404 JSON.
    for path in [
        "/api/v1/mailboxes/nobody/test",
        "/api/v1/profiles/nothing/test",
    ] {
        let (status, body) = request(admin, "POST", path, None);
        assert_eq!(status, 404, "{body}");
        assert!(body["error"].as_str().unwrap().starts_with("no "), "{body}");
    }
    let (status, body) = request(admin, "GET", "/api/v1/jobs/nope", None);
    assert_eq!(status, 404, "{body}");
    daemon.stop();
}

/// Connections between the daemon and Dovecot, counted on the wire.
#[derive(Debug, Default)]
struct Wire {
    open: usize,
    peak: usize,
    accepted: usize,
}

/// A TCP proxy in front of Dovecot's plaintext IMAP port that counts the
/// daemon's open connections. A connection counts from its accept until
/// the server ends the session (`* BYE`, sent before the tagged answer to
/// LOGOUT) or refuses the login (`[AUTHENTICATIONFAILED]`, after which the
/// daemon drops it), or either side closes; the count goes down before
/// those bytes are passed on, so before the daemon can have given its
/// permit back. It can only count too many, never too few.
fn counting_proxy(upstream: u16) -> (u16, Arc<Mutex<Wire>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let wire = Arc::new(Mutex::new(Wire::default()));
    let w = wire.clone();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { continue };
            let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                continue;
            };
            {
                let mut w = w.lock().unwrap();
                w.open += 1;
                w.accepted += 1;
                w.peak = w.peak.max(w.open);
            }
            let counted = Arc::new(AtomicBool::new(true));
            let end = {
                let (w, counted) = (w.clone(), counted.clone());
                move || {
                    if counted.swap(false, Ordering::SeqCst) {
                        w.lock().unwrap().open -= 1;
                    }
                }
            };
            let (mut c_read, mut s_write) =
                (client.try_clone().unwrap(), server.try_clone().unwrap());
            let end_up = end.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 16384];
                loop {
                    match c_read.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if s_write.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
                end_up();
                let _ = s_write.shutdown(Shutdown::Both);
            });
            let (mut s_read, mut c_write) = (server, client);
            std::thread::spawn(move || {
                let mut buf = [0u8; 16384];
                loop {
                    match s_read.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            let text = String::from_utf8_lossy(&buf[..n]);
                            if text.contains("* BYE") || text.contains("[AUTHENTICATIONFAILED]") {
                                end();
                            }
                            if c_write.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
                end();
                let _ = c_write.shutdown(Shutdown::Both);
            });
        }
    });
    (port, wire)
}

/// A profile job over the 200 users with the `wrong` ones failing.
fn assert_summary(job: &Value, wrong: &[&str]) {
    assert_eq!(job["kind"], "profile_test");
    assert_eq!(job["target"], "srv");
    assert_eq!(job["state"], "done");
    assert_eq!(
        (
            job["total"].as_u64(),
            job["completed"].as_u64(),
            job["succeeded"].as_u64(),
            job["failed"].as_u64()
        ),
        (Some(200), Some(200), Some(197), Some(3)),
        "{}",
        job["summary"]
    );
    let results = job["results"].as_array().unwrap();
    assert_eq!(results.len(), 200);
    let mut failed: Vec<&str> = results
        .iter()
        .filter(|r| r["incoming"]["status"] != "success")
        .map(|r| r["mailbox"].as_str().unwrap())
        .collect();
    failed.sort_unstable();
    assert_eq!(failed, wrong);
    for r in results {
        let name = r["mailbox"].as_str().unwrap();
        let ok = !wrong.contains(&name);
        assert_eq!(r["enabled"], ok, "{r}");
        if !ok {
            assert!(
                r["incoming"]["detail"]
                    .as_str()
                    .unwrap()
                    .contains("authentication"),
                "{r}"
            );
        }
    }
    let summary = job["summary"].as_str().unwrap();
    assert!(
        summary.starts_with(
            "200 of 200 mailbox(es) tested: 197 succeeded, 3 failed (user00017, user00101, user00188)"
        ),
        "{summary}"
    );
}

#[test]
fn a_profile_test_over_200_users_has_a_correct_summary_within_the_connection_limit() {
    const LIMIT: usize = 5;
    let wrong = ["user00017", "user00101", "user00188"];
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    let (proxy, wire) = counting_proxy(env().imap);
    let good = dir.path().join("good.pw");
    write_password(&good, PASSWORD);
    let bad = dir.path().join("bad.pw");
    write_password(&bad, "wrong");
    let mut entries = String::new();
    for i in 1..=200 {
        let user = format!("user{i:05}");
        let pw = if wrong.contains(&user.as_str()) {
            &bad
        } else {
            &good
        };
        entries.push_str(&mailbox(&user, pw, ""));
    }
    // Nothing is fetched (mail from 2099 on) or flagged: the 200 tasks only
    // log in, look and wait, sharing the limit with the job.
    let cfg = config(
        dir.path(),
        admin,
        proxy,
        &format!(
            "poll_interval = \"8s\"\nmax_concurrent_connections = {LIMIT}\nprocess_email_from = \"2099-01-01\"\nprocessed_keyword = \"\""
        ),
        &entries,
    );
    // Without a daemon, the CLI runs the same job in its process: nothing
    // else connects, so the job alone reaches the limit.
    let t0 = std::time::Instant::now();
    let (code, out, err) = cli(&cfg, &["--json", "--profile", "srv"]);
    let took = t0.elapsed();
    assert_eq!(code, 1, "three failed: {err}");
    let job: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_summary(&job, &wrong);
    let alone = wire.lock().unwrap().peak;
    eprintln!(
        "profile test in the CLI: 200 mailboxes in {took:?}; job peak {}; on the wire: peak {alone}",
        job["peak_connections"]
    );
    assert_eq!(job["peak_connections"], LIMIT, "{}", job["summary"]);
    assert!(alone <= LIMIT, "{alone} connections at once on the wire");

    let mut daemon = start_daemon(&cfg, admin);
    // Every task past its start-up (the wrong three disabled).
    wait_for(Duration::from_secs(60), "200 mailboxes started", || {
        let list = get_json(admin, "/api/v1/mailboxes");
        let phases: Vec<&str> = list["mailboxes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["phase"].as_str().unwrap())
            .collect();
        (phases.len() == 200 && !phases.contains(&"starting")).then_some(())
    });

    let t0 = std::time::Instant::now();
    let job = run_job(admin, "/api/v1/profiles/srv/test", Duration::from_secs(60));
    let took = t0.elapsed();
    assert_summary(&job, &wrong);
    let peak = job["peak_connections"].as_u64().unwrap() as usize;
    let on_wire = {
        let w = wire.lock().unwrap();
        (w.peak, w.accepted, w.open)
    };
    eprintln!(
        "profile test: 200 mailboxes in {took:?}; job peak {peak}; on the wire: peak {} over {} connections",
        on_wire.0, on_wire.1
    );
    assert!((1..=LIMIT).contains(&peak), "job peak {peak}");
    assert!(
        on_wire.0 <= LIMIT,
        "{} connections at once on the wire",
        on_wire.0
    );
    // The job and the 200 tasks did connect through the proxy.
    assert!(on_wire.1 >= 400, "{} connections", on_wire.1);
    for name in wrong {
        assert_eq!(
            alerts(admin, name, "Test & Enable: incoming failed").len(),
            1
        );
    }
    let m = mailbox_view(admin, "user00042");
    assert_eq!(m["state"]["incoming_test"]["status"], "success", "{m}");
    assert!(
        m["state"]["incoming_test"]["completed_on"]
            .as_i64()
            .unwrap()
            >= job["started_at"].as_i64().unwrap()
    );
    daemon.stop();
    assert!(wire.lock().unwrap().peak <= LIMIT);
}

/// IMAP IDLE holds a connection, and its permit, for the whole wait
/// between polls (here 10 minutes); a mailbox task gives it up only for
/// someone queued in the profile's connection queue. Test & Enable queues
/// there too: with both connections held by the two idling mailboxes, a
/// mailbox test and a profile test finish in seconds, and never past the
/// limit. (Two mailboxes for two connections: nobody queues before the
/// test, so both are certain to idle on theirs.)
#[test]
fn a_test_while_idling_mailboxes_hold_every_connection_gets_one_at_once() {
    const LIMIT: usize = 2;
    let users = ["user00121", "user00122"];
    for user in users {
        reset_user(user);
    }
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    let (proxy, wire) = counting_proxy(env().imap);
    let pw = dir.path().join("user.pw");
    write_password(&pw, PASSWORD);
    let entries: String = users.iter().map(|u| mailbox(u, &pw, "")).collect();
    // Nothing is fetched or flagged: the tasks log in, look, and idle.
    let cfg = config(
        dir.path(),
        admin,
        proxy,
        &format!(
            "poll_interval = \"10m\"\nidle = true\nmax_concurrent_connections = {LIMIT}\nprocess_email_from = \"2099-01-01\"\nprocessed_keyword = \"\""
        ),
        &entries,
    );
    let mut daemon = start_daemon(&cfg, admin);
    // Settled: both tasks wait for their next poll in IDLE, on the two
    // connections.
    wait_for(
        Duration::from_secs(60),
        "both mailboxes waiting, two connections open",
        || {
            let list = get_json(admin, "/api/v1/mailboxes");
            let waiting = list["mailboxes"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|m| m["phase"] == "waiting")
                .count();
            let open = wire.lock().unwrap().open;
            (waiting == users.len() && open == LIMIT).then_some(())
        },
    );

    // Far below the 10 minutes of IDLE the holders would otherwise keep.
    let job = run_job(
        admin,
        "/api/v1/mailboxes/user00122/test",
        Duration::from_secs(30),
    );
    assert_eq!(job["succeeded"], 1, "{job}");
    assert_eq!(job["results"][0]["incoming"]["status"], "success", "{job}");
    assert_eq!(job["results"][0]["enabled"], true, "{job}");
    assert_eq!(job["peak_connections"], 1, "{job}");

    // The profile job tests two at once: the permit the test gave back and
    // the one the other idling mailbox gives up.
    let job = run_job(admin, "/api/v1/profiles/srv/test", Duration::from_secs(30));
    assert_eq!(
        (job["total"].as_u64(), job["succeeded"].as_u64()),
        (Some(2), Some(2)),
        "{job}"
    );
    let peak = job["peak_connections"].as_u64().unwrap() as usize;
    assert!((1..=LIMIT).contains(&peak), "job peak {peak}");
    let (on_wire, accepted) = {
        let w = wire.lock().unwrap();
        (w.peak, w.accepted)
    };
    eprintln!("idling holders: on the wire peak {on_wire} over {accepted} connections");
    assert!(
        on_wire <= LIMIT,
        "{on_wire} connections at once on the wire"
    );
    // Two task starts and three tests connected.
    assert!(accepted >= 5, "{accepted} connections");
    daemon.stop();
    assert!(wire.lock().unwrap().peak <= LIMIT);
}

fn cli(cfg: &Path, args: &[&str]) -> (i32, String, String) {
    let out = daemon_command()
        .arg("test-enable")
        .arg("--config")
        .arg(cfg)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_cli_tests_in_process_without_a_daemon_and_through_the_api_with_one() {
    let user = "carol";
    reset_user(user);
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    let pw = dir.path().join("carol.pw");
    write_password(&pw, PASSWORD);
    let smtp = format!(
        "poll_interval = \"2s\"\nsmtp_port = {}\nsmtp_tls = \"starttls\"",
        smtp_port()
    );
    let cfg = config(
        dir.path(),
        admin,
        env().imap,
        &smtp,
        &mailbox(user, &pw, "outgoing = \"server_side_sync\""),
    );

    // No daemon: in this process, against the store.
    let (code, out, err) = cli(&cfg, &[user]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("in this process"), "{out}");
    assert!(out.contains("  incoming  success  IMAP "), "{out}");
    assert!(
        out.contains("  outgoing  success  sent a test message to carol@example.test"),
        "{out}"
    );
    assert!(out.contains("  act       not_run"), "{out}");
    assert!(out.contains("  enabled   yes"), "{out}");

    write_password(&pw, "wrong");
    let (code, out, err) = cli(&cfg, &[user]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("  incoming  failure  authentication"), "{out}");
    assert!(out.contains("  enabled   no"), "{out}");
    assert!(
        out.contains(&format!("check the password in {}", pw.display())),
        "{out}"
    );

    let (code, _, err) = cli(&cfg, &["nobody"]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("no mailbox \"nobody\""), "{err}");

    // A running daemon holds the store: through its API.
    write_password(&pw, PASSWORD);
    let mut daemon = start_daemon(&cfg, admin);
    let (code, out, err) = cli(&cfg, &[user]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!(
            "through its admin API at http://127.0.0.1:{admin}"
        )),
        "{out}"
    );
    assert!(out.contains("  incoming  success  IMAP "), "{out}");
    assert!(out.contains("  enabled   yes"), "{out}");
    write_password(&pw, "wrong");
    let (code, out, err) = cli(&cfg, &["--json", user]);
    assert_eq!(code, 1, "{out}{err}");
    let job: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(job["state"], "done");
    assert_eq!(job["results"][0]["incoming"]["status"], "failure", "{job}");
    // The API saw the same job.
    let id = job["id"].as_str().unwrap();
    assert_eq!(get_json(admin, &format!("/api/v1/jobs/{id}"))["failed"], 1);
    write_password(&pw, PASSWORD);
    daemon.stop();
}
