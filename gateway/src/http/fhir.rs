//! The FHIR API lives under `/fhir`; errors there are `OperationOutcome`s. Every read by a
//! recipient's token asks the patient's consent at the point of use (the consent the token
//! was issued under, as committed now), so a withdrawal denies the very next request.
//! The rest of the FHIR API arrives with the FHIR API issue; other paths answer with a
//! clear outcome.

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use phr_consent::{Recipient, Requested};
use serde_json::Value;

use super::error::{operation_outcome, ApiError};
use super::AppState;
use crate::audit::{Actor, Agent, AuditEvent, EventKind};
use crate::consents::ConsentOutcome;
use crate::error::Error;
use crate::oauth::{AccessGrant, Scope};

pub async fn not_supported() -> Response {
    operation_outcome(
        StatusCode::NOT_FOUND,
        "this FHIR interaction is not supported yet",
    )
}

/// `GET /fhir/Patient/{id}`: the patient's demographics, for a token issued to a recipient
/// under the patient's consent. Errors become `OperationOutcome`s in the error renderer.
pub async fn read_patient(
    State(state): State<AppState>,
    grant: AccessGrant,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    if grant.patient_id.as_deref() != Some(id.as_str()) {
        return Err(Error::Forbidden("this token is for another patient").into());
    }
    let wanted = Scope::parse("patient/Patient.rs")
        .map_err(|e| Error::Invalid(format!("scope: {}", e.0)))?;
    if !wanted.covered_by_any(&grant.scopes) {
        return Err(Error::Forbidden("the token's scopes do not cover Patient").into());
    }
    let Some(consent_id) = grant.consent_id.as_deref() else {
        return Err(Error::Forbidden("this token carries no patient consent").into());
    };
    let agent = Agent {
        actor: Actor::Client {
            id: grant.client_id.clone(),
        },
        address: None,
        token_jti: Some(grant.token_family.clone()),
    };
    let outcome = state
        .consents
        .decide_under(
            &agent,
            &id,
            &Recipient::client(&grant.client_id),
            consent_id,
            Requested::ResourceType("Patient"),
        )
        .await?;
    if let ConsentOutcome::Deny {
        message_ja,
        message_en,
        ..
    } = outcome
    {
        state.audit.notify();
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!("{message_ja} / {message_en}"),
        ));
    }
    let stored = match state.resources.latest_of_type(&id, "Patient").await {
        Ok(stored) => stored,
        Err(Error::KeyMissing(_)) => {
            return Err(Error::NotFound(format!("no Patient resource is held for {id}")).into())
        }
        Err(other) => return Err(other.into()),
    };
    let mut body: Value = serde_json::from_slice(&stored.body)
        .map_err(|e| Error::Invalid(format!("stored Patient: {e}")))?;
    // The gateway's logical id for the patient, whatever the source called them.
    body["id"] = Value::String(id.clone());
    let event = AuditEvent::new(EventKind::Read, agent)
        .patient(&id)
        .resource(format!(
            "{}/{}/_history/{}",
            stored.meta.resource_type, stored.meta.id, stored.meta.version
        ))
        .detail(format!("FHIR read under consent {consent_id}"));
    state.audit.record_now(&event).await?;
    Ok((
        [(header::CONTENT_TYPE, "application/fhir+json")],
        body.to_string(),
    )
        .into_response())
}
