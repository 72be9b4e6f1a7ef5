//! The typed check of one received resource: it must read as its FHIR type.
//!
//! The models are fhir-sdk's R4B ones, which read R4 JSON and skip fields they do not know,
//! so a JP Core extension never fails the check. Only the verdict is used: the gateway
//! stores the bytes it received, never a re-serialisation of the model (which would drop
//! those unknown fields). The type is known from the structural check, so each resource is
//! read straight into its own model rather than through the tagged `Resource` enum, which
//! would buffer it twice.

use fhir_sdk::r4b::resources as r4b;
use serde::de::DeserializeOwned;

/// `Ok` when `json` reads as a FHIR `resource_type`; otherwise why not (serde's path and
/// position, which name the field at fault).
pub fn check_typed(resource_type: &str, json: &str) -> Result<(), String> {
    let result = match resource_type {
        "Patient" => read::<r4b::Patient>(json),
        "Observation" => read::<r4b::Observation>(json),
        "Condition" => read::<r4b::Condition>(json),
        "AllergyIntolerance" => read::<r4b::AllergyIntolerance>(json),
        "MedicationRequest" => read::<r4b::MedicationRequest>(json),
        "MedicationDispense" => read::<r4b::MedicationDispense>(json),
        "MedicationStatement" => read::<r4b::MedicationStatement>(json),
        "Immunization" => read::<r4b::Immunization>(json),
        "DiagnosticReport" => read::<r4b::DiagnosticReport>(json),
        "DocumentReference" => read::<r4b::DocumentReference>(json),
        "Encounter" => read::<r4b::Encounter>(json),
        "Composition" => read::<r4b::Composition>(json),
        _ => read::<r4b::Resource>(json),
    };
    result.map_err(|error| format!("does not read as a FHIR {resource_type}: {error}"))
}

fn read<T: DeserializeOwned>(json: &str) -> Result<(), serde_json::Error> {
    serde_json::from_str::<T>(json).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every JP Core example (both OID and URL forms) reads as its type.
    #[test]
    fn jp_core_examples_pass() {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/jp-core-1.1.2");
        let mut checked = 0;
        for form in ["oid", "url"] {
            let dir = std::path::Path::new(root).join(form);
            for entry in std::fs::read_dir(&dir).expect("fixture dir") {
                let path = entry.expect("entry").path();
                let json = std::fs::read_to_string(&path).expect("fixture");
                let value: serde_json::Value = serde_json::from_str(&json).expect("json");
                let resource_type = value["resourceType"].as_str().expect("resourceType");
                assert_eq!(
                    check_typed(resource_type, &json),
                    Ok(()),
                    "{}",
                    path.display()
                );
                checked += 1;
            }
        }
        assert!(checked >= 30, "{checked}");
    }

    #[test]
    fn wrong_shapes_and_codes_are_named() {
        let cases = [
            (
                "Observation",
                r#"{"resourceType":"Observation","status":"finalised","code":{"text":"x"}}"#,
                "finalised",
            ),
            (
                "Observation",
                r#"{"resourceType":"Observation","status":"final"}"#,
                "missing field `code`",
            ),
            (
                "Condition",
                r#"{"resourceType":"Condition","subject":"Patient/1"}"#,
                "invalid type",
            ),
            (
                "Patient",
                r#"{"resourceType":"Patient","birthDate":"1970-13-45"}"#,
                "",
            ),
        ];
        for (resource_type, json, expected) in cases {
            let error = check_typed(resource_type, json).expect_err(json);
            assert!(error.contains(resource_type), "{error}");
            assert!(error.contains(expected), "{error}");
        }
    }

    #[test]
    fn unknown_fields_and_extensions_pass() {
        let json = r#"{"resourceType":"Observation","status":"final","code":{"text":"x"},
            "subject":{"reference":"Patient/1"},"notAnR4Field":true,
            "extension":[{"url":"http://jpfhir.jp/fhir/core/Extension/x","valueString":"y"}]}"#;
        assert_eq!(check_typed("Observation", json), Ok(()));
    }
}
