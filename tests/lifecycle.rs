//! Mailbox lifecycle through the binary: a server outage never disables a
//! mailbox and shows up in `/readyz`; a permanently failing mailbox is
//! re-enabled by the admin API without a restart. No servers needed: the
//! outage is a port nothing listens on.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;

/// Minimal HTTP/1.1 POST without a body: (status, body).
fn post(port: u16, path: &str, token: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn mailbox(port: u16, name: &str) -> serde_json::Value {
    get_json(port, &format!("/api/v1/mailboxes/{name}"))
}

#[test]
fn outage_is_retried_past_the_old_limit_named_by_readyz_and_a_disabled_mailbox_is_enabled_by_api() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // Nothing listens here: every connect is refused, a transient error.
    let closed = free_port();
    let later = dir.path().join("maildir-created-later");
    let cfg = format!(
        r#"
[daemon]
state_dir = "{state}"
log_format = "json"
log_level = "warn"
shutdown_grace = "10s"

[admin]
listen = "127.0.0.1:{port}"
token = "{TOKEN}"

[[profiles]]
name = "down"
type = "imap_smtp"
host = "127.0.0.1"
port = {closed}
tls = "plain"
allow_insecure = true
connect_timeout = "1s"
retry_backoff_max = "1s"
stall_alert_after = "3s"
# Deprecated: used to disable the mailbox after 3 failures; now ignored.
max_transient_failures = 3

[[profiles]]
name = "local"
type = "maildir"
poll_interval = "1s"

[[mailboxes]]
name = "outage"
profile = "down"
email = "outage@example.test"
approval = "approved"
username = "outage"
password = "secret"

[[mailboxes]]
name = "moved"
profile = "local"
email = "moved@example.test"
approval = "approved"
path = "{later}"
"#,
        state = dir.path().join("state").display(),
        later = later.display(),
    );
    let cfg_path = dir.path().join("config.toml");
    std::fs::write(&cfg_path, cfg).unwrap();
    let child = start(&cfg_path);

    // The outage: named by /readyz once stall_alert_after has passed.
    let body = wait_for(Duration::from_secs(30), "readyz naming outage", || {
        get(port, "/readyz", None)
            .filter(|(status, body)| *status == 503 && body.contains("not synced since"))
            .map(|(_, body)| body)
    });
    assert!(
        body.contains(r#"mailbox \"outage\" not synced since"#),
        "{body}"
    );
    assert!(
        !body.contains("moved"),
        "a disabled mailbox is not stalled: {body}"
    );

    // Retried well past the old limit, never disabled.
    wait_for(Duration::from_secs(30), "6 transient failures", || {
        let m = mailbox(port, "outage");
        assert_ne!(m["phase"], "disabled", "{m}");
        (m["state"]["transient_failures"].as_u64() >= Some(6)).then_some(())
    });
    let m = mailbox(port, "outage");
    assert!(m["state"]["enabled"].as_bool().unwrap(), "{m}");
    assert!(m["not_synced_since"].is_i64(), "{m}");
    let alerts = get_json(port, "/api/v1/alerts");
    let stall = alerts["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| {
            a["mailbox"] == "outage"
                && a["level"] == "error"
                && a["text"].as_str().unwrap().starts_with("not synced since")
        })
        .unwrap_or_else(|| panic!("no stall alert: {alerts}"));
    assert!(stall.get("resolved_at").is_none(), "{stall}");

    // The missing Maildir is permanent: disabled, waiting.
    let m = mailbox(port, "moved");
    assert_eq!(m["phase"], "disabled", "{m}");

    // The enable endpoint: bearer-protected, JSON errors.
    assert_eq!(post(port, "/api/v1/mailboxes/moved/enable", None).0, 401);
    let (status, body) = post(port, "/api/v1/mailboxes/nope/enable", Some(TOKEN));
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("\"error\""), "{body}");
    let (status, body) = post(port, "/api/v1/mailboxes/outage/enable", Some(TOKEN));
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("not disabled"), "{body}");

    // Fixed (the Maildir appears) and enabled: it syncs without a restart.
    generate_messages(&later, 3);
    let (status, body) = post(port, "/api/v1/mailboxes/moved/enable", Some(TOKEN));
    assert_eq!(status, 202, "{body}");
    wait_for(Duration::from_secs(30), "moved syncing", || {
        let m = mailbox(port, "moved");
        (m["phase"] == "waiting" && m["state"]["enabled"] == true).then_some(())
    });
    wait_for(Duration::from_secs(30), "3 activities", || {
        activity_total(port).filter(|n| *n == 3)
    });
    let alerts = get_json(port, "/api/v1/alerts");
    let disabled = alerts["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| {
            a["mailbox"] == "moved" && a["text"].as_str().unwrap().starts_with("mailbox disabled")
        })
        .unwrap_or_else(|| panic!("no disabled alert: {alerts}"));
    assert!(
        disabled["resolved_at"].is_i64(),
        "resolved on success: {disabled}"
    );
    stop(child);
}
