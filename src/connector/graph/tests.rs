//! Connector and client tests against a small Graph look-alike of our own
//! (the full stand-in is test support of the integration tests).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::*;
use crate::connector::{Ack, AckKind, Connector, FetchBatch};
use crate::entra::{Credential, TokenSource};
use crate::error::Classify;
use crate::model::{AlertLevel, SourceKey};
use crate::pipeline::PipelineContext;
use crate::store::{SledStore, Store};

#[derive(Debug, Clone)]
struct Msg {
    id: String,
    folder: String,
    categories: Vec<String>,
}

#[derive(Debug, Default)]
struct Mock {
    base: String,
    /// (id, displayName, parent id)
    folders: Vec<(String, String, Option<String>)>,
    messages: Vec<Msg>,
    tokens_issued: u32,
    reject_first_token: bool,
    /// The token endpoint rejects the client secret.
    bad_secret: bool,
    always_401: bool,
    /// The next N requests answer 429 with `Retry-After: 0.5`.
    throttle: u32,
    value_delay: Duration,
    in_flight: u32,
    max_in_flight: u32,
    /// (method, path and query, Prefer)
    requests: Vec<(String, String, String)>,
    value_gets: Vec<String>,
    /// Listed, but `$value` answers 404.
    vanished: Vec<String>,
    /// Extended properties of `msgfolderroot`: id → value.
    root_props: std::collections::HashMap<String, String>,
    /// PATCHes of `msgfolderroot` answer 403 (an app with Mail.Read only).
    read_only: bool,
}

type Shared = Arc<Mutex<Mock>>;

fn err(status: StatusCode, code: &str) -> Response {
    (
        status,
        axum::Json(json!({"error": {"code": code, "message": "mock"}})),
    )
        .into_response()
}

fn mime(id: &str) -> String {
    format!("From: c@them.test\r\nTo: me@us.test\r\nSubject: {id}\r\nMessage-ID: <{id}@them.test>\r\nDate: Mon, 5 Jan 2026 10:00:00 +0000\r\n\r\nbody of {id}\r\n")
}

fn token_of(h: &HeaderMap) -> String {
    h.get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
        .to_string()
}

async fn handle(State(s): State<Shared>, req: axum::extract::Request) -> Response {
    let method = req.method().clone();
    let uri = req.uri().clone();
    let headers = req.headers().clone();
    let body = axum::body::to_bytes(req.into_body(), 1 << 20)
        .await
        .unwrap_or_default();
    let path = uri.path().to_string();
    let query = uri.query().unwrap_or("").to_string();
    if path == "/token" {
        let mut m = s.lock().unwrap();
        if m.bad_secret {
            return (
                StatusCode::UNAUTHORIZED,
                axum::Json(json!({"error": "invalid_client", "error_description": "AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID.\r\nTrace ID: 0"})),
            )
                .into_response();
        }
        m.tokens_issued += 1;
        let t = format!("tok-{}", m.tokens_issued);
        return axum::Json(json!({"token_type": "Bearer", "expires_in": 3599, "access_token": t}))
            .into_response();
    }
    let prefer = headers
        .get("prefer")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    {
        let mut m = s.lock().unwrap();
        m.requests.push((
            method.to_string(),
            format!("{path}?{query}"),
            prefer.clone(),
        ));
        let tok = token_of(&headers);
        if m.always_401 || (m.reject_first_token && tok == "tok-1") {
            return err(StatusCode::UNAUTHORIZED, "InvalidAuthenticationToken");
        }
        if !prefer.contains("IdType=\"ImmutableId\"") {
            return err(StatusCode::BAD_REQUEST, "MissingImmutableId");
        }
        if m.throttle > 0 {
            m.throttle -= 1;
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [("retry-after", "0.5")],
                axum::Json(
                    json!({"error": {"code": "ApplicationThrottled", "message": "slow down"}}),
                ),
            )
                .into_response();
        }
        m.in_flight += 1;
        m.max_in_flight = m.max_in_flight.max(m.in_flight);
    }
    let rest = path
        .strip_prefix("/v1.0/users/u@x/")
        .unwrap_or("")
        .to_string();
    let parts: Vec<&str> = rest.split('/').collect();
    if parts.last() == Some(&"$value") {
        let delay = s.lock().unwrap().value_delay;
        tokio::time::sleep(delay).await;
    }
    let mut m = s.lock().unwrap();
    m.in_flight -= 1;
    let q = |name: &str| {
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .map(String::from)
    };
    match (method.clone(), parts.as_slice()) {
        (Method::GET, ["mailFolders", "msgfolderroot"]) => {
            let mut v = json!({"id": "root-id"});
            // Only the expanded property, and only when the folder has it.
            if query.contains("singleValueExtendedProperties") {
                let props: Vec<Value> = m
                    .root_props
                    .iter()
                    .filter(|(id, _)| query.contains(&super::client::query_encode(id)))
                    .map(|(id, value)| json!({"id": id, "value": value}))
                    .collect();
                if !props.is_empty() {
                    v["singleValueExtendedProperties"] = json!(props);
                }
            }
            axum::Json(v).into_response()
        }
        (Method::PATCH, ["mailFolders", "msgfolderroot"]) => {
            if m.read_only {
                return err(StatusCode::FORBIDDEN, "ErrorAccessDenied");
            }
            let v: Value = serde_json::from_slice(&body).unwrap();
            for p in v["singleValueExtendedProperties"].as_array().unwrap() {
                m.root_props.insert(
                    p["id"].as_str().unwrap().to_string(),
                    p["value"].as_str().unwrap().to_string(),
                );
            }
            axum::Json(json!({"id": "root-id"})).into_response()
        }
        (Method::GET, ["mailFolders", "inbox"]) => {
            let n = m.messages.iter().filter(|x| x.folder == "inbox-id").count();
            axum::Json(json!({"id": "inbox-id", "displayName": "Inbox", "totalItemCount": n}))
                .into_response()
        }
        (Method::GET, ["mailFolders", fid]) => match m.folders.iter().find(|f| f.0 == *fid) {
            Some(f) => axum::Json(json!({"id": f.0, "displayName": f.1})).into_response(),
            None => err(StatusCode::NOT_FOUND, "ErrorItemNotFound"),
        },
        (Method::GET, ["mailFolders"]) | (Method::GET, ["mailFolders", _, "childFolders"]) => {
            let parent = parts.get(1).map(|p| p.to_string());
            let list: Vec<Value> = m
                .folders
                .iter()
                .filter(|f| f.2 == parent)
                .map(|f| json!({"id": f.0, "displayName": f.1}))
                .collect();
            axum::Json(json!({"value": list})).into_response()
        }
        (Method::POST, ["mailFolders"]) | (Method::POST, ["mailFolders", _, "childFolders"]) => {
            let parent = parts.get(1).map(|p| p.to_string());
            let v: Value = serde_json::from_slice(&body).unwrap();
            let name = v["displayName"].as_str().unwrap().to_string();
            let id = format!("folder-{name}");
            m.folders.push((id.clone(), name.clone(), parent));
            (
                StatusCode::CREATED,
                axum::Json(json!({"id": id, "displayName": name})),
            )
                .into_response()
        }
        (Method::GET, ["mailFolders", fid, "messages", "delta"]) => {
            if q("$deltatoken").as_deref() == Some("stale") {
                return err(StatusCode::GONE, "SyncStateNotFound");
            }
            let offset: usize = q("$skiptoken")
                .or_else(|| q("$deltatoken"))
                .and_then(|t| t.parse().ok())
                .unwrap_or(0);
            let size: usize = prefer
                .split(',')
                .find_map(|p| p.trim().strip_prefix("odata.maxpagesize="))
                .and_then(|n| n.parse().ok())
                .unwrap_or(10);
            let all: Vec<&Msg> = m.messages.iter().filter(|x| x.folder == *fid).collect();
            let end = (offset + size).min(all.len());
            let value: Vec<Value> = all[offset.min(end)..end]
                .iter()
                .map(|x| json!({"id": x.id, "receivedDateTime": "2026-01-05T10:00:00Z"}))
                .collect();
            let link = format!("{}/v1.0/users/u@x/mailFolders/{fid}/messages/delta", m.base);
            let mut page = json!({"value": value});
            if end < all.len() {
                page["@odata.nextLink"] = json!(format!("{link}?$skiptoken={end}"));
            } else {
                page["@odata.deltaLink"] = json!(format!("{link}?$deltatoken={end}"));
            }
            axum::Json(page).into_response()
        }
        (Method::GET, ["messages", id, "$value"]) => {
            let id = id.to_string();
            m.value_gets.push(id.clone());
            if m.messages.iter().any(|x| x.id == id) && !m.vanished.contains(&id) {
                mime(&id).into_response()
            } else {
                err(StatusCode::NOT_FOUND, "ErrorItemNotFound")
            }
        }
        (method, ["messages", id]) => {
            let Some(pos) = m.messages.iter().position(|x| x.id == *id) else {
                return err(StatusCode::NOT_FOUND, "ErrorItemNotFound");
            };
            match method {
                Method::GET => {
                    axum::Json(json!({"categories": m.messages[pos].categories})).into_response()
                }
                Method::PATCH => {
                    let v: Value = serde_json::from_slice(&body).unwrap();
                    m.messages[pos].categories = v["categories"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|c| c.as_str().unwrap().to_string())
                        .collect();
                    axum::Json(json!({"id": id})).into_response()
                }
                Method::DELETE => {
                    m.messages.remove(pos);
                    StatusCode::NO_CONTENT.into_response()
                }
                _ => err(StatusCode::METHOD_NOT_ALLOWED, "x"),
            }
        }
        (Method::POST, ["messages", id, "move"]) => {
            let v: Value = serde_json::from_slice(&body).unwrap();
            let dest = v["destinationId"].as_str().unwrap().to_string();
            if !m.folders.iter().any(|f| f.0 == dest) {
                return err(StatusCode::NOT_FOUND, "ErrorItemNotFound");
            }
            match m.messages.iter_mut().find(|x| x.id == *id) {
                Some(x) => {
                    x.folder = dest;
                    (StatusCode::CREATED, axum::Json(json!({"id": id}))).into_response()
                }
                None => err(StatusCode::NOT_FOUND, "ErrorItemNotFound"),
            }
        }
        (Method::POST, ["sendMail"]) => StatusCode::ACCEPTED.into_response(),
        _ => err(StatusCode::NOT_FOUND, "ResourceNotFound"),
    }
}

struct Env {
    mock: Shared,
    store: Arc<dyn Store>,
    ctx: PipelineContext,
    settings: GraphSettings,
    app: Arc<GraphApp>,
    _dir: tempfile::TempDir,
}

async fn env(inbox: usize, orders: usize) -> Env {
    let mock: Shared = Arc::new(Mutex::new(Mock::default()));
    {
        let mut m = mock.lock().unwrap();
        m.folders.push(("inbox-id".into(), "Inbox".into(), None));
        m.folders
            .push(("orders-id".into(), "Orders".into(), Some("inbox-id".into())));
        for i in 0..inbox {
            m.messages.push(Msg {
                id: format!("in{i:03}"),
                folder: "inbox-id".into(),
                categories: vec!["Blue".into()],
            });
        }
        for i in 0..orders {
            m.messages.push(Msg {
                id: format!("or{i:03}"),
                folder: "orders-id".into(),
                categories: Vec::new(),
            });
        }
    }
    let app = axum::Router::new()
        .fallback(handle)
        .with_state(mock.clone());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    let base = format!("http://{addr}");
    mock.lock().unwrap().base = base.clone();
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SledStore::open(&dir.path().join("s")).unwrap());
    let http =
        GraphApp::http_client(None, Duration::from_secs(5), Duration::from_secs(30)).unwrap();
    let token = TokenSource::new(
        http.clone(),
        format!("{base}/token"),
        "app".into(),
        Credential::Secret(crate::config::Secret::new("s3cret")),
        "https://graph.microsoft.com/.default".into(),
    );
    let settings = GraphSettings {
        mailbox: "m".into(),
        user: "u@x".into(),
        graph_url: format!("{base}/v1.0"),
        folders: vec!["Inbox".into(), "Inbox/Orders".into()],
        page_size: 4,
        batch_size: 3,
        max_message_size: 1 << 20,
        processed_category: Some("CRM".into()),
        delete_after_processing: false,
        move_failed_to: Some("Failed/Graph".into()),
        request_timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(5),
        process_email_from: None,
        max_in_flight: 4,
        client_secret_expires_at: None,
        request_limit: (10_000, Duration::from_secs(600)),
    };
    let ctx = PipelineContext {
        mailbox: "m".into(),
        own_addresses: vec!["me@us.test".into()],
        folder_rules: Vec::new(),
        settings: Default::default(),
        policy: crate::filter::FilterPolicy {
            own_addresses: vec!["me@us.test".into()],
            automatic: Default::default(),
            track: crate::config::TrackFilter::All,
        },
        max_message_size: 1 << 20,
        quarantine_dir: dir.path().join("q"),
        forward_mailbox: false,
        parties: crate::config::CrmSettings::default().parties,
    };
    Env {
        mock,
        store,
        ctx,
        settings,
        app: Arc::new(GraphApp::new(http, token, 0)),
        _dir: dir,
    }
}

impl Env {
    fn connector(&self) -> GraphConnector {
        let mb = GraphMailbox::new(self.app.clone(), &self.settings);
        GraphConnector::new(mb, self.settings.clone(), self.store.clone())
    }

    /// Commits a batch as the scheduler does: activities and positions together.
    fn commit(&self, batch: &FetchBatch) {
        let (mut c, _) =
            crate::pipeline::process(self.store.as_ref(), &self.ctx, &batch.messages, 0).unwrap();
        c.positions = batch
            .positions
            .iter()
            .map(|(f, p)| ("m".to_string(), f.clone(), p.clone()))
            .collect();
        self.store.commit(c).unwrap();
    }

    /// Fetch-and-commit until a batch says no more; the ids fetched.
    async fn sync(&self, c: &mut GraphConnector) -> (Vec<String>, Vec<FetchBatch>) {
        let mut ids = Vec::new();
        let mut batches = Vec::new();
        for _ in 0..100 {
            let b = c.fetch().await.unwrap();
            assert!(b.messages.len() <= self.settings.batch_size);
            ids.extend(b.messages.iter().map(|m| m.source.uid.clone()));
            self.commit(&b);
            let more = b.more;
            batches.push(b);
            if !more {
                return (ids, batches);
            }
        }
        panic!("no end");
    }

    fn link(&self, folder: &str) -> Option<String> {
        self.store.folder_positions("m").unwrap()[folder]
            .delta_link
            .clone()
    }
}

#[tokio::test]
async fn pages_to_the_delta_link_with_positions() {
    let e = env(10, 5).await;
    let mut c = e.connector();
    let first = c.fetch().await.unwrap();
    assert_eq!(first.messages.len(), 3);
    assert!(first.more);
    // The batch ended inside the first page: the page is asked again.
    let (folder, pos) = &first.positions[0];
    assert_eq!(folder, "Inbox");
    assert!(pos
        .delta_link
        .as_deref()
        .unwrap()
        .contains("/messages/delta?$select="));
    assert!(first.messages[0].received_at.is_some());
    assert!(String::from_utf8_lossy(&first.messages[0].raw).contains("Subject: in000"));
    e.commit(&first);
    let (mut ids, _) = e.sync(&mut c).await;
    ids.splice(0..0, first.messages.iter().map(|m| m.source.uid.clone()));
    let mut want: Vec<String> = (0..10).map(|i| format!("in{i:03}")).collect();
    want.extend((0..5).map(|i| format!("or{i:03}")));
    assert_eq!(ids, want, "each message once, in order");
    assert!(e.link("Inbox").unwrap().ends_with("$deltatoken=10"));
    assert!(e.link("Inbox/Orders").unwrap().ends_with("$deltatoken=5"));
    let paged = e
        .mock
        .lock()
        .unwrap()
        .requests
        .iter()
        .filter(|r| r.1.contains("/delta"))
        .all(|r| r.2.contains("odata.maxpagesize=4"));
    assert!(paged);

    // A new message after the round: the next cycle starts at the delta link.
    e.mock.lock().unwrap().messages.push(Msg {
        id: "in010".into(),
        folder: "inbox-id".into(),
        categories: Vec::new(),
    });
    c.wait_for_changes(Duration::ZERO, false, &Default::default())
        .await
        .unwrap();
    let (ids, _) = e.sync(&mut c).await;
    assert_eq!(ids, vec!["in010".to_string()]);
}

#[tokio::test]
async fn uncommitted_batch_is_fetched_again_and_seen_ids_are_not_downloaded() {
    let e = env(5, 0).await;
    let mut c = e.connector();
    let lost = c.fetch().await.unwrap();
    assert_eq!(lost.messages.len(), 3);
    // Not committed (a crash, a failed commit): the same messages again.
    let again = c.fetch().await.unwrap();
    let ids = |b: &FetchBatch| {
        b.messages
            .iter()
            .map(|m| m.source.uid.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&again), ids(&lost));
    e.commit(&again);
    // A fresh connector (restart) with a resync from scratch: every id is
    // known, nothing is downloaded twice.
    let (rest, _) = e.sync(&mut c).await;
    assert_eq!(rest, vec!["in003".to_string(), "in004".to_string()]);
    let downloads = e.mock.lock().unwrap().value_gets.len();
    let mut fresh = e.connector();
    let mut pos = e.store.folder_positions("m").unwrap()["Inbox"].clone();
    pos.delta_link = None;
    let mut cb = crate::store::CommitBatch::default();
    cb.positions.push(("m".into(), "Inbox".into(), pos));
    e.store.commit(cb).unwrap();
    let (ids2, _) = e.sync(&mut fresh).await;
    assert!(ids2.is_empty(), "{ids2:?}");
    assert_eq!(e.mock.lock().unwrap().value_gets.len(), downloads);
}

#[tokio::test]
async fn gone_delta_link_resyncs_with_one_notice() {
    let e = env(5, 0).await;
    let mut c = e.connector();
    e.sync(&mut c).await;
    let downloads = e.mock.lock().unwrap().value_gets.len();
    assert_eq!(downloads, 5);
    // The stored link is one Graph no longer knows.
    let mut pos = e.store.folder_positions("m").unwrap()["Inbox"].clone();
    let stale = pos
        .delta_link
        .clone()
        .unwrap()
        .replace("$deltatoken=5", "$deltatoken=stale");
    pos.delta_link = Some(stale);
    let mut cb = crate::store::CommitBatch::default();
    cb.positions.push(("m".into(), "Inbox".into(), pos));
    e.store.commit(cb).unwrap();
    let mut c = e.connector();
    let (ids, batches) = e.sync(&mut c).await;
    assert!(ids.is_empty());
    let notices: Vec<_> = batches.iter().flat_map(|b| b.notices.iter()).collect();
    assert_eq!(notices.len(), 1, "{notices:?}");
    assert_eq!(notices[0].level, AlertLevel::Information);
    assert!(
        notices[0].text.contains("SyncStateNotFound"),
        "{}",
        notices[0].text
    );
    assert!(e.link("Inbox").unwrap().ends_with("$deltatoken=5"));
    assert_eq!(e.mock.lock().unwrap().value_gets.len(), downloads);
}

#[tokio::test]
async fn never_more_than_four_in_flight() {
    let mut e = env(12, 0).await;
    e.settings.batch_size = 12;
    e.settings.page_size = 20;
    e.mock.lock().unwrap().value_delay = Duration::from_millis(100);
    let mut c = e.connector();
    let b = c.fetch().await.unwrap();
    assert_eq!(b.messages.len(), 12);
    let max = e.mock.lock().unwrap().max_in_flight;
    assert_eq!(max, 4, "downloads run in parallel, at most four");
}

#[tokio::test]
async fn fractional_retry_after_is_honoured() {
    let e = env(0, 0).await;
    let mb = GraphMailbox::new(e.app.clone(), &e.settings);
    mb.probe_inbox().await.unwrap();
    e.mock.lock().unwrap().throttle = 2;
    let t = Instant::now();
    assert_eq!(
        mb.probe_inbox().await.unwrap(),
        "Inbox readable: 0 messages"
    );
    let waited = t.elapsed();
    assert!(waited >= Duration::from_millis(1000), "{waited:?}");
    assert!(waited < Duration::from_millis(3000), "{waited:?}");
    // Throttled past the retries: transient, with Graph's Retry-After.
    e.mock.lock().unwrap().throttle = 10;
    let err = mb.probe_inbox().await.unwrap_err();
    assert_eq!(err.disposition(), crate::error::Disposition::Transient);
    assert_eq!(err.retry_after(), Some(Duration::from_millis(500)));
}

#[tokio::test]
async fn a_refused_token_is_renewed_once() {
    let e = env(0, 0).await;
    e.mock.lock().unwrap().reject_first_token = true;
    let mb = GraphMailbox::new(e.app.clone(), &e.settings);
    mb.probe_inbox().await.unwrap();
    assert_eq!(e.mock.lock().unwrap().tokens_issued, 2);
    e.mock.lock().unwrap().always_401 = true;
    let err = mb.probe_inbox().await.unwrap_err();
    assert!(err.is_auth_failure(), "{err}");
    assert_eq!(
        e.mock.lock().unwrap().tokens_issued,
        3,
        "renewed once, not more"
    );
    let ce = crate::connector::ConnectorError::from(err);
    assert!(ce.is_auth_failure());
    assert!(
        ce.to_string().contains("InvalidAuthenticationToken"),
        "{ce}"
    );
}

#[tokio::test]
async fn acks_categorize_move_and_tolerate_gone() {
    let e = env(2, 0).await;
    let mut c = e.connector();
    let key = |id: &str| SourceKey {
        mailbox: "m".into(),
        folder: "Inbox".into(),
        uidvalidity: 1,
        uid: id.into(),
    };
    let acks = vec![
        Ack {
            source: key("in000"),
            kind: AckKind::Recorded,
        },
        Ack {
            source: key("in001"),
            kind: AckKind::Failed,
        },
        Ack {
            source: key("nope"),
            kind: AckKind::Recorded,
        },
    ];
    for _ in 0..2 {
        let r = c.acknowledge(acks.clone()).await.unwrap();
        assert!(r.failed.is_empty(), "{r:?}");
    }
    {
        let m = e.mock.lock().unwrap();
        assert_eq!(
            m.messages[0].categories,
            vec!["Blue".to_string(), "CRM".to_string()]
        );
        assert_eq!(m.messages[1].folder, "folder-Graph");
        assert!(m
            .folders
            .iter()
            .any(|f| f.0 == "folder-Failed" && f.2.is_none()));
        assert!(m
            .folders
            .iter()
            .any(|f| f.0 == "folder-Graph" && f.2.as_deref() == Some("folder-Failed")));
        // Already categorized: the second round read and did not PATCH.
        assert_eq!(m.requests.iter().filter(|r| r.0 == "PATCH").count(), 1);
    }

    // Someone deletes the failed-mail folder: the move fails once, saying
    // so, and the folder is created again at the next attempt.
    e.mock
        .lock()
        .unwrap()
        .folders
        .retain(|f| f.0 != "folder-Graph");
    let failed = vec![Ack {
        source: key("in000"),
        kind: AckKind::Failed,
    }];
    let r = c.acknowledge(failed.clone()).await.unwrap();
    assert_eq!(r.failed.len(), 1, "{r:?}");
    assert!(
        r.failed[0].1.contains("failed-mail folder was deleted"),
        "{r:?}"
    );
    let r = c.acknowledge(failed).await.unwrap();
    assert!(r.failed.is_empty(), "{r:?}");
    assert_eq!(e.mock.lock().unwrap().messages[0].folder, "folder-Graph");
}

#[tokio::test]
async fn test_and_enable_and_send() {
    let e = env(3, 1).await;
    let mut c = e.connector();
    let text = c.test().await.unwrap();
    assert!(text.contains("Inbox readable: 3 messages"), "{text}");
    assert!(text.contains("Inbox/Orders"), "{text}");
    // The access token renews by itself: only the client secret's expiry
    // date (from the config) is one to warn about.
    assert!(c.mailbox.token_expires_at().is_some());
    assert_eq!(c.token_expires_at(), None);
    let mut with_expiry = e.settings.clone();
    with_expiry.client_secret_expires_at = Some(1_900_000_000);
    let dated = GraphConnector::new(c.mailbox.clone(), with_expiry, e.store.clone());
    assert_eq!(dated.token_expires_at(), Some(1_900_000_000));
    assert_eq!(dated.expiring_credential(), "the Entra app's client secret");
    let mb = GraphMailbox::new(e.app.clone(), &e.settings);
    mb.send_mime(b"Subject: x\r\n\r\ny").await.unwrap();
    let mut bad = e.settings.clone();
    bad.folders.push("Inbox/Nope".into());
    let mut c = GraphConnector::new(mb, bad, e.store.clone());
    let err = c.fetch().await.unwrap_err();
    assert_eq!(err.disposition(), crate::error::Disposition::Permanent);
    assert!(err.to_string().contains("Inbox/Nope"), "{err}");
}

#[tokio::test]
async fn a_rejected_secret_names_the_code_and_recovers_when_fixed() {
    let e = env(2, 0).await;
    e.mock.lock().unwrap().bad_secret = true;
    let mut c = e.connector();
    let err = c.fetch().await.unwrap_err();
    assert!(err.is_auth_failure(), "{err}");
    assert_eq!(err.disposition(), crate::error::Disposition::Permanent);
    let text = err.to_string();
    assert!(text.contains("AADSTS7000215"), "{text}");
    assert!(text.contains("Certificates & secrets"), "{text}");
    assert!(
        !text.contains("s3cret") && !text.contains("Trace ID"),
        "{text}"
    );
    // Fixed in the app registration: the next attempt works, same connector.
    e.mock.lock().unwrap().bad_secret = false;
    let b = c.fetch().await.unwrap();
    assert_eq!(b.messages.len(), 2);
}

#[tokio::test]
async fn oversized_and_vanished_messages() {
    let mut e = env(2, 0).await;
    e.settings.max_message_size = 20;
    let mut c = e.connector();
    let first = c.fetch().await.unwrap();
    assert_eq!(first.messages.len(), 2);
    for m in &first.messages {
        assert!(m.raw.is_empty());
        assert!(m.too_large.unwrap() > 20, "{m:?}");
    }
    e.commit(&first);
    e.mock.lock().unwrap().messages.push(Msg {
        id: "late".into(),
        folder: "inbox-id".into(),
        categories: Vec::new(),
    });
    // Deleted between the listing and its download: nothing to record.
    e.mock.lock().unwrap().vanished.push("late".into());
    c.wait_for_changes(Duration::ZERO, false, &Default::default())
        .await
        .unwrap();
    let b = c.fetch().await.unwrap();
    assert!(b.messages.is_empty(), "{:?}", b.messages);
    assert!(!b.more);
    assert!(e
        .mock
        .lock()
        .unwrap()
        .value_gets
        .contains(&"late".to_string()));
}

/// The marker's requests since `from` in the mock's log: (method, path).
fn marker_requests(e: &Env, from: usize) -> Vec<(String, String)> {
    e.mock.lock().unwrap().requests[from..]
        .iter()
        .filter(|(_, p, _)| p.contains("/mailFolders/msgfolderroot"))
        .map(|(m, p, _)| (m.clone(), p.clone()))
        .collect()
}

#[tokio::test]
async fn the_deployment_marker_is_an_extended_property_of_the_root_folder() {
    use crate::deployment::{claim, Claim, Claiming, Deployment};
    let e = env(1, 0).await;
    let mut c = e.connector();
    let me = Deployment {
        id: "deployment-a-0001".into(),
        host: "crm1".into(),
    };
    fn claiming(d: &Deployment) -> Claiming<'_> {
        Claiming {
            mailbox: "m",
            deployment: d,
            force: false,
            enabled: true,
        }
    }
    // Empty: read, written, read back (three requests).
    let from = e.mock.lock().unwrap().requests.len();
    assert_eq!(claim(&mut c, claiming(&me)).await.unwrap(), Claim::Claimed);
    let log = marker_requests(&e, from);
    let methods: Vec<&str> = log.iter().map(|(m, _)| m.as_str()).collect();
    assert_eq!(methods, ["GET", "PATCH", "GET"], "{log:?}");
    assert!(
        log[0]
            .1
            .contains("$select=id&$expand=singleValueExtendedProperties"),
        "{log:?}"
    );
    let stored = e.mock.lock().unwrap().root_props[marker::MARKER_PROPERTY].clone();
    assert_eq!(
        crate::deployment::Marker::from_json(&stored).map(|m| m.deployment),
        Some(me.id.clone())
    );
    // Ours: one GET, nothing written.
    let from = e.mock.lock().unwrap().requests.len();
    assert_eq!(claim(&mut c, claiming(&me)).await.unwrap(), Claim::Ours);
    let log = marker_requests(&e, from);
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(log[0].0, "GET");
    // Another deployment is refused, naming this one, and writes nothing.
    let other = Deployment {
        id: "deployment-b-0002".into(),
        host: "crm2".into(),
    };
    let refused = claim(&mut c, claiming(&other)).await.unwrap_err();
    assert_eq!(refused.disposition(), crate::error::Disposition::Permanent);
    assert!(
        refused.to_string().contains("deployment-a-0001"),
        "{refused}"
    );
    // An app that may read but not write: the mailbox is not stopped over
    // the marker, and the reason (shown in Test & Enable) names the
    // permission.
    e.mock.lock().unwrap().root_props.clear();
    e.mock.lock().unwrap().read_only = true;
    match claim(&mut c, claiming(&other)).await.unwrap() {
        Claim::Unsupported(text) => assert!(
            text.contains("deployment marker") && text.contains("Mail.ReadWrite"),
            "{text}"
        ),
        other => panic!("{other:?}"),
    }
}
