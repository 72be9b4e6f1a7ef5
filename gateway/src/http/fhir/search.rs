//! Search in the patient compartment and `Patient/[id]/$everything`. Only types the caller
//! may see are ever read, so counts and `next` links say nothing about denied resources; a
//! page holds at most `_count` matches and has a `next` link only when another match exists.

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::{json, Value};

use super::caller::{FhirCaller, Interaction, TypeAccess};
use super::{check_type, fhir_json, serve_all, served_patient, served_types};
use crate::audit::EventKind;
use crate::error::Error;
use crate::fhir::matching::matches;
use crate::fhir::present::relative_reference;
use crate::fhir::query::{self, Handling, Include, SearchKind, SearchQuery};
use crate::http::error::ApiError;
use crate::http::AppState;
use crate::store::resources::{StoredResource, UpdatedRange};

/// Rows read per step while filtering by content.
const SCAN_BATCH: usize = 200;

/// `GET /fhir/{type}?…`
pub async fn search(
    State(state): State<AppState>,
    caller: FhirCaller,
    Path(resource_type): Path<String>,
    Query(params): Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    search_type(&state, &caller, &resource_type, params, &headers).await
}

/// `POST /fhir/{type}/_search` with the parameters form-encoded in the body (and any in the
/// query string), as FHIR allows for searches too long or too private for a URL.
pub async fn search_by_post(
    State(state): State<AppState>,
    caller: FhirCaller,
    Path((resource_type, operation)): Path<(String, String)>,
    Query(mut params): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    body: String,
) -> Result<Response, ApiError> {
    if operation != "_search" {
        return Err(
            Error::NotFound(format!("POST {resource_type}/{operation} is not supported")).into(),
        );
    }
    let form = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if !form && !body.is_empty() {
        return Err(Error::Invalid(
            "a POST search sends its parameters as application/x-www-form-urlencoded".into(),
        )
        .into());
    }
    params.extend(
        form_urlencoded::parse(body.as_bytes()).map(|(k, v)| (k.into_owned(), v.into_owned())),
    );
    search_type(&state, &caller, &resource_type, params, &headers).await
}

async fn search_type(
    state: &AppState,
    caller: &FhirCaller,
    resource_type: &str,
    params: Vec<(String, String)>,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    check_type(resource_type)?;
    let handling = handling_of(headers);
    let query = query::parse(SearchKind::Type(resource_type), &params, handling)
        .map_err(|e| Error::Invalid(e.0))?;
    if query
        .patient
        .as_deref()
        .is_some_and(|p| p != caller.patient_id)
    {
        return Err(Error::Forbidden("this token is for another patient").into());
    }
    if resource_type == "Consent" {
        return search_consents(state, caller).await;
    }
    caller
        .require(state, resource_type, Interaction::Search)
        .await?;
    let self_url = page_url(state, &format!("/fhir/{resource_type}"), &params, None);
    if resource_type == "Patient" {
        return search_patient(state, caller, &query, self_url).await;
    }
    let page = collect_page(state, caller, &[resource_type], &query).await?;
    let total = if query.filters_content() || !query.ids.is_empty() {
        None
    } else {
        Some(
            state
                .resources
                .count_current(&caller.patient_id, &[resource_type], &range(&query))
                .await?,
        )
    };
    let mut included = Vec::new();
    if query.includes.contains(&Include::Patient)
        && caller.access("Patient", Interaction::Read) == TypeAccess::Allowed
        && !page.matches.is_empty()
    {
        if let Some((patient, reference)) = served_patient(state, &caller.patient_id).await? {
            included.push((patient, reference));
        }
    }
    if query.includes.contains(&Include::Medication)
        && caller.access("Medication", Interaction::Read) == TypeAccess::Allowed
    {
        included.extend(included_medications(state, caller, &page.matches).await?);
    }
    let next = page.next_cursor.as_deref().map(|cursor| {
        page_url(
            state,
            &format!("/fhir/{resource_type}"),
            &params,
            Some(cursor),
        )
    });
    respond(
        state,
        caller,
        &format!("FHIR search {resource_type}"),
        &query,
        page,
        included,
        total,
        self_url,
        next,
    )
    .await
}

/// `GET /fhir/Patient/{id}/$everything?…` (`_count`, `_since`, `_type`): every type the
/// caller may see, the Patient first.
pub(super) async fn everything(
    state: &AppState,
    caller: &FhirCaller,
    id: &str,
    params: &[(String, String)],
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    if id != caller.patient_id {
        return Err(Error::Forbidden("this token is for another patient").into());
    }
    let query = query::parse(SearchKind::Everything, params, handling_of(headers))
        .map_err(|e| Error::Invalid(e.0))?;
    for resource_type in &query.types {
        check_type(resource_type)?;
    }
    let wanted = |t: &str| query.types.is_empty() || query.types.iter().any(|w| w == t);
    let types: Vec<&str> = served_types()
        .into_iter()
        .filter(|t| *t != "Patient" && wanted(t))
        .filter(|t| caller.access(t, Interaction::Search) == TypeAccess::Allowed)
        .collect();
    let page = collect_page(state, caller, &types, &query).await?;
    let mut included = Vec::new();
    if query.cursor.is_none()
        && wanted("Patient")
        && caller.access("Patient", Interaction::Read) == TypeAccess::Allowed
    {
        if let Some(patient) = served_patient(state, &caller.patient_id).await? {
            included.push(patient);
        }
    }
    let path = format!("/fhir/Patient/{id}/$everything");
    let self_url = page_url(state, &path, params, None);
    let next = page
        .next_cursor
        .as_deref()
        .map(|cursor| page_url(state, &path, params, Some(cursor)));
    respond(
        state,
        caller,
        "FHIR Patient/$everything",
        &query,
        page,
        included,
        None,
        self_url,
        next,
    )
    .await
}

struct Page {
    /// Served matches with the stored version they came from.
    matches: Vec<(Value, String)>,
    next_cursor: Option<String>,
}

/// Reads the caller's patient's resources of `types` after the cursor until `_count`
/// matches (plus one, to know whether there is a next page) are found.
async fn collect_page(
    state: &AppState,
    caller: &FhirCaller,
    types: &[&str],
    query: &SearchQuery,
) -> Result<Page, ApiError> {
    let mut found = Vec::new();
    let mut cursor = query.cursor.clone();
    let updated = range(query);
    let wanted = query.count + 1;
    let batch = if query.filters_content() || !query.ids.is_empty() {
        SCAN_BATCH.max(wanted)
    } else {
        wanted
    };
    let mut last_match_id = None;
    while found.len() < wanted && query.count > 0 {
        let rows = match state
            .resources
            .page_current(
                &caller.patient_id,
                types,
                &updated,
                cursor.as_deref(),
                batch,
            )
            .await
        {
            Ok(rows) => rows,
            Err(Error::KeyMissing(_)) => Vec::new(),
            Err(other) => return Err(other.into()),
        };
        let exhausted = rows.len() < batch;
        cursor = rows.last().map(|r| r.meta.id.clone());
        let served = serve_all(state, &caller.patient_id, &rows).await?;
        for (stored, resource) in rows.iter().zip(served) {
            if found.len() == wanted {
                break;
            }
            if matches(&stored.meta.resource_type, &resource, query) {
                if found.len() < query.count {
                    last_match_id = Some(stored.meta.id.clone());
                }
                found.push((resource, stored.meta.history_reference()));
            }
        }
        if exhausted {
            break;
        }
    }
    let next_cursor = if found.len() > query.count {
        found.truncate(query.count);
        last_match_id
    } else {
        None
    };
    Ok(Page {
        matches: found,
        next_cursor,
    })
}

/// The Medications the matches reference, as far as they are held.
async fn included_medications(
    state: &AppState,
    caller: &FhirCaller,
    matches: &[(Value, String)],
) -> Result<Vec<(Value, String)>, ApiError> {
    let mut ids: Vec<String> = Vec::new();
    for (resource, _) in matches {
        if let Some((resource_type, id)) = resource["medicationReference"]["reference"]
            .as_str()
            .and_then(relative_reference)
        {
            if resource_type == "Medication" && !ids.iter().any(|known| known == id) {
                ids.push(id.to_string());
            }
        }
    }
    let mut stored: Vec<StoredResource> = Vec::new();
    for id in ids {
        match state.resources.read(&caller.patient_id, &id).await {
            Ok(resource) if resource.meta.resource_type == "Medication" => stored.push(resource),
            Ok(_) | Err(Error::NotFound(_)) => {}
            Err(other) => return Err(other.into()),
        }
    }
    let references: Vec<String> = stored
        .iter()
        .map(|stored| stored.meta.history_reference())
        .collect();
    let served = serve_all(state, &caller.patient_id, &stored).await?;
    Ok(served.into_iter().zip(references).collect())
}

async fn search_patient(
    state: &AppState,
    caller: &FhirCaller,
    query: &SearchQuery,
    self_url: String,
) -> Result<Response, ApiError> {
    let mut page = Page {
        matches: Vec::new(),
        next_cursor: None,
    };
    if query.count > 0 && query.cursor.is_none() {
        if let Some((patient, reference)) = served_patient(state, &caller.patient_id).await? {
            if matches("Patient", &patient, query) {
                page.matches.push((patient, reference));
            }
        }
    }
    let total = Some(page.matches.len() as i64);
    respond(
        state,
        caller,
        "FHIR search Patient",
        query,
        page,
        Vec::new(),
        total,
        self_url,
        None,
    )
    .await
}

/// The patient's own consents as FHIR `Consent`s (the patient's own token only).
async fn search_consents(state: &AppState, caller: &FhirCaller) -> Result<Response, ApiError> {
    if !caller.is_patient() {
        return Err(
            Error::Forbidden("consents are read by the patient with their own token").into(),
        );
    }
    let views = state.consents.list(&caller.patient_id).await?;
    let mut entries = Vec::new();
    let mut references = Vec::new();
    for view in &views {
        let resource = phr_consent::model::to_fhir_json(&view.consent)
            .map_err(|e| Error::Invalid(format!("consent {}: {e}", view.id)))?;
        references.push(format!("Consent/{}", view.id));
        entries.push(json!({
            "fullUrl": format!("{}/fhir/Consent/{}", state.public_url(), view.id),
            "resource": resource,
            "search": {"mode": "match"},
        }));
    }
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "total": entries.len(),
        "link": [{"relation": "self", "url": format!("{}/fhir/Consent", state.public_url())}],
        "entry": entries,
    });
    let event = caller.audit_event(EventKind::Search, references, "FHIR search Consent");
    state.audit.record_now(&event).await?;
    Ok(fhir_json(StatusCode::OK, &bundle))
}

#[allow(clippy::too_many_arguments)]
async fn respond(
    state: &AppState,
    caller: &FhirCaller,
    what: &str,
    query: &SearchQuery,
    page: Page,
    included: Vec<(Value, String)>,
    total: Option<i64>,
    self_url: String,
    next: Option<String>,
) -> Result<Response, ApiError> {
    let base = state.public_url();
    let mut references = Vec::with_capacity(page.matches.len() + included.len());
    let mut entries = Vec::with_capacity(page.matches.len() + included.len());
    for (mode, (resource, reference)) in page
        .matches
        .into_iter()
        .map(|m| ("match", m))
        .chain(included.into_iter().map(|i| ("include", i)))
    {
        let full_url = format!(
            "{base}/fhir/{}/{}",
            resource["resourceType"].as_str().unwrap_or_default(),
            resource["id"].as_str().unwrap_or_default()
        );
        references.push(reference);
        entries.push(json!({"fullUrl": full_url, "resource": resource, "search": {"mode": mode}}));
    }
    let mut links = vec![json!({"relation": "self", "url": self_url})];
    if let Some(next) = next {
        links.push(json!({"relation": "next", "url": next}));
    }
    let mut bundle = json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "link": links,
        "entry": entries,
    });
    if let Some(total) = total {
        bundle["total"] = json!(total);
    }
    if !query.ignored.is_empty() {
        // Lenient handling: say what was not applied, as an OperationOutcome entry.
        if let Some(entries) = bundle["entry"].as_array_mut() {
            entries.push(json!({
                "resource": {
                    "resourceType": "OperationOutcome",
                    "issue": [{
                        "severity": "warning",
                        "code": "not-supported",
                        "diagnostics": format!("ignored search parameters: {}", query.ignored.join(", ")),
                    }],
                },
                "search": {"mode": "outcome"},
            }));
        }
    }
    let run = self_url
        .strip_prefix(base.as_str())
        .unwrap_or(self_url.as_str())
        .to_string();
    let event = caller
        .audit_event(EventKind::Search, references, what)
        .query(run);
    state.audit.record_now(&event).await?;
    Ok(fhir_json(StatusCode::OK, &bundle))
}

fn handling_of(headers: &HeaderMap) -> Handling {
    Handling::from_prefer(headers.get("prefer").and_then(|value| value.to_str().ok()))
}

fn range(query: &SearchQuery) -> UpdatedRange {
    UpdatedRange {
        from: query.updated_from,
        to: query.updated_to,
    }
}

/// The search's URL with its parameters (less any cursor), and `cursor` for a next page.
fn page_url(
    state: &AppState,
    path: &str,
    params: &[(String, String)],
    cursor: Option<&str>,
) -> String {
    let mut serializer = form_urlencoded::Serializer::new(String::new());
    for (name, value) in params.iter().filter(|(name, _)| name != "_cursor") {
        serializer.append_pair(name, value);
    }
    if let Some(cursor) = cursor {
        serializer.append_pair("_cursor", cursor);
    }
    let query = serializer.finish();
    if query.is_empty() {
        format!("{}{path}", state.public_url())
    } else {
        format!("{}{path}?{query}", state.public_url())
    }
}
