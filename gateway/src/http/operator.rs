//! Operator endpoints. Each takes `OperatorSession`.

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::error::ApiError;
use super::session::OperatorSession;
use super::AppState;
use crate::store::accounts::LiveSession;

/// The newest signed audit checkpoint (C2SP signed note). Save it off-site: `phr-gateway
/// audit verify --trusted-checkpoint` proves later logs extend it.
#[utoipa::path(get, path = "/operator/audit/checkpoint", tag = "operator",
    responses(
        (status = 200, description = "Signed checkpoint note", content_type = "text/plain"),
        (status = 404, description = "No checkpoint yet", content_type = "application/problem+json"),
        (status = 403, description = "Not an operator", content_type = "application/problem+json")))]
pub async fn audit_checkpoint(
    State(state): State<AppState>,
    _operator: OperatorSession,
) -> Result<Response, ApiError> {
    match state.audit.latest_checkpoint().await? {
        Some(note) => {
            Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], note).into_response())
        }
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "no checkpoint has been written yet",
        )),
    }
}

/// Live sessions of every account (never their tokens).
#[utoipa::path(get, path = "/operator/sessions", tag = "operator",
    responses((status = 200, description = "Live sessions", body = [LiveSession]),
        (status = 403, description = "Not an operator", content_type = "application/problem+json")))]
pub async fn sessions(
    State(state): State<AppState>,
    _operator: OperatorSession,
) -> Result<Json<Vec<LiveSession>>, ApiError> {
    Ok(Json(state.accounts.live_sessions().await?))
}

/// Ends any live session at once. Audited.
#[utoipa::path(post, path = "/operator/sessions/{id}/end", tag = "operator",
    params(("id" = String, Path, description = "The session id from the list")),
    responses((status = 204, description = "Ended"),
        (status = 404, description = "No such live session", content_type = "application/problem+json")))]
pub async fn end_session(
    State(state): State<AppState>,
    operator: OperatorSession,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let auth = &operator.0;
    state
        .accounts
        .end_session(&id, &auth.session, auth.address)
        .await?;
    state.audit.notify();
    Ok(StatusCode::NO_CONTENT)
}
