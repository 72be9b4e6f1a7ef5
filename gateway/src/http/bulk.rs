//! FHIR Bulk Data Access 2.0 for recipients' backends (SMART Backend Services tokens with
//! `system/` scopes): `Patient/$export` and `Group/[id]/$export` (the group is the patients
//! who consented to this recipient: its id is the client id), the status URL (202 with
//! `X-Progress` while running, 429 when polled too fast, the manifest when done, `DELETE` to
//! cancel) and the NDJSON files, which need the token and expire.

use axum::body::{Body, Bytes};
use std::net::IpAddr;

use axum::extract::{OriginalUri, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use futures::StreamExt;
use serde_json::json;

use super::error::ApiError;
use super::{AppState, ClientAddr};
use crate::audit::{Agent, AuditEvent, EventKind};
use crate::error::Error;
use crate::export::jobs::exportable_types;
use crate::export::{request, ExportStatus, DELETED_FILE};
use crate::oauth::scopes::{Context, Permissions};
use crate::oauth::{AccessGrant, Scope};
use crate::store::{millis_to_rfc3339, now_millis};

/// Polls closer together than this are answered 429.
const MIN_POLL_MILLIS: i64 = 1_000;

fn backend_agent(grant: &AccessGrant, address: Option<IpAddr>) -> Result<Agent, ApiError> {
    if grant.patient_id.is_some() {
        return Err(Error::Forbidden(
            "bulk export needs a backend token (client_credentials with system/ scopes)",
        )
        .into());
    }
    Ok(grant.agent(address))
}

/// `GET /fhir/Patient/$export`
pub async fn export_patients(
    State(state): State<AppState>,
    grant: AccessGrant,
    Extension(ClientAddr(address)): Extension<ClientAddr>,
    OriginalUri(uri): OriginalUri,
    Query(params): Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    kick_off(
        &state,
        &grant,
        address,
        "patient",
        None,
        &uri.to_string(),
        &params,
        &headers,
    )
    .await
}

/// `GET /fhir/Group/{id}/$export`
pub async fn export_group(
    State(state): State<AppState>,
    grant: AccessGrant,
    Extension(ClientAddr(address)): Extension<ClientAddr>,
    Path((id, operation)): Path<(String, String)>,
    OriginalUri(uri): OriginalUri,
    Query(params): Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if operation != "$export" {
        return Err(Error::NotFound(format!("Group {operation} is not supported")).into());
    }
    backend_agent(&grant, address)?;
    // A client sees one group: the patients who consented to it.
    if id != grant.client_id {
        return Err(Error::NotFound(format!("Group/{id} is not known")).into());
    }
    kick_off(
        &state,
        &grant,
        address,
        "group",
        Some(&id),
        &uri.to_string(),
        &params,
        &headers,
    )
    .await
}

#[allow(clippy::too_many_arguments)]
async fn kick_off(
    state: &AppState,
    grant: &AccessGrant,
    address: Option<IpAddr>,
    kind: &str,
    group_id: Option<&str>,
    request_path: &str,
    params: &[(String, String)],
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let agent = backend_agent(grant, address)?;
    let prefer = headers
        .get("prefer")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !prefer
        .split([',', ';'])
        .any(|part| part.trim().eq_ignore_ascii_case("respond-async"))
    {
        return Err(
            Error::Invalid("a bulk export needs the header Prefer: respond-async".into()).into(),
        );
    }
    let served = exportable_types();
    let mut parameters = request::parse(params, &served).map_err(|e| Error::Invalid(e.0))?;
    let allowed: Vec<&str> = served
        .iter()
        .copied()
        .filter(|resource_type| {
            Scope::Resource {
                context: Context::System,
                resource_type: resource_type.to_string(),
                permissions: Permissions {
                    read: true,
                    search: false,
                },
            }
            .covered_by_any(&grant.scopes)
        })
        .collect();
    if let Some(outside) = parameters
        .types
        .iter()
        .find(|t| !allowed.contains(&t.as_str()))
    {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!("the token's scopes do not allow exporting {outside}"),
        ));
    }
    if parameters.types.is_empty() {
        parameters.types = allowed.iter().map(|t| t.to_string()).collect();
    }
    if parameters.types.is_empty() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "the token's scopes allow no resource type".to_string(),
        ));
    }
    let request_url = format!("{}{request_path}", state.public_url());
    let id = state
        .exports
        .kick_off(
            &agent,
            &grant.client_id,
            kind,
            group_id,
            &request_url,
            &parameters,
        )
        .await?;
    state.audit.notify();
    let mut response = StatusCode::ACCEPTED.into_response();
    let location = format!("{}/fhir/bulkstatus/{id}", state.public_url());
    if let Ok(value) = HeaderValue::from_str(&location) {
        response
            .headers_mut()
            .insert(header::CONTENT_LOCATION, value);
    }
    Ok(response)
}

/// `GET /fhir/bulkstatus/{id}`
pub async fn status(
    State(state): State<AppState>,
    grant: AccessGrant,
    Extension(ClientAddr(address)): Extension<ClientAddr>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    backend_agent(&grant, address)?;
    let job = state.exports.get(&id, &grant.client_id).await?;
    let now = now_millis();
    match job.status {
        ExportStatus::Cancelled => Err(Error::NotFound(format!("export {id}")).into()),
        ExportStatus::Failed => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            job.error.unwrap_or_else(|| "the export failed".into()),
        )),
        ExportStatus::Queued | ExportStatus::Running => {
            let previous = state.exports.note_poll(&id).await?;
            if previous.is_some_and(|at| now - at < MIN_POLL_MILLIS) {
                let mut response = ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "polled too often: wait for Retry-After".to_string(),
                )
                .into_response();
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                return Ok(response);
            }
            let progress = match job.patients_total {
                Some(total) => format!("{} of {total} patients", job.patients_done),
                None => "queued".into(),
            };
            let mut response = StatusCode::ACCEPTED.into_response();
            let headers = response.headers_mut();
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            if let Ok(value) = HeaderValue::from_str(&progress) {
                headers.insert("x-progress", value);
            }
            Ok(response)
        }
        ExportStatus::Done => {
            if job.expires_at.is_some_and(|at| at < now) {
                return Err(Error::NotFound(format!("export {id} has expired")).into());
            }
            let files = state.exports.outputs(&id).await?;
            let url =
                |file: &str| format!("{}/fhir/bulkfiles/{id}/{file}.ndjson", state.public_url());
            let output: Vec<_> = files
                .iter()
                .filter(|f| f.file != DELETED_FILE)
                .map(|f| json!({"type": f.file, "url": url(&f.file), "count": f.count}))
                .collect();
            let deleted: Vec<_> = files
                .iter()
                .filter(|f| f.file == DELETED_FILE)
                .map(|f| json!({"type": "Bundle", "url": url(&f.file), "count": f.count}))
                .collect();
            let manifest = json!({
                "transactionTime": millis_to_rfc3339(job.transaction_time),
                "request": job.request_url,
                "requiresAccessToken": true,
                "output": output,
                "deleted": deleted,
                "error": [],
            });
            let mut response = (StatusCode::OK, manifest.to_string()).into_response();
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            if let Some(expires_at) = job.expires_at {
                if let Ok(value) = HeaderValue::from_str(&millis_to_rfc3339(expires_at)) {
                    response.headers_mut().insert(header::EXPIRES, value);
                }
            }
            Ok(response)
        }
    }
}

/// `DELETE /fhir/bulkstatus/{id}`: cancels; the status URL answers 404 afterwards.
pub async fn cancel(
    State(state): State<AppState>,
    grant: AccessGrant,
    Extension(ClientAddr(address)): Extension<ClientAddr>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let agent = backend_agent(&grant, address)?;
    let job = state.exports.get(&id, &grant.client_id).await?;
    if job.status == ExportStatus::Cancelled {
        return Err(Error::NotFound(format!("export {id}")).into());
    }
    state
        .exports
        .cancel(&agent, &job, "cancelled by the client")
        .await?;
    state.audit.notify();
    Ok(StatusCode::ACCEPTED.into_response())
}

/// `GET /fhir/bulkfiles/{id}/{file}.ndjson`
pub async fn file(
    State(state): State<AppState>,
    grant: AccessGrant,
    Extension(ClientAddr(address)): Extension<ClientAddr>,
    Path((id, file)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let agent = backend_agent(&grant, address)?;
    let job = state.exports.get(&id, &grant.client_id).await?;
    if job.status != ExportStatus::Done || job.expires_at.is_some_and(|at| at < now_millis()) {
        return Err(Error::NotFound(format!("the files of export {id} are not available")).into());
    }
    let name = file
        .strip_suffix(".ndjson")
        .ok_or_else(|| Error::NotFound(format!("export file {file}")))?;
    let stream = state.exports.file_stream(&id, name).await?;
    let event = AuditEvent::new(EventKind::Export, agent)
        .detail(format!("bulk export {id}: file {file} fetched"));
    state.audit.record_now(&event).await?;
    let body = Body::from_stream(stream.map(|chunk| {
        chunk.map(Bytes::from).map_err(|e| {
            tracing::error!(error = %e, "export file stream broke off");
            std::io::Error::other("stream broke off")
        })
    }));
    Ok(([(header::CONTENT_TYPE, "application/fhir+ndjson")], body).into_response())
}
