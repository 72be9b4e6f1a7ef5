//! The patient's pull instructions: give one (and be sent to the source to authorise), come
//! back from the source, watch progress, withdraw in one action.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use phr_adapters::{AuthorizationRequest, Callback, LinkMode, PendingAuthorization};
use phr_consent::DataCategory;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::ApiError;
use super::session::PatientSession;
use super::AppState;
use crate::audit::{Agent, AuditEvent, EventKind};
use crate::error::Error;
use crate::pull::queue::JobProgress;
use crate::pull::registry::{unavailable_since, unavailable_sources, SourceInfo};
use crate::pull::{Instruction, InstructionStatus};
use crate::store::millis_to_rfc3339;

#[derive(Debug, Serialize, ToSchema)]
pub struct CategoryView {
    pub code: &'static str,
    pub label_ja: &'static str,
    pub label_en: &'static str,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SourceView {
    pub id: String,
    pub kind: String,
    pub display_name: String,
    /// How the patient links it: `redirect` (authorise at the source) or `linking-code`
    /// (enter the code the source gave them).
    pub link_mode: String,
    /// Set while the source is down or in maintenance (RFC 3339).
    pub unavailable_since: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SourcesView {
    pub sources: Vec<SourceView>,
    /// The categories a patient can choose; nothing is chosen in advance.
    pub categories: Vec<CategoryView>,
}

fn categories() -> Vec<CategoryView> {
    DataCategory::ALL
        .into_iter()
        .map(|c| CategoryView {
            code: c.code(),
            label_ja: c.label_ja(),
            label_en: c.label_en(),
        })
        .collect()
}

async fn source_views(state: &AppState) -> Result<Vec<SourceView>, ApiError> {
    let down = unavailable_sources(&state.db).await?;
    Ok(state
        .registry
        .infos()
        .into_iter()
        .map(|info| SourceView {
            unavailable_since: unavailable_since(&down, &info.id),
            link_mode: match state
                .registry
                .get(&info.id)
                .map(|(_, source)| source.link_mode())
            {
                Ok(LinkMode::LinkingCode) => "linking-code".into(),
                _ => "redirect".into(),
            },
            id: info.id,
            kind: info.kind,
            display_name: info.display_name,
        })
        .collect())
}

/// Sources the patient can instruct the gateway to fetch from, and the categories.
#[utoipa::path(get, path = "/patient/sources", tag = "pull",
    responses((status = 200, description = "Sources and categories", body = SourcesView),
        (status = 401, description = "Not signed in", content_type = "application/problem+json")))]
pub async fn sources(
    State(state): State<AppState>,
    _patient: PatientSession,
) -> Result<Json<SourcesView>, ApiError> {
    Ok(Json(SourcesView {
        sources: source_views(&state).await?,
        categories: categories(),
    }))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GiveInstruction {
    pub source_id: String,
    /// Category codes (see `/patient/sources`); at least one.
    pub categories: Vec<String>,
    /// For sources with `link_mode` `linking-code`: the one-time code the source gave the
    /// patient. Not accepted for other sources.
    #[serde(default)]
    pub linking_code: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct InstructionView {
    pub id: String,
    pub source_id: String,
    pub status: String,
    pub categories: Vec<String>,
    pub created_at: String,
    pub updated_at: String,
    /// Set while the source is down: data already fetched stays available.
    pub source_unavailable_since: Option<String>,
}

impl InstructionView {
    fn of(instruction: &Instruction, unavailable_since: Option<String>) -> Self {
        InstructionView {
            id: instruction.id.clone(),
            source_id: instruction.source_id.clone(),
            status: serde_json::to_value(instruction.status)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            categories: instruction
                .categories
                .iter()
                .map(|c| c.code().to_string())
                .collect(),
            created_at: millis_to_rfc3339(instruction.created_at),
            updated_at: millis_to_rfc3339(instruction.updated_at),
            source_unavailable_since: unavailable_since,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct GivenInstruction {
    pub instruction: InstructionView,
    /// Send the patient here to authorise at the source; absent when a linking code
    /// linked the source at once.
    pub authorize_url: Option<String>,
    /// Signed receipt (JWS; keys at `/.well-known/jwks.json`).
    pub receipt: String,
    /// Receipt of the link, when a linking code linked the source at once.
    pub link_receipt: Option<String>,
}

/// Instructs the gateway to fetch from a source, for the chosen categories.
#[utoipa::path(post, path = "/patient/pull-instructions", tag = "pull", request_body = GiveInstruction,
    responses((status = 201, description = "Given; authorise at the source next", body = GivenInstruction),
        (status = 400, description = "Unknown source or category", content_type = "application/problem+json"),
        (status = 502, description = "The source's discovery failed or is unsupported", content_type = "application/problem+json"),
        (status = 503, description = "The source is unavailable", content_type = "application/problem+json")))]
pub async fn give(
    State(state): State<AppState>,
    patient: PatientSession,
    Json(request): Json<GiveInstruction>,
) -> Result<Response, ApiError> {
    let given = give_instruction(
        &state,
        &patient,
        &request.source_id,
        &request.categories,
        request.linking_code.as_deref(),
    )
    .await?;
    let body = GivenInstruction {
        instruction: InstructionView::of(&given.instruction, None),
        authorize_url: given.authorize_url,
        receipt: given.receipt,
        link_receipt: given.link_receipt,
    };
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// A given instruction and where the patient authorises it.
pub struct Given {
    pub instruction: Instruction,
    pub source: SourceInfo,
    /// Where the patient authorises; `None` when a linking code linked the source at once.
    pub authorize_url: Option<String>,
    pub receipt: String,
    pub link_receipt: Option<String>,
}

/// Giving an instruction, shared by the API and the portal: checks the source and the
/// categories, starts the source's authorisation, records the instruction with its receipt.
pub async fn give_instruction(
    state: &AppState,
    patient: &PatientSession,
    source_id: &str,
    category_codes: &[String],
    linking_code: Option<&str>,
) -> Result<Given, ApiError> {
    let (info, source) = state
        .registry
        .get(source_id)
        .map_err(|_| Error::Invalid(format!("unknown source {source_id:?}")))?;
    let mut chosen = Vec::new();
    for code in category_codes {
        chosen.push(
            DataCategory::from_code(code)
                .ok_or_else(|| Error::Invalid(format!("unknown category {code:?}")))?,
        );
    }
    if chosen.is_empty() {
        return Err(Error::Invalid("choose at least one category".into()).into());
    }
    let linking_code = linking_code.map(str::trim).filter(|code| !code.is_empty());
    match (source.link_mode(), linking_code) {
        (LinkMode::LinkingCode, None) => {
            return Err(Error::Invalid(format!(
                "enter the linking code {} gave you",
                info.display_name
            ))
            .into())
        }
        (LinkMode::Redirect, Some(_)) => {
            return Err(
                Error::Invalid(format!("{} does not use linking codes", info.display_name)).into(),
            )
        }
        _ => {}
    }
    let instruction_id = uuid::Uuid::now_v7().to_string();
    let resource_types = DataCategory::resource_types_of(&chosen);
    let start = source
        .start_authorization(&AuthorizationRequest {
            instruction_id: instruction_id.clone(),
            resource_types,
            redirect_uri: format!("{}/patient/sources/callback", state.public_url()),
            // A representative asks the source for proxy access and chooses the person
            // there (the source knows its proxies); sources without proxy access refuse.
            on_behalf_of: patient
                .acting
                .as_ref()
                .map(|_| phr_adapters::self_info::CHOOSE_AT_PORTAL.to_string()),
        })
        .await
        .map_err(Error::from)?;
    let (instruction, receipt) = state
        .instructions
        .give(
            &patient.auth.agent(),
            &instruction_id,
            &patient.auth.session.account.id,
            &patient.patient_id,
            info,
            &chosen,
            &start.pending,
        )
        .await?;
    state.audit.notify();
    let Some(code) = linking_code else {
        return Ok(Given {
            instruction,
            source: info.clone(),
            authorize_url: Some(start.authorize_url),
            receipt,
            link_receipt: None,
        });
    };
    let callback = Callback {
        code: Some(code.to_string()),
        state: Some(start.pending.state.clone()),
        error: None,
        error_description: None,
    };
    let linked = link(state, &instruction, &start.pending, &callback).await?;
    let mut active = instruction;
    active.status = InstructionStatus::Active;
    Ok(Given {
        instruction: active,
        source: info.clone(),
        authorize_url: None,
        receipt,
        link_receipt: Some(linked.receipt),
    })
}

#[derive(Debug, Deserialize)]
pub struct CallbackQuery {
    pub code: Option<String>,
    pub state: Option<String>,
    pub error: Option<String>,
    pub error_description: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LinkedInstruction {
    pub instruction: InstructionView,
    pub receipt: String,
}

/// Where the source sends the patient back. Authenticated by `state`, which only the
/// patient's own authorisation carries (the session cookie may not come along a
/// cross-site redirect).
#[utoipa::path(get, path = "/patient/sources/callback", tag = "pull",
    params(("code" = Option<String>, Query), ("state" = Option<String>, Query), ("error" = Option<String>, Query)),
    responses((status = 200, description = "Linked; the first pull is queued", body = LinkedInstruction),
        (status = 400, description = "Declined, unknown state or failed exchange", content_type = "application/problem+json")))]
pub async fn callback(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    Query(query): Query<CallbackQuery>,
) -> Result<Response, ApiError> {
    // A browser coming back from the source goes to the portal; API clients get JSON.
    let browser = headers
        .get(axum::http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("text/html"));
    let linked = finish_link(&state, query).await;
    match (linked, browser) {
        (Ok(_), true) | (Err(_), true) => {
            Ok(axum::response::Redirect::to("/portal").into_response())
        }
        (Ok(linked), false) => Ok(Json(linked).into_response()),
        (Err(e), false) => Err(e),
    }
}

async fn finish_link(
    state: &AppState,
    query: CallbackQuery,
) -> Result<LinkedInstruction, ApiError> {
    let state_param = query
        .state
        .clone()
        .ok_or_else(|| Error::Invalid("the source's answer has no state".into()))?;
    let (instruction, pending) = state
        .instructions
        .pending_by_state(&state_param)
        .await
        .map_err(|e| match e {
            Error::NotFound(_) => {
                Error::Invalid("no authorisation is waiting for this answer".into())
            }
            other => other,
        })?;
    let callback = Callback {
        code: query.code,
        state: query.state,
        error: query.error,
        error_description: query.error_description,
    };
    link(state, &instruction, &pending, &callback).await
}

/// Finishes the source's authorisation: the instruction becomes active (first pull
/// queued) or failed with the source's reason.
async fn link(
    state: &AppState,
    instruction: &Instruction,
    pending: &PendingAuthorization,
    callback: &Callback,
) -> Result<LinkedInstruction, ApiError> {
    let (info, source) = state.registry.get(&instruction.source_id)?;
    let agent = Agent::system();
    match source.finish_authorization(pending, callback).await {
        Ok(credentials) => {
            let receipt = state
                .instructions
                .activate(&agent, instruction, info, &credentials)
                .await?;
            state.audit.notify();
            let mut active = instruction.clone();
            active.status = InstructionStatus::Active;
            Ok(LinkedInstruction {
                instruction: InstructionView::of(&active, None),
                receipt,
            })
        }
        Err(e) => {
            state
                .instructions
                .fail(&agent, instruction, &e.to_string())
                .await?;
            state.audit.notify();
            Err(Error::Source(e).into())
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct InstructionList {
    pub instructions: Vec<InstructionView>,
}

/// The patient's instructions, newest first, with source availability.
#[utoipa::path(get, path = "/patient/pull-instructions", tag = "pull",
    responses((status = 200, description = "Instructions", body = InstructionList),
        (status = 401, description = "Not signed in", content_type = "application/problem+json")))]
pub async fn list(
    State(state): State<AppState>,
    patient: PatientSession,
) -> Result<Json<InstructionList>, ApiError> {
    let down = unavailable_sources(&state.db).await?;
    let instructions = state.instructions.list(&patient.patient_id).await?;
    audit_instruction_read(&state, &patient, None).await?;
    Ok(Json(InstructionList {
        instructions: instructions
            .iter()
            .map(|i| {
                let since = unavailable_since(&down, &i.source_id);
                InstructionView::of(i, since)
            })
            .collect(),
    }))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EventView {
    pub at: String,
    pub event: String,
    pub actor: String,
    pub detail: Option<String>,
    pub receipt: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct JobView {
    pub id: String,
    pub status: String,
    pub attempts: i64,
    pub received: i64,
    pub unchanged: i64,
    pub rejected: i64,
    pub last_error: Option<String>,
    pub next_attempt_at: String,
    pub finished_at: Option<String>,
}

impl From<JobProgress> for JobView {
    fn from(job: JobProgress) -> Self {
        JobView {
            id: job.id,
            status: job.status,
            attempts: job.attempts,
            received: job.received,
            unchanged: job.unchanged,
            rejected: job.rejected,
            last_error: job.last_error,
            next_attempt_at: millis_to_rfc3339(job.not_before),
            finished_at: job.finished_at.map(millis_to_rfc3339),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct InstructionDetail {
    pub instruction: InstructionView,
    pub history: Vec<EventView>,
    pub jobs: Vec<JobView>,
}

/// Reading instructions (their history, receipts, progress) is a read of the patient's
/// record: audited like any other.
pub async fn audit_instruction_read(
    state: &AppState,
    patient: &PatientSession,
    instruction_id: Option<&str>,
) -> Result<(), ApiError> {
    let (kind, detail) = match instruction_id {
        Some(id) => (EventKind::Read, format!("pull instruction {id}")),
        None => (EventKind::Search, "pull instructions".to_string()),
    };
    let event = AuditEvent::new(kind, patient.auth.agent())
        .patient(&patient.patient_id)
        .detail(detail);
    state.audit.record_now(&event).await?;
    Ok(())
}

async fn own_instruction(
    state: &AppState,
    patient: &PatientSession,
    id: &str,
) -> Result<Instruction, ApiError> {
    let instruction = state.instructions.get(id).await?;
    // Someone else's instruction is reported as absent, not forbidden.
    if instruction.patient_id != patient.patient_id {
        return Err(Error::NotFound(format!("pull instruction {id}")).into());
    }
    Ok(instruction)
}

/// One instruction: its history with receipts, and the progress of its pulls.
#[utoipa::path(get, path = "/patient/pull-instructions/{id}", tag = "pull",
    params(("id" = String, Path)),
    responses((status = 200, description = "The instruction", body = InstructionDetail),
        (status = 404, description = "No such instruction for this patient", content_type = "application/problem+json")))]
pub async fn detail(
    State(state): State<AppState>,
    patient: PatientSession,
    Path(id): Path<String>,
) -> Result<Json<InstructionDetail>, ApiError> {
    let instruction = own_instruction(&state, &patient, &id).await?;
    audit_instruction_read(&state, &patient, Some(&id)).await?;
    let down = unavailable_sources(&state.db).await?;
    let since = unavailable_since(&down, &instruction.source_id);
    let history = state
        .instructions
        .events(&id)
        .await?
        .into_iter()
        .map(|e| EventView {
            at: millis_to_rfc3339(e.at),
            event: e.event,
            actor: e.actor,
            detail: e.detail,
            receipt: e.receipt,
        })
        .collect();
    let jobs = state
        .queue
        .progress(&id)
        .await?
        .into_iter()
        .map(JobView::from)
        .collect();
    Ok(Json(InstructionDetail {
        instruction: InstructionView::of(&instruction, since),
        history,
        jobs,
    }))
}

#[derive(Debug, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct Withdraw {
    /// Also delete what was already received from this source (default: keep it).
    #[serde(default)]
    pub delete_received: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Withdrawn {
    pub instruction: InstructionView,
    pub receipt: String,
    /// Whether the source confirmed the revocation (it is retried later if not).
    pub revoked_at_source: bool,
    pub deleted_resources: u64,
}

/// Withdraws the instruction in one action: pulls stop at once, the link is revoked.
#[utoipa::path(post, path = "/patient/pull-instructions/{id}/withdraw", tag = "pull",
    params(("id" = String, Path)), request_body = Withdraw,
    responses((status = 200, description = "Withdrawn", body = Withdrawn),
        (status = 400, description = "Already withdrawn", content_type = "application/problem+json"),
        (status = 404, description = "No such instruction for this patient", content_type = "application/problem+json")))]
pub async fn withdraw(
    State(state): State<AppState>,
    patient: PatientSession,
    Path(id): Path<String>,
    body: Option<Json<Withdraw>>,
) -> Result<Json<Withdrawn>, ApiError> {
    let request = body.map(|Json(b)| b).unwrap_or_default();
    Ok(Json(
        withdraw_instruction(&state, &patient, &id, request).await?,
    ))
}

/// Withdrawal, shared by the API and the portal.
pub async fn withdraw_instruction(
    state: &AppState,
    patient: &PatientSession,
    id: &str,
    request: Withdraw,
) -> Result<Withdrawn, ApiError> {
    let instruction = own_instruction(state, patient, id).await?;
    let info: SourceInfo = state
        .registry
        .get(&instruction.source_id)
        .map(|(info, _)| info.clone())
        .unwrap_or_else(|_| SourceInfo {
            id: instruction.source_id.clone(),
            kind: "unknown".into(),
            display_name: instruction.source_id.clone(),
        });
    let agent = patient.auth.agent();
    let (receipt, credentials) = state
        .instructions
        .withdraw(
            &agent,
            &patient.auth.session.account.id,
            &instruction,
            &info,
        )
        .await?;
    // Revocation at the source is best effort: the link's secrets are already gone here.
    let mut revoked_at_source = false;
    if let (Some(credentials), Ok((_, source))) =
        (credentials, state.registry.get(&instruction.source_id))
    {
        match source.revoke(&credentials).await {
            Ok(()) => revoked_at_source = true,
            Err(e) => {
                tracing::warn!(error = %e, source = %instruction.source_id, "revocation at the source failed")
            }
        }
    }
    let deleted_resources = if request.delete_received {
        state
            .resources
            .delete_from_source(&agent, &patient.patient_id, &instruction.source_id)
            .await?
    } else {
        0
    };
    state.audit.notify();
    let mut withdrawn = instruction.clone();
    withdrawn.status = InstructionStatus::Withdrawn;
    Ok(Withdrawn {
        instruction: InstructionView::of(&withdrawn, None),
        receipt,
        revoked_at_source,
        deleted_resources,
    })
}

/// The gateway's public keys: receipt signatures (and client authentication at sources).
#[utoipa::path(get, path = "/.well-known/jwks.json", tag = "keys",
    responses((status = 200, description = "JWK Set", content_type = "application/jwk-set+json")))]
pub async fn jwks(State(state): State<AppState>) -> Response {
    let mut keys = vec![
        state.receipts.public_jwk(),
        state.source_client_key.public_jwk(),
    ];
    // The ID-token signing key, and any rotated out but still in its overlap.
    keys.extend(
        state
            .id_token_keys
            .public_jwks(crate::oauth::jws_keys::now_secs()),
    );
    let keys = serde_json::json!({ "keys": keys });
    (
        [(axum::http::header::CONTENT_TYPE, "application/jwk-set+json")],
        keys.to_string(),
    )
        .into_response()
}
