//! How a stored resource is served: the JSON as received, with the gateway's logical id,
//! version and last update in `meta`, where it came from in `meta.source`, and references
//! pointed at the gateway's ids (the patient's at the patient, other resources at what the
//! same source sent, where held). Unknown elements and extensions are kept. No I/O.

use std::collections::HashMap;

use serde_json::{Map, Value};

/// The gateway's facts about one stored version.
#[derive(Debug, Clone, Copy)]
pub struct Served<'a> {
    pub id: &'a str,
    pub version: i64,
    /// RFC 3339.
    pub last_updated: &'a str,
    /// The gateway's id of the source it came from.
    pub source: &'a str,
    /// The gateway's id of the patient (the served `Patient`'s id).
    pub patient_id: &'a str,
}

/// Resolved references: `(type, source id)` → the gateway's id.
pub type ReferenceMap = HashMap<(String, String), String>;

/// The relative references (`Type/id`, `Type/id/_history/n`) in a resource other than to
/// `Patient`, each once, for resolving.
pub fn references_in(resource: &Value) -> Vec<(String, String)> {
    let mut found = Vec::new();
    collect_references(resource, &mut found);
    found
}

/// `references_in`, added to `found` (each once).
pub(super) fn collect_references(value: &Value, found: &mut Vec<(String, String)>) {
    walk(value, &mut |reference| note_reference(reference, found));
}

/// One reference string, added to `found` unless it is to `Patient`, not relative, or
/// there already.
pub(super) fn note_reference(reference: &str, found: &mut Vec<(String, String)>) {
    if let Some((resource_type, id)) = relative_reference(reference) {
        if resource_type != "Patient"
            && !found
                .iter()
                .any(|(t, i)| t.as_str() == resource_type && i.as_str() == id)
        {
            found.push((resource_type.to_string(), id.to_string()));
        }
    }
}

fn walk(value: &Value, visit: &mut impl FnMut(&str)) {
    match value {
        Value::Object(map) => {
            if let Some(Value::String(reference)) = map.get("reference") {
                visit(reference);
            }
            for child in map.values() {
                walk(child, visit);
            }
        }
        Value::Array(items) => items.iter().for_each(|item| walk(item, visit)),
        _ => {}
    }
}

/// `Type/id` or `Type/id/_history/v` → (`Type`, `id`); absolute URLs, contained (`#x`) and
/// other forms → `None`.
pub fn relative_reference(reference: &str) -> Option<(&str, &str)> {
    let mut parts = reference.split('/');
    let resource_type = parts.next()?;
    let id = parts.next()?;
    match (parts.next(), parts.next(), parts.next()) {
        (None, None, None) => {}
        (Some("_history"), Some(_), None) => {}
        _ => return None,
    }
    let type_ok = resource_type
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_uppercase())
        && resource_type.chars().all(|c| c.is_ascii_alphabetic());
    let id_ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    (type_ok && id_ok).then_some((resource_type, id))
}

/// The resource as served (see the module comment).
pub fn present(mut resource: Value, served: &Served<'_>, references: &ReferenceMap) -> Value {
    rewrite_references(&mut resource, served.patient_id, references);
    let Value::Object(map) = &mut resource else {
        return resource;
    };
    map.insert("id".into(), Value::String(served.id.to_string()));
    let meta = map
        .entry("meta")
        .or_insert_with(|| Value::Object(Map::new()));
    stamp_meta(meta, served);
    resource
}

/// The gateway's version, last update and (unless the source gave one) source in `meta`;
/// a `meta` that is not an object is replaced.
pub(super) fn stamp_meta(meta: &mut Value, served: &Served<'_>) {
    if !meta.is_object() {
        *meta = Value::Object(Map::new());
    }
    if let Value::Object(meta) = meta {
        meta.insert(
            "versionId".into(),
            Value::String(served.version.to_string()),
        );
        meta.insert(
            "lastUpdated".into(),
            Value::String(served.last_updated.to_string()),
        );
        meta.entry("source")
            .or_insert_with(|| Value::String(format!("urn:phr-gateway:source:{}", served.source)));
    }
}

/// Every `reference` string in `value` (and below) pointed at the gateway's ids.
pub(super) fn rewrite_references(value: &mut Value, patient_id: &str, references: &ReferenceMap) {
    match value {
        Value::Object(map) => {
            if let Some(Value::String(reference)) = map.get_mut("reference") {
                rewrite_reference(reference, patient_id, references);
            }
            for child in map.values_mut() {
                rewrite_references(child, patient_id, references);
            }
        }
        Value::Array(items) => items
            .iter_mut()
            .for_each(|item| rewrite_references(item, patient_id, references)),
        _ => {}
    }
}

/// One reference pointed at the gateway's id: the patient's at the patient, another
/// resource's where it is held; anything else is left as it is.
pub(super) fn rewrite_reference(
    reference: &mut String,
    patient_id: &str,
    references: &ReferenceMap,
) {
    let Some((resource_type, id)) = relative_reference(reference) else {
        return;
    };
    let rewritten = if resource_type == "Patient" {
        Some(format!("Patient/{patient_id}"))
    } else {
        references
            .get(&(resource_type.to_string(), id.to_string()))
            .map(|gateway_id| format!("{resource_type}/{gateway_id}"))
    };
    if let Some(rewritten) = rewritten {
        *reference = rewritten;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ids_meta_and_references_are_the_gateways_and_the_rest_is_kept() {
        let received = json!({
            "resourceType": "MedicationRequest",
            "id": "src-17",
            "meta": {"versionId": "9", "profile": ["http://jpfhir.jp/fhir/core/StructureDefinition/JP_MedicationRequest"]},
            "extension": [{"url": "urn:x", "valueString": "kept"}],
            "subject": {"reference": "Patient/hosp-42", "display": "kept"},
            "medicationReference": {"reference": "Medication/m-1"},
            "encounter": {"reference": "Encounter/not-held"},
            "basedOn": [{"reference": "https://elsewhere.example/fhir/ServiceRequest/1"}],
            "note": [{"text": "contained refs like #x stay"}]
        });
        assert_eq!(
            references_in(&received),
            vec![
                ("Medication".to_string(), "m-1".to_string()),
                ("Encounter".to_string(), "not-held".to_string())
            ]
        );
        let mut map = ReferenceMap::new();
        map.insert(("Medication".into(), "m-1".into()), "g-med".into());
        let served = present(
            received,
            &Served {
                id: "g-1",
                version: 3,
                last_updated: "2026-11-25T00:00:00Z",
                source: "hospital",
                patient_id: "p-1",
            },
            &map,
        );
        assert_eq!(served["id"], "g-1");
        assert_eq!(served["meta"]["versionId"], "3");
        assert_eq!(served["meta"]["lastUpdated"], "2026-11-25T00:00:00Z");
        assert_eq!(served["meta"]["source"], "urn:phr-gateway:source:hospital");
        assert_eq!(
            served["meta"]["profile"][0],
            "http://jpfhir.jp/fhir/core/StructureDefinition/JP_MedicationRequest"
        );
        assert_eq!(served["extension"][0]["valueString"], "kept");
        assert_eq!(served["subject"]["reference"], "Patient/p-1");
        assert_eq!(served["subject"]["display"], "kept");
        assert_eq!(
            served["medicationReference"]["reference"],
            "Medication/g-med"
        );
        assert_eq!(served["encounter"]["reference"], "Encounter/not-held");
        assert_eq!(
            served["basedOn"][0]["reference"],
            "https://elsewhere.example/fhir/ServiceRequest/1"
        );
    }

    #[test]
    fn relative_references_only() {
        let table = [
            ("Patient/1", Some(("Patient", "1"))),
            (
                "Observation/a-b.c/_history/2",
                Some(("Observation", "a-b.c")),
            ),
            ("#contained", None),
            ("urn:uuid:1234", None),
            ("http://x/Patient/1", None),
            ("Patient/", None),
            ("patient/1", None),
            ("Patient/1/extra", None),
        ];
        for (reference, expected) in table {
            assert_eq!(relative_reference(reference), expected, "{reference}");
        }
    }
}
