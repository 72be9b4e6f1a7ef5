//! Break-glass over the API: opening an emergency session during an outage of the normal
//! sign-in path, and the operators' list and after-the-fact review of every use.

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use utoipa::ToSchema;

use super::auth::SessionInfo;
use super::error::ApiError;
use super::session::{session_cookie, OperatorSession};
use super::{AppState, ClientAddr};
use crate::break_glass::EmergencyUse;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BreakGlassRequest {
    pub username: String,
    /// The account's sealed one-time secret.
    pub secret: String,
    /// Why emergency access is needed (kept for the review).
    pub reason: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReviewRequest {
    /// What the reviewer checked and concluded.
    pub note: String,
}

/// Opens a time-boxed emergency operator session. Works only while the normal sign-in path
/// is down; every action in the session is audited and the use must be reviewed.
#[utoipa::path(post, path = "/auth/break-glass", tag = "auth", request_body = BreakGlassRequest,
    responses(
        (status = 200, description = "Emergency session", body = SessionInfo),
        (status = 401, description = "Wrong account or secret", content_type = "application/problem+json"),
        (status = 403, description = "The normal path works, or the secret was used", content_type = "application/problem+json")))]
pub async fn start(
    State(state): State<AppState>,
    Extension(ClientAddr(address)): Extension<ClientAddr>,
    Json(request): Json<BreakGlassRequest>,
) -> Result<Response, ApiError> {
    let started = state
        .break_glass
        .start(&request.username, &request.secret, &request.reason, address)
        .await;
    state.audit.notify();
    let (session, token) = started?;
    let mut headers = HeaderMap::new();
    let max_age = (state.config.break_glass.session_minutes * 60)
        .min(state.config.sessions.absolute_timeout_secs);
    headers.insert(header::SET_COOKIE, session_cookie(&token, max_age));
    Ok((headers, Json(SessionInfo::of(&session, token, Vec::new()))).into_response())
}

/// Every break-glass use, newest first; `overdue` marks unreviewed uses past the period.
#[utoipa::path(get, path = "/operator/break-glass", tag = "operator",
    responses((status = 200, description = "Uses", body = [EmergencyUse]),
        (status = 403, description = "Not an operator", content_type = "application/problem+json")))]
pub async fn list(
    State(state): State<AppState>,
    operator: OperatorSession,
) -> Result<Json<Vec<EmergencyUse>>, ApiError> {
    let uses = state.break_glass.uses().await?;
    super::operator::audit_operator_read(&state, &operator, "break-glass uses").await?;
    Ok(Json(uses))
}

/// Records the review of a use (by an operator other than its user, not in break-glass).
#[utoipa::path(post, path = "/operator/break-glass/{id}/review", tag = "operator",
    params(("id" = String, Path, description = "The use")), request_body = ReviewRequest,
    responses((status = 204, description = "Reviewed"),
        (status = 403, description = "Not allowed to review this use", content_type = "application/problem+json"),
        (status = 404, description = "No such use", content_type = "application/problem+json"),
        (status = 409, description = "Already reviewed", content_type = "application/problem+json")))]
pub async fn review(
    State(state): State<AppState>,
    operator: OperatorSession,
    Path(id): Path<String>,
    Json(request): Json<ReviewRequest>,
) -> Result<StatusCode, ApiError> {
    let auth = &operator.0;
    state
        .break_glass
        .review(&id, &auth.session, &request.note, auth.address)
        .await?;
    state.audit.notify();
    Ok(StatusCode::NO_CONTENT)
}
