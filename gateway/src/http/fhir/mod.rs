//! The FHIR R4 API under `/fhir` (`application/fhir+json`): `metadata`, read, vread,
//! `_history`, search in the patient compartment and `Patient/[id]/$everything`. Every
//! response is filtered per resource by the patient's consent as committed now (see
//! `caller`), and every read and search is audited (BALP PatientRead / PatientQuery).
//! Errors here are `OperationOutcome`s (the error renderer converts them).

mod caller;
mod metadata;
mod read;
mod search;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use phr_consent::DataCategory;
use serde_json::Value;

pub use caller::{FhirCaller, Interaction};
pub use metadata::capability_statement;
pub use read::{instance_operation, read, vread};
pub use search::{search, search_by_post};

use super::error::{operation_outcome, ApiError};
use super::AppState;
use crate::error::Error;
use crate::store::resources::StoredResource;

const FHIR_JSON: &str = "application/fhir+json";

pub async fn not_supported() -> Response {
    operation_outcome(
        StatusCode::NOT_FOUND,
        "this FHIR interaction is not supported",
    )
}

fn fhir_json(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, FHIR_JSON)],
        body.to_string(),
    )
        .into_response()
}

/// Every resource type the API serves from the record (besides `Consent`, the patient's
/// own), in category order.
fn served_types() -> Vec<&'static str> {
    DataCategory::ALL
        .iter()
        .flat_map(|c| c.resource_types().iter().copied())
        .collect()
}

/// Refuses a type the API does not serve with a 404 `OperationOutcome`.
fn check_type(resource_type: &str) -> Result<(), ApiError> {
    if resource_type == "Consent" || served_types().contains(&resource_type) {
        Ok(())
    } else {
        Err(Error::NotFound(format!("resource type {resource_type} is not served here")).into())
    }
}

/// Stored resources as served (gateway ids, meta, references).
async fn serve_all(
    state: &AppState,
    patient_id: &str,
    stored: &[StoredResource],
) -> Result<Vec<Value>, ApiError> {
    Ok(crate::fhir::serve::serve_all(&state.resources, patient_id, stored).await?)
}

/// The patient as served (see `fhir::serve::served_patient`).
async fn served_patient(
    state: &AppState,
    patient_id: &str,
) -> Result<Option<(Value, String)>, ApiError> {
    Ok(crate::fhir::serve::served_patient(&state.resources, patient_id).await?)
}
