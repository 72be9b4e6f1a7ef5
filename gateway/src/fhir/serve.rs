//! Serving stored resources: parsed, their references resolved to the gateway's ids in
//! the store, and presented (see `present`). Shared by the FHIR API and exports.

use serde_json::Value;

use super::present::{present, references_in, ReferenceMap, Served};
use crate::error::{Error, Result};
use crate::store::millis_to_rfc3339;
use crate::store::resources::{ResourceStore, StoredResource};

/// Resolves the relative references of `stored` resources to the gateway's ids (same
/// patient, same source).
async fn resolve_references(
    store: &ResourceStore,
    patient_id: &str,
    stored: &[(&StoredResource, &Value)],
) -> Result<ReferenceMap> {
    // Each reference once, looked up together: a page of search results is one query.
    let mut wanted = Vec::new();
    for (resource, body) in stored {
        for (resource_type, id) in references_in(body) {
            let key = (resource.meta.source.clone(), resource_type, id);
            if !wanted.contains(&key) {
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

/// Stored resources as served (gateway ids, meta, references).
pub async fn serve_all(
    store: &ResourceStore,
    patient_id: &str,
    stored: &[StoredResource],
) -> Result<Vec<Value>> {
    let parsed: Vec<Value> = stored
        .iter()
        .map(|resource| {
            serde_json::from_slice(&resource.body).map_err(|e| {
                Error::Invalid(format!(
                    "stored {} {} is not JSON: {e}",
                    resource.meta.resource_type, resource.meta.id
                ))
            })
        })
        .collect::<Result<_, _>>()?;
    let pairs: Vec<(&StoredResource, &Value)> = stored.iter().zip(parsed.iter()).collect();
    let references = resolve_references(store, patient_id, &pairs).await?;
    Ok(stored
        .iter()
        .zip(parsed)
        .map(|(resource, body)| {
            let last_updated = millis_to_rfc3339(resource.meta.last_updated);
            present(
                body,
                &Served {
                    id: &resource.meta.id,
                    version: resource.meta.version,
                    last_updated: &last_updated,
                    source: &resource.meta.source,
                    patient_id,
                },
                &references,
            )
        })
        .collect())
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
