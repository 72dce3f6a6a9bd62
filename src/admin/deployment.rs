//! `GET /api/v1/deployment`: which deployment this daemon is, the id the
//! markers of its mailboxes name ([`crate::deployment`]).

use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Serialize;
use utoipa::ToSchema;

use super::{doc, ApiError};
use crate::deployment::Deployment;

/// This deployment.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct DeploymentInfo {
    /// The id in the markers of the mailboxes it syncs.
    id: String,
    /// The host it runs on, as markers name it.
    host: String,
    /// This build's version.
    version: &'static str,
}

/// `GET /api/v1/deployment`: this deployment's id and host, as another
/// deployment's refusal of a mailbox names them.
#[utoipa::path(
    get,
    path = "/deployment",
    tag = "daemon",
    operation_id = "get_deployment",
    responses(
        (status = 200, description = "This deployment", body = DeploymentInfo),
        (status = 503, description = "No deployment in this process (a router built for tests or documentation)", body = doc::ErrorBody),
    )
)]
pub(super) async fn get(me: Option<Extension<Arc<Deployment>>>) -> Result<Response, ApiError> {
    let Some(Extension(me)) = me else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "this process runs no deployment (it is not the daemon)",
        ));
    };
    Ok(Json(DeploymentInfo {
        id: me.id.clone(),
        host: me.host.clone(),
        version: env!("CARGO_PKG_VERSION"),
    })
    .into_response())
}
