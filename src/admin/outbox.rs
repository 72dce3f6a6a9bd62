//! `/api/v1/outbox`: what is waiting for the CRM adapter, and what it gave
//! up on.

use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::doc::ErrorBody;
use super::{blocking, limit_param, query_params, AdminState, ApiError};
use crate::model::{format_time, now, ActivityId, DeadLetter, UnixTime};

/// The outbox consumers of this configuration: the `[crm]` adapter, if it
/// has an outbox (builtin has none: its events are only in the pull feed).
fn consumers(s: &AdminState) -> Vec<String> {
    s.config
        .current()
        .crm
        .kind
        .consumer()
        .map(str::to_string)
        .into_iter()
        .collect()
}

/// One outbox consumer's state.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct ConsumerView {
    consumer: String,
    /// Undelivered events.
    depth: u64,
    /// When the oldest undelivered event was committed (RFC 3339).
    oldest_queued_at: Option<String>,
    /// Its age in seconds.
    oldest_age_secs: Option<UnixTime>,
    /// Events given up on.
    dead_letters: u64,
}

/// `GET /api/v1/outbox`'s answer.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct OutboxOverview {
    consumers: Vec<ConsumerView>,
    /// Set when there is no consumer (the builtin adapter has no outbox).
    note: Option<&'static str>,
}

/// `GET /api/v1/outbox`: per consumer, how many events are undelivered, the
/// age of the oldest, and how many were dead-lettered.
#[utoipa::path(
    get,
    path = "/outbox",
    tag = "outbox",
    operation_id = "outbox_overview",
    responses(
        (status = 200, description = "Per consumer: depth, oldest event, dead letters", body = OutboxOverview),
        (status = 500, description = "The store failed", body = ErrorBody),
    )
)]
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
    let consumers: Vec<_> = stats
        .into_iter()
        .map(|(consumer, st)| ConsumerView {
            consumer,
            depth: st.depth,
            oldest_queued_at: st.oldest_queued_at.map(format_time),
            oldest_age_secs: st.oldest_queued_at.map(|q| (at - q).max(0)),
            dead_letters: st.dead_letters,
        })
        .collect();
    let note = consumers
        .is_empty()
        .then_some("the builtin adapter has no outbox: events are read from /api/v1/events");
    Ok(Json(OutboxOverview { consumers, note }).into_response())
}

/// `GET /api/v1/outbox/{consumer}/dead-letters?limit=`: dead letters of one
/// consumer, oldest first.
#[utoipa::path(
    get,
    path = "/outbox/{consumer}/dead-letters",
    tag = "outbox",
    operation_id = "list_dead_letters",
    params(
        ("consumer" = String, Path, description = "Outbox consumer (the `[crm]` adapter's name, e.g. `webhook`, `dataverse`)"),
        ("limit" = Option<usize>, Query, description = "At most this many (default 100, 1 to 10,000)"),
    ),
    responses(
        (status = 200, description = "Dead letters, oldest first", body = DeadLetterList),
        (status = 400, description = "A malformed or unknown query parameter", body = ErrorBody),
        (status = 404, description = "No such consumer", body = ErrorBody),
        (status = 500, description = "The store failed", body = ErrorBody),
    )
)]
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
    let dead_letters: Vec<_> = list.iter().map(DeadLetterView::from).collect();
    Ok(Json(DeadLetterList {
        consumer,
        count: dead_letters.len(),
        dead_letters,
    })
    .into_response())
}

/// `GET /api/v1/outbox/{consumer}/dead-letters`'s answer.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct DeadLetterList<'a> {
    consumer: String,
    count: usize,
    dead_letters: Vec<DeadLetterView<'a>>,
}

/// A dead letter with its times as RFC 3339.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct DeadLetterView<'a> {
    consumer: &'a str,
    seq: u64,
    /// The event's stable id (`evt_<seq>`).
    event_id: String,
    activity_id: ActivityId,
    attempts: u32,
    /// When the event was committed (RFC 3339).
    queued_at: String,
    /// When it was given up on (RFC 3339).
    dead_at: String,
    reason: &'a str,
    last_error: Option<&'a str>,
}

impl<'a> From<&'a DeadLetter> for DeadLetterView<'a> {
    fn from(d: &'a DeadLetter) -> Self {
        DeadLetterView {
            consumer: &d.consumer,
            seq: d.state.seq,
            event_id: crate::model::OutboxEvent::id_for(d.state.seq),
            activity_id: d.state.activity_id,
            attempts: d.state.attempts,
            queued_at: format_time(d.state.queued_at),
            dead_at: format_time(d.dead_at),
            reason: &d.reason,
            last_error: d.state.last_error.as_deref(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::model::{CorrelationMethod, Direction, EmailActivity, SourceKey};
    use crate::scheduler::Runtime;
    use crate::store::{CommitBatch, DeliveryOutcome, PendingItem, SledStore, Store};

    const TOKEN: &str = "0123456789abcdef";

    fn activity(uid: &str) -> EmailActivity {
        EmailActivity {
            id: 0,
            mailbox: "support".into(),
            source: SourceKey {
                mailbox: "support".into(),
                folder: "INBOX".into(),
                uidvalidity: 1,
                uid: uid.into(),
            },
            message_ids: vec![format!("<{uid}@outbox.test>")],
            in_reply_to: vec![],
            references: vec![],
            direction: Direction::Incoming,
            subject: format!("message {uid}"),
            from: vec!["a@customer.example".into()],
            to: vec!["support@example.test".into()],
            cc: vec![],
            sent_at: None,
            received_at: 1_767_000_000,
            regarding: None,
            method: CorrelationMethod::None,
            score: 0.0,
            reasons: vec![],
            correlated_with: None,
            content_hash: format!("hash-{uid}"),
            size: 1,
            also_seen_as: vec![],
            forwarded_by: None,
            automatic: None,
            no_reply: false,
            parties: vec![],
            send: None,
        }
    }

    /// A webhook configuration (the adapter itself is not needed to look at
    /// its outbox).
    fn webhook_config(dir: &Path) -> crate::config::Config {
        let secret = dir.join("webhook.secret");
        std::fs::write(&secret, "whsec_c2VjcmV0LXNlY3JldC1zZWNyZXQ=\n").unwrap();
        let text = format!(
            r#"
            [admin]
            token = "{TOKEN}"
            [crm]
            type = "webhook"
            url = "http://127.0.0.1:9/events"
            secret_file = "{}"
            [[profiles]]
            name = "local"
            type = "maildir"
            [[mailboxes]]
            name = "support"
            profile = "local"
            email = "support@example.test"
            path = "fixtures/demo-maildir"
            "#,
            secret.display()
        );
        crate::config::from_toml_str(&text, Vec::new(), dir).unwrap()
    }

    async fn get(port: u16, path: &str) -> (u16, serde_json::Value) {
        let resp = reqwest::Client::new()
            .get(format!("http://127.0.0.1:{port}{path}"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap())
    }

    #[tokio::test]
    async fn outbox_views_show_depth_age_and_dead_letters() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SledStore::open(&dir.path().join("store")).unwrap());
        store.set_outbox_consumers(vec!["webhook".into()]);
        for uid in ["1", "2", "3"] {
            store
                .commit(CommitBatch {
                    items: vec![PendingItem::Activity(Box::new(activity(uid)))],
                    ..Default::default()
                })
                .unwrap();
        }
        let pending = store.pending_deliveries("webhook", 0).unwrap();
        assert_eq!(pending.len(), 3);
        store
            .finish_delivery(
                "webhook",
                DeliveryOutcome::Delivered {
                    seq: pending[0].seq,
                    activity_id: pending[0].activity_id,
                    crm_id: None,
                },
            )
            .unwrap();
        let mut dead = pending[1].clone();
        dead.attempts = 7;
        dead.last_error = Some("410 Gone".into());
        store
            .finish_delivery(
                "webhook",
                DeliveryOutcome::DeadLetter(DeadLetter {
                    consumer: "webhook".into(),
                    state: dead,
                    dead_at: now(),
                    reason: "the endpoint is gone (410)".into(),
                }),
            )
            .unwrap();

        let state = AdminState {
            config: webhook_config(dir.path()).into(),
            store: store.clone(),
            runtime: Arc::new(Runtime::default()),
            prometheus: None,
            shutdown: CancellationToken::new(),
            send_wakeup: None,
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            axum::serve(listener, crate::admin::router(state))
                .await
                .unwrap();
        });

        let (status, overview) = get(port, "/api/v1/outbox").await;
        assert_eq!(status, 200, "{overview}");
        let consumers = overview["consumers"].as_array().unwrap();
        assert_eq!(consumers.len(), 1, "{overview}");
        let webhook = &consumers[0];
        assert_eq!(webhook["consumer"], "webhook");
        assert_eq!(webhook["depth"], 1, "{overview}");
        assert_eq!(webhook["dead_letters"], 1, "{overview}");
        assert_eq!(
            webhook["oldest_queued_at"],
            format_time(pending[2].queued_at)
        );
        assert!(webhook["oldest_age_secs"].as_i64().unwrap() >= 0);

        let (status, letters) = get(port, "/api/v1/outbox/webhook/dead-letters").await;
        assert_eq!(status, 200, "{letters}");
        assert_eq!(letters["count"], 1);
        let d = &letters["dead_letters"][0];
        assert_eq!(d["seq"], pending[1].seq);
        assert_eq!(d["event_id"], format!("evt_{}", pending[1].seq));
        assert_eq!(d["attempts"], 7);
        assert_eq!(d["last_error"], "410 Gone");
        assert_eq!(d["reason"], "the endpoint is gone (410)");

        let (status, unknown) = get(port, "/api/v1/outbox/dataverse/dead-letters").await;
        assert_eq!(status, 404);
        assert!(
            unknown["error"]
                .as_str()
                .unwrap()
                .contains("configured: webhook"),
            "{unknown}"
        );
        let (status, _) = get(port, "/api/v1/outbox/webhook/dead-letters?limit=0").await;
        assert_eq!(status, 400);
        server.abort();
    }
}
