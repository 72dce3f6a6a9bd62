//! `/api/v1/outgoing`: queue an email for the daemon to send, list and
//! read the queue, cancel one still waiting, retry one that failed.
//!
//! Errors are JSON `{"error": sentence, "code": …}`; `code` is one of
//! `invalid_request` (body is not JSON of an [`OutgoingRequest`]),
//! `invalid` (400, `problems` lists each), `unknown_mailbox` (404),
//! `not_allowed` / `answers_automatic` (409), `not_found` (404),
//! `wrong_status` (409, with the email's `status`), so a client (and
//! `crm-mailsync send`) can act on it without parsing the sentence.

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::json;
use utoipa::ToSchema;

use super::doc::ErrorBody;
use super::{limit_param, query_params, ActivityView, AdminState, ApiError};
use crate::model::{now, ActivityId, OutgoingEmail, SendStatus, SentCopy, UnixTime};
use crate::outgoing::control::{self, ControlError};
use crate::outgoing::queue::{queue, QueueError};
use crate::outgoing::{OutgoingRequest, Queued};
use crate::store::StoreError;

/// Default and largest page of `GET /api/v1/outgoing`.
const PAGE_DEFAULT: usize = 100;
const PAGE_MAX: usize = 1000;

/// A body larger than the largest message `[outgoing]` allows, base64 and
/// JSON included, is refused before it is read in full.
pub fn body_limit(cfg: &crate::config::Config) -> usize {
    // Base64 is 4/3 of the bytes; the rest is headroom for the JSON.
    let max = cfg.outgoing.max_message_bytes;
    usize::try_from(max.saturating_mul(4) / 3 + 1024 * 1024).unwrap_or(usize::MAX)
}

/// An error with a machine-readable `code` besides the sentence.
fn coded(status: StatusCode, code: &str, message: impl Into<String>) -> ApiError {
    ApiError::with(status, message, json!({ "code": code }))
}

/// What a refused request answers.
fn queue_error(e: QueueError) -> ApiError {
    match e {
        QueueError::UnknownMailbox(_) => {
            coded(StatusCode::NOT_FOUND, "unknown_mailbox", e.to_string())
        }
        QueueError::NotAllowed(_) => coded(StatusCode::CONFLICT, "not_allowed", e.to_string()),
        QueueError::AnswersAutomatic(_) => {
            coded(StatusCode::CONFLICT, "answers_automatic", e.to_string())
        }
        QueueError::Invalid(problems) => ApiError::with(
            StatusCode::BAD_REQUEST,
            format!(
                "the email is not valid, nothing was queued: {}",
                problems.join("; ")
            ),
            json!({ "code": "invalid", "problems": problems }),
        ),
        QueueError::Store(e) => coded(StatusCode::INTERNAL_SERVER_ERROR, "store", e.to_string()),
    }
}

/// What a refused cancel or retry answers.
fn control_error(e: ControlError) -> ApiError {
    match &e {
        ControlError::NotFound(_) => coded(StatusCode::NOT_FOUND, "not_found", e.to_string()),
        ControlError::WrongStatus { status, .. } => ApiError::with(
            StatusCode::CONFLICT,
            e.to_string(),
            json!({ "code": "wrong_status", "status": status }),
        ),
        ControlError::Store(_) => coded(StatusCode::INTERNAL_SERVER_ERROR, "store", e.to_string()),
    }
}

/// Runs blocking store work off the async threads; a panicked task is a 500.
async fn blocking<T, E, F>(f: F) -> Result<Result<T, E>, ApiError>
where
    T: Send + 'static,
    E: Send + 'static,
    F: FnOnce() -> Result<T, E> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::store(format!("store task failed: {e}")))
}

/// A queue row as the API shows it: every field but the MIME (which can be
/// tens of megabytes), with `mime_size` in bytes instead, and `id`.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct OutgoingView<'a> {
    /// The email's id: its activity's id.
    id: ActivityId,
    activity_id: ActivityId,
    /// Configured mailbox that sends it.
    mailbox: &'a str,
    /// The Message-ID we generated (without angle brackets).
    message_id: &'a str,
    /// SMTP `MAIL FROM`.
    envelope_from: &'a str,
    /// To, cc and bcc.
    recipients: &'a [String],
    status: SendStatus,
    /// Transactions started.
    attempts: u32,
    /// Not to be tried before this time (Unix seconds).
    next_attempt_at: UnixTime,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_error: Option<&'a str>,
    sent_copy: SentCopy,
    /// Message-IDs the server stored the Sent copy under, when it rewrote ours.
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    server_message_ids: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    idempotency_key: Option<&'a str>,
    /// The activity this one answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    in_reply_to: Option<ActivityId>,
    queued_at: UnixTime,
    #[serde(skip_serializing_if = "Option::is_none")]
    sent_at: Option<UnixTime>,
    /// When an operator last asked for a retry.
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_from: Option<UnixTime>,
    /// When a transport that confirms delivery later took the attempt.
    #[serde(skip_serializing_if = "Option::is_none")]
    accepted_at: Option<UnixTime>,
    /// The provider's id of the Sent copy, once found.
    #[serde(skip_serializing_if = "Option::is_none")]
    server_item_id: Option<&'a str>,
    /// Size of the composed message in bytes.
    mime_size: usize,
}

impl<'a> From<&'a OutgoingEmail> for OutgoingView<'a> {
    fn from(row: &'a OutgoingEmail) -> Self {
        // Every field named, so a new one cannot be left out of the API
        // unnoticed.
        let OutgoingEmail {
            activity_id,
            mailbox,
            message_id,
            envelope_from,
            recipients,
            mime,
            status,
            attempts,
            next_attempt_at,
            last_error,
            sent_copy,
            server_message_ids,
            idempotency_key,
            in_reply_to,
            queued_at,
            sent_at,
            retry_from,
            accepted_at,
            server_item_id,
        } = row;
        OutgoingView {
            id: *activity_id,
            activity_id: *activity_id,
            mailbox,
            message_id,
            envelope_from,
            recipients,
            status: *status,
            attempts: *attempts,
            next_attempt_at: *next_attempt_at,
            last_error: last_error.as_deref(),
            sent_copy: *sent_copy,
            server_message_ids,
            idempotency_key: idempotency_key.as_deref(),
            in_reply_to: *in_reply_to,
            queued_at: *queued_at,
            sent_at: *sent_at,
            retry_from: *retry_from,
            accepted_at: *accepted_at,
            server_item_id: server_item_id.as_deref(),
            mime_size: mime.len(),
        }
    }
}

/// `GET /api/v1/outgoing/{id}`'s answer: the row and its activity.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct OutgoingDetail<'a> {
    #[serde(flatten)]
    row: OutgoingView<'a>,
    /// The email's activity (with `send`: status, Dynamics status, reason).
    activity: Option<ActivityView<'a>>,
}

/// `GET /api/v1/outgoing`'s answer.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct OutgoingList<'a> {
    count: usize,
    /// `before` of the following page; `null` on the last.
    next_before: Option<ActivityId>,
    items: Vec<OutgoingView<'a>>,
}

/// Wakes the senders after an email became due.
fn wake(s: &AdminState) {
    if let Some(w) = &s.send_wakeup {
        control::wake_senders(w);
    }
}

/// `POST /api/v1/outgoing`: 202 with the [`Queued`] email, 200 when the
/// idempotency key names one queued before.
#[utoipa::path(
    post,
    path = "/outgoing",
    tag = "outgoing",
    operation_id = "queue_outgoing",
    request_body(content = OutgoingRequest, content_type = "application/json"),
    responses(
        (status = 202, description = "Queued", body = Queued),
        (status = 200, description = "The idempotency key names an email queued before (`existing: true`)", body = Queued),
        (status = 400, description = "Not JSON of a request (`invalid_request`), or an invalid email (`invalid`, `problems` lists each)", body = ErrorBody),
        (status = 404, description = "Unknown mailbox (`unknown_mailbox`)", body = ErrorBody),
        (status = 409, description = "The mailbox may not send (`not_allowed`), or the email answers automatic mail (`answers_automatic`)", body = ErrorBody),
        (status = 413, description = "A body larger than `[outgoing] max_message_bytes` allows", body = String, content_type = "text/plain"),
        (status = 500, description = "The store failed (`store`)", body = ErrorBody),
    )
)]
pub async fn queue_one(State(s): State<AdminState>, body: Bytes) -> Result<Response, ApiError> {
    let req: OutgoingRequest = serde_json::from_slice(&body).map_err(|e| {
        coded(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("the body is not valid JSON for an outgoing email: {e}"),
        )
    })?;
    let (store, cfg) = (s.store.clone(), s.config.current());
    let queued: Queued = blocking(move || queue(store.as_ref(), &cfg, &req, now()))
        .await?
        .map_err(queue_error)?;
    let status = if queued.existing {
        StatusCode::OK
    } else {
        wake(&s);
        StatusCode::ACCEPTED
    };
    Ok((status, Json(queued)).into_response())
}

/// Parses an id from the path, with a JSON 400 instead of axum's text one.
fn parse_id(text: &str) -> Result<ActivityId, ApiError> {
    text.parse().map_err(|_| {
        coded(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("{text:?} is not an outgoing email id (a whole number)"),
        )
    })
}

/// `GET /api/v1/outgoing?mailbox=&status=&before=&limit=`: newest first,
/// `next_before` for the following page.
#[utoipa::path(
    get,
    path = "/outgoing",
    tag = "outgoing",
    operation_id = "list_outgoing",
    params(
        ("mailbox" = Option<String>, Query, description = "Only this mailbox's"),
        ("status" = Option<SendStatus>, Query, description = "Only in this status"),
        ("before" = Option<u64>, Query, description = "Only ids below this (the `next_before` of the previous page)"),
        ("limit" = Option<usize>, Query, description = "At most this many (default 100, 1 to 1000)"),
    ),
    responses(
        (status = 200, description = "Queued and sent email, newest first", body = OutgoingList),
        (status = 400, description = "A malformed or unknown query parameter", body = ErrorBody),
        (status = 500, description = "The store failed", body = ErrorBody),
    )
)]
pub async fn list(
    State(s): State<AdminState>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let params = query_params(q.as_deref(), &["mailbox", "status", "before", "limit"])?;
    let limit = limit_param(&params, PAGE_DEFAULT, PAGE_MAX)?;
    let status = match params.get("status") {
        None => None,
        Some(text) => Some(SendStatus::parse(text).ok_or_else(|| {
            ApiError::bad_request(format!(
                "status must be one of pending_send, sending, sent, failed, canceled, not {text:?}"
            ))
        })?),
    };
    let before = match params.get("before") {
        None => None,
        Some(text) => Some(text.parse::<ActivityId>().map_err(|_| {
            ApiError::bad_request(format!(
                "before must be an outgoing email id (the next_before of the previous page), not {text:?}"
            ))
        })?),
    };
    let mailbox = params.get("mailbox").cloned();
    let store = s.store.clone();
    let rows = blocking(move || store.outgoing_list(mailbox.as_deref(), status, before, limit))
        .await?
        .map_err(ApiError::store)?;
    let next = (rows.len() == limit)
        .then(|| rows.last().map(|r| r.activity_id))
        .flatten();
    let items: Vec<_> = rows.iter().map(OutgoingView::from).collect();
    Ok(Json(OutgoingList {
        count: items.len(),
        next_before: next,
        items,
    })
    .into_response())
}

/// `GET /api/v1/outgoing/{id}`: the row (without MIME) and its activity.
#[utoipa::path(
    get,
    path = "/outgoing/{id}",
    tag = "outgoing",
    operation_id = "get_outgoing",
    params(("id" = u64, Path, description = "The outgoing email's id")),
    responses(
        (status = 200, description = "The email and its activity", body = OutgoingDetail),
        (status = 400, description = "The id is not a whole number (`invalid_request`)", body = ErrorBody),
        (status = 404, description = "No such email (`not_found`)", body = ErrorBody),
        (status = 500, description = "The store failed", body = ErrorBody),
    )
)]
pub async fn get_one(
    State(s): State<AdminState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let store = s.store.clone();
    let (row, activity) = blocking(move || {
        let Some(row) = store.outgoing(id)? else {
            return Ok((None, None));
        };
        Ok::<_, StoreError>((Some(row), store.activity(id)?))
    })
    .await?
    .map_err(ApiError::store)?;
    let Some(row) = row else {
        return Err(control_error(ControlError::NotFound(id)));
    };
    Ok(Json(OutgoingDetail {
        row: OutgoingView::from(&row),
        activity: activity.as_ref().map(ActivityView::from),
    })
    .into_response())
}

/// `POST /api/v1/outgoing/{id}/cancel`: only an email still `pending_send`.
#[utoipa::path(
    post,
    path = "/outgoing/{id}/cancel",
    tag = "outgoing",
    operation_id = "cancel_outgoing",
    params(("id" = u64, Path, description = "The outgoing email's id")),
    responses(
        (status = 200, description = "Canceled", body = OutgoingView),
        (status = 400, description = "The id is not a whole number (`invalid_request`)", body = ErrorBody),
        (status = 404, description = "No such email (`not_found`)", body = ErrorBody),
        (status = 409, description = "Not `pending_send` (`wrong_status`, with its `status`)", body = ErrorBody),
        (status = 500, description = "The store failed (`store`)", body = ErrorBody),
    )
)]
pub async fn cancel(
    State(s): State<AdminState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let store = s.store.clone();
    let row = blocking(move || control::cancel(store.as_ref(), id, now()))
        .await?
        .map_err(control_error)?;
    Ok(Json(OutgoingView::from(&row)).into_response())
}

/// `POST /api/v1/outgoing/{id}/retry`: only a `failed` email, sent again
/// at once.
#[utoipa::path(
    post,
    path = "/outgoing/{id}/retry",
    tag = "outgoing",
    operation_id = "retry_outgoing",
    params(("id" = u64, Path, description = "The outgoing email's id")),
    responses(
        (status = 200, description = "Pending again, to be sent at once", body = OutgoingView),
        (status = 400, description = "The id is not a whole number (`invalid_request`)", body = ErrorBody),
        (status = 404, description = "No such email (`not_found`)", body = ErrorBody),
        (status = 409, description = "Not `failed` (`wrong_status`, with its `status`)", body = ErrorBody),
        (status = 500, description = "The store failed (`store`)", body = ErrorBody),
    )
)]
pub async fn retry(
    State(s): State<AdminState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let store = s.store.clone();
    let row = blocking(move || control::retry(store.as_ref(), id, now()))
        .await?
        .map_err(control_error)?;
    wake(&s);
    Ok(Json(OutgoingView::from(&row)).into_response())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::outgoing::control::test_support::queue_row;
    use crate::scheduler::Runtime;
    use crate::store::{SledStore, Store};

    const TOKEN: &str = "0123456789abcdef";

    /// `support` may send (imap_smtp, server-side sync, approved);
    /// `archive` may not (outgoing none).
    fn config(dir: &std::path::Path) -> crate::config::Config {
        let text = format!(
            r#"
            [daemon]
            state_dir = "{}"
            [admin]
            token = "{TOKEN}"
            [[profiles]]
            name = "mail"
            type = "imap_smtp"
            host = "mail.example.test"
            [[mailboxes]]
            name = "support"
            profile = "mail"
            email = "support@example.test"
            username = "support"
            password = "secret"
            approval = "approved"
            outgoing = "server_side_sync"
            [[mailboxes]]
            name = "archive"
            profile = "mail"
            email = "archive@example.test"
            username = "archive"
            password = "secret"
            approval = "approved"
            "#,
            dir.display()
        );
        crate::config::from_toml_str(&text, Vec::new(), dir).unwrap()
    }

    struct Api {
        _dir: tempfile::TempDir,
        store: Arc<SledStore>,
        wakeup: crate::outgoing::SendWakeup,
        base: String,
        server: tokio::task::JoinHandle<()>,
    }

    impl Drop for Api {
        fn drop(&mut self) {
            self.server.abort();
        }
    }

    async fn api() -> Api {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SledStore::open(&dir.path().join("store")).unwrap());
        let wakeup: crate::outgoing::SendWakeup = Arc::new(tokio::sync::Notify::new());
        let state = AdminState {
            config: config(dir.path()).into(),
            store: store.clone(),
            runtime: Arc::new(Runtime::default()),
            prometheus: None,
            shutdown: CancellationToken::new(),
            send_wakeup: Some(wakeup.clone()),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            axum::serve(listener, crate::admin::router(state))
                .await
                .unwrap();
        });
        Api {
            _dir: dir,
            store,
            wakeup,
            base: format!("http://127.0.0.1:{port}/api/v1"),
            server,
        }
    }

    impl Api {
        async fn call(
            &self,
            method: reqwest::Method,
            path: &str,
            body: Option<&str>,
        ) -> (u16, serde_json::Value) {
            let mut req = reqwest::Client::new()
                .request(method, format!("{}{path}", self.base))
                .bearer_auth(TOKEN);
            if let Some(b) = body {
                req = req
                    .header("content-type", "application/json")
                    .body(b.to_string());
            }
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            let text = resp.text().await.unwrap();
            let json = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{status} {path}: not JSON ({e}): {text}"));
            (status, json)
        }

        async fn get(&self, path: &str) -> (u16, serde_json::Value) {
            self.call(reqwest::Method::GET, path, None).await
        }

        async fn post(&self, path: &str, body: &str) -> (u16, serde_json::Value) {
            self.call(reqwest::Method::POST, path, Some(body)).await
        }

        /// Whether a wake-up was left for the senders.
        async fn woken(&self) -> bool {
            tokio::time::timeout(
                std::time::Duration::from_millis(200),
                self.wakeup.notified(),
            )
            .await
            .is_ok()
        }
    }

    fn error_of(body: &serde_json::Value) -> &str {
        body["error"].as_str().unwrap_or_default()
    }

    #[test]
    fn every_queue_error_has_its_status_and_code() {
        let cases = [
            (
                QueueError::UnknownMailbox("x".into()),
                404,
                "unknown_mailbox",
            ),
            (
                QueueError::NotAllowed("not approved".into()),
                409,
                "not_allowed",
            ),
            (QueueError::AnswersAutomatic(3), 409, "answers_automatic"),
            (
                QueueError::Invalid(vec!["no recipient".into(), "no subject".into()]),
                400,
                "invalid",
            ),
            (
                QueueError::Store(StoreError::Io("disk".into())),
                500,
                "store",
            ),
        ];
        for (e, status, code) in cases {
            let api = queue_error(e);
            assert_eq!(api.status.as_u16(), status);
            assert_eq!(api.body["code"], code, "{:?}", api.body);
        }
        let invalid = queue_error(QueueError::Invalid(vec!["a".into(), "b".into()]));
        assert!(
            error_of(&invalid.body).ends_with("a; b"),
            "{:?}",
            invalid.body
        );
        assert_eq!(invalid.body["problems"], json!(["a", "b"]));
    }

    #[tokio::test]
    async fn a_body_that_is_not_a_request_is_a_400_with_serdes_message() {
        let api = api().await;
        let (status, body) = api.post("/outgoing", "{not json").await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["code"], "invalid_request");
        assert!(error_of(&body).contains("line 1 column 2"), "{body}");
        let (status, body) = api
            .post(
                "/outgoing",
                r#"{"mailbox": "support", "too": ["x@example.com"]}"#,
            )
            .await;
        assert_eq!(status, 400, "{body}");
        assert!(error_of(&body).contains("unknown field `too`"), "{body}");
        assert!(!api.woken().await);
    }

    #[tokio::test]
    async fn the_api_needs_the_token() {
        let api = api().await;
        let resp = reqwest::Client::new()
            .get(format!("{}/outgoing", api.base))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 401);
    }

    #[tokio::test]
    async fn list_is_newest_first_without_mime_and_filters() {
        let api = api().await;
        let a = queue_row(api.store.as_ref(), "support", SendStatus::PendingSend);
        let b = queue_row(api.store.as_ref(), "support", SendStatus::Failed);
        let c = queue_row(api.store.as_ref(), "archive", SendStatus::Sent);
        let (status, body) = api.get("/outgoing").await;
        assert_eq!(status, 200, "{body}");
        let ids: Vec<u64> = body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["id"].as_u64().unwrap())
            .collect();
        assert_eq!(ids, vec![c, b, a]);
        let first = &body["items"][0];
        assert!(first.get("mime").is_none(), "{first}");
        assert_eq!(first["mime_size"], "Subject: x\r\n\r\nbody\r\n".len());
        assert_eq!(first["status"], "sent");

        let (_, body) = api.get("/outgoing?mailbox=support&status=failed").await;
        assert_eq!(body["count"], 1, "{body}");
        assert_eq!(body["items"][0]["id"], b);
        let (_, body) = api.get(&format!("/outgoing?before={c}&limit=1")).await;
        assert_eq!(body["items"][0]["id"], b, "{body}");
        assert_eq!(body["next_before"], b);

        let (status, body) = api.get("/outgoing?status=queued").await;
        assert_eq!(status, 400);
        assert!(error_of(&body).contains("pending_send, sending"), "{body}");
        for bad in [
            "/outgoing?before=x",
            "/outgoing?limit=0",
            "/outgoing?page=2",
        ] {
            let (status, body) = api.get(bad).await;
            assert_eq!(status, 400, "{bad}: {body}");
        }
    }

    #[tokio::test]
    async fn one_email_with_its_activity_or_404() {
        let api = api().await;
        let id = queue_row(api.store.as_ref(), "support", SendStatus::PendingSend);
        let (status, body) = api.get(&format!("/outgoing/{id}")).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["id"], id);
        assert!(body.get("mime").is_none());
        assert_eq!(body["activity"]["id"], id);
        assert_eq!(body["activity"]["send"]["status"], "pending_send");
        assert_eq!(body["activity"]["send"]["dynamics_statuscode"], 6);
        let (status, body) = api.get("/outgoing/424242").await;
        assert_eq!((status, body["code"].as_str()), (404, Some("not_found")));
        let (status, body) = api.get("/outgoing/abc").await;
        assert_eq!(status, 400, "{body}");
    }

    #[tokio::test]
    async fn cancel_and_retry_answer_200_404_and_409() {
        let api = api().await;
        let pending = queue_row(api.store.as_ref(), "support", SendStatus::PendingSend);
        let failed = queue_row(api.store.as_ref(), "support", SendStatus::Failed);

        let (status, body) = api.post(&format!("/outgoing/{pending}/cancel"), "").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["status"], "canceled");
        let (status, body) = api.post(&format!("/outgoing/{pending}/cancel"), "").await;
        assert_eq!(status, 409, "{body}");
        assert_eq!(body["code"], "wrong_status");
        assert_eq!(body["status"], "canceled");
        assert!(
            error_of(&body)
                .contains("is canceled; only an email still pending_send can be canceled"),
            "{body}"
        );
        let (status, body) = api.post(&format!("/outgoing/{pending}/retry"), "").await;
        assert_eq!(status, 409, "{body}");
        assert!(
            error_of(&body).contains("only a failed email can be retried"),
            "{body}"
        );
        assert!(!api.woken().await);

        let (status, body) = api.post(&format!("/outgoing/{failed}/retry"), "").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["status"], "pending_send");
        assert_eq!(body["attempts"], 1);
        assert!(api.woken().await, "a retried email wakes the senders");
        let (status, _) = api.post(&format!("/outgoing/{failed}/retry"), "").await;
        assert_eq!(status, 409);

        for action in ["cancel", "retry"] {
            let (status, body) = api.post(&format!("/outgoing/99999/{action}"), "").await;
            assert_eq!(status, 404, "{action}: {body}");
            assert!(
                error_of(&body).contains("no outgoing email 99999"),
                "{body}"
            );
        }
    }

    /// An incoming automatic email (an auto-reply) in the store.
    fn automatic_activity(store: &SledStore) -> u64 {
        let id = queue_row(store, "support", SendStatus::Sent);
        let mut a = store.activity(id).unwrap().unwrap();
        a.no_reply = true;
        a.send = None;
        a.direction = crate::model::Direction::Incoming;
        store.update_activity(a, vec!["test".into()], 1).unwrap();
        id
    }

    #[tokio::test]
    async fn queueing_answers_202_then_200_for_the_same_key_and_wakes_the_senders() {
        let api = api().await;
        let req = r#"{"mailbox": "support", "regarding": "case:42", "to": ["ann@customer.example"],
            "subject": "Your offer", "text": "Hello Ann", "idempotency_key": "crm-email-1"}"#;
        let (status, first) = api.post("/outgoing", req).await;
        assert_eq!(status, 202, "{first}");
        assert_eq!(first["status"], "pending_send");
        assert_eq!(first["existing"], false);
        assert!(api.woken().await, "a queued email wakes the senders");
        let id = first["id"].as_u64().unwrap();
        let (status, again) = api.post("/outgoing", req).await;
        assert_eq!(status, 200, "{again}");
        assert_eq!(again["id"], id);
        assert_eq!(again["existing"], true);
        assert_eq!(again["message_id"], first["message_id"]);

        let (status, row) = api.get(&format!("/outgoing/{id}")).await;
        assert_eq!(status, 200, "{row}");
        assert_eq!(row["activity"]["regarding"], "case:42", "{row}");
        assert!(row["mime_size"].as_u64().unwrap() > 0);
        let (_, list) = api.get("/outgoing?status=pending_send").await;
        assert_eq!(list["count"], 1, "{list}");
    }

    #[tokio::test]
    async fn refused_requests_answer_404_409_and_400_and_queue_nothing() {
        let api = api().await;
        let auto = automatic_activity(&api.store);
        let (status, body) = api
            .post(
                "/outgoing",
                r#"{"mailbox": "nobody", "to": ["a@b.example"], "subject": "s"}"#,
            )
            .await;
        assert_eq!(
            (status, body["code"].as_str()),
            (404, Some("unknown_mailbox")),
            "{body}"
        );
        assert!(error_of(&body).contains("\"nobody\""), "{body}");
        let (status, body) = api
            .post(
                "/outgoing",
                r#"{"mailbox": "archive", "to": ["a@b.example"], "subject": "s"}"#,
            )
            .await;
        assert_eq!(
            (status, body["code"].as_str()),
            (409, Some("not_allowed")),
            "{body}"
        );
        let (status, body) = api
            .post(
                "/outgoing",
                &format!(r#"{{"mailbox": "support", "to": ["a@b.example"], "subject": "Re", "text": "x", "in_reply_to": {auto}}}"#),
            )
            .await;
        assert_eq!(
            (status, body["code"].as_str()),
            (409, Some("answers_automatic")),
            "{body}"
        );
        let (status, body) = api
            .post(
                "/outgoing",
                r#"{"mailbox": "support", "to": ["not an address"],
                    "attachments": [{"filename": "run.exe", "content_base64": "TVo="}]}"#,
            )
            .await;
        assert_eq!(
            (status, body["code"].as_str()),
            (400, Some("invalid")),
            "{body}"
        );
        let problems = body["problems"].as_array().unwrap();
        assert!(
            problems.len() >= 3,
            "address, subject/body, blocked extension: {body}"
        );
        for p in problems {
            assert!(error_of(&body).contains(p.as_str().unwrap()), "{body}");
        }
        assert!(!api.woken().await);
        // Only the automatic email's own row (written by the test) is there.
        assert_eq!(
            api.store.outgoing_list(None, None, None, 0).unwrap().len(),
            1
        );
    }
}
