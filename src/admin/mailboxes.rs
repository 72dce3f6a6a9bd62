//! Mailboxes and profiles: the live view, enabling, the profile list.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::{doc, AdminState, ApiError};
use crate::model::{ApprovalStatus, MailboxControl};
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

/// What a `POST /api/v1/mailboxes/{name}/…` action did.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
enum ActionStatus {
    /// Test & Enable runs (again).
    Enabling,
    /// An operator disabled it; it stops after the batch in flight.
    Disabled,
    /// Its email address is approved; a mailbox held for approval starts.
    Approved,
    /// Its email address is rejected; with `process_only_approved` it stops.
    Rejected,
}

/// `POST /api/v1/mailboxes/{name}/…`'s answer.
#[derive(Debug, Serialize, ToSchema)]
struct ActionAccepted {
    status: ActionStatus,
    mailbox: String,
    /// What operators have set on it now.
    control: MailboxControl,
}

/// The configured mailbox `name`, or a 404.
fn configured(s: &AdminState, name: &str) -> Result<crate::config::Mailbox, ApiError> {
    s.config
        .current()
        .mailboxes
        .iter()
        .find(|m| m.name == name)
        .cloned()
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no mailbox {name:?}")))
}

/// Applies `change` to what operators set on `name`, stores it and lets the
/// mailbox task act on it.
async fn change_control(
    s: &AdminState,
    name: &str,
    status: ActionStatus,
    change: impl FnOnce(&mut MailboxControl) -> Result<(), ApiError> + Send + 'static,
) -> Result<Response, ApiError> {
    let store = s.store.clone();
    let mailbox = name.to_string();
    // Outer error: the store (a 500); inner: `change` refused (its answer).
    let control = super::blocking(move || {
        let mut control = store.mailbox_control(&mailbox)?;
        if let Err(refused) = change(&mut control) {
            return Ok(Err(refused));
        }
        store.put_mailbox_control(&mailbox, &control)?;
        Ok(Ok(control))
    })
    .await??;
    s.runtime.control_changed(name);
    Ok((
        StatusCode::ACCEPTED,
        Json(ActionAccepted {
            status,
            mailbox: name.to_string(),
            control,
        }),
    )
        .into_response())
}

/// `POST /api/v1/mailboxes/{name}/enable`: enables a mailbox an operator
/// disabled, or runs Test & Enable again on one a permanent error disabled.
#[utoipa::path(
    post,
    path = "/mailboxes/{name}/enable",
    tag = "mailboxes",
    operation_id = "enable_mailbox",
    params(("name" = String, Path, description = "Mailbox name as configured")),
    responses(
        (status = 202, description = "Test & Enable runs again", body = ActionAccepted),
        (status = 404, description = "No such mailbox", body = doc::ErrorBody),
        (status = 409, description = "The mailbox is not disabled, or is disabled in the configuration", body = doc::ErrorBody),
    )
)]
pub(super) async fn enable(
    State(s): State<AdminState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    configured(&s, &name)?;
    let store = s.store.clone();
    let n = name.clone();
    let control = super::blocking(move || store.mailbox_control(&n)).await?;
    if control.disabled_at.is_some() {
        return change_control(&s, &name, ActionStatus::Enabling, |c| {
            c.disabled_at = None;
            Ok(())
        })
        .await;
    }
    let held = s
        .runtime
        .snapshot()
        .into_iter()
        .find(|m| m.name == name)
        .filter(|m| m.phase == crate::scheduler::Phase::NotApproved);
    if let Some(m) = held {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "mailbox {name:?} is not disabled but held because its email address is {:?}, not approved: approve it (POST /api/v1/mailboxes/{name}/approve)",
                m.approval
            ),
        ));
    }
    match s.runtime.request_enable(&name) {
        Ok(()) => Ok((
            StatusCode::ACCEPTED,
            Json(ActionAccepted {
                status: ActionStatus::Enabling,
                mailbox: name,
                control,
            }),
        )
            .into_response()),
        Err(e) => {
            let status = match e {
                EnableError::Unknown(_) => StatusCode::NOT_FOUND,
                EnableError::DisabledByConfig(_) | EnableError::NotDisabled { .. } => {
                    StatusCode::CONFLICT
                }
            };
            Err(ApiError::new(status, e.to_string()))
        }
    }
}

/// `POST /api/v1/mailboxes/{name}/disable`: an operator stops the mailbox
/// (after the batch in flight, which commits); it stays disabled, across
/// restarts, until enabled.
#[utoipa::path(
    post,
    path = "/mailboxes/{name}/disable",
    tag = "mailboxes",
    operation_id = "disable_mailbox",
    params(("name" = String, Path, description = "Mailbox name as configured")),
    responses(
        (status = 202, description = "Disabled; the task stops", body = ActionAccepted),
        (status = 404, description = "No such mailbox", body = doc::ErrorBody),
        (status = 409, description = "Already disabled by an operator", body = doc::ErrorBody),
    )
)]
pub(super) async fn disable(
    State(s): State<AdminState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    configured(&s, &name)?;
    let n = name.clone();
    change_control(&s, &name, ActionStatus::Disabled, move |c| {
        if let Some(at) = c.disabled_at {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "mailbox {n:?} is already disabled (by an operator at {})",
                    crate::model::format_time(at)
                ),
            ));
        }
        c.disabled_at = Some(crate::model::now());
        Ok(())
    })
    .await
}

/// `POST /api/v1/mailboxes/{name}/approve`: approves the mailbox's email
/// address (Dynamics: Approve Email); a mailbox held for approval starts.
#[utoipa::path(
    post,
    path = "/mailboxes/{name}/approve",
    tag = "mailboxes",
    operation_id = "approve_mailbox",
    params(("name" = String, Path, description = "Mailbox name as configured")),
    responses(
        (status = 202, description = "Approved", body = ActionAccepted),
        (status = 404, description = "No such mailbox", body = doc::ErrorBody),
    )
)]
pub(super) async fn approve(
    State(s): State<AdminState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    set_approval(s, name, ApprovalStatus::Approved, ActionStatus::Approved).await
}

/// `POST /api/v1/mailboxes/{name}/reject`: rejects the mailbox's email
/// address; with `process_only_approved` (the default) it stops processing.
#[utoipa::path(
    post,
    path = "/mailboxes/{name}/reject",
    tag = "mailboxes",
    operation_id = "reject_mailbox",
    params(("name" = String, Path, description = "Mailbox name as configured")),
    responses(
        (status = 202, description = "Rejected", body = ActionAccepted),
        (status = 404, description = "No such mailbox", body = doc::ErrorBody),
    )
)]
pub(super) async fn reject(
    State(s): State<AdminState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    set_approval(s, name, ApprovalStatus::Rejected, ActionStatus::Rejected).await
}

async fn set_approval(
    s: AdminState,
    name: String,
    approval: ApprovalStatus,
    status: ActionStatus,
) -> Result<Response, ApiError> {
    configured(&s, &name)?;
    change_control(&s, &name, status, move |c| {
        c.approval = Some(approval);
        c.approval_changed_at = Some(crate::model::now());
        Ok(())
    })
    .await
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
    let config = s.config.current();
    let profiles = config
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
            mailboxes: config
                .mailboxes
                .iter()
                .filter(|m| m.profile == p.name)
                .map(|m| m.name.clone())
                .collect(),
        })
        .collect();
    Json(ProfileList { profiles }).into_response()
}
