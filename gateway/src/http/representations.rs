//! Acting for someone else: operators register a parent for a dependent child or a
//! registered proxy (代理人) after checking the papers; a patient lists whom they may act
//! for and chooses in the portal (the API sends the `Acting-For` header).

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Form, Json};
use phr_consent::Representation;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::ApiError;
use super::portal::same_origin;
use super::session::{acting_for_cookie, OperatorSession, PatientSession};
use super::AppState;
use crate::audit::{AuditEvent, EventKind};
use crate::error::Error;
use crate::store::representations::RepresentationRecord;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterRepresentation {
    /// The representative's own patient id (their account's patient).
    pub representative_patient_id: String,
    /// The person they act for.
    pub represented_patient_id: String,
    /// `parent-of-dependent` or `registered-proxy`.
    pub kind: String,
    /// `YYYY-MM-DD`; required for a dependent (representation ends at majority).
    #[serde(default)]
    pub represented_birth_date: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RepresentationView {
    pub id: String,
    pub representative_patient_id: String,
    pub represented_patient_id: String,
    pub kind: String,
    pub represented_birth_date: Option<String>,
    pub active: bool,
}

impl RepresentationView {
    fn of(record: &RepresentationRecord) -> Self {
        RepresentationView {
            id: record.id.clone(),
            representative_patient_id: record.representative_patient_id.clone(),
            represented_patient_id: record.represented_patient_id.clone(),
            kind: record.kind.code().to_string(),
            represented_birth_date: record.represented_birth_date.clone(),
            active: record.active,
        }
    }
}

/// Registers a representative (after the operator checked the papers). Audited.
#[utoipa::path(post, path = "/operator/representations", tag = "operator",
    request_body = RegisterRepresentation,
    responses((status = 201, description = "Registered", body = RepresentationView),
        (status = 400, description = "Bad kind, missing or bad birth date, already of age", content_type = "application/problem+json"),
        (status = 403, description = "Not an operator", content_type = "application/problem+json")))]
pub async fn register(
    State(state): State<AppState>,
    operator: OperatorSession,
    Json(request): Json<RegisterRepresentation>,
) -> Result<(StatusCode, Json<RepresentationView>), ApiError> {
    let kind = match request.kind.as_str() {
        "parent-of-dependent" => Representation::ParentOfDependent,
        "registered-proxy" => Representation::RegisteredProxy,
        other => {
            return Err(Error::Invalid(format!(
                "kind {other:?}: use parent-of-dependent or registered-proxy"
            ))
            .into())
        }
    };
    let record = state
        .representations
        .register(
            &operator.0.agent(),
            &request.representative_patient_id,
            &request.represented_patient_id,
            kind,
            request.represented_birth_date.as_deref(),
        )
        .await?;
    state.audit.notify();
    Ok((StatusCode::CREATED, Json(RepresentationView::of(&record))))
}

/// Whom the signed-in patient may act for now.
#[utoipa::path(get, path = "/api/representations", tag = "consent",
    responses((status = 200, description = "People the patient may act for", body = [RepresentationView])))]
pub async fn list(
    State(state): State<AppState>,
    patient: PatientSession,
) -> Result<Json<Vec<RepresentationView>>, ApiError> {
    let own = patient.own_patient_id();
    let records = state.representations.represented_by(own).await?;
    let event = AuditEvent::new(EventKind::Search, patient.auth.agent())
        .patient(own)
        .detail("representations: whom this patient may act for");
    state.audit.record_now(&event).await?;
    Ok(Json(records.iter().map(RepresentationView::of).collect()))
}

#[derive(Debug, Deserialize)]
pub struct ActingForForm {
    /// Empty: act for oneself again.
    #[serde(default)]
    pub patient_id: String,
}

/// The portal's switch between acting for oneself and for a represented person.
pub async fn choose(
    State(state): State<AppState>,
    headers: HeaderMap,
    patient: PatientSession,
    Form(form): Form<ActingForForm>,
) -> Result<Response, ApiError> {
    same_origin(&headers, &state)?;
    let own = patient.own_patient_id().to_string();
    let chosen = form.patient_id.trim();
    let cookie = if chosen.is_empty() || chosen == own {
        acting_for_cookie("", 0)
    } else {
        if state.representations.active(&own, chosen).await?.is_none() {
            return Err(Error::Forbidden("you are not registered to act for this person").into());
        }
        acting_for_cookie(chosen, state.config.sessions.absolute_timeout_secs)
    };
    let mut response = Redirect::to("/portal/consents").into_response();
    response.headers_mut().insert(header::SET_COOKIE, cookie);
    Ok(response)
}
