//! Operator endpoints. Each takes `OperatorSession`.

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::error::ApiError;
use super::session::OperatorSession;
use super::AppState;
use crate::store::accounts::LiveSession;
use crate::supply_chain::SupplyChainEntry;

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
    operator: OperatorSession,
) -> Result<Json<Vec<LiveSession>>, ApiError> {
    let sessions = state.accounts.live_sessions().await?;
    audit_operator_read(&state, &operator, "live sessions").await?;
    Ok(Json(sessions))
}

/// Records an operator's read of account data (sessions, break-glass uses).
pub(super) async fn audit_operator_read(
    state: &AppState,
    operator: &OperatorSession,
    what: &str,
) -> Result<(), ApiError> {
    let event = crate::audit::AuditEvent::new(crate::audit::EventKind::Read, operator.0.agent())
        .detail(format!("operator read {what}"));
    Ok(state.audit.record_now(&event).await?)
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

/// The subcontractors and component owners: role, data touched, contract, last review
/// (`review_overdue` after a year).
#[utoipa::path(get, path = "/operator/supply-chain", tag = "operator",
    responses((status = 200, description = "The list", body = [SupplyChainEntry]),
        (status = 403, description = "Not an operator", content_type = "application/problem+json")))]
pub async fn supply_chain(
    State(state): State<AppState>,
    _operator: OperatorSession,
) -> Result<Json<Vec<SupplyChainEntry>>, ApiError> {
    Ok(Json(crate::supply_chain::parse(
        &state.supply_chain,
        crate::store::japan_today(),
    )?))
}

/// The CycloneDX SBOM of this build (from its `Cargo.lock`).
#[utoipa::path(get, path = "/operator/sbom", tag = "operator",
    responses((status = 200, description = "CycloneDX 1.5 JSON", content_type = "application/vnd.cyclonedx+json"),
        (status = 403, description = "Not an operator", content_type = "application/problem+json")))]
pub async fn sbom(_operator: OperatorSession) -> Result<Response, ApiError> {
    let document = crate::supply_chain::sbom::document()?;
    Ok((
        [(header::CONTENT_TYPE, "application/vnd.cyclonedx+json")],
        document,
    )
        .into_response())
}

/// The service disclosure (HTML, Japanese with English) from the running configuration.
#[utoipa::path(get, path = "/operator/disclosure", tag = "operator",
    responses((status = 200, description = "The disclosure", content_type = "text/html"),
        (status = 403, description = "Not an operator", content_type = "application/problem+json")))]
pub async fn disclosure(
    State(state): State<AppState>,
    _operator: OperatorSession,
) -> Result<Response, ApiError> {
    let facts = crate::disclosure::gather(&state.config).await?;
    let html = crate::disclosure::render_html(&crate::disclosure::disclosure(&facts));
    Ok(([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response())
}
