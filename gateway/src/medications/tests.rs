use proptest::prelude::*;
use serde_json::{json, Value};

use super::dispensing_keys;
use crate::store::reconciliation::origin_key;

const YJ_URL: &str = "http://capstandard.jp/iyaku.info/CodeSystem/YJ-code";
const YJ_OID: &str = "urn:oid:1.2.392.100495.20.2.73";
const HOT9_URL: &str = "http://medis.or.jp/CodeSystem/master-HOT9";
const INSTITUTION: &str = "http://jpfhir.jp/fhir/core/IdSystem/insurance-medical-institution-no";

fn dispense(day: Option<&str>, institution: Option<&str>, codings: &[(&str, &str)]) -> Value {
    let mut body = json!({
        "resourceType": "MedicationDispense",
        "status": "completed",
        "medicationCodeableConcept": {
            "coding": codings
                .iter()
                .map(|(system, code)| json!({"system": system, "code": code}))
                .collect::<Vec<_>>()
        },
    });
    if let Some(day) = day {
        body["whenHandedOver"] = json!(day);
    }
    if let Some(code) = institution {
        body["performer"] = json!([{ "actor": {
            "identifier": { "system": INSTITUTION, "value": code }, "display": "薬局"
        }}]);
    }
    body
}

#[test]
fn copies_from_a_hospital_and_the_portal_share_a_key() {
    // The hospital names YJ and HOT9; the portal one of them.
    let hospital = dispense(
        Some("2025-04-01T10:30:00+09:00"),
        Some("1312345678"),
        &[(YJ_URL, "2149039F1020"), (HOT9_URL, "107654301")],
    );
    let portal_yj = dispense(
        Some("2025-04-01"),
        Some("1312345678"),
        &[(YJ_OID, "2149039F1020")],
    );
    let portal_hot9 = dispense(
        Some("2025-04-01"),
        Some("1312345678"),
        &[(HOT9_URL, "107654301")],
    );
    let hospital_keys = dispensing_keys(&hospital);
    assert_eq!(hospital_keys.len(), 2);
    for portal in [portal_yj, portal_hot9] {
        let keys = dispensing_keys(&portal);
        assert_eq!(keys.len(), 1);
        assert!(hospital_keys.contains(&keys[0]), "{portal}");
    }
}

#[test]
fn what_differs_or_is_missing_keeps_records_apart() {
    let base = dispensing_keys(&dispense(
        Some("2025-04-01"),
        Some("1312345678"),
        &[(YJ_URL, "2149039F1020")],
    ));
    let table: [(&str, Value); 7] = [
        (
            "another day",
            dispense(
                Some("2025-04-02"),
                Some("1312345678"),
                &[(YJ_URL, "2149039F1020")],
            ),
        ),
        (
            "another institution",
            dispense(
                Some("2025-04-01"),
                Some("1399999999"),
                &[(YJ_URL, "2149039F1020")],
            ),
        ),
        (
            "another drug",
            dispense(
                Some("2025-04-01"),
                Some("1312345678"),
                &[(YJ_URL, "2171014G1020")],
            ),
        ),
        (
            "same code, other system",
            dispense(
                Some("2025-04-01"),
                Some("1312345678"),
                &[(HOT9_URL, "2149039F1020")],
            ),
        ),
        (
            "an unknown code system",
            dispense(
                Some("2025-04-01"),
                Some("1312345678"),
                &[("http://example.org/local", "2149039F1020")],
            ),
        ),
        (
            "no day",
            dispense(None, Some("1312345678"), &[(YJ_URL, "2149039F1020")]),
        ),
        (
            "no institution",
            dispense(Some("2025-04-01"), None, &[(YJ_URL, "2149039F1020")]),
        ),
    ];
    for (case, body) in table {
        let keys = dispensing_keys(&body);
        assert!(
            keys.iter().all(|key| !base.contains(key)),
            "{case}: {keys:?}"
        );
    }
    assert!(dispensing_keys(&dispense(Some("2025-04-01"), Some("1312345678"), &[])).is_empty());
    assert!(dispensing_keys(&json!({"resourceType": "MedicationDispense"})).is_empty());
    assert!(dispensing_keys(&json!("not an object")).is_empty());
}

#[test]
fn origin_keys_name_one_record_at_one_source() {
    let a = origin_key("portal", "MedicationDispense", "med-1-1");
    assert_eq!(a, origin_key("portal", "MedicationDispense", "med-1-1"));
    assert_ne!(a, origin_key("hospital", "MedicationDispense", "med-1-1"));
    assert_ne!(a, origin_key("portal", "MedicationDispense", "med-1-2"));
    // Parts are separated, so shifting text between them changes the key.
    assert_ne!(
        origin_key("portal", "MedicationDispense", "x"),
        origin_key("portalM", "edicationDispense", "x")
    );
}

proptest! {
    /// The keys do not depend on the order of the codings, and the same input always
    /// gives the same keys (no clock, no randomness).
    #[test]
    fn keys_are_deterministic_and_ignore_coding_order(
        day in "20[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8])",
        institution in "[0-9]{10}",
        yj in "[0-9]{7}[A-Z][0-9]{4}",
        hot9 in "[0-9]{9}",
    ) {
        let forward = dispense(Some(&day), Some(&institution), &[(YJ_URL, &yj), (HOT9_URL, &hot9)]);
        let backward = dispense(Some(&day), Some(&institution), &[(HOT9_URL, &hot9), (YJ_URL, &yj)]);
        let keys = dispensing_keys(&forward);
        prop_assert_eq!(keys.len(), 2);
        prop_assert_eq!(&keys, &dispensing_keys(&backward));
        prop_assert_eq!(&keys, &dispensing_keys(&forward));
    }
}
