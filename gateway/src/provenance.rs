//! The FHIR Provenance the gateway stores beside what it receives: which resource versions
//! came from which source, when, and on whose behalf. Pulls and uploads both use it, so a
//! record with several arrivals (a reconciled checkup) carries one Provenance per source.

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::store::resources::{NewResource, ResourceMeta, SourceIdentity};
use crate::store::{millis_to_rfc3339, now_millis};

const PARTICIPANT: &str = "http://terminology.hl7.org/CodeSystem/provenance-participant-type";

/// Where a set of resource versions came from.
pub struct Origin<'a> {
    pub patient_id: &'a str,
    /// The gateway's id of the source (`urn:phr-gateway:source`), e.g. `portal` or `upload`.
    pub source_id: &'a str,
    pub source_display: &'a str,
    /// The permission it arrived under (a pull instruction), if any.
    pub policy: Option<String>,
    /// The gateway's own record of the arrival (`system`, `value`), e.g. the pull job.
    pub entity: Option<(&'a str, &'a str)>,
}

/// The Provenance for `targets`, or `None` when there are none. Its id is derived from the
/// source and the target versions, so storing the same arrival twice changes nothing and
/// different sources of the same version get a Provenance each.
pub fn provenance_for(
    origin: &Origin<'_>,
    targets: &[&ResourceMeta],
) -> Result<Option<NewResource>> {
    if targets.is_empty() {
        return Ok(None);
    }
    let mut digest = Sha256::new();
    digest.update(origin.source_id.as_bytes());
    digest.update([0x1f]);
    for meta in targets {
        digest.update(format!(
            "{}/{}/{};",
            meta.resource_type, meta.id, meta.version
        ));
    }
    let id = hex::encode(&digest.finalize()[..16]);
    let mut body = json!({
        "resourceType": "Provenance",
        "id": id,
        "target": targets.iter().map(|m| json!({
            "reference": m.history_reference()
        })).collect::<Vec<_>>(),
        "recorded": millis_to_rfc3339(now_millis()),
        "activity": {"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation",
            "code": "CREATE"
        }]},
        "agent": [{
            "type": {"coding": [{"system": PARTICIPANT, "code": "author"}]},
            "who": {
                "identifier": {"system": "urn:phr-gateway:source", "value": origin.source_id},
                "display": origin.source_display
            }
        }, {
            "type": {"coding": [{"system": PARTICIPANT, "code": "assembler"}]},
            "who": {"display": "phr-gateway"},
            "onBehalfOf": {"reference": format!("Patient/{}", origin.patient_id)}
        }]
    });
    if let Some(policy) = &origin.policy {
        body["policy"] = Value::from(vec![policy.clone()]);
    }
    if let Some((system, value)) = origin.entity {
        body["entity"] = json!([{
            "role": "source",
            "what": {"identifier": {"system": system, "value": value}}
        }]);
    }
    Ok(Some(NewResource {
        patient_id: origin.patient_id.to_string(),
        category: "provenance".into(),
        source: SourceIdentity {
            source: "phr-gateway".into(),
            resource_type: "Provenance".into(),
            source_resource_id: id,
            version_id: Some("1".into()),
        },
        body: serde_json::to_vec(&body).map_err(|e| Error::Invalid(e.to_string()))?,
    }))
}
