//! Outgoing email through the daemon binary against the real servers: the
//! shared SMTP sink and Dovecot's Sent folder (and a scripted stand-in for
//! what the sink cannot do: a 5xx reply).
#![cfg(feature = "real-servers")]

mod common;
mod servers;
#[path = "support/smtp_stub.rs"]
mod smtp_stub;

use std::collections::{HashMap, HashSet};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
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

fn queue(port: u16, body: Value) -> Value {
    let (status, v) = request(port, "POST", "/api/v1/outgoing", Some(&body));
    assert!(status == 202 || status == 200, "{status} {v}");
    v
}

/// Every queue row of a mailbox, newest first.
fn rows(port: u16, status: Option<&str>) -> Vec<Value> {
    let mut out = Vec::new();
    let mut before: Option<u64> = None;
    loop {
        let mut path = "/api/v1/outgoing?mailbox=mb&limit=1000".to_string();
        if let Some(s) = status {
            path.push_str(&format!("&status={s}"));
        }
        if let Some(b) = before {
            path.push_str(&format!("&before={b}"));
        }
        let (code, page) = request(port, "GET", &path, None);
        assert_eq!(code, 200, "{page}");
        out.extend(page["items"].as_array().unwrap().iter().cloned());
        match page["next_before"].as_u64() {
            Some(b) => before = Some(b),
            None => return out,
        }
    }
}

/// Header value (first line only, which is enough for ours) of a message.
fn header<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    let head = text.split("\r\n\r\n").next().unwrap_or("");
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Message-ID (no `<>`) → files, over a directory of messages.
fn by_message_id(dirs: &[PathBuf]) -> HashMap<String, Vec<String>> {
    let mut map: HashMap<String, Vec<String>> = HashMap::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "json") {
                continue;
            }
            let Ok(bytes) = std::fs::read(&p) else {
                continue;
            };
            let text = String::from_utf8_lossy(&bytes).to_string();
            if let Some(id) = header(&text, "Message-ID") {
                map.entry(id.trim_matches(['<', '>']).to_string())
                    .or_default()
                    .push(text);
            }
        }
    }
    map
}

fn sent_folder(env: &Env, user: &str) -> Vec<PathBuf> {
    let base = env
        .dir
        .join("mail")
        .join(user)
        .join("Maildir")
        .join(".Sent");
    vec![base.join("cur"), base.join("new")]
}

/// A daemon config for `user` sending through `smtp_port` (plain:
/// stand-ins) or STARTTLS (the sink).
fn config(env: &Env, dir: &Path, admin: u16, user: &str, smtp: &str) -> PathBuf {
    config_with_rate(env, dir, admin, user, smtp, 100_000)
}

fn config_with_rate(
    env: &Env,
    dir: &Path,
    admin: u16,
    user: &str,
    smtp: &str,
    rate: u32,
) -> PathBuf {
    let mailbox = format!(
        "outgoing = \"server_side_sync\"\nsend_rate_per_minute = {rate}\n\n[[mailboxes]]\nname = \"unapproved\"\nprofile = \"srv\"\nemail = \"unapproved@example.test\"\nincoming = \"none\"\noutgoing = \"server_side_sync\"\napproval = \"pending\"\nusername = \"x\"\npassword = \"x\""
    );
    let m = ServerMailbox {
        kind: "imap_smtp",
        port: env.imap,
        tls: "starttls",
        user,
        password: PASSWORD,
        auth: "password",
        extra_profile: smtp,
        // A second address, not approved: it may not send.
        extra_mailbox: &mailbox,
    };
    server_config(env, dir, admin, &m)
}

/// `kind:id` regarding and method of the activity whose Message-ID is `mid`.
fn activity_of(port: u16, subject_part: &str) -> Option<Value> {
    let v = get_json(port, "/api/v1/activities?limit=1000");
    v["activities"]
        .as_array()?
        .iter()
        .find(|a| {
            a["direction"] == "incoming"
                && a["subject"]
                    .as_str()
                    .is_some_and(|s| s.contains(subject_part))
        })
        .cloned()
}

#[test]
fn five_hundred_emails_are_sent_once_with_token_sent_copy_and_events_and_replies_correlate() {
    let env = env();
    let user = "user00160";
    reset_user(user);
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    let smtp = format!("smtp_port = {}\nsmtp_tls = \"starttls\"", smtp_port());
    let cfg = config(&env, dir.path(), admin, user, &smtp);
    let mut daemon = Running(Some(start(&cfg)));
    wait_for(Duration::from_secs(30), "admin API", || {
        get(admin, "/healthz", None).filter(|(s, _)| *s == 200)
    });
    let run = format!("{}-{}", std::process::id(), fastrand::u32(..));
    let mut queued = Vec::new();
    for i in 0..500 {
        queued.push(queue(
            admin,
            json!({
                "mailbox": "mb",
                "regarding": format!("case:{}", i % 25),
                "to": [format!("customer{}@customer.example", i % 7)],
                "subject": format!("Order {run} #{i}"),
                "text": format!("Your order {i} ships tomorrow."),
                "idempotency_key": format!("{run}-{i}"),
            }),
        ));
    }
    // A retried request (same key) is the same email.
    let again = queue(
        admin,
        json!({"mailbox": "mb", "regarding": "case:0", "to": ["customer0@customer.example"],
               "subject": format!("Order {run} #0"), "idempotency_key": format!("{run}-0")}),
    );
    assert_eq!(again["id"], queued[0]["id"]);
    assert_eq!(again["existing"], true);

    wait_for(Duration::from_secs(120), "500 emails sent", || {
        (rows(admin, Some("sent")).len() == 500).then_some(())
    });
    let ours: HashMap<String, &Value> = queued
        .iter()
        .map(|q| (q["message_id"].as_str().unwrap().to_string(), q))
        .collect();
    let sink = by_message_id(&[sink_dir()]);
    // The Sent copy follows `sent` at once; wait for the last ones.
    let sent = wait_for(Duration::from_secs(30), "500 Sent copies", || {
        let s = by_message_id(&sent_folder(&env, user));
        (ours.keys().filter(|m| s.contains_key(*m)).count() == 500).then_some(s)
    });
    for (mid, q) in &ours {
        let copies = sink.get(mid).map_or(0, Vec::len);
        assert_eq!(copies, 1, "{mid} reached the sink {copies} times");
        let text = &sink[mid][0];
        let token = q["token"].as_str().unwrap();
        assert!(token.starts_with("CRM:"), "{token}");
        assert!(header(text, "Subject").unwrap().ends_with(token), "{text}");
        assert_eq!(
            header(text, "Subject").unwrap(),
            q["subject"].as_str().unwrap()
        );
        assert!(header(text, "From")
            .unwrap()
            .contains(&format!("{user}@example.test")));
        assert_eq!(sent[mid].len(), 1, "{mid}: one Sent copy");
    }
    // The row says `done` a moment after the copy is in the folder.
    wait_for(
        Duration::from_secs(30),
        "every row sent with its copy done",
        || {
            let rows = rows(admin, None);
            (rows.len() == 500
                && rows
                    .iter()
                    .all(|r| r["status"] == "sent" && r["sent_copy"] == "done"))
            .then_some(())
        },
    );

    // One CRM event per status change: pending_send (created), sending, sent.
    let mut statuses: HashMap<u64, Vec<String>> = HashMap::new();
    let mut after = 0u64;
    loop {
        let page = get_json(admin, &format!("/api/v1/events?after={after}&limit=1000"));
        let events = page["events"].as_array().unwrap();
        if events.is_empty() {
            break;
        }
        for e in events {
            after = e["seq"].as_u64().unwrap();
            if let Some(s) = e["activity"]["send"]["status"].as_str() {
                let id = e["activity_id"].as_u64().unwrap();
                let list = statuses.entry(id).or_default();
                if list.last().map(String::as_str) != Some(s) {
                    list.push(s.to_string());
                }
            }
        }
    }
    for q in &queued {
        let id = q["id"].as_u64().unwrap();
        assert_eq!(
            statuses.get(&id).cloned().unwrap_or_default(),
            vec!["pending_send", "sending", "sent"],
            "events of {id}"
        );
    }

    // A reply by In-Reply-To, and one whose client dropped the threading
    // headers: the token alone ties it to the record.
    let first = &queued[3];
    let mid = first["message_id"].as_str().unwrap();
    let token = first["token"].as_str().unwrap();
    let reply = format!(
        "From: customer3@customer.example\r\nTo: {user}@example.test\r\nSubject: Re: Order {run} #3 (header)\r\nMessage-ID: <r1-{run}@customer.example>\r\nIn-Reply-To: <{mid}>\r\nReferences: <{mid}>\r\nDate: Thu, 03 Dec 2026 10:00:00 +0000\r\n\r\nThanks!\r\n"
    );
    let stripped = format!(
        "From: customer3@customer.example\r\nTo: {user}@example.test\r\nSubject: Re: Order {run} #3 (token) {token}\r\nMessage-ID: <r2-{run}@customer.example>\r\nDate: Thu, 03 Dec 2026 10:01:00 +0000\r\n\r\nThanks again!\r\n"
    );
    deliver(user, "INBOX", reply.as_bytes());
    deliver(user, "INBOX", stripped.as_bytes());
    for (part, method) in [("(header)", "in_reply_to"), ("(token)", "tracking_token")] {
        let a = wait_for(Duration::from_secs(30), "reply correlated", || {
            activity_of(admin, part)
        });
        assert_eq!(a["regarding"], "case:3", "{a}");
        assert_eq!(a["method"], method, "{a}");
    }
    daemon.stop();
}

/// A TCP forwarder to the sink that can be switched off (connections
/// refused) and on again: the sink "stopped" for this test only.
struct Switch {
    port: u16,
    on: Arc<AtomicBool>,
    open: Arc<std::sync::Mutex<Vec<TcpStream>>>,
}

impl Switch {
    fn start(target: u16) -> Switch {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let on = Arc::new(AtomicBool::new(true));
        let flag = on.clone();
        let open = Arc::new(std::sync::Mutex::new(Vec::new()));
        let conns = open.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if !flag.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                conns.lock().unwrap().push(client.try_clone().unwrap());
                let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (mut c, mut s) = (client, server);
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c, &mut s);
                    let _ = s.shutdown(std::net::Shutdown::Both);
                });
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut s2, &mut c2);
                    let _ = c2.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        Switch { port, on, open }
    }

    /// Off: new connections are refused and open ones cut, as when the
    /// server process stops.
    fn set(&self, on: bool) {
        self.on.store(on, Ordering::SeqCst);
        if !on {
            for c in self.open.lock().unwrap().drain(..) {
                let _ = c.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

#[test]
fn sink_outage_is_retried_until_sent_and_bad_requests_queue_nothing() {
    let env = env();
    let user = "user00161";
    reset_user(user);
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    let switch = Switch::start(smtp_port());
    // The certificate is the sink's: the name checked stays "localhost".
    let smtp = format!(
        "smtp_host = \"127.0.0.1\"\nsmtp_port = {}\nsmtp_tls = \"starttls\"",
        switch.port
    );
    let cfg = config(&env, dir.path(), admin, user, &smtp);
    let mut daemon = Running(Some(start(&cfg)));
    wait_for(Duration::from_secs(30), "admin API", || {
        get(admin, "/healthz", None).filter(|(s, _)| *s == 200)
    });
    wait_for(Duration::from_secs(30), "outgoing test passed", || {
        // The mailbox is listed once its task registered (just after the API is up).
        let (code, body) = get(admin, "/api/v1/mailboxes/mb", Some(TOKEN))?;
        let m: Value = serde_json::from_str(&body).ok()?;
        (code == 200 && m["state"]["outgoing_test"]["status"] == "success").then_some(())
    });
    switch.set(false);
    let run = fastrand::u32(..);
    let ids: Vec<u64> = (0..20)
        .map(|i| {
            queue(
                admin,
                json!({"mailbox": "mb", "regarding": "case:9", "to": ["c@customer.example"],
                       "subject": format!("Outage {run} #{i}"), "text": "x"}),
            )["id"]
                .as_u64()
                .unwrap()
        })
        .collect();
    // Transient: back to pending_send with the error, attempts counted.
    wait_for(
        Duration::from_secs(30),
        "transient failures recorded",
        || {
            let r = rows(admin, Some("pending_send"));
            (r.len() == 20
                && r.iter()
                    .all(|r| r["attempts"].as_u64().unwrap() >= 1 && r["last_error"].is_string()))
            .then_some(())
        },
    );
    let one = get_json(admin, &format!("/api/v1/outgoing/{}", ids[0]));
    assert!(
        one["last_error"].as_str().unwrap().contains("SMTP"),
        "{one}"
    );
    switch.set(true);
    wait_for(
        Duration::from_secs(90),
        "all sent once the sink is back",
        || (rows(admin, Some("sent")).len() == 20).then_some(()),
    );
    let sink = by_message_id(&[sink_dir()]);
    for r in rows(admin, None) {
        let mid = r["message_id"].as_str().unwrap();
        assert_eq!(sink.get(mid).map_or(0, Vec::len), 1, "{mid}");
    }

    // Refusals: nothing queued.
    let (code, v) = request(
        admin,
        "POST",
        "/api/v1/outgoing",
        Some(
            &json!({"mailbox": "nope", "regarding": "case:1", "to": ["a@b.example"], "subject": "x"}),
        ),
    );
    assert_eq!(code, 404, "{v}");
    assert!(v["error"].as_str().unwrap().contains("nope"), "{v}");
    let (code, v) = request(
        admin,
        "POST",
        "/api/v1/outgoing",
        Some(
            &json!({"mailbox": "mb", "regarding": "case:1", "to": ["not an address"], "subject": "x"}),
        ),
    );
    assert_eq!(code, 400, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("not an address"),
        "{v}"
    );
    assert_eq!(rows(admin, None).len(), 20);
    daemon.stop();
}

#[test]
fn a_5xx_reply_fails_the_email_with_the_server_text_and_an_alert() {
    let env = env();
    let user = "user00162";
    reset_user(user);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let stub = rt.block_on(smtp_stub::SmtpStub::start(smtp_stub::Script {
        rcpt_matching: Some("nobody@".into()),
        ..smtp_stub::Script::reply(
            smtp_stub::Stage::Rcpt,
            550,
            "5.1.1 <nobody@customer.example>: Recipient address rejected: User unknown",
        )
    }));
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    // The stand-in speaks plaintext: an explicit opt-in, as in production.
    let smtp = format!(
        "smtp_host = \"127.0.0.1\"\nsmtp_port = {}\nsmtp_tls = \"plain\"\nsent_copy = \"none\"",
        stub.port
    );
    let cfg = config(&env, dir.path(), admin, user, &smtp);
    let mut daemon = Running(Some(start(&cfg)));
    wait_for(Duration::from_secs(30), "admin API", || {
        get(admin, "/healthz", None).filter(|(s, _)| *s == 200)
    });
    let bad = queue(
        admin,
        json!({"mailbox": "mb", "regarding": "case:5", "to": ["nobody@customer.example"],
               "subject": "Will bounce", "text": "x"}),
    );
    let good = queue(
        admin,
        json!({"mailbox": "mb", "regarding": "case:5", "to": ["somebody@customer.example"],
               "subject": "Will pass", "text": "x"}),
    );
    let failed = wait_for(Duration::from_secs(30), "5xx → failed", || {
        let r = get_json(admin, &format!("/api/v1/outgoing/{}", bad["id"]));
        (r["status"] == "failed").then_some(r)
    });
    let text = failed["activity"]["send"]["reason"].as_str().unwrap();
    assert!(
        text.contains("550") && text.contains("User unknown"),
        "{failed}"
    );
    assert_eq!(failed["activity"]["send"]["dynamics_statuscode"], 8);
    assert_eq!(failed["attempts"], 1, "a permanent reply is not retried");
    wait_for(Duration::from_secs(30), "the other email is sent", || {
        let r = get_json(admin, &format!("/api/v1/outgoing/{}", good["id"]));
        (r["status"] == "sent").then_some(())
    });
    let alerts = get_json(admin, "/api/v1/alerts");
    assert!(
        alerts.to_string().contains("User unknown"),
        "an Error alert names the server's reply: {alerts}"
    );
    let delivered: HashSet<String> = stub
        .messages()
        .iter()
        .filter_map(|m| {
            let t = String::from_utf8_lossy(m).to_string();
            header(&t, "Subject").map(str::to_string)
        })
        .collect();
    assert!(
        delivered.iter().any(|s| s.starts_with("Will pass")),
        "{delivered:?}"
    );
    assert!(
        !delivered.iter().any(|s| s.starts_with("Will bounce")),
        "{delivered:?}"
    );
    daemon.stop();
    drop(stub);
}

#[test]
fn send_rate_per_minute_holds_back_a_runaway_workflow() {
    let env = env();
    let user = "user00163";
    reset_user(user);
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    let smtp = format!("smtp_port = {}\nsmtp_tls = \"starttls\"", smtp_port());
    let cfg = config_with_rate(&env, dir.path(), admin, user, &smtp, 5);
    let mut daemon = Running(Some(start(&cfg)));
    wait_for(Duration::from_secs(30), "admin API", || {
        get(admin, "/healthz", None).filter(|(s, _)| *s == 200)
    });
    for i in 0..8 {
        queue(
            admin,
            json!({"mailbox": "mb", "regarding": "case:3", "to": ["c@customer.example"],
                   "subject": format!("Workflow mail #{i}"), "text": "x", "automated": true}),
        );
    }
    wait_for(Duration::from_secs(30), "the first five sent", || {
        (rows(admin, Some("sent")).len() == 5).then_some(())
    });
    // The rest waits for the minute to pass, untouched.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(rows(admin, Some("sent")).len(), 5);
    let waiting = rows(admin, Some("pending_send"));
    assert_eq!(waiting.len(), 3);
    assert!(waiting.iter().all(|r| r["attempts"] == 0), "{waiting:?}");
    daemon.stop();
}

#[test]
fn a_copy_the_server_filed_under_a_rewritten_message_id_is_indexed_and_replies_to_it_correlate() {
    let env = env();
    let user = "user00164";
    reset_user(user);
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    // The provider files submitted mail itself (Gmail, Exchange): only searched.
    let smtp = format!(
        "smtp_port = {}\nsmtp_tls = \"starttls\"\nsent_copy = \"server\"",
        smtp_port()
    );
    let cfg = config(&env, dir.path(), admin, user, &smtp);
    let mut daemon = Running(Some(start(&cfg)));
    wait_for(Duration::from_secs(30), "admin API", || {
        get(admin, "/healthz", None).filter(|(s, _)| *s == 200)
    });
    let run = fastrand::u32(..);
    let q = queue(
        admin,
        json!({"mailbox": "mb", "regarding": "case:77", "to": ["dana@customer.example"],
               "subject": format!("Quote {run}"), "text": "Attached."}),
    );
    let id = q["id"].as_u64().unwrap();
    let ours = q["message_id"].as_str().unwrap().to_string();
    let row = wait_for(Duration::from_secs(30), "sent, copy owed", || {
        let r = get_json(admin, &format!("/api/v1/outgoing/{id}"));
        (r["status"] == "sent").then_some(r)
    });
    assert_eq!(row["sent_copy"], "owed", "{row}");
    // Play the provider: file the submitted message with its own Message-ID.
    let sink = by_message_id(&[sink_dir()]);
    let submitted = &sink[&ours][0];
    let rewritten = format!("provider-{run}@mail.provider.example");
    let filed = submitted.replacen(&format!("<{ours}>"), &format!("<{rewritten}>"), 1);
    assert_ne!(&filed, submitted);
    deliver(user, "Sent", filed.as_bytes());
    let row = wait_for(Duration::from_secs(30), "the filed copy found", || {
        let r = get_json(admin, &format!("/api/v1/outgoing/{id}"));
        (r["sent_copy"] == "done").then_some(r)
    });
    assert_eq!(row["server_message_ids"], json!([rewritten]), "{row}");
    let ids = &row["activity"]["message_ids"];
    assert!(
        ids.to_string().contains(&rewritten) && ids.to_string().contains(&ours),
        "{ids}"
    );
    // A reply to the id only the provider knew, no token in its subject.
    let reply = format!(
        "From: dana@customer.example\r\nTo: {user}@example.test\r\nSubject: Re: your quote (rewritten)\r\nMessage-ID: <r-{run}@customer.example>\r\nIn-Reply-To: <{rewritten}>\r\nDate: Thu, 03 Dec 2026 11:00:00 +0000\r\n\r\nLooks good.\r\n"
    );
    deliver(user, "INBOX", reply.as_bytes());
    let a = wait_for(Duration::from_secs(30), "reply correlated", || {
        activity_of(admin, "(rewritten)")
    });
    assert_eq!(a["regarding"], "case:77", "{a}");
    assert_eq!(a["method"], "in_reply_to", "{a}");
    daemon.stop();
}

/// Regression: a mailbox whose address is pending in the configuration had
/// no sender, so approving it at run time did not make it send until a
/// restart. Now its queue opens at the approval and the email goes out.
#[test]
fn an_address_approved_at_run_time_sends_without_a_restart() {
    let env = env();
    let user = "user00175";
    reset_user(user);
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    let smtp = format!("smtp_port = {}\nsmtp_tls = \"starttls\"", smtp_port());
    let cfg = config(&env, dir.path(), admin, user, &smtp);
    let mut daemon = Running(Some(start(&cfg)));
    wait_for(Duration::from_secs(30), "admin API", || {
        get(admin, "/healthz", None).filter(|(s, _)| *s == 200)
    });
    let email = json!({"mailbox": "unapproved", "regarding": "case:9", "to": ["c@customer.example"],
                       "subject": "Sent once approved", "text": "x"});
    let (status, refused) = request(admin, "POST", "/api/v1/outgoing", Some(&email));
    assert!((400..500).contains(&status), "{status} {refused}");
    assert!(refused.to_string().contains("not approved"), "{refused}");

    let (status, body) = request(admin, "POST", "/api/v1/mailboxes/unapproved/approve", None);
    assert_eq!(status, 202, "{body}");
    let queued = queue(admin, email);
    let id = queued["id"].as_u64().unwrap();
    let row = wait_for(Duration::from_secs(60), "sent once approved", || {
        let (_, row) = request(admin, "GET", &format!("/api/v1/outgoing/{id}"), None);
        (row["status"] == "sent").then_some(row)
    });
    let mid = row["message_id"].as_str().unwrap().to_string();
    let copies = by_message_id(&[sink_dir()]);
    assert_eq!(
        copies.get(&mid).map(Vec::len),
        Some(1),
        "the sink got it once: {mid}"
    );
    daemon.stop();
}
