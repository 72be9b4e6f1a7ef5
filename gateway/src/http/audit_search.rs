//! Operators search and export audit events by patient, actor, action (event kind) and time
//! range: a page of AuditEvents as JSON, or every match as NDJSON (each line a leaf exactly
//! as stored, so it can be checked against a checkpoint). Each search and export is itself
//! audited, with its query.

use axum::body::{Body, Bytes};
use axum::extract::{Query, RawQuery, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use super::error::ApiError;
use super::session::OperatorSession;
use super::AppState;
use crate::audit::search::{self, kind_named, AuditQuery, DEFAULT_COUNT};
use crate::audit::{AuditEvent, EventKind};
use crate::error::Error;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditSearchParams {
    /// Whose data (the opaque patient id).
    pub patient: Option<String>,
    /// Who acted: an account or client id.
    pub actor: Option<String>,
    /// The event kind, e.g. `login`, `read`, `export`, `emergency-override`, `alert-raised`.
    pub action: Option<String>,
    /// Recorded at or after this time (RFC 3339).
    pub since: Option<String>,
    /// Recorded before this time (RFC 3339).
    pub until: Option<String>,
    /// Events per page: 100 unless given, 1 to 1000.
    #[serde(rename = "_count")]
    pub count: Option<u32>,
    /// The page, from 1.
    pub page: Option<u32>,
}

fn given(value: &Option<String>) -> Option<String> {
    value
        .as_deref()
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_string)
}

fn time_param(name: &str, value: &Option<String>) -> Result<Option<i64>, Error> {
    given(value)
        .map(|text| {
            time::OffsetDateTime::parse(&text, &time::format_description::well_known::Rfc3339)
                .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
                .map_err(|_| Error::Invalid(format!("{name}: {text:?} is not an RFC 3339 time")))
        })
        .transpose()
}

impl AuditSearchParams {
    fn query(&self) -> Result<AuditQuery, Error> {
        let kind = match given(&self.action) {
            Some(name) => Some(kind_named(&name).ok_or_else(|| {
                Error::Invalid(format!(
                    "action: {name:?} is not an event kind (e.g. login, read, export)"
                ))
            })?),
            None => None,
        };
        let query = AuditQuery {
            patient_id: given(&self.patient),
            actor_id: given(&self.actor),
            kind,
            since_millis: time_param("since", &self.since)?,
            until_millis: time_param("until", &self.until)?,
        };
        if let (Some(since), Some(until)) = (query.since_millis, query.until_millis) {
            if since >= until {
                return Err(Error::Invalid("since must be before until".into()));
            }
        }
        Ok(query)
    }
}

/// One page of matching AuditEvents, in log order.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditEventsPage {
    /// FHIR AuditEvents as recorded.
    #[schema(value_type = Vec<Object>)]
    pub events: Vec<Value>,
    pub page: u32,
    /// The next page, when there are more matches.
    pub next_page: Option<u32>,
}

/// Records that an operator used the audit log, with the query (BALP query entity).
async fn audit_use(
    state: &AppState,
    operator: &OperatorSession,
    kind: EventKind,
    raw_query: Option<String>,
) -> Result<(), ApiError> {
    let event = AuditEvent::new(kind, operator.0.agent())
        .query(format!("AuditEvent?{}", raw_query.unwrap_or_default()));
    state.audit.record_now(&event).await?;
    state.audit.notify();
    Ok(())
}

/// Audit events matching every given filter, paged, in log order. The search is audited.
#[utoipa::path(get, path = "/operator/audit/events", tag = "operator",
    params(AuditSearchParams),
    responses(
        (status = 200, description = "One page of matching AuditEvents", body = AuditEventsPage),
        (status = 400, description = "A bad time, an unknown action, or `_count` out of range", content_type = "application/problem+json"),
        (status = 401, description = "Not signed in", content_type = "application/problem+json"),
        (status = 403, description = "Not an operator", content_type = "application/problem+json")))]
pub async fn search(
    State(state): State<AppState>,
    operator: OperatorSession,
    RawQuery(raw_query): RawQuery,
    Query(params): Query<AuditSearchParams>,
) -> Result<Json<AuditEventsPage>, ApiError> {
    let query = params.query()?;
    let page = params.page.unwrap_or(1);
    let found = search::search(
        &state.db,
        &query,
        params.count.unwrap_or(DEFAULT_COUNT),
        page,
    )
    .await?;
    audit_use(&state, &operator, EventKind::AuditLogSearched, raw_query).await?;
    Ok(Json(AuditEventsPage {
        events: found.events,
        page,
        next_page: found.next_page,
    }))
}

/// Every matching audit event as NDJSON, each line a leaf exactly as stored. The export is
/// audited.
#[utoipa::path(get, path = "/operator/audit/events.ndjson", tag = "operator",
    params(AuditSearchParams),
    responses(
        (status = 200, description = "Matching AuditEvents, one per line", content_type = "application/fhir+ndjson"),
        (status = 400, description = "A bad time or an unknown action", content_type = "application/problem+json"),
        (status = 401, description = "Not signed in", content_type = "application/problem+json"),
        (status = 403, description = "Not an operator", content_type = "application/problem+json")))]
pub async fn export(
    State(state): State<AppState>,
    operator: OperatorSession,
    RawQuery(raw_query): RawQuery,
    Query(params): Query<AuditSearchParams>,
) -> Result<Response, ApiError> {
    let query = params.query()?;
    // Recorded before the first line goes out: the export may be cut off, never unrecorded.
    audit_use(&state, &operator, EventKind::AuditLogExported, raw_query).await?;
    let lines = search::matching_leaves(state.db.clone(), query).map(|leaf| {
        leaf.map(|mut line| {
            line.push(b'\n');
            Bytes::from(line)
        })
        .map_err(|e| std::io::Error::other(e.to_string()))
    });
    Ok((
        [
            (header::CONTENT_TYPE, "application/fhir+ndjson"),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"audit-events.ndjson\"",
            ),
        ],
        Body::from_stream(lines),
    )
        .into_response())
}
