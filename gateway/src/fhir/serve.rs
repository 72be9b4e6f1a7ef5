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
    let mut map = ReferenceMap::new();
    for (resource, body) in stored {
        for (resource_type, id) in references_in(body) {
            if map.contains_key(&(resource_type.clone(), id.clone())) {
                continue;
            }
            if let Some(gateway_id) = store
                .gateway_id_of(patient_id, &resource.meta.source, &resource_type, &id)
                .await?
            {
                map.insert((resource_type, id), gateway_id);
            }
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
