//! Remote maintenance over the API: requesting, approving, rejecting and closing windows,
//! their reports, and the maintenance endpoints that work only inside an approved window
//! (`MaintenanceSession`).

use axum::extract::{FromRequestParts, Path, Query, RawPathParams, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use utoipa::{IntoParams, ToSchema};

use super::error::ApiError;
use super::session::{AuthSession, OperatorSession};
use super::AppState;
use crate::error::Error;
use crate::maintenance::{
    Diagnostics, MaintenanceAccess, MaintenanceReport, MaintenanceWindow, PatientResourceCounts,
    WindowRequest,
};
use crate::tls::ConnectionInfo;

/// The requesting operator acting inside an approved, current window (the `{id}` of the
/// path). Admitting or refusing the request records it as an action of the window, audited
/// with the window id; a refusal is a 403.
pub struct MaintenanceSession {
    pub operator: AuthSession,
    pub access: MaintenanceAccess,
}

impl FromRequestParts<AppState> for MaintenanceSession {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let OperatorSession(operator) = OperatorSession::from_request_parts(parts, state).await?;
        let params = RawPathParams::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "no maintenance window id"))?;
        let window_id = params
            .iter()
            .find(|(name, _)| *name == "id")
            .map(|(_, value)| value.to_string())
            .ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, "no maintenance window id"))?;
        let client_cert_sha256 = parts
            .extensions
            .get::<ConnectionInfo>()
            .and_then(|c| c.client_cert_der.as_deref())
            .map(|der| hex::encode(Sha256::digest(der)));
        let action = format!("{} {}", parts.method, parts.uri.path());
        let entered = state
            .maintenance
            .enter(
                &window_id,
                &operator.session,
                &operator.agent(),
                client_cert_sha256.as_deref(),
                &action,
            )
            .await;
        state.audit.notify();
        Ok(MaintenanceSession {
            access: entered?,
            operator,
        })
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ApproveRequest {
    /// Allow reading many patients' data at once (only when it was requested).
    #[serde(default)]
    pub allow_bulk_phi: bool,
    pub note: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RejectRequest {
    /// Why the window is rejected.
    pub note: String,
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct ReportQuery {
    /// `text` for the plain Japanese and English rendering; JSON otherwise.
    pub format: Option<String>,
}

/// Asks for a maintenance window; a second operator must approve it. Audited.
#[utoipa::path(post, path = "/operator/maintenance", tag = "maintenance",
    request_body = WindowRequest,
    responses((status = 201, description = "Requested", body = MaintenanceWindow),
        (status = 400, description = "Invalid request (e.g. longer than allowed)", content_type = "application/problem+json"),
        (status = 403, description = "Not an operator, or a break-glass session", content_type = "application/problem+json")))]
pub async fn request(
    State(state): State<AppState>,
    operator: OperatorSession,
    Json(request): Json<WindowRequest>,
) -> Result<(StatusCode, Json<MaintenanceWindow>), ApiError> {
    let auth = &operator.0;
    let window = state
        .maintenance
        .request(&auth.session, &request, auth.address)
        .await?;
    state.audit.notify();
    Ok((StatusCode::CREATED, Json(window)))
}

/// Every maintenance window, newest first (windows past their end are closed first).
#[utoipa::path(get, path = "/operator/maintenance", tag = "maintenance",
    responses((status = 200, description = "Windows", body = [MaintenanceWindow]),
        (status = 403, description = "Not an operator", content_type = "application/problem+json")))]
pub async fn list(
    State(state): State<AppState>,
    _operator: OperatorSession,
) -> Result<Json<Vec<MaintenanceWindow>>, ApiError> {
    let windows = state.maintenance.windows().await;
    state.audit.notify();
    Ok(Json(windows?))
}

/// Approves a window: by an operator other than its requester. Audited, refusals too.
#[utoipa::path(post, path = "/operator/maintenance/{id}/approve", tag = "maintenance",
    params(("id" = String, Path, description = "The window")), request_body = ApproveRequest,
    responses((status = 200, description = "Approved", body = MaintenanceWindow),
        (status = 403, description = "The requester cannot approve their own window", content_type = "application/problem+json"),
        (status = 404, description = "No such window", content_type = "application/problem+json"),
        (status = 409, description = "Already decided, or ended", content_type = "application/problem+json")))]
pub async fn approve(
    State(state): State<AppState>,
    operator: OperatorSession,
    Path(id): Path<String>,
    Json(request): Json<ApproveRequest>,
) -> Result<Json<MaintenanceWindow>, ApiError> {
    let auth = &operator.0;
    let approved = state
        .maintenance
        .approve(
            &id,
            &auth.session,
            request.allow_bulk_phi,
            request.note.as_deref(),
            auth.address,
        )
        .await;
    state.audit.notify();
    Ok(Json(approved?))
}

/// Rejects a window (same rules as approving). Audited.
#[utoipa::path(post, path = "/operator/maintenance/{id}/reject", tag = "maintenance",
    params(("id" = String, Path, description = "The window")), request_body = RejectRequest,
    responses((status = 200, description = "Rejected", body = MaintenanceWindow),
        (status = 403, description = "The requester cannot decide on their own window", content_type = "application/problem+json"),
        (status = 404, description = "No such window", content_type = "application/problem+json"),
        (status = 409, description = "Already decided, or ended", content_type = "application/problem+json")))]
pub async fn reject(
    State(state): State<AppState>,
    operator: OperatorSession,
    Path(id): Path<String>,
    Json(request): Json<RejectRequest>,
) -> Result<Json<MaintenanceWindow>, ApiError> {
    let auth = &operator.0;
    let rejected = state
        .maintenance
        .reject(&id, &auth.session, &request.note, auth.address)
        .await;
    state.audit.notify();
    Ok(Json(rejected?))
}

/// Withdraws a window still waiting for approval; only its requester may. Audited.
#[utoipa::path(post, path = "/operator/maintenance/{id}/cancel", tag = "maintenance",
    params(("id" = String, Path, description = "The window")),
    responses((status = 200, description = "Cancelled", body = MaintenanceWindow),
        (status = 403, description = "Not the requester", content_type = "application/problem+json"),
        (status = 404, description = "No such window", content_type = "application/problem+json"),
        (status = 409, description = "Already decided", content_type = "application/problem+json")))]
pub async fn cancel(
    State(state): State<AppState>,
    operator: OperatorSession,
    Path(id): Path<String>,
) -> Result<Json<MaintenanceWindow>, ApiError> {
    let auth = &operator.0;
    let cancelled = state
        .maintenance
        .cancel(&id, &auth.session, auth.address)
        .await;
    state.audit.notify();
    Ok(Json(cancelled?))
}

/// Ends an approved window now and generates its report. Audited.
#[utoipa::path(post, path = "/operator/maintenance/{id}/close", tag = "maintenance",
    params(("id" = String, Path, description = "The window")),
    responses((status = 200, description = "Closed; its report", body = MaintenanceReport),
        (status = 404, description = "No such window", content_type = "application/problem+json"),
        (status = 409, description = "Not approved, or already closed", content_type = "application/problem+json")))]
pub async fn close(
    State(state): State<AppState>,
    operator: OperatorSession,
    Path(id): Path<String>,
) -> Result<Json<MaintenanceReport>, ApiError> {
    let auth = &operator.0;
    let report = state
        .maintenance
        .close(&id, Some((&auth.session, auth.address)))
        .await;
    state.audit.notify();
    Ok(Json(report?))
}

/// The report for the institution: who asked and approved, every action, and whose data
/// was read. JSON, or plain text in Japanese and English with `?format=text`. Audited.
#[utoipa::path(get, path = "/operator/maintenance/{id}/report", tag = "maintenance",
    params(("id" = String, Path, description = "The window"), ReportQuery),
    responses((status = 200, description = "The report", body = MaintenanceReport),
        (status = 404, description = "No such window", content_type = "application/problem+json"),
        (status = 409, description = "The window has not closed yet", content_type = "application/problem+json")))]
pub async fn report(
    State(state): State<AppState>,
    operator: OperatorSession,
    Path(id): Path<String>,
    Query(query): Query<ReportQuery>,
) -> Result<Response, ApiError> {
    let auth = &operator.0;
    let report = state
        .maintenance
        .report(&id, &auth.session, auth.address)
        .await;
    state.audit.notify();
    let report = report?;
    match query.format.as_deref() {
        Some("text") => Ok((
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            report.to_text(),
        )
            .into_response()),
        None | Some("json") => Ok(Json(report).into_response()),
        Some(_) => Err(Error::Invalid("format is text or json".into()).into()),
    }
}

/// Gateway health for maintenance (no patient data). Only inside an approved window, by
/// its requester; recorded as an action of the window.
#[utoipa::path(get, path = "/operator/maintenance/{id}/diagnostics", tag = "maintenance",
    params(("id" = String, Path, description = "The window")),
    responses((status = 200, description = "Diagnostics", body = Diagnostics),
        (status = 403, description = "Outside the window, not approved, or not yours", content_type = "application/problem+json")))]
pub async fn diagnostics(
    State(state): State<AppState>,
    _maintenance: MaintenanceSession,
) -> Result<Json<Diagnostics>, ApiError> {
    Ok(Json(state.maintenance.diagnostics().await?))
}

/// One patient's resources counted by type (no content). Only inside an approved window;
/// the patient is recorded as touched and the access shows in their access log.
#[utoipa::path(get, path = "/operator/maintenance/{id}/patients/{patient_id}/resource-counts", tag = "maintenance",
    params(("id" = String, Path, description = "The window"),
        ("patient_id" = String, Path, description = "The patient (opaque gateway id)")),
    responses((status = 200, description = "Counts", body = PatientResourceCounts),
        (status = 403, description = "Outside the window, not approved, or not yours", content_type = "application/problem+json"),
        (status = 404, description = "No such patient", content_type = "application/problem+json")))]
pub async fn patient_resource_counts(
    State(state): State<AppState>,
    maintenance: MaintenanceSession,
    Path(path): Path<(String, String)>,
) -> Result<Json<PatientResourceCounts>, ApiError> {
    let (_, patient_id) = path;
    let counts = state
        .maintenance
        .patient_resource_counts(&patient_id)
        .await?;
    state
        .maintenance
        .touched(
            &maintenance.access,
            &maintenance.operator.agent(),
            std::slice::from_ref(&counts.patient_id),
            "resource counts of one patient",
        )
        .await?;
    state.audit.notify();
    Ok(Json(counts))
}

/// Every patient's resources counted by type: a bulk read, refused unless the window's
/// approval allowed it. Every listed patient is recorded as touched.
#[utoipa::path(get, path = "/operator/maintenance/{id}/resource-counts", tag = "maintenance",
    params(("id" = String, Path, description = "The window")),
    responses((status = 200, description = "Counts per patient", body = [PatientResourceCounts]),
        (status = 403, description = "Bulk reading not approved, outside the window, or not yours", content_type = "application/problem+json")))]
pub async fn all_resource_counts(
    State(state): State<AppState>,
    maintenance: MaintenanceSession,
) -> Result<Json<Vec<PatientResourceCounts>>, ApiError> {
    let agent = maintenance.operator.agent();
    let allowed = state
        .maintenance
        .require_bulk(&maintenance.access, &agent)
        .await;
    state.audit.notify();
    allowed?;
    let counts = state.maintenance.all_resource_counts().await?;
    let patients: Vec<String> = counts.iter().map(|c| c.patient_id.clone()).collect();
    state
        .maintenance
        .touched(
            &maintenance.access,
            &agent,
            &patients,
            "resource counts of every patient (bulk)",
        )
        .await?;
    state.audit.notify();
    Ok(Json(counts))
}
