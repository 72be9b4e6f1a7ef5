//! The data endpoints: `/v1/{list}?since=&page_token=&page_size=` and the 特定健診
//! documents, behind the bearer token, with the injected faults applied first.

use std::sync::Arc;

use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::auth::{maintenance_response, retry_later, PortalLinkage};
use super::SimulatorState;
use crate::self_info::Category;
use crate::simulator_web::{first, form_pairs, json_response};

/// Ids of the malformed records the faults add; their document is never a CDA.
const BAD_DOCUMENT_ID: &str = "K-BAD-XML";

fn bearer_error(server: &SimulatorState, error: &str) -> Response {
    server.count(|counters| &counters.unauthorized);
    let mut response = json_response(StatusCode::UNAUTHORIZED, &json!({ "error": error }));
    let challenge = format!("Bearer error=\"{error}\"");
    if let Ok(value) = HeaderValue::from_str(&challenge) {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, value);
    }
    response
}

/// Faults, then the token, then the linkage, then the scope: the linkage for `category`.
fn admit(
    server: &SimulatorState,
    headers: &HeaderMap,
    category: Category,
) -> Result<PortalLinkage, Box<Response>> {
    server.count(|counters| &counters.data_requests);
    if let Some(response) = maintenance_response(server) {
        return Err(Box::new(response));
    }
    let rate_limited = {
        let faults = server.faults();
        faults.rate_limited.then_some(faults.retry_after)
    };
    if let Some(retry_after) = rate_limited {
        server.count(|counters| &counters.throttled);
        return Err(Box::new(retry_later(
            StatusCode::TOO_MANY_REQUESTS,
            retry_after,
            "rate_limited",
        )));
    }
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .unwrap_or_default();
    let Some(linkage) = server.auth().linkage_of(token) else {
        return Err(Box::new(bearer_error(server, "invalid_token")));
    };
    let forced_refusal = {
        let mut faults = server.faults();
        let refuse = faults.invalid_token_responses > 0;
        if refuse {
            faults.invalid_token_responses -= 1;
        }
        refuse
    };
    if forced_refusal {
        return Err(Box::new(bearer_error(server, "invalid_token")));
    }
    if linkage.expires_at <= OffsetDateTime::now_utc() {
        return Err(Box::new(bearer_error(server, "linkage_expired")));
    }
    if !linkage.scopes.iter().any(|scope| scope == category.scope()) {
        return Err(Box::new(json_response(
            StatusCode::FORBIDDEN,
            &json!({ "error": "insufficient_scope" }),
        )));
    }
    Ok(linkage)
}

fn category_of_list(list: &str) -> Option<Category> {
    Category::ALL
        .into_iter()
        .find(|category| category.endpoint().strip_prefix("/v1/") == Some(list))
}

fn bad_request(message: &str) -> Response {
    json_response(
        StatusCode::BAD_REQUEST,
        &json!({ "error": "invalid_request", "error_description": message }),
    )
}

fn encode_page_token(key: &(i128, String)) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}:{}", key.0, key.1))
}

fn decode_page_token(token: &str) -> Option<(i128, String)> {
    let raw = String::from_utf8(URL_SAFE_NO_PAD.decode(token).ok()?).ok()?;
    let (nanos, id) = raw.split_once(':')?;
    Some((nanos.parse().ok()?, id.to_string()))
}

pub(crate) async fn list(
    State(server): State<Arc<SimulatorState>>,
    Path(list): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let query = query.unwrap_or_default();
    server.log_request(format!("GET /v1/{list}?{query}"));
    let Some(category) = category_of_list(&list).filter(|category| server.offers(*category)) else {
        return json_response(StatusCode::NOT_FOUND, &json!({ "error": "not_found" }));
    };
    let linkage = match admit(&server, &headers, category) {
        Ok(linkage) => linkage,
        Err(response) => return *response,
    };
    let pairs = form_pairs(&query);
    let since = match first(&pairs, "since") {
        None => None,
        Some(raw) => match OffsetDateTime::parse(raw, &Rfc3339) {
            Ok(since) => Some(since),
            Err(_) => return bad_request("since must be an RFC 3339 time"),
        },
    };
    let after = match first(&pairs, "page_token") {
        None => None,
        Some(token) => match decode_page_token(token) {
            Some(key) => Some(key),
            None => return bad_request("unknown page_token"),
        },
    };
    let page_size = match first(&pairs, "page_size") {
        None => server.config.default_page_size,
        Some(raw) => match raw.parse::<usize>() {
            Ok(size) if size > 0 => size.min(server.config.max_page_size),
            _ => return bad_request("page_size must be a positive integer"),
        },
    };
    let mut records: Vec<(i128, String, Value)> = {
        let store = server.store();
        store
            .records
            .get(&linkage.subject)
            .into_iter()
            .flatten()
            .filter(|record| record.category == category)
            .filter(|record| since.is_none_or(|since| record.available_at > since))
            .map(|record| {
                let (nanos, id) = record.page_key();
                (nanos, id, record.to_json(&server.base_url))
            })
            .collect()
    };
    if after.is_none() {
        records.splice(0..0, malformed_records(&server, category));
    }
    records.sort_by(|left, right| (left.0, &left.1).cmp(&(right.0, &right.1)));
    let remaining: Vec<&(i128, String, Value)> = records
        .iter()
        .filter(|(nanos, id, _)| {
            after
                .as_ref()
                .is_none_or(|(after_nanos, after_id)| (*nanos, id) > (*after_nanos, after_id))
        })
        .collect();
    let page: Vec<Value> = remaining
        .iter()
        .take(page_size)
        .map(|(_, _, item)| item.clone())
        .collect();
    let next_page_token = (remaining.len() > page_size)
        .then(|| remaining.get(page_size - 1))
        .flatten()
        .map(|(nanos, id, _)| encode_page_token(&(*nanos, id.clone())));
    json_response(
        StatusCode::OK,
        &json!({ "items": page, "next_page_token": next_page_token }),
    )
}

/// The malformed records the faults ask for, sorted first (before every real record).
fn malformed_records(server: &SimulatorState, category: Category) -> Vec<(i128, String, Value)> {
    let faults = server.faults().clone();
    let mut records = Vec::new();
    match category {
        Category::Medication if faults.wrong_drug_code => records.push(json!({
            "id": "M-BAD-CODE", "version": 1, "dispensed_on": "2024-03-01",
            "items": [{"drug_code": "XYZ", "code_system": "YJ", "name": "不明な薬",
                       "quantity": 1, "unit": "錠"}],
        })),
        Category::Immunization if faults.item_missing_fields => records.push(json!({
            "id": "V-MISSING", "version": 1, "lot": "L000000",
        })),
        Category::SpecificCheckup if faults.bad_xml_document => records.push(json!({
            "id": BAD_DOCUMENT_ID, "version": 1, "date": "2024-03-01",
            "institution": "不明な健診機関",
            "document_url": format!("{}/v1/checkups/{BAD_DOCUMENT_ID}/document", server.base_url),
        })),
        _ => {}
    }
    records
        .into_iter()
        .map(|record| {
            let id = record["id"].as_str().unwrap_or_default().to_string();
            (i128::MIN, id, record)
        })
        .collect()
}

pub(crate) async fn checkup_document(
    State(server): State<Arc<SimulatorState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    server.log_request(format!("GET /v1/checkups/{id}/document"));
    let linkage = match admit(&server, &headers, Category::SpecificCheckup) {
        Ok(linkage) => linkage,
        Err(response) => return *response,
    };
    let document = if id == BAD_DOCUMENT_ID {
        // What a misconfigured proxy in front of the portal sends.
        Some("<html><body><h1>502 Bad Gateway</h1></body></html>".to_string())
    } else {
        server
            .store()
            .records
            .get(&linkage.subject)
            .into_iter()
            .flatten()
            // A withdrawn report's document is no longer served.
            .find(|record| {
                record.id == id
                    && record.category == Category::SpecificCheckup
                    && !record.entered_in_error
            })
            .and_then(|record| record.document.clone())
    };
    match document {
        Some(document) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/xml; charset=utf-8")],
            document,
        )
            .into_response(),
        None => json_response(StatusCode::NOT_FOUND, &json!({ "error": "not_found" })),
    }
}
