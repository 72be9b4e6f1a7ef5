//! Reading a searchset page entry by entry.
//!
//! Each entry is judged on its own: a malformed, oversize or foreign entry becomes a
//! rejection with a reason while the rest of the page is kept. Resources keep the exact
//! bytes the server sent (`RawValue`), never a re-serialisation.

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::smart::{is_fhir_id, is_resource_type_name};
use crate::error::SourceError;

/// Who the resources must belong to, and how large one may be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryRules {
    /// The linked patient's id at the source (the token's `patient`).
    pub linked_patient_id: String,
    /// The FHIR base, to recognise absolute references to the linked patient.
    pub fhir_base_url: String,
    /// Entries larger than this many bytes of JSON are rejected.
    pub max_entry_bytes: usize,
}

/// A resource that passed every check, with its bytes exactly as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptedResource {
    pub resource_type: String,
    pub id: String,
    pub version_id: Option<String>,
    pub last_updated: Option<String>,
    pub body: Vec<u8>,
}

/// What became of one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryOutcome {
    Accepted(AcceptedResource),
    Rejected {
        resource_type: Option<String>,
        id: Option<String>,
        reason: String,
    },
    /// Not data: an `OperationOutcome` the server attached with `search.mode = outcome`.
    Informational,
}

/// One page: its entries in order, and the `next` link if there is one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedPage {
    pub entries: Vec<EntryOutcome>,
    pub next_url: Option<String>,
    pub total: Option<u64>,
}

#[derive(Deserialize)]
struct RawBundle<'a> {
    #[serde(rename = "resourceType")]
    resource_type: String,
    #[serde(default)]
    total: Option<u64>,
    #[serde(default)]
    link: Option<Value>,
    #[serde(default, borrow)]
    entry: Option<Vec<&'a RawValue>>,
}

#[derive(Deserialize)]
struct RawEntry<'a> {
    #[serde(default, borrow)]
    resource: Option<&'a RawValue>,
    #[serde(default)]
    search: Option<Value>,
}

/// Parses a Bundle page. Only a page that is not a Bundle at all is an error; everything
/// wrong inside one entry stays inside that entry.
pub fn parse_bundle_page(bytes: &[u8], rules: &EntryRules) -> Result<ParsedPage, SourceError> {
    // FHIR JSON is UTF-8; say so plainly rather than as a JSON string error.
    if let Err(error) = std::str::from_utf8(bytes) {
        return Err(SourceError::Protocol(format!(
            "page is not UTF-8 text (first bad byte at offset {})",
            error.valid_up_to()
        )));
    }
    let bundle: RawBundle<'_> = serde_json::from_slice(bytes)
        .map_err(|error| SourceError::Protocol(format!("page is not a FHIR Bundle: {error}")))?;
    if bundle.resource_type != "Bundle" {
        return Err(SourceError::Protocol(format!(
            "page is a {} rather than a Bundle",
            bundle.resource_type
        )));
    }
    let entries = bundle
        .entry
        .unwrap_or_default()
        .into_iter()
        .map(|raw| examine_entry(raw, rules))
        .collect();
    Ok(ParsedPage {
        entries,
        next_url: next_link(bundle.link.as_ref()),
        total: bundle.total,
    })
}

/// `parse_bundle_page` on the blocking pool: a page of a thousand entries is milliseconds
/// of parsing and typed checks, which on an async worker would hold up every other task
/// on it (among them the transaction that stores the previous page).
pub async fn parse_bundle_page_blocking(
    bytes: Vec<u8>,
    rules: &EntryRules,
) -> Result<ParsedPage, SourceError> {
    let rules = rules.clone();
    tokio::task::spawn_blocking(move || parse_bundle_page(&bytes, &rules))
        .await
        .map_err(|error| SourceError::Protocol(format!("page parsing stopped: {error}")))?
}

/// Checks a single resource (e.g. the answer to `GET Patient/{id}`).
pub fn examine_resource_bytes(bytes: &[u8], rules: &EntryRules) -> EntryOutcome {
    match serde_json::from_slice::<&RawValue>(bytes) {
        Ok(raw) => examine_resource(raw, rules),
        Err(error) => rejected(None, None, format!("resource is not JSON: {error}")),
    }
}

fn next_link(links: Option<&Value>) -> Option<String> {
    links?
        .as_array()?
        .iter()
        .find(|link| link.get("relation").and_then(Value::as_str) == Some("next"))?
        .get("url")?
        .as_str()
        .map(str::to_string)
}

fn rejected(resource_type: Option<String>, id: Option<String>, reason: String) -> EntryOutcome {
    EntryOutcome::Rejected {
        resource_type,
        id,
        reason,
    }
}

fn examine_entry(raw: &RawValue, rules: &EntryRules) -> EntryOutcome {
    let size = raw.get().len();
    if size > rules.max_entry_bytes {
        return rejected(
            None,
            None,
            format!(
                "entry is {size} bytes, over the {} byte cap",
                rules.max_entry_bytes
            ),
        );
    }
    let entry: RawEntry<'_> = match serde_json::from_str(raw.get()) {
        Ok(entry) => entry,
        Err(_) => return rejected(None, None, "entry is not a JSON object".into()),
    };
    let is_outcome = entry
        .search
        .as_ref()
        .and_then(|search| search.get("mode"))
        .and_then(Value::as_str)
        == Some("outcome");
    let Some(resource) = entry.resource else {
        return rejected(None, None, "entry has no resource".into());
    };
    if is_outcome {
        return EntryOutcome::Informational;
    }
    examine_resource(resource, rules)
}

fn examine_resource(raw: &RawValue, rules: &EntryRules) -> EntryOutcome {
    let size = raw.get().len();
    if size > rules.max_entry_bytes {
        return rejected(
            None,
            None,
            format!(
                "resource is {size} bytes, over the {} byte cap",
                rules.max_entry_bytes
            ),
        );
    }
    let Ok(Value::Object(resource)) = serde_json::from_str::<Value>(raw.get()) else {
        return rejected(None, None, "resource is not a JSON object".into());
    };
    let resource_type = resource.get("resourceType").and_then(Value::as_str);
    let id = resource.get("id").and_then(Value::as_str);
    let (resource_type, id) = match (resource_type, id) {
        (Some(resource_type), Some(id))
            if is_resource_type_name(resource_type) && is_fhir_id(id) =>
        {
            (resource_type.to_string(), id.to_string())
        }
        (resource_type, id) => {
            return rejected(
                resource_type.map(str::to_string),
                id.map(str::to_string),
                "resource lacks a valid resourceType or id".into(),
            )
        }
    };
    if let Err(reason) = check_patient(&resource, &resource_type, &id, rules) {
        return rejected(Some(resource_type), Some(id), reason);
    }
    if let Err(reason) = super::typed_check::check_typed(&resource_type, raw.get()) {
        return rejected(Some(resource_type), Some(id), reason);
    }
    let meta = resource.get("meta");
    let meta_string = |name: &str| {
        meta.and_then(|meta| meta.get(name))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    EntryOutcome::Accepted(AcceptedResource {
        version_id: meta_string("versionId"),
        last_updated: meta_string("lastUpdated"),
        resource_type,
        id,
        body: raw.get().as_bytes().to_vec(),
    })
}

/// The patient-mismatch guard: a record for anyone but the linked patient never reaches
/// the gateway's store, whatever the server sent.
fn check_patient(
    resource: &Map<String, Value>,
    resource_type: &str,
    id: &str,
    rules: &EntryRules,
) -> Result<(), String> {
    if resource_type == "Patient" {
        return if id == rules.linked_patient_id {
            Ok(())
        } else {
            Err(format!("belongs to another patient (Patient/{id})"))
        };
    }
    let references: Vec<&Value> = ["subject", "patient"]
        .iter()
        .filter_map(|field| resource.get(*field))
        .collect();
    if references.is_empty() {
        return Err(
            "has no subject or patient reference, so it cannot be tied to the linked patient"
                .into(),
        );
    }
    for reference in references {
        let Some(literal) = reference.get("reference").and_then(Value::as_str) else {
            return Err("subject/patient has no literal reference".into());
        };
        match referenced_patient(literal, &rules.fhir_base_url) {
            Some(patient) if patient == rules.linked_patient_id => {}
            Some(patient) => return Err(format!("belongs to another patient (Patient/{patient})")),
            None => return Err(format!("belongs to another patient ({literal})")),
        }
    }
    Ok(())
}

/// The patient id in `Patient/{id}`, `Patient/{id}/_history/{v}` or `{base}/Patient/{id}`.
fn referenced_patient<'a>(reference: &'a str, base_url: &str) -> Option<&'a str> {
    let relative = match reference.strip_prefix(base_url) {
        Some(rest) => rest.strip_prefix('/')?,
        None => reference,
    };
    let mut segments = relative.split('/');
    if segments.next()? != "Patient" {
        return None;
    }
    let id = segments.next()?;
    match (segments.next(), segments.next(), segments.next()) {
        (None, _, _) => Some(id),
        (Some("_history"), Some(_version), None) => Some(id),
        _ => None,
    }
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    fn rules() -> EntryRules {
        EntryRules {
            linked_patient_id: "pt1".into(),
            fhir_base_url: "https://h.example/r4".into(),
            max_entry_bytes: 2_000,
        }
    }

    fn bundle(entries: &[&str]) -> Vec<u8> {
        format!(
            r#"{{"resourceType":"Bundle","type":"searchset","link":[{{"relation":"self","url":"x"}},{{"relation":"next","url":"https://h.example/r4/Observation?page=2"}}],"entry":[{}]}}"#,
            entries.join(",")
        )
        .into_bytes()
    }

    #[test]
    fn each_entry_judged_alone() {
        let good = r#"{"resource":{"resourceType":"Observation","id":"o1","meta":{"versionId":"3","lastUpdated":"2024-04-01T00:00:00Z"},"status":"final","code":{"text":"メモ"},"subject":{"reference":"Patient/pt1"}, "valueString" : "空白 も 保持"}}"#;
        let page = parse_bundle_page(
            &bundle(&[
                good,
                r#""a string""#,
                r#"{"resource":{"id":"x"}}"#,
                r#"{"resource":{"resourceType":"Observation","subject":{"reference":"Patient/pt1"}}}"#,
                r#"{"resource":{"resourceType":"Observation","id":"o2","subject":{"reference":"Patient/other"}}}"#,
                r#"{"resource":{"resourceType":"Patient","id":"other"}}"#,
                r#"{"resource":{"resourceType":"Condition","id":"c1"}}"#,
                r#"{"search":{"mode":"outcome"},"resource":{"resourceType":"OperationOutcome","id":"oo"}}"#,
                r#"{"resource":{"resourceType":"Immunization","id":"i1","status":"completed","vaccineCode":{"text":"インフルエンザ"},"occurrenceDateTime":"2024-10-01","patient":{"reference":"https://h.example/r4/Patient/pt1/_history/2"}}}"#,
                r#"{"resource":{"resourceType":"Observation","id":"o3","status":"finalised","code":{"text":"x"},"subject":{"reference":"Patient/pt1"}}}"#,
            ]),
            &rules(),
        )
        .expect("page");
        assert_eq!(
            page.next_url.as_deref(),
            Some("https://h.example/r4/Observation?page=2")
        );
        let EntryOutcome::Accepted(first) = &page.entries[0] else {
            panic!("first entry should be accepted: {:?}", page.entries[0]);
        };
        assert_eq!(first.version_id.as_deref(), Some("3"));
        // Bytes exactly as received, whitespace and all.
        assert!(std::str::from_utf8(&first.body)
            .expect("utf8")
            .contains(r#""valueString" : "空白 も 保持""#));
        for index in 1..=6 {
            assert!(
                matches!(page.entries[index], EntryOutcome::Rejected { .. }),
                "entry {index}: {:?}",
                page.entries[index]
            );
        }
        for index in [4, 5] {
            let EntryOutcome::Rejected { reason, .. } = &page.entries[index] else {
                panic!("expected rejection");
            };
            assert!(reason.contains("another patient"), "{reason}");
        }
        assert_eq!(page.entries[7], EntryOutcome::Informational);
        assert!(matches!(page.entries[8], EntryOutcome::Accepted(_)));
        // Structurally fine, but not a FHIR Observation: an unknown status code.
        let EntryOutcome::Rejected { reason, id, .. } = &page.entries[9] else {
            panic!("expected rejection: {:?}", page.entries[9]);
        };
        assert_eq!(id.as_deref(), Some("o3"));
        assert!(
            reason.contains("does not read as a FHIR Observation"),
            "{reason}"
        );
    }

    #[test]
    fn oversize_entry_rejected_rest_kept() {
        let big = format!(
            r#"{{"resource":{{"resourceType":"Observation","id":"big","subject":{{"reference":"Patient/pt1"}},"note":[{{"text":"{}"}}]}}}}"#,
            "x".repeat(3_000)
        );
        let small = r#"{"resource":{"resourceType":"Observation","id":"s","status":"final","code":{"text":"x"},"subject":{"reference":"Patient/pt1"}}}"#;
        let page = parse_bundle_page(&bundle(&[&big, small]), &rules()).expect("page");
        assert!(
            matches!(&page.entries[0], EntryOutcome::Rejected { reason, .. } if reason.contains("cap"))
        );
        assert!(matches!(page.entries[1], EntryOutcome::Accepted(_)));
    }

    #[test]
    fn non_bundles_are_page_errors() {
        assert!(parse_bundle_page(b"not json", &rules()).is_err());
        assert!(parse_bundle_page(br#"{"resourceType":"Patient"}"#, &rules()).is_err());
        assert!(parse_bundle_page(br#"{"resourceType":"Bundle","entry":{}}"#, &rules()).is_err());
        let empty = parse_bundle_page(br#"{"resourceType":"Bundle"}"#, &rules()).expect("empty");
        assert!(empty.entries.is_empty());
        assert_eq!(empty.next_url, None);
    }

    #[test]
    fn references() {
        assert_eq!(referenced_patient("Patient/a", "https://b"), Some("a"));
        assert_eq!(
            referenced_patient("https://b/Patient/a", "https://b"),
            Some("a")
        );
        assert_eq!(
            referenced_patient("Patient/a/_history/1", "https://b"),
            Some("a")
        );
        assert_eq!(referenced_patient("Group/a", "https://b"), None);
        assert_eq!(referenced_patient("Patient/a/extra", "https://b"), None);
        assert_eq!(referenced_patient("https://c/Patient/a", "https://b"), None);
    }

    #[test]
    fn jp_core_examples_pass_the_structural_checks() {
        let directory = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/jp-core-1.1.2/url");
        let rules = EntryRules {
            linked_patient_id: "jp-patient-example-1".into(),
            fhir_base_url: "https://h.example/r4".into(),
            max_entry_bytes: 1 << 20,
        };
        let mut checked = 0;
        for entry in std::fs::read_dir(directory).expect("fixtures") {
            let path = entry.expect("entry").path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let in_compartment = [
                "Patient-",
                "Observation-",
                "Condition-",
                "AllergyIntolerance-",
                "MedicationRequest-",
                "MedicationDispense-",
                "Immunization-",
                "DiagnosticReport-",
                "Encounter-",
            ]
            .iter()
            .any(|prefix| name.starts_with(prefix));
            if !in_compartment {
                continue;
            }
            let bytes = std::fs::read(&path).expect("read");
            let outcome = examine_resource_bytes(&bytes, &rules);
            let EntryOutcome::Accepted(accepted) = outcome else {
                panic!("{name}: {outcome:?}");
            };
            assert_eq!(
                accepted.body,
                bytes.trim_ascii(),
                "{name} must be kept byte for byte"
            );
            checked += 1;
        }
        assert!(checked >= 9, "only {checked} fixtures checked");
    }
}
