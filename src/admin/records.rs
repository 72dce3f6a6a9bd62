//! `/api/v1/records`: the record directory (users, queues, contacts,
//! accounts, leads, regarding-able records) read and written over HTTP.
//!
//! Malformed input (JSON that does not parse, a bad query parameter) is a
//! 400; a well-formed record that breaks a rule (kind not `[a-z0-9_]+`, an
//! implausible address) is a 422. Every change is followed by late party
//! resolution for the addresses it touched, so activities waiting for a
//! record get linked.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;

use super::doc::ErrorBody;
use super::{blocking, limit_param, query_params, AdminState, ApiError};
use crate::config::PartySettings;
use crate::model::{now, record_kind, Record, UnixTime};
use crate::store::{RecordChanges, Store, StoreError};

/// Largest bulk upsert body accepted (about 100,000 records of a few
/// addresses each).
pub const BULK_BODY_LIMIT: usize = 64 * 1024 * 1024;

/// Most records in one bulk upsert.
const BULK_MAX_ITEMS: usize = 100_000;

/// Default and largest page of `GET /api/v1/records`.
const PAGE_DEFAULT: usize = 100;
const PAGE_MAX: usize = 1000;

/// A record as a client sends it. `kind` and `id` come from the path for a
/// `PUT` (and must agree when also given in the body); a bulk item must have
/// them. `updated_at` is accepted so a record read from the API can be sent
/// back unchanged, and ignored: the store sets it.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RecordInput {
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub emails: Vec<String>,
    #[serde(default)]
    pub owner: Option<String>,
    #[serde(default)]
    pub email_enabled: Option<bool>,
    #[serde(default)]
    pub user_number: Option<u32>,
    /// Ignored (the store sets it); accepted so a record read from the API
    /// can be sent back as it is.
    #[serde(default)]
    pub updated_at: Option<serde_json::Value>,
    /// Bulk upserts only: `true` deletes `kind:id` (the other fields are
    /// ignored), as in the webhook adapter's JSON-lines records.
    #[serde(default)]
    pub deleted: bool,
}

/// Checks a record kind: lower case `[a-z0-9_]+`.
fn validate_kind(kind: &str) -> Result<(), String> {
    if kind.is_empty() {
        return Err("kind is empty".into());
    }
    if kind
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Ok(());
    }
    let lower = kind.to_ascii_lowercase();
    if lower
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        Err(format!(
            "kind {kind:?} must be lower case (did you mean {lower:?}?)"
        ))
    } else {
        Err(format!(
            "kind {kind:?} may only contain a-z, 0-9 and _ (e.g. contact, account, case)"
        ))
    }
}

/// Checks a record id: not blank, no control characters.
fn validate_id(id: &str) -> Result<(), String> {
    if id.trim().is_empty() {
        return Err("id is empty".into());
    }
    if id.len() > 1024 {
        return Err(format!("id is {} bytes long; at most 1024", id.len()));
    }
    if id.chars().any(char::is_control) {
        return Err(format!("id {id:?} contains control characters"));
    }
    Ok(())
}

/// Whether an address looks like one a mail server would accept: one `@`,
/// a non-empty local part and domain, no spaces, brackets or separators
/// (a `Name <a@b>` form or a `;`-joined list is a client mistake), no empty
/// domain label.
fn validate_email(address: &str) -> Result<(), String> {
    if address.len() > 254 {
        return Err(format!("email {address:?} is longer than 254 characters"));
    }
    if let Some(c) = address
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || "<>,;\"()[]\\".contains(*c))
    {
        return Err(format!(
            "email {address:?} contains {c:?}; give bare addresses, one per list item"
        ));
    }
    let Some((local, domain)) = address.split_once('@') else {
        return Err(format!("email {address:?} has no @"));
    };
    if local.is_empty() {
        return Err(format!("email {address:?} has nothing before the @"));
    }
    if domain.contains('@') {
        return Err(format!("email {address:?} has more than one @"));
    }
    if domain.is_empty() || domain.split('.').any(str::is_empty) {
        return Err(format!("email {address:?} does not have a valid domain"));
    }
    Ok(())
}

/// Validates a client's record against the directory's rules and builds the
/// [`Record`] to store. `kind`/`id` from the path win; the body's must agree.
pub fn validate_record(
    path: Option<(&str, &str)>,
    input: RecordInput,
) -> Result<Record, Vec<String>> {
    let mut problems = Vec::new();
    if input.deleted && path.is_some() {
        problems.push(
            "\"deleted\": true belongs in a bulk upsert; delete one record with DELETE".into(),
        );
    }
    let (kind, id) = match path {
        Some((kind, id)) => {
            if let Some(k) = input.kind.as_deref().filter(|k| *k != kind) {
                problems.push(format!(
                    "kind {k:?} in the body does not match {kind:?} in the path"
                ));
            }
            if let Some(i) = input.id.as_deref().filter(|i| *i != id) {
                problems.push(format!(
                    "id {i:?} in the body does not match {id:?} in the path"
                ));
            }
            (kind.to_string(), id.to_string())
        }
        None => {
            if input.kind.is_none() {
                problems.push("kind is missing".into());
            }
            if input.id.is_none() {
                problems.push("id is missing".into());
            }
            (
                input.kind.clone().unwrap_or_default(),
                input.id.clone().unwrap_or_default(),
            )
        }
    };
    if path.is_some() || input.kind.is_some() {
        if let Err(e) = validate_kind(&kind) {
            problems.push(e);
        }
    }
    if path.is_some() || input.id.is_some() {
        if let Err(e) = validate_id(&id) {
            problems.push(e);
        }
    }
    let mut seen = BTreeSet::new();
    for e in &input.emails {
        if let Err(why) = validate_email(e) {
            problems.push(why);
        } else if !seen.insert(e.to_lowercase()) {
            problems.push(format!("email {e:?} is listed twice"));
        }
    }
    if let Some(owner) = &input.owner {
        if owner.trim().is_empty() {
            problems.push("owner is empty (leave it out when there is none)".into());
        }
    }
    if input.user_number.is_some() && kind != record_kind::USER {
        problems.push(format!(
            "user_number belongs to records of kind \"user\", not {kind:?}"
        ));
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(Record {
        kind,
        id,
        name: input.name,
        emails: input.emails,
        owner: input.owner,
        email_enabled: input.email_enabled.unwrap_or(true),
        user_number: input.user_number,
        updated_at: 0,
    })
}

/// Validates a bulk item with `"deleted": true`: only `kind` and `id` count.
fn validate_deletion(input: &RecordInput) -> Result<(String, String), Vec<String>> {
    let mut problems = Vec::new();
    match &input.kind {
        Some(k) => problems.extend(validate_kind(k).err()),
        None => problems.push("kind is missing".into()),
    }
    match &input.id {
        Some(i) => problems.extend(validate_id(i).err()),
        None => problems.push("id is missing".into()),
    }
    match (&input.kind, &input.id) {
        (Some(k), Some(i)) if problems.is_empty() => Ok((k.clone(), i.clone())),
        _ => Err(problems),
    }
}

/// Late party resolution after the directory changed: activities with an
/// unresolved party on one of `addresses` are resolved again against the
/// records now known, each change written with its `activity.updated` event.
/// Returns how many activities were updated.
///
/// See [`crate::crm::parties::resolve_pending`]; every records endpoint
/// goes through here.
fn resolve_parties_after_record_change(
    store: &dyn Store,
    addresses: &[String],
    settings: &PartySettings,
    at: UnixTime,
) -> Result<usize, StoreError> {
    crate::crm::parties::resolve_pending(store, addresses, settings, at)
}

/// The addresses of records, lower-cased as the address index keeps them.
fn addresses_of<'a>(records: impl IntoIterator<Item = &'a Record>) -> BTreeSet<String> {
    records
        .into_iter()
        .flat_map(|r| r.emails.iter())
        .map(|e| crate::model::normalize_address(e))
        .filter(|e| !e.is_empty())
        .collect()
}

/// What a records request wrote.
struct Written {
    changes: RecordChanges,
    /// Activities whose parties were resolved by the change.
    activities_updated: usize,
}

/// Writes records (and deletions) and then resolves parties waiting on the
/// addresses involved, before and after the change (a deleted duplicate can
/// end a tie). A failed resolution is logged, not failed: the records are
/// written, and the parties stay unresolved (and listed as such) until a
/// later change of one of these addresses resolves them.
fn write_and_resolve(
    store: &dyn Store,
    settings: &PartySettings,
    records: Vec<Record>,
    deleted: &[(String, String)],
    before: &[Record],
) -> Result<Written, StoreError> {
    let at = now();
    let mut addresses = addresses_of(before);
    addresses.extend(addresses_of(&records));
    let changes = store.upsert_records(records, deleted, None, at)?;
    let mut activities_updated = 0;
    if changes.inserted + changes.updated + changes.deleted > 0 && !addresses.is_empty() {
        let addresses: Vec<String> = addresses.into_iter().collect();
        match resolve_parties_after_record_change(store, &addresses, settings, at) {
            Ok(n) => activities_updated = n,
            Err(e) => {
                tracing::warn!(error = %e, addresses = addresses.len(), "party resolution after a record change failed; the parties stay unresolved until a later change of these addresses")
            }
        }
    }
    Ok(Written {
        changes,
        activities_updated,
    })
}

/// A record as the API shows it: the stored fields plus `ref` (`kind:id`)
/// and `updated` (RFC 3339).
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct RecordView<'a> {
    #[serde(flatten)]
    record: &'a Record,
    /// `kind:id`.
    #[serde(rename = "ref")]
    reference: String,
    /// `updated_at` as RFC 3339.
    updated: String,
}

impl<'a> From<&'a Record> for RecordView<'a> {
    fn from(r: &'a Record) -> Self {
        RecordView {
            record: r,
            reference: format!("{}:{}", r.kind, r.id),
            updated: crate::model::format_time(r.updated_at),
        }
    }
}

fn views(list: &[Record]) -> Vec<RecordView<'_>> {
    list.iter().map(RecordView::from).collect()
}

/// `GET /api/v1/records`'s answer: a page of the directory, or every record
/// with an address.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct RecordList<'a> {
    count: usize,
    /// A page (`?kind=&after=&limit=`): the `after` of the following page,
    /// `null` on the last. Absent with `?email=`, which answers every
    /// record with that address at once.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, required = false)]
    next: Option<Option<String>>,
    records: Vec<RecordView<'a>>,
}

/// `GET /api/v1/records?kind=&after=kind:id&limit=` (a page, by kind then
/// id, with `next` for the following page) or `GET /api/v1/records?email=`
/// (every record with that address, through the address index).
#[utoipa::path(
    get,
    path = "/records",
    tag = "records",
    operation_id = "list_records",
    params(
        ("kind" = Option<String>, Query, description = "Only records of this kind (`[a-z0-9_]+`)"),
        ("after" = Option<String>, Query, description = "`kind:id`: start after this record (the `next` of the previous page)"),
        ("limit" = Option<usize>, Query, description = "At most this many (default 100, 1 to 1000)"),
        ("email" = Option<String>, Query, description = "Every record with this address (case-insensitive); not with `after` or `limit`"),
    ),
    responses(
        (status = 200, description = "A page of records, or the records with that address", body = RecordList),
        (status = 400, description = "A malformed, unknown or conflicting query parameter", body = ErrorBody),
        (status = 500, description = "The store failed", body = ErrorBody),
    )
)]
pub async fn list(
    State(s): State<AdminState>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let params = query_params(q.as_deref(), &["kind", "after", "limit", "email"])?;
    let kind = params.get("kind").cloned();
    if let Some(k) = &kind {
        validate_kind(k).map_err(ApiError::bad_request)?;
    }
    if let Some(email) = params.get("email").cloned() {
        if params.contains_key("after") || params.contains_key("limit") {
            return Err(ApiError::bad_request(
                "email= answers every record with that address at once; after= and limit= page the full listing and cannot be combined with it",
            ));
        }
        validate_email(email.trim()).map_err(ApiError::bad_request)?;
        let store = s.store.clone();
        let mut list = blocking(move || store.records_by_address(&email)).await?;
        if let Some(k) = &kind {
            list.retain(|r| &r.kind == k);
        }
        return Ok(Json(RecordList {
            count: list.len(),
            next: None,
            records: views(&list),
        })
        .into_response());
    }
    let limit = limit_param(&params, PAGE_DEFAULT, PAGE_MAX)?;
    let after = match params.get("after") {
        None => None,
        Some(a) => match a.split_once(':') {
            Some((k, id)) if validate_kind(k).is_ok() && !id.is_empty() => {
                Some((k.to_string(), id.to_string()))
            }
            _ => {
                return Err(ApiError::bad_request(format!(
                    "after must be a record reference kind:id (the next value of the previous page), not {a:?}"
                )))
            }
        },
    };
    let store = s.store.clone();
    let list = blocking(move || {
        store.records(
            kind.as_deref(),
            after.as_ref().map(|(k, i)| (k.as_str(), i.as_str())),
            limit,
        )
    })
    .await?;
    let next = (list.len() == limit)
        .then(|| list.last().map(|r| format!("{}:{}", r.kind, r.id)))
        .flatten();
    Ok(Json(RecordList {
        count: list.len(),
        next: Some(next),
        records: views(&list),
    })
    .into_response())
}

fn no_record(kind: &str, id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no record {kind}:{id} in the directory"),
    )
}

/// `GET /api/v1/records/{kind}/{id}`.
#[utoipa::path(
    get,
    path = "/records/{kind}/{id}",
    tag = "records",
    operation_id = "get_record",
    params(
        ("kind" = String, Path, description = "Record kind (`user`, `contact`, `case`, …)"),
        ("id" = String, Path, description = "The CRM's id of the record"),
    ),
    responses(
        (status = 200, description = "The record", body = RecordView),
        (status = 404, description = "No such record", body = ErrorBody),
        (status = 500, description = "The store failed", body = ErrorBody),
    )
)]
pub async fn get_one(
    State(s): State<AdminState>,
    Path((kind, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let store = s.store.clone();
    let (k, i) = (kind.clone(), id.clone());
    match blocking(move || store.record(&k, &i)).await? {
        Some(r) => Ok(Json(RecordView::from(&r)).into_response()),
        None => Err(no_record(&kind, &id)),
    }
}

/// A 422 naming every rule a record breaks.
fn invalid_record(problems: Vec<String>) -> ApiError {
    ApiError::with(
        StatusCode::UNPROCESSABLE_ENTITY,
        format!("the record is not valid: {}", problems.join("; ")),
        json!({ "problems": problems }),
    )
}

/// What a `PUT` did.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(super) enum PutResult {
    Created,
    Updated,
    Unchanged,
}

/// `PUT /api/v1/records/{kind}/{id}`'s answer.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct PutAnswer<'a> {
    result: PutResult,
    record: RecordView<'a>,
    /// Activities whose parties the change resolved.
    activities_updated: usize,
}

/// `PUT /api/v1/records/{kind}/{id}`: creates (201) or replaces (200) the
/// record; fields left out take their defaults (no name, no addresses,
/// email-enabled).
#[utoipa::path(
    put,
    path = "/records/{kind}/{id}",
    tag = "records",
    operation_id = "put_record",
    params(
        ("kind" = String, Path, description = "Record kind (`user`, `contact`, `case`, …)"),
        ("id" = String, Path, description = "The CRM's id of the record"),
    ),
    request_body(content = RecordInput, description = "The whole record; `kind` and `id`, when given, must match the path", content_type = "application/json"),
    responses(
        (status = 200, description = "Replaced (`updated`) or the same as stored (`unchanged`)", body = PutAnswer),
        (status = 201, description = "Created", body = PutAnswer),
        (status = 400, description = "The body is not JSON of a record", body = ErrorBody),
        (status = 409, description = "Deleted by another request meanwhile", body = ErrorBody),
        (status = 422, description = "The record breaks a rule (`problems` lists each)", body = ErrorBody),
        (status = 500, description = "The store failed", body = ErrorBody),
    )
)]
pub async fn put_one(
    State(s): State<AdminState>,
    Path((kind, id)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let input: RecordInput = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!("the body is not valid JSON for a record: {e}"))
    })?;
    let record = validate_record(Some((&kind, &id)), input).map_err(invalid_record)?;
    let store = s.store.clone();
    let settings = s.config.current().crm.parties.clone();
    let (written, stored) = blocking(move || {
        let before: Vec<Record> = store.record(&kind, &id)?.into_iter().collect();
        let written = write_and_resolve(store.as_ref(), &settings, vec![record], &[], &before)?;
        let stored = store.record(&kind, &id)?;
        Ok((written, stored))
    })
    .await?;
    // Deleted by a concurrent request between the write and the read.
    let Some(r) = stored else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "the record was deleted by another request while this one wrote it",
        ));
    };
    let (status, result) = if written.changes.inserted > 0 {
        (StatusCode::CREATED, PutResult::Created)
    } else if written.changes.updated > 0 {
        (StatusCode::OK, PutResult::Updated)
    } else {
        (StatusCode::OK, PutResult::Unchanged)
    };
    Ok((
        status,
        Json(PutAnswer {
            result,
            record: RecordView::from(&r),
            activities_updated: written.activities_updated,
        }),
    )
        .into_response())
}

/// `DELETE /api/v1/records/{kind}/{id}`: 204, or 404 when there is none.
#[utoipa::path(
    delete,
    path = "/records/{kind}/{id}",
    tag = "records",
    operation_id = "delete_record",
    params(
        ("kind" = String, Path, description = "Record kind"),
        ("id" = String, Path, description = "The CRM's id of the record"),
    ),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such record", body = ErrorBody),
        (status = 500, description = "The store failed", body = ErrorBody),
    )
)]
pub async fn delete_one(
    State(s): State<AdminState>,
    Path((kind, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let store = s.store.clone();
    let settings = s.config.current().crm.parties.clone();
    let (k, i) = (kind.clone(), id.clone());
    let deleted = blocking(move || {
        let Some(before) = store.record(&k, &i)? else {
            return Ok(0);
        };
        let written = write_and_resolve(store.as_ref(), &settings, vec![], &[(k, i)], &[before])?;
        Ok(written.changes.deleted)
    })
    .await?;
    if deleted == 0 {
        return Err(no_record(&kind, &id));
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// One bulk item that cannot be written, and why.
#[derive(Debug, Serialize, ToSchema)]
pub struct InvalidItem {
    /// 0-based position in the array (or among the non-blank lines).
    index: usize,
    /// 1-based line of a JSON-lines body.
    #[serde(skip_serializing_if = "Option::is_none")]
    line: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reference: Option<String>,
    error: String,
}

/// How the bulk body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BulkFormat {
    JsonArray,
    JsonLines,
}

fn bulk_format(headers: &HeaderMap) -> Result<BulkFormat, ApiError> {
    let Some(ct) = headers.get(header::CONTENT_TYPE) else {
        return Ok(BulkFormat::JsonArray);
    };
    let ct = ct.to_str().unwrap_or("").to_ascii_lowercase();
    let mime = ct.split(';').next().unwrap_or("").trim();
    match mime {
        "application/json" | "" => Ok(BulkFormat::JsonArray),
        "application/x-ndjson" | "application/jsonl" | "application/x-jsonlines" => {
            Ok(BulkFormat::JsonLines)
        }
        other => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("Content-Type {other:?} is not supported: send a JSON array as application/json or one record per line as application/x-ndjson"),
        )),
    }
}

/// One bulk item: its 1-based line (JSON lines only) and its JSON.
type BulkItem = (Option<usize>, serde_json::Value);

/// A bulk body split into items.
enum BulkBody {
    Items(Vec<BulkItem>),
    /// Lines of a JSON-lines body that are not JSON, of `total` items.
    Unparsable {
        total: usize,
        invalid: Vec<InvalidItem>,
    },
}

/// Splits a bulk body into items. A body that cannot be split at all is an
/// error; lines of a JSON-lines body that do not parse come back as
/// invalid items.
fn bulk_items(body: &[u8], format: BulkFormat) -> Result<BulkBody, ApiError> {
    match format {
        BulkFormat::JsonArray => match serde_json::from_slice::<serde_json::Value>(body) {
            Ok(serde_json::Value::Array(items)) => {
                Ok(BulkBody::Items(items.into_iter().map(|v| (None, v)).collect()))
            }
            Ok(_) => Err(ApiError::bad_request(
                "the body must be a JSON array of records (or JSON lines with Content-Type application/x-ndjson)",
            )),
            Err(e) => Err(ApiError::bad_request(format!(
                "the body is not valid JSON: {e}"
            ))),
        },
        BulkFormat::JsonLines => {
            let text = std::str::from_utf8(body)
                .map_err(|_| ApiError::bad_request("the body is not UTF-8"))?;
            let mut items = Vec::new();
            let mut invalid = Vec::new();
            for (n, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                match serde_json::from_str::<serde_json::Value>(line) {
                    Ok(v) => items.push((Some(n + 1), v)),
                    Err(e) => invalid.push(InvalidItem {
                        index: items.len() + invalid.len(),
                        line: Some(n + 1),
                        reference: None,
                        error: format!("not valid JSON: {e}"),
                    }),
                }
            }
            if invalid.is_empty() {
                Ok(BulkBody::Items(items))
            } else {
                Ok(BulkBody::Unparsable {
                    total: items.len() + invalid.len(),
                    invalid,
                })
            }
        }
    }
}

fn invalid_items(total: usize, invalid: Vec<InvalidItem>) -> ApiError {
    ApiError::with(
        StatusCode::UNPROCESSABLE_ENTITY,
        format!(
            "{} of {total} records are invalid; nothing was written",
            invalid.len()
        ),
        json!({ "invalid": invalid }),
    )
}

/// `POST /api/v1/records`: upserts a JSON array (or JSON lines) of records
/// in one batch. Every item is checked first: if any is invalid, nothing is
/// written and the answer (422) lists each with its index and why.
#[utoipa::path(
    post,
    path = "/records",
    tag = "records",
    operation_id = "bulk_upsert_records",
    request_body(
        description = "Up to 100,000 records: a JSON array, or one record per line. An item `{\"kind\", \"id\", \"deleted\": true}` deletes.",
        content(
            (Vec<RecordInput> = "application/json"),
            (RecordInput = "application/x-ndjson"),
        )
    ),
    responses(
        (status = 200, description = "Written in one batch", body = BulkAnswer),
        (status = 400, description = "The body cannot be read (not JSON, not an array, empty)", body = ErrorBody),
        (status = 413, description = "More than 100,000 records (JSON), or a body over 64 MiB (plain text)", content(
            (ErrorBody = "application/json"),
            (String = "text/plain"),
        )),
        (status = 415, description = "A Content-Type other than JSON or JSON lines", body = ErrorBody),
        (status = 422, description = "Some items are invalid (`invalid` lists each); nothing was written", body = ErrorBody),
        (status = 500, description = "The store failed", body = ErrorBody),
    )
)]
pub async fn bulk_upsert(
    State(s): State<AdminState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let format = bulk_format(&headers)?;
    let items = match bulk_items(&body, format)? {
        BulkBody::Items(items) => items,
        BulkBody::Unparsable { total, invalid } => return Err(invalid_items(total, invalid)),
    };
    if items.is_empty() {
        return Err(ApiError::bad_request("the body holds no records"));
    }
    if items.len() > BULK_MAX_ITEMS {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "{} records in one request; send at most {BULK_MAX_ITEMS} at a time",
                items.len()
            ),
        ));
    }
    let total = items.len();
    let mut ops = Vec::with_capacity(total);
    let mut invalid = Vec::new();
    for (index, (line, value)) in items.into_iter().enumerate() {
        let reference = value
            .get("kind")
            .and_then(|k| k.as_str())
            .zip(value.get("id").and_then(|i| i.as_str()))
            .map(|(k, i)| format!("{k}:{i}"));
        let checked = serde_json::from_value::<RecordInput>(value)
            .map_err(|e| format!("not a record: {e}"))
            .and_then(|input| {
                if input.deleted {
                    validate_deletion(&input)
                        .map(BulkOp::Delete)
                        .map_err(|p| p.join("; "))
                } else {
                    validate_record(None, input)
                        .map(BulkOp::Upsert)
                        .map_err(|p| p.join("; "))
                }
            });
        match checked {
            Ok(op) => ops.push(op),
            Err(error) => invalid.push(InvalidItem {
                index,
                line,
                reference,
                error,
            }),
        }
    }
    if !invalid.is_empty() {
        return Err(invalid_items(total, invalid));
    }
    let (records, deletions) = last_op_per_record(ops);
    let store: Arc<dyn Store> = s.store.clone();
    let settings = s.config.current().crm.parties.clone();
    let w = blocking(move || {
        let mut before = Vec::new();
        let keys = records
            .iter()
            .map(|r| (r.kind.as_str(), r.id.as_str()))
            .chain(deletions.iter().map(|(k, i)| (k.as_str(), i.as_str())));
        for (kind, id) in keys {
            if let Some(old) = store.record(kind, id)? {
                before.push(old);
            }
        }
        write_and_resolve(store.as_ref(), &settings, records, &deletions, &before)
    })
    .await?;
    Ok(Json(BulkAnswer {
        count: total,
        inserted: w.changes.inserted,
        updated: w.changes.updated,
        unchanged: w.changes.unchanged,
        deleted: w.changes.deleted,
        activities_updated: w.activities_updated,
    })
    .into_response())
}

/// What a bulk upsert wrote.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct BulkAnswer {
    /// Items in the request.
    count: usize,
    inserted: u64,
    updated: u64,
    unchanged: u64,
    deleted: u64,
    /// Activities whose parties the change resolved.
    activities_updated: usize,
}

/// One checked bulk item.
enum BulkOp {
    Upsert(Record),
    Delete((String, String)),
}

/// The records to upsert and to delete, keeping of each `kind:id` only its
/// last item, as a file read top down would leave it.
fn last_op_per_record(ops: Vec<BulkOp>) -> (Vec<Record>, Vec<(String, String)>) {
    let key = |op: &BulkOp| match op {
        BulkOp::Upsert(r) => (r.kind.clone(), r.id.clone()),
        BulkOp::Delete(k) => k.clone(),
    };
    let last: std::collections::HashMap<(String, String), usize> =
        ops.iter().enumerate().map(|(i, op)| (key(op), i)).collect();
    let mut records = Vec::new();
    let mut deletions = Vec::new();
    for (i, op) in ops.into_iter().enumerate() {
        if last.get(&key(&op)) != Some(&i) {
            continue;
        }
        match op {
            BulkOp::Upsert(r) => records.push(r),
            BulkOp::Delete(k) => deletions.push(k),
        }
    }
    (records, deletions)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(json: serde_json::Value) -> RecordInput {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn kinds_ids_and_addresses_are_checked() {
        assert!(validate_kind("contact").is_ok());
        assert!(validate_kind("sales_order2").is_ok());
        assert!(validate_kind("Contact")
            .unwrap_err()
            .contains("\"contact\""));
        assert!(validate_kind("ca se").is_err());
        assert!(validate_kind("").is_err());
        assert!(validate_id("42").is_ok());
        assert!(validate_id(" ").is_err());
        assert!(validate_id("a\0b").is_err());
        for ok in [
            "a@b.example",
            "first.last+tag@sub.example.com",
            "alice@localhost",
        ] {
            assert!(validate_email(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "plain",
            "@example.com",
            "a@",
            "a@@b.example",
            "a@b..example",
            "a@.example",
            "a b@example.com",
            "Alice <a@b.example>",
            "a@b.example;c@d.example",
        ] {
            assert!(validate_email(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_record_from_the_path_and_body() {
        let r = validate_record(
            Some(("contact", "c1")),
            input(json!({"name": "Ann", "emails": ["Ann@Example.com"]})),
        )
        .unwrap();
        assert_eq!((r.kind.as_str(), r.id.as_str()), ("contact", "c1"));
        assert!(r.email_enabled);
        let problems = validate_record(
            Some(("contact", "c1")),
            input(json!({"kind": "lead", "emails": ["x", "a@b.example", "A@b.example"], "user_number": 3})),
        )
        .unwrap_err();
        assert_eq!(problems.len(), 4, "{problems:?}");
        let missing = validate_record(None, input(json!({"name": "n"}))).unwrap_err();
        assert_eq!(missing, vec!["kind is missing", "id is missing"]);
        assert!(serde_json::from_value::<RecordInput>(json!({"email": "a@b.example"})).is_err());
    }

    #[test]
    fn the_last_item_of_a_record_wins_and_deletions_need_only_kind_and_id() {
        let rec = |id: &str, name: &str| {
            validate_record(
                None,
                input(json!({"kind": "contact", "id": id, "name": name})),
            )
            .unwrap()
        };
        let ops = vec![
            BulkOp::Upsert(rec("1", "first")),
            BulkOp::Delete(("contact".into(), "1".into())),
            BulkOp::Delete(("contact".into(), "2".into())),
            BulkOp::Upsert(rec("2", "back")),
            BulkOp::Upsert(rec("3", "a")),
            BulkOp::Upsert(rec("3", "b")),
        ];
        let (records, deletions) = last_op_per_record(ops);
        let names: Vec<(&str, &str)> = records
            .iter()
            .map(|r| (r.id.as_str(), r.name.as_str()))
            .collect();
        assert_eq!(names, [("2", "back"), ("3", "b")]);
        assert_eq!(deletions, [("contact".to_string(), "1".to_string())]);
        let del = input(json!({"kind": "contact", "id": "9", "deleted": true, "emails": ["junk"]}));
        assert_eq!(
            validate_deletion(&del).unwrap(),
            ("contact".to_string(), "9".to_string())
        );
        assert!(validate_deletion(&input(json!({"kind": "Contact", "deleted": true}))).is_err());
        let put = validate_record(Some(("contact", "9")), del).unwrap_err();
        assert!(put.iter().any(|p| p.contains("with DELETE")), "{put:?}");
    }

    #[test]
    fn json_lines_report_bad_lines_with_their_numbers() {
        let body = b"{\"kind\":\"contact\",\"id\":\"1\"}\n\n{not json}\n{\"kind\":\"lead\",\"id\":\"2\"}\n";
        let Ok(BulkBody::Unparsable { total, invalid }) = bulk_items(body, BulkFormat::JsonLines)
        else {
            panic!("expected invalid items");
        };
        assert_eq!((total, invalid.len()), (3, 1));
        assert_eq!((invalid[0].index, invalid[0].line), (1, Some(3)));
        let ok = bulk_items(
            b"\n{\"kind\":\"contact\",\"id\":\"1\"}\n",
            BulkFormat::JsonLines,
        );
        let Ok(BulkBody::Items(ok)) = ok else {
            panic!("valid lines");
        };
        assert_eq!(ok.len(), 1);
        assert_eq!(ok[0].0, Some(2));
    }
}
