//! Admin HTTP API (axum): open health endpoints, bearer-protected `/api/v1`.
//!
//! Bound to loopback by default; the config refuses other addresses unless
//! `admin.allow_remote` says so.
//!
//! Submodules: [`records`] (the record directory), [`feed`] (the event pull
//! feed with long-poll), [`outbox`] (per-consumer outbox and dead letters),
//! [`outgoing`] (the queue of email to send).

mod feed;
mod outbox;
mod outgoing;
mod records;

pub use records::{validate_record, RecordInput};

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Secret};
use crate::model::{format_time, EmailActivity};
use crate::scheduler::{EnableError, Runtime};
use crate::store::{ActivityQuery, Store};

/// Shared state of the admin API.
#[derive(Clone)]
pub struct AdminState {
    pub config: Arc<Config>,
    pub store: Arc<dyn Store>,
    pub runtime: Arc<Runtime>,
    pub prometheus: Option<PrometheusHandle>,
    /// Cancelled when the daemon shuts down: a long-polling feed request
    /// answers at once instead of holding the graceful shutdown up.
    pub shutdown: CancellationToken,
    /// Wakes the senders when the API queues (or retries) an email; `None`
    /// where no sender runs in this process (the periodic scan finds it).
    pub send_wakeup: Option<crate::outgoing::SendWakeup>,
}

/// Builds the router.
pub fn router(state: AdminState) -> Router {
    let token = state.config.admin.token.clone();
    let outgoing_body_limit = outgoing::body_limit(&state.config);
    let api = Router::new()
        .route("/mailboxes", get(mailboxes))
        .route("/mailboxes/{name}", get(mailbox))
        .route("/mailboxes/{name}/enable", post(enable_mailbox))
        .route("/profiles", get(profiles))
        .route("/activities", get(activities))
        .route("/activities/{id}", get(activity))
        .route("/alerts", get(alerts))
        .route("/quarantine", get(quarantine))
        .route(
            "/records",
            get(records::list)
                .post(records::bulk_upsert)
                .layer(DefaultBodyLimit::max(records::BULK_BODY_LIMIT)),
        )
        .route(
            "/records/{kind}/{id}",
            get(records::get_one)
                .put(records::put_one)
                .delete(records::delete_one),
        )
        .route("/events", get(feed::events))
        .route("/events/{seq}", get(feed::event))
        .route("/outbox", get(outbox::overview))
        .route("/outbox/{consumer}/dead-letters", get(outbox::dead_letters))
        .route(
            "/outgoing",
            get(outgoing::list)
                .post(outgoing::queue_one)
                .layer(DefaultBodyLimit::max(outgoing_body_limit)),
        )
        .route("/outgoing/{id}", get(outgoing::get_one))
        .route("/outgoing/{id}/cancel", post(outgoing::cancel))
        .route("/outgoing/{id}/retry", post(outgoing::retry))
        .layer(middleware::from_fn(move |req: Request, next: Next| {
            let token = token.clone();
            async move { require_bearer(token, req, next).await }
        }));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .nest("/api/v1", api)
        .with_state(state)
}

/// Compares in constant time so the token cannot be guessed byte by byte.
fn token_matches(expected: &Secret, given: &str) -> bool {
    let a = expected.expose().as_bytes();
    let b = given.as_bytes();
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        diff |= usize::from(a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0xff));
    }
    diff == 0
}

async fn require_bearer(token: Option<Secret>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    match (token, given) {
        (Some(t), Some(g)) if token_matches(&t, g) => next.run(req).await,
        _ => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer realm=\"crm-mailsync\"")],
            Json(json!({"error": "missing or wrong bearer token"})),
        )
            .into_response(),
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<AdminState>) -> Response {
    let mut problems = Vec::new();
    if !s
        .runtime
        .scheduler_running
        .load(std::sync::atomic::Ordering::SeqCst)
    {
        problems.push("scheduler is not running".to_string());
    }
    if let Err(e) = s.store.count_activities(Some("\u{0}readiness-probe")) {
        problems.push(format!("store is not readable: {e}"));
    }
    for m in s.runtime.stuck(s.config.daemon.stuck_after) {
        problems.push(format!(
            "mailbox {m:?} has been syncing for more than {}",
            humantime::format_duration(s.config.daemon.stuck_after)
        ));
    }
    for (m, since, error) in s.runtime.stalled() {
        let error = error.map(|e| format!(": {e}")).unwrap_or_default();
        problems.push(format!(
            "mailbox {m:?} not synced since {}{error}",
            format_time(since)
        ));
    }
    problems.extend(s.runtime.outbox.problems(crate::model::now()));
    if problems.is_empty() {
        (StatusCode::OK, Json(json!({"status": "ready"}))).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not ready", "problems": problems})),
        )
            .into_response()
    }
}

async fn metrics_text(State(s): State<AdminState>) -> Response {
    match &s.prometheus {
        Some(h) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            h.render(),
        )
            .into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics recorder not installed\n",
        )
            .into_response(),
    }
}

fn store_error(e: impl std::fmt::Display) -> Response {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        Json(json!({"error": e.to_string()})),
    )
        .into_response()
}

/// An API error: a status and a JSON body `{"error": message, …}` with a
/// message a person understands.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: serde_json::Value,
}

impl ApiError {
    /// `{"error": message}` with this status.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            body: json!({"error": message.into()}),
        }
    }

    /// `{"error": message}` plus the fields of `extra` (an object).
    pub fn with(status: StatusCode, message: impl Into<String>, extra: serde_json::Value) -> Self {
        let mut e = ApiError::new(status, message);
        if let (Some(body), serde_json::Value::Object(more)) = (e.body.as_object_mut(), extra) {
            body.extend(more);
        }
        e
    }

    /// A 400.
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    /// A 500 for a store failure.
    pub fn store(e: impl std::fmt::Display) -> Self {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

/// Runs blocking store work off the async threads; a store failure (or a
/// panicked task) becomes a 500 with the store's message.
async fn blocking<T, F>(f: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, crate::store::StoreError> + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(ApiError::store(e)),
        Err(e) => Err(ApiError::store(format!("store task failed: {e}"))),
    }
}

/// Query parameters as name → value, rejecting names the endpoint does not
/// know (a typo such as `cursor=` for `after=` would otherwise be ignored
/// silently) with a 400 that lists the known ones.
fn query_params(
    query: Option<&str>,
    known: &[&str],
) -> Result<std::collections::HashMap<String, String>, ApiError> {
    let mut out = std::collections::HashMap::new();
    let Some(query) = query else {
        return Ok(out);
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = percent_decode(name).map_err(ApiError::bad_request)?;
        let value = percent_decode(value).map_err(ApiError::bad_request)?;
        if !known.contains(&name.as_str()) {
            return Err(ApiError::bad_request(format!(
                "unknown query parameter {name:?}; this endpoint takes {}",
                known.join(", ")
            )));
        }
        if out.insert(name.clone(), value).is_some() {
            return Err(ApiError::bad_request(format!(
                "query parameter {name:?} is given more than once"
            )));
        }
    }
    Ok(out)
}

/// `application/x-www-form-urlencoded` decoding of one query component.
fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("bad percent-encoding in query {s:?}"))?;
                out.push(hex);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| format!("query {s:?} is not UTF-8 once decoded"))
}

/// A `limit` query parameter: `default` when absent, else 1..=`max`.
fn limit_param(
    params: &std::collections::HashMap<String, String>,
    default: usize,
    max: usize,
) -> Result<usize, ApiError> {
    let Some(text) = params.get("limit") else {
        return Ok(default);
    };
    match text.parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(ApiError::bad_request(format!(
            "limit must be a whole number from 1 to {max}, not {text:?}"
        ))),
    }
}

async fn mailboxes(State(s): State<AdminState>) -> Response {
    Json(json!({"mailboxes": live_mailboxes(&s)})).into_response()
}

async fn mailbox(State(s): State<AdminState>, Path(name): Path<String>) -> Response {
    match live_mailboxes(&s).into_iter().find(|m| m.name == name) {
        Some(m) => Json(m).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": format!("no mailbox {name:?}")})),
        )
            .into_response(),
    }
}

/// The mailbox tasks' live view, with the outgoing Test & Enable result the
/// senders record in the store (the mailbox task does not know it).
fn live_mailboxes(s: &AdminState) -> Vec<crate::scheduler::LiveMailbox> {
    let mut list = s.runtime.snapshot();
    for m in &mut list {
        if let Ok(Some(stored)) = s.store.mailbox_state(&m.name) {
            m.state.outgoing_test = stored.outgoing_test;
        }
    }
    list
}

/// `POST /api/v1/mailboxes/{name}/enable`: re-runs Test & Enable on a
/// mailbox a permanent error disabled.
async fn enable_mailbox(State(s): State<AdminState>, Path(name): Path<String>) -> Response {
    match s.runtime.request_enable(&name) {
        Ok(()) => (
            StatusCode::ACCEPTED,
            Json(json!({"status": "enabling", "mailbox": name})),
        )
            .into_response(),
        Err(e) => {
            let status = match e {
                EnableError::Unknown(_) => StatusCode::NOT_FOUND,
                EnableError::DisabledByConfig(_) | EnableError::NotDisabled { .. } => {
                    StatusCode::CONFLICT
                }
            };
            (status, Json(json!({"error": e.to_string()}))).into_response()
        }
    }
}

async fn profiles(State(s): State<AdminState>) -> Response {
    let list: Vec<_> = s
        .config
        .profiles
        .iter()
        .map(|p| {
            json!({
                "name": p.name, "type": p.kind, "host": p.host, "port": p.port,
                "tls": p.tls, "poll_interval_secs": p.poll_interval.as_secs(),
                "max_concurrent_connections": p.max_concurrent_connections,
                "mailboxes": s.config.mailboxes.iter().filter(|m| m.profile == p.name).map(|m| m.name.clone()).collect::<Vec<_>>(),
            })
        })
        .collect();
    Json(json!({"profiles": list})).into_response()
}

/// `GET /api/v1/activities` parameters.
#[derive(Debug, Deserialize)]
pub struct ActivityParams {
    pub mailbox: Option<String>,
    pub limit: Option<usize>,
    pub before: Option<u64>,
}

/// An activity as the API shows it: times as RFC 3339, regarding as `kind:id`.
#[derive(Debug, Serialize)]
pub struct ActivityView<'a> {
    #[serde(flatten)]
    pub activity: &'a EmailActivity,
    pub received: String,
    pub sent: Option<String>,
    /// Every mailbox the email was delivered to (its own first).
    pub mailboxes: Vec<&'a str>,
}

impl<'a> From<&'a EmailActivity> for ActivityView<'a> {
    fn from(a: &'a EmailActivity) -> Self {
        ActivityView {
            activity: a,
            received: format_time(a.received_at),
            sent: a.sent_at.map(format_time),
            mailboxes: a.mailboxes(),
        }
    }
}

async fn activities(State(s): State<AdminState>, Query(p): Query<ActivityParams>) -> Response {
    let limit = p.limit.unwrap_or(100).clamp(1, 10_000);
    let q = ActivityQuery {
        mailbox: p.mailbox.clone(),
        before: p.before,
        limit,
    };
    let store = s.store.clone();
    let result = tokio::task::spawn_blocking(move || {
        let list = store.activities(&q)?;
        let total = store.count_activities(q.mailbox.as_deref())?;
        Ok::<_, crate::store::StoreError>((list, total))
    })
    .await;
    match result {
        Ok(Ok((list, total))) => {
            let views: Vec<ActivityView<'_>> = list.iter().map(ActivityView::from).collect();
            let next = if list.len() == limit {
                list.last().map(|a| a.id)
            } else {
                None
            };
            Json(json!({"total": total, "count": views.len(), "next_before": next, "activities": views})).into_response()
        }
        Ok(Err(e)) => store_error(e),
        Err(e) => store_error(e),
    }
}

async fn activity(State(s): State<AdminState>, Path(id): Path<u64>) -> Response {
    match s.store.activity(id) {
        Ok(Some(a)) => Json(ActivityView::from(&a)).into_response(),
        Ok(None) => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": format!("no activity {id}")})),
        )
            .into_response(),
        Err(e) => store_error(e),
    }
}

/// `limit` parameter for list endpoints.
#[derive(Debug, Deserialize)]
pub struct LimitParams {
    pub limit: Option<usize>,
}

async fn alerts(State(s): State<AdminState>, Query(p): Query<LimitParams>) -> Response {
    match s.store.alerts(p.limit.unwrap_or(100).clamp(1, 10_000)) {
        Ok(list) => Json(json!({"alerts": list})).into_response(),
        Err(e) => store_error(e),
    }
}

async fn quarantine(State(s): State<AdminState>, Query(p): Query<LimitParams>) -> Response {
    match s.store.quarantined(p.limit.unwrap_or(100).clamp(1, 10_000)) {
        Ok(list) => Json(json!({"quarantine": list})).into_response(),
        Err(e) => store_error(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_params_decode_and_reject_unknown_or_repeated_names() {
        let p = query_params(
            Some("email=a%40b.example&kind=contact+x"),
            &["email", "kind"],
        )
        .unwrap();
        assert_eq!(p["email"], "a@b.example");
        assert_eq!(p["kind"], "contact x");
        assert!(query_params(Some("cursor=1"), &["after"]).is_err());
        assert!(query_params(Some("after=1&after=2"), &["after"]).is_err());
        assert!(query_params(Some("after=%zz"), &["after"]).is_err());
        assert!(query_params(None, &["after"]).unwrap().is_empty());
    }

    #[test]
    fn limit_is_bounded() {
        let mut p = std::collections::HashMap::new();
        assert_eq!(limit_param(&p, 100, 1000).unwrap(), 100);
        p.insert("limit".to_string(), "1000".to_string());
        assert_eq!(limit_param(&p, 100, 1000).unwrap(), 1000);
        for bad in ["0", "1001", "-1", "ten", ""] {
            p.insert("limit".to_string(), bad.to_string());
            assert!(limit_param(&p, 100, 1000).is_err(), "{bad}");
        }
    }

    #[test]
    fn token_comparison() {
        let t = Secret::new("0123456789abcdef");
        assert!(token_matches(&t, "0123456789abcdef"));
        assert!(!token_matches(&t, "0123456789abcdeF"));
        assert!(!token_matches(&t, "0123456789abcde"));
        assert!(!token_matches(&t, ""));
    }
}
