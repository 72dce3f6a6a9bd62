//! Mailboxes and profiles: the live view, enabling, the profile list.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::{doc, AdminState, ApiError};
use crate::scheduler::EnableError;

/// `GET /api/v1/mailboxes`'s answer.
#[derive(Debug, Serialize, ToSchema)]
struct MailboxList {
    mailboxes: Vec<crate::scheduler::LiveMailbox>,
}

/// `GET /api/v1/mailboxes`: every configured mailbox's live state.
#[utoipa::path(
    get,
    path = "/mailboxes",
    tag = "mailboxes",
    operation_id = "list_mailboxes",
    responses((status = 200, description = "Every mailbox: phase, backlog, Test & Enable results, counters, last error", body = MailboxList))
)]
pub(super) async fn list(State(s): State<AdminState>) -> Response {
    Json(MailboxList {
        mailboxes: live_mailboxes(&s),
    })
    .into_response()
}

/// `GET /api/v1/mailboxes/{name}`: one mailbox.
#[utoipa::path(
    get,
    path = "/mailboxes/{name}",
    tag = "mailboxes",
    operation_id = "get_mailbox",
    params(("name" = String, Path, description = "Mailbox name as configured")),
    responses(
        (status = 200, description = "The mailbox", body = crate::scheduler::LiveMailbox),
        (status = 404, description = "No such mailbox", body = doc::ErrorBody),
    )
)]
pub(super) async fn get_one(State(s): State<AdminState>, Path(name): Path<String>) -> Response {
    match live_mailboxes(&s).into_iter().find(|m| m.name == name) {
        Some(m) => Json(m).into_response(),
        None => {
            ApiError::new(StatusCode::NOT_FOUND, format!("no mailbox {name:?}")).into_response()
        }
    }
}

/// The mailbox tasks' live view, with the outgoing Test & Enable result the
/// senders record in the store (the mailbox task does not know it), and the
/// on-demand test's incoming and ACT results where they are later than the
/// task's own.
pub(super) fn live_mailboxes(s: &AdminState) -> Vec<crate::scheduler::LiveMailbox> {
    let mut list = s.runtime.snapshot();
    for m in &mut list {
        if let Ok(Some(stored)) = s.store.mailbox_state(&m.name) {
            m.state.outgoing_test = stored.outgoing_test;
            for (live, kept) in [
                (&mut m.state.incoming_test, stored.incoming_test),
                (&mut m.state.act_test, stored.act_test),
            ] {
                if kept.completed_on > live.completed_on {
                    *live = kept;
                }
            }
        }
    }
    list
}

/// What `POST /api/v1/mailboxes/{name}/enable` started.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
enum EnableStatus {
    Enabling,
}

/// `POST /api/v1/mailboxes/{name}/enable`'s answer.
#[derive(Debug, Serialize, ToSchema)]
struct EnableAccepted {
    status: EnableStatus,
    mailbox: String,
}

/// `POST /api/v1/mailboxes/{name}/enable`: re-runs Test & Enable on a
/// mailbox a permanent error disabled.
#[utoipa::path(
    post,
    path = "/mailboxes/{name}/enable",
    tag = "mailboxes",
    operation_id = "enable_mailbox",
    params(("name" = String, Path, description = "Mailbox name as configured")),
    responses(
        (status = 202, description = "Test & Enable runs again", body = EnableAccepted),
        (status = 404, description = "No such mailbox", body = doc::ErrorBody),
        (status = 409, description = "The mailbox is not disabled, or is disabled in the configuration", body = doc::ErrorBody),
    )
)]
pub(super) async fn enable(State(s): State<AdminState>, Path(name): Path<String>) -> Response {
    match s.runtime.request_enable(&name) {
        Ok(()) => (
            StatusCode::ACCEPTED,
            Json(EnableAccepted {
                status: EnableStatus::Enabling,
                mailbox: name,
            }),
        )
            .into_response(),
        Err(e) => {
            let status = match e {
                EnableError::Unknown(_) => StatusCode::NOT_FOUND,
                EnableError::DisabledByConfig(_) | EnableError::NotDisabled { .. } => {
                    StatusCode::CONFLICT
                }
            };
            ApiError::new(status, e.to_string()).into_response()
        }
    }
}

/// A server profile as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
struct ProfileView {
    name: String,
    #[serde(rename = "type")]
    kind: crate::model::ProfileType,
    host: Option<String>,
    port: Option<u16>,
    tls: crate::net::TlsMode,
    poll_interval_secs: u64,
    max_concurrent_connections: u16,
    /// The mailboxes that use this profile.
    mailboxes: Vec<String>,
}

/// `GET /api/v1/profiles`'s answer.
#[derive(Debug, Serialize, ToSchema)]
struct ProfileList {
    profiles: Vec<ProfileView>,
}

/// `GET /api/v1/profiles`: server profiles and their mailboxes.
#[utoipa::path(
    get,
    path = "/profiles",
    tag = "profiles",
    operation_id = "list_profiles",
    responses((status = 200, description = "Every server profile", body = ProfileList))
)]
pub(super) async fn profiles(State(s): State<AdminState>) -> Response {
    let profiles = s
        .config
        .profiles
        .iter()
        .map(|p| ProfileView {
            name: p.name.clone(),
            kind: p.kind,
            host: p.host.clone(),
            port: p.port,
            tls: p.tls,
            poll_interval_secs: p.poll_interval.as_secs(),
            max_concurrent_connections: p.max_concurrent_connections,
            mailboxes: s
                .config
                .mailboxes
                .iter()
                .filter(|m| m.profile == p.name)
                .map(|m| m.name.clone())
                .collect(),
        })
        .collect();
    Json(ProfileList { profiles }).into_response()
}
