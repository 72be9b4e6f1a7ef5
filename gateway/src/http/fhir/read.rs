//! `read`, `vread` and instance `_history`. Another patient's resource, or one of another
//! type, is "not found", exactly as an unknown id is.

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use serde_json::{json, Value};

use super::caller::{FhirCaller, Interaction};
use super::{check_type, fhir_json, serve_all, served_patient};
use crate::audit::EventKind;
use crate::error::Error;
use crate::http::error::ApiError;
use crate::http::AppState;
use crate::store::millis_to_rfc3339;
use crate::store::resources::StoredResource;

/// `GET /fhir/{type}/{id}`
pub async fn read(
    State(state): State<AppState>,
    caller: FhirCaller,
    Path((resource_type, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    check_type(&resource_type)?;
    if resource_type == "Consent" {
        return read_consent(&state, &caller, &id).await;
    }
    if resource_type == "Patient" && id != caller.patient_id {
        return Err(Error::Forbidden("this token is for another patient").into());
    }
    caller
        .require(&state, &resource_type, Interaction::Read)
        .await?;
    let (body, reference) = if resource_type == "Patient" {
        served_patient(&state, &caller.patient_id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("no Patient resource is held for {id}")))?
    } else {
        let stored = own_resource(&state, &caller, &resource_type, &id, None).await?;
        let reference = stored.meta.history_reference();
        let mut served =
            serve_all(&state, &caller.patient_id, std::slice::from_ref(&stored)).await?;
        (served.pop().unwrap_or_default(), reference)
    };
    let event = caller.audit_event(
        EventKind::Read,
        vec![reference],
        &format!("FHIR read {resource_type}"),
    );
    state.audit.record_now(&event).await?;
    Ok(with_version_headers(
        fhir_json(StatusCode::OK, &body),
        &body,
    ))
}

/// `GET /fhir/{type}/{id}/_history/{vid}`
pub async fn vread(
    State(state): State<AppState>,
    caller: FhirCaller,
    Path((resource_type, id, version)): Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    check_type(&resource_type)?;
    let version: i64 =
        version.parse().ok().filter(|v| *v > 0).ok_or_else(|| {
            Error::NotFound(format!("{resource_type}/{id} has no version {version}"))
        })?;
    if resource_type == "Consent" || resource_type == "Patient" {
        return Err(Error::NotFound(format!(
            "versions of {resource_type} are not served; read it instead"
        ))
        .into());
    }
    caller
        .require(&state, &resource_type, Interaction::Read)
        .await?;
    let stored = own_resource(&state, &caller, &resource_type, &id, Some(version)).await?;
    let reference = stored.meta.history_reference();
    let mut served = serve_all(&state, &caller.patient_id, std::slice::from_ref(&stored)).await?;
    let body = served.pop().unwrap_or_default();
    let event = caller.audit_event(
        EventKind::Read,
        vec![reference],
        &format!("FHIR vread {resource_type}"),
    );
    state.audit.record_now(&event).await?;
    Ok(with_version_headers(
        fhir_json(StatusCode::OK, &body),
        &body,
    ))
}

/// `GET /fhir/{type}/{id}/{operation}`: `_history`, or `$everything` on a Patient.
pub async fn instance_operation(
    State(state): State<AppState>,
    caller: FhirCaller,
    Path((resource_type, id, operation)): Path<(String, String, String)>,
    Query(params): Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_type(&resource_type)?;
    match operation.as_str() {
        "_history" => history(&state, &caller, &resource_type, &id).await,
        "$everything" if resource_type == "Patient" => {
            super::search::everything(&state, &caller, &id, &params, &headers).await
        }
        other => {
            Err(Error::NotFound(format!("{other} on {resource_type} is not supported")).into())
        }
    }
}

async fn history(
    state: &AppState,
    caller: &FhirCaller,
    resource_type: &str,
    id: &str,
) -> Result<Response, ApiError> {
    if resource_type == "Consent" || resource_type == "Patient" {
        return Err(Error::NotFound(format!(
            "the history of {resource_type} is not served; read it instead"
        ))
        .into());
    }
    caller
        .require(state, resource_type, Interaction::Read)
        .await?;
    let versions = match state.resources.history(&caller.patient_id, id).await {
        Ok(versions) => versions,
        Err(Error::KeyMissing(_)) => return Err(not_found(resource_type, id).into()),
        Err(other) => return Err(other.into()),
    };
    if versions
        .first()
        .is_none_or(|v| v.meta.resource_type != resource_type)
    {
        return Err(not_found(resource_type, id).into());
    }
    let references: Vec<String> = versions
        .iter()
        .map(|stored| stored.meta.history_reference())
        .collect();
    let served = serve_all(state, &caller.patient_id, &versions).await?;
    // Newest first, as FHIR history bundles are ordered.
    let entries: Vec<Value> = versions
        .iter()
        .zip(served)
        .rev()
        .map(|(stored, resource)| {
            json!({
                "fullUrl": format!("{}/fhir/{resource_type}/{id}", state.public_url()),
                "resource": resource,
                "request": {
                    "method": if stored.meta.version == 1 { "POST" } else { "PUT" },
                    "url": format!("{resource_type}/{id}"),
                },
                "response": {
                    "status": if stored.meta.version == 1 { "201" } else { "200" },
                    "lastModified": millis_to_rfc3339(stored.meta.last_updated),
                },
            })
        })
        .collect();
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "history",
        "total": entries.len(),
        "link": [{"relation": "self", "url": format!("{}/fhir/{resource_type}/{id}/_history", state.public_url())}],
        "entry": entries,
    });
    let event = caller.audit_event(
        EventKind::Read,
        references,
        &format!("FHIR history {resource_type}"),
    );
    state.audit.record_now(&event).await?;
    Ok(fhir_json(StatusCode::OK, &bundle))
}

/// The patient's own consent as a FHIR `Consent` (the patient's own token only).
async fn read_consent(
    state: &AppState,
    caller: &FhirCaller,
    id: &str,
) -> Result<Response, ApiError> {
    if !caller.is_patient() {
        return Err(
            Error::Forbidden("consents are read by the patient with their own token").into(),
        );
    }
    let view = state.consents.current(&caller.patient_id, id).await?;
    let body = phr_consent::model::to_fhir_json(&view.consent)
        .map_err(|e| Error::Invalid(format!("consent {id}: {e}")))?;
    let event = caller.audit_event(
        EventKind::Read,
        vec![format!("Consent/{id}")],
        "FHIR read Consent",
    );
    state.audit.record_now(&event).await?;
    Ok(fhir_json(StatusCode::OK, &body))
}

/// The caller's patient's resource `id` of `resource_type` (a given version, or current).
async fn own_resource(
    state: &AppState,
    caller: &FhirCaller,
    resource_type: &str,
    id: &str,
    version: Option<i64>,
) -> Result<StoredResource, ApiError> {
    let stored = match version {
        Some(version) => {
            state
                .resources
                .read_version(&caller.patient_id, id, version)
                .await
        }
        None => state.resources.read(&caller.patient_id, id).await,
    };
    match stored {
        Ok(stored) if stored.meta.resource_type == resource_type => Ok(stored),
        Ok(_) | Err(Error::NotFound(_)) | Err(Error::KeyMissing(_)) => {
            Err(not_found(resource_type, id).into())
        }
        Err(other) => Err(other.into()),
    }
}

fn not_found(resource_type: &str, id: &str) -> Error {
    Error::NotFound(format!("{resource_type}/{id} is not known"))
}

/// `ETag: W/"<versionId>"` and `Last-Modified`, as FHIR's read answers carry.
fn with_version_headers(mut response: Response, body: &Value) -> Response {
    if let Some(version) = body["meta"]["versionId"].as_str() {
        if let Ok(value) = HeaderValue::from_str(&format!("W/\"{version}\"")) {
            response.headers_mut().insert(header::ETAG, value);
        }
    }
    response
}
