//! The done-when of issue #18 for Dataverse, end to end: the daemon binary
//! with `[crm] type = "dataverse"` against the local stand-in
//! (`tests/support/dataverse_standin.rs`). Records are pulled from the
//! stand-in, 2,000 messages are synced from the real Dovecot over IMAP
//! (tracked folders give their regarding case), and every activity arrives
//! as exactly one `email`
//! with its regarding bind and parties, through 429s with Retry-After and a
//! token expiry mid-run.

#![cfg(feature = "real-servers")]

mod common;
#[path = "support/dataverse_standin.rs"]
mod dataverse_standin;
mod servers;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use dataverse_standin::{guid, StandIn};
use serde_json::json;
use servers::{ServerMailbox, PASSWORD};

const CLIENT: &str = "11111111-aaaa-bbbb-cccc-000000000002";
const SECRET: &str = "daemon-standin-secret~value";
const N: usize = 2_000;
const CONTACTS: u64 = 300;
const CASES: usize = 4;
const USER: &str = "user00180";
/// The admin token `servers::server_config` writes.
const API_TOKEN: &str = "integration-test-token";

/// Message `i`: its folder (`None`: the inbox) and sender.
fn layout(i: usize) -> (Option<usize>, String) {
    let folder = (i % 5 < CASES).then_some(i % 5);
    let sender = if i.is_multiple_of(7) {
        format!("stranger{i}@elsewhere.test")
    } else {
        format!("contact{}@customers.test", i as u64 % CONTACTS)
    };
    (folder, sender)
}

fn folder_name(f: usize) -> String {
    format!("Case{f}")
}

/// Writes the messages: Maildir++ folder `.Case<f>` or the inbox.
fn write_messages(root: &Path) {
    make_maildir(root);
    for f in 0..CASES {
        make_maildir(&root.join(format!(".{}", folder_name(f))));
    }
    for i in 0..N {
        let (folder, sender) = layout(i);
        let dir = match folder {
            Some(f) => root.join(format!(".{}", folder_name(f))),
            None => root.to_path_buf(),
        };
        let text = format!(
            "Message-ID: <dv-{i}@example.test>\nDate: Tue, 06 Jan 2026 09:{:02}:{:02} +0000\nFrom: Sender {i} <{sender}>\nTo: support@example.test\nSubject: Question {i} about item {}\n\nHello, this is message {i}.\n",
            (i / 60) % 60,
            i % 60,
            i * 7919
        );
        let name = format!("{}.M{:06}P1.dv", 1_767_100_000 + i, i);
        std::fs::write(dir.join("new").join(name), text).unwrap();
    }
}

fn seed(si: &StandIn) {
    let modified = "2025-06-01T00:00:00Z";
    si.seed(
        "contacts",
        (0..CONTACTS)
            .map(|i| {
                json!({
                    "contactid": guid(0xc0, i),
                    "fullname": format!("Contact {i}"),
                    "emailaddress1": format!("contact{i}@customers.test"),
                    "donotemail": false,
                    "modifiedon": modified,
                })
            })
            .collect(),
    );
    si.seed(
        "queues",
        vec![json!({"queueid": guid(0x90, 0), "name": "Support", "emailaddress": "support@example.test", "modifiedon": modified})],
    );
    si.seed(
        "systemusers",
        vec![json!({"systemuserid": guid(0x05e7, 0), "fullname": "User 0", "internalemailaddress": "user0@ourco.test", "isdisabled": false, "modifiedon": modified})],
    );
    si.seed(
        "incidents",
        (0..CASES as u64)
            .map(|i| json!({"incidentid": guid(0x1c, i), "title": format!("Case {i}")}))
            .collect(),
    );
}

fn config(dir: &Path, si: &StandIn) -> std::path::PathBuf {
    let secret = dir.join("client.secret");
    std::fs::write(&secret, SECRET).unwrap();
    let folders: Vec<String> = (0..CASES)
        .map(|f| {
            format!(
                "{{ folder = \"{}\", regarding = \"case:{}\" }}",
                folder_name(f),
                guid(0x1c, f as u64)
            )
        })
        .collect();
    let env = servers::env();
    let mailbox = format!("tracked_folders = [{}]", folders.join(", "));
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
            extra_profile: "batch_size = 200",
            extra_mailbox: &mailbox,
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
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The admin API's count of records of a kind (the daemon holds the store).
fn record_count(port: u16, kind: &str) -> Option<u64> {
    let (status, body) = get(
        port,
        &format!("/api/v1/records?kind={kind}&limit=1000"),
        Some(API_TOKEN),
    )?;
    if status != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    v["records"].as_array().map(|a| a.len() as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_delivers_2000_messages_as_exactly_2000_emails_through_429s_and_a_token_expiry()
{
    let si = StandIn::start().await;
    si.add_client(CLIENT, SECRET);
    seed(&si);
    // Short-lived tokens: several renewals during the run, besides the
    // forced expiry below.
    si.set_token_lifetime(Duration::from_secs(8));
    si.throttle_every(Some(250), 1);

    let dir = tempfile::tempdir().unwrap();
    servers::reset_user(USER);
    for f in 0..CASES {
        // Left by an earlier run (reset_user empties the inbox only) or new.
        servers::doveadm(&format!("mailbox delete -u {USER} -s {}", folder_name(f)));
        assert!(servers::doveadm(&format!(
            "mailbox create -u {USER} {}",
            folder_name(f)
        )));
    }
    let cfg = config(dir.path(), &si);
    let port = admin_port(&cfg);
    let child = start(&cfg);

    // The directory first (the pull loop), then the mail, so every party
    // the directory knows resolves at ingest.
    wait_until(Duration::from_secs(60), "the records pulled", || {
        record_count(port, "contact") == Some(CONTACTS) && record_count(port, "queue") == Some(1)
    })
    .await;
    let staging = dir.path().join("staging");
    write_messages(&staging);
    let load = |folder: &str, from: &Path| {
        let from = from.join("new");
        let from = from.to_str().unwrap().to_string();
        servers::script("bulk-load.sh", &["-f", folder, USER, &from]);
    };
    load("INBOX", &staging);
    for f in 0..CASES {
        load(
            &folder_name(f),
            &staging.join(format!(".{}", folder_name(f))),
        );
    }

    wait_until(Duration::from_secs(240), "half of the emails", || {
        si.emails().len() >= N / 2
    })
    .await;
    si.expire_tokens();
    wait_until(Duration::from_secs(240), "every email", || {
        si.emails().len() >= N
    })
    .await;
    // Nothing left in the outbox, then a moment for any stray duplicate.
    wait_until(Duration::from_secs(60), "outbox depth 0", || {
        get(port, "/api/v1/outbox", Some(API_TOKEN))
            .and_then(|(_, b)| serde_json::from_str::<serde_json::Value>(&b).ok())
            .is_some_and(|v| v.to_string().contains("\"depth\":0"))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop(child);

    let stats = si.stats();
    assert!(stats.throttled > 0, "no 429 was injected: {stats:?}");
    let emails = si.emails();
    assert_eq!(emails.len(), N, "exactly one email per message");
    let mut by_mid: HashMap<String, &dataverse_standin::StoredEmail> = HashMap::new();
    for e in &emails {
        let mid = e.fields["messageid"].as_str().unwrap().to_string();
        assert!(by_mid.insert(mid.clone(), e).is_none(), "{mid} twice");
    }
    let queue = ("queues".to_string(), guid(0x90, 0));
    let mut seen = HashSet::new();
    for i in 0..N {
        let mid = format!("<dv-{i}@example.test>");
        let e = by_mid
            .get(&mid)
            .or_else(|| by_mid.get(mid.trim_matches(['<', '>'])))
            .unwrap_or_else(|| panic!("{mid} missing"));
        seen.insert(e.id.clone());
        let (folder, sender) = layout(i);
        let want_regarding = folder.map(|f| ("incidents".to_string(), guid(0x1c, f as u64)));
        assert_eq!(e.regarding, want_regarding, "{mid}: regarding");
        let from = e.parties.iter().find(|p| p.mask == 1).unwrap();
        let want_from = sender
            .strip_prefix("contact")
            .and_then(|r| r.split('@').next())
            .map(|n| ("contacts".to_string(), guid(0xc0, n.parse().unwrap())));
        assert_eq!(from.party, want_from, "{mid}: sender {sender}");
        if want_from.is_none() {
            assert_eq!(from.addressused.as_deref(), Some(sender.as_str()));
        }
        let to = e.parties.iter().find(|p| p.mask == 2).unwrap();
        assert_eq!(to.party.as_ref(), Some(&queue), "{mid}: to");
        assert_eq!(e.fields["directioncode"], json!(false), "{mid}: incoming");
    }
    assert_eq!(seen.len(), N);
}
