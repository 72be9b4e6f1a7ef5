//! Operator endpoints. Each takes `OperatorSession`.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::session::OperatorSession;
use super::AppState;

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
