//! Unit tests of the sender over Microsoft Graph, against a small local
//! axum server answering the token endpoint, `sendMail`, Sent Items and
//! the Inbox probe the way Graph documents them.

use super::*;
use crate::connector::graph::{GraphApp, GraphMailbox, GraphSettings};
use crate::outgoing::queue::{self, tests as q};
use crate::outgoing::transport::GraphTransportSettings;
use crate::store::SledStore;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use std::collections::{HashMap, VecDeque};

/// What the fake Graph holds and how it misbehaves.
#[derive(Default)]
struct Fake {
    /// Decoded MIME of every accepted sendMail.
    sent: Vec<String>,
    /// Sent Items: (id, internetMessageId, visible from).
    items: Vec<(String, String, Instant)>,
    /// Delay before an accepted message shows up in Sent Items; `None`:
    /// never.
    appear_after: Option<Duration>,
    /// Answers given to sendMail before it accepts: (status, Retry-After, code).
    script: VecDeque<(u16, Option<&'static str>, &'static str)>,
}

type Shared = Arc<std::sync::Mutex<Fake>>;

async fn token() -> impl IntoResponse {
    axum::Json(
        serde_json::json!({"token_type": "Bearer", "expires_in": 3600, "access_token": "tok"}),
    )
}

async fn send_mail(State(f): State<Shared>, headers: HeaderMap, body: String) -> Response {
    assert_eq!(
        headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap(),
        "text/plain"
    );
    let mut f = f.lock().unwrap();
    if let Some((status, retry, code)) = f.script.pop_front() {
        let mut r = (
            StatusCode::from_u16(status).unwrap(),
            axum::Json(serde_json::json!({"error": {"code": code, "message": "scripted"}})),
        )
            .into_response();
        if let Some(ra) = retry {
            r.headers_mut().insert("retry-after", ra.parse().unwrap());
        }
        return r;
    }
    let mime = base64::engine::general_purpose::STANDARD
        .decode(body.trim())
        .unwrap();
    let mime = String::from_utf8(mime).unwrap();
    let mid = mime
        .lines()
        .find_map(|l| l.strip_prefix("Message-ID: "))
        .unwrap()
        .trim()
        .to_string();
    if let Some(after) = f.appear_after {
        let n = f.items.len();
        f.items
            .push((format!("AAMk-sent-{n}"), mid, Instant::now() + after));
    }
    f.sent.push(mime);
    StatusCode::ACCEPTED.into_response()
}

async fn sent_items(
    State(f): State<Shared>,
    Query(q): Query<HashMap<String, String>>,
) -> impl IntoResponse {
    let filter = q.get("$filter").cloned().unwrap_or_default();
    let wanted = filter
        .strip_prefix("internetMessageId eq '")
        .and_then(|s| s.strip_suffix('\''))
        .unwrap_or_default()
        .to_string();
    let f = f.lock().unwrap();
    let now = Instant::now();
    let value: Vec<_> = f
        .items
        .iter()
        .filter(|(_, m, at)| *m == wanted && *at <= now)
        .map(|(id, m, _)| serde_json::json!({"id": id, "internetMessageId": m}))
        .collect();
    axum::Json(serde_json::json!({ "value": value }))
}

async fn inbox() -> impl IntoResponse {
    axum::Json(serde_json::json!({"id": "inbox-id", "displayName": "Inbox", "totalItemCount": 3}))
}

async fn fake_graph(fake: Shared) -> String {
    let app = axum::Router::new()
        .route("/t/oauth2/v2.0/token", post(token))
        .route("/v1.0/users/{user}/sendMail", post(send_mail))
        .route(
            "/v1.0/users/{user}/mailFolders/sentitems/messages",
            get(sent_items),
        )
        .route("/v1.0/users/{user}/mailFolders/inbox", get(inbox))
        .with_state(fake);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

fn graph_sender(store: Arc<dyn Store>, base: &str, confirm_for: Duration) -> Arc<Sender> {
    let http = reqwest::Client::new();
    let token = crate::entra::TokenSource::new(
        http.clone(),
        format!("{base}/t/oauth2/v2.0/token"),
        "app".into(),
        crate::entra::Credential::Secret(crate::config::Secret::new("s")),
        "https://graph.microsoft.com/.default".into(),
    );
    let app = Arc::new(GraphApp::new(http, token, 0));
    let mailbox = GraphMailbox::new(
        app,
        &GraphSettings {
            mailbox: "support".into(),
            user: "support@example.test".into(),
            graph_url: format!("{base}/v1.0"),
            folders: vec!["Inbox".into()],
            page_size: 100,
            batch_size: 50,
            max_message_size: 1 << 20,
            processed_category: None,
            delete_after_processing: false,
            move_failed_to: None,
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            process_email_from: None,
            max_in_flight: 4,
            client_secret_expires_at: None,
            request_limit: (10_000, Duration::from_secs(600)),
        },
    );
    let mut graph = GraphTransportSettings::new(mailbox);
    graph.confirm_for = confirm_for;
    graph.confirm_every_max = Duration::from_secs(1);
    let settings = SenderSettings {
        mailbox: "support".into(),
        profile: "mail".into(),
        address: "support@example.test".into(),
        transport: TransportSettings::Graph(graph),
        rate_per_minute: 1000,
        backoff: Backoff {
            base: Duration::from_secs(1),
            max: Duration::from_secs(2),
            jitter: 0.0,
        },
        policy: OutgoingSettings::default(),
        test_message: true,
        configured_approval: None,
    };
    let alerts = Arc::new(Alerts::new(store.clone(), HashMap::new()));
    Arc::new(
        Sender::new(
            settings,
            store,
            alerts,
            Arc::new(tokio::sync::Notify::new()),
            CancellationToken::new(),
        )
        .unwrap(),
    )
}

struct Setup {
    _dir: tempfile::TempDir,
    store: Arc<dyn Store>,
    cfg: Config,
    fake: Shared,
    base: String,
}

async fn setup(appear_after: Option<Duration>) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SledStore::open(&dir.path().join("s")).unwrap());
    let cfg = q::config(dir.path());
    let fake: Shared = Arc::default();
    fake.lock().unwrap().appear_after = appear_after;
    let base = fake_graph(fake.clone()).await;
    Setup {
        _dir: dir,
        store,
        cfg,
        fake,
        base,
    }
}

/// Scans until the email leaves `sending`/`pending_send` (or `limit`).
async fn scan_until_done(s: &Arc<Sender>, store: &dyn Store, id: u64, limit: Duration) {
    let until = Instant::now() + limit;
    loop {
        s.clone().scan().await;
        let row = store.outgoing(id).unwrap().unwrap();
        if !row.status.is_queued() || Instant::now() > until {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn accepted_stays_sending_until_it_appears_in_sent_items_then_sent_with_its_id() {
    let t = setup(Some(Duration::from_millis(1500))).await;
    let id = queue::queue(t.store.as_ref(), &t.cfg, &q::request(), model::now())
        .unwrap()
        .id;
    let s = graph_sender(t.store.clone(), &t.base, Duration::from_secs(60));
    s.clone().scan().await;
    let row = t.store.outgoing(id).unwrap().unwrap();
    assert_eq!(row.status, SendStatus::Sending, "202 is not delivery");
    assert!(row.accepted_at.is_some());
    let a = t.store.activity(id).unwrap().unwrap();
    let reason = a.send.unwrap().reason.unwrap();
    assert!(
        reason.starts_with("accepted by Microsoft Graph"),
        "{reason}"
    );
    assert!(reason.contains(&row.message_id), "{reason}");
    scan_until_done(&s, t.store.as_ref(), id, Duration::from_secs(15)).await;
    let row = t.store.outgoing(id).unwrap().unwrap();
    assert_eq!(row.status, SendStatus::Sent, "{row:?}");
    assert_eq!(row.server_item_id.as_deref(), Some("AAMk-sent-0"));
    assert_eq!(row.sent_copy, SentCopy::Done);
    let fake = t.fake.lock().unwrap();
    assert_eq!(fake.sent.len(), 1, "sent once");
    assert!(fake.sent[0].contains(&format!("Message-ID: <{}>", row.message_id)));
    let a = t.store.activity(id).unwrap().unwrap();
    assert_eq!(a.send.unwrap().status, SendStatus::Sent);
}

#[tokio::test]
async fn accepted_but_never_in_sent_items_fails_after_the_limit_saying_what_to_check() {
    let t = setup(None).await;
    let id = queue::queue(t.store.as_ref(), &t.cfg, &q::request(), model::now())
        .unwrap()
        .id;
    let s = graph_sender(t.store.clone(), &t.base, Duration::from_secs(2));
    scan_until_done(&s, t.store.as_ref(), id, Duration::from_secs(15)).await;
    let row = t.store.outgoing(id).unwrap().unwrap();
    assert_eq!(row.status, SendStatus::Failed, "{row:?}");
    let reason = t
        .store
        .activity(id)
        .unwrap()
        .unwrap()
        .send
        .unwrap()
        .reason
        .unwrap();
    assert!(
        reason.starts_with("not confirmed") && reason.contains("message trace"),
        "{reason}"
    );
    assert_eq!(t.fake.lock().unwrap().sent.len(), 1, "never sent twice");
    let alerts = t.store.alerts(10).unwrap();
    assert!(
        alerts.iter().any(|a| a.text.contains("not confirmed")),
        "{alerts:?}"
    );
}

#[tokio::test]
async fn crash_in_sending_with_the_item_in_sent_items_is_sent_without_resending() {
    let t = setup(None).await;
    let id = queue::queue(t.store.as_ref(), &t.cfg, &q::request(), model::now())
        .unwrap()
        .id;
    let mut row = t.store.outgoing(id).unwrap().unwrap();
    row.status = SendStatus::Sending;
    row.attempts = 1;
    t.store.update_outgoing(&row, None, model::now()).unwrap();
    t.fake.lock().unwrap().items.push((
        "AAMk-filed".into(),
        format!("<{}>", row.message_id),
        Instant::now(),
    ));
    let s = graph_sender(t.store.clone(), &t.base, Duration::from_secs(60));
    s.clone().scan().await;
    let row = t.store.outgoing(id).unwrap().unwrap();
    assert_eq!(row.status, SendStatus::Sent, "{row:?}");
    assert_eq!(row.server_item_id.as_deref(), Some("AAMk-filed"));
    assert!(t.fake.lock().unwrap().sent.is_empty(), "not sent again");

    // Not there and never accepted: delivery unknown, never resent.
    let id2 = queue::queue(t.store.as_ref(), &t.cfg, &q::request(), model::now())
        .unwrap()
        .id;
    let mut row = t.store.outgoing(id2).unwrap().unwrap();
    row.status = SendStatus::Sending;
    row.attempts = 1;
    t.store.update_outgoing(&row, None, model::now()).unwrap();
    s.clone().scan().await;
    let row = t.store.outgoing(id2).unwrap().unwrap();
    assert_eq!(row.status, SendStatus::Failed);
    let reason = row.last_error.unwrap();
    assert!(
        reason.starts_with("delivery unknown") && reason.contains("sendMail"),
        "{reason}"
    );
    assert!(t.fake.lock().unwrap().sent.is_empty());
}

#[tokio::test]
async fn throttled_sendmail_is_retried_and_sent_once() {
    let t = setup(Some(Duration::ZERO)).await;
    // One 429 the client waits out itself, then four in a row: the sender
    // backs off and tries again.
    t.fake.lock().unwrap().script =
        VecDeque::from(vec![(429, Some("0.2"), "ApplicationThrottled")]);
    let id = queue::queue(t.store.as_ref(), &t.cfg, &q::request(), model::now())
        .unwrap()
        .id;
    let s = graph_sender(t.store.clone(), &t.base, Duration::from_secs(60));
    scan_until_done(&s, t.store.as_ref(), id, Duration::from_secs(15)).await;
    let row = t.store.outgoing(id).unwrap().unwrap();
    assert_eq!((row.status, row.attempts), (SendStatus::Sent, 1), "{row:?}");

    t.fake.lock().unwrap().script =
        std::iter::repeat_n((429, Some("0.1"), "TooManyRequests"), 4).collect();
    let id = queue::queue(t.store.as_ref(), &t.cfg, &q::request(), model::now())
        .unwrap()
        .id;
    s.clone().scan().await;
    let row = t.store.outgoing(id).unwrap().unwrap();
    assert_eq!(row.status, SendStatus::PendingSend, "{row:?}");
    assert!(
        row.last_error.as_deref().unwrap().contains("429"),
        "{row:?}"
    );
    scan_until_done(&s, t.store.as_ref(), id, Duration::from_secs(15)).await;
    let row = t.store.outgoing(id).unwrap().unwrap();
    assert_eq!((row.status, row.attempts), (SendStatus::Sent, 2), "{row:?}");
    assert_eq!(t.fake.lock().unwrap().sent.len(), 2, "each once");
}

#[tokio::test]
async fn refused_sendmail_fails_at_once_with_graphs_words_and_an_alert() {
    let t = setup(Some(Duration::ZERO)).await;
    t.fake.lock().unwrap().script =
        VecDeque::from(vec![(400, None, "ErrorMimeContentInvalidBase64String")]);
    let id = queue::queue(t.store.as_ref(), &t.cfg, &q::request(), model::now())
        .unwrap()
        .id;
    let s = graph_sender(t.store.clone(), &t.base, Duration::from_secs(60));
    s.clone().scan().await;
    let row = t.store.outgoing(id).unwrap().unwrap();
    assert_eq!((row.status, row.attempts), (SendStatus::Failed, 1));
    assert!(row
        .last_error
        .as_deref()
        .unwrap()
        .contains("ErrorMimeContentInvalidBase64String"));
    let alerts = t.store.alerts(10).unwrap();
    assert!(
        alerts.iter().any(|a| a.level == AlertLevel::Error
            && a.text.contains("ErrorMimeContentInvalidBase64String")),
        "{alerts:?}"
    );

    t.fake.lock().unwrap().script = VecDeque::from(vec![(403, None, "ErrorAccessDenied")]);
    let id = queue::queue(t.store.as_ref(), &t.cfg, &q::request(), model::now())
        .unwrap()
        .id;
    s.clone().scan().await;
    let row = t.store.outgoing(id).unwrap().unwrap();
    assert_eq!(row.status, SendStatus::Failed);
    assert!(
        row.last_error.as_deref().unwrap().contains("Mail.Send"),
        "{row:?}"
    );
}

#[tokio::test]
async fn test_and_enable_probes_the_inbox_and_mails_itself_once_a_day() {
    let t = setup(Some(Duration::ZERO)).await;
    let s = graph_sender(t.store.clone(), &t.base, Duration::from_secs(60));
    let detail = s.test_and_enable().await.unwrap();
    assert!(detail.contains("202 Accepted"), "{detail}");
    let again = s.test_and_enable().await.unwrap();
    assert!(
        again.contains("Inbox readable") && again.contains("not repeated"),
        "{again}"
    );
    let fake = t.fake.lock().unwrap();
    assert_eq!(fake.sent.len(), 1);
    assert!(fake.sent[0].contains("To: support@example.test"));
}
