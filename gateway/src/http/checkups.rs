//! 特定健診 uploads: the patient (through their session) or a checkup institution (with
//! its own client credentials, under the patient's upload permission) sends one hc08 CDA
//! or the MHLW exchange ZIP.
//! Every document is validated and converted before anything is stored; one bad document
//! refuses the whole upload, so nothing is half-stored.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::TryStreamExt;
use phr_adapters::tokutei_cda;
use serde::Serialize;
use utoipa::ToSchema;

use super::error::ApiError;
use super::session::PatientSession;
use super::{AppState, ClientAddr};
use crate::audit::{Actor, Agent, AuditEvent, EventKind, Outcome};
use crate::checkups::{self, ConvertedCheckup};
use crate::error::Error;
use crate::oauth::{AccessGrant, Scope};
use crate::provenance::{provenance_for, Origin};
use crate::store::reconciliation;
use crate::store::resources::{NewResource, ResourceMeta, WriteOutcome};
use crate::uploads::UploadPermissions;
use axum::Extension;

/// The source a patient's own upload names in Provenance.
const UPLOAD_SOURCE: &str = "upload";

/// Who sends an upload, and what its Provenance and audit leaves say.
pub struct Uploader {
    pub patient_id: String,
    pub agent: Agent,
    /// The Provenance source: `upload` for the patient, `upload:<client>` for an institution.
    pub source_id: String,
    pub source_display: String,
    /// The upload permission an institution sends under (the Provenance policy).
    pub permission: Option<String>,
}

impl Uploader {
    pub fn patient(session: &PatientSession) -> Self {
        Uploader {
            patient_id: session.patient_id.clone(),
            agent: session.auth.agent(),
            source_id: UPLOAD_SOURCE.into(),
            source_display: "特定健診 upload".into(),
            permission: None,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct StoredCheckup {
    /// The gateway's id of the checkup report Bundle.
    pub id: String,
    pub checkup_date: String,
    pub institution: Option<String>,
    /// `created`, `updated`, or `unchanged` (already received, e.g. from the portal).
    pub outcome: String,
    /// Results left out of the report, with their item codes and reasons.
    pub item_errors: Vec<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UploadedCheckups {
    pub checkups: Vec<StoredCheckup>,
}

/// Uploads 特定健診 results: one CDA document (`application/hl7-v3+xml`, `application/xml`
/// or `text/xml`) or an MHLW exchange ZIP (`application/zip`).
#[utoipa::path(post, path = "/patient/checkups", tag = "checkups",
    request_body(content = Vec<u8>, description = "hc08 CDA or exchange ZIP", content_type = "application/hl7-v3+xml"),
    responses((status = 201, description = "Stored (one report per checkup, reconciled with other sources)", body = UploadedCheckups),
        (status = 400, description = "Invalid document, archive or content type, or a document about someone else; nothing stored", content_type = "application/problem+json"),
        (status = 401, description = "Not signed in", content_type = "application/problem+json")))]
pub async fn upload(
    State(state): State<AppState>,
    patient: PatientSession,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let content_type = content_type_of(&headers);
    let uploaded =
        upload_checkups(&state, &Uploader::patient(&patient), content_type, &body).await?;
    Ok((StatusCode::CREATED, Json(uploaded)).into_response())
}

/// A checkup institution uploads 特定健診 results under the patient's upload permission
/// (`{id}`, the reference the patient gave it), with a client-credentials token holding
/// `system/DocumentReference.c`. Same formats and checks as the patient's own upload.
#[utoipa::path(post, path = "/institution/upload-permissions/{id}/checkups", tag = "checkups",
    params(("id" = String, Path, description = "The patient's upload permission")),
    request_body(content = Vec<u8>, description = "hc08 CDA or exchange ZIP", content_type = "application/hl7-v3+xml"),
    responses((status = 201, description = "Stored (one report per checkup, reconciled with other sources)", body = UploadedCheckups),
        (status = 400, description = "Invalid document, archive or content type, or a document about someone else; nothing stored", content_type = "application/problem+json"),
        (status = 401, description = "No, unknown, expired or revoked token", content_type = "application/problem+json"),
        (status = 403, description = "The token lacks system/DocumentReference.c, or the permission was withdrawn or has expired", content_type = "application/problem+json"),
        (status = 404, description = "No such permission for this institution", content_type = "application/problem+json")))]
pub async fn institution_upload(
    State(state): State<AppState>,
    grant: AccessGrant,
    Extension(ClientAddr(address)): Extension<ClientAddr>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    if !Scope::CheckupUpload.covered_by_any(&grant.scopes) {
        return Err(Error::Forbidden("the token does not hold system/DocumentReference.c").into());
    }
    let agent = grant.agent(address);
    let permission = match state.uploads.admitting(&id, &grant.client_id).await {
        Ok(permission) => permission,
        Err(error) => {
            let mut event = AuditEvent::new(EventKind::Create, agent)
                .outcome(Outcome::MinorFailure)
                .detail(format!("特定健診 upload under permission refused: {error}"));
            if let Ok(known) = state.uploads.get(&id).await {
                // Only the permission's own institution learns why; the patient sees it too.
                if known.client_id == grant.client_id {
                    event = event.patient(&known.patient_id);
                    state
                        .uploads
                        .record_refused_upload(&id, &grant.client_id, &error.to_string())
                        .await?;
                }
            }
            state.audit.record_now(&event).await?;
            return Err(error.into());
        }
    };
    let institution = crate::oauth::clients::get(&state.db, &grant.client_id)
        .await?
        .map(|client| client.display_name)
        .unwrap_or_else(|| grant.client_id.clone());
    let uploader = Uploader {
        patient_id: permission.patient_id.clone(),
        agent,
        source_id: format!("upload:{}", grant.client_id),
        source_display: format!("{institution} (特定健診 upload)"),
        permission: Some(permission.id.clone()),
    };
    let content_type = content_type_of(&headers);
    let uploaded = upload_checkups(&state, &uploader, content_type, &body).await?;
    Ok((StatusCode::CREATED, Json(uploaded)).into_response())
}

/// The request's `Content-Type`, or empty.
pub(super) fn content_type_of(headers: &HeaderMap) -> &str {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
}

/// Converts and stores an upload (API and portal share it); a refusal is audited.
pub async fn upload_checkups(
    state: &AppState,
    uploader: &Uploader,
    content_type: &str,
    body: &[u8],
) -> Result<UploadedCheckups, ApiError> {
    match convert_upload(state, &uploader.patient_id, content_type, body).await {
        Ok(converted) => store(state, uploader, converted).await,
        Err(error) => {
            let event = AuditEvent::new(EventKind::Create, uploader.agent.clone())
                .outcome(Outcome::MinorFailure)
                .patient(&uploader.patient_id)
                .detail(format!("特定健診 upload refused: {error}"));
            if let (Some(permission), Actor::Client { id }) =
                (&uploader.permission, &uploader.agent.actor)
            {
                state
                    .uploads
                    .record_refused_upload(permission, id, &error.to_string())
                    .await?;
            }
            state.audit.record_now(&event).await?;
            Err(error.into())
        }
    }
}

async fn convert_upload(
    state: &AppState,
    patient_id: &str,
    content_type: &str,
    body: &[u8],
) -> Result<Vec<ConvertedCheckup>, Error> {
    let content_type = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let documents: Vec<(String, Vec<u8>)> = match content_type.as_str() {
        "application/zip" => {
            let archive = tokutei_cda::read_exchange_zip(body)
                .map_err(|e| Error::Invalid(format!("exchange ZIP: {e}")))?;
            archive
                .checkup_documents()
                .map(|document| (document.path.clone(), document.bytes.clone()))
                .collect()
        }
        "application/hl7-v3+xml" | "application/xml" | "text/xml" => {
            vec![("the document".to_string(), body.to_vec())]
        }
        other => {
            return Err(Error::Invalid(format!(
                "content type {other:?}: send a 特定健診 CDA (application/hl7-v3+xml) or an \
                 exchange ZIP (application/zip)"
            )))
        }
    };
    if documents.is_empty() {
        return Err(Error::Invalid(
            "the archive holds no checkup results".into(),
        ));
    }
    let known = known_birth_dates(state, patient_id).await?;
    let mut converted = Vec::with_capacity(documents.len());
    for (name, xml) in documents {
        let checkup = checkups::convert(patient_id, &xml).map_err(|e| match e {
            Error::Invalid(reason) => Error::Invalid(format!("{name}: {reason}")),
            other => other,
        })?;
        if let Some(birth_date) = &checkup.birth_date {
            if !known.is_empty() && !known.contains(birth_date) {
                return Err(Error::Invalid(format!(
                    "{name} is about another person: its birth date does not match the \
                     patient's records"
                )));
            }
        }
        converted.push(checkup);
    }
    Ok(converted)
}

/// Birth dates in the patient's records (Patients and checkup reports), to recognise a
/// document about someone else. Empty when nothing is known yet.
pub(super) async fn known_birth_dates(
    state: &AppState,
    patient_id: &str,
) -> Result<Vec<String>, Error> {
    let stream = match state.resources.stream_current(patient_id).await {
        Ok(stream) => stream,
        Err(Error::KeyMissing(_)) | Err(Error::NotFound(_)) => return Ok(Vec::new()),
        Err(other) => return Err(other),
    };
    let mut dates: Vec<String> = stream
        .try_filter_map(|resource| async move {
            Ok(Some(checkups::birth_dates_in(
                &resource.meta.resource_type,
                &resource.body,
            )))
        })
        .try_concat()
        .await?;
    dates.sort();
    dates.dedup();
    Ok(dates)
}

/// The checkups, their upload Provenance and the audit leaf commit together.
async fn store(
    state: &AppState,
    uploader: &Uploader,
    converted: Vec<ConvertedCheckup>,
) -> Result<UploadedCheckups, ApiError> {
    let agent = uploader.agent.clone();
    let batch: Vec<NewResource> = converted.iter().map(|c| c.resource.clone()).collect();
    for new in &batch {
        state.resources.validate(new)?;
    }
    let keys = state.resources.data_keys_for(&batch).await?;
    let origin = Origin {
        patient_id: &uploader.patient_id,
        source_id: &uploader.source_id,
        source_display: &uploader.source_display,
        policy: uploader
            .permission
            .as_ref()
            .map(|id| format!("urn:phr-gateway:upload-permission:{id}")),
        entity: None,
    };
    // Each upload is a source of its checkups, even of those already received.
    let provenance = |_page: usize, written: &[(ResourceMeta, WriteOutcome)]| {
        let targets: Vec<&ResourceMeta> = written.iter().map(|(meta, _)| meta).collect();
        provenance_for(&origin, &targets)
    };
    let mut tx = state.db.begin().await?;
    let written = state
        .resources
        .put_batch_in(
            &mut tx,
            &agent,
            batch,
            &keys,
            Some("特定健診 upload".into()),
            Some(&provenance),
        )
        .await?;
    crate::notifications::announce_written_in(&mut tx, &uploader.patient_id, &written).await?;
    for (meta, _) in &written {
        reconciliation::record_origin_in(
            &mut tx,
            &uploader.patient_id,
            &meta.resource_type,
            &meta.source_resource_id,
            &uploader.source_id,
        )
        .await?;
    }
    if let (Some(permission), Actor::Client { id }) = (&uploader.permission, &agent.actor) {
        let detail = format!("{} checkup report(s)", written.len());
        UploadPermissions::record_upload_in(&mut tx, permission, id, &detail, false).await?;
    }
    tx.commit().await.map_err(Error::from)?;
    state.audit.notify();
    let checkups = converted
        .into_iter()
        .zip(written)
        .map(|(checkup, (meta, outcome))| StoredCheckup {
            id: meta.id,
            checkup_date: checkup.checkup_date,
            institution: checkup.institution,
            outcome: match outcome {
                WriteOutcome::Unchanged => "unchanged",
                WriteOutcome::Created => "created",
                WriteOutcome::NewVersion => "updated",
            }
            .into(),
            item_errors: checkup.item_errors,
        })
        .collect();
    Ok(UploadedCheckups { checkups })
}
