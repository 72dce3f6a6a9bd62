//! The OpenAPI 3.1 document of the admin API, generated from the handlers'
//! `#[utoipa::path]` annotations and the types they answer with, and served
//! at `GET /api/v1/openapi.json` (behind the bearer token, like the rest of
//! `/api/v1`).
//!
//! The router and the document come from one route table
//! ([`super::routes`]): each route is added with utoipa-axum's `routes!`,
//! which registers the handler with axum and its operation with the
//! document at once.

use std::sync::Arc;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use serde::Serialize;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::path::{Operation, PathItem};
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr};
use utoipa::{Modify, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;

use super::records::InvalidItem;
use super::ApiError;
use crate::model::SendStatus;

/// Name of the bearer security scheme in the document.
pub const BEARER: &str = "bearer";

/// Name of the shared 401 response in the document.
const UNAUTHORIZED: &str = "Unauthorized";

/// The JSON body of every error: `error` is a sentence for the person
/// reading it; some endpoints add fields a client can act on.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong and, where it helps, what to do.
    pub error: String,
    /// `/api/v1/outgoing`: a machine-readable code: `invalid_request`,
    /// `invalid`, `unknown_mailbox`, `not_allowed`, `answers_automatic`,
    /// `not_found`, `wrong_status`, `store`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// Every rule broken (a 422 record, a 400 outgoing email).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problems: Option<Vec<String>>,
    /// A refused bulk upsert (422): each invalid item and why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub invalid: Option<Vec<InvalidItem>>,
    /// A feed cursor past the newest event (409): the newest event's seq.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_seq: Option<u64>,
    /// `wrong_status` (409): the outgoing email's status now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<SendStatus>,
}

/// The document's fixed parts: info, tags, the bearer scheme, the error
/// body and the shared 401 response. The paths come from the route table.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "crm-mailsync admin API",
        description = "The daemon's admin HTTP API. `/healthz`, `/readyz` and `/metrics` are open; every `/api/v1` route needs `Authorization: Bearer <admin.token>`. Errors are JSON `{\"error\": \"…\"}` (see `ErrorBody`). Times named `*_at`, `first_seen`, `last_seen`, `queued_at` are Unix seconds (UTC); fields named without `_at` such as `received`, `sent`, `updated` are RFC 3339.",
        license(name = "Apache-2.0", identifier = "Apache-2.0")
    ),
    components(schemas(ErrorBody)),
    modifiers(&Security),
    tags(
        (name = "health", description = "Liveness, readiness and metrics (no token)"),
        (name = "mailboxes", description = "Mailboxes, their live state and Test & Enable"),
        (name = "profiles", description = "Email server profiles"),
        (name = "activities", description = "Tracked email activities"),
        (name = "alerts", description = "Mailbox and profile alerts, quarantine"),
        (name = "records", description = "The CRM record directory"),
        (name = "events", description = "The durable event log as a pull feed"),
        (name = "outbox", description = "Per-consumer outbox and dead letters"),
        (name = "outgoing", description = "Email queued for the daemon to send"),
        (name = "daemon", description = "The daemon itself: reloading its configuration"),
        (name = "meta", description = "This document"),
        (name = "web", description = "The web admin page and its assets (no token: they hold no data; the page sends the token on each /api/v1 call)"),
    )
)]
struct Base;

/// Adds the bearer scheme and the 401 response every `/api/v1` operation
/// refers to.
struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            BEARER,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "The admin token (`[admin] token`, `token_file` or `token_env`)",
                    ))
                    .build(),
            ),
        );
        let unauthorized = ResponseBuilder::new()
            .description("Missing or wrong bearer token")
            .header(
                "WWW-Authenticate",
                HeaderBuilder::new()
                    .description(Some("`Bearer realm=\"crm-mailsync\"`"))
                    .build(),
            )
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("ErrorBody")))
                    .build(),
            )
            .build();
        components
            .responses
            .insert(UNAUTHORIZED.into(), RefOr::T(unauthorized));
    }
}

/// The fixed parts of the document, before the routes are added.
pub fn base() -> utoipa::openapi::OpenApi {
    Base::openapi()
}

/// Type aliases utoipa names after their target type (`UnixTime` becomes a
/// schema `i64`): the name each gets in the document instead, and what it is.
const ALIASES: [(&str, &str, &str); 2] = [
    ("i64", "UnixTime", "Seconds since the Unix epoch (UTC)"),
    (
        "u64",
        "ActivityId",
        "An email activity's id (the store assigns it)",
    ),
];

/// The finished document as JSON, alias schemas renamed (see [`ALIASES`]).
pub fn finish(doc: &utoipa::openapi::OpenApi) -> Result<serde_json::Value, serde_json::Error> {
    let mut value = serde_json::to_value(doc)?;
    for (from, to, description) in ALIASES {
        let Some(schemas) = value
            .pointer_mut("/components/schemas")
            .and_then(|s| s.as_object_mut())
        else {
            break;
        };
        let Some(mut schema) = schemas.remove(from) else {
            continue;
        };
        schema["description"] = description.into();
        schemas.insert(to.into(), schema);
        rename_refs(
            &mut value,
            &format!("#/components/schemas/{from}"),
            &format!("#/components/schemas/{to}"),
        );
    }
    Ok(value)
}

/// Points every `$ref` to `from` at `to`.
fn rename_refs(value: &mut serde_json::Value, from: &str, to: &str) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                match v {
                    serde_json::Value::String(r) if key == "$ref" && r == from => {
                        *r = to.to_string();
                    }
                    _ => rename_refs(v, from, to),
                }
            }
        }
        serde_json::Value::Array(list) => list.iter_mut().for_each(|v| rename_refs(v, from, to)),
        _ => {}
    }
}

/// Every operation of an OpenAPI path item.
pub fn operations_mut(item: &mut PathItem) -> impl Iterator<Item = &mut Operation> {
    [
        &mut item.get,
        &mut item.put,
        &mut item.post,
        &mut item.delete,
        &mut item.options,
        &mut item.head,
        &mut item.patch,
        &mut item.trace,
        &mut item.query,
    ]
    .into_iter()
    .flatten()
    .chain(item.additional_operations.values_mut())
}

/// Marks every operation of `api` as needing the bearer token, with the
/// 401 it answers without it. The caller puts the bearer check in front of
/// exactly these routes.
pub fn bearer_only<S>(mut api: OpenApiRouter<S>) -> OpenApiRouter<S>
where
    S: Send + Sync + Clone + 'static,
{
    for item in api.get_openapi_mut().paths.paths.values_mut() {
        for op in operations_mut(item) {
            op.security = Some(vec![SecurityRequirement::new(BEARER, Vec::<String>::new())]);
            op.responses
                .responses
                .entry("401".into())
                .or_insert_with(|| RefOr::Ref(Ref::from_response_name(UNAUTHORIZED)));
        }
    }
    api
}

/// The document as served, rendered once when the router is built.
#[derive(Clone)]
pub struct Rendered(Option<Arc<str>>);

impl Rendered {
    pub fn new(doc: &utoipa::openapi::OpenApi) -> Self {
        let text = finish(doc).and_then(|v| serde_json::to_string_pretty(&v));
        Rendered(text.ok().map(Arc::from))
    }
}

/// `GET /api/v1/openapi.json`: this document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "meta",
    operation_id = "openapi",
    responses(
        (status = 200, description = "The OpenAPI 3.1 document of the admin API", body = serde_json::Value, content_type = "application/json"),
        (status = 500, description = "The document could not be rendered", body = ErrorBody),
    )
)]
pub async fn document(Extension(doc): Extension<Rendered>) -> Response {
    match doc.0 {
        Some(text) => (
            [(header::CONTENT_TYPE, "application/json")],
            text.to_string(),
        )
            .into_response(),
        None => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the OpenAPI document could not be rendered",
        )
        .into_response(),
    }
}
