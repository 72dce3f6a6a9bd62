//! Admin HTTP API (axum): open health endpoints, bearer-protected `/api/v1`.
//!
//! Bound to loopback by default; the config refuses other addresses unless
//! `admin.allow_remote` says so.
//!
//! Submodules: [`records`] (the record directory), [`feed`] (the event pull
//! feed with long-poll), [`outbox`] (per-consumer outbox and dead letters),
//! [`outgoing`] (the queue of email to send), [`doc`] (the OpenAPI
//! document of all of it, served at `/api/v1/openapi.json`), [`web`] (the
//! admin page at `/`).

mod activities;
mod alerts;
mod deployment;
mod doc;
mod feed;
mod jobs;
mod mailboxes;
mod outbox;
mod outgoing;
mod records;
mod reload;
mod web;

pub use activities::ActivityView;
pub use records::{validate_record, RecordInput};

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouterExt};
use utoipa_axum::routes;

use crate::config::{Config, Secret, SharedConfig};
use crate::model::format_time;
use crate::scheduler::Runtime;
use crate::store::Store;

/// Shared state of the admin API.
#[derive(Clone)]
pub struct AdminState {
    /// The configuration in force (a reload swaps it).
    pub config: SharedConfig,
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

/// Every route of the admin API, each with its OpenAPI operation: the one
/// route table the router and the document are both made from, so neither
/// can have a route the other lacks. Only `routes!` adds routes here.
///
/// `token` is the bearer token every `/api/v1` route requires (`None`: none
/// is accepted).
fn routes(outgoing_body_limit: usize, token: Option<Secret>) -> OpenApiRouter<AdminState> {
    let api = OpenApiRouter::new()
        .routes(routes!(mailboxes::list))
        .routes(routes!(mailboxes::get_one))
        .routes(routes!(mailboxes::enable))
        .routes(routes!(mailboxes::disable))
        .routes(routes!(mailboxes::approve))
        .routes(routes!(mailboxes::reject))
        .routes(routes!(jobs::test_mailbox))
        .routes(routes!(jobs::test_profile))
        .routes(routes!(jobs::get_job))
        .routes(routes!(mailboxes::profiles))
        .routes(routes!(activities::list))
        .routes(routes!(activities::get_one))
        .routes(routes!(alerts::list))
        .routes(routes!(alerts::acknowledge))
        .routes(routes!(alerts::quarantine))
        .routes(routes!(alerts::retry))
        .routes(
            routes!(records::list, records::bulk_upsert)
                .layer(DefaultBodyLimit::max(records::BULK_BODY_LIMIT)),
        )
        .routes(routes!(
            records::get_one,
            records::put_one,
            records::delete_one
        ))
        .routes(routes!(feed::events))
        .routes(routes!(feed::event))
        .routes(routes!(outbox::overview))
        .routes(routes!(outbox::dead_letters))
        .routes(
            routes!(outgoing::list, outgoing::queue_one)
                .layer(DefaultBodyLimit::max(outgoing_body_limit)),
        )
        .routes(routes!(outgoing::get_one))
        .routes(routes!(outgoing::cancel))
        .routes(routes!(outgoing::retry))
        .routes(routes!(reload::reload))
        .routes(routes!(deployment::get))
        .routes(routes!(doc::document));
    // The bearer check wraps exactly these routes, which the document marks
    // as needing the token.
    let api = doc::bearer_only(api).layer(middleware::from_fn(move |req: Request, next: Next| {
        let token = token.clone();
        async move { require_bearer(token, req, next).await }
    }));
    OpenApiRouter::with_openapi(doc::base())
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics_text))
        .routes(routes!(web::page))
        .routes(routes!(web::asset))
        .nest("/api/v1", api)
}

/// The OpenAPI 3.1 document of the admin API, as `GET /api/v1/openapi.json`
/// serves it.
pub fn openapi() -> Result<serde_json::Value, serde_json::Error> {
    doc::finish(&routes(0, None).into_openapi())
}

/// How a command-line tool reaches the admin API of the daemon running on
/// `cfg`: its base URL (a wildcard listen address is reached on loopback)
/// and the bearer token; why not (`[admin]` off, no token) otherwise.
pub fn client_endpoint(cfg: &Config) -> Result<(String, &Secret), &'static str> {
    if !cfg.admin.enabled {
        return Err("its admin API is off ([admin] enabled = false)");
    }
    let Some(token) = cfg.admin.token.as_ref() else {
        return Err("no [admin] token is configured");
    };
    let mut addr = cfg.admin.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    Ok((format!("http://{addr}"), token))
}

/// Builds the router.
pub fn router(state: AdminState) -> Router {
    // Fixed for the router's life: a reload that changes [admin] or
    // [outgoing] restarts the admin API (see `daemon::reload`).
    let config = state.config.current();
    let token = config.admin.token.clone();
    let (router, doc) = routes(outgoing::body_limit(&config), token).split_for_parts();
    router
        .layer(Extension(doc::Rendered::new(&doc)))
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

/// `GET /healthz`: the process is alive.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "health",
    operation_id = "healthz",
    responses((status = 200, description = "The process is alive", body = String, content_type = "text/plain", example = "ok\n"))
)]
async fn healthz() -> &'static str {
    "ok\n"
}

/// Whether the daemon is ready.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
enum ReadyStatus {
    #[serde(rename = "ready")]
    Ready,
    #[serde(rename = "not ready")]
    NotReady,
}

/// `/readyz`'s answer.
#[derive(Debug, Serialize, ToSchema)]
struct Readiness {
    status: ReadyStatus,
    /// What keeps the daemon from being ready (only when not ready).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    problems: Vec<String>,
}

/// `GET /readyz`: store readable, scheduler running, no mailbox stuck or
/// stalled, no CRM adapter stuck or paused.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    operation_id = "readyz",
    responses(
        (status = 200, description = "Ready", body = Readiness),
        (status = 503, description = "Not ready; `problems` names each reason", body = Readiness),
    )
)]
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
    let stuck_after = s.config.current().daemon.stuck_after;
    for m in s.runtime.stuck(stuck_after) {
        problems.push(format!(
            "mailbox {m:?} has been syncing for more than {}",
            humantime::format_duration(stuck_after)
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
    let (status, ready) = if problems.is_empty() {
        (StatusCode::OK, ReadyStatus::Ready)
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, ReadyStatus::NotReady)
    };
    (
        status,
        Json(Readiness {
            status: ready,
            problems,
        }),
    )
        .into_response()
}

/// `GET /metrics`: Prometheus text exposition.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "health",
    operation_id = "metrics",
    responses(
        (status = 200, description = "Prometheus metrics (text format 0.0.4)", body = String, content_type = "text/plain; version=0.0.4"),
        (status = 503, description = "No metrics recorder in this process", body = String, content_type = "text/plain"),
    )
)]
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

    const TOKEN: &str = "0123456789abcdef";

    fn state(dir: &std::path::Path) -> AdminState {
        let text = format!(
            r#"
            [daemon]
            state_dir = "{}"
            [admin]
            token = "{TOKEN}"
            [[profiles]]
            name = "local"
            type = "maildir"
            [[mailboxes]]
            name = "support"
            profile = "local"
            email = "support@example.test"
            path = "fixtures/demo-maildir"
            "#,
            dir.display()
        );
        let config = crate::config::from_toml_str(&text, Vec::new(), dir).unwrap();
        let store = crate::store::SledStore::open(&dir.join("store")).unwrap();
        AdminState {
            config: config.into(),
            store: Arc::new(store),
            runtime: Arc::new(crate::scheduler::Runtime::default()),
            prometheus: None,
            shutdown: CancellationToken::new(),
            send_wakeup: None,
        }
    }

    /// Serves `router` on a free loopback port; answers its base URL.
    async fn serve(router: Router) -> (String, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            axum::serve(listener, router).await.unwrap();
        });
        (format!("http://127.0.0.1:{port}"), server)
    }

    /// The paths the router serves, read from its `Debug` output (axum has
    /// no other way to list them): its path router's, not the fallback
    /// router's.
    fn served_paths(router: &Router) -> std::collections::BTreeSet<String> {
        let text = format!("{router:?}");
        let start = text.find("path_router:").unwrap();
        let end = text.find("fallback_router:").unwrap();
        let text = &text[start..end];
        let re = regex::Regex::new(r#"RouteId\(\d+\): "([^"]*)""#).unwrap();
        re.captures_iter(text)
            .map(|c| c[1].to_string())
            .filter(|p| !p.contains("__private__axum"))
            .collect()
    }

    const METHODS: [&str; 5] = ["get", "put", "post", "delete", "patch"];

    #[tokio::test]
    async fn every_route_the_router_serves_is_in_the_document_and_back() {
        let dir = tempfile::tempdir().unwrap();
        let router = router(state(dir.path()));
        let served = served_paths(&router);
        assert!(
            served.contains("/healthz") && served.contains("/api/v1/records/{kind}/{id}"),
            "could not read the routes from the router: {served:?}"
        );
        let doc = openapi().unwrap();
        let paths = doc["paths"].as_object().unwrap();
        let documented: std::collections::BTreeSet<String> = paths.keys().cloned().collect();
        assert_eq!(
            served, documented,
            "the router serves a path the document lacks, or the other way round"
        );

        // Method by method: axum answers 405 for a method a path does not
        // have (after the bearer check, so the token is sent).
        let (base, server) = serve(router).await;
        let client = reqwest::Client::new();
        let placeholder = regex::Regex::new(r"\{[^}]+\}").unwrap();
        for path in &served {
            let url = placeholder.replace_all(path, "x");
            for method in METHODS {
                let resp = client
                    .request(
                        method.to_uppercase().parse().unwrap(),
                        format!("{base}{url}"),
                    )
                    .bearer_auth(TOKEN)
                    .send()
                    .await
                    .unwrap();
                let is_served = resp.status() != reqwest::StatusCode::METHOD_NOT_ALLOWED;
                let is_documented = paths[path].get(method).is_some();
                assert_eq!(
                    is_served,
                    is_documented,
                    "{} {path}: served {is_served}, documented {is_documented} ({})",
                    method.to_uppercase(),
                    resp.status()
                );
            }
        }
        server.abort();
    }

    /// Every `$ref` in `v`.
    fn refs<'a>(v: &'a serde_json::Value, out: &mut Vec<&'a str>) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("$ref", serde_json::Value::String(r)) => out.push(r),
                        _ => refs(v, out),
                    }
                }
            }
            serde_json::Value::Array(list) => list.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }

    #[tokio::test]
    async fn the_served_document_is_openapi_3_1_with_bearer_on_every_api_route() {
        let dir = tempfile::tempdir().unwrap();
        let (base, server) = serve(router(state(dir.path()))).await;
        let url = format!("{base}/api/v1/openapi.json");
        let anonymous = reqwest::get(&url).await.unwrap();
        assert_eq!(
            anonymous.status().as_u16(),
            401,
            "the document needs the token"
        );
        let resp = reqwest::Client::new()
            .get(&url)
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        assert_eq!(resp.headers()["content-type"], "application/json");
        let doc: serde_json::Value = resp.json().await.unwrap();
        server.abort();

        let version = doc["openapi"].as_str().unwrap();
        assert!(version.starts_with("3.1."), "openapi {version}");
        assert!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string());

        let mut all = Vec::new();
        refs(&doc, &mut all);
        assert!(all.len() > 20, "{} refs", all.len());
        for r in all {
            let pointer = r
                .strip_prefix('#')
                .unwrap_or_else(|| panic!("{r} is not local"));
            assert!(doc.pointer(pointer).is_some(), "{r} does not resolve");
        }

        let schemas = doc["components"]["schemas"].as_object().unwrap();
        assert!(schemas.contains_key("UnixTime") && schemas.contains_key("ActivityId"));
        for name in schemas.keys() {
            assert!(
                name.chars().next().is_some_and(|c| c.is_ascii_uppercase()),
                "schema {name:?} is not named after an API type"
            );
        }
        let scheme = &doc["components"]["securitySchemes"][doc::BEARER];
        assert_eq!(scheme["type"], "http", "{scheme}");
        assert_eq!(scheme["scheme"], "bearer", "{scheme}");
        assert!(doc["components"]["schemas"]["ErrorBody"]["properties"]["error"].is_object());

        let mut operation_ids = std::collections::BTreeSet::new();
        let placeholder = regex::Regex::new(r"\{([^}]+)\}").unwrap();
        for (path, item) in doc["paths"].as_object().unwrap() {
            // The web page and its assets hold no data (src/admin/web.rs).
            let public =
                ["/healthz", "/readyz", "/metrics", "/", "/assets/{file}"].contains(&path.as_str());
            assert!(public || path.starts_with("/api/v1/"), "{path}");
            for (method, op) in item.as_object().unwrap() {
                let at = format!("{method} {path}");
                assert!(
                    operation_ids.insert(op["operationId"].as_str().unwrap().to_string()),
                    "{at}: operationId repeated"
                );
                let security = op.get("security");
                if public {
                    assert!(security.is_none(), "{at} is open today: {security:?}");
                } else {
                    assert_eq!(
                        security,
                        Some(&serde_json::json!([{doc::BEARER: []}])),
                        "{at}"
                    );
                    assert!(op["responses"].get("401").is_some(), "{at}: no 401");
                }
                let responses = op["responses"].as_object().unwrap();
                assert!(
                    responses.keys().any(|s| s.starts_with('2')),
                    "{at}: no success response"
                );
                // Every path placeholder is a documented path parameter.
                let params: Vec<&str> = op
                    .get("parameters")
                    .and_then(|p| p.as_array())
                    .map(|p| {
                        p.iter()
                            .filter(|p| p["in"] == "path")
                            .filter_map(|p| p["name"].as_str())
                            .collect()
                    })
                    .unwrap_or_default();
                for name in placeholder.captures_iter(path) {
                    assert!(
                        params.contains(&&name[1]),
                        "{at}: {{{}}} undocumented",
                        &name[1]
                    );
                }
            }
        }

        // Each component schema is valid JSON Schema 2020-12 (OpenAPI 3.1's
        // dialect), its refs resolved within the document.
        for name in doc["components"]["schemas"].as_object().unwrap().keys() {
            let mut root = doc.clone();
            root["$ref"] = serde_json::json!(format!("#/components/schemas/{name}"));
            jsonschema::draft202012::new(&root)
                .unwrap_or_else(|e| panic!("schema {name} is not valid JSON Schema: {e}"));
        }
    }

    /// Checks `body` against what the document says `method template`
    /// answers with `status`.
    fn conforms(
        doc: &serde_json::Value,
        method: &str,
        template: &str,
        status: u16,
        body: &serde_json::Value,
    ) {
        let at = format!("{method} {template} → {status}");
        let mut response = &doc["paths"][template][method]["responses"][status.to_string()];
        if let Some(r) = response["$ref"].as_str() {
            response = doc.pointer(&r[1..]).unwrap();
        }
        let schema = &response["content"]["application/json"]["schema"];
        assert!(
            schema.is_object(),
            "{at} is not documented as JSON: {response}"
        );
        let mut root = schema.clone();
        root["components"] = doc["components"].clone();
        let validator = jsonschema::draft202012::new(&root).unwrap();
        let errors: Vec<String> = validator
            .iter_errors(body)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        assert!(errors.is_empty(), "{at}: {errors:#?}\n{body:#}");
    }

    #[tokio::test]
    async fn what_the_api_answers_matches_the_documented_schemas() {
        use crate::model::{
            AlertLevel, AutomaticClass, MailboxState, Party, PartyRole, SendStatus, TestResult,
            TestStatus,
        };
        use crate::outgoing::control::test_support::queue_row;

        let dir = tempfile::tempdir().unwrap();
        let state = state(dir.path());
        let store = state.store.clone();
        let sent = queue_row(store.as_ref(), "support", SendStatus::Sent);
        let mut a = store.activity(sent).unwrap().unwrap();
        a.automatic = Some(AutomaticClass::AutoReply);
        a.parties = vec![
            Party {
                role: PartyRole::From,
                address: "support@example.test".into(),
                record: Some("queue:support".parse().unwrap()),
                note: None,
            },
            Party {
                role: PartyRole::To,
                address: "customer@example.com".into(),
                record: None,
                note: Some("no record has this address".into()),
            },
        ];
        a.also_seen_as = vec![a.source.clone()];
        store.update_activity(a, vec!["parties".into()], 2).unwrap();
        let pending = queue_row(store.as_ref(), "support", SendStatus::PendingSend);
        store
            .raise_alert(
                crate::model::NewAlert {
                    kind: "sync_failing",
                    level: AlertLevel::Error,
                    mailbox: Some("support"),
                    profile: None,
                    text: "login failed",
                },
                3,
            )
            .unwrap();
        {
            let mut map = state.runtime.mailboxes.write().unwrap();
            map.insert(
                "support".into(),
                crate::scheduler::LiveMailbox {
                    name: "support".into(),
                    profile: "local".into(),
                    email: "support@example.test".into(),
                    protocol: "maildir".into(),
                    started_at: 1,
                    task_id: 1,
                    phase: crate::scheduler::Phase::Waiting,
                    backlog: 2,
                    approval: crate::model::ApprovalStatus::Approved,
                    disabled_by_operator_at: Some(4),
                    state: MailboxState {
                        name: "support".into(),
                        enabled: true,
                        incoming_test: TestResult {
                            status: TestStatus::Success,
                            completed_on: Some(1),
                            detail: None,
                            held_by: None,
                        },
                        last_sync_error: Some("timed out".into()),
                        ..Default::default()
                    },
                    not_synced_since: Some(4),
                    restarts: 0,
                    not_processing_reason: None,
                    cycle_started: None,
                },
            );
        }
        let doc = openapi().unwrap();
        let (base, server) = serve(router(state)).await;
        let client = reqwest::Client::new();
        let call = |method: &str, path: &str, body: Option<serde_json::Value>| {
            let mut req = client
                .request(
                    method.to_uppercase().parse().unwrap(),
                    format!("{base}{path}"),
                )
                .bearer_auth(TOKEN);
            if let Some(b) = body {
                req = req.json(&b);
            }
            async move {
                let resp = req.send().await.unwrap();
                let status = resp.status().as_u16();
                let text = resp.text().await.unwrap();
                (
                    status,
                    serde_json::from_str::<serde_json::Value>(&text)
                        .unwrap_or(serde_json::Value::Null),
                )
            }
        };
        let cases: Vec<(&str, String, &str, Option<serde_json::Value>, u16)> = vec![
            ("get", "/readyz".into(), "/readyz", None, 503),
            (
                "get",
                "/api/v1/mailboxes".into(),
                "/api/v1/mailboxes",
                None,
                200,
            ),
            (
                "get",
                "/api/v1/mailboxes/support".into(),
                "/api/v1/mailboxes/{name}",
                None,
                200,
            ),
            (
                "get",
                "/api/v1/mailboxes/nobody".into(),
                "/api/v1/mailboxes/{name}",
                None,
                404,
            ),
            (
                "post",
                "/api/v1/mailboxes/support/enable".into(),
                "/api/v1/mailboxes/{name}/enable",
                None,
                409,
            ),
            (
                "get",
                "/api/v1/profiles".into(),
                "/api/v1/profiles",
                None,
                200,
            ),
            (
                "get",
                "/api/v1/activities?limit=1".into(),
                "/api/v1/activities",
                None,
                200,
            ),
            (
                "get",
                format!("/api/v1/activities/{sent}"),
                "/api/v1/activities/{id}",
                None,
                200,
            ),
            (
                "get",
                "/api/v1/activities/424242".into(),
                "/api/v1/activities/{id}",
                None,
                404,
            ),
            ("get", "/api/v1/alerts".into(), "/api/v1/alerts", None, 200),
            (
                "get",
                "/api/v1/quarantine".into(),
                "/api/v1/quarantine",
                None,
                200,
            ),
            (
                "put",
                "/api/v1/records/contact/c1".into(),
                "/api/v1/records/{kind}/{id}",
                Some(serde_json::json!({"name": "Ann", "emails": ["ann@example.com"]})),
                201,
            ),
            (
                "put",
                "/api/v1/records/user/u1".into(),
                "/api/v1/records/{kind}/{id}",
                Some(
                    serde_json::json!({"name": "Una", "emails": ["una@example.com"], "owner": "team-1", "user_number": 7}),
                ),
                201,
            ),
            (
                "put",
                "/api/v1/records/contact/c1".into(),
                "/api/v1/records/{kind}/{id}",
                Some(serde_json::json!({"name": "Ann", "emails": ["ann@example.com"]})),
                200,
            ),
            (
                "put",
                "/api/v1/records/contact/c2".into(),
                "/api/v1/records/{kind}/{id}",
                Some(serde_json::json!({"emails": ["not an address"]})),
                422,
            ),
            (
                "get",
                "/api/v1/records?limit=1".into(),
                "/api/v1/records",
                None,
                200,
            ),
            (
                "get",
                "/api/v1/records?email=ANN@example.com".into(),
                "/api/v1/records",
                None,
                200,
            ),
            (
                "get",
                "/api/v1/records?after=nonsense".into(),
                "/api/v1/records",
                None,
                400,
            ),
            (
                "get",
                "/api/v1/records/contact/c1".into(),
                "/api/v1/records/{kind}/{id}",
                None,
                200,
            ),
            (
                "post",
                "/api/v1/records".into(),
                "/api/v1/records",
                Some(
                    serde_json::json!([{"kind": "lead", "id": "l1"}, {"kind": "contact", "id": "c1", "deleted": true}]),
                ),
                200,
            ),
            (
                "post",
                "/api/v1/records".into(),
                "/api/v1/records",
                Some(serde_json::json!([{"kind": "Lead", "id": "l2"}])),
                422,
            ),
            (
                "delete",
                "/api/v1/records/contact/c1".into(),
                "/api/v1/records/{kind}/{id}",
                None,
                404,
            ),
            ("get", "/api/v1/events".into(), "/api/v1/events", None, 200),
            (
                "get",
                "/api/v1/events?after=424242".into(),
                "/api/v1/events",
                None,
                409,
            ),
            (
                "get",
                "/api/v1/events?cursor=1".into(),
                "/api/v1/events",
                None,
                400,
            ),
            (
                "get",
                "/api/v1/events/1".into(),
                "/api/v1/events/{seq}",
                None,
                200,
            ),
            (
                "get",
                "/api/v1/events/424242".into(),
                "/api/v1/events/{seq}",
                None,
                404,
            ),
            ("get", "/api/v1/outbox".into(), "/api/v1/outbox", None, 200),
            (
                "get",
                "/api/v1/outbox/webhook/dead-letters".into(),
                "/api/v1/outbox/{consumer}/dead-letters",
                None,
                404,
            ),
            (
                "get",
                "/api/v1/outgoing".into(),
                "/api/v1/outgoing",
                None,
                200,
            ),
            (
                "get",
                format!("/api/v1/outgoing/{sent}"),
                "/api/v1/outgoing/{id}",
                None,
                200,
            ),
            (
                "get",
                "/api/v1/outgoing/424242".into(),
                "/api/v1/outgoing/{id}",
                None,
                404,
            ),
            (
                "post",
                format!("/api/v1/outgoing/{pending}/cancel"),
                "/api/v1/outgoing/{id}/cancel",
                None,
                200,
            ),
            (
                "post",
                format!("/api/v1/outgoing/{pending}/cancel"),
                "/api/v1/outgoing/{id}/cancel",
                None,
                409,
            ),
            (
                "post",
                format!("/api/v1/outgoing/{sent}/retry"),
                "/api/v1/outgoing/{id}/retry",
                None,
                409,
            ),
            (
                "post",
                "/api/v1/outgoing".into(),
                "/api/v1/outgoing",
                Some(
                    serde_json::json!({"mailbox": "nobody", "to": ["a@b.example"], "subject": "s"}),
                ),
                404,
            ),
            (
                "post",
                "/api/v1/outgoing".into(),
                "/api/v1/outgoing",
                Some(serde_json::json!({"mailbox": "support"})),
                409,
            ),
        ];
        for (method, path, template, body, expected) in cases {
            let (status, answer) = call(method, &path, body).await;
            assert_eq!(status, expected, "{method} {path}: {answer}");
            if status != 204 {
                conforms(&doc, method, template, status, &answer);
            }
        }
        let (status, answer) = call("get", "/api/v1/outgoing", None).await;
        assert_eq!(status, 200);
        assert!(answer["items"][0].get("mime").is_none(), "{answer}");
        let anonymous = reqwest::get(format!("{base}/api/v1/alerts")).await.unwrap();
        assert_eq!(anonymous.status().as_u16(), 401);
        let body: serde_json::Value = anonymous.json().await.unwrap();
        conforms(&doc, "get", "/api/v1/alerts", 401, &body);
        server.abort();
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
