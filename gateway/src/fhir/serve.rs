//! Serving stored resources: parsed, their references resolved to the gateway's ids in
//! the store, and presented (see `present`). Shared by the FHIR API and exports.

use std::collections::HashSet;

use serde_json::Value;

use super::present::{present, references_in, ReferenceMap, Served};
use super::stored_json::StoredJson;
use crate::error::{Error, Result};
use crate::store::millis_to_rfc3339;
use crate::store::resources::{ResourceStore, StoredResource};

/// Resolves relative references to the gateway's ids (same patient, same source): each
/// resource's source id with the references found in it.
async fn resolve_references(
    store: &ResourceStore,
    patient_id: &str,
    found: impl IntoIterator<Item = (&str, Vec<(String, String)>)>,
) -> Result<ReferenceMap> {
    // Each reference once, looked up together: a page of search results is one query.
    let mut wanted = Vec::new();
    let mut seen = HashSet::new();
    for (source, references) in found {
        for (resource_type, id) in references {
            let key = (source.to_string(), resource_type, id);
            if seen.insert(key.clone()) {
                wanted.push(key);
            }
        }
    }
    let found = store.gateway_ids_of(patient_id, &wanted).await?;
    let mut map = ReferenceMap::new();
    for key in wanted {
        if let Some(gateway_id) = found.get(&key) {
            let (_, resource_type, id) = key;
            // The first resource's source decides, as when they were looked up one by one.
            map.entry((resource_type, id))
                .or_insert_with(|| gateway_id.clone());
        }
    }
    Ok(map)
}

fn not_json(resource: &StoredResource, e: serde_json::Error) -> Error {
    Error::Invalid(format!(
        "stored {} {} is not JSON: {e}",
        resource.meta.resource_type, resource.meta.id
    ))
}

fn served<'a>(
    resource: &'a StoredResource,
    patient_id: &'a str,
    last_updated: &'a str,
) -> Served<'a> {
    Served {
        id: &resource.meta.id,
        version: resource.meta.version,
        last_updated,
        source: &resource.meta.source,
        patient_id,
    }
}

/// Stored resources as served (gateway ids, meta, references).
pub async fn serve_all(
    store: &ResourceStore,
    patient_id: &str,
    stored: &[StoredResource],
) -> Result<Vec<Value>> {
    let parsed: Vec<Value> = stored
        .iter()
        .map(|resource| serde_json::from_slice(&resource.body).map_err(|e| not_json(resource, e)))
        .collect::<Result<_, _>>()?;
    let found = stored
        .iter()
        .zip(&parsed)
        .map(|(resource, body)| (resource.meta.source.as_str(), references_in(body)));
    let references = resolve_references(store, patient_id, found).await?;
    Ok(stored
        .iter()
        .zip(parsed)
        .map(|(resource, body)| {
            let last_updated = millis_to_rfc3339(resource.meta.last_updated);
            present(
                body,
                &served(resource, patient_id, &last_updated),
                &references,
            )
        })
        .collect())
}

/// What `serve_all` serves, as NDJSON lines (each ended by a line break) onto `out`,
/// without building each resource's JSON tree (see `stored_json`).
pub async fn serve_lines(
    store: &ResourceStore,
    patient_id: &str,
    stored: &[StoredResource],
    out: &mut Vec<u8>,
) -> Result<()> {
    let parsed: Vec<StoredJson> = stored
        .iter()
        .map(|resource| StoredJson::parse(&resource.body).map_err(|e| not_json(resource, e)))
        .collect::<Result<_, _>>()?;
    let found = stored
        .iter()
        .zip(&parsed)
        .map(|(resource, body)| (resource.meta.source.as_str(), body.references()));
    let references = resolve_references(store, patient_id, found).await?;
    for (resource, body) in stored.iter().zip(parsed) {
        let last_updated = millis_to_rfc3339(resource.meta.last_updated);
        body.write_served(
            &served(resource, patient_id, &last_updated),
            &references,
            out,
        )
        .map_err(|e| not_json(resource, e))?;
        out.push(b'\n');
    }
    Ok(())
}

/// The patient as served: their newest `Patient` from any source, under the gateway's
/// patient id.
pub async fn served_patient(
    store: &ResourceStore,
    patient_id: &str,
) -> Result<Option<(Value, String)>> {
    let stored = match store.latest_of_type(patient_id, "Patient").await {
        Ok(stored) => stored,
        Err(Error::NotFound(_)) | Err(Error::KeyMissing(_)) => return Ok(None),
        Err(other) => return Err(other),
    };
    let history_ref = stored.meta.history_reference();
    let mut served = serve_all(store, patient_id, std::slice::from_ref(&stored)).await?;
    let mut patient = served.pop().unwrap_or_default();
    // The gateway's patient id names the person, whichever source the demographics came from.
    patient["id"] = Value::String(patient_id.to_string());
    Ok(Some((patient, history_ref)))
}
