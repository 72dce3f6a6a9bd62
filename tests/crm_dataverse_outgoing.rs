//! Issue #19 with Dataverse, end to end: the daemon binary polls the
//! stand-in (`tests/support/dataverse_standin.rs`) for emails the CRM left in
//! Pending Send, sends the one of its server-side-sync mailbox once through
//! the SMTP sink, and the CRM's own email goes to Sent (statecode 1,
//! statuscode 3) with the Message-ID that was sent, never a second email.

#![cfg(feature = "real-servers")]

mod common;
#[path = "support/dataverse_standin.rs"]
mod dataverse_standin;
mod servers;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use dataverse_standin::{guid, StandIn, StoredParty};
use serde_json::json;
use servers::{ServerMailbox, PASSWORD};

const CLIENT: &str = "11111111-aaaa-bbbb-cccc-000000000003";
const SECRET: &str = "outgoing-standin-secret~value";
const USER: &str = "user00181";

fn config(dir: &Path, si: &StandIn) -> std::path::PathBuf {
    let secret = dir.join("client.secret");
    std::fs::write(&secret, SECRET).unwrap();
    let env = servers::env();
    let smtp_port: u16 = std::env::var("SMTP_PORT").unwrap().parse().unwrap();
    let profile = format!("smtp_port = {smtp_port}\nsmtp_tls = \"starttls\"");
    let cfg = servers::server_config(
        &env,
        dir,
        free_port(),
        &ServerMailbox {
            kind: "imap_smtp",
            port: env.imap,
            tls: "starttls",
            user: USER,
            password: PASSWORD,
            auth: "password",
            extra_profile: &profile,
            extra_mailbox: "outgoing = \"server_side_sync\"",
        },
    );
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str(&format!(
        r#"
[crm]
type = "dataverse"
url = "{url}"
token_url = "{token_url}"
client_id = "{CLIENT}"
client_secret_file = "{secret}"
record_sync_interval = "1s"
timeout = "10s"

[crm.delivery]
retry_schedule = ["0s", "1s", "2s"]
"#,
        url = si.url,
        token_url = si.token_url,
        secret = secret.display(),
    ));
    std::fs::write(&cfg, text).unwrap();
    cfg
}

async fn wait_until(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The sink's messages that carry `needle`.
fn sink_count(needle: &str) -> usize {
    let out = std::env::var("TESTSERVERS_SMTP_OUT").unwrap();
    std::fs::read_dir(out)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.path().extension().is_some_and(|x| x == "eml"))
                .filter(|e| std::fs::read_to_string(e.path()).is_ok_and(|t| t.contains(needle)))
                .count()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_crms_pending_email_is_sent_once_and_becomes_sent() {
    let si = StandIn::start().await;
    si.add_client(CLIENT, SECRET);
    let incident = guid(0x1c, 19);
    si.seed(
        "incidents",
        vec![json!({"incidentid": incident, "title": "Pump"})],
    );
    let marker = format!("pending-{}", std::process::id());
    let party = |mask, a: &str| StoredParty {
        mask,
        party: None,
        addressused: Some(a.to_string()),
    };
    let crm = si.seed_email(
        json!({
            "subject": format!("Your quote {marker}"),
            "description": format!("<p>Dear Carol, {marker}</p>"),
            "directioncode": true,
            "statecode": 1,
            "statuscode": 6,
        }),
        Some(("incidents", &incident)),
        vec![
            party(1, &format!("{USER}@example.test")),
            party(2, "carol@customer.example"),
        ],
    );
    // Someone else's pending email: not this daemon's to send.
    let other = si.seed_email(
        json!({"subject": format!("Not ours {marker}"), "directioncode": true, "statecode": 1, "statuscode": 6}),
        Some(("incidents", &incident)),
        vec![party(1, "someone@elsewhere.example"), party(2, "carol@customer.example")],
    );

    let dir = tempfile::tempdir().unwrap();
    servers::reset_user(USER);
    let cfg = config(dir.path(), &si);
    let child = start(&cfg);

    let status = |id: &str| {
        si.emails().into_iter().find(|e| e.id == id).map(|e| {
            (
                e.fields["statecode"].clone(),
                e.fields["statuscode"].clone(),
            )
        })
    };
    wait_until(Duration::from_secs(90), "the CRM's email Sent", || {
        status(&crm) == Some((json!(1), json!(3)))
    })
    .await;
    // Several more polls: nothing is queued or sent again.
    tokio::time::sleep(Duration::from_secs(20)).await;
    stop(child);

    assert_eq!(sink_count(&format!("Dear Carol, {marker}")), 1, "sent once");
    assert_eq!(sink_count(&format!("Not ours {marker}")), 0);
    let stats = si.stats();
    assert_eq!(
        stats.creates, 0,
        "the CRM's email was updated, not duplicated"
    );
    assert_eq!(si.emails().len(), 2);
    let e = si.emails().into_iter().find(|e| e.id == crm).unwrap();
    let mid = e.fields["messageid"].as_str().unwrap().to_string();
    assert_eq!(sink_count(mid.trim_matches(['<', '>'])), 1, "{mid}");
    let subject = e.fields["subject"].as_str().unwrap();
    let token = e.fields["trackingtoken"].as_str().unwrap();
    assert!(subject.contains(token), "{subject} carries {token}");
    assert_eq!(status(&other), Some((json!(1), json!(6))));
}
