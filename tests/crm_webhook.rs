//! `[crm] type = "webhook"` end to end: the daemon binary syncs a generated
//! Maildir and delivers its outbox to a Standard Webhooks receiver running
//! inside the test, which checks every signature (both rotated secrets),
//! validates every body against `schema/event.schema.json` and counts ids.
//! No Dovecot: the mail side is the embedded Maildir connector; what is
//! under test is the outbox and the webhook wire format.

mod common;
#[cfg(feature = "real-servers")]
mod servers;
#[path = "support/webhook_receiver.rs"]
mod webhook_receiver;
// `alert.raised` events: the alert journal and its sender.
#[path = "crm_webhook/alerts.rs"]
mod alerts;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use crm_mailsync::store::{SledStore, Store};
use webhook_receiver::*;

/// A daemon config: mailbox `support` on `maildir` (and `sales` on
/// `sales_maildir` if given), `[crm]` webhook to `url`.
fn config(
    dir: &Path,
    maildir: &Path,
    sales: Option<&Path>,
    url: &str,
    crm: &str,
    delivery: &str,
) -> PathBuf {
    let secret_file = dir.join("webhook.secret");
    std::fs::write(&secret_file, format!("{}\n{}\n", SECRETS[0], SECRETS[1])).unwrap();
    let sales = sales
        .map(|p| {
            format!(
                r#"
[[mailboxes]]
name = "sales"
profile = "local"
email = "sales@example.test"
approval = "approved"
path = "{}"
"#,
                p.display()
            )
        })
        .unwrap_or_default();
    let extra = format!(
        r#"
{sales}
[crm]
type = "webhook"
url = "{url}"
secret_file = "{secret}"
timeout = "5s"
alert_group_wait = "1s"
{crm}

[crm.delivery]
{delivery}
"#,
        secret = secret_file.display()
    );
    maildir_config(dir, maildir, free_port(), 50, &extra)
}

/// What the store holds after the daemon stopped: (events, activities,
/// pending deliveries, dead letters).
fn store_view(dir: &Path) -> (Vec<crm_mailsync::model::OutboxEvent>, u64, usize, usize) {
    let store = SledStore::open(&dir.join("state").join("store")).unwrap();
    let events = store.events_after(0, 0).unwrap();
    let activities = store.count_activities(None).unwrap();
    let pending = store.pending_deliveries("webhook", 0).unwrap().len();
    let dead = store.dead_letters("webhook", 0).unwrap().len();
    (events, activities, pending, dead)
}

/// The value of a metric line (`name{labels} value`) containing all `parts`.
fn metric(port: u16, parts: &[&str]) -> Option<f64> {
    let (_, body) = get(port, "/metrics", None)?;
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| parts.iter().all(|p| l.contains(p)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Asserts the receiver saw every event exactly once by id, each id's
/// bodies identical, every event of an activity in seq order, no bad
/// request; returns how many requests were duplicates.
fn assert_exactly_once(hook: &Hook, events: &[crm_mailsync::model::OutboxEvent]) -> usize {
    let seen = hook.seen.lock().unwrap();
    assert!(
        seen.problems.is_empty(),
        "{:?}",
        &seen.problems[..seen.problems.len().min(5)]
    );
    let expected: HashSet<&str> = events.iter().map(|e| e.id.as_str()).collect();
    let got: HashSet<&str> = seen.bodies.keys().map(String::as_str).collect();
    let missing: Vec<_> = expected.difference(&got).take(5).collect();
    let unknown: Vec<_> = got.difference(&expected).take(5).collect();
    assert!(
        missing.is_empty() && unknown.is_empty(),
        "missing {missing:?}, unknown {unknown:?}"
    );
    let mut duplicates = 0;
    for (id, bodies) in &seen.bodies {
        assert!(
            bodies.iter().all(|b| b == &bodies[0]),
            "{id}: a retry carried another body"
        );
        duplicates += bodies.len() - 1;
    }
    // First arrival of each id: per activity, seqs increase.
    let mut first: HashSet<&str> = HashSet::new();
    let mut last_seq: HashMap<u64, u64> = HashMap::new();
    for (id, activity, seq) in &seen.arrivals {
        if !first.insert(id) {
            continue;
        }
        let prev = last_seq.insert(*activity, *seq).unwrap_or(0);
        assert!(
            prev < *seq,
            "activity {activity}: {id} (seq {seq}) arrived after seq {prev}"
        );
    }
    duplicates
}

/// Writes copies of support's first `n` generated messages (same
/// Message-ID, sender, date, subject) into another Maildir: each becomes an
/// `activity.updated` (`also_seen_as`) of the same activity.
fn copy_messages(from: &Path, to: &Path, n: usize) {
    make_maildir(to);
    let mut names: Vec<_> = std::fs::read_dir(from.join("new"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    for name in names.into_iter().take(n) {
        std::fs::copy(from.join("new").join(&name), to.join("new").join(&name)).unwrap();
    }
}

/// Starts the daemon with its log in `daemon.log` beside the config (a
/// pipe nobody reads would fill with retry warnings and stall it).
fn start_daemon(cfg: &Path, env: Option<(&str, String)>) -> std::process::Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(cfg.with_file_name("daemon.log"))
        .unwrap();
    let mut cmd = daemon_command();
    cmd.args(["run", "--config"])
        .arg(cfg)
        .stdout(std::process::Stdio::null())
        .stderr(log);
    if let Some((k, v)) = env {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

fn wait_delivered(r: &Receiver, n: usize, timeout: Duration) {
    wait_for(timeout, "every event delivered", || {
        (r.distinct() >= n).then_some(())
    });
}

/// Every activity delivered exactly once by webhook-id; copies in a second
/// mailbox produce `activity.updated` events that arrive after their
/// activity's `activity.created`; every signature valid; every body valid
/// against the schema; the outbox metrics count it.
#[test]
fn every_event_is_delivered_once_signed_and_in_order_per_activity() {
    const N: usize = 2000;
    const COPIES: usize = 300;
    let dir = tempfile::tempdir().unwrap();
    let maildir = dir.path().join("Maildir");
    let sales = dir.path().join("Sales");
    generate_messages(&maildir, N);
    copy_messages(&maildir, &sales, COPIES);
    let r = Receiver::start();
    let cfg = config(dir.path(), &maildir, Some(&sales), &r.url(), "", "");
    let port = admin_port(&cfg);
    let child = start_daemon(&cfg, None);
    wait_delivered(&r, N + COPIES, Duration::from_secs(180));
    wait_for(
        Duration::from_secs(30),
        "outbox depth 0 in /metrics",
        || {
            (metric(port, &["crm_mailsync_outbox_depth{", "adapter=\"webhook\""]) == Some(0.0))
                .then_some(())
        },
    );
    let delivered = metric(
        port,
        &["crm_mailsync_crm_deliveries_total{", "result=\"delivered\""],
    )
    .unwrap();
    assert_eq!(delivered as usize, N + COPIES);
    let (status, body) = get(port, "/readyz", None).unwrap();
    assert_eq!(status, 200, "{body}");
    std::thread::sleep(Duration::from_millis(300));
    stop(child);

    let (events, activities, pending, dead) = store_view(dir.path());
    assert_eq!(activities as usize, N);
    assert_eq!(events.len(), N + COPIES);
    let created = events
        .iter()
        .filter(|e| e.kind == crm_mailsync::model::EventKind::ActivityCreated)
        .count();
    assert_eq!(created, N, "one activity.created per activity");
    assert_eq!((pending, dead), (0, 0));
    let duplicates = assert_exactly_once(&r.hook, &events);
    assert_eq!(duplicates, 0, "no crash, no retry: nothing twice");
}

/// The receiver answers 503 with Retry-After for a while, then is gone
/// (connection refused), then is back: nothing lost, nothing dead-lettered,
/// `/readyz` says the adapter is stuck while it is down and ready after.
#[test]
fn receiver_down_for_a_while_then_back_loses_nothing() {
    const N: usize = 300;
    let dir = tempfile::tempdir().unwrap();
    let maildir = dir.path().join("Maildir");
    generate_messages(&maildir, N);
    let mut r = Receiver::start();
    r.hook.mode.store(UNAVAILABLE, Ordering::SeqCst);
    let cfg = config(
        dir.path(),
        &maildir,
        None,
        &r.url(),
        "",
        "retry_schedule = [\"0s\", \"1s\", \"2s\"]\nstuck_after = \"2s\"",
    );
    let port = admin_port(&cfg);
    let child = start_daemon(&cfg, None);
    // Retry-After: 1 holds the adapter: about one request a second.
    wait_for(Duration::from_secs(60), "503s answered", || {
        (r.hook.seen.lock().unwrap().refused >= 5).then_some(())
    });
    r.down();
    let (status, body) = wait_for(
        Duration::from_secs(30),
        "readyz reports the adapter",
        || get(port, "/readyz", None).filter(|(s, b)| *s == 503 && b.contains("webhook")),
    );
    assert!(body.contains("stuck"), "{status} {body}");
    std::thread::sleep(Duration::from_secs(3));
    let failed = metric(
        port,
        &[
            "crm_mailsync_crm_deliveries_total{",
            "result=\"failed\"",
            "disposition=\"transient\"",
        ],
    )
    .unwrap();
    assert!(failed >= 5.0, "{failed}");
    assert_eq!(r.distinct(), 0);
    r.hook.mode.store(ACCEPT, Ordering::SeqCst);
    r.up();
    wait_delivered(&r, N, Duration::from_secs(60));
    wait_for(Duration::from_secs(30), "ready again", || {
        get(port, "/readyz", None).filter(|(s, _)| *s == 200)
    });
    stop(child);
    let (events, _, pending, dead) = store_view(dir.path());
    assert_eq!(events.len(), N);
    assert_eq!((pending, dead), (0, 0));
    assert_exactly_once(&r.hook, &events);
}

/// SIGKILL 20 times while 2,000 events are delivered (at random marks of
/// the receiver's count, and — with the fault-injection hook — right
/// between the receiver's 2xx and the outbox's record of it), restart
/// after each: no event lost, every duplicate a retry of the same
/// webhook-id with the same body.
#[test]
fn sigkill_during_delivery_loses_nothing_and_repeats_only_the_same_ids() {
    const MESSAGES: usize = 1800;
    const COPIES: usize = 200;
    // 1,800 activity.created + 200 activity.updated (copies in `sales`):
    // order per activity is checked across the crashes too.
    const N: usize = MESSAGES + COPIES;
    let dir = tempfile::tempdir().unwrap();
    let maildir = dir.path().join("Maildir");
    let sales = dir.path().join("Sales");
    generate_messages(&maildir, MESSAGES);
    copy_messages(&maildir, &sales, COPIES);
    let r = Receiver::start();
    let cfg = config(dir.path(), &maildir, Some(&sales), &r.url(), "", "");
    let port = admin_port(&cfg);
    let hook = cfg!(feature = "fault-injection");
    let mut kills_mid_delivery = 0;
    for round in 0..20usize {
        let before = r.distinct();
        if before >= N {
            break;
        }
        let by_hook = hook && round % 2 == 1;
        // With the hook the daemon dies on its own right after the k-th
        // 2xx, before recording it.
        let env = by_hook.then(|| {
            (
                "CRM_MAILSYNC_FAULT_KILL_AFTER_DELIVERY",
                fastrand::usize(1..60).to_string(),
            )
        });
        let mut child = start_daemon(&cfg, env);
        if by_hook {
            let deadline = Instant::now() + Duration::from_secs(60);
            while child.try_wait().unwrap().is_none() {
                assert!(
                    Instant::now() < deadline,
                    "round {round}: the hook never fired"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        } else {
            let mark = (before + fastrand::usize(1..=(N / 20))).min(N);
            wait_for(Duration::from_secs(60), "delivery mark", || {
                (r.distinct() >= mark).then_some(())
            });
            child.kill().unwrap();
            child.wait().unwrap();
        }
        if r.distinct() < N {
            kills_mid_delivery += 1;
        }
    }
    assert!(
        kills_mid_delivery >= 15,
        "only {kills_mid_delivery} kills landed mid-delivery"
    );
    let child = start_daemon(&cfg, None);
    wait_delivered(&r, N, Duration::from_secs(120));
    wait_for(Duration::from_secs(30), "outbox drained", || {
        (metric(port, &["crm_mailsync_outbox_depth{", "adapter=\"webhook\""]) == Some(0.0))
            .then_some(())
    });
    std::thread::sleep(Duration::from_millis(300));
    stop(child);
    let (events, activities, pending, dead) = store_view(dir.path());
    assert_eq!(activities as usize, MESSAGES);
    assert_eq!(events.len(), N);
    assert_eq!((pending, dead), (0, 0));
    let duplicates = assert_exactly_once(&r.hook, &events);
    if hook {
        // Every hook kill lands between a 2xx and its record: that event
        // comes again.
        assert!(duplicates >= 10, "{duplicates} duplicates");
    }
    let per_id: BTreeMap<usize, usize> =
        r.hook
            .seen
            .lock()
            .unwrap()
            .bodies
            .values()
            .fold(BTreeMap::new(), |mut m, b| {
                *m.entry(b.len()).or_default() += 1;
                m
            });
    eprintln!("deliveries per id → ids: {per_id:?}");
}

/// A 410 pauses delivery (one alert, `/readyz` not ready, probes at the
/// schedule's longest wait, nothing dropped) until the receiver is back;
/// an event the receiver refuses (422 with a reason) is dead-lettered with
/// an Error alert carrying the reason while every other event goes on.
#[test]
fn gone_endpoint_pauses_and_a_refused_event_is_dead_lettered() {
    const N: usize = 40;
    const REFUSED_SEQ: u64 = 7;
    let dir = tempfile::tempdir().unwrap();
    let maildir = dir.path().join("Maildir");
    generate_messages(&maildir, N);
    let r = Receiver::start();
    r.hook.mode.store(GONE, Ordering::SeqCst);
    r.hook.refuse.lock().unwrap().insert(REFUSED_SEQ);
    let cfg = config(
        dir.path(),
        &maildir,
        None,
        &r.url(),
        "",
        "retry_schedule = [\"0s\", \"1s\", \"2s\"]",
    );
    let port = admin_port(&cfg);
    let child = start_daemon(&cfg, None);
    let (_, body) = wait_for(Duration::from_secs(30), "readyz reports the pause", || {
        get(port, "/readyz", None).filter(|(s, b)| *s == 503 && b.contains("paused"))
    });
    assert!(body.contains("410"), "{body}");
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(5));
    let probes = r.hook.seen.lock().unwrap().refused;
    // One probe at most every 2 s (plus the first attempt), not one per event.
    let bound = 2 + started.elapsed().as_secs() / 2 + 1;
    assert!(
        probes <= bound,
        "{probes} requests while paused (bound {bound})"
    );
    let alerts = get_json(port, "/api/v1/alerts");
    let open: Vec<_> = alerts["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["text"].as_str().unwrap().contains("delivery paused"))
        .collect();
    assert_eq!(open.len(), 1, "{alerts}");
    assert_eq!(open[0]["level"], "error");
    assert!(open[0]["text"].as_str().unwrap().contains("410 Gone"));
    assert_eq!(r.distinct(), 0);

    r.hook.mode.store(ACCEPT, Ordering::SeqCst);
    wait_delivered(&r, N - 1, Duration::from_secs(60));
    wait_for(Duration::from_secs(30), "ready again", || {
        get(port, "/readyz", None).filter(|(s, _)| *s == 200)
    });
    let alerts = get_json(port, "/api/v1/alerts");
    let list = alerts["alerts"].as_array().unwrap();
    let paused = list
        .iter()
        .find(|a| a["text"].as_str().unwrap().contains("delivery paused"))
        .unwrap();
    assert!(paused["resolved_at"].is_number(), "{paused}");
    let refused: Vec<_> = list
        .iter()
        .filter(|a| a["text"].as_str().unwrap().contains("refused event"))
        .collect();
    assert_eq!(refused.len(), 1, "{alerts}");
    let text = refused[0]["text"].as_str().unwrap();
    assert!(
        text.contains(&format!("evt_{REFUSED_SEQ}")) && text.contains("subject is not allowed"),
        "{text}"
    );
    let dead = metric(
        port,
        &["crm_mailsync_outbox_dead_letters{", "adapter=\"webhook\""],
    );
    assert_eq!(dead, Some(1.0));
    stop(child);
    let store = SledStore::open(&dir.path().join("state").join("store")).unwrap();
    let dead = store.dead_letters("webhook", 0).unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].state.seq, REFUSED_SEQ);
    assert!(dead[0].reason.contains("422"), "{}", dead[0].reason);
    assert!(store.pending_deliveries("webhook", 0).unwrap().is_empty());
    let seen = r.hook.seen.lock().unwrap();
    assert!(seen.problems.is_empty(), "{:?}", seen.problems);
    assert!(!seen.bodies.contains_key(&format!("evt_{REFUSED_SEQ}")));
}

/// `records_url` is pulled page by page with the cursor the receiver hands
/// out; records and deletions reach the directory and the cursor is kept.
#[test]
fn records_are_pulled_page_by_page_with_the_cursor() {
    let dir = tempfile::tempdir().unwrap();
    let maildir = dir.path().join("Maildir");
    generate_messages(&maildir, 5);
    let r = Receiver::start();
    let records_url = format!("http://127.0.0.1:{}/records", r.port);
    let cfg = config(
        dir.path(),
        &maildir,
        None,
        &r.url(),
        &format!("records_url = \"{records_url}\"\nrecord_sync_interval = \"1s\""),
        "",
    );
    let child = start_daemon(&cfg, None);
    wait_for(Duration::from_secs(30), "three record pulls", || {
        (r.hook.seen.lock().unwrap().record_cursors.len() >= 3).then_some(())
    });
    stop(child);
    let seen = r.hook.seen.lock().unwrap();
    assert!(seen.problems.is_empty(), "{:?}", seen.problems);
    assert_eq!(
        seen.record_cursors[..3],
        [None, Some("page-2".to_string()), Some("page-3".to_string())]
    );
    let store = SledStore::open(&dir.path().join("state").join("store")).unwrap();
    assert_eq!(
        store.record_cursor("webhook").unwrap().as_deref(),
        Some("page-3")
    );
    assert!(store.record("contact", "c1").unwrap().is_some());
    assert!(store.record("account", "a1").unwrap().is_some());
    assert!(
        store.record("contact", "c2").unwrap().is_none(),
        "deleted on page 2"
    );
    let by_address = store.records_by_address("p0@CUSTOMER.example").unwrap();
    assert_eq!(by_address.len(), 1);
    assert_eq!(by_address[0].id, "c1");
}

/// Test & Enable of the webhook: a signed `webhook.test` the receiver
/// answers 2xx; a closed port is a transient "cannot connect".
#[test]
fn test_event_is_signed_and_a_closed_port_is_transient() {
    use crm_mailsync::crm::{CrmAdapter, CrmError};
    let r = Receiver::start();
    let dir = tempfile::tempdir().unwrap();
    let settings = crm_mailsync::config::WebhookSettings {
        url: r.url(),
        secrets: SECRETS
            .iter()
            .map(|s| crm_mailsync::config::Secret::new(s.to_string()))
            .collect(),
        secret_file: dir.path().join("unused"),
        records_url: None,
        allow_insecure: false,
        ca_file: None,
        timeout: Duration::from_secs(5),
        alert_group_wait: Duration::ZERO,
    };
    let adapter = crm_mailsync::crm::webhook::WebhookAdapter::new(&settings).unwrap();
    let ok = r.rt.block_on(adapter.test()).unwrap();
    assert!(
        ok.contains("accepted") && ok.contains("webhook.test"),
        "{ok}"
    );
    assert_eq!(r.hook.seen.lock().unwrap().tests, 1);
    assert!(r.hook.seen.lock().unwrap().problems.is_empty());
    // No records_url: an empty page, nothing asked.
    let page = r.rt.block_on(adapter.pull_records(None)).unwrap();
    assert!(page.records.is_empty() && page.cursor.is_none() && !page.more);
    let closed = free_port();
    let down =
        crm_mailsync::crm::webhook::WebhookAdapter::new(&crm_mailsync::config::WebhookSettings {
            url: format!("http://127.0.0.1:{closed}/hook"),
            ..settings
        })
        .unwrap();
    let e = r.rt.block_on(down.test()).unwrap_err();
    assert!(matches!(e, CrmError::Transient { .. }), "{e:?}");
    assert!(e.to_string().contains("cannot connect"), "{e}");
}

/// The same over IMAP from the real Dovecot: 2,000 messages of one mailbox,
/// each activity delivered once by webhook-id, every signature valid.
#[cfg(feature = "real-servers")]
#[test]
fn imap_mailbox_from_dovecot_is_delivered_exactly_once() {
    use servers::*;
    const N: usize = 2000;
    let env = env();
    let user = "user00170";
    reset_user(user);
    bulk_generate(user, "INBOX", N, 170);
    let r = Receiver::start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = server_config(
        &env,
        dir.path(),
        free_port(),
        &ServerMailbox {
            kind: "imap_smtp",
            port: env.imap,
            tls: "starttls",
            user,
            password: PASSWORD,
            auth: "password",
            extra_profile: "batch_size = 200",
            extra_mailbox: "",
        },
    );
    let secret_file = dir.path().join("webhook.secret");
    std::fs::write(&secret_file, format!("{}\n{}\n", SECRETS[0], SECRETS[1])).unwrap();
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str(&format!(
        "\n[crm]\ntype = \"webhook\"\nurl = \"{}\"\nsecret_file = \"{}\"\n",
        r.url(),
        secret_file.display()
    ));
    std::fs::write(&cfg, text).unwrap();
    let port = admin_port(&cfg);
    let child = start_daemon(&cfg, None);
    wait_delivered(&r, N, Duration::from_secs(240));
    wait_for(Duration::from_secs(30), "outbox drained", || {
        (metric(port, &["crm_mailsync_outbox_depth{", "adapter=\"webhook\""]) == Some(0.0))
            .then_some(())
    });
    std::thread::sleep(Duration::from_millis(300));
    stop(child);
    let (events, activities, pending, dead) = store_view(dir.path());
    assert_eq!(activities as usize, N);
    assert_eq!(events.len(), N);
    assert_eq!((pending, dead), (0, 0));
    assert_eq!(assert_exactly_once(&r.hook, &events), 0);
}

/// The schema is strict enough to fail: a body with an unknown type or a
/// malformed id is rejected.
#[test]
fn the_schema_rejects_what_the_daemon_must_not_send() {
    let hook = Hook::new();
    let good = serde_json::json!({
        "type": "activity.created", "timestamp": "2026-01-05T10:00:00Z",
        "data": {"seq": 1, "id": "evt_1", "kind": "activity.created", "activity_id": 1, "at": 0,
            "activity": {"id": 1, "mailbox": "m", "source": {"mailbox": "m", "folder": "INBOX", "uidvalidity": 0, "uid": "1"},
                "message_ids": [], "in_reply_to": [], "references": [], "direction": "incoming", "subject": "",
                "from": [], "to": [], "cc": [], "sent_at": null, "received_at": 0, "regarding": "case:1",
                "method": "none", "score": 0.0, "reasons": [], "correlated_with": null, "content_hash": "", "size": 0,
                "parties": [{"role": "from", "address": "a@b.test", "record": "contact:c1"}]}}
    });
    assert!(hook.schema.is_valid(&good));
    for (path, bad) in [
        ("/type", serde_json::json!("activity.deleted")),
        ("/data/id", serde_json::json!("1")),
        ("/data/activity/regarding", serde_json::json!("not a ref")),
        ("/data/activity/parties/0/role", serde_json::json!("sender")),
    ] {
        let mut v = good.clone();
        *v.pointer_mut(path).unwrap() = bad;
        assert!(!hook.schema.is_valid(&v), "{path} accepted");
    }
}
