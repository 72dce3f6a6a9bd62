//! Exchange Online through Microsoft Graph, end to end: the daemon binary
//! with an `exchange_online` profile against the local Graph stand-in
//! (`tests/support/graph_standin/`), which follows Graph's wire format and
//! checks what Graph would enforce (four requests in flight per mailbox,
//! ImmutableId on every request, Retry-After).

mod common;
#[path = "common/deployment_story.rs"]
mod deployment_story;
#[path = "support/graph_standin/mod.rs"]
mod graph_standin;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use graph_standin::{GraphStandIn, LoggedRequest};
use serde_json::{json, Value};

const CLIENT: &str = "6731de76-14a6-49ae-97bc-6eba6914391e";
const SECRET: &str = "Qa58Q~standin.client-secret_value";
const MAILBOX: &str = "crm@contoso.test";
const TRACKED: [&str; 3] = ["Orders", "Claims", "Returns"];

/// A test message from a customer.
fn eml(tag: &str, i: usize) -> Vec<u8> {
    format!(
        "Message-ID: <{tag}-{i}@fabrikam.test>\r\nDate: Tue, 06 Jan 2026 09:{:02}:{:02} +0000\r\nFrom: Customer {i} <customer{}@fabrikam.test>\r\nTo: {MAILBOX}\r\nSubject: {tag} question {i}\r\nThread-Topic: {tag} question {i}\r\n\r\nHello, this is message {i}.\r\n",
        (i / 60) % 60,
        i % 60,
        i % 40
    )
    .into_bytes()
}

struct Setup {
    dir: tempfile::TempDir,
    cfg: PathBuf,
    admin: u16,
}

impl Setup {
    fn secret_file(&self) -> PathBuf {
        self.dir.path().join("client.secret")
    }
}

/// A daemon config for one Graph mailbox; the three tracked folders under
/// the Inbox point at accounts t0..t2.
fn setup(si: &GraphStandIn, extra_profile: &str, extra_mailbox: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    let secret = dir.path().join("client.secret");
    std::fs::write(&secret, SECRET).unwrap();
    let tracked: Vec<String> = TRACKED
        .iter()
        .enumerate()
        .map(|(k, f)| format!("{{ folder = \"Inbox/{f}\", regarding = \"account:t{k}\" }}"))
        .collect();
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
name = "m365"
type = "exchange_online"
tenant_id = "{tenant}"
client_id = "{CLIENT}"
client_secret_file = "{secret}"
graph_url = "{graph}"
login_url = "{login}"
poll_interval = "1s"
retry_backoff_max = "2s"
batch_size = 100
page_size = 50
io_timeout = "10s"
{limit}
{extra_profile}

[[mailboxes]]
name = "crm"
profile = "m365"
email = "{MAILBOX}"
approval = "approved"
tracked_folders = [{tracked}]
{extra_mailbox}
"#,
        state = dir.path().join("state").display(),
        tenant = si.tenant,
        secret = secret.display(),
        graph = si.graph_url,
        login = si.url,
        tracked = tracked.join(", "),
        // Graph's 10,000 requests per 10 minutes would make these runs
        // take minutes: raised here and in the stand-in alike, except in
        // the test of the limit itself.
        limit = if extra_profile.contains("mailbox_request_limit") {
            ""
        } else {
            "mailbox_request_limit = 10000000"
        },
    );
    let cfg = dir.path().join("config.toml");
    std::fs::write(&cfg, text).unwrap();
    Setup { dir, cfg, admin }
}

/// A stand-in with the app and the CRM mailbox (Inbox and its three
/// tracked subfolders).
async fn standin() -> GraphStandIn {
    let si = GraphStandIn::start().await;
    si.set_mailbox_limit(10_000_000, Duration::from_secs(600));
    si.add_client(CLIENT, SECRET);
    si.add_user(MAILBOX);
    for f in TRACKED {
        si.add_folder(MAILBOX, &format!("Inbox/{f}"));
    }
    si
}

/// Where message `i` of a run lands: the Inbox or a tracked folder (k).
fn folder_of(i: usize) -> (String, Option<usize>) {
    match i % 4 {
        0 => ("Inbox".to_string(), None),
        k => (format!("Inbox/{}", TRACKED[k - 1]), Some(k - 1)),
    }
}

async fn wait_until<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Activities by Message-ID (asserting there is one per id).
fn by_message_id(port: u16) -> HashMap<String, Value> {
    let mut out = HashMap::new();
    for a in all_activities(port) {
        let mid = a["message_ids"][0]
            .as_str()
            .unwrap_or_default()
            .trim_matches(['<', '>'])
            .to_string();
        assert!(
            out.insert(mid.clone(), a).is_none(),
            "{mid}: two activities"
        );
    }
    out
}

/// The alerts (none while the API is not up yet).
fn alerts(port: u16) -> Vec<Value> {
    get(port, "/api/v1/alerts?limit=1000", Some(TOKEN))
        .filter(|(code, _)| *code == 200)
        .and_then(|(_, body)| serde_json::from_str::<Value>(&body).ok())
        .and_then(|v| v["alerts"].as_array().cloned())
        .unwrap_or_default()
}

/// Every Graph-side rule held: immutable ids asked for, never a fifth
/// request in flight.
fn assert_graph_rules(si: &GraphStandIn) {
    let st = si.stats();
    assert_eq!(st.without_immutable_ids, 0, "{st:?}");
    assert_eq!(st.concurrency_violations, 0, "{st:?}");
    assert_eq!(st.over_mailbox_limit, 0, "{st:?}");
    assert!(st.peak_in_flight <= 4, "{st:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_messages_over_inbox_and_tracked_folders_then_five_more_then_a_move_re_points()
{
    const N: usize = 2_000;
    let si = standin().await;
    let mut ids = Vec::new();
    for i in 0..N {
        let (folder, _) = folder_of(i);
        ids.push(si.deliver(MAILBOX, &folder, &eml("bulk", i)));
    }
    let s = setup(&si, "", "");
    let mut daemon = Running(Some(start(&s.cfg)));
    // Halfway, every token dies and Graph is briefly unavailable.
    wait_until(Duration::from_secs(300), "1,000 activities", || {
        (activity_total(s.admin)? >= N as u64 / 2).then_some(())
    })
    .await;
    si.expire_tokens();
    si.unavailable_next(6);
    wait_until(Duration::from_secs(300), "2,000 activities", || {
        (activity_total(s.admin)? == N as u64).then_some(())
    })
    .await;
    let st = si.stats();
    assert!(st.unauthorized >= 1 && st.tokens_issued >= 2, "{st:?}");
    // The category is added from what the delta page listed: per message
    // one download and one PATCH, no read in between (Graph counts every
    // request against 10,000 per 10 minutes per mailbox).
    assert_eq!(st.message_reads, 0, "{st:?}");
    assert_eq!(st.unavailable, 6, "{st:?}");
    // Every message is marked processed (the category follow-up).
    wait_until(Duration::from_secs(60), "every message categorized", || {
        let all: usize = ["Inbox", "Inbox/Orders", "Inbox/Claims", "Inbox/Returns"]
            .iter()
            .map(|f| {
                si.messages(MAILBOX, f)
                    .iter()
                    .filter(|m| m.categories.iter().any(|c| c == "Tracked to CRM"))
                    .count()
            })
            .sum();
        (all == N).then_some(())
    })
    .await;
    let acts = by_message_id(s.admin);
    daemon.stop();
    assert_eq!(acts.len(), N);
    for i in 0..N {
        let a = &acts[&format!("bulk-{i}@fabrikam.test")];
        let want = folder_of(i).1.map(|k| format!("account:t{k}"));
        assert_eq!(a["regarding"].as_str().map(String::from), want, "{a}");
    }

    // Five more while it was down; a restart records exactly those.
    for i in N..N + 5 {
        si.deliver(MAILBOX, &folder_of(i).0, &eml("bulk", i));
    }
    let downloads_before = si.stats().downloads;
    let mut daemon = Running(Some(start(&s.cfg)));
    wait_until(Duration::from_secs(60), "2,005 activities", || {
        (activity_total(s.admin)? == (N + 5) as u64).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(activity_total(s.admin), Some((N + 5) as u64));
    // Nothing known was downloaded again (the delta links were kept).
    assert_eq!(si.stats().downloads - downloads_before, 5);

    // A move from Orders to Claims re-points the activity (one activity).
    let moved = &ids[1];
    si.move_message(MAILBOX, moved, "Inbox/Claims");
    wait_until(Duration::from_secs(60), "re-pointed to account:t1", || {
        let acts = by_message_id(s.admin);
        let a = &acts["bulk-1@fabrikam.test"];
        (a["regarding"] == "account:t1").then(|| a.clone())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(activity_total(s.admin), Some((N + 5) as u64));
    daemon.stop();
    assert_graph_rules(&si);
}

/// Kills the daemon with SIGKILL.
fn kill(mut child: std::process::Child) {
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_sigkills_during_a_5000_message_initial_sync_leave_exactly_5000_activities() {
    const N: usize = 5_000;
    let si = standin().await;
    for i in 0..N {
        si.deliver(MAILBOX, &folder_of(i).0, &eml("kill", i));
    }
    // Slow enough that the sync spans every kill.
    si.set_delay(Duration::from_millis(8));
    let s = setup(&si, "", "");
    let mut last = 0u64;
    for k in 0..20 {
        let child = start(&s.cfg);
        // Some progress since the last kill (or a first commit), then a
        // random moment inside the next batches.
        let now = wait_until(Duration::from_secs(60), "progress", || {
            activity_total(s.admin).filter(|n| *n > last || (k == 0 && *n > 0))
        })
        .await;
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..400))).await;
        kill(child);
        assert!(now < N as u64, "the sync finished before kill {k}");
        last = now;
    }
    si.set_delay(Duration::ZERO);
    let mut daemon = Running(Some(start(&s.cfg)));
    wait_until(Duration::from_secs(300), "5,000 activities", || {
        (activity_total(s.admin)? >= N as u64).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let acts = by_message_id(s.admin);
    daemon.stop();
    assert_eq!(acts.len(), N, "exactly one activity per message");
    for i in 0..N {
        assert!(
            acts.contains_key(&format!("kill-{i}@fabrikam.test")),
            "kill-{i} missing"
        );
    }
    assert_graph_rules(&si);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_delta_link_resyncs_without_duplicates_and_one_information_alert() {
    const N: usize = 300;
    let si = standin().await;
    for i in 0..N {
        si.deliver(MAILBOX, &folder_of(i).0, &eml("gone", i));
    }
    let s = setup(&si, "", "");
    let mut daemon = Running(Some(start(&s.cfg)));
    wait_until(Duration::from_secs(120), "300 activities", || {
        (activity_total(s.admin)? == N as u64).then_some(())
    })
    .await;
    // Let a cycle end on the delta links, then Graph forgets them.
    tokio::time::sleep(Duration::from_secs(2)).await;
    si.expire_sync_states();
    for i in N..N + 3 {
        si.deliver(MAILBOX, &folder_of(i).0, &eml("gone", i));
    }
    wait_until(Duration::from_secs(120), "303 activities", || {
        (activity_total(s.admin)? >= (N + 3) as u64).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let acts = by_message_id(s.admin);
    assert_eq!(acts.len(), N + 3);
    let resync: Vec<Value> = alerts(s.admin)
        .into_iter()
        .filter(|a| {
            a["text"]
                .as_str()
                .unwrap_or("")
                .contains("dropped the sync state")
        })
        .collect();
    assert_eq!(resync.len(), 1, "one alert for the mailbox: {resync:?}");
    assert_eq!(resync[0]["level"], "information", "{resync:?}");
    assert!(
        resync[0]["text"]
            .as_str()
            .unwrap()
            .contains("SyncStateNotFound"),
        "{resync:?}"
    );
    daemon.stop();
    assert!(si.stats().gone >= 1);
    assert_graph_rules(&si);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_percent_429s_with_fractional_retry_after_still_sync_everything_within_the_limits() {
    const N: usize = 1_000;
    let si = standin().await;
    for i in 0..N {
        si.deliver(MAILBOX, &folder_of(i).0, &eml("busy", i));
    }
    si.throttle_percent(20, "0.3");
    si.set_delay(Duration::from_millis(5));
    let s = setup(&si, "", "");
    let mut daemon = Running(Some(start(&s.cfg)));
    wait_until(Duration::from_secs(300), "1,000 activities", || {
        (activity_total(s.admin)? >= N as u64).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let acts = by_message_id(s.admin);
    daemon.stop();
    assert_eq!(acts.len(), N);
    let st = si.stats();
    assert!(
        st.throttled * 100 >= st.requests * 15,
        "about 20 % throttled: {st:?}"
    );
    assert_eq!(
        st.early_retries, 0,
        "a request came back before its Retry-After: {st:?}"
    );
    assert_eq!(st.peak_in_flight, 4, "four in flight were used: {st:?}");
    assert_graph_rules(&si);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_secret_disables_the_mailbox_naming_aadsts_and_a_fixed_secret_recovers_without_restart(
) {
    let si = standin().await;
    for i in 0..20 {
        si.deliver(MAILBOX, "Inbox", &eml("auth", i));
    }
    let s = setup(&si, "", "");
    std::fs::write(s.secret_file(), "the-secret-id-not-its-value").unwrap();
    let mut daemon = Running(Some(start(&s.cfg)));
    let alert = wait_until(Duration::from_secs(60), "the sign-in alert", || {
        alerts(s.admin).into_iter().find(|a| {
            a["level"] == "error" && a["text"].as_str().unwrap_or("").contains("AADSTS7000215")
        })
    })
    .await;
    let text = alert["text"].as_str().unwrap();
    assert!(text.contains("client secret"), "says what to fix: {text}");
    assert!(
        !text.contains("the-secret-id-not-its-value"),
        "no secret in alerts: {text}"
    );
    let mb = wait_until(Duration::from_secs(30), "disabled", || {
        let m = get_json(s.admin, "/api/v1/mailboxes/crm");
        (m["state"]["enabled"] == false).then_some(m)
    })
    .await;
    assert!(mb.to_string().contains("AADSTS7000215"), "{mb}");
    assert_eq!(activity_total(s.admin), Some(0));

    // The operator pastes the secret's value: picked up, no restart.
    std::fs::write(s.secret_file(), SECRET).unwrap();
    wait_until(Duration::from_secs(60), "20 activities", || {
        (activity_total(s.admin)? == 20).then_some(())
    })
    .await;
    let m = get_json(s.admin, "/api/v1/mailboxes/crm");
    assert_eq!(m["state"]["enabled"], true, "{m}");

    // Later the secret expires in Entra: AADSTS7000222 names it.
    si.expire_client_secret(CLIENT);
    si.expire_tokens();
    si.deliver(MAILBOX, "Inbox", &eml("auth", 99));
    wait_until(Duration::from_secs(60), "the expired-secret alert", || {
        alerts(s.admin)
            .into_iter()
            .find(|a| a["text"].as_str().unwrap_or("").contains("AADSTS7000222"))
    })
    .await;
    daemon.stop();
    assert_graph_rules(&si);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_secret_expiry_date_in_the_config_raises_a_warning_ahead_of_it() {
    let si = standin().await;
    si.deliver(MAILBOX, "Inbox", &eml("expiry", 0));
    let soon = (chrono::Utc::now() + chrono::Duration::days(3)).format("%Y-%m-%d");
    let s = setup(&si, &format!("client_secret_expires_at = \"{soon}\""), "");
    let mut daemon = Running(Some(start(&s.cfg)));
    let warning = wait_until(Duration::from_secs(60), "the expiry warning", || {
        alerts(s.admin).into_iter().find(|a| {
            a["level"] == "warning"
                && a["text"]
                    .as_str()
                    .unwrap_or("")
                    .contains("client secret expires")
        })
    })
    .await;
    assert!(
        warning["text"]
            .as_str()
            .unwrap()
            .contains(&soon.to_string()),
        "{warning}"
    );
    // The hourly access tokens are not something to warn about.
    assert!(
        !alerts(s.admin).iter().any(|a| a["text"]
            .as_str()
            .unwrap_or("")
            .contains("access token expires")),
        "{:?}",
        alerts(s.admin)
    );
    daemon.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_credential_signs_in_with_a_client_assertion() {
    let si = GraphStandIn::start().await;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/graph");
    let cert = std::fs::read(root.join("test-cert.pem")).unwrap();
    let key = std::fs::read(root.join("test-key.pem")).unwrap();
    si.add_certificate_client(CLIENT, &cert, &key);
    si.add_user(MAILBOX);
    for f in TRACKED {
        si.add_folder(MAILBOX, &format!("Inbox/{f}"));
    }
    si.deliver(MAILBOX, "Inbox", &eml("cert", 0));
    let s = setup(&si, "", "");
    // The same config with the certificate instead of the secret file.
    let text = std::fs::read_to_string(&s.cfg).unwrap().replace(
        &format!("client_secret_file = \"{}\"", s.secret_file().display()),
        &format!(
            "client_certificate_file = \"{}\"\nclient_key_file = \"{}\"",
            root.join("test-cert.pem").display(),
            root.join("test-key.pem").display()
        ),
    );
    std::fs::write(&s.cfg, text).unwrap();
    let mut daemon = Running(Some(start(&s.cfg)));
    wait_until(Duration::from_secs(60), "one activity", || {
        (activity_total(s.admin)? == 1).then_some(())
    })
    .await;
    daemon.stop();
    let st = si.stats();
    assert!(st.tokens_issued >= 1 && st.token_refusals == 0, "{st:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_emails_go_out_through_send_mail_once_each_land_in_sent_items_and_replies_correlate(
) {
    const N: usize = 200;
    let si = standin().await;
    si.add_user("buyer@fabrikam.test");
    // The Sent copy shows up a moment after the 202, as in Exchange.
    si.set_sent_delay(Duration::from_millis(300));
    let s = setup(&si, "", "outgoing = \"server_side_sync\"");
    let mut daemon = Running(Some(start(&s.cfg)));
    wait_until(Duration::from_secs(30), "admin API", || {
        get(s.admin, "/healthz", None).filter(|(c, _)| *c == 200)
    })
    .await;
    // Test & Enable ran for both directions, over Graph.
    let mb = wait_until(Duration::from_secs(60), "both tests done", || {
        let m = get_json(s.admin, "/api/v1/mailboxes/crm");
        (m["state"]["incoming_test"]["status"] != "not_run"
            && m["state"]["outgoing_test"]["status"] != "not_run")
            .then_some(m)
    })
    .await;
    assert_eq!(mb["state"]["incoming_test"]["status"], "success", "{mb}");
    assert!(
        mb["state"]["incoming_test"]["detail"]
            .as_str()
            .unwrap()
            .contains("Inbox readable"),
        "{mb}"
    );
    assert_eq!(mb["state"]["outgoing_test"]["status"], "success", "{mb}");
    assert!(
        mb["state"]["outgoing_test"]["detail"]
            .as_str()
            .unwrap()
            .contains("202 Accepted"),
        "{mb}"
    );
    let mut queued = Vec::new();
    for i in 0..N {
        let (code, v) = request(
            s.admin,
            "POST",
            "/api/v1/outgoing",
            Some(&json!({
                "mailbox": "crm",
                "regarding": format!("case:{}", i % 10),
                "to": [if i % 2 == 0 { "buyer@fabrikam.test".to_string() } else { format!("other{i}@elsewhere.test") }],
                "subject": format!("Offer #{i}"),
                "text": format!("Our offer {i}."),
                "idempotency_key": format!("graph-send-{i}"),
            })),
        );
        assert!(code == 202 || code == 200, "{code} {v}");
        queued.push(v);
    }
    wait_until(Duration::from_secs(240), "200 emails sent", || {
        let (_, v) = request(
            s.admin,
            "GET",
            "/api/v1/outgoing?mailbox=crm&status=sent&limit=1000",
            None,
        );
        (v["items"].as_array()?.len() == N).then_some(())
    })
    .await;
    let sent = si.messages(MAILBOX, "Sent Items");
    let mut copies: HashMap<String, usize> = HashMap::new();
    for m in &sent {
        *copies
            .entry(m.internet_message_id.clone().unwrap_or_default())
            .or_default() += 1;
    }
    for q in &queued {
        let mid = format!("<{}>", q["message_id"].as_str().unwrap());
        assert_eq!(copies.get(&mid), Some(&1), "{mid}: one copy in Sent Items");
    }
    // One sendMail per email, plus the Test & Enable message.
    assert_eq!(si.stats().sends, N as u64 + 1, "sendMail once per email");
    // The buyer got the even ones, with our token in the subject.
    let inbox = si.messages("buyer@fabrikam.test", "Inbox");
    assert_eq!(inbox.len(), N / 2);
    let token_of: HashMap<String, String> = queued
        .iter()
        .map(|q| {
            (
                format!("<{}>", q["message_id"].as_str().unwrap()),
                q["token"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for m in &inbox {
        let mid = m.internet_message_id.clone().unwrap();
        assert!(m.subject.ends_with(&token_of[&mid]), "{}", m.subject);
    }

    // The buyer answers two of them: by In-Reply-To, and (threading
    // headers dropped) by the token alone.
    let q4 = &queued[4];
    let mid4 = q4["message_id"].as_str().unwrap();
    let reply = format!(
        "From: buyer@fabrikam.test\r\nTo: {MAILBOX}\r\nSubject: Re: Offer #4 (header)\r\nMessage-ID: <reply-4@fabrikam.test>\r\nIn-Reply-To: <{mid4}>\r\nReferences: <{mid4}>\r\nDate: Thu, 03 Dec 2026 10:00:00 +0000\r\n\r\nAccepted.\r\n"
    );
    let q6 = &queued[6];
    let stripped = format!(
        "From: buyer@fabrikam.test\r\nTo: {MAILBOX}\r\nSubject: Re: Offer #6 (token) {}\r\nMessage-ID: <reply-6@fabrikam.test>\r\nDate: Thu, 03 Dec 2026 10:01:00 +0000\r\n\r\nAccepted too.\r\n",
        q6["token"].as_str().unwrap()
    );
    si.deliver(MAILBOX, "Inbox", reply.as_bytes());
    si.deliver(MAILBOX, "Inbox", stripped.as_bytes());
    for (part, regarding, method) in [
        ("(header)", "case:4", "in_reply_to"),
        ("(token)", "case:6", "tracking_token"),
    ] {
        let a = wait_until(Duration::from_secs(60), "reply correlated", || {
            all_activities(s.admin).into_iter().find(|a| {
                a["direction"] == "incoming"
                    && a["subject"].as_str().is_some_and(|t| t.contains(part))
            })
        })
        .await;
        assert_eq!(a["regarding"], regarding, "{a}");
        assert_eq!(a["method"], method, "{a}");
    }
    daemon.stop();
    assert_graph_rules(&si);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_size_limit_is_quarantined_and_moved_to_the_failed_folder() {
    let si = standin().await;
    for i in 0..3 {
        si.deliver(MAILBOX, "Inbox", &eml("small", i));
    }
    let mut big = eml("big", 0);
    big.extend(std::iter::repeat_n(b'x', 8 * 1024));
    big.extend(b"\r\n");
    let big_id = si.deliver(MAILBOX, "Inbox", &big);
    let s = setup(
        &si,
        "max_message_size = 4096\nmove_failed_to = \"Inbox/Failed\"",
        "",
    );
    let mut daemon = Running(Some(start(&s.cfg)));
    wait_until(
        Duration::from_secs(60),
        "the big one in Inbox/Failed",
        || {
            si.messages(MAILBOX, "Inbox/Failed")
                .iter()
                .any(|m| m.id == big_id)
                .then_some(())
        },
    )
    .await;
    assert_eq!(activity_total(s.admin), Some(3));
    let q = get_json(s.admin, "/api/v1/quarantine");
    let list = q["quarantine"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{q}");
    assert!(
        list[0]["reason"].as_str().unwrap().contains("4096"),
        "the reason names the limit: {q}"
    );
    // Its body was never read past the limit; a later cycle does not
    // record it again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        get_json(s.admin, "/api/v1/quarantine")["quarantine"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    daemon.stop();
    assert_graph_rules(&si);
}

/// Graph answers a mailbox's requests past 10,000 in 10 minutes with 429;
/// the daemon stays under such a limit by itself. Scaled down so it runs
/// in seconds: 200 requests per 20 s on both sides, 150 messages (over 300
/// requests) to sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_mailbox_request_limit_is_kept_without_a_single_429() {
    const N: usize = 150;
    let si = standin().await;
    si.set_mailbox_limit(200, Duration::from_secs(20));
    for i in 0..N {
        si.deliver(MAILBOX, "Inbox", &eml("limit", i));
    }
    let s = setup(
        &si,
        "mailbox_request_limit = 200\nmailbox_request_window = \"20s\"",
        "",
    );
    let started = Instant::now();
    let mut daemon = Running(Some(start(&s.cfg)));
    wait_until(Duration::from_secs(120), "150 activities", || {
        (activity_total(s.admin)? == N as u64).then_some(())
    })
    .await;
    let took = started.elapsed();
    wait_until(Duration::from_secs(60), "every message categorized", || {
        (si.messages(MAILBOX, "Inbox")
            .iter()
            .filter(|m| !m.categories.is_empty())
            .count()
            == N)
            .then_some(())
    })
    .await;
    daemon.stop();
    let st = si.stats();
    assert!(
        st.requests > 200,
        "the run needed more than one window: {st:?}"
    );
    assert_eq!(st.over_mailbox_limit, 0, "{st:?}");
    assert!(
        took > Duration::from_secs(5),
        "paced, not at once: {took:?}"
    );
    assert_graph_rules(&si);
}

// --- One mailbox, one deployment ------------------------------------------

/// The marker's extended property on the mailbox's root folder, spelled out
/// as the connector names it: a change would orphan every marker written.
const MARKER_PROPERTY: &str =
    "String {1ba39feb-a463-46db-8af2-08f0abec1c92} Name CrmMailsyncDeployment";

/// The deployment the mailbox's marker names.
fn marker_of(si: &GraphStandIn) -> Option<String> {
    let value = si.extended_property(MAILBOX, "msgfolderroot", MARKER_PROPERTY)?;
    let v: Value = serde_json::from_str(&value).unwrap();
    v["deployment"].as_str().map(String::from)
}

/// The config checks the marker every second.
fn check_marker_every_second(cfg: &Path) {
    let text = std::fs::read_to_string(cfg).unwrap().replacen(
        "shutdown_grace = \"10s\"",
        "shutdown_grace = \"10s\"\nmarker_check_every = \"1s\"",
        1,
    );
    std::fs::write(cfg, text).unwrap();
}

/// A request of the marker: the root folder read with the property
/// expanded, or written.
fn is_marker(r: &LoggedRequest) -> bool {
    r.path == "mailFolders/msgfolderroot"
        && (r.method == "PATCH"
            || r.param("$expand")
                .is_some_and(|e| e.contains(MARKER_PROPERTY)))
}

struct Exchange<'a>(&'a GraphStandIn);

impl deployment_story::MarkedMailbox for Exchange<'_> {
    fn name(&self) -> &str {
        "crm"
    }

    fn marker(&self) -> Option<String> {
        marker_of(self.0)
    }

    fn deliver(&self, tag: &str) {
        self.0.deliver(MAILBOX, "Inbox", &eml(tag, 0));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exchange_online_mailbox_syncs_with_one_deployment_and_a_forced_take_over_disables_the_other(
) {
    let si = standin().await;
    let (a, b) = (setup(&si, "", ""), setup(&si, "", ""));
    check_marker_every_second(&a.cfg);
    check_marker_every_second(&b.cfg);
    // The story blocks (admin API calls, waits); the stand-in answers on
    // the runtime's other thread.
    tokio::task::block_in_place(|| {
        deployment_story::one_mailbox_one_deployment(&Exchange(&si), &a.cfg, &b.cfg)
    });
    // Written twice in all: A's claim and B's forced take-over (a refused
    // B and a disabled A write nothing).
    let patches: Vec<LoggedRequest> = si
        .requests()
        .into_iter()
        .filter(|r| is_marker(r) && r.method == "PATCH")
        .collect();
    assert_eq!(patches.len(), 2, "{patches:?}");
    assert_eq!(si.stats().folder_patches, 2);
    assert_eq!(si.stats().without_immutable_ids, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_marker_is_written_once_and_each_check_costs_one_get() {
    let si = standin().await;
    for i in 0..3 {
        si.deliver(MAILBOX, "Inbox", &eml("marker", i));
    }
    let s = setup(&si, "", "");
    check_marker_every_second(&s.cfg);
    let mut daemon = Running(Some(start(&s.cfg)));
    wait_until(Duration::from_secs(60), "3 activities", || {
        (activity_total(s.admin)? == 3).then_some(())
    })
    .await;
    assert_eq!(marker_of(&si).as_deref(), Some(TEST_DEPLOYMENT_ID));
    let mb = get_json(s.admin, "/api/v1/mailboxes/crm");
    let detail = mb["state"]["incoming_test"]["detail"].as_str().unwrap();
    assert!(
        detail.contains(&format!(
            "marked as synchronized by deployment {TEST_DEPLOYMENT_ID}"
        )),
        "{detail}"
    );
    // The claim's three requests, then at least five checks.
    let log = wait_until(Duration::from_secs(60), "five checks", || {
        let log = si.requests();
        (log.iter().filter(|r| is_marker(r)).count() >= 3 + 5).then_some(log)
    })
    .await;
    daemon.stop();
    let marker: Vec<(usize, &LoggedRequest)> = log
        .iter()
        .enumerate()
        .filter(|(_, r)| is_marker(r))
        .collect();
    // Claimed: read (no marker), written, read back.
    let claim: Vec<(&str, u16)> = marker[..3]
        .iter()
        .map(|(_, r)| (r.method.as_str(), r.status))
        .collect();
    assert_eq!(claim, [("GET", 200), ("PATCH", 200), ("GET", 200)]);
    // Every check after it: one GET, nothing written.
    let checks = &marker[3..];
    for (_, r) in checks {
        assert_eq!((r.method.as_str(), r.status), ("GET", 200), "{r:?}");
    }
    assert_eq!(si.stats().folder_patches, 1);
    // At most one check per sync cycle (a cycle reads the folders' delta
    // links), and no more often than every second: a slow run checks less
    // often, never more.
    for pair in checks.windows(2) {
        let (from, to) = (pair[0].0, pair[1].0);
        let cycles = log[from..to]
            .iter()
            .filter(|r| r.path.ends_with("/messages/delta"))
            .count();
        assert!(cycles >= 1, "two checks without a cycle between them");
    }
    let span = checks.last().unwrap().1.at - marker[2].1.at;
    assert!(
        checks.len() as f64 <= span.as_secs_f64() + 1.0,
        "{} checks in {span:?}",
        checks.len()
    );
    let (first, last) = (checks[0].0, checks.last().unwrap().0);
    let between = &log[first..last];
    eprintln!(
        "marker: {} checks in {span:?}, each 1 GET; {} requests from the first check to the last ({} delta)",
        checks.len(),
        between.len(),
        between.iter().filter(|r| r.path.ends_with("/messages/delta")).count()
    );

    // A restart finds its own marker: one GET, nothing written.
    let before = si.requests().len();
    let mut daemon = Running(Some(start(&s.cfg)));
    let log = wait_until(
        Duration::from_secs(60),
        "two reads after the restart",
        || {
            let log = si.requests();
            (log[before..].iter().filter(|r| is_marker(r)).count() >= 2).then_some(log)
        },
    )
    .await;
    daemon.stop();
    assert!(log[before..]
        .iter()
        .filter(|r| is_marker(r))
        .all(|r| r.method == "GET" && r.status == 200));
    assert_eq!(si.stats().folder_patches, 1);
    assert_eq!(marker_of(&si).as_deref(), Some(TEST_DEPLOYMENT_ID));
    assert_graph_rules(&si);
}
