//! A Standard Webhooks receiver for the webhook tests: checks every
//! signature (both rotated secrets), validates every activity event body
//! against `schema/event.schema.json`, checks alert envelopes, counts ids,
//! and can refuse (503, 410, 422) or go away and come back on its port.

#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;

use crate::common::free_port;

/// Two secrets, as during a rotation: every request carries both signatures.
pub const SECRETS: [&str; 2] = [
    "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    "whsec_dGVzdC1zZWNyZXQtcm90YXRlZC0wMDAwMDAwMDAw",
];

/// What the receiver does with a request.
pub const ACCEPT: u8 = 0;
/// 503 with `Retry-After: 1`.
pub const UNAVAILABLE: u8 = 1;
/// 410 Gone for every event.
pub const GONE: u8 = 2;

#[derive(Default)]
pub struct Seen {
    /// webhook-id → every body received under it (accepted ones).
    pub bodies: HashMap<String, Vec<Vec<u8>>>,
    /// (webhook-id, activity id, seq) in arrival order, accepted ones.
    pub arrivals: Vec<(String, u64, u64)>,
    /// Requests answered 503.
    pub refused: u64,
    /// What was wrong with a request (bad signature, schema violation…).
    pub problems: Vec<String>,
    /// `webhook.test` requests received (signature checked).
    pub tests: u64,
    /// `cursor` of every records GET (signature checked), in order.
    pub record_cursors: Vec<Option<String>>,
    /// `alert.raised` bodies (signature checked), in arrival order.
    pub alerts: Vec<serde_json::Value>,
    /// The webhook-id of each of `alerts`.
    pub alert_ids: Vec<String>,
    /// (webhook-id, body) of every `alert.raised` request, refused ones
    /// too, in arrival order.
    pub alert_attempts: Vec<(String, Vec<u8>)>,
}

pub struct Hook {
    pub keys: Vec<ring::hmac::Key>,
    pub schema: jsonschema::Validator,
    pub mode: AtomicU8,
    pub seen: Mutex<Seen>,
    /// Events (by seq) refused with 400 and a reason.
    pub refuse: Mutex<HashSet<u64>>,
    /// How many `alert.raised` requests to answer 503 before accepting.
    pub alert_failures: AtomicU8,
}

impl Hook {
    pub fn new() -> Arc<Self> {
        let keys = SECRETS
            .iter()
            .map(|s| {
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(s.strip_prefix("whsec_").unwrap())
                    .unwrap();
                ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &raw)
            })
            .collect();
        let schema: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(
                Path::new(env!("CARGO_MANIFEST_DIR")).join("schema/event.schema.json"),
            )
            .unwrap(),
        )
        .unwrap();
        Arc::new(Hook {
            keys,
            schema: jsonschema::validator_for(&schema).unwrap(),
            mode: AtomicU8::new(ACCEPT),
            seen: Mutex::new(Seen::default()),
            refuse: Mutex::new(HashSet::new()),
            alert_failures: AtomicU8::new(0),
        })
    }

    /// Checks a request as a Standard Webhooks receiver must; the problems
    /// found, if any.
    pub fn check(&self, headers: &HeaderMap, body: &[u8]) -> Result<(String, u64, u64), String> {
        let id = self.check_signature(headers, body)?;
        let v: serde_json::Value =
            serde_json::from_slice(body).map_err(|e| format!("{id}: body is not JSON: {e}"))?;
        if v["type"] == "webhook.test" {
            return Ok((id, 0, 0));
        }
        if v["type"] == "alert.raised" {
            let data = &v["data"];
            // `alert_<id>` for a raise, `alert_<id>_escalated_<seq>` for
            // an escalation of the same alert.
            let raise = format!("alert_{}", data["id"]);
            let own = id == raise
                || id
                    .strip_prefix(&format!("{raise}_escalated_"))
                    .is_some_and(|seq| seq.parse::<u64>().is_ok());
            if !own || data["level"] != "error" {
                return Err(format!("{id}: alert envelope and headers disagree: {v}"));
            }
            return Ok((id, 0, 0));
        }
        if let Err(e) = self.schema.validate(&v) {
            return Err(format!("{id}: schema: {e} at {}", e.instance_path()));
        }
        if v["data"]["id"] != id.as_str() || v["type"] != v["data"]["kind"] {
            return Err(format!("{id}: envelope and headers disagree"));
        }
        Ok((
            id,
            v["data"]["activity_id"].as_u64().unwrap_or(0),
            v["data"]["seq"].as_u64().unwrap_or(0),
        ))
    }

    /// Checks the Standard Webhooks headers; the webhook-id.
    pub fn check_signature(&self, headers: &HeaderMap, body: &[u8]) -> Result<String, String> {
        let h = |n: &str| {
            headers
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
                .ok_or(format!("no {n} header"))
        };
        let id = h("webhook-id")?;
        let ts = h("webhook-timestamp")?;
        let sigs = h("webhook-signature")?;
        let t: i64 = ts.parse().map_err(|_| format!("bad timestamp {ts}"))?;
        let now = chrono::Utc::now().timestamp();
        if (now - t).abs() > 300 {
            return Err(format!("timestamp {t} is {}s off", now - t));
        }
        let signed = [id.as_bytes(), b".", ts.as_bytes(), b".", body].concat();
        let given: Vec<&str> = sigs.split(' ').collect();
        for (i, k) in self.keys.iter().enumerate() {
            let ok = given.iter().any(|g| {
                g.strip_prefix("v1,")
                    .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
                    .is_some_and(|tag| ring::hmac::verify(k, &signed, &tag).is_ok())
            });
            if !ok {
                return Err(format!(
                    "{id}: no valid signature for secret {i} in {sigs:?}"
                ));
            }
        }
        Ok(id)
    }
}

pub async fn receive(State(hook): State<Arc<Hook>>, headers: HeaderMap, body: Bytes) -> Response {
    let checked =
        if headers.get("content-type").and_then(|v| v.to_str().ok()) == Some("application/json") {
            hook.check(&headers, &body)
        } else {
            Err("content-type is not application/json".into())
        };
    let mut seen = hook.seen.lock().unwrap();
    let (id, activity, seq) = match checked {
        Ok(x) => x,
        Err(p) => {
            seen.problems.push(p);
            return StatusCode::BAD_REQUEST.into_response();
        }
    };
    if id.starts_with("test_") {
        seen.tests += 1;
        return StatusCode::NO_CONTENT.into_response();
    }
    if id.starts_with("alert_") {
        seen.alert_attempts.push((id.clone(), body.to_vec()));
        let refuse = hook
            .alert_failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if refuse {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                [("retry-after", "1")],
                "busy",
            )
                .into_response();
        }
        seen.alerts.push(serde_json::from_slice(&body).unwrap());
        seen.alert_ids.push(id);
        return StatusCode::NO_CONTENT.into_response();
    }
    match hook.mode.load(Ordering::SeqCst) {
        UNAVAILABLE => {
            seen.refused += 1;
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                [("retry-after", "1")],
                "busy",
            )
                .into_response();
        }
        GONE => {
            seen.refused += 1;
            return (StatusCode::GONE, "this hook was deleted").into_response();
        }
        _ => {}
    }
    if hook.refuse.lock().unwrap().contains(&seq) {
        seen.refused += 1;
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("{{\"error\": \"event {id} rejected: subject is not allowed\"}}"),
        )
            .into_response();
    }
    seen.bodies
        .entry(id.clone())
        .or_default()
        .push(body.to_vec());
    seen.arrivals.push((id, activity, seq));
    StatusCode::NO_CONTENT.into_response()
}

/// `GET /records`: two pages of JSON lines, then nothing new.
pub async fn records(
    State(hook): State<Arc<Hook>>,
    headers: HeaderMap,
    axum::extract::Query(q): axum::extract::Query<HashMap<String, String>>,
) -> Response {
    let mut seen = hook.seen.lock().unwrap();
    if let Err(p) = hook.check_signature(&headers, b"") {
        seen.problems.push(p);
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let cursor = q.get("cursor").cloned();
    seen.record_cursors.push(cursor.clone());
    let (body, next, more) = match cursor.as_deref() {
        None => (
            "{\"kind\":\"contact\",\"id\":\"c1\",\"name\":\"Person 0\",\"emails\":[\"P0@customer.example\"]}\n\
             {\"kind\":\"contact\",\"id\":\"c2\",\"name\":\"Gone soon\",\"emails\":[\"gone@customer.example\"]}\n",
            "page-2",
            true,
        ),
        Some("page-2") => (
            "{\"kind\":\"account\",\"id\":\"a1\",\"name\":\"Customer\",\"emails\":[\"info@customer.example\"]}\n\
             {\"kind\":\"contact\",\"id\":\"c2\",\"deleted\":true}\n",
            "page-3",
            false,
        ),
        Some(other) => ("", other, false),
    };
    let mut h = HeaderMap::new();
    h.insert("x-next-cursor", next.parse().unwrap());
    if more {
        h.insert("x-more", "true".parse().unwrap());
    }
    (StatusCode::OK, h, body.to_string()).into_response()
}

/// The receiver's HTTP server, which can go away (connection refused) and
/// come back on the same port.
pub struct Receiver {
    pub hook: Arc<Hook>,
    pub port: u16,
    pub rt: tokio::runtime::Runtime,
    pub running: Option<(
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    )>,
}

impl Receiver {
    pub fn start() -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let mut r = Receiver {
            hook: Hook::new(),
            port: free_port(),
            rt,
            running: None,
        };
        r.up();
        r
    }

    pub fn up(&mut self) {
        assert!(self.running.is_none());
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let listener = std::net::TcpListener::bind(addr).unwrap();
        listener.set_nonblocking(true).unwrap();
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(receive))
            .route("/records", axum::routing::get(records))
            .with_state(self.hook.clone());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let handle = self.rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        });
        self.running = Some((tx, handle));
    }

    /// Stops listening: the daemon's connections are refused until `up`.
    pub fn down(&mut self) {
        let (tx, handle) = self.running.take().unwrap();
        let _ = tx.send(());
        let abort = handle.abort_handle();
        let finished = self
            .rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(3), handle).await });
        if finished.is_err() {
            abort.abort();
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    pub fn distinct(&self) -> usize {
        self.hook.seen.lock().unwrap().bodies.len()
    }
}
