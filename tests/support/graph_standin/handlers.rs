//! The stand-in's HTTP side: the Graph routes (see the module docs of
//! [`super`]; the token endpoint is in `token.rs`, folders' extended
//! properties in `extended.rs`), and the request log.
// Handlers answer errors as ready responses (axum style).
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, post};
use axum::Router;
use base64::Engine as _;
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{json, Value};

use super::extended;
use super::query::parse_query;
use super::wire::{self, delta_page, folder_json, message_json, resolve_ref};
use super::{DeltaState, FolderRec, Inner, LoggedRequest, Shared};

/// Graph's per-mailbox limit of concurrent requests.
const MAX_CONCURRENT: usize = 4;

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route(
            "/{tenant}/oauth2/v2.0/token",
            post(super::token::token_endpoint),
        )
        .route("/v1.0/users/{user}/{*rest}", any(graph))
        .with_state(shared)
}

fn now_text() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true)
}

pub(crate) fn json_response(status: StatusCode, v: Value) -> Response {
    (
        status,
        [("content-type", "application/json")],
        v.to_string(),
    )
        .into_response()
}

/// Graph's error body.
pub(crate) fn error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = json!({"error": {
        "code": code,
        "message": message,
        "innerError": {
            "date": now_text(),
            "request-id": "6a3b7c1e-0000-4000-8000-000000000001",
            "client-request-id": "6a3b7c1e-0000-4000-8000-000000000001",
        }
    }});
    json_response(status, body)
}

pub(crate) fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

// ---------------------------------------------------------------------------
// Graph

/// Counts a mailbox's request in flight until dropped.
struct InFlight {
    shared: Arc<Shared>,
    user: String,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(n) = self.shared.lock().in_flight.get_mut(&self.user) {
            *n = n.saturating_sub(1);
        }
    }
}

/// The next pseudo-random percent (xorshift; deterministic per run).
fn roll(inner: &mut Inner) -> u32 {
    let mut x = inner.rng;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    inner.rng = x;
    (x % 100) as u32
}

/// Counts the request in flight for its mailbox (until the guard drops);
/// `true` when it is one too many.
fn enter(s: &Arc<Shared>, user: &str) -> (InFlight, Option<(&'static str, &'static str)>) {
    let mut inner = s.lock();
    inner.stats.requests += 1;
    let key = inner
        .user_key(user)
        .unwrap_or_else(|| user.to_ascii_lowercase());
    let n = inner.in_flight.entry(key.clone()).or_insert(0);
    *n += 1;
    let now_in = *n;
    inner.stats.peak_in_flight = inner.stats.peak_in_flight.max(now_in);
    let over = now_in > MAX_CONCURRENT;
    if over {
        inner.stats.concurrency_violations += 1;
    }
    // Graph's 10,000 requests per 10 minutes per app and mailbox.
    let now = Instant::now();
    let (limit, window) = (inner.faults.mailbox_limit, inner.faults.mailbox_window);
    let recent = inner.recent.entry(key.clone()).or_default();
    while recent
        .front()
        .is_some_and(|t| now.duration_since(*t) >= window)
    {
        recent.pop_front();
    }
    recent.push_back(now);
    let over_limit = recent.len() > limit;
    if over_limit {
        inner.stats.over_mailbox_limit += 1;
    }
    let refusal = if over {
        Some((
            "MailboxConcurrency",
            "Application is over its MailboxConcurrency limit.",
        ))
    } else if over_limit {
        Some((
            "ApplicationThrottled",
            "Application is over its limit of 10000 requests per 10 minutes for this mailbox.",
        ))
    } else {
        None
    };
    drop(inner);
    (
        InFlight {
            shared: s.clone(),
            user: key,
        },
        refusal,
    )
}

/// Before routing: faults, the token, the user.
fn admit(
    s: &Arc<Shared>,
    user: &str,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<(String, Duration), Response> {
    let mut inner = s.lock();
    let key = inner
        .user_key(user)
        .unwrap_or_else(|| user.to_ascii_lowercase());
    let prefer = headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(", ");
    if !prefer.contains("IdType=\"ImmutableId\"") {
        inner.stats.without_immutable_ids += 1;
    }
    let request_key = (key.clone(), method.to_string(), uri.to_string());
    let now = Instant::now();
    if inner.not_before.get(&request_key).is_some_and(|t| now < *t) {
        inner.stats.early_retries += 1;
    }
    let delay = inner.faults.delay;
    let throttle = if inner.faults.throttle_next > 0 {
        inner.faults.throttle_next -= 1;
        true
    } else {
        let pct = inner.faults.throttle_percent;
        pct > 0 && roll(&mut inner) < pct
    };
    if throttle {
        inner.stats.throttled += 1;
        let ra = inner.faults.retry_after.clone();
        let secs: f64 = ra.parse().unwrap_or(1.0);
        inner
            .not_before
            .insert(request_key, now + Duration::from_secs_f64(secs));
        return Err(with_retry_after(
            error(
                StatusCode::TOO_MANY_REQUESTS,
                "TooManyRequests",
                "The request has been throttled.",
            ),
            &ra,
        ));
    }
    if inner.faults.unavailable_next > 0 {
        inner.faults.unavailable_next -= 1;
        inner.stats.unavailable += 1;
        return Err(with_retry_after(
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                "Service unavailable, please try again later.",
            ),
            "1",
        ));
    }
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let valid = inner
        .tokens
        .get(token)
        .is_some_and(|exp| Instant::now() < *exp);
    if !valid {
        inner.stats.unauthorized += 1;
        let msg = if token.is_empty() {
            "Access token is empty."
        } else if inner.tokens.contains_key(token) {
            "Lifetime validation failed, the token is expired."
        } else {
            "IDX14100: JWT is not well formed, there are no dots (.)."
        };
        let mut r = error(StatusCode::UNAUTHORIZED, "InvalidAuthenticationToken", msg);
        r.headers_mut().insert(
            "www-authenticate",
            "Bearer realm=\"\", authorization_uri=\"https://login.microsoftonline.com/common/oauth2/authorize\", client_id=\"00000003-0000-0000-c000-000000000000\""
                .parse()
                .unwrap(),
        );
        return Err(r);
    }
    let Some(key) = inner.user_key(user) else {
        return Err(error(
            StatusCode::NOT_FOUND,
            "ErrorInvalidUser",
            &format!("The requested user '{user}' is invalid."),
        ));
    };
    if let Some(scope) = &inner.scope {
        if !scope.contains(&key) {
            return Err(error(
                StatusCode::FORBIDDEN,
                "ErrorAccessDenied",
                "Access is denied. Check credentials and try again.",
            ));
        }
    }
    Ok((key, delay))
}

fn with_retry_after(mut r: Response, secs: &str) -> Response {
    r.headers_mut().insert("retry-after", secs.parse().unwrap());
    r
}

/// `mailFolders('x')` (as Graph writes its links) → `mailFolders/x`.
fn normalize(rest: &str) -> String {
    let mut out = String::with_capacity(rest.len());
    let mut chars = rest.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '(' && chars.peek() == Some(&'\'') {
            chars.next();
            out.push('/');
            while let Some(d) = chars.next() {
                if d == '\'' && chars.peek() == Some(&')') {
                    chars.next();
                    break;
                }
                out.push(d);
            }
        } else {
            out.push(c);
        }
    }
    out
}

async fn graph(
    State(s): State<Arc<Shared>>,
    Path((user, rest)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let q = parse_query(raw.as_deref());
    let rest = normalize(&rest);
    let (key, r) = answer(&s, &user, &rest, &q, method.clone(), uri, headers, body).await;
    s.lock().log.push(LoggedRequest {
        method: method.to_string(),
        user: key,
        path: rest,
        query: q,
        status: r.status().as_u16(),
        at: Instant::now(),
    });
    r
}

/// The answer to one Graph request, and the mailbox it was for.
#[allow(clippy::too_many_arguments)]
async fn answer(
    s: &Arc<Shared>,
    user: &str,
    rest: &str,
    q: &[(String, String)],
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> (String, Response) {
    // Held until the answer is ready (the guard locks the state when it
    // drops, so it lives outside every lock).
    let (_in_flight, refusal) = enter(s, user);
    if let Some((code, message)) = refusal {
        let r = with_retry_after(error(StatusCode::TOO_MANY_REQUESTS, code, message), "1");
        return (user.to_ascii_lowercase(), r);
    }
    let (key, delay) = match admit(s, user, &method, &uri, &headers) {
        Ok(x) => x,
        Err(r) => return (user.to_ascii_lowercase(), r),
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let segs: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    let mut inner = s.lock();
    wire::file_due_sent(inner.users.get_mut(&key).unwrap());
    let r = route(s, &mut inner, &key, &method, &segs, q, &headers, &body);
    (key, r.unwrap_or_else(|e| e))
}

type Answer = Result<Response, Response>;

pub(crate) fn not_found_item() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "ErrorItemNotFound",
        "The specified object was not found in the store.",
    )
}

pub(crate) fn bad_request(code: &str, message: &str) -> Response {
    error(StatusCode::BAD_REQUEST, code, message)
}

fn param<'a>(q: &'a [(String, String)], name: &str) -> Option<&'a str> {
    q.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn select(q: &[(String, String)]) -> Option<Vec<String>> {
    param(q, "$select").map(|s| s.split(',').map(|x| x.trim().to_string()).collect())
}

#[allow(clippy::too_many_arguments)]
fn route(
    s: &Shared,
    inner: &mut Inner,
    key: &str,
    method: &Method,
    segs: &[&str],
    q: &[(String, String)],
    headers: &HeaderMap,
    body: &Bytes,
) -> Answer {
    match (method.as_str(), segs) {
        ("GET", ["mailFolders"]) => {
            let root = inner.users[key].folders[0].id.clone();
            list_folders(s, inner, key, &root, q, "mailFolders")
        }
        ("POST", ["mailFolders"]) => {
            let root = inner.users[key].folders[0].id.clone();
            create_folder(inner, key, &root, body)
        }
        ("GET", ["mailFolders", f]) => extended::get_folder(&s.graph(), inner, key, f, q),
        ("PATCH", ["mailFolders", f]) => extended::patch_folder(inner, key, f, body),
        ("GET", ["mailFolders", f, "childFolders"]) => {
            let id = resolve_ref(&inner.users[key], f)
                .ok_or_else(not_found_item)?
                .id
                .clone();
            let link = format!("mailFolders/{id}/childFolders");
            list_folders(s, inner, key, &id, q, &link)
        }
        ("POST", ["mailFolders", f, "childFolders"]) => {
            let id = resolve_ref(&inner.users[key], f)
                .ok_or_else(not_found_item)?
                .id
                .clone();
            create_folder(inner, key, &id, body)
        }
        ("GET", ["mailFolders", f, "messages", "delta"]) => delta(s, inner, key, f, q, headers),
        ("GET", ["mailFolders", f, "messages"]) => list_messages(inner, key, f, q),
        ("GET", ["messages", m]) => {
            inner.stats.message_reads += 1;
            let msg = inner.users[key]
                .messages
                .get(*m)
                .ok_or_else(not_found_item)?;
            Ok(json_response(
                StatusCode::OK,
                message_json(msg, select(q).as_deref()),
            ))
        }
        ("GET", ["messages", m, "$value"]) => {
            let msg = inner.users[key]
                .messages
                .get(*m)
                .ok_or_else(not_found_item)?;
            inner.stats.downloads += 1;
            Ok((
                StatusCode::OK,
                [("content-type", "text/plain")],
                msg.mime.as_ref().clone(),
            )
                .into_response())
        }
        ("PATCH", ["messages", m]) => patch_message(inner, key, m, body),
        ("DELETE", ["messages", m]) => {
            let mb = inner.users.get_mut(key).unwrap();
            let deleted = mb
                .folders
                .iter()
                .find(|f| f.well_known == Some("deleteditems"))
                .map(|f| f.id.clone())
                .unwrap_or_default();
            let in_deleted = mb
                .messages
                .get(*m)
                .map(|x| x.folder == deleted)
                .ok_or_else(not_found_item)?;
            if in_deleted {
                wire::remove_msg(mb, m);
            } else {
                wire::move_msg(mb, m, &deleted);
            }
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        ("POST", ["messages", m, "move"]) => {
            let v: Value = serde_json::from_slice(body)
                .map_err(|_| bad_request("RequestBodyRead", "Invalid JSON in the request body."))?;
            let dest = v["destinationId"].as_str().unwrap_or_default();
            let mb = inner.users.get_mut(key).unwrap();
            let dest = resolve_ref(mb, dest)
                .map(|f| f.id.clone())
                .ok_or_else(not_found_item)?;
            if !mb.messages.contains_key(*m) {
                return Err(not_found_item());
            }
            wire::move_msg(mb, m, &dest);
            inner.stats.moves += 1;
            let msg = &inner.users[key].messages[*m];
            Ok(json_response(StatusCode::CREATED, message_json(msg, None)))
        }
        ("POST", ["sendMail"]) => send_mail(inner, key, headers, body),
        _ => Err(bad_request(
            "BadRequest",
            &format!(
                "Resource not found for the segment '{}'.",
                segs.last().unwrap_or(&"")
            ),
        )),
    }
}

fn list_folders(
    s: &Shared,
    inner: &Inner,
    key: &str,
    parent: &str,
    q: &[(String, String)],
    link: &str,
) -> Answer {
    let mb = &inner.users[key];
    let top: usize = param(q, "$top").and_then(|t| t.parse().ok()).unwrap_or(10);
    let skip: usize = param(q, "$skip").and_then(|t| t.parse().ok()).unwrap_or(0);
    let kids: Vec<&FolderRec> = mb
        .folders
        .iter()
        .filter(|f| f.parent.as_deref() == Some(parent))
        .collect();
    let page: Vec<Value> = kids
        .iter()
        .skip(skip)
        .take(top.max(1))
        .map(|f| folder_json(mb, f))
        .collect();
    let mut v = json!({
        "@odata.context": format!("{}/$metadata#users('{}')/mailFolders", s.graph(), mb.user_id),
        "value": page,
    });
    if skip + top.max(1) < kids.len() {
        let mut next = format!(
            "{}/users/{}/{link}?$top={}&$skip={}",
            s.graph(),
            mb.user_id,
            top.max(1),
            skip + top.max(1)
        );
        if let Some(sel) = param(q, "$select") {
            next.push_str(&format!("&$select={sel}"));
        }
        v["@odata.nextLink"] = json!(next);
    }
    Ok(json_response(StatusCode::OK, v))
}

fn create_folder(inner: &mut Inner, key: &str, parent: &str, body: &Bytes) -> Answer {
    let v: Value = serde_json::from_slice(body)
        .map_err(|_| bad_request("RequestBodyRead", "Invalid JSON in the request body."))?;
    let name = v["displayName"]
        .as_str()
        .unwrap_or_default()
        .trim()
        .to_string();
    if name.is_empty() {
        return Err(bad_request(
            "ErrorInvalidParameter",
            "The value of the parameter 'DisplayName' is empty.",
        ));
    }
    if wire::find_child(&inner.users[key], parent, &name).is_some() {
        return Err(error(
            StatusCode::CONFLICT,
            "ErrorFolderExists",
            "A folder with the specified name already exists.",
        ));
    }
    let id = inner.new_id("Fc");
    let mb = inner.users.get_mut(key).unwrap();
    mb.folders.push(FolderRec {
        id: id.clone(),
        name,
        parent: Some(parent.to_string()),
        well_known: None,
        props: HashMap::new(),
    });
    let f = mb.folders.last().unwrap();
    Ok(json_response(StatusCode::CREATED, folder_json(mb, f)))
}

/// `receivedDateTime ge|gt <time>`: the one filter message delta takes.
fn delta_filter(f: &str) -> Result<(DateTime<Utc>, bool), Response> {
    let bad = || {
        bad_request(
            "ErrorInvalidUrlQueryFilter",
            "The query filter contains one or more invalid nodes.",
        )
    };
    let parts: Vec<&str> = f.split_whitespace().collect();
    match parts.as_slice() {
        [prop, op, value] if prop.eq_ignore_ascii_case("receivedDateTime") => {
            let t = DateTime::parse_from_rfc3339(value)
                .map_err(|_| bad())?
                .with_timezone(&Utc);
            match op.to_ascii_lowercase().as_str() {
                "ge" => Ok((t, true)),
                "gt" => Ok((t, false)),
                _ => Err(bad()),
            }
        }
        _ => Err(bad()),
    }
}

fn page_size(headers: &HeaderMap) -> usize {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|p| {
            p.trim()
                .strip_prefix("odata.maxpagesize=")
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(10usize)
        .clamp(1, 1000)
}

fn new_token(inner: &mut Inner) -> String {
    inner.next_id += 1;
    let n = inner.next_id;
    b64url(format!("sync-state-{n}-{:x}", n.wrapping_mul(0x9E37_79B9)).as_bytes())
}

fn delta(
    s: &Shared,
    inner: &mut Inner,
    key: &str,
    f: &str,
    q: &[(String, String)],
    headers: &HeaderMap,
) -> Answer {
    let folder = resolve_ref(&inner.users[key], f)
        .ok_or_else(not_found_item)?
        .id
        .clone();
    let token = param(q, "$skiptoken").or_else(|| param(q, "$deltatoken"));
    let state = match token {
        Some(t) => {
            let st = inner.delta_states.get(t).cloned().ok_or_else(|| {
                bad_request("ErrorInvalidSyncStateData", "The sync state is not valid.")
            })?;
            if st.generation != inner.delta_generation {
                inner.stats.gone += 1;
                return Err(error(
                    StatusCode::GONE,
                    "SyncStateNotFound",
                    "The sync state generation is not found. Please perform a full resync.",
                ));
            }
            if st.folder != folder || st.user != key {
                return Err(bad_request(
                    "ErrorInvalidSyncStateData",
                    "The sync state does not belong to this folder.",
                ));
            }
            st
        }
        None => {
            let received_from = param(q, "$filter").map(delta_filter).transpose()?;
            if let Some(other) = q.iter().find(|(k, _)| {
                k.starts_with('$')
                    && !matches!(k.as_str(), "$select" | "$filter" | "$top" | "$expand")
            }) {
                return Err(bad_request(
                    "ErrorInvalidUrlQuery",
                    &format!(
                        "The query parameter '{}' is not supported with delta.",
                        other.0
                    ),
                ));
            }
            DeltaState {
                user: key.to_string(),
                folder: folder.clone(),
                since: 0,
                snapshot: None,
                after: 0,
                generation: inner.delta_generation,
                select: select(q),
                received_from,
            }
        }
    };
    let size = page_size(headers);
    let mb = &inner.users[key];
    let user_id = mb.user_id.clone();
    let (values, next, done) = delta_page(mb, &state, size);
    inner.stats.delta_pages += 1;
    let t = new_token(inner);
    inner.delta_states.insert(t.clone(), next);
    let link = format!(
        "{}/users/{user_id}/mailFolders('{folder}')/messages/delta?{}={t}",
        s.graph(),
        if done { "$deltatoken" } else { "$skiptoken" }
    );
    let mut v = json!({
        "@odata.context": format!("{}/$metadata#Collection(message)", s.graph()),
        "value": values,
    });
    v[if done {
        "@odata.deltaLink"
    } else {
        "@odata.nextLink"
    }] = json!(link);
    let mut r = json_response(StatusCode::OK, v);
    r.headers_mut().insert(
        "preference-applied",
        format!("odata.maxpagesize={size}, IdType=\"ImmutableId\"")
            .parse()
            .unwrap(),
    );
    Ok(r)
}

fn list_messages(inner: &mut Inner, key: &str, f: &str, q: &[(String, String)]) -> Answer {
    let mb = &inner.users[key];
    let folder = resolve_ref(mb, f).ok_or_else(not_found_item)?.id.clone();
    let wanted_mid = match param(q, "$filter") {
        None => None,
        Some(filter) => {
            let rest = filter
                .trim()
                .strip_prefix("internetMessageId eq '")
                .and_then(|r| r.strip_suffix('\''))
                .ok_or_else(|| {
                    bad_request(
                        "ErrorInvalidUrlQueryFilter",
                        "The query filter contains one or more invalid nodes.",
                    )
                })?;
            Some(rest.replace("''", "'"))
        }
    };
    let top: usize = param(q, "$top").and_then(|t| t.parse().ok()).unwrap_or(10);
    let sel = select(q);
    let mut list: Vec<_> = mb
        .messages
        .values()
        .filter(|m| m.folder == folder)
        .filter(|m| {
            wanted_mid
                .as_ref()
                .is_none_or(|w| m.internet_message_id.as_deref() == Some(w.as_str()))
        })
        .collect();
    list.sort_by_key(|m| std::cmp::Reverse((m.received, m.seq)));
    let value: Vec<Value> = list
        .iter()
        .take(top)
        .map(|m| message_json(m, sel.as_deref()))
        .collect();
    Ok(json_response(StatusCode::OK, json!({"value": value})))
}

fn patch_message(inner: &mut Inner, key: &str, m: &str, body: &Bytes) -> Answer {
    let v: Value = serde_json::from_slice(body)
        .map_err(|_| bad_request("RequestBodyRead", "Invalid JSON in the request body."))?;
    let mb = inner.users.get_mut(key).unwrap();
    let msg = mb.messages.get_mut(m).ok_or_else(not_found_item)?;
    if let Some(cats) = v.get("categories") {
        let Some(list) = cats.as_array() else {
            return Err(bad_request(
                "RequestBodyRead",
                "categories must be an array of strings.",
            ));
        };
        msg.categories = list
            .iter()
            .filter_map(|c| c.as_str().map(String::from))
            .collect();
    }
    if let Some(r) = v.get("isRead").and_then(Value::as_bool) {
        msg.is_read = r;
    }
    wire::touch(mb, m);
    inner.stats.patches += 1;
    let msg = &inner.users[key].messages[m];
    Ok(json_response(StatusCode::OK, message_json(msg, None)))
}

/// The JSON form's message → MIME (what Exchange would build).
fn json_to_mime(from: &str, m: &Value) -> Result<Vec<u8>, Response> {
    let list = |k: &str| -> Vec<String> {
        m[k].as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["emailAddress"]["address"].as_str().map(String::from))
            .collect()
    };
    let to = list("toRecipients");
    let cc = list("ccRecipients");
    let bcc = list("bccRecipients");
    if to.is_empty() && cc.is_empty() && bcc.is_empty() {
        return Err(bad_request(
            "ErrorInvalidRecipients",
            "At least one recipient isn't valid.",
        ));
    }
    let n = Utc::now().timestamp_nanos_opt().unwrap_or(0);
    let mut text = format!(
        "Message-ID: <{n:x}@standin.prod.outlook.com>\r\nDate: {}\r\nFrom: {from}\r\nSubject: {}\r\n",
        Utc::now().to_rfc2822(),
        m["subject"].as_str().unwrap_or("")
    );
    if !to.is_empty() {
        text.push_str(&format!("To: {}\r\n", to.join(", ")));
    }
    if !cc.is_empty() {
        text.push_str(&format!("Cc: {}\r\n", cc.join(", ")));
    }
    if !bcc.is_empty() {
        text.push_str(&format!("Bcc: {}\r\n", bcc.join(", ")));
    }
    for h in m["internetMessageHeaders"].as_array().into_iter().flatten() {
        if let (Some(k), Some(v)) = (h["name"].as_str(), h["value"].as_str()) {
            text.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    let ct = if m["body"]["contentType"]
        .as_str()
        .is_some_and(|c| c.eq_ignore_ascii_case("html"))
    {
        "text/html"
    } else {
        "text/plain"
    };
    text.push_str(&format!(
        "MIME-Version: 1.0\r\nContent-Type: {ct}; charset=utf-8\r\n\r\n{}\r\n",
        m["body"]["content"].as_str().unwrap_or("")
    ));
    Ok(text.into_bytes())
}

fn send_mail(inner: &mut Inner, key: &str, headers: &HeaderMap, body: &Bytes) -> Answer {
    let ct = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let email = inner.users[key].email.clone();
    let (mime, save) = if ct.starts_with("text/plain") {
        let text: String = String::from_utf8_lossy(body)
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        let mime = base64::engine::general_purpose::STANDARD
            .decode(text.as_bytes())
            .map_err(|_| {
                bad_request(
                    "ErrorMimeContentInvalidBase64String",
                    "Invalid base64 string for MIME content.",
                )
            })?;
        (mime, true)
    } else if ct.starts_with("application/json") {
        let v: Value = serde_json::from_slice(body)
            .map_err(|_| bad_request("RequestBodyRead", "Invalid JSON in the request body."))?;
        let mime = json_to_mime(&email, &v["message"])?;
        (mime, v["saveToSentItems"].as_bool().unwrap_or(true))
    } else {
        return Err(error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "ErrorInvalidContentType",
            "Content-Type must be application/json or text/plain.",
        ));
    };
    let parsed = mail_parser::MessageParser::default()
        .parse(&mime)
        .ok_or_else(|| bad_request("ErrorMimeContentInvalid", "The MIME content is not valid."))?;
    let from = parsed
        .from()
        .and_then(|a| a.first())
        .and_then(|a| a.address())
        .map(|a| a.to_ascii_lowercase());
    if from
        .as_deref()
        .is_some_and(|f| f != email.to_ascii_lowercase())
    {
        return Err(error(StatusCode::FORBIDDEN, "ErrorSendAsDenied", "The user account which was used to submit this request does not have the right to send mail on behalf of the specified sending account."));
    }
    let mut recipients: Vec<String> = Vec::new();
    for list in [parsed.to(), parsed.cc(), parsed.bcc()]
        .into_iter()
        .flatten()
    {
        recipients.extend(
            list.iter()
                .filter_map(|a| a.address().map(|s| s.to_ascii_lowercase())),
        );
    }
    if recipients.is_empty() {
        return Err(bad_request(
            "ErrorInvalidRecipients",
            "At least one recipient isn't valid.",
        ));
    }
    let mime = Arc::new(mime);
    inner.stats.sends += 1;
    if save {
        let sent = inner.users[key]
            .folders
            .iter()
            .find(|f| f.well_known == Some("sentitems"))
            .map(|f| f.id.clone())
            .unwrap_or_default();
        let id = wire::file_message(inner, key, &sent, mime.clone(), Utc::now());
        let delay = inner.faults.sent_delay;
        if !delay.is_zero() {
            // Filed later: the 202 is not the Sent copy.
            let mb = inner.users.get_mut(key).unwrap();
            if let Some(m) = mb.messages.remove(&id) {
                mb.pending_sent.push((Instant::now() + delay, m));
            }
        }
    }
    for r in recipients {
        if let Some(rk) = inner.user_key(&r) {
            let inbox = inner.users[&rk]
                .folders
                .iter()
                .find(|f| f.well_known == Some("inbox"))
                .map(|f| f.id.clone())
                .unwrap_or_default();
            wire::file_message(inner, &rk, &inbox, mime.clone(), Utc::now());
        }
    }
    Ok(StatusCode::ACCEPTED.into_response())
}
