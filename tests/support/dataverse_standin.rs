//! A local stand-in for Dataverse (Dynamics 365 Web API v9.2) and its
//! Microsoft Entra ID token endpoint, for tests only (never part of the
//! daemon). It follows the documented wire format
//! (`../shared/reference/dataverse-graph.md` and Microsoft's Web API pages):
//!
//! - `POST /{tenant}/oauth2/v2.0/token` (client credentials, form encoded):
//!   `{"token_type":"Bearer","expires_in":N,"access_token":"…"}`; a wrong
//!   secret is `401 {"error":"invalid_client","error_description":"AADSTS7000215: …"}`.
//! - `GET /api/data/v9.2/{set}` with `$select`, `$filter` (`eq ne gt ge lt
//!   le`, `and`, `or`, parentheses; anything else is a 400), `Prefer:
//!   odata.maxpagesize=N` (echoed in `Preference-Applied`), `@odata.nextLink`
//!   with a `$skiptoken` paging cookie; `GET {set}(<id>)`; `GET WhoAmI`.
//! - `POST /emails` (deep insert of `email_activity_parties`, `@odata.bind`
//!   validated) → `204` with `OData-EntityId`, or `201` and the row with
//!   `Prefer: return=representation`; `PATCH {set}(<id>)` (an upsert unless
//!   `If-Match: *`); `PUT emails(<id>)/email_activity_parties {"value":[…]}`.
//! - Errors `{"error":{"code":"0x…","message":"…"}}`; an expired or unknown
//!   token is `401` with `WWW-Authenticate: Bearer error="invalid_token"`.
//! - Switchable faults: 429 with `Retry-After` for the next N requests or
//!   every k-th, 503 for the next N, a delay on every request, and "lost
//!   responses" (the create is committed, the client gets a 502).
// Handlers answer errors as ready responses (axum style); boxing them
// would only add noise to test support.
#![allow(dead_code, clippy::result_large_err)]

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, post};
use axum::Router;
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{json, Map, Value};

#[path = "entra.rs"]
mod entra;
#[path = "query.rs"]
mod query;
use query::parse_query;

/// One stored activity party.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredParty {
    pub mask: i64,
    /// `(entity set, id)` of the bound record, if bound.
    pub party: Option<(String, String)>,
    pub addressused: Option<String>,
}

/// One stored email as the tests inspect it.
#[derive(Debug, Clone)]
pub struct StoredEmail {
    pub id: String,
    pub fields: Map<String, Value>,
    /// `(entity set, id)` of the regarding record.
    pub regarding: Option<(String, String)>,
    pub parties: Vec<StoredParty>,
}

/// Counters the tests assert on.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Web API requests (not the token endpoint).
    pub requests: u64,
    /// Answered 429.
    pub throttled: u64,
    /// Requests that came before an earlier 429's `Retry-After` had passed.
    pub early_retries: u64,
    pub unavailable: u64,
    /// Answered 401 (expired or unknown token).
    pub unauthorized: u64,
    pub tokens_issued: u64,
    /// Token requests refused (bad secret, unknown client…).
    pub token_refusals: u64,
    /// Emails created by POST.
    pub creates: u64,
    /// Creates committed whose answer was replaced by a 502.
    pub lost_responses: u64,
    /// Requests without `OData-Version: 4.0` / `OData-MaxVersion: 4.0` /
    /// `Accept: application/json`.
    pub missing_odata_headers: u64,
    /// Read-only columns sent in a create and ignored (e.g. `correlationmethod`).
    pub ignored_read_only: u64,
    /// Requests by (method, first path segment), e.g. ("GET", "contacts").
    pub by_route: BTreeMap<(String, String), u64>,
}

#[derive(Debug, Default)]
struct Faults {
    throttle_next: u32,
    throttle_every: Option<u64>,
    retry_after_secs: u64,
    throttled_until: Option<Instant>,
    unavailable_next: u32,
    delay: Duration,
    lose_next_creates: u32,
}

/// Table definition: logical name, key column, readable columns.
#[derive(Debug, Clone)]
struct TableDef {
    logical: &'static str,
    key: &'static str,
    columns: &'static [&'static str],
}

fn table_def(set: &str) -> Option<TableDef> {
    let d = |logical, key, columns| {
        Some(TableDef {
            logical,
            key,
            columns,
        })
    };
    match set {
        "contacts" => d(
            "contact",
            "contactid",
            &[
                "contactid",
                "fullname",
                "emailaddress1",
                "emailaddress2",
                "emailaddress3",
                "_ownerid_value",
                "donotemail",
                "modifiedon",
            ],
        ),
        "accounts" => d(
            "account",
            "accountid",
            &[
                "accountid",
                "name",
                "emailaddress1",
                "emailaddress2",
                "emailaddress3",
                "_ownerid_value",
                "donotemail",
                "modifiedon",
            ],
        ),
        "leads" => d(
            "lead",
            "leadid",
            &[
                "leadid",
                "fullname",
                "emailaddress1",
                "emailaddress2",
                "emailaddress3",
                "_ownerid_value",
                "donotemail",
                "modifiedon",
            ],
        ),
        "systemusers" => d(
            "systemuser",
            "systemuserid",
            &[
                "systemuserid",
                "fullname",
                "internalemailaddress",
                "isdisabled",
                "modifiedon",
            ],
        ),
        "queues" => d(
            "queue",
            "queueid",
            &[
                "queueid",
                "name",
                "emailaddress",
                "_ownerid_value",
                "modifiedon",
            ],
        ),
        "incidents" => d(
            "incident",
            "incidentid",
            &["incidentid", "title", "modifiedon"],
        ),
        "opportunities" => d(
            "opportunity",
            "opportunityid",
            &["opportunityid", "name", "modifiedon"],
        ),
        // Attachments of an email (`objectid` = the email): `body` is base64.
        "activitymimeattachments" => d(
            "activitymimeattachment",
            "activitymimeattachmentid",
            &[
                "activitymimeattachmentid",
                "filename",
                "mimetype",
                "body",
                "_objectid_value",
                "modifiedon",
            ],
        ),
        "emails" => d(
            "email",
            "activityid",
            &[
                "activityid",
                "subject",
                "description",
                "messageid",
                "directioncode",
                "actualstart",
                "actualend",
                "statecode",
                "statuscode",
                "trackingtoken",
                "correlationmethod",
                "senton",
                "modifiedon",
                "createdon",
                "_regardingobjectid_value",
            ],
        ),
        _ => None,
    }
}

/// Email columns valid for create/update (the email table's writable list,
/// as far as the stand-in stores them).
const EMAIL_WRITABLE: [&str; 9] = [
    "subject",
    "description",
    "messageid",
    "directioncode",
    "actualstart",
    "actualend",
    "statecode",
    "statuscode",
    "trackingtoken",
];
/// Email columns that exist but are not valid for create (ignored).
const EMAIL_READ_ONLY: [&str; 4] = [
    "correlationmethod",
    "senton",
    "conversationindex",
    "createdon",
];
/// Tables an email can be regarding (`regardingobjectid_<logical>_email`).
const REGARDING_TABLES: [(&str, &str); 5] = [
    ("account", "accounts"),
    ("contact", "contacts"),
    ("lead", "leads"),
    ("incident", "incidents"),
    ("opportunity", "opportunities"),
];
/// Tables an email's activity party can be bound to (`partyid_<logical>`).
const PARTY_TABLES: [(&str, &str); 5] = [
    ("systemuser", "systemusers"),
    ("contact", "contacts"),
    ("account", "accounts"),
    ("lead", "leads"),
    ("queue", "queues"),
];

#[derive(Debug, Default)]
struct Inner {
    clients: HashMap<String, String>,
    token_lifetime: Duration,
    /// Token → when it stops being accepted.
    tokens: HashMap<String, Instant>,
    token_counter: u64,
    tables: HashMap<String, BTreeMap<String, Map<String, Value>>>,
    regarding: HashMap<String, (String, String)>,
    parties: HashMap<String, Vec<StoredParty>>,
    faults: Faults,
    stats: Stats,
    id_counter: u64,
    app_user_id: String,
    org_id: String,
}

struct Shared {
    inner: Mutex<Inner>,
    base: String,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn api(&self) -> String {
        format!("{}/api/data/v9.2", self.base)
    }
}

/// The running stand-in (see the module docs); stops when dropped.
pub struct StandIn {
    /// `http://127.0.0.1:<port>`: the environment URL.
    pub url: String,
    /// The token endpoint.
    pub token_url: String,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Dataverse-style GUID from a counter (deterministic per run).
pub fn guid(prefix: u32, n: u64) -> String {
    format!(
        "{prefix:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        (n >> 48) & 0xffff,
        (n >> 36) & 0xfff,
        (n >> 24) & 0xfff,
        n & 0xffff_ffff_ffff
    )
}

fn now_text() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true)
}

impl StandIn {
    /// Starts on 127.0.0.1 with an ephemeral port; tokens live an hour,
    /// one application user exists in `systemusers` for `WhoAmI`.
    pub async fn start() -> StandIn {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let app_user_id = guid(0xa990, 1);
        let mut inner = Inner {
            token_lifetime: Duration::from_secs(3599),
            app_user_id: app_user_id.clone(),
            org_id: guid(0x0e90, 1),
            ..Default::default()
        };
        inner.faults.retry_after_secs = 1;
        let mut user = Map::new();
        user.insert("systemuserid".into(), json!(app_user_id));
        user.insert("fullname".into(), json!("# crm-mailsync"));
        user.insert(
            "internalemailaddress".into(),
            json!("crm-mailsync@standin.invalid"),
        );
        user.insert("isdisabled".into(), json!(false));
        user.insert("modifiedon".into(), json!("2026-01-01T00:00:00Z"));
        inner
            .tables
            .entry("systemusers".into())
            .or_default()
            .insert(app_user_id, user);
        let shared = Arc::new(Shared {
            inner: Mutex::new(inner),
            base: url.clone(),
        });
        let app = Router::new()
            .route("/{tenant}/oauth2/v2.0/token", post(token_endpoint))
            .route("/api/data/v9.2/{*rest}", any(api))
            .with_state(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        StandIn {
            token_url: format!("{url}/00000000-0000-0000-0000-0000000000aa/oauth2/v2.0/token"),
            url,
            shared,
            task,
        }
    }

    /// Registers an app (client id and secret) with the token endpoint.
    pub fn add_client(&self, id: &str, secret: &str) {
        self.shared.lock().clients.insert(id.into(), secret.into());
    }

    /// Lifetime of tokens issued from now on (`expires_in`).
    pub fn set_token_lifetime(&self, d: Duration) {
        self.shared.lock().token_lifetime = d;
    }

    /// Every token issued so far stops working now (as at expiry).
    pub fn expire_tokens(&self) {
        let now = Instant::now();
        for exp in self.shared.lock().tokens.values_mut() {
            *exp = now;
        }
    }

    /// The application user `WhoAmI` reports.
    pub fn app_user_id(&self) -> String {
        self.shared.lock().app_user_id.clone()
    }

    /// Inserts or replaces rows of a table (each with its key column;
    /// `modifiedon` defaults to now).
    pub fn seed(&self, set: &str, rows: Vec<Value>) {
        let def = table_def(set).expect("known entity set");
        let mut inner = self.shared.lock();
        let table = inner.tables.entry(set.into()).or_default();
        for row in rows {
            let Value::Object(mut m) = row else {
                panic!("row is not an object")
            };
            let id = m[def.key].as_str().unwrap().to_ascii_lowercase();
            m.insert(def.key.into(), json!(id));
            m.entry("modifiedon").or_insert_with(|| json!(now_text()));
            table.insert(id, m);
        }
    }

    /// Changes columns of one row as a user in Dynamics would
    /// (`modifiedon` set to now).
    pub fn modify(&self, set: &str, id: &str, changes: Value) {
        let mut inner = self.shared.lock();
        let row = inner
            .tables
            .get_mut(set)
            .and_then(|t| t.get_mut(id))
            .expect("row exists");
        for (k, v) in changes.as_object().unwrap() {
            row.insert(k.clone(), v.clone());
        }
        row.insert("modifiedon".into(), json!(now_text()));
    }

    /// Stores an email as a user in Dynamics would have made it (e.g. one
    /// left in Pending Send), with its regarding `(set, id)` and parties;
    /// returns its `activityid`.
    pub fn seed_email(
        &self,
        mut row: Value,
        regarding: Option<(&str, &str)>,
        parties: Vec<StoredParty>,
    ) -> String {
        let mut inner = self.shared.lock();
        inner.id_counter += 1;
        let id = guid(0xe0a1, inner.id_counter);
        row["activityid"] = json!(id);
        row["modifiedon"] = json!(now_text());
        if let Some((set, rid)) = regarding {
            row["_regardingobjectid_value"] = json!(rid);
            inner
                .regarding
                .insert(id.clone(), (set.to_string(), rid.to_string()));
        }
        inner.parties.insert(id.clone(), parties);
        let Value::Object(m) = row else {
            panic!("row is not an object")
        };
        inner
            .tables
            .entry("emails".into())
            .or_default()
            .insert(id.clone(), m);
        id
    }

    /// Attaches a file (base64 `body`) to email `email`, as a user in
    /// Dynamics would; returns the attachment's id.
    pub fn seed_attachment(
        &self,
        email: &str,
        filename: &str,
        mimetype: &str,
        base64: &str,
    ) -> String {
        let mut inner = self.shared.lock();
        inner.id_counter += 1;
        let id = guid(0xa77a, inner.id_counter);
        let row = json!({
            "activitymimeattachmentid": id,
            "filename": filename,
            "mimetype": mimetype,
            "body": base64,
            "_objectid_value": email,
            "modifiedon": now_text(),
        });
        let Value::Object(m) = row else {
            panic!("row is not an object")
        };
        inner
            .tables
            .entry("activitymimeattachments".into())
            .or_default()
            .insert(id.clone(), m);
        id
    }

    /// Deletes an email, as a user in Dynamics would.
    pub fn delete_email(&self, id: &str) {
        let mut inner = self.shared.lock();
        inner.tables.get_mut("emails").and_then(|t| t.remove(id));
        inner.regarding.remove(id);
        inner.parties.remove(id);
    }

    pub fn rows(&self, set: &str) -> Vec<Map<String, Value>> {
        self.shared
            .lock()
            .tables
            .get(set)
            .map(|t| t.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Every stored email with its regarding and parties.
    pub fn emails(&self) -> Vec<StoredEmail> {
        let inner = self.shared.lock();
        inner
            .tables
            .get("emails")
            .map(|t| {
                t.iter()
                    .map(|(id, fields)| StoredEmail {
                        id: id.clone(),
                        fields: fields.clone(),
                        regarding: inner.regarding.get(id).cloned(),
                        parties: inner.parties.get(id).cloned().unwrap_or_default(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn stats(&self) -> Stats {
        self.shared.lock().stats.clone()
    }

    /// The next `n` Web API requests get `429` with `Retry-After: secs`.
    pub fn throttle_next(&self, n: u32, secs: u64) {
        let mut inner = self.shared.lock();
        inner.faults.throttle_next = n;
        inner.faults.retry_after_secs = secs;
    }

    /// Every `k`-th Web API request gets `429` (`None`: off).
    pub fn throttle_every(&self, k: Option<u64>, secs: u64) {
        let mut inner = self.shared.lock();
        inner.faults.throttle_every = k;
        inner.faults.retry_after_secs = secs;
    }

    /// The next `n` Web API requests get `503`.
    pub fn unavailable_next(&self, n: u32) {
        self.shared.lock().faults.unavailable_next = n;
    }

    /// Every Web API request waits this long before it is answered.
    pub fn set_delay(&self, d: Duration) {
        self.shared.lock().faults.delay = d;
    }

    /// The next `n` email creates are committed but answered `502`.
    pub fn lose_next_creates(&self, n: u32) {
        self.shared.lock().faults.lose_next_creates = n;
    }
}

// ---------------------------------------------------------------------------
// Wire helpers

fn error_response(status: StatusCode, code: &str, message: &str) -> Response {
    let body = json!({"error": {"code": code, "message": message}}).to_string();
    let mut h = HeaderMap::new();
    h.insert(
        "content-type",
        HeaderValue::from_static("application/json; odata.metadata=minimal"),
    );
    h.insert("odata-version", HeaderValue::from_static("4.0"));
    (status, h, body).into_response()
}

fn json_response(status: StatusCode, value: Value, extra: &[(&'static str, String)]) -> Response {
    let mut h = HeaderMap::new();
    h.insert(
        "content-type",
        HeaderValue::from_static("application/json; odata.metadata=minimal"),
    );
    h.insert("odata-version", HeaderValue::from_static("4.0"));
    for (k, v) in extra {
        h.insert(*k, HeaderValue::from_str(v).unwrap());
    }
    (status, h, value.to_string()).into_response()
}

fn no_content(extra: &[(&'static str, String)]) -> Response {
    let mut h = HeaderMap::new();
    h.insert("odata-version", HeaderValue::from_static("4.0"));
    for (k, v) in extra {
        h.insert(*k, HeaderValue::from_str(v).unwrap());
    }
    (StatusCode::NO_CONTENT, h).into_response()
}

fn syntax_error(message: impl Into<String>) -> Response {
    error_response(StatusCode::BAD_REQUEST, "0x80060888", &message.into())
}

fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b',') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Token endpoint

async fn token_endpoint(State(s): State<Arc<Shared>>, body: Bytes) -> Response {
    let form: HashMap<String, String> = parse_query(Some(&String::from_utf8_lossy(&body)))
        .into_iter()
        .collect();
    let mut inner = s.lock();
    let aad = |inner: &mut Inner, status: StatusCode, error: &str, code: u32, text: String| {
        inner.stats.token_refusals += 1;
        json_response(status, entra::refusal_body(error, code, &text), &[])
    };
    if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return aad(
            &mut inner,
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            70003,
            "The app requested an unsupported grant type.".into(),
        );
    }
    let client_id = form.get("client_id").cloned().unwrap_or_default();
    let Some(expected) = inner.clients.get(&client_id).cloned() else {
        return aad(
            &mut inner,
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            700016,
            format!("Application with identifier '{client_id}' was not found in the directory."),
        );
    };
    if form.get("client_secret") != Some(&expected) {
        return aad(&mut inner, StatusCode::UNAUTHORIZED, "invalid_client", 7000215, format!("Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '{client_id}'."));
    }
    let scope = form.get("scope").cloned().unwrap_or_default();
    if scope != format!("{}/.default", s.base) {
        return aad(&mut inner, StatusCode::BAD_REQUEST, "invalid_scope", 1002012, format!("The provided value for scope {scope} is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier (application ID URI)."));
    }
    inner.token_counter += 1;
    let token = format!(
        "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.standin-{}.{}",
        inner.token_counter,
        fastrand_like(inner.token_counter)
    );
    let lifetime = inner.token_lifetime;
    inner
        .tokens
        .insert(token.clone(), Instant::now() + lifetime);
    inner.stats.tokens_issued += 1;
    json_response(
        StatusCode::OK,
        json!({"token_type": "Bearer", "expires_in": lifetime.as_secs(), "ext_expires_in": lifetime.as_secs(), "access_token": token}),
        &[],
    )
}

fn fastrand_like(n: u64) -> String {
    format!(
        "{:016x}",
        n.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xA5A5_5A5A_1234_5678
    )
}

// ---------------------------------------------------------------------------
// Web API

async fn api(
    State(s): State<Arc<Shared>>,
    method: Method,
    Path(rest): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    // Faults and bookkeeping first, as the service's front door would.
    let delay = {
        let mut inner = s.lock();
        inner.stats.requests += 1;
        let seg = rest.split(['(', '/']).next().unwrap_or("").to_string();
        *inner
            .stats
            .by_route
            .entry((method.to_string(), seg))
            .or_default() += 1;
        let h = |k: &str| {
            headers
                .get(k)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string()
        };
        if h("odata-version") != "4.0"
            || h("odata-maxversion") != "4.0"
            || !h("accept").contains("application/json")
        {
            inner.stats.missing_odata_headers += 1;
        }
        inner.faults.delay
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    {
        let mut inner = s.lock();
        let now = Instant::now();
        let n = inner.stats.requests;
        let secs = inner.faults.retry_after_secs;
        if let Some(until) = inner.faults.throttled_until {
            if now < until {
                inner.stats.early_retries += 1;
                inner.stats.throttled += 1;
                let left = (until - now).as_secs_f64().ceil().max(1.0) as u64;
                return throttled(left);
            }
        }
        let every = inner
            .faults
            .throttle_every
            .is_some_and(|k| k > 0 && n % k == 0);
        if inner.faults.throttle_next > 0 || every {
            if inner.faults.throttle_next > 0 {
                inner.faults.throttle_next -= 1;
            }
            inner.stats.throttled += 1;
            inner.faults.throttled_until = Some(now + Duration::from_secs(secs));
            return throttled(secs);
        }
        if inner.faults.unavailable_next > 0 {
            inner.faults.unavailable_next -= 1;
            inner.stats.unavailable += 1;
            return error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "0x80040216",
                "An unexpected error occurred. The service is temporarily unavailable.",
            );
        }
        // Authentication.
        let token = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        let valid = inner.tokens.get(token).is_some_and(|exp| now < *exp);
        if !valid {
            inner.stats.unauthorized += 1;
            let mut h = HeaderMap::new();
            let www = format!(
                "Bearer error=\"invalid_token\", error_description=\"The access token has expired or is not valid\", authorization_uri=\"{}/00000000-0000-0000-0000-0000000000aa/oauth2/authorize\", resource_id=\"{}\"",
                s.base, s.base
            );
            h.insert("www-authenticate", HeaderValue::from_str(&www).unwrap());
            return (StatusCode::UNAUTHORIZED, h).into_response();
        }
    }
    let q = parse_query(query.as_deref());
    let (set, key, tail) = match parse_path(&rest) {
        Ok(p) => p,
        Err(r) => return r,
    };
    match (
        method.clone(),
        set.as_str(),
        key.as_deref(),
        tail.as_deref(),
    ) {
        (Method::GET, "WhoAmI", None, None) => {
            let inner = s.lock();
            json_response(
                StatusCode::OK,
                json!({
                    "@odata.context": format!("{}/$metadata#Microsoft.Dynamics.CRM.WhoAmIResponse", s.api()),
                    "BusinessUnitId": guid(0xb0, 1),
                    "UserId": inner.app_user_id,
                    "OrganizationId": inner.org_id,
                }),
                &[],
            )
        }
        (Method::GET, _, None, None) => list(&s, &set, &q, &headers),
        (Method::GET, _, Some(id), None) => retrieve(&s, &set, id, &q),
        (Method::GET, "emails", Some(id), Some("email_activity_parties")) => {
            let inner = s.lock();
            if !inner
                .tables
                .get("emails")
                .is_some_and(|t| t.contains_key(id))
            {
                return not_found("email", id);
            }
            let value: Vec<Value> = inner
                .parties
                .get(id)
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(|p| {
                    json!({
                        "participationtypemask": p.mask,
                        "addressused": p.addressused,
                        "_partyid_value": p.party.map(|(_, id)| id),
                    })
                })
                .collect();
            json_response(StatusCode::OK, json!({"value": value}), &[])
        }
        (Method::POST, "emails", None, None) => create_email(&s, &body, &headers),
        (Method::PATCH, "emails", Some(id), None) => patch_email(&s, id, &body, &headers),
        (Method::PUT, "emails", Some(id), Some("email_activity_parties")) => {
            put_parties(&s, id, &body)
        }
        _ => error_response(
            StatusCode::NOT_IMPLEMENTED,
            "0x80060888",
            &format!("{method} {rest} is not supported by the Dataverse stand-in"),
        ),
    }
}

fn throttled(secs: u64) -> Response {
    let mut h = HeaderMap::new();
    h.insert(
        "retry-after",
        HeaderValue::from_str(&secs.to_string()).unwrap(),
    );
    h.insert("content-type", HeaderValue::from_static("application/json"));
    let body = json!({"error": {"code": "0x80072322", "message": "Number of requests exceeded the limit of 6000 over time window of 300 seconds."}});
    (StatusCode::TOO_MANY_REQUESTS, h, body.to_string()).into_response()
}

fn not_found(logical: &str, id: &str) -> Response {
    error_response(
        StatusCode::NOT_FOUND,
        "0x80040217",
        &format!("{logical} With Id = {id} Does Not Exist"),
    )
}

/// `set`, `set(id)`, `set(id)/nav`.
fn parse_path(rest: &str) -> Result<(String, Option<String>, Option<String>), Response> {
    let (head, tail) = match rest.split_once('/') {
        Some((h, t)) => (h, Some(t.to_string())),
        None => (rest, None),
    };
    let (set, key) = match head.split_once('(') {
        Some((set, k)) => {
            let Some(k) = k.strip_suffix(')') else {
                return Err(syntax_error(format!(
                    "Bad Request - Error in query syntax: {rest}"
                )));
            };
            (
                set.to_string(),
                Some(k.trim_matches('\'').to_ascii_lowercase()),
            )
        }
        None => (head.to_string(), None),
    };
    if set != "WhoAmI" && table_def(&set).is_none() {
        return Err(error_response(
            StatusCode::NOT_FOUND,
            "0x80060888",
            &format!("Resource not found for the segment '{set}'."),
        ));
    }
    Ok((set, key, tail))
}

fn selected(def: &TableDef, q: &[(String, String)]) -> Result<Option<Vec<String>>, Response> {
    let Some((_, sel)) = q.iter().find(|(k, _)| k == "$select") else {
        return Ok(None);
    };
    let cols: Vec<String> = sel.split(',').map(|c| c.trim().to_string()).collect();
    for c in &cols {
        if !def.columns.contains(&c.as_str()) {
            return Err(syntax_error(format!(
                "Could not find a property named '{c}' on type 'Microsoft.Dynamics.CRM.{}'.",
                def.logical
            )));
        }
    }
    Ok(Some(cols))
}

fn project(def: &TableDef, row: &Map<String, Value>, cols: &Option<Vec<String>>) -> Value {
    let mut out = Map::new();
    let version = row
        .get("modifiedon")
        .and_then(|v| v.as_str())
        .unwrap_or("")
        .len();
    out.insert(
        "@odata.etag".into(),
        json!(format!("W/\"{}\"", 1000 + version)),
    );
    match cols {
        Some(cols) => {
            for c in cols {
                out.insert(c.clone(), row.get(c).cloned().unwrap_or(Value::Null));
            }
        }
        None => {
            for c in def.columns {
                out.insert((*c).into(), row.get(*c).cloned().unwrap_or(Value::Null));
            }
        }
    }
    out.insert(
        def.key.into(),
        row.get(def.key).cloned().unwrap_or(Value::Null),
    );
    Value::Object(out)
}

fn list(s: &Shared, set: &str, q: &[(String, String)], headers: &HeaderMap) -> Response {
    let def = table_def(set).unwrap();
    for (k, _) in q {
        if k.starts_with('$')
            && !matches!(k.as_str(), "$select" | "$filter" | "$skiptoken" | "$expand")
        {
            return syntax_error(format!("The query parameter {k} is not supported"));
        }
        if k == "$skip" {
            return syntax_error("The query parameter $skip is not supported");
        }
    }
    let cols = match selected(&def, q) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let filter = match q.iter().find(|(k, _)| k == "$filter") {
        Some((_, f)) => match parse_filter(f, &def) {
            Ok(e) => Some(e),
            Err(m) => return syntax_error(m),
        },
        None => None,
    };
    let after = q.iter().find(|(k, _)| k == "$skiptoken").map(|(_, v)| {
        // `<cookie pagenumber="N" lastid="ID" />`
        let id = v
            .split("lastid=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or("");
        let page: u64 = v
            .split("pagenumber=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or(1);
        (id.to_string(), page)
    });
    let prefer = headers
        .get("prefer")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let max_page: Option<usize> = prefer
        .split(',')
        .find_map(|p| p.trim().strip_prefix("odata.maxpagesize="))
        .and_then(|n| n.trim().parse().ok());
    let page_size = max_page.unwrap_or(5000).clamp(1, 5000);

    let expand = match q.iter().find(|(k, _)| k == "$expand") {
        Some((_, e)) => match parse_expand(set, e) {
            Ok(cols) => Some(cols),
            Err(r) => return r,
        },
        None => None,
    };
    let annotate = prefer.contains("odata.include-annotations")
        && (prefer.contains("lookuplogicalname") || prefer.contains("\"*\""));

    let inner = s.lock();
    let empty = BTreeMap::new();
    let table = inner.tables.get(set).unwrap_or(&empty);
    let range: Box<dyn Iterator<Item = (&String, &Map<String, Value>)>> = match &after {
        Some((id, _)) => Box::new(table.range::<String, _>((
            std::ops::Bound::Excluded(id.clone()),
            std::ops::Bound::Unbounded,
        ))),
        None => Box::new(table.iter()),
    };
    let mut rows = Vec::new();
    let mut more = false;
    let mut last = String::new();
    for (id, row) in range {
        if let Some(f) = &filter {
            if !eval(f, row) {
                continue;
            }
        }
        if rows.len() == page_size {
            more = true;
            break;
        }
        let mut v = project(&def, row, &cols);
        if set == "emails" {
            email_extras(&inner, id, &mut v, expand.as_ref(), annotate);
        }
        rows.push(v);
        last = id.clone();
    }
    let select_text = cols.as_ref().map(|c| c.join(",")).unwrap_or_default();
    let mut body = json!({
        "@odata.context": format!("{}/$metadata#{set}({select_text})", s.api()),
        "value": rows,
    });
    if more {
        let page = after.map(|(_, p)| p).unwrap_or(1) + 1;
        let mut link = format!("{}/{set}?", s.api());
        for (k, v) in q.iter().filter(|(k, _)| k != "$skiptoken") {
            link.push_str(&format!("{k}={}&", encode(v)));
        }
        let cookie =
            format!("<cookie pagenumber=\"{page}\" lastid=\"{last}\" istracking=\"False\" />");
        link.push_str(&format!("$skiptoken={}", encode(&cookie)));
        body["@odata.nextLink"] = json!(link);
    }
    let mut extra = Vec::new();
    if let Some(n) = max_page {
        extra.push((
            "preference-applied",
            format!("odata.maxpagesize={}", n.min(5000)),
        ));
    }
    json_response(StatusCode::OK, body, &extra)
}

/// The columns of `$expand=email_activity_parties($select=…)`, the only
/// expansion the stand-in serves.
fn parse_expand(set: &str, e: &str) -> Result<Vec<String>, Response> {
    const PARTY_COLUMNS: [&str; 4] = [
        "activitypartyid",
        "participationtypemask",
        "addressused",
        "_partyid_value",
    ];
    let e = e.trim();
    let (nav, options) = match e.split_once('(') {
        Some((nav, rest)) => match rest.strip_suffix(')') {
            Some(o) => (nav, Some(o)),
            None => return Err(syntax_error(format!("Syntax error in $expand: {e}"))),
        },
        None => (e, None),
    };
    if set != "emails" || nav != "email_activity_parties" {
        return Err(syntax_error(format!(
            "Could not find a navigation property named '{nav}' on type 'Microsoft.Dynamics.CRM.{}'.",
            set.trim_end_matches('s')
        )));
    }
    let cols: Vec<String> = match options {
        None => PARTY_COLUMNS.iter().map(|c| c.to_string()).collect(),
        Some(o) => {
            let Some(sel) = o.strip_prefix("$select=") else {
                return Err(syntax_error(format!(
                    "The stand-in supports only $select inside $expand, not {o}"
                )));
            };
            sel.split(',').map(|c| c.trim().to_string()).collect()
        }
    };
    for c in &cols {
        if !PARTY_COLUMNS.contains(&c.as_str()) {
            return Err(syntax_error(format!(
                "Could not find a property named '{c}' on type 'Microsoft.Dynamics.CRM.activityparty'."
            )));
        }
    }
    Ok(cols)
}

/// The lookup annotation and the expanded parties of one email row.
fn email_extras(
    inner: &Inner,
    id: &str,
    v: &mut Value,
    expand: Option<&Vec<String>>,
    annotate: bool,
) {
    let logical_of = |set: &str| {
        REGARDING_TABLES
            .iter()
            .chain(PARTY_TABLES.iter())
            .find(|(_, s)| *s == set)
            .map(|(l, _)| l.to_string())
    };
    if annotate
        && v.get("_regardingobjectid_value")
            .is_some_and(|r| !r.is_null())
    {
        if let Some((set, _)) = inner.regarding.get(id) {
            v["_regardingobjectid_value@Microsoft.Dynamics.CRM.lookuplogicalname"] =
                json!(logical_of(set));
        }
    }
    let Some(cols) = expand else {
        return;
    };
    let parties: Vec<Value> = inner
        .parties
        .get(id)
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(n, p)| {
            let mut o = Map::new();
            for c in cols {
                let value = match c.as_str() {
                    "activitypartyid" => json!(guid(0xa9a7, n as u64)),
                    "participationtypemask" => json!(p.mask),
                    "addressused" => json!(p.addressused),
                    _ => json!(p.party.as_ref().map(|(_, id)| id)),
                };
                o.insert(c.clone(), value);
                if c == "_partyid_value" && annotate {
                    if let Some((set, _)) = &p.party {
                        o.insert(
                            "_partyid_value@Microsoft.Dynamics.CRM.lookuplogicalname".into(),
                            json!(logical_of(set)),
                        );
                    }
                }
            }
            Value::Object(o)
        })
        .collect();
    v["email_activity_parties"] = Value::Array(parties);
}

fn retrieve(s: &Shared, set: &str, id: &str, q: &[(String, String)]) -> Response {
    let def = table_def(set).unwrap();
    let cols = match selected(&def, q) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let inner = s.lock();
    match inner.tables.get(set).and_then(|t| t.get(id)) {
        Some(row) => {
            let mut v = project(&def, row, &cols);
            v["@odata.context"] = json!(format!("{}/$metadata#{set}/$entity", s.api()));
            json_response(StatusCode::OK, v, &[])
        }
        None => not_found(def.logical, id),
    }
}

// ---------------------------------------------------------------------------
// $filter

#[derive(Debug, Clone)]
enum Lit {
    Str(String),
    Num(f64),
    Bool(bool),
    Null,
    Time(DateTime<Utc>),
}

#[derive(Debug, Clone)]
enum Expr {
    Or(Box<Expr>, Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Cmp(String, String, Lit),
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Word(String),
    Str(String),
    Open,
    Close,
}

fn tokenize(s: &str) -> Result<Vec<Tok>, String> {
    let c: Vec<char> = s.chars().collect();
    let mut i = 0;
    let mut out = Vec::new();
    while i < c.len() {
        match c[i] {
            ' ' | '\t' => i += 1,
            '(' => {
                out.push(Tok::Open);
                i += 1;
            }
            ')' => {
                out.push(Tok::Close);
                i += 1;
            }
            '\'' => {
                let mut v = String::new();
                i += 1;
                loop {
                    if i >= c.len() {
                        return Err("unterminated string literal".into());
                    }
                    if c[i] == '\'' {
                        if i + 1 < c.len() && c[i + 1] == '\'' {
                            v.push('\'');
                            i += 2;
                            continue;
                        }
                        i += 1;
                        break;
                    }
                    v.push(c[i]);
                    i += 1;
                }
                out.push(Tok::Str(v));
            }
            _ => {
                let start = i;
                while i < c.len() && !matches!(c[i], ' ' | '\t' | '(' | ')' | '\'') {
                    i += 1;
                }
                out.push(Tok::Word(c[start..i].iter().collect()));
            }
        }
    }
    Ok(out)
}

fn parse_filter(s: &str, def: &TableDef) -> Result<Expr, String> {
    let toks = tokenize(s).map_err(|e| format!("Syntax error in $filter: {e}"))?;
    let mut pos = 0;
    let e = parse_or(&toks, &mut pos, def)?;
    if pos != toks.len() {
        return Err(format!("Syntax error at position {pos} in '{s}'."));
    }
    Ok(e)
}

fn parse_or(t: &[Tok], p: &mut usize, def: &TableDef) -> Result<Expr, String> {
    let mut left = parse_and(t, p, def)?;
    while t.get(*p) == Some(&Tok::Word("or".into())) {
        *p += 1;
        let right = parse_and(t, p, def)?;
        left = Expr::Or(Box::new(left), Box::new(right));
    }
    Ok(left)
}

fn parse_and(t: &[Tok], p: &mut usize, def: &TableDef) -> Result<Expr, String> {
    let mut left = parse_atom(t, p, def)?;
    while t.get(*p) == Some(&Tok::Word("and".into())) {
        *p += 1;
        let right = parse_atom(t, p, def)?;
        left = Expr::And(Box::new(left), Box::new(right));
    }
    Ok(left)
}

fn parse_atom(t: &[Tok], p: &mut usize, def: &TableDef) -> Result<Expr, String> {
    match t.get(*p) {
        Some(Tok::Open) => {
            *p += 1;
            let e = parse_or(t, p, def)?;
            if t.get(*p) != Some(&Tok::Close) {
                return Err("Syntax error: ')' expected in $filter.".into());
            }
            *p += 1;
            Ok(e)
        }
        Some(Tok::Word(col)) => {
            if t.get(*p + 1) == Some(&Tok::Open) {
                return Err(format!(
                    "The function '{col}' is not supported by the stand-in's $filter."
                ));
            }
            if col == "not" {
                return Err("'not' is not supported by the stand-in's $filter.".into());
            }
            if !def.columns.contains(&col.as_str()) {
                return Err(format!(
                    "Could not find a property named '{col}' on type 'Microsoft.Dynamics.CRM.{}'.",
                    def.logical
                ));
            }
            let op = match t.get(*p + 1) {
                Some(Tok::Word(op))
                    if matches!(op.as_str(), "eq" | "ne" | "gt" | "ge" | "lt" | "le") =>
                {
                    op.clone()
                }
                other => {
                    return Err(format!(
                    "Syntax error: comparison operator expected after '{col}', found {other:?}."
                ))
                }
            };
            let lit = match t.get(*p + 2) {
                Some(Tok::Str(s)) => Lit::Str(s.clone()),
                Some(Tok::Word(w)) => match w.as_str() {
                    "true" => Lit::Bool(true),
                    "false" => Lit::Bool(false),
                    "null" => Lit::Null,
                    w => {
                        if let Ok(n) = w.parse::<f64>() {
                            Lit::Num(n)
                        } else if let Ok(d) = DateTime::parse_from_rfc3339(w) {
                            Lit::Time(d.with_timezone(&Utc))
                        } else if w.len() == 36
                            && w.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
                        {
                            Lit::Str(w.to_ascii_lowercase())
                        } else {
                            return Err(format!("Syntax error: '{w}' is not a valid literal."));
                        }
                    }
                },
                other => return Err(format!("Syntax error: literal expected, found {other:?}.")),
            };
            *p += 3;
            Ok(Expr::Cmp(col.clone(), op, lit))
        }
        other => Err(format!("Syntax error: unexpected {other:?} in $filter.")),
    }
}

fn eval(e: &Expr, row: &Map<String, Value>) -> bool {
    match e {
        Expr::Or(a, b) => eval(a, row) || eval(b, row),
        Expr::And(a, b) => eval(a, row) && eval(b, row),
        Expr::Cmp(col, op, lit) => {
            let v = row.get(col).unwrap_or(&Value::Null);
            let ord = match (lit, v) {
                (Lit::Null, Value::Null) => Some(std::cmp::Ordering::Equal),
                (Lit::Null, _) | (_, Value::Null) => None,
                // String comparisons are case-insensitive (Dataverse's collation).
                (Lit::Str(s), Value::String(x)) => Some(x.to_lowercase().cmp(&s.to_lowercase())),
                (Lit::Num(n), Value::Number(x)) => x.as_f64().and_then(|x| x.partial_cmp(n)),
                (Lit::Bool(b), Value::Bool(x)) => Some(x.cmp(b)),
                (Lit::Time(t), Value::String(x)) => DateTime::parse_from_rfc3339(x)
                    .ok()
                    .map(|x| x.with_timezone(&Utc).cmp(t)),
                _ => None,
            };
            use std::cmp::Ordering::*;
            match (op.as_str(), ord) {
                ("eq", Some(Equal)) => true,
                ("ne", Some(o)) => o != Equal,
                ("ne", None) => !matches!(lit, Lit::Null) || !v.is_null(),
                ("gt", Some(Greater)) => true,
                ("ge", Some(Greater | Equal)) => true,
                ("lt", Some(Less)) => true,
                ("le", Some(Less | Equal)) => true,
                _ => false,
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Emails: create, update, parties

fn parse_json_object(body: &[u8]) -> Result<Map<String, Value>, Response> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(error_response(
            StatusCode::BAD_REQUEST,
            "0x80060891",
            "The request body is not a valid JSON object.",
        )),
    }
}

fn bind_target(value: &Value, prop: &str) -> Result<(String, String), Response> {
    let Some(v) = value.as_str() else {
        return Err(syntax_error(format!(
            "The value of '{prop}' must be an entity reference string."
        )));
    };
    let v = v.trim_start_matches('/');
    let v = v.rsplit("/api/data/v9.2/").next().unwrap_or(v);
    let (set, rest) = v.split_once('(').ok_or_else(|| {
        syntax_error(format!(
            "'{v}' in '{prop}' is not a valid entity reference."
        ))
    })?;
    let id = rest.strip_suffix(')').ok_or_else(|| {
        syntax_error(format!(
            "'{v}' in '{prop}' is not a valid entity reference."
        ))
    })?;
    Ok((set.to_string(), id.to_ascii_lowercase()))
}

/// Validates a bind to one of `allowed` through navigation property
/// `prefix<logical>suffix`; the record must exist.
fn check_bind(
    inner: &Inner,
    prop: &str,
    value: &Value,
    logical: &str,
    allowed: &[(&str, &str)],
) -> Result<(String, String), Response> {
    let Some((_, set)) = allowed.iter().find(|(l, _)| *l == logical) else {
        return Err(syntax_error(format!(
            "An undeclared property '{}' which only has property annotations in the payload but no property value was found in the payload. In OData, only declared navigation properties and declared named streams can be represented as properties without values.",
            prop.trim_end_matches("@odata.bind")
        )));
    };
    let (bset, id) = bind_target(value, prop)?;
    if bset != *set {
        return Err(error_response(
            StatusCode::BAD_REQUEST,
            "0x80060888",
            &format!("The entity set '{bset}' does not match the navigation property '{}' (expected '{set}').", prop.trim_end_matches("@odata.bind")),
        ));
    }
    if !inner.tables.get(&bset).is_some_and(|t| t.contains_key(&id)) {
        return Err(error_response(
            StatusCode::BAD_REQUEST,
            "0x80040217",
            &format!("{logical} With Id = {id} Does Not Exist"),
        ));
    }
    Ok((bset, id))
}

fn parse_parties(inner: &Inner, value: &Value) -> Result<Vec<StoredParty>, Response> {
    let Some(items) = value.as_array() else {
        return Err(syntax_error("email_activity_parties must be an array."));
    };
    let mut out = Vec::new();
    for item in items {
        let Some(o) = item.as_object() else {
            return Err(syntax_error("An activity party must be an object."));
        };
        let mut party = StoredParty {
            mask: 0,
            party: None,
            addressused: None,
        };
        for (k, v) in o {
            if k == "participationtypemask" {
                party.mask = v.as_i64().unwrap_or(0);
            } else if k == "addressused" {
                party.addressused = v.as_str().map(String::from);
            } else if let Some(logical) = k
                .strip_prefix("partyid_")
                .and_then(|r| r.strip_suffix("@odata.bind"))
            {
                party.party = Some(check_bind(inner, k, v, logical, &PARTY_TABLES)?);
            } else {
                return Err(syntax_error(format!(
                    "The property '{k}' does not exist on type 'Microsoft.Dynamics.CRM.activityparty'. Make sure to only use property names that are defined by the type."
                )));
            }
        }
        if !(1..=11).contains(&party.mask) {
            return Err(error_response(
                StatusCode::BAD_REQUEST,
                "0x80040203",
                &format!(
                    "Invalid participationtypemask {} on an activity party.",
                    party.mask
                ),
            ));
        }
        if party.party.is_none() && party.addressused.as_deref().is_none_or(str::is_empty) {
            return Err(error_response(
                StatusCode::BAD_REQUEST,
                "0x80040203",
                "An activity party needs a party (partyid) or an address (addressused).",
            ));
        }
        out.push(party);
    }
    Ok(out)
}

/// Applies the columns and binds of a create/update body to `row`.
#[allow(clippy::type_complexity)]
fn apply_email_body(
    inner: &mut Inner,
    body: Map<String, Value>,
    row: &mut Map<String, Value>,
) -> Result<(Option<(String, String)>, Option<Vec<StoredParty>>), Response> {
    let mut regarding = None;
    let mut parties = None;
    for (k, v) in body {
        if EMAIL_WRITABLE.contains(&k.as_str()) {
            if k == "messageid" && v.as_str().is_some_and(|m| m.chars().count() > 320) {
                return Err(error_response(StatusCode::BAD_REQUEST, "0x80044331", "A validation error occurred. The length of the 'messageid' attribute of the 'email' entity exceeded the maximum allowed length of '320'."));
            }
            row.insert(k, v);
        } else if EMAIL_READ_ONLY.contains(&k.as_str()) {
            inner.stats.ignored_read_only += 1;
        } else if k == "email_activity_parties" {
            parties = Some(parse_parties(inner, &v)?);
        } else if let Some(logical) = k
            .strip_prefix("regardingobjectid_")
            .and_then(|r| r.strip_suffix("_email@odata.bind"))
        {
            regarding = Some(check_bind(inner, &k, &v, logical, &REGARDING_TABLES)?);
        } else if k.ends_with("@odata.bind") {
            return Err(check_bind(inner, &k, &v, "", &[]).unwrap_err());
        } else {
            return Err(syntax_error(format!(
                "The property '{k}' does not exist on type 'Microsoft.Dynamics.CRM.email'. Make sure to only use property names that are defined by the type."
            )));
        }
    }
    let state = row.get("statecode").and_then(Value::as_i64).unwrap_or(0);
    let status = row.get("statuscode").and_then(Value::as_i64).unwrap_or(1);
    // The email table's StatusCode choices: Draft and Failed are Open,
    // Pending Send and Sending are Completed, like Sent and Received.
    let valid = match state {
        0 => matches!(status, 1 | 8),
        1 => matches!(status, 2 | 3 | 4 | 6 | 7),
        2 => status == 5,
        _ => false,
    };
    if !valid {
        return Err(error_response(
            StatusCode::BAD_REQUEST,
            "0x8004431a",
            &format!(
                "{status} is not a valid status code for state code EmailState.{state} on email."
            ),
        ));
    }
    Ok((regarding, parties))
}

fn create_email(s: &Shared, body: &[u8], headers: &HeaderMap) -> Response {
    let body = match parse_json_object(body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let mut inner = s.lock();
    let mut row = Map::new();
    let (regarding, parties) = match apply_email_body(&mut inner, body, &mut row) {
        Ok(x) => x,
        Err(r) => return r,
    };
    inner.id_counter += 1;
    let id = guid(0xe0a1, inner.id_counter);
    row.insert("activityid".into(), json!(id));
    row.insert("modifiedon".into(), json!(now_text()));
    row.insert("createdon".into(), json!(now_text()));
    if let Some((_, rid)) = &regarding {
        row.insert("_regardingobjectid_value".into(), json!(rid));
        inner
            .regarding
            .insert(id.clone(), regarding.clone().unwrap());
    }
    inner
        .parties
        .insert(id.clone(), parties.unwrap_or_default());
    inner
        .tables
        .entry("emails".into())
        .or_default()
        .insert(id.clone(), row.clone());
    inner.stats.creates += 1;
    if inner.faults.lose_next_creates > 0 {
        inner.faults.lose_next_creates -= 1;
        inner.stats.lost_responses += 1;
        return (StatusCode::BAD_GATEWAY, "upstream connection reset").into_response();
    }
    let entity_id = format!("{}/emails({id})", s.api());
    let prefer = headers
        .get("prefer")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if prefer.contains("return=representation") {
        let def = table_def("emails").unwrap();
        let mut v = project(&def, &row, &None);
        v["@odata.context"] = json!(format!("{}/$metadata#emails/$entity", s.api()));
        return json_response(
            StatusCode::CREATED,
            v,
            &[
                ("odata-entityid", entity_id),
                ("preference-applied", "return=representation".into()),
            ],
        );
    }
    no_content(&[("odata-entityid", entity_id)])
}

fn patch_email(s: &Shared, id: &str, body: &[u8], headers: &HeaderMap) -> Response {
    let body = match parse_json_object(body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let update_only = headers.get("if-match").and_then(|v| v.to_str().ok()) == Some("*");
    let mut inner = s.lock();
    let existing = inner.tables.get("emails").and_then(|t| t.get(id)).cloned();
    if existing.is_none() && update_only {
        return not_found("email", id);
    }
    let mut row = existing.clone().unwrap_or_default();
    let (regarding, parties) = match apply_email_body(&mut inner, body, &mut row) {
        Ok(x) => x,
        Err(r) => return r,
    };
    row.insert("activityid".into(), json!(id));
    row.insert("modifiedon".into(), json!(now_text()));
    if let Some(r) = regarding {
        row.insert("_regardingobjectid_value".into(), json!(r.1));
        inner.regarding.insert(id.to_string(), r);
    }
    if let Some(p) = parties {
        inner.parties.insert(id.to_string(), p);
    }
    inner
        .tables
        .entry("emails".into())
        .or_default()
        .insert(id.to_string(), row);
    no_content(&[("odata-entityid", format!("{}/emails({id})", s.api()))])
}

fn put_parties(s: &Shared, id: &str, body: &[u8]) -> Response {
    let body = match parse_json_object(body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let mut inner = s.lock();
    if !inner
        .tables
        .get("emails")
        .is_some_and(|t| t.contains_key(id))
    {
        return not_found("email", id);
    }
    let Some(value) = body.get("value") else {
        return syntax_error("The request body must be {\"value\": [...]} for a collection.");
    };
    let parties = match parse_parties(&inner, value) {
        Ok(p) => p,
        Err(r) => return r,
    };
    inner.parties.insert(id.to_string(), parties);
    if let Some(row) = inner.tables.get_mut("emails").and_then(|t| t.get_mut(id)) {
        row.insert("modifiedon".into(), json!(now_text()));
    }
    no_content(&[])
}

// ---------------------------------------------------------------------------
// The stand-in's own tests: it answers in the documented format.

#[cfg(test)]
mod standin_tests {
    use super::*;

    async fn token(si: &StandIn) -> String {
        si.add_client("app", "s3cret");
        let resp = reqwest::Client::new()
            .post(&si.token_url)
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", "app"),
                ("client_secret", "s3cret"),
                ("scope", &format!("{}/.default", si.url)),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["token_type"], "Bearer");
        assert!(v["expires_in"].as_u64().unwrap() > 0);
        v["access_token"].as_str().unwrap().to_string()
    }

    fn get(si: &StandIn, tok: &str, path: &str) -> reqwest::RequestBuilder {
        reqwest::Client::new()
            .get(format!("{}/api/data/v9.2/{path}", si.url))
            .bearer_auth(tok)
            .header("Accept", "application/json")
            .header("OData-MaxVersion", "4.0")
            .header("OData-Version", "4.0")
    }

    #[tokio::test]
    async fn wrong_secret_is_aadsts7000215() {
        let si = StandIn::start().await;
        si.add_client("app", "right");
        let resp = reqwest::Client::new()
            .post(&si.token_url)
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", "app"),
                ("client_secret", "wrong"),
                ("scope", &format!("{}/.default", si.url)),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"], "invalid_client");
        assert!(v["error_description"]
            .as_str()
            .unwrap()
            .starts_with("AADSTS7000215:"));
    }

    #[tokio::test]
    async fn paging_filter_and_select_follow_the_docs() {
        let si = StandIn::start().await;
        let tok = token(&si).await;
        si.seed(
            "contacts",
            (0..5)
                .map(|i| json!({"contactid": guid(1, i), "fullname": format!("C {i}"), "emailaddress1": format!("c{i}@x.test")}))
                .collect(),
        );
        let resp = get(&si, &tok, "contacts?$select=fullname,emailaddress1")
            .header("Prefer", "odata.maxpagesize=2")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.headers()["preference-applied"], "odata.maxpagesize=2");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["value"].as_array().unwrap().len(), 2);
        assert!(
            v["value"][0]["contactid"].is_string(),
            "the key is always returned"
        );
        assert!(
            v["value"][0].get("emailaddress2").is_none(),
            "$select limits columns"
        );
        let next = v["@odata.nextLink"].as_str().unwrap();
        assert!(next.contains("$skiptoken="));
        let v: Value = reqwest::Client::new()
            .get(next)
            .bearer_auth(&tok)
            .header("Prefer", "odata.maxpagesize=2")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["value"][0]["fullname"], "C 2");

        let v: Value = get(&si, &tok, "contacts?$select=fullname&$filter=emailaddress1%20eq%20'C3@X.TEST'%20or%20emailaddress2%20eq%20'C3@X.TEST'")
            .send().await.unwrap().json().await.unwrap();
        assert_eq!(v["value"].as_array().unwrap().len(), 1, "{v}");
        assert!(v.get("@odata.nextLink").is_none());

        for bad in [
            "contacts?$filter=contains(fullname,'C')",
            "contacts?$select=nosuchcolumn",
            "contacts?$skip=2",
            "contacts?$filter=fullname%20eq",
        ] {
            let resp = get(&si, &tok, bad).send().await.unwrap();
            assert_eq!(resp.status(), 400, "{bad}");
            let v: Value = resp.json().await.unwrap();
            assert!(
                v["error"]["code"].as_str().unwrap().starts_with("0x"),
                "{bad}: {v}"
            );
            assert!(!v["error"]["message"].as_str().unwrap().is_empty());
        }
    }

    #[tokio::test]
    async fn create_binds_and_errors_follow_the_docs() {
        let si = StandIn::start().await;
        let tok = token(&si).await;
        si.seed(
            "incidents",
            vec![json!({"incidentid": guid(2, 1), "title": "Pump"})],
        );
        si.seed(
            "contacts",
            vec![json!({"contactid": guid(1, 1), "fullname": "Ann"})],
        );
        let post = |body: Value| {
            reqwest::Client::new()
                .post(format!("{}/api/data/v9.2/emails", si.url))
                .bearer_auth(&tok)
                .header("OData-Version", "4.0")
                .json(&body)
        };
        let good = json!({
            "subject": "s", "messageid": "<a@b>", "directioncode": false, "statecode": 1, "statuscode": 4,
            "regardingobjectid_incident_email@odata.bind": format!("/incidents({})", guid(2, 1)),
            "email_activity_parties": [
                {"participationtypemask": 1, "partyid_contact@odata.bind": format!("/contacts({})", guid(1, 1))},
                {"participationtypemask": 2, "addressused": "x@y.test"}
            ]
        });
        let resp = post(good.clone()).send().await.unwrap();
        assert_eq!(resp.status(), 204);
        let eid = resp.headers()["odata-entityid"]
            .to_str()
            .unwrap()
            .to_string();
        assert!(
            eid.starts_with(&format!("{}/api/data/v9.2/emails(", si.url)),
            "{eid}"
        );
        let emails = si.emails();
        assert_eq!(emails.len(), 1);
        assert_eq!(emails[0].regarding, Some(("incidents".into(), guid(2, 1))));
        assert_eq!(emails[0].parties.len(), 2);

        let resp = post(good.clone())
            .header("Prefer", "return=representation")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201);

        let mut missing = good.clone();
        missing["regardingobjectid_incident_email@odata.bind"] =
            json!(format!("/incidents({})", guid(2, 99)));
        let resp = post(missing).send().await.unwrap();
        assert_eq!(resp.status(), 400);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["code"], "0x80040217");

        let mut unknown = good.clone();
        unknown["regardingobjectid_nosuch_email@odata.bind"] = json!("/nosuches(1)");
        assert_eq!(post(unknown).send().await.unwrap().status(), 400);

        // Expired token: 401 with the documented WWW-Authenticate.
        si.expire_tokens();
        let resp = post(good).send().await.unwrap();
        assert_eq!(resp.status(), 401);
        assert!(resp.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("invalid_token"));
    }

    #[tokio::test]
    async fn throttling_answers_429_with_retry_after() {
        let si = StandIn::start().await;
        let tok = token(&si).await;
        si.throttle_next(1, 2);
        let resp = get(&si, &tok, "contacts").send().await.unwrap();
        assert_eq!(resp.status(), 429);
        assert_eq!(resp.headers()["retry-after"], "2");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["code"], "0x80072322");
        // Too early: still throttled, and counted.
        assert_eq!(
            get(&si, &tok, "contacts").send().await.unwrap().status(),
            429
        );
        assert_eq!(si.stats().early_retries, 1);
    }
}
