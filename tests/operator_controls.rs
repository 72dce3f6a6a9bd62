//! Approve / Reject Email and Enable / Disable at run time, through the
//! admin API of the real daemon: what an operator sets takes effect without
//! a restart, is kept across one, and wins over the configuration's approval.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::Value;

fn wait_phase(port: u16, phase: &str) -> Value {
    wait_for(Duration::from_secs(20), &format!("phase {phase}"), || {
        // None while the daemon is not listening yet.
        let (_, body) = get(port, "/api/v1/mailboxes/support", Some(TOKEN))?;
        let m: Value = serde_json::from_str(&body).ok()?;
        (m["phase"] == phase).then_some(m)
    })
}

fn wait_activities(port: u16, n: u64) {
    wait_for(Duration::from_secs(20), &format!("{n} activities"), || {
        (activity_total(port) == Some(n)).then_some(())
    });
}

/// One more message in the Maildir.
fn add_message(maildir: &Path, i: usize) {
    let text = format!(
        "Message-ID: <late-{i}@example.test>\nFrom: late@customer.example\nTo: support@example.test\nSubject: late {i}\n\nhello {i}\n"
    );
    std::fs::write(
        maildir.join("new").join(format!("1768000000.L{i}P1.gen")),
        text,
    )
    .unwrap();
}

fn post(port: u16, path: &str) -> (u16, Value) {
    request(port, "POST", path, None)
}

#[test]
fn approval_and_enablement_set_at_run_time_take_effect_at_once_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let maildir = dir.path().join("maildir");
    generate_messages(&maildir, 3);
    let port = free_port();
    let cfg = maildir_config(dir.path(), &maildir, port, 50, "");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace("approval = \"approved\"", "approval = \"pending\""),
    )
    .unwrap();

    let mut daemon = Running(Some(start(&cfg)));
    let m = wait_phase(port, "not_approved");
    assert_eq!(m["approval"], "pending", "{m}");
    assert!(
        m["not_processing_reason"]
            .as_str()
            .unwrap()
            .contains("not approved"),
        "{m}"
    );
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        activity_total(port),
        Some(0),
        "a pending mailbox reads nothing"
    );

    // Approve Email: it starts without a restart.
    let (status, body) = post(port, "/api/v1/mailboxes/support/approve");
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["status"], "approved");
    assert_eq!(body["control"]["approval"], "approved");
    wait_activities(port, 3);
    let m = wait_phase(port, "waiting");
    assert_eq!(m["approval"], "approved");
    assert_eq!(m.get("not_processing_reason"), None, "{m}");

    // Disable: it stops; new mail waits.
    let (status, body) = post(port, "/api/v1/mailboxes/support/disable");
    assert_eq!(status, 202, "{body}");
    let m = wait_phase(port, "disabled");
    assert!(
        m["not_processing_reason"]
            .as_str()
            .unwrap()
            .starts_with("disabled by an operator at "),
        "{m}"
    );
    assert!(m["disabled_by_operator_at"].is_i64(), "{m}");
    add_message(&maildir, 1);
    add_message(&maildir, 2);
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        activity_total(port),
        Some(3),
        "a disabled mailbox reads nothing"
    );
    let (status, body) = post(port, "/api/v1/mailboxes/support/disable");
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("already disabled"),
        "{body}"
    );

    // Both settings are the store's, not the process's: a restart keeps them
    // (the configuration still says pending).
    daemon.stop();
    let mut daemon = Running(Some(start(&cfg)));
    let m = wait_phase(port, "disabled");
    assert_eq!(m["approval"], "approved", "{m}");
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(activity_total(port), Some(3));

    // Enable: Test & Enable runs and the waiting mail arrives.
    let (status, body) = post(port, "/api/v1/mailboxes/support/enable");
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["status"], "enabling");
    assert_eq!(body["control"]["disabled_at"], Value::Null);
    wait_activities(port, 5);
    wait_phase(port, "waiting");
    let (status, body) = post(port, "/api/v1/mailboxes/support/enable");
    assert_eq!(status, 409, "enabling a running mailbox: {body}");

    // Reject Email: with process_only_approved it stops again.
    let (status, _) = post(port, "/api/v1/mailboxes/support/reject");
    assert_eq!(status, 202);
    let m = wait_phase(port, "not_approved");
    assert_eq!(m["approval"], "rejected");
    add_message(&maildir, 3);
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        activity_total(port),
        Some(5),
        "a rejected mailbox reads nothing"
    );
    let alerts = get_json(port, "/api/v1/alerts?mailbox=support&state=open");
    let kinds: Vec<&str> = alerts["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["kind"].as_str().unwrap())
        .collect();
    assert!(kinds.contains(&"not_approved"), "{alerts}");

    for action in ["approve", "reject", "enable", "disable"] {
        let (status, body) = post(port, &format!("/api/v1/mailboxes/nobody/{action}"));
        assert_eq!(status, 404, "{action}: {body}");
        assert_eq!(body["error"], "no mailbox \"nobody\"");
    }
    daemon.stop();
}
