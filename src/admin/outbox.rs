//! `/api/v1/outbox`: what is waiting for the CRM adapter, and what it gave
//! up on.

use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::{blocking, limit_param, query_params, AdminState, ApiError};
use crate::model::{format_time, now, DeadLetter};

/// The outbox consumers of this configuration: the `[crm]` adapter, if it
/// has an outbox (builtin has none: its events are only in the pull feed).
fn consumers(s: &AdminState) -> Vec<String> {
    s.config
        .crm
        .kind
        .consumer()
        .map(str::to_string)
        .into_iter()
        .collect()
}

/// `GET /api/v1/outbox`: per consumer, how many events are undelivered, the
/// age of the oldest, and how many were dead-lettered.
pub async fn overview(State(s): State<AdminState>) -> Result<Response, ApiError> {
    let names = consumers(&s);
    let store = s.store.clone();
    let stats = blocking(move || {
        names
            .into_iter()
            .map(|n| store.outbox_stats(&n).map(|st| (n, st)))
            .collect::<Result<Vec<_>, _>>()
    })
    .await?;
    let at = now();
    let list: Vec<_> = stats
        .into_iter()
        .map(|(consumer, st)| {
            json!({
                "consumer": consumer,
                "depth": st.depth,
                "oldest_queued_at": st.oldest_queued_at.map(format_time),
                "oldest_age_secs": st.oldest_queued_at.map(|q| (at - q).max(0)),
                "dead_letters": st.dead_letters,
            })
        })
        .collect();
    let note = list
        .is_empty()
        .then_some("the builtin adapter has no outbox: events are read from /api/v1/events");
    Ok(Json(json!({"consumers": list, "note": note})).into_response())
}

/// `GET /api/v1/outbox/{consumer}/dead-letters?limit=`: dead letters of one
/// consumer, oldest first.
pub async fn dead_letters(
    State(s): State<AdminState>,
    Path(consumer): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let params = query_params(q.as_deref(), &["limit"])?;
    let limit = limit_param(&params, 100, 10_000)?;
    let known = consumers(&s);
    if !known.contains(&consumer) {
        let configured = if known.is_empty() {
            "none (the builtin adapter has no outbox)".to_string()
        } else {
            known.join(", ")
        };
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no outbox consumer {consumer:?}; configured: {configured}"),
        ));
    }
    let store = s.store.clone();
    let name = consumer.clone();
    let list = blocking(move || store.dead_letters(&name, limit)).await?;
    let views: Vec<_> = list.iter().map(dead_letter_view).collect();
    Ok(
        Json(json!({"consumer": consumer, "count": views.len(), "dead_letters": views}))
            .into_response(),
    )
}

/// A dead letter with its times also as RFC 3339.
fn dead_letter_view(d: &DeadLetter) -> serde_json::Value {
    json!({
        "consumer": d.consumer,
        "seq": d.state.seq,
        "event_id": crate::model::OutboxEvent::id_for(d.state.seq),
        "activity_id": d.state.activity_id,
        "attempts": d.state.attempts,
        "queued_at": format_time(d.state.queued_at),
        "dead_at": format_time(d.dead_at),
        "reason": d.reason,
        "last_error": d.state.last_error,
    })
}
