//! Alerts and quarantine.

use axum::extract::{Path, Query, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{blocking, doc, limit_param, query_params, AdminState, ApiError};
use crate::model::{Alert, AlertLevel};
use crate::store::{AlertQuery, AlertState};

/// `limit` parameter for list endpoints.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LimitParams {
    /// At most this many (default 100, 1 to 10,000).
    pub limit: Option<usize>,
}

/// `GET /api/v1/alerts`'s answer.
#[derive(Debug, Serialize, ToSchema)]
struct AlertList {
    alerts: Vec<Alert>,
}

/// `GET /api/v1/alerts?level=&mailbox=&state=&limit=`: alerts, one per
/// mailbox (or profile) and condition, most recently seen first.
#[utoipa::path(
    get,
    path = "/alerts",
    tag = "alerts",
    operation_id = "list_alerts",
    params(
        ("level" = inline(Option<AlertLevel>), Query, description = "Only this level: error, warning or information"),
        ("mailbox" = Option<String>, Query, description = "Only alerts about this mailbox (for a profile alert: the profile's name)"),
        ("state" = inline(Option<AlertState>), Query, description = "open (the condition lasts) or resolved (it cleared)"),
        ("limit" = Option<usize>, Query, description = "At most this many (default 100, 1 to 10,000)"),
    ),
    responses(
        (status = 200, description = "Alerts with their counts, first and last seen", body = AlertList),
        (status = 400, description = "A malformed or unknown query parameter", body = doc::ErrorBody),
        (status = 500, description = "The store failed", body = doc::ErrorBody),
    )
)]
pub(super) async fn list(
    State(s): State<AdminState>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let params = query_params(q.as_deref(), &["level", "mailbox", "state", "limit"])?;
    let level = match params.get("level").map(String::as_str) {
        None => None,
        Some("error") => Some(AlertLevel::Error),
        Some("warning") => Some(AlertLevel::Warning),
        Some("information") => Some(AlertLevel::Information),
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "level must be error, warning or information, not {other:?}"
            )))
        }
    };
    let state = match params.get("state").map(String::as_str) {
        None => None,
        Some("open") => Some(AlertState::Open),
        Some("resolved") => Some(AlertState::Resolved),
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "state must be open or resolved, not {other:?}"
            )))
        }
    };
    let query = AlertQuery {
        level,
        mailbox: params.get("mailbox").cloned(),
        state,
        limit: limit_param(&params, 100, 10_000)?,
    };
    let store = s.store.clone();
    let alerts = blocking(move || store.query_alerts(&query)).await?;
    Ok(Json(AlertList { alerts }).into_response())
}

/// `POST /api/v1/alerts/{id}/acknowledge`: an operator has seen the alert.
/// It stays open until its condition clears; an escalation (Warning to
/// Error) asks for a new acknowledgement.
#[utoipa::path(
    post,
    path = "/alerts/{id}/acknowledge",
    tag = "alerts",
    operation_id = "acknowledge_alert",
    params(("id" = u64, Path, description = "Alert id")),
    responses(
        (status = 200, description = "The alert, acknowledged", body = Alert),
        (status = 400, description = "The id is not a whole number", body = String, content_type = "text/plain"),
        (status = 404, description = "No such alert", body = doc::ErrorBody),
        (status = 500, description = "The store failed", body = doc::ErrorBody),
    )
)]
pub(super) async fn acknowledge(
    State(s): State<AdminState>,
    Path(id): Path<u64>,
) -> Result<Response, ApiError> {
    let store = s.store.clone();
    match blocking(move || store.acknowledge_alert(id, crate::model::now())).await? {
        Some(alert) => Ok(Json(alert).into_response()),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no alert {id}"),
        )),
    }
}

/// `GET /api/v1/quarantine`'s answer.
#[derive(Debug, Serialize, ToSchema)]
struct QuarantineList {
    quarantine: Vec<crate::model::QuarantineEntry>,
}

/// `GET /api/v1/quarantine`: messages that could not be processed.
#[utoipa::path(
    get,
    path = "/quarantine",
    tag = "alerts",
    operation_id = "list_quarantine",
    params(LimitParams),
    responses(
        (status = 200, description = "Quarantined messages with their reasons", body = QuarantineList),
        (status = 400, description = "A malformed query parameter", body = String, content_type = "text/plain"),
        (status = 500, description = "The store failed", body = doc::ErrorBody),
    )
)]
pub(super) async fn quarantine(
    State(s): State<AdminState>,
    Query(p): Query<LimitParams>,
) -> Result<Response, ApiError> {
    let (store, limit) = (s.store.clone(), p.limit.unwrap_or(100).clamp(1, 10_000));
    // Off the async threads, as every other store read of the API.
    let quarantine = blocking(move || store.quarantined(limit)).await?;
    Ok(Json(QuarantineList { quarantine }).into_response())
}

/// `POST /api/v1/quarantine/{id}/retry`'s answer.
#[derive(Debug, Serialize, ToSchema)]
struct RetryAnswer {
    /// `recorded` (an activity now, the entry is gone) or `still_quarantined`.
    status: &'static str,
    /// The activity it became.
    #[serde(skip_serializing_if = "Option::is_none")]
    activity_id: Option<u64>,
    /// True when it was a copy of an activity already recorded.
    #[serde(skip_serializing_if = "Option::is_none")]
    duplicate: Option<bool>,
    /// Why it is still quarantined.
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

/// `POST /api/v1/quarantine/{id}/retry`: processes a quarantined message's
/// saved bytes again, with today's parser and settings (e.g. after raising
/// `max_message_size`). Recorded: the entry goes in the same commit as the
/// activity. Still unreadable: the entry stays unchanged (422).
#[utoipa::path(
    post,
    path = "/quarantine/{id}/retry",
    tag = "alerts",
    operation_id = "retry_quarantined",
    params(("id" = u64, Path, description = "Quarantine entry id")),
    responses(
        (status = 200, description = "Recorded as an activity; the entry is gone", body = RetryAnswer),
        (status = 400, description = "The id is not a whole number", body = String, content_type = "text/plain"),
        (status = 404, description = "No such quarantine entry", body = doc::ErrorBody),
        (status = 409, description = "Nothing to retry here: never downloaded, its mailbox is gone, or its bytes are", body = doc::ErrorBody),
        (status = 422, description = "Still not processable; the entry stays", body = RetryAnswer),
        (status = 500, description = "The store failed", body = doc::ErrorBody),
    )
)]
pub(super) async fn retry(
    State(s): State<AdminState>,
    Path(id): Path<u64>,
) -> Result<Response, ApiError> {
    use crate::quarantine::{RetryError, RetryOutcome};
    let (store, config) = (s.store.clone(), s.config.current());
    // The retry's own errors are answered below, each with its status.
    let done = super::blocking(move || {
        Ok(crate::quarantine::retry(
            store.as_ref(),
            &config,
            id,
            crate::model::now(),
        ))
    })
    .await?;
    match done {
        Ok(RetryOutcome::Recorded {
            activity_id,
            duplicate,
        }) => Ok(Json(RetryAnswer {
            status: "recorded",
            activity_id: Some(activity_id),
            duplicate: Some(duplicate),
            reason: None,
        })
        .into_response()),
        Ok(RetryOutcome::StillQuarantined { reason }) => Ok((
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(RetryAnswer {
                status: "still_quarantined",
                activity_id: None,
                duplicate: None,
                reason: Some(reason),
            }),
        )
            .into_response()),
        Err(e @ RetryError::NotFound(_)) => {
            Err(ApiError::new(StatusCode::NOT_FOUND, e.to_string()))
        }
        Err(
            e @ (RetryError::NotDownloaded { .. }
            | RetryError::MailboxGone { .. }
            | RetryError::Bytes { .. }),
        ) => Err(ApiError::new(StatusCode::CONFLICT, e.to_string())),
        Err(e) => Err(ApiError::store(e)),
    }
}
