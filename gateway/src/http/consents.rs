//! The patient's disclosure consents over the API: list, read with history and receipts,
//! change, and withdraw in one call. Every read and change is audited; another patient's
//! consent is reported as absent.

use axum::extract::{Path, State};
use axum::Json;
use phr_consent::{DataCategory, Purpose};
use serde::{Deserialize, Serialize};
use time::{OffsetDateTime, Time};
use utoipa::ToSchema;

use super::error::ApiError;
use super::session::PatientSession;
use super::AppState;
use crate::audit::{AuditEvent, EventKind};
use crate::consents::{ConsentVersionView, ConsentView, ReceiptContext};
use crate::error::Error;
use crate::store::{japan_today, parse_day, JAPAN};

/// One consent as listed.
#[derive(Serialize, ToSchema)]
pub struct ConsentSummary {
    pub id: String,
    pub version: u32,
    /// `active`, `inactive` (withdrawn), `proposed` or `rejected`.
    pub status: String,
    /// The recipient's client id and name.
    pub recipient: String,
    pub recipient_display: String,
    /// Purpose codes.
    pub purposes: Vec<String>,
    /// Data category codes.
    pub categories: Vec<String>,
    /// RFC 3339; nothing is disclosed from this instant.
    pub ends_at: Option<String>,
    /// Whether anything may be disclosed under it now.
    pub in_force: bool,
    /// A representative gave it and no longer acts for the patient: keep it
    /// (`/confirm`) or withdraw it.
    pub needs_confirmation: bool,
    /// In force and ending soon: the patient is reminded to renew or let it end.
    pub ends_soon: bool,
}

impl ConsentSummary {
    fn of(view: &ConsentView) -> Self {
        ConsentSummary {
            id: view.id.clone(),
            version: view.version,
            status: view.status.code().to_string(),
            recipient: view.recipient.clone(),
            recipient_display: view.recipient_display.clone(),
            purposes: view.purposes.clone(),
            categories: view
                .categories
                .iter()
                .map(|c| c.code().to_string())
                .collect(),
            ends_at: view.ends_at.clone(),
            in_force: view.in_force,
            needs_confirmation: view.needs_confirmation,
            ends_soon: view.ends_soon,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct ConsentVersion {
    pub version: u32,
    /// `granted`, `changed` or `withdrawn`.
    pub event: String,
    pub status: String,
    pub recorded_at: String,
    /// The account that made this version (the patient or their representative).
    pub performer: String,
    /// Signed receipt (compact JWS; keys at `/.well-known/jwks.json`).
    pub receipt: String,
}

impl ConsentVersion {
    fn of(view: ConsentVersionView) -> Self {
        ConsentVersion {
            version: view.version,
            event: view.event,
            status: view.status.code().to_string(),
            recorded_at: view.recorded_at,
            performer: view.performer,
            receipt: view.receipt,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct ConsentDetail {
    pub consent: ConsentSummary,
    /// The current version as a FHIR R4 `Consent`.
    #[schema(value_type = Object)]
    pub fhir: serde_json::Value,
    pub history: Vec<ConsentVersion>,
}

#[derive(Serialize, ToSchema)]
pub struct ConsentChanged {
    pub consent: ConsentSummary,
    /// Signed receipt of this change.
    pub receipt: String,
}

/// A change to what a consent permits. Everything is stated in full: what is not listed
/// is no longer permitted.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangeConsent {
    /// Purpose codes, from those the gateway offers.
    pub purposes: Vec<String>,
    /// Data category codes.
    pub categories: Vec<String>,
    /// The last day covered (`YYYY-MM-DD`, Japan time).
    pub ends_on: String,
    /// When acting for someone else: your password again (step-up)…
    #[serde(default)]
    pub password: Option<String>,
    /// …and your second factor, if you have one (a TOTP or recovery code, or a passkey).
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub passkey: Option<super::second_factor::PasskeyAssertion>,
}

/// The patient's consents, newest first.
#[utoipa::path(get, path = "/api/consents", tag = "consent",
    responses((status = 200, description = "The patient's consents", body = [ConsentSummary]),
        (status = 401, description = "Not signed in", content_type = "application/problem+json")))]
pub async fn list(
    State(state): State<AppState>,
    patient: PatientSession,
) -> Result<Json<Vec<ConsentSummary>>, ApiError> {
    let consents = state.consents.list(&patient.patient_id).await?;
    audit_read(&state, &patient, None).await?;
    Ok(Json(consents.iter().map(ConsentSummary::of).collect()))
}

/// One consent: its current version (also as FHIR `Consent`) and its history with receipts.
#[utoipa::path(get, path = "/api/consents/{id}", tag = "consent",
    params(("id" = String, Path)),
    responses((status = 200, description = "The consent", body = ConsentDetail),
        (status = 404, description = "No such consent for this patient", content_type = "application/problem+json")))]
pub async fn detail(
    State(state): State<AppState>,
    patient: PatientSession,
    Path(id): Path<String>,
) -> Result<Json<ConsentDetail>, ApiError> {
    let view = state.consents.current(&patient.patient_id, &id).await?;
    let history = state.consents.history(&patient.patient_id, &id).await?;
    let fhir = phr_consent::to_fhir_json(&view.consent)
        .map_err(|e| Error::Invalid(format!("stored consent: {e}")))?;
    audit_read(&state, &patient, Some(&id)).await?;
    Ok(Json(ConsentDetail {
        consent: ConsentSummary::of(&view),
        fhir,
        history: history.into_iter().map(ConsentVersion::of).collect(),
    }))
}

/// Withdraws a consent in one call: the next request under it is denied, and the patient
/// gets a signed withdrawal receipt.
#[utoipa::path(post, path = "/api/consents/{id}/withdraw", tag = "consent",
    params(("id" = String, Path)),
    responses((status = 200, description = "Withdrawn", body = ConsentChanged),
        (status = 404, description = "No such consent for this patient", content_type = "application/problem+json"),
        (status = 409, description = "Already withdrawn", content_type = "application/problem+json")))]
pub async fn withdraw(
    State(state): State<AppState>,
    patient: PatientSession,
    Path(id): Path<String>,
) -> Result<Json<ConsentChanged>, ApiError> {
    let context = receipt_context(&state, "ja", "api");
    Ok(Json(
        withdraw_consent(&state, &patient, &id, &context).await?,
    ))
}

/// Withdrawal, shared by the API and the portal.
pub async fn withdraw_consent(
    state: &AppState,
    patient: &PatientSession,
    id: &str,
    context: &ReceiptContext,
) -> Result<ConsentChanged, ApiError> {
    let (consent, receipt) = state
        .consents
        .withdraw(
            &patient.auth.agent(),
            &patient.patient_id,
            id,
            patient.performer(),
            &patient.auth.session.account.id,
            context,
        )
        .await?;
    // Every access re-checks the consent anyway; revoking also ends refreshes at once.
    crate::oauth::revoke_by_consent(&state.db, &consent.id).await?;
    state.audit.notify();
    changed(state, &consent, receipt).await
}

/// Keeps a consent a representative gave (the patient now acts for themself): a new version
/// made by the patient, with the same terms and its own receipt.
#[utoipa::path(post, path = "/api/consents/{id}/confirm", tag = "consent",
    params(("id" = String, Path)),
    responses((status = 200, description = "Kept, now as the patient's own", body = ConsentChanged),
        (status = 403, description = "Only the patient themself can confirm", content_type = "application/problem+json"),
        (status = 404, description = "No such consent for this patient", content_type = "application/problem+json"),
        (status = 409, description = "Not waiting for confirmation", content_type = "application/problem+json")))]
pub async fn confirm(
    State(state): State<AppState>,
    patient: PatientSession,
    Path(id): Path<String>,
) -> Result<Json<ConsentChanged>, ApiError> {
    let context = receipt_context(&state, "ja", "api");
    Ok(Json(
        confirm_consent(&state, &patient, &id, &context).await?,
    ))
}

/// Confirmation, shared by the API and the portal.
pub async fn confirm_consent(
    state: &AppState,
    patient: &PatientSession,
    id: &str,
    context: &ReceiptContext,
) -> Result<ConsentChanged, ApiError> {
    if patient.acting.is_some() {
        return Err(Error::Forbidden("only the person themself can confirm").into());
    }
    let (consent, receipt) = state
        .consents
        .confirm(
            &patient.auth.agent(),
            &patient.patient_id,
            id,
            &patient.auth.session.account.id,
            context,
        )
        .await?;
    changed(state, &consent, receipt).await
}

/// Changes what a consent permits (narrow or widen purposes and categories, move the end
/// date); a new version with its own receipt.
#[utoipa::path(post, path = "/api/consents/{id}/change", tag = "consent",
    params(("id" = String, Path)), request_body = ChangeConsent,
    responses((status = 200, description = "Changed", body = ConsentChanged),
        (status = 400, description = "Bad purposes, categories or end date", content_type = "application/problem+json"),
        (status = 404, description = "No such consent for this patient", content_type = "application/problem+json"),
        (status = 409, description = "Withdrawn, or changed meanwhile", content_type = "application/problem+json")))]
pub async fn change(
    State(state): State<AppState>,
    patient: PatientSession,
    Path(id): Path<String>,
    Json(request): Json<ChangeConsent>,
) -> Result<Json<ConsentChanged>, ApiError> {
    let proof = super::second_factor::step_up_proof(request.code.as_deref(), request.passkey);
    super::second_factor::step_up_acting_for(
        &state,
        &patient,
        request.password.as_deref(),
        proof.as_ref(),
        "changing a consent for someone else",
    )
    .await?;
    let purposes = purposes_of(&state, &request.purposes)?;
    let categories = categories_of(&request.categories)?;
    if purposes.is_empty() || categories.is_empty() {
        return Err(Error::Invalid(
            "choose at least one purpose and one category; to stop sharing, withdraw".into(),
        )
        .into());
    }
    let ends_at = end_of_day(&request.ends_on, state.consents.config().max_period_days)?;
    let context = receipt_context(&state, "ja", "api");
    let (consent, receipt) = state
        .consents
        .amend(
            &patient.auth.agent(),
            &patient.patient_id,
            &id,
            patient.performer(),
            &patient.auth.session.account.id,
            purposes,
            categories,
            ends_at,
            &context,
        )
        .await?;
    Ok(Json(changed(&state, &consent, receipt).await?))
}

/// The answer to a change: the consent as it now stands, and the change's receipt.
async fn changed(
    state: &AppState,
    consent: &phr_consent::Consent,
    receipt: String,
) -> Result<ConsentChanged, ApiError> {
    let view = state
        .consents
        .current(&consent.patient.id, &consent.id)
        .await?;
    Ok(ConsentChanged {
        consent: ConsentSummary::of(&view),
        receipt,
    })
}

/// The configured purposes with these codes; an unknown code is refused by name.
pub fn purposes_of(state: &AppState, codes: &[String]) -> Result<Vec<Purpose>, ApiError> {
    codes
        .iter()
        .map(|code| {
            state
                .consents
                .config()
                .purpose(code)
                .map(|p| Purpose::new(&p.system, &p.code))
                .ok_or_else(|| Error::Invalid(format!("unknown purpose {code:?}")).into())
        })
        .collect()
}

/// The categories with these codes; an unknown code is refused by name.
pub fn categories_of(codes: &[String]) -> Result<Vec<DataCategory>, ApiError> {
    codes
        .iter()
        .map(|code| {
            DataCategory::from_code(code)
                .ok_or_else(|| Error::Invalid(format!("unknown category {code:?}")).into())
        })
        .collect()
}

/// The first instant after the chosen last day (Japan time), checked against the maximum.
pub fn end_of_day(ends_on: &str, max_days: u32) -> Result<OffsetDateTime, ApiError> {
    let day = parse_day(ends_on, "end date")?;
    let today = japan_today();
    if day < today {
        return Err(Error::Invalid("the end date has passed".into()).into());
    }
    if day > today + time::Duration::days(i64::from(max_days)) {
        return Err(
            Error::Invalid(format!("the end date may be at most {max_days} days ahead")).into(),
        );
    }
    let next = day
        .next_day()
        .ok_or_else(|| Error::Invalid("end date out of range".into()))?;
    Ok(next.with_time(Time::MIDNIGHT).assume_offset(JAPAN))
}

pub fn receipt_context(state: &AppState, language: &str, method: &str) -> ReceiptContext {
    ReceiptContext {
        notice_url: format!(
            "{}/consent/notice?version={}",
            state.public_url(),
            state.consents.config().notice_version
        ),
        language: language.to_string(),
        collection_method: method.to_string(),
    }
}

/// Audits a read of the patient's consents (one, or the list).
pub(super) async fn audit_read(
    state: &AppState,
    patient: &PatientSession,
    id: Option<&str>,
) -> Result<(), ApiError> {
    let (kind, detail) = match id {
        Some(id) => (EventKind::Read, format!("consent {id}")),
        None => (EventKind::Search, "consents".to_string()),
    };
    let event = AuditEvent::new(kind, patient.auth.agent())
        .patient(&patient.patient_id)
        .detail(detail);
    state.audit.record_now(&event).await?;
    Ok(())
}
