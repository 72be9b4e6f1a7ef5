//! The patient brings a record exported by another PHR service (or by this gateway): a FHIR
//! Bundle or a ZIP of NDJSON. All or nothing: a file that is not FHIR, is about someone else
//! or is too large is refused and nothing is stored; what is stored gets a Provenance naming
//! the import, and is audited.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::checkups::{content_type_of, known_birth_dates};
use super::error::ApiError;
use super::session::PatientSession;
use super::AppState;
use crate::audit::{Agent, AuditEvent, EventKind, Outcome};
use crate::error::Error;
use crate::import;
use crate::provenance::{provenance_for, Origin};
use crate::store::resources::{NewResource, ResourceMeta, SourceIdentity, WriteOutcome};

/// The source an imported resource's identity and Provenance name.
const IMPORT_SOURCE: &str = "import";

#[derive(Debug, Serialize, ToSchema)]
pub struct Imported {
    pub created: usize,
    pub updated: usize,
    /// Already held from an earlier import of the same file.
    pub unchanged: usize,
    /// Left out, with the reason (e.g. Consents: give them again here).
    pub skipped: Vec<String>,
}

/// Imports a FHIR Bundle (`application/fhir+json`) or a ZIP of NDJSON (`application/zip`).
#[utoipa::path(post, path = "/patient/import", tag = "patient",
    request_body(content = Vec<u8>, description = "FHIR Bundle or ZIP of NDJSON", content_type = "application/fhir+json"),
    responses((status = 201, description = "Imported", body = Imported),
        (status = 400, description = "Not FHIR, about someone else, or invalid; nothing stored", content_type = "application/problem+json"),
        (status = 413, description = "Too large", content_type = "application/problem+json")))]
pub async fn import(
    State(state): State<AppState>,
    patient: PatientSession,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<Imported>), ApiError> {
    let content_type = content_type_of(&headers);
    let into = ImportTarget {
        patient_id: &patient.patient_id,
        agent: patient.auth.agent(),
        source_id: IMPORT_SOURCE,
        source_display: "Import from another PHR service",
    };
    match import_into(&state, &into, content_type, &body).await {
        Ok(imported) => Ok((StatusCode::CREATED, Json(imported))),
        Err(error) => {
            let event = AuditEvent::new(EventKind::Create, patient.auth.agent())
                .outcome(Outcome::MinorFailure)
                .patient(&patient.patient_id)
                .detail(format!("import refused: {}", error.detail));
            state.audit.record_now(&event).await?;
            Err(error)
        }
    }
}

/// Whose record an import goes into, who brings it, and what its Provenance names.
pub struct ImportTarget<'a> {
    pub patient_id: &'a str,
    pub agent: Agent,
    pub source_id: &'a str,
    pub source_display: &'a str,
}

/// Reads and stores an import in one transaction (shared with transfers that arrive).
pub async fn import_into(
    state: &AppState,
    into: &ImportTarget<'_>,
    content_type: &str,
    body: &[u8],
) -> Result<Imported, ApiError> {
    let patient_id = into.patient_id;
    let file = import::read(content_type, body)?;
    if let Some(birth_date) = import::birth_date(&file) {
        let known = known_birth_dates(state, patient_id).await?;
        if !known.is_empty() && !known.iter().any(|k| k == birth_date) {
            return Err(Error::Invalid(
                "the file is about another person: its birth date does not match your records"
                    .into(),
            )
            .into());
        }
    }
    let batch: Vec<NewResource> = file
        .resources
        .iter()
        .map(|resource| NewResource {
            patient_id: patient_id.to_string(),
            category: resource.category.code().to_string(),
            source: SourceIdentity {
                source: into.source_id.into(),
                resource_type: resource.resource_type.clone(),
                source_resource_id: resource.id.clone(),
                version_id: resource.version.clone(),
            },
            body: resource.body.to_string().into_bytes(),
        })
        .collect();
    for new in &batch {
        state.resources.validate(new)?;
    }
    let keys = state.resources.data_keys_for(&batch).await?;
    let agent = into.agent.clone();
    let origin = Origin {
        patient_id,
        source_id: into.source_id,
        source_display: into.source_display,
        policy: None,
        entity: None,
    };
    let provenance = |_page: usize, written: &[(ResourceMeta, WriteOutcome)]| {
        let targets: Vec<&ResourceMeta> = written
            .iter()
            .filter(|(_, outcome)| *outcome != WriteOutcome::Unchanged)
            .map(|(meta, _)| meta)
            .collect();
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
            Some("import".into()),
            Some(&provenance),
        )
        .await?;
    crate::notifications::announce_written_in(&mut tx, patient_id, &written).await?;
    tx.commit().await.map_err(Error::from)?;
    state.audit.notify();
    let count = |wanted: WriteOutcome| written.iter().filter(|(_, o)| *o == wanted).count();
    Ok(Imported {
        created: count(WriteOutcome::Created),
        updated: count(WriteOutcome::NewVersion),
        unchanged: count(WriteOutcome::Unchanged),
        skipped: file
            .skipped
            .iter()
            .map(|(resource_type, reason)| format!("{resource_type}: {reason}"))
            .collect(),
    })
}
