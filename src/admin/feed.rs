//! `/api/v1/events`: the durable event log as a pull feed, for CRMs that
//! prefer to pull rather than receive webhooks.
//!
//! The cursor is the event `seq` (1, 2, 3, … in commit order, never reused),
//! so a client that keeps the last `next_cursor` resumes exactly where it
//! stopped, across its own restarts and the daemon's.
//!
//! Only events the store has made durable are served: the store's event
//! watch ([`crate::store::Store::watch_events`]) is advanced after the
//! commit's flush, and the feed never answers past it. An event a crash
//! could still take back (applied, not yet flushed, its seq to be reused by
//! the re-done commit) is therefore never seen by a client.

use std::time::Duration;

use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::json;
use utoipa::ToSchema;

use super::doc::ErrorBody;
use super::{blocking, limit_param, query_params, AdminState, ApiError};
use crate::model::OutboxEvent;

/// Default and largest number of events per answer.
const LIMIT_DEFAULT: usize = 100;
const LIMIT_MAX: usize = 1000;

/// Longest long-poll a client may ask for (a proxy in between may cut a
/// request held much longer).
pub const MAX_WAIT: Duration = Duration::from_secs(60);

/// `after=`: a cursor (an event seq; 0 = from the start).
fn cursor_param(text: Option<&String>) -> Result<u64, ApiError> {
    let Some(text) = text else {
        return Ok(0);
    };
    text.parse::<u64>().map_err(|_| {
        ApiError::bad_request(
            format!("after must be a cursor: 0 or the next_cursor of a previous answer (a whole number), not {text:?}"),
        )
    })
}

/// `wait=`: how long to hold the request when nothing is new, as a
/// duration (`30s`, `1m`; a bare number is seconds), at most [`MAX_WAIT`].
fn wait_param(text: Option<&String>) -> Result<Duration, ApiError> {
    let Some(text) = text else {
        return Ok(Duration::ZERO);
    };
    let parsed = if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        text.parse::<u64>().ok().map(Duration::from_secs)
    } else {
        humantime::parse_duration(text).ok()
    };
    match parsed {
        Some(d) if d <= MAX_WAIT => Ok(d),
        Some(_) => Err(ApiError::bad_request(format!(
            "wait={text} is longer than the longest long-poll, {}",
            humantime::format_duration(MAX_WAIT)
        ))),
        None => Err(ApiError::bad_request(format!(
            "wait must be a duration such as 30s or 1m (at most 60s), not {text:?}"
        ))),
    }
}

/// A page of the feed.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct EventPage {
    /// Events with `seq > after`, oldest first.
    events: Vec<OutboxEvent>,
    /// The `after` of the next request: the last event's seq, or `after`
    /// again when there is none.
    next_cursor: u64,
}

/// `GET /api/v1/events?after=CURSOR&limit=N&wait=30s`: events with
/// `seq > after`, in order, at most `limit`; `next_cursor` is the last one's
/// seq (or `after` when there is none). With `wait` and nothing new, the
/// request is held until an event is committed, the wait is over or the
/// daemon shuts down (then: no events, the same cursor).
#[utoipa::path(
    get,
    path = "/events",
    tag = "events",
    operation_id = "list_events",
    params(
        ("after" = Option<u64>, Query, description = "Cursor: 0 (the default) or the `next_cursor` of a previous answer"),
        ("limit" = Option<usize>, Query, description = "At most this many events (default 100, 1 to 1000)"),
        ("wait" = Option<String>, Query, description = "Long-poll: hold the request this long when nothing is new, a duration such as `30s` or `1m` (a bare number is seconds), at most 60s"),
    ),
    responses(
        (status = 200, description = "The events after the cursor (none when the wait ran out)", body = EventPage),
        (status = 400, description = "A malformed or unknown query parameter", body = ErrorBody),
        (status = 409, description = "The cursor is past the newest event (`last_seq` says which that is)", body = ErrorBody),
        (status = 500, description = "The store failed", body = ErrorBody),
    )
)]
pub async fn events(
    State(s): State<AdminState>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let params = query_params(q.as_deref(), &["after", "limit", "wait"])?;
    let after = cursor_param(params.get("after"))?;
    let limit = limit_param(&params, LIMIT_DEFAULT, LIMIT_MAX)?;
    let wait = wait_param(params.get("wait"))?;
    // Subscribed before the first look, so a commit between the look and
    // the wait still wakes us.
    let mut durable = s.store.watch_events();
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let newest = *durable.borrow_and_update();
        if after > newest {
            return Err(ApiError::with(
                StatusCode::CONFLICT,
                format!("cursor {after} is past the newest event ({newest}): was the store replaced? Start again from 0"),
                json!({"last_seq": newest}),
            ));
        }
        if newest > after {
            let store = s.store.clone();
            let mut list = blocking(move || store.events_after(after, limit)).await?;
            list.retain(|e| e.seq <= newest);
            if let Some(last) = list.last() {
                let next_cursor = last.seq;
                return Ok(Json(EventPage {
                    events: list,
                    next_cursor,
                })
                .into_response());
            }
        }
        if wait.is_zero() || tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::select! {
            changed = durable.changed() => {
                // The store is gone (shutting down): answer what we have.
                if changed.is_err() {
                    break;
                }
            }
            _ = tokio::time::sleep_until(deadline) => break,
            _ = s.shutdown.cancelled() => break,
        }
    }
    Ok(Json(EventPage {
        events: Vec::new(),
        next_cursor: after,
    })
    .into_response())
}

/// `GET /api/v1/events/{seq}`: one event.
#[utoipa::path(
    get,
    path = "/events/{seq}",
    tag = "events",
    operation_id = "get_event",
    params(("seq" = u64, Path, description = "The event's seq")),
    responses(
        (status = 200, description = "The event", body = OutboxEvent),
        (status = 400, description = "The seq is not a whole number", body = ErrorBody),
        (status = 404, description = "No such (durable) event", body = ErrorBody),
        (status = 500, description = "The store failed", body = ErrorBody),
    )
)]
pub async fn event(
    State(s): State<AdminState>,
    Path(seq): Path<String>,
) -> Result<Response, ApiError> {
    let Ok(seq) = seq.parse::<u64>() else {
        return Err(ApiError::bad_request(format!(
            "an event is named by its seq, a whole number, not {seq:?}"
        )));
    };
    let newest = *s.store.watch_events().borrow();
    let store = s.store.clone();
    match blocking(move || store.event(seq)).await? {
        Some(e) if e.seq <= newest => Ok(Json(e).into_response()),
        _ => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no event {seq}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_and_wait_are_parsed_strictly() {
        let s = |v: &str| Some(v.to_string());
        assert_eq!(cursor_param(None).ok(), Some(0));
        assert_eq!(cursor_param(s("42").as_ref()).ok(), Some(42));
        for bad in ["-1", "x", "", "1.5", "evt_3"] {
            assert!(cursor_param(s(bad).as_ref()).is_err(), "{bad}");
        }
        assert_eq!(wait_param(None).ok(), Some(Duration::ZERO));
        assert_eq!(
            wait_param(s("30s").as_ref()).ok(),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            wait_param(s("1m").as_ref()).ok(),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            wait_param(s("5").as_ref()).ok(),
            Some(Duration::from_secs(5))
        );
        for bad in ["61s", "2m", "soon", "", "-3s"] {
            assert!(wait_param(s(bad).as_ref()).is_err(), "{bad}");
        }
    }
}
