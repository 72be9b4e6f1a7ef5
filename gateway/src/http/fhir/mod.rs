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
pub use search::search;

use super::error::{operation_outcome, ApiError};
use super::AppState;
use crate::error::Error;
use crate::fhir::present::{present, references_in, ReferenceMap, Served};
use crate::store::millis_to_rfc3339;
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

/// Resolves the relative references of `stored` resources to the gateway's ids (same
/// patient, same source).
async fn resolve_references(
    state: &AppState,
    patient_id: &str,
    stored: &[(&StoredResource, &Value)],
) -> Result<ReferenceMap, ApiError> {
    let mut map = ReferenceMap::new();
    for (resource, body) in stored {
        for (resource_type, id) in references_in(body) {
            if map.contains_key(&(resource_type.clone(), id.clone())) {
                continue;
            }
            if let Some(gateway_id) = state
                .resources
                .gateway_id_of(patient_id, &resource.meta.source, &resource_type, &id)
                .await?
            {
                map.insert((resource_type, id), gateway_id);
            }
        }
    }
    Ok(map)
}

/// Stored resources as served (gateway ids, meta, references).
async fn serve_all(
    state: &AppState,
    patient_id: &str,
    stored: &[StoredResource],
) -> Result<Vec<Value>, ApiError> {
    let parsed: Vec<Value> = stored
        .iter()
        .map(|resource| {
            serde_json::from_slice(&resource.body).map_err(|e| {
                ApiError::from(Error::Invalid(format!(
                    "stored {} {} is not JSON: {e}",
                    resource.meta.resource_type, resource.meta.id
                )))
            })
        })
        .collect::<Result<_, _>>()?;
    let pairs: Vec<(&StoredResource, &Value)> = stored.iter().zip(parsed.iter()).collect();
    let references = resolve_references(state, patient_id, &pairs).await?;
    Ok(stored
        .iter()
        .zip(parsed)
        .map(|(resource, body)| {
            let last_updated = millis_to_rfc3339(resource.meta.last_updated);
            present(
                body,
                &Served {
                    id: &resource.meta.id,
                    version: resource.meta.version,
                    last_updated: &last_updated,
                    source: &resource.meta.source,
                    patient_id,
                },
                &references,
            )
        })
        .collect())
}

/// The patient as served: their newest `Patient` from any source, under the gateway's
/// patient id.
async fn served_patient(
    state: &AppState,
    patient_id: &str,
) -> Result<Option<(Value, String)>, ApiError> {
    let stored = match state.resources.latest_of_type(patient_id, "Patient").await {
        Ok(stored) => stored,
        Err(Error::NotFound(_)) | Err(Error::KeyMissing(_)) => return Ok(None),
        Err(other) => return Err(other.into()),
    };
    let history_ref = format!(
        "Patient/{}/_history/{}",
        stored.meta.id, stored.meta.version
    );
    let mut served = serve_all(state, patient_id, std::slice::from_ref(&stored)).await?;
    let mut patient = served.pop().unwrap_or_default();
    // The gateway's patient id names the person, whichever source the demographics came from.
    patient["id"] = Value::String(patient_id.to_string());
    Ok(Some((patient, history_ref)))
}
