//! The simulator's FHIR endpoints: `/metadata`, patient-compartment searches, reads and
//! `Patient/$everything`, with scope and patient enforcement and injected faults.

use std::sync::Arc;

use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;

use super::auth::{self, AccessGrant};
use super::data::{instant, StoredResource};
use super::SimulatorState;
use crate::fhir_r4::smart::scope_grants_read;
use crate::fhir_r4::SUPPORTED_RESOURCE_TYPES;
use crate::simulator_web::{first, form_pairs};

const FHIR_JSON: &str = "application/fhir+json";

/// Entries a page with `malformed_entries_per_page` carries, in turn.
const MALFORMED_ENTRIES: &[&str] = &[
    r#""not an entry""#,
    r#"{"fullUrl":"urn:uuid:00000000-0000-0000-0000-000000000000","resource":{"id":"no-type"}}"#,
    r#"{"resource":{"resourceType":"Observation","status":"final"}}"#,
    r#"{"resource":42}"#,
    r#"{"search":{"mode":"match"}}"#,
    r#"[1,2,3]"#,
];

pub(crate) fn fhir_response(status: StatusCode, body: String) -> Response {
    let mut response = (status, body).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    response
}

pub(crate) fn operation_outcome(status: StatusCode, code: &str, message: &str) -> Response {
    let outcome = json!({
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": message}]
    });
    fhir_response(status, outcome.to_string())
}

pub(crate) fn unauthorized(server: &SimulatorState) -> Response {
    server.count(|counters| &counters.unauthorized);
    let mut response = operation_outcome(StatusCode::UNAUTHORIZED, "login", "invalid token");
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(r#"Bearer error="invalid_token""#),
    );
    response
}

pub(crate) fn forbidden(server: &SimulatorState, message: &str) -> Response {
    server.count(|counters| &counters.forbidden);
    operation_outcome(StatusCode::FORBIDDEN, "forbidden", message)
}

/// What every FHIR request goes through: logging, injected delay/503/429, `Accept`, and
/// (when `needs_token`) the bearer token.
pub(crate) async fn admit(
    server: &SimulatorState,
    line: String,
    headers: &HeaderMap,
    needs_token: bool,
) -> Result<Option<AccessGrant>, Response> {
    let number = server.count(|counters| &counters.fhir_requests);
    server.log_request(line);
    let faults = server.faults();
    if let Some(delay) = faults.response_delay {
        tokio::time::sleep(delay).await;
    }
    if let Some(response) = auth::maintenance_response(server) {
        return Err(response);
    }
    if let Some(every) = faults.throttle_every_nth.filter(|every| *every > 0) {
        if number.checked_rem(every) == Some(0) {
            server.count(|counters| &counters.throttled);
            return Err(auth::retry_later(
                StatusCode::TOO_MANY_REQUESTS,
                &faults,
                "too many requests",
            ));
        }
    }
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("*/*");
    if !["fhir+json", "application/json", "*/*"]
        .iter()
        .any(|accepted| accept.contains(accepted))
    {
        return Err(operation_outcome(
            StatusCode::NOT_ACCEPTABLE,
            "not-supported",
            "only FHIR JSON is served",
        ));
    }
    if !needs_token {
        return Ok(None);
    }
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    let grant = token.and_then(|token| server.auth().access_grant(token));
    match grant {
        Some(grant) if !faults.reject_all_access_tokens => Ok(Some(grant)),
        _ => Err(unauthorized(server)),
    }
}

fn grant_allows(grant: &AccessGrant, resource_type: &str) -> bool {
    grant.scopes.iter().any(|scope| match &grant.patient_id {
        Some(_) => scope_grants_read(scope, resource_type),
        None => scope
            .strip_prefix("system/")
            .is_some_and(|rest| scope_grants_read(&format!("patient/{rest}"), resource_type)),
    })
}

/// What a misconfigured proxy in front of a FHIR server sends: 200 with an HTML page.
fn proxy_error_page() -> Response {
    (
        StatusCode::OK,
        [(axum::http::header::CONTENT_TYPE, "text/html")],
        "<html><body>Bad gateway (proxy)</body></html>",
    )
        .into_response()
}

/// A searchset labelled FHIR JSON whose text is Shift_JIS (「検査」), not UTF-8.
fn non_utf8_page() -> Response {
    let mut body = br#"{"resourceType":"Bundle","type":"searchset","entry":[{"resource":{"resourceType":"Observation","id":"sjis","status":"final","code":{"text":""#.to_vec();
    body.extend_from_slice(&[0x8c, 0x9f, 0x8d, 0xb8]);
    body.extend_from_slice(br#""}}}]}"#);
    (
        StatusCode::OK,
        [(axum::http::header::CONTENT_TYPE, "application/fhir+json")],
        body,
    )
        .into_response()
}

/// Scope, injected refusals and the token's patient: the refusal, if any.
fn refusal(
    server: &SimulatorState,
    grant: &AccessGrant,
    resource_type: &str,
    patient_id: &str,
) -> Option<Response> {
    if server
        .faults()
        .forbidden_types
        .iter()
        .any(|forbidden_type| forbidden_type == resource_type)
    {
        return Some(forbidden(server, "this type is not released to apps"));
    }
    if server
        .faults()
        .broken_types
        .iter()
        .any(|broken_type| broken_type == resource_type)
    {
        return Some(proxy_error_page());
    }
    if server
        .faults()
        .non_utf8_types
        .iter()
        .any(|bad_type| bad_type == resource_type)
    {
        return Some(non_utf8_page());
    }
    if !grant_allows(grant, resource_type) {
        return Some(forbidden(
            server,
            &format!("token does not grant {resource_type}"),
        ));
    }
    if grant
        .patient_id
        .as_deref()
        .is_some_and(|linked| linked != patient_id)
    {
        return Some(forbidden(server, "token is for another patient"));
    }
    None
}

fn request_line(path: &str, query: &Option<String>) -> String {
    match query {
        Some(query) => format!("GET {path}?{query}"),
        None => format!("GET {path}"),
    }
}

pub(crate) async fn metadata(
    State(server): State<Arc<SimulatorState>>,
    headers: HeaderMap,
) -> Response {
    if let Err(response) = admit(&server, "GET /metadata".into(), &headers, false).await {
        return response;
    }
    let search_params = json!([
        {"name": "patient", "type": "reference"},
        {"name": "_lastUpdated", "type": "date"},
        {"name": "_count", "type": "number"}
    ]);
    let resources: Vec<Value> = SUPPORTED_RESOURCE_TYPES
        .iter()
        .map(|resource_type| {
            let mut resource = json!({
                "type": resource_type,
                "interaction": [{"code": "read"}, {"code": "search-type"}],
                "searchParam": search_params,
            });
            if *resource_type == "Patient" && server.config.offer_everything {
                resource["operation"] = json!([{
                    "name": "everything",
                    "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything"
                }]);
            }
            resource
        })
        .collect();
    let base = &server.base_url;
    let statement = json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2024-04-01",
        "kind": "instance",
        "software": {"name": "phr-gateway hospital simulator"},
        "implementation": {"description": "シミュレーション病院", "url": base},
        "fhirVersion": "4.0.1",
        "format": [FHIR_JSON],
        "rest": [{
            "mode": "server",
            "security": {
                "service": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service", "code": "SMART-on-FHIR"}]}],
                "extension": [{
                    "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                    "extension": [
                        {"url": "authorize", "valueUri": format!("{base}/authorize")},
                        {"url": "token", "valueUri": format!("{base}/token")}
                    ]
                }]
            },
            "resource": resources
        }]
    });
    fhir_response(StatusCode::OK, statement.to_string())
}

/// A `_lastUpdated` / `_since` comparison against a stored resource.
#[derive(Clone, Copy)]
enum Comparison {
    After,
    AtOrAfter,
    Before,
    AtOrBefore,
    Equal,
}

fn parse_instant_ms(value: &str) -> Option<i64> {
    let parsed = time::OffsetDateTime::parse(value, &Rfc3339)
        .ok()
        .or_else(|| {
            time::Date::parse(
                value,
                time::macros::format_description!("[year]-[month]-[day]"),
            )
            .ok()
            .map(|date| date.midnight().assume_utc())
        })?;
    Some((parsed.unix_timestamp_nanos() / 1_000_000) as i64)
}

fn parse_last_updated(value: &str) -> Option<(Comparison, i64)> {
    let (comparison, rest) = match value.get(..2) {
        Some("gt") => (Comparison::After, &value[2..]),
        Some("ge") => (Comparison::AtOrAfter, &value[2..]),
        Some("lt") => (Comparison::Before, &value[2..]),
        Some("le") => (Comparison::AtOrBefore, &value[2..]),
        Some("eq") => (Comparison::Equal, &value[2..]),
        _ => (Comparison::Equal, value),
    };
    Some((comparison, parse_instant_ms(rest)?))
}

fn passes(filters: &[(Comparison, i64)], resource: &StoredResource) -> bool {
    filters.iter().all(|(comparison, ms)| {
        let updated = resource.last_updated_ms;
        match comparison {
            Comparison::After => updated > *ms,
            Comparison::AtOrAfter => updated >= *ms,
            Comparison::Before => updated < *ms,
            Comparison::AtOrBefore => updated <= *ms,
            Comparison::Equal => updated == *ms,
        }
    })
}

/// `_count` and `_offset` of a search.
fn paging(server: &SimulatorState, pairs: &[(String, String)]) -> (usize, usize) {
    let count = first(pairs, "_count")
        .and_then(|value| value.parse::<usize>().ok())
        .unwrap_or(server.config.default_page_size)
        .clamp(1, server.config.max_page_size.max(1));
    let offset = first(pairs, "_offset")
        .and_then(|value| value.parse::<usize>().ok())
        .unwrap_or(0);
    (count, offset)
}

pub(crate) async fn search(
    State(server): State<Arc<SimulatorState>>,
    Path(resource_type): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let line = request_line(&format!("/{resource_type}"), &query);
    let grant = match admit(&server, line, &headers, true).await {
        Ok(Some(grant)) => grant,
        Ok(None) => return unauthorized(&server),
        Err(response) => return response,
    };
    if !SUPPORTED_RESOURCE_TYPES.contains(&resource_type.as_str()) {
        return operation_outcome(
            StatusCode::NOT_FOUND,
            "not-supported",
            "unknown resource type",
        );
    }
    let pairs = form_pairs(query.as_deref().unwrap_or_default());
    let Some(patient_id) = first(&pairs, "patient")
        .or_else(|| first(&pairs, "subject"))
        .map(|value| value.strip_prefix("Patient/").unwrap_or(value).to_string())
    else {
        return operation_outcome(
            StatusCode::BAD_REQUEST,
            "required",
            "searches need a patient parameter",
        );
    };
    if let Some(response) = refusal(&server, &grant, &resource_type, &patient_id) {
        return response;
    }
    let mut filters = Vec::new();
    for (_, value) in pairs.iter().filter(|(key, _)| key == "_lastUpdated") {
        match parse_last_updated(value) {
            Some(filter) => filters.push(filter),
            None => return operation_outcome(StatusCode::BAD_REQUEST, "value", "bad _lastUpdated"),
        }
    }
    let matches: Vec<Arc<StoredResource>> = server
        .store()
        .patients
        .get(&patient_id)
        .and_then(|records| records.by_type.get(&resource_type))
        .map(|resources| {
            resources
                .iter()
                .filter(|resource| passes(&filters, resource))
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    let (count, offset) = paging(&server, &pairs);
    page_response(
        &server,
        &format!("/{resource_type}"),
        &pairs,
        (offset, count),
        &matches,
        &patient_id,
        &resource_type,
    )
}

pub(crate) async fn read(
    State(server): State<Arc<SimulatorState>>,
    Path((resource_type, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let line = format!("GET /{resource_type}/{id}");
    let grant = match admit(&server, line, &headers, true).await {
        Ok(Some(grant)) => grant,
        Ok(None) => return unauthorized(&server),
        Err(response) => return response,
    };
    let found = server
        .store()
        .by_key
        .get(&(resource_type.clone(), id))
        .cloned();
    let Some(resource) = found else {
        return operation_outcome(StatusCode::NOT_FOUND, "not-found", "no such resource");
    };
    if let Some(response) = refusal(&server, &grant, &resource_type, &resource.patient_id) {
        return response;
    }
    let mut response = fhir_response(StatusCode::OK, resource.json.clone());
    if let Ok(etag) = HeaderValue::from_str("W/\"1\"") {
        response.headers_mut().insert(header::ETAG, etag);
    }
    response
}

pub(crate) async fn operation(
    State(server): State<Arc<SimulatorState>>,
    Path((resource_type, id, operation)): Path<(String, String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let line = request_line(&format!("/{resource_type}/{id}/{operation}"), &query);
    let grant = match admit(&server, line, &headers, true).await {
        Ok(Some(grant)) => grant,
        Ok(None) => return unauthorized(&server),
        Err(response) => return response,
    };
    if resource_type != "Patient" || operation != "$everything" || !server.config.offer_everything {
        return operation_outcome(StatusCode::NOT_FOUND, "not-supported", "unknown operation");
    }
    if grant
        .patient_id
        .as_deref()
        .is_some_and(|linked| linked != id)
    {
        return forbidden(&server, "token is for another patient");
    }
    if server.faults().broken_everything {
        return proxy_error_page();
    }
    let pairs = form_pairs(query.as_deref().unwrap_or_default());
    let mut filters = Vec::new();
    if let Some(since) = first(&pairs, "_since") {
        match parse_instant_ms(since) {
            Some(ms) => filters.push((Comparison::After, ms)),
            None => return operation_outcome(StatusCode::BAD_REQUEST, "value", "bad _since"),
        }
    }
    let forbidden_types = server.faults().forbidden_types;
    // Decided once per type, not once per resource: pages of 50,000-resource records.
    let visible_types: Vec<&str> = SUPPORTED_RESOURCE_TYPES
        .iter()
        .copied()
        .filter(|resource_type| {
            grant_allows(&grant, resource_type)
                && !forbidden_types
                    .iter()
                    .any(|forbidden| forbidden == resource_type)
        })
        .collect();
    // Like real servers: $everything returns what the token may see, nothing more.
    let matches: Vec<Arc<StoredResource>> = server
        .store()
        .patients
        .get(&id)
        .map(|records| {
            records
                .all
                .iter()
                .filter(|resource| {
                    visible_types.contains(&resource.resource_type.as_str())
                        && passes(&filters, resource)
                })
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    let (count, offset) = paging(&server, &pairs);
    page_response(
        &server,
        &format!("/Patient/{id}/$everything"),
        &pairs,
        (offset, count),
        &matches,
        &id,
        "Observation",
    )
}

fn page_link(
    server: &SimulatorState,
    path: &str,
    pairs: &[(String, String)],
    offset: usize,
) -> String {
    let Ok(mut url) = url::Url::parse(&format!("{}{path}", server.base_url)) else {
        return String::new();
    };
    {
        let mut query = url.query_pairs_mut();
        for (key, value) in pairs.iter().filter(|(key, _)| key != "_offset") {
            query.append_pair(key, value);
        }
        query.append_pair("_offset", &offset.to_string());
    }
    url.into()
}

fn match_entry(server: &SimulatorState, resource: &StoredResource) -> String {
    format!(
        r#"{{"fullUrl":"{}/{}/{}","resource":{},"search":{{"mode":"match"}}}}"#,
        server.base_url, resource.resource_type, resource.id, resource.json
    )
}

/// A resource of another patient, as a confused server might mix in.
fn intruder_entry(
    server: &SimulatorState,
    resource_type: &str,
    patient_id: &str,
    n: usize,
) -> String {
    let other = server
        .store()
        .patients
        .keys()
        .filter(|candidate| candidate.as_str() != patient_id)
        .min()
        .cloned()
        .unwrap_or_else(|| "pt999999".to_string());
    let meta = json!({"versionId": "1", "lastUpdated": instant(1_711_929_600_000)});
    let resource = if resource_type == "Patient" {
        json!({"resourceType": "Patient", "id": other, "meta": meta})
    } else {
        let field = match resource_type {
            "AllergyIntolerance" | "Immunization" => "patient",
            _ => "subject",
        };
        let mut resource = json!({
            "resourceType": resource_type,
            "id": format!("intruder-{n}"),
            "meta": meta,
            "status": "final",
        });
        resource[field] = json!({"reference": format!("Patient/{other}")});
        resource
    };
    format!(r#"{{"resource":{resource},"search":{{"mode":"match"}}}}"#)
}

fn page_response(
    server: &SimulatorState,
    path: &str,
    pairs: &[(String, String)],
    (offset, count): (usize, usize),
    matches: &[Arc<StoredResource>],
    patient_id: &str,
    intruder_type: &str,
) -> Response {
    let faults = server.faults();
    let mut entries: Vec<String> = matches
        .iter()
        .skip(offset)
        .take(count)
        .map(|resource| match_entry(server, resource))
        .collect();
    for n in 0..faults.wrong_patient_entries_per_page {
        let position = (n * 2 + 1).min(entries.len());
        entries.insert(
            position,
            intruder_entry(server, intruder_type, patient_id, offset + n),
        );
    }
    for n in 0..faults.malformed_entries_per_page {
        let position = (n * 3 + 1).min(entries.len());
        entries.insert(
            position,
            MALFORMED_ENTRIES[n % MALFORMED_ENTRIES.len()].to_string(),
        );
    }
    let mut links =
        vec![json!({"relation": "self", "url": page_link(server, path, pairs, offset)})];
    if offset + count < matches.len() {
        links.push(
            json!({"relation": "next", "url": page_link(server, path, pairs, offset + count)}),
        );
    }
    let body = format!(
        r#"{{"resourceType":"Bundle","meta":{{"lastUpdated":"{}"}},"type":"searchset","total":{},"link":{},"entry":[{}]}}"#,
        instant((time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64),
        matches.len(),
        Value::Array(links),
        entries.join(",")
    );
    fhir_response(StatusCode::OK, body)
}
