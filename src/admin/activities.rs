//! Email activities: the list and one activity with its reasons.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{doc, store_error, AdminState, ApiError};
use crate::model::{format_time, EmailActivity};
use crate::store::ActivityQuery;

/// `GET /api/v1/activities` parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ActivityParams {
    /// Only this mailbox's activities.
    pub mailbox: Option<String>,
    /// At most this many (default 100, 1 to 10,000).
    pub limit: Option<usize>,
    /// Only activities with a smaller id (`next_before` of the previous page).
    pub before: Option<u64>,
}

/// An activity as the API shows it: times as RFC 3339, regarding as `kind:id`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ActivityView<'a> {
    #[serde(flatten)]
    pub activity: &'a EmailActivity,
    /// `received_at` as RFC 3339.
    pub received: String,
    /// `sent_at` as RFC 3339.
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

/// `GET /api/v1/activities`'s answer.
#[derive(Debug, Serialize, ToSchema)]
struct ActivityList<'a> {
    /// Activities in the store (of `mailbox`, when given).
    total: u64,
    /// Activities in this answer.
    count: usize,
    /// `before` of the following page; `null` on the last.
    next_before: Option<u64>,
    activities: Vec<ActivityView<'a>>,
}

/// `GET /api/v1/activities`: email activities, newest first.
#[utoipa::path(
    get,
    path = "/activities",
    tag = "activities",
    operation_id = "list_activities",
    params(ActivityParams),
    responses(
        (status = 200, description = "A page of activities, newest first", body = ActivityList),
        (status = 400, description = "A malformed query parameter", body = String, content_type = "text/plain"),
        (status = 500, description = "The store failed", body = doc::ErrorBody),
    )
)]
pub(super) async fn list(State(s): State<AdminState>, Query(p): Query<ActivityParams>) -> Response {
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
            let activities: Vec<ActivityView<'_>> = list.iter().map(ActivityView::from).collect();
            let next_before = if list.len() == limit {
                list.last().map(|a| a.id)
            } else {
                None
            };
            Json(ActivityList {
                total,
                count: activities.len(),
                next_before,
                activities,
            })
            .into_response()
        }
        Ok(Err(e)) => store_error(e),
        Err(e) => store_error(e),
    }
}

/// `GET /api/v1/activities/{id}`: one activity.
#[utoipa::path(
    get,
    path = "/activities/{id}",
    tag = "activities",
    operation_id = "get_activity",
    params(("id" = u64, Path, description = "Activity id")),
    responses(
        (status = 200, description = "The activity", body = ActivityView),
        (status = 400, description = "The id is not a whole number", body = String, content_type = "text/plain"),
        (status = 404, description = "No such activity", body = doc::ErrorBody),
        (status = 500, description = "The store failed", body = doc::ErrorBody),
    )
)]
pub(super) async fn get_one(State(s): State<AdminState>, Path(id): Path<u64>) -> Response {
    match s.store.activity(id) {
        Ok(Some(a)) => Json(ActivityView::from(&a)).into_response(),
        Ok(None) => {
            ApiError::new(StatusCode::NOT_FOUND, format!("no activity {id}")).into_response()
        }
        Err(e) => store_error(e),
    }
}
