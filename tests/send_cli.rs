//! `crm-mailsync send` as an operator uses it: a .json request and an .eml
//! message queued through the store, through the running daemon's admin API,
//! and the exit statuses of what it refuses.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

/// A config with the Maildir mailbox `support` (which may not send) and the
/// IMAP-SMTP mailbox `sales` (server-side sync, approved) on a server that
/// is not there (the daemon keeps retrying it; nothing here needs it).
fn config(dir: &Path) -> PathBuf {
    let maildir = dir.join("maildir");
    common::make_maildir(&maildir);
    let dead = common::free_port();
    let sales = format!(
        r#"
[[profiles]]
name = "mail"
type = "imap_smtp"
host = "127.0.0.1"
port = {dead}
tls = "plain"
allow_insecure = true
smtp_port = {dead}
smtp_tls = "plain"

[[mailboxes]]
name = "sales"
profile = "mail"
email = "sales@example.test"
username = "sales"
password = "secret"
approval = "approved"
outgoing = "server_side_sync"
"#
    );
    common::maildir_config(dir, &maildir, common::free_port(), 10, &sales)
}

/// Runs `send` with these arguments: (exit status, stdout, stderr).
fn send(config: &Path, args: &[&str]) -> (i32, String, String) {
    let out = common::daemon_command()
        .args(["send", "--config"])
        .arg(config)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn write(dir: &Path, name: &str, content: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p.display().to_string()
}

const EML: &str = "From: someone@example.com\r\nTo: Ann <ann@customer.example>\r\nCc: bob@customer.example\r\nSubject: Your offer\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n--b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nHello Ann,\r\nthe offer is attached.\r\n--b\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment; filename=\"offer.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK\r\n--b--\r\n";

fn queued(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

#[test]
fn send_queues_json_and_eml_offline_and_through_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let json = write(
        dir.path(),
        "offer.json",
        r#"{"mailbox": "support", "to": ["ann@customer.example"], "subject": "Offer",
            "text": "Hello Ann", "idempotency_key": "offer-1"}"#,
    );

    // Offline: straight into the store; the flags override the JSON.
    let (code, out, err) = send(
        &cfg,
        &["--mailbox", "sales", "--regarding", "case:42", &json],
    );
    assert_eq!(code, 0, "{err}");
    let first = queued(&out);
    assert_eq!(first["status"], "pending_send", "{out}");
    assert_eq!(first["existing"], false);
    assert!(
        first["subject"].as_str().unwrap().starts_with("Offer"),
        "{out}"
    );
    let id = first["id"].as_u64().unwrap();

    // The same idempotency key: the first email, not a second one.
    let (code, out, err) = send(&cfg, &["--mailbox", "sales", &json]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(queued(&out)["id"], id);
    assert_eq!(queued(&out)["existing"], true);

    let eml = write(dir.path(), "offer.eml", EML);
    let (code, out, err) = send(
        &cfg,
        &["--mailbox", "sales", "--regarding", "case:42", &eml],
    );
    assert_eq!(code, 0, "{err}");
    let from_eml = queued(&out);
    assert!(
        from_eml["subject"]
            .as_str()
            .unwrap()
            .starts_with("Your offer"),
        "{out}"
    );
    assert_ne!(from_eml["id"], id);

    let activities = common::offline_activities(&cfg);
    let mine: Vec<_> = activities
        .iter()
        .filter(|a| a["send"]["status"] == "pending_send")
        .collect();
    assert_eq!(mine.len(), 2, "{activities:?}");
    assert!(mine.iter().all(|a| a["regarding"] == "case:42"), "{mine:?}");

    // While the daemon holds the store: through its admin API.
    let port = common::admin_port(&cfg);
    let daemon = common::start(&cfg);
    common::wait_for(Duration::from_secs(30), "the admin API", || {
        common::activity_total(port)
    });
    let (code, out, err) = send(
        &cfg,
        &["--mailbox", "sales", "--regarding", "case:43", &eml],
    );
    let through_api = queued(&out);
    assert_eq!(code, 0, "{err}");
    let api_id = through_api["id"].as_u64().unwrap();
    let row = common::get_json(port, &format!("/api/v1/outgoing/{api_id}"));
    assert_eq!(row["mailbox"], "sales", "{row}");
    assert_eq!(row["activity"]["regarding"], "case:43", "{row}");
    assert_eq!(
        row["recipients"],
        serde_json::json!(["ann@customer.example", "bob@customer.example"]),
        "{row}"
    );
    assert!(
        row["mime_size"].as_u64().unwrap() > EML.len() as u64 / 2,
        "{row}"
    );
    // Refusals come back from the API with the same exit statuses.
    let (code, _, err) = send(&cfg, &["--mailbox", "nobody", &eml]);
    assert_eq!(code, 64, "{err}");
    let (code, _, err) = send(&cfg, &["--mailbox", "support", &eml]);
    assert_eq!(code, 64, "{err}");
    let empty = write(dir.path(), "empty.json", r#"{"mailbox": "sales"}"#);
    let (code, _, err) = send(&cfg, &[&empty]);
    assert_eq!(code, 65, "{err}");
    common::stop(daemon);
}

#[test]
fn send_refuses_bad_input_and_mailboxes_that_may_not_send() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let eml = write(dir.path(), "m.eml", EML);

    let (code, _, err) = send(&cfg, &["--mailbox", "nobody", &eml]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("\"nobody\""), "{err}");
    // A Maildir mailbox does not send (outgoing is not server-side sync).
    let (code, _, err) = send(&cfg, &["--mailbox", "support", &eml]);
    assert_eq!(code, 64, "{err}");
    // No mailbox at all.
    let (code, _, err) = send(&cfg, &[&eml]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("--mailbox"), "{err}");

    let broken = write(dir.path(), "broken.json", "{\"mailbox\": ");
    let (code, _, err) = send(&cfg, &[&broken]);
    assert_eq!(code, 65, "{err}");
    let typo = write(
        dir.path(),
        "typo.json",
        r#"{"mailbox": "sales", "too": ["a@b.example"]}"#,
    );
    let (code, _, err) = send(&cfg, &[&typo]);
    assert_eq!(code, 65, "{err}");
    assert!(err.contains("unknown field `too`"), "{err}");
    let nothing = write(
        dir.path(),
        "nothing.json",
        r#"{"mailbox": "sales", "to": ["not an address"]}"#,
    );
    let (code, _, err) = send(&cfg, &[&nothing]);
    assert_eq!(code, 65, "{err}");
    let text = write(dir.path(), "notes.txt", "hello");
    let (code, _, err) = send(&cfg, &["--mailbox", "sales", &text]);
    assert_eq!(code, 65, "{err}");
    let (code, _, err) = send(&cfg, &["--mailbox", "sales", "/nonexistent/x.eml"]);
    assert_eq!(code, 65, "{err}");
    assert!(common::offline_activities(&cfg).is_empty());
}

#[test]
fn send_with_the_store_held_and_no_api_exits_69() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    // This process holds the store, and nothing listens on the admin port.
    let _held =
        crm_mailsync::store::SledStore::open(&dir.path().join("state").join("store")).unwrap();
    let eml = write(dir.path(), "m.eml", EML);
    let (code, _, err) = send(&cfg, &["--mailbox", "sales", &eml]);
    assert_eq!(code, 69, "{err}");
    assert!(err.contains("cannot be reached"), "{err}");
}
