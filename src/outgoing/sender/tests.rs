//! Unit tests of the sender over SMTP (stub server).

use super::*;
use crate::outgoing::queue::{self, tests as q};
use crate::outgoing::smtp::smtp_stub::{Script, SmtpStub, Stage};
use crate::store::SledStore;
use std::collections::HashMap;

fn sender(store: Arc<dyn Store>, port: u16, unknown: UnknownDelivery) -> Arc<Sender> {
    let wakeup = Arc::new(tokio::sync::Notify::new());
    Arc::new(sender_with(
        store,
        port,
        unknown,
        wakeup,
        CancellationToken::new(),
    ))
}

fn sender_with(
    store: Arc<dyn Store>,
    port: u16,
    unknown: UnknownDelivery,
    wakeup: SendWakeup,
    cancel: CancellationToken,
) -> Sender {
    sender_adjusted(store, port, unknown, wakeup, cancel, |_| {})
}

fn sender_adjusted(
    store: Arc<dyn Store>,
    port: u16,
    unknown: UnknownDelivery,
    wakeup: SendWakeup,
    cancel: CancellationToken,
    adjust: impl FnOnce(&mut SenderSettings),
) -> Sender {
    let endpoint = Endpoint {
        host: "127.0.0.1".into(),
        port,
        tls: crate::net::TlsMode::Plain,
        tls_server_name: None,
        ca_file: None,
        connect_timeout: Duration::from_secs(5),
        io_timeout: Duration::from_secs(5),
    };
    let mut settings = SenderSettings {
        mailbox: "support".into(),
        profile: "mail".into(),
        address: "support@example.test".into(),
        transport: TransportSettings::Smtp(SmtpTransportSettings {
            smtp: crate::config::SmtpSettings {
                host: "127.0.0.1".into(),
                port,
                tls: crate::net::TlsMode::Plain,
                sent_folder: None,
                sent_copy: SentCopyMode::None,
                unknown_delivery: unknown,
                retry_for: Duration::from_secs(3600),
                pool_size: 2,
            },
            endpoint,
            allow_insecure: true,
            imap_endpoint: None,
            credentials: Credentials::Password {
                user: "u".into(),
                pass: "p".into(),
            },
            token_provider: None,
        }),
        rate_per_minute: 1000,
        backoff: Backoff {
            base: Duration::from_secs(30),
            max: Duration::from_secs(60),
            jitter: 0.0,
        },
        policy: OutgoingSettings::default(),
        test_message: false,
        configured_approval: None,
    };
    adjust(&mut settings);
    let alerts = Arc::new(Alerts::new(store.clone(), HashMap::new()));
    Sender::new(settings, store, alerts, wakeup, cancel).unwrap()
}

/// Regression: a mailbox whose address was pending in the configuration
/// got no sender at all, so approving it at run time (POST
/// /api/v1/mailboxes/{name}/approve) never made it send without a restart.
/// Now its sender runs and holds everything, the start-up test message
/// included, until the approval arrives.
#[tokio::test]
async fn an_address_pending_in_the_configuration_sends_once_approved_at_run_time() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SledStore::open(&dir.path().join("s")).unwrap());
    let cfg = q::config(dir.path());
    let stub = SmtpStub::start(Script::default()).await;
    let wakeup: SendWakeup = Arc::new(tokio::sync::Notify::new());
    let cancel = CancellationToken::new();
    let run = tokio::spawn(
        sender_adjusted(
            store.clone(),
            stub.port,
            UnknownDelivery::Fail,
            wakeup.clone(),
            cancel.clone(),
            |s| {
                s.test_message = true;
                s.configured_approval = Some(crate::model::ApprovalStatus::Pending);
            },
        )
        .run(),
    );
    let id = queue::queue(store.as_ref(), &cfg, &q::request(), model::now())
        .unwrap()
        .id;
    let status = |store: &Arc<dyn Store>| store.outgoing(id).unwrap().unwrap().status;
    wakeup.notify_one();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(status(&store), SendStatus::PendingSend);
    assert!(
        stub.messages().is_empty(),
        "nothing, not even the test message"
    );

    let approved = crate::model::MailboxControl {
        approval: Some(crate::model::ApprovalStatus::Approved),
        ..Default::default()
    };
    store.put_mailbox_control("support", &approved).unwrap();
    wakeup.notify_one();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while status(&store) != SendStatus::Sent {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not sent once approved"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        wakeup.notify_one();
    }
    // The start-up test message, then the queued email.
    assert_eq!(
        stub.messages().len(),
        2,
        "test message and the email, once each"
    );
    cancel.cancel();
    run.await.unwrap();
}

#[tokio::test]
async fn an_operators_disable_or_reject_holds_queued_email_until_it_is_lifted() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SledStore::open(&dir.path().join("s")).unwrap());
    let cfg = q::config(dir.path());
    let stub = SmtpStub::start(Script::default()).await;
    let mut control = crate::model::MailboxControl {
        disabled_at: Some(1),
        ..Default::default()
    };
    store.put_mailbox_control("support", &control).unwrap();
    let wakeup: SendWakeup = Arc::new(tokio::sync::Notify::new());
    let cancel = CancellationToken::new();
    let run = tokio::spawn(
        sender_with(
            store.clone(),
            stub.port,
            UnknownDelivery::Fail,
            wakeup.clone(),
            cancel.clone(),
        )
        .run(),
    );
    let id = queue::queue(store.as_ref(), &cfg, &q::request(), model::now())
        .unwrap()
        .id;
    let status = |store: &Arc<dyn Store>| store.outgoing(id).unwrap().unwrap().status;
    for lifted in [
        // Disabled, then rejected: held both times.
        crate::model::MailboxControl {
            approval: Some(crate::model::ApprovalStatus::Rejected),
            ..Default::default()
        },
        crate::model::MailboxControl {
            approval: Some(crate::model::ApprovalStatus::Approved),
            ..Default::default()
        },
    ] {
        wakeup.notify_one();
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(
            status(&store),
            SendStatus::PendingSend,
            "held by {control:?}"
        );
        assert!(stub.messages().is_empty());
        control = lifted;
        store.put_mailbox_control("support", &control).unwrap();
    }
    wakeup.notify_one();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while status(&store) != SendStatus::Sent {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not sent once approved"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(stub.messages().len(), 1, "sent once");
    cancel.cancel();
    run.await.unwrap();
}

/// A queued email, then left in `sending` as a crash mid-transaction does.
fn interrupted(store: &dyn Store, cfg: &Config) -> u64 {
    let id = queue::queue(store, cfg, &q::request(), model::now())
        .unwrap()
        .id;
    let mut row = store.outgoing(id).unwrap().unwrap();
    row.status = SendStatus::Sending;
    row.attempts = 1;
    store.update_outgoing(&row, None, model::now()).unwrap();
    id
}

#[tokio::test]
async fn interrupted_send_without_proof_is_delivery_unknown_never_resent() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SledStore::open(&dir.path().join("s")).unwrap());
    let cfg = q::config(dir.path());
    let id = interrupted(store.as_ref(), &cfg);
    let stub = SmtpStub::start(Script::default()).await;
    sender(store.clone(), stub.port, UnknownDelivery::Fail)
        .scan()
        .await;
    let row = store.outgoing(id).unwrap().unwrap();
    assert_eq!(row.status, SendStatus::Failed);
    let reason = row.last_error.unwrap();
    assert!(reason.starts_with("delivery unknown"), "{reason}");
    assert!(
        reason.contains(&format!("/api/v1/outgoing/{id}/retry")),
        "{reason}"
    );
    assert!(stub.messages().is_empty(), "never a silent second send");
    let a = store.activity(id).unwrap().unwrap();
    assert_eq!(a.send.unwrap().status, SendStatus::Failed);
}

#[tokio::test]
async fn interrupted_send_is_sent_again_when_resend_is_configured() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SledStore::open(&dir.path().join("s")).unwrap());
    let cfg = q::config(dir.path());
    let id = interrupted(store.as_ref(), &cfg);
    let stub = SmtpStub::start(Script::default()).await;
    sender(store.clone(), stub.port, UnknownDelivery::Resend)
        .scan()
        .await;
    let row = store.outgoing(id).unwrap().unwrap();
    assert_eq!((row.status, row.attempts), (SendStatus::Sent, 2));
    assert_eq!(stub.messages().len(), 1);
    let sent = String::from_utf8_lossy(&stub.messages()[0]).to_string();
    assert!(
        sent.contains(&row.message_id),
        "the same bytes, the same Message-ID"
    );
}

#[tokio::test]
async fn deferred_email_waits_its_back_off_and_a_5xx_fails_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SledStore::open(&dir.path().join("s")).unwrap());
    let cfg = q::config(dir.path());
    let id = queue::queue(store.as_ref(), &cfg, &q::request(), model::now())
        .unwrap()
        .id;
    let busy = SmtpStub::start(Script::reply(Stage::Data, 451, "4.3.0 try later")).await;
    let s = sender(store.clone(), busy.port, UnknownDelivery::Fail);
    s.clone().scan().await;
    let row = store.outgoing(id).unwrap().unwrap();
    assert_eq!((row.status, row.attempts), (SendStatus::PendingSend, 1));
    assert!(
        row.last_error.as_deref().unwrap().contains("451"),
        "{row:?}"
    );
    assert!(row.next_attempt_at >= model::now() + 25, "back-off of 30 s");
    // Not due: a second scan leaves it alone.
    s.clone().scan().await;
    assert_eq!(store.outgoing(id).unwrap().unwrap().attempts, 1);
    let mut due = store.outgoing(id).unwrap().unwrap();
    due.next_attempt_at = 0;
    store.update_outgoing(&due, None, model::now()).unwrap();
    let reject = SmtpStub::start(Script::reply(Stage::Rcpt, 550, "5.1.1 no such user")).await;
    sender(store.clone(), reject.port, UnknownDelivery::Fail)
        .scan()
        .await;
    let row = store.outgoing(id).unwrap().unwrap();
    assert_eq!((row.status, row.attempts), (SendStatus::Failed, 2));
    let a = store.activity(id).unwrap().unwrap();
    let send = a.send.unwrap();
    assert!(send.reason.unwrap().contains("5.1.1 no such user"));
    assert_eq!((send.dynamics_statuscode, send.attempts), (8, 2));
    let alerts = store.alerts(10).unwrap();
    assert!(
        alerts.iter().any(|a| a.text.contains("no such user")),
        "{alerts:?}"
    );
}

#[test]
fn rate_limit_allows_the_configured_starts_per_sliding_minute() {
    let mut r = RateLimit::new(3);
    let t0 = Instant::now();
    for _ in 0..3 {
        assert_eq!(r.take(t0), Duration::ZERO);
    }
    let wait = r.take(t0 + Duration::from_secs(10));
    assert_eq!(wait, Duration::from_secs(50));
    assert_eq!(r.take(t0 + Duration::from_secs(60)), Duration::ZERO);
}
