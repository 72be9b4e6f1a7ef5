//! The patient's own data, streamed.

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;

use super::error::ApiError;
use super::session::PatientSession;
use super::AppState;
use crate::audit::{AuditEvent, EventKind};

/// All of the signed-in patient's current resources as NDJSON, one resource as received per
/// line. Streams: each resource is decrypted on its own, so memory stays bounded.
#[utoipa::path(get, path = "/patient/resources", tag = "patient",
    responses(
        (status = 200, description = "NDJSON, one FHIR resource per line", content_type = "application/fhir+ndjson"),
        (status = 401, description = "Not signed in", content_type = "application/problem+json"),
        (status = 410, description = "The patient's data was erased", content_type = "application/problem+json")))]
pub async fn resources(
    State(state): State<AppState>,
    patient: PatientSession,
) -> Result<Response, ApiError> {
    let stream = state.resources.stream_current(&patient.patient_id).await?;
    // BALP PatientQuery: recorded before the first byte leaves.
    let event = AuditEvent::new(EventKind::Search, patient.auth.agent())
        .patient(&patient.patient_id)
        .detail("own resources, all categories");
    state.audit.record_now(&event).await?;
    let lines = stream.map(|item| {
        item.map(|resource| {
            let mut line = resource.body;
            line.retain(|b| *b != b'\n' && *b != b'\r');
            line.push(b'\n');
            Bytes::from(line)
        })
        .map_err(|e| {
            tracing::error!(error = %e, "stream of resources broke off");
            std::io::Error::other("stream broke off")
        })
    });
    Ok((
        [(header::CONTENT_TYPE, "application/fhir+ndjson")],
        Body::from_stream(lines),
    )
        .into_response())
}
