//! `POST /api/v1/reload`: the daemon reads its configuration file again.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::json;

use super::{doc, ApiError};
use crate::daemon::reload::{ReloadHandle, ReloadRefused, ReloadReport};

/// `POST /api/v1/reload`: reads the configuration file again. Valid: new
/// mailboxes start, removed ones stop, changed ones restart with their new
/// settings and the others keep running (every task restarts only where
/// `[admin]`, `[crm]` or `[outgoing]` changed, named in `full_restart`);
/// answered once applied (on the full path: before the drain), with what
/// changed and what was restarted.
/// Invalid: 422 with every error, nothing changes.
#[utoipa::path(
    post,
    path = "/reload",
    tag = "daemon",
    operation_id = "reload",
    responses(
        (status = 200, description = "Reloaded; what changed", body = ReloadReport),
        (status = 409, description = "The daemon was not started from a configuration file", body = doc::ErrorBody),
        (status = 422, description = "The file is invalid: `errors` lists every problem; nothing changed", body = doc::ErrorBody),
        (status = 503, description = "The daemon is shutting down, or no reload is possible in this process", body = doc::ErrorBody),
    )
)]
pub(super) async fn reload(handle: Option<Extension<ReloadHandle>>) -> Result<Response, ApiError> {
    let Some(Extension(handle)) = handle else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "this process cannot reload its configuration",
        ));
    };
    match handle.reload().await {
        Some(Ok(report)) => Ok(Json(report).into_response()),
        Some(Err(ReloadRefused::Invalid { file, errors })) => Err(ApiError::with(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "{file} has {} configuration error(s); nothing was changed, the daemon runs on as it was",
                errors.len()
            ),
            json!({
                "errors": errors
                    .iter()
                    .map(|e| json!({"path": e.path, "message": e.message}))
                    .collect::<Vec<_>>()
            }),
        )),
        Some(Err(ReloadRefused::NoFile)) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "the daemon was not started from a configuration file, so there is none to read again",
        )),
        None => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the daemon is shutting down",
        )),
    }
}
