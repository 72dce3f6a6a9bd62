//! `alert.raised` events: Error alerts, escalations and alerts resolved
//! at once reach the webhook from the store's alert journal, in order,
//! under a webhook-id of their own that retries and crashes repeat.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::common::*;
use super::webhook_receiver::*;
use super::{config, start_daemon};
use crm_mailsync::crm::alert_events;
use crm_mailsync::model::{AlertLevel, NewAlert};
use crm_mailsync::store::{AlertEventKind, SledStore, Store};

/// A mailbox disabled by a permanent error (its tracked folder is gone)
/// raises an Error alert that reaches the webhook as a signed
/// `alert.raised` event, once: not again while it counts up, nor after a
/// restart.
#[test]
fn a_new_error_alert_goes_out_once_as_a_signed_alert_event() {
    let dir = tempfile::tempdir().unwrap();
    let maildir = dir.path().join("Maildir");
    generate_messages(&maildir, 3);
    let r = Receiver::start();
    let cfg = config(dir.path(), &maildir, None, &r.url(), "", "");
    // A tracked folder that does not exist disables the mailbox.
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "path = ",
        "tracked_folders = [{ folder = \"INBOX/Gone\", regarding = \"account:x\" }]\npath = ",
    );
    std::fs::write(&cfg, text).unwrap();
    let alerts = |r: &Receiver| r.hook.seen.lock().unwrap().alerts.clone();
    let child = start_daemon(&cfg, None);
    let sent = wait_for(Duration::from_secs(30), "the alert event", || {
        let a = alerts(&r);
        (!a.is_empty()).then_some(a)
    });
    assert_eq!(sent.len(), 1, "{sent:?}");
    let data = &sent[0]["data"];
    assert_eq!(data["kind"], "disabled", "{data}");
    assert_eq!(data["mailbox"], "support");
    assert!(
        data["text"].as_str().unwrap().contains("INBOX/Gone"),
        "{data}"
    );
    std::thread::sleep(Duration::from_secs(6));
    stop(child);
    let child = start_daemon(&cfg, None);
    std::thread::sleep(Duration::from_secs(8));
    stop(child);
    let after = alerts(&r);
    assert_eq!(
        after.len(),
        1,
        "sent once, not again after a restart: {after:?}"
    );
    assert!(r.hook.seen.lock().unwrap().problems.is_empty());
}

/// The daemon's alert sender run in this process over its own sled store,
/// as the daemon runs it, so a test can raise alerts at chosen moments.
struct AlertSender {
    store: Arc<dyn Store>,
    cancel: tokio_util::sync::CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl AlertSender {
    fn start(r: &Receiver, store: &Arc<dyn Store>) -> Self {
        Self::with_group_wait(r, store, Duration::ZERO)
    }

    fn with_group_wait(r: &Receiver, store: &Arc<dyn Store>, group_wait: Duration) -> Self {
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
            alert_group_wait: group_wait,
        };
        let adapter = Arc::new(crm_mailsync::crm::webhook::WebhookAdapter::new(&settings).unwrap());
        let cancel = tokio_util::sync::CancellationToken::new();
        let task = r.rt.spawn(alert_events::run(
            adapter,
            store.clone(),
            group_wait,
            cancel.clone(),
        ));
        let sender = AlertSender {
            store: store.clone(),
            cancel,
            task: Some(task),
        };
        wait_for(Duration::from_secs(10), "the sender's cursor", || {
            sender.store.named_cursor(alert_events::CURSOR).unwrap()
        });
        sender
    }

    fn stop(mut self, r: &Receiver) {
        self.cancel.cancel();
        if let Some(t) = self.task.take() {
            r.rt.block_on(t).unwrap();
        }
    }
}

fn open_store(dir: &Path) -> Arc<dyn Store> {
    Arc::new(SledStore::open(&dir.join("store")).unwrap())
}

fn raise(s: &Arc<dyn Store>, kind: &str, level: AlertLevel, mailbox: &str, at: i64) -> u64 {
    s.raise_alert(
        NewAlert {
            kind,
            level,
            mailbox: Some(mailbox),
            profile: Some("local"),
            text: &format!("{kind} at {at}"),
        },
        at,
    )
    .unwrap()
    .id
}

/// `GET path` of the admin API as JSON; `None` while the daemon does not answer.
fn try_json(port: u16, path: &str) -> Option<serde_json::Value> {
    let (status, body) = get(port, path, Some(TOKEN))?;
    (status == 200).then(|| serde_json::from_str(&body).unwrap())
}

/// The accepted alert events, (webhook-id, body), in arrival order.
fn accepted_alerts(r: &Receiver) -> Vec<(String, serde_json::Value)> {
    let seen = r.hook.seen.lock().unwrap();
    assert!(seen.problems.is_empty(), "{:?}", seen.problems);
    seen.alert_ids
        .iter()
        .cloned()
        .zip(seen.alerts.iter().cloned())
        .collect()
}

/// Hole (a) of the polling sender: a `sync_failing` Warning that escalates
/// in place to an Error keeps its id; it is still sent, once, under its own
/// webhook-id, and its repeats at Error are not. (A marker alert raised
/// after the repeats arrives after them in journal order, so nothing sent
/// for the repeats can still be on its way.)
#[test]
fn an_escalation_from_warning_to_error_is_delivered_once() {
    let dir = tempfile::tempdir().unwrap();
    let r = Receiver::start();
    let store = open_store(dir.path());
    let sender = AlertSender::start(&r, &store);
    let id = raise(&store, "sync_failing", AlertLevel::Warning, "support", 10);
    raise(&store, "sync_failing", AlertLevel::Warning, "support", 11);
    assert_eq!(
        raise(&store, "sync_failing", AlertLevel::Error, "support", 20),
        id,
        "escalated in place"
    );
    for at in 21..25 {
        raise(&store, "sync_failing", AlertLevel::Error, "support", at);
    }
    let marker = raise(&store, "disabled", AlertLevel::Error, "sales", 30);
    let got = wait_for(Duration::from_secs(30), "the marker alert", || {
        let a = accepted_alerts(&r);
        (a.len() >= 2).then_some(a)
    });
    sender.stop(&r);
    let ids: Vec<&str> = got.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(
        ids,
        vec![
            format!("alert_{id}_escalated_1").as_str(),
            format!("alert_{marker}").as_str()
        ]
    );
    let data = &got[0].1["data"];
    assert_eq!(
        (data["id"].as_u64(), data["level"].as_str()),
        (Some(id), Some("error"))
    );
    assert_eq!(data["count"], 3, "the alert as the escalation left it");
    assert_eq!(got[0].1["timestamp"], "1970-01-01T00:00:20Z");
    assert!(
        store.alert_events_after(0, 0).unwrap().is_empty(),
        "sent entries are pruned"
    );
}

/// The group wait: the first mailboxes of a profile to notice an outage
/// become Errors before the profile alert exists; raised within the group
/// wait after them, it covers them. A mailbox Error of another profile
/// waits as long and is then sent.
#[test]
fn a_profile_alert_raised_within_the_group_wait_covers_the_mailbox_errors_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let r = Receiver::start();
    let store = open_store(dir.path());
    let sender = AlertSender::with_group_wait(&r, &store, Duration::from_secs(3));
    let now = crm_mailsync::model::now();
    let raise_in = |mailbox: Option<&str>, kind: &str, profile: &str, at: i64| {
        store
            .raise_alert(
                NewAlert {
                    kind,
                    level: AlertLevel::Error,
                    mailbox,
                    profile: Some(profile),
                    text: "x",
                },
                at,
            )
            .unwrap()
            .id
    };
    raise_in(Some("support"), "sync_failing", "local", now);
    let elsewhere = raise_in(Some("other"), "disabled", "elsewhere", now);
    let profile = raise_in(None, "profile_failing", "local", now + 2);
    // Raised while the profile alert is open: the write-time rule.
    raise_in(Some("sales"), "sync_failing", "local", now + 2);
    let got = wait_for(Duration::from_secs(30), "the events", || {
        let a = accepted_alerts(&r);
        (a.len() >= 2).then_some(a)
    });
    // A marker after them all, so nothing else is still on its way.
    let marker = raise_in(None, "marker", "elsewhere", now + 10);
    let got_all = wait_for(Duration::from_secs(30), "the marker", || {
        let a = accepted_alerts(&r);
        (a.len() > got.len()).then_some(a)
    });
    sender.stop(&r);
    let ids: Vec<String> = got_all.into_iter().map(|(id, _)| id).collect();
    assert_eq!(
        ids,
        vec![
            format!("alert_{elsewhere}"),
            format!("alert_{profile}"),
            format!("alert_{marker}")
        ],
        "support's Error is covered by the profile alert 2 s after it"
    );
}

/// Hole (b): an Error alert raised and resolved while the sender was not
/// looking (here: not running at all) is sent, as it was while open.
#[test]
fn an_error_raised_and_resolved_within_one_look_is_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let r = Receiver::start();
    let store = open_store(dir.path());
    AlertSender::start(&r, &store).stop(&r);
    let id = raise(&store, "stuck", AlertLevel::Error, "support", 10);
    assert_eq!(store.resolve_alerts("support", "stuck", 12).unwrap(), 1);
    assert!(!store.alert(id).unwrap().unwrap().is_open());
    let sender = AlertSender::start(&r, &store);
    let got = wait_for(Duration::from_secs(30), "the alert event", || {
        let a = accepted_alerts(&r);
        (!a.is_empty()).then_some(a)
    });
    sender.stop(&r);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0, format!("alert_{id}"));
    let data = &got[0].1["data"];
    assert_eq!(data["kind"], "stuck");
    assert!(data.get("resolved_at").is_none(), "sent as raised: {data}");
}

/// A receiver that answers 503 to the first attempts gets each retry under
/// the same webhook-id with the same body, and in the end exactly one
/// accepted event per journal entry, in journal order.
#[test]
fn a_failing_receiver_gets_the_same_id_on_retry_and_one_event_per_entry() {
    let dir = tempfile::tempdir().unwrap();
    let r = Receiver::start();
    r.hook.alert_failures.store(2, Ordering::SeqCst);
    let store = open_store(dir.path());
    let sender = AlertSender::start(&r, &store);
    let a = raise(&store, "disabled", AlertLevel::Error, "support", 10);
    let b = raise(&store, "sync_failing", AlertLevel::Warning, "sales", 11);
    raise(&store, "sync_failing", AlertLevel::Error, "sales", 12);
    let c = raise(&store, "stuck", AlertLevel::Error, "support", 13);
    let journal: Vec<String> = store
        .alert_events_after(0, 0)
        .unwrap()
        .iter()
        .map(|e| e.webhook_id())
        .collect();
    assert_eq!(
        journal,
        vec![
            format!("alert_{a}"),
            format!("alert_{b}_escalated_2"),
            format!("alert_{c}")
        ]
    );
    let got = wait_for(Duration::from_secs(60), "every alert event", || {
        let g = accepted_alerts(&r);
        (g.len() >= 3).then_some(g)
    });
    sender.stop(&r);
    let ids: Vec<String> = got.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(ids, journal, "one accepted event per entry, in order");
    let seen = r.hook.seen.lock().unwrap();
    let first: Vec<&(String, Vec<u8>)> = seen
        .alert_attempts
        .iter()
        .filter(|(id, _)| *id == journal[0])
        .collect();
    assert_eq!(first.len(), 3, "refused twice, then accepted");
    assert!(
        first.iter().all(|(_, body)| body == &first[0].1),
        "every retry carries the same body"
    );
    assert_eq!(seen.alert_attempts.len(), 5);
    drop(seen);
    assert!(store.alert_events_after(0, 0).unwrap().is_empty());
    assert_eq!(store.named_cursor(alert_events::CURSOR).unwrap(), Some(3));
}

/// The journal is durable: an Error raised while the receiver is away
/// (connection refused) survives a restart of the daemon and is sent by
/// the next one, once.
#[test]
fn an_alert_raised_before_a_restart_is_sent_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let maildir = dir.path().join("Maildir");
    generate_messages(&maildir, 3);
    let mut r = Receiver::start();
    r.down();
    let cfg = config(dir.path(), &maildir, None, &r.url(), "", "");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "path = ",
        "tracked_folders = [{ folder = \"INBOX/Gone\", regarding = \"account:x\" }]\npath = ",
    );
    std::fs::write(&cfg, text).unwrap();
    let port = admin_port(&cfg);
    let child = start_daemon(&cfg, None);
    wait_for(Duration::from_secs(30), "the disabled alert", || {
        let alerts = try_json(port, "/api/v1/alerts?level=error&state=open")?;
        alerts["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["kind"] == "disabled")
            .then_some(())
    });
    stop(child);
    let id = {
        let store = SledStore::open(&dir.path().join("state").join("store")).unwrap();
        let journal = store.alert_events_after(0, 0).unwrap();
        assert_eq!(journal.len(), 1, "{journal:?}");
        assert_eq!(journal[0].kind, AlertEventKind::Raised);
        assert_eq!(
            store.named_cursor(alert_events::CURSOR).unwrap(),
            Some(0),
            "not sent"
        );
        journal[0].alert.id
    };
    r.up();
    let child = start_daemon(&cfg, None);
    let got = wait_for(Duration::from_secs(30), "the alert event", || {
        let a = accepted_alerts(&r);
        (!a.is_empty()).then_some(a)
    });
    // The restarted mailbox is disabled again: the same open alert counts
    // up and nothing more is journaled; let it run a few polls.
    wait_for(Duration::from_secs(30), "the alert counted again", || {
        let alerts = try_json(port, "/api/v1/alerts?level=error&mailbox=support")?;
        alerts["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["id"] == id && a["count"].as_u64() > Some(1))
            .then_some(())
    });
    stop(child);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, format!("alert_{id}"));
    assert_eq!(accepted_alerts(&r).len(), 1, "sent once");
    let store = SledStore::open(&dir.path().join("state").join("store")).unwrap();
    assert!(store.alert_events_after(0, 0).unwrap().is_empty());
    assert_eq!(store.named_cursor(alert_events::CURSOR).unwrap(), Some(1));
}

/// SIGKILL right between the receiver's 2xx for an alert event and the
/// cursor's record of it (the fault-injection hook): the restarted daemon
/// sends the same event again, same webhook-id and same body, and then
/// nothing more.
#[cfg(feature = "fault-injection")]
#[test]
fn a_crash_between_the_2xx_and_the_cursor_resends_the_same_alert_event() {
    let dir = tempfile::tempdir().unwrap();
    let maildir = dir.path().join("Maildir");
    generate_messages(&maildir, 3);
    let r = Receiver::start();
    let cfg = config(dir.path(), &maildir, None, &r.url(), "", "");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "path = ",
        "tracked_folders = [{ folder = \"INBOX/Gone\", regarding = \"account:x\" }]\npath = ",
    );
    std::fs::write(&cfg, text).unwrap();
    let port = admin_port(&cfg);
    let mut child = start_daemon(
        &cfg,
        Some(("CRM_MAILSYNC_FAULT_KILL_AFTER_ALERT_EVENT", "1".to_string())),
    );
    let status = wait_for(Duration::from_secs(30), "the hook's SIGKILL", || {
        child.try_wait().unwrap()
    });
    assert!(!status.success(), "{status:?}");
    let first = accepted_alerts(&r);
    assert_eq!(first.len(), 1, "accepted once before the crash: {first:?}");
    let child = start_daemon(&cfg, None);
    let got = wait_for(Duration::from_secs(30), "the alert event again", || {
        let a = accepted_alerts(&r);
        (a.len() >= 2).then_some(a)
    });
    // Then nothing more: the open alert counts up, no new entry.
    wait_for(Duration::from_secs(30), "the alert counted again", || {
        let alerts = try_json(port, "/api/v1/alerts?level=error&mailbox=support")?;
        alerts["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["kind"] == "disabled" && a["count"].as_u64() > Some(1))
            .then_some(())
    });
    stop(child);
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0].0, got[1].0, "the same webhook-id");
    assert_eq!(got[0].1, got[1].1, "the same body");
    assert_eq!(accepted_alerts(&r).len(), 2);
    let seen = r.hook.seen.lock().unwrap();
    let bodies: Vec<&Vec<u8>> = seen.alert_attempts.iter().map(|(_, b)| b).collect();
    assert!(bodies.iter().all(|b| *b == bodies[0]), "byte for byte");
    drop(seen);
    let store = SledStore::open(&dir.path().join("state").join("store")).unwrap();
    assert!(store.alert_events_after(0, 0).unwrap().is_empty());
    assert_eq!(store.named_cursor(alert_events::CURSOR).unwrap(), Some(1));
}
