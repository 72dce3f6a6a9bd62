//! One mailbox, one deployment, as one story for every kind of mailbox
//! (tests/deployment_marker.rs: Maildir and Dovecot; tests/graph.rs:
//! Exchange Online): two daemons (two deployments, each with its own
//! store) on the same mailbox. The first claims it, the second refuses it
//! (disabled, an Error alert naming the other deployment, nothing ingested)
//! until an operator forces a take-over with Test & Enable; then the first
//! finds the new marker at its next check and disables its side. Included
//! with `#[path]` by the tests that tell it (beside `mod common;`).
#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::common::*;

pub const A: &str = "deployment-a-0001";
pub const B: &str = "deployment-b-0002";

/// A daemon of deployment `id` (the environment overrides the id every
/// test daemon otherwise shares).
pub fn start_as(config: &Path, id: &str, admin: u16) -> Running {
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

/// The mailbox `name` as the admin API shows it.
pub fn mailbox(admin: u16, name: &str) -> Value {
    get_json(admin, &format!("/api/v1/mailboxes/{name}"))
}

/// The mailbox's phase; empty until its task shows in the runtime view
/// (the admin API answers before every task has started).
pub fn phase(admin: u16, name: &str) -> String {
    match get(admin, &format!("/api/v1/mailboxes/{name}"), Some(TOKEN)) {
        Some((200, body)) => serde_json::from_str::<Value>(&body).unwrap()["phase"]
            .as_str()
            .unwrap_or("")
            .to_string(),
        _ => String::new(),
    }
}

/// Open Error alerts of the mailbox whose text mentions `needle`.
pub fn alerts_naming(admin: u16, name: &str, needle: &str) -> Vec<Value> {
    get_json(
        admin,
        &format!("/api/v1/alerts?mailbox={name}&state=open&level=error"),
    )["alerts"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|a| a["text"].as_str().is_some_and(|t| t.contains(needle)))
        .collect()
}

/// Starts a Test & Enable job and waits for it.
pub fn test_job(admin: u16, name: &str, query: &str) -> Value {
    let (status, started) = request(
        admin,
        "POST",
        &format!("/api/v1/mailboxes/{name}/test{query}"),
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
pub fn result(job: &Value) -> Value {
    job["results"][0].clone()
}

/// Every kind of mailbox refuses and takes over the same way; what differs
/// is where the marker is and how the test looks at it.
pub trait MarkedMailbox {
    /// The mailbox's name in both configs.
    fn name(&self) -> &str;
    /// The deployment id the mailbox's marker names now (and that there is
    /// exactly one marker).
    fn marker(&self) -> Option<String>;
    /// Puts one new message into the mailbox.
    fn deliver(&self, tag: &str);
}

/// The whole story, for any kind of mailbox; both configs check the
/// marker every second (`marker_check_every = "1s"`).
pub fn one_mailbox_one_deployment(mb: &dyn MarkedMailbox, config_a: &Path, config_b: &Path) {
    let (admin_a, admin_b) = (admin_port(config_a), admin_port(config_b));
    let name = mb.name();
    mb.deliver("first");
    mb.deliver("second");

    // A claims the mailbox and syncs it.
    let mut a = start_as(config_a, A, admin_a);
    wait_for(Duration::from_secs(60), "A: 2 activities", || {
        (activity_total(admin_a) == Some(2)).then_some(())
    });
    assert_eq!(mb.marker().as_deref(), Some(A));
    let detail = mailbox(admin_a, name)["state"]["incoming_test"]["detail"]
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
        (phase(admin_b, name) == "disabled").then_some(())
    });
    let refusal = alerts_naming(admin_b, name, A);
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
    let job = test_job(admin_b, name, "");
    let r = result(&job);
    assert_eq!(r["incoming"]["status"], "failure", "{job}");
    assert!(
        r["incoming"]["detail"].as_str().unwrap().contains(A),
        "{job}"
    );
    assert_eq!(r["enabled"], false, "{job}");
    assert_eq!(phase(admin_b, name), "disabled");
    assert_eq!(activity_total(admin_b), Some(0));
    assert_eq!(mb.marker().as_deref(), Some(A));

    // Forced: B takes the mailbox over and runs.
    let job = test_job(admin_b, name, "?force=true");
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
        (phase(admin_a, name) == "disabled").then_some(())
    });
    let taken = alerts_naming(admin_a, name, B);
    assert_eq!(taken.len(), 1, "{taken:?}");

    // New mail now reaches B only.
    mb.deliver("third");
    wait_for(Duration::from_secs(60), "B: 3 activities", || {
        (activity_total(admin_b) == Some(3)).then_some(())
    });
    assert_eq!(activity_total(admin_a), Some(2));
    assert_eq!(phase(admin_a, name), "disabled");
    assert_eq!(mb.marker().as_deref(), Some(B));
    b.stop();
    a.stop();
}
