//! Whether a stored resource matches a search's content parameters (`code`, `category`,
//! `date`), read from its JSON as received. No I/O.

use serde_json::Value;

use super::query::{
    category_path, code_path, date_paths, parse_date_range, Range, SearchQuery, Token,
};

/// Whether `resource` (of `resource_type`) matches every content parameter of `query`.
pub fn matches(resource_type: &str, resource: &Value, query: &SearchQuery) -> bool {
    let codes_ok = query.codes.iter().all(|any_of| {
        code_path(resource_type).is_some_and(|path| {
            any_of
                .iter()
                .any(|token| concept_matches(&resource[path], token))
        })
    });
    let categories_ok = query.categories.iter().all(|any_of| {
        category_path(resource_type).is_some_and(|path| {
            any_of
                .iter()
                .any(|token| category_matches(&resource[path], token))
        })
    });
    let dates_ok = query.dates.iter().all(|date| {
        date_range_of(resource_type, resource).is_some_and(|range| date.matches(range))
    });
    let ids_ok = query.ids.iter().all(|any_of| {
        resource["id"]
            .as_str()
            .is_some_and(|id| any_of.iter().any(|wanted| wanted == id))
    });
    codes_ok && categories_ok && dates_ok && ids_ok
}

/// A CodeableConcept (or an array of them, or a bare code string) matching a token.
fn concept_matches(value: &Value, token: &Token) -> bool {
    match value {
        Value::Array(items) => items.iter().any(|item| concept_matches(item, token)),
        Value::String(code) => token.matches(None, Some(code)),
        Value::Object(_) => value["coding"].as_array().is_some_and(|codings| {
            codings
                .iter()
                .any(|coding| token.matches(coding["system"].as_str(), coding["code"].as_str()))
        }),
        _ => false,
    }
}

/// Categories are CodeableConcepts, except AllergyIntolerance's plain codes; a token
/// without a system matches either.
fn category_matches(value: &Value, token: &Token) -> bool {
    concept_matches(value, token)
}

/// The time a resource's `date` parameter refers to, as a range.
pub fn date_range_of(resource_type: &str, resource: &Value) -> Option<Range> {
    for path in date_paths(resource_type)? {
        match &resource[*path] {
            Value::String(text) => return parse_date_range(text),
            Value::Object(period) => {
                let start = period
                    .get("start")
                    .and_then(Value::as_str)
                    .and_then(parse_date_range)
                    .map_or(i64::MIN, |r| r.start);
                let end = period
                    .get("end")
                    .and_then(Value::as_str)
                    .and_then(parse_date_range)
                    .map_or(i64::MAX, |r| r.end);
                if start == i64::MIN && end == i64::MAX {
                    return None;
                }
                return Some(Range { start, end });
            }
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::query::{parse, Handling, SearchKind};
    use serde_json::json;

    fn query(resource_type: &str, params: &[(&str, &str)]) -> SearchQuery {
        let params: Vec<(String, String)> = params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        parse(SearchKind::Type(resource_type), &params, Handling::Strict).unwrap()
    }

    #[test]
    fn content_parameters_match_as_fhir_says() {
        let systolic = json!({
            "resourceType": "Observation",
            "id": "o1",
            "code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],
            "effectiveDateTime": "2024-05-10T09:30:00+09:00"
        });
        let encounter = json!({
            "resourceType": "Encounter",
            "period": {"start": "2024-05-01", "end": "2024-05-03"}
        });
        let allergy = json!({"resourceType": "AllergyIntolerance", "category": ["food"], "recordedDate": "2023"});
        let dispense = json!({
            "resourceType": "MedicationDispense",
            "medicationCodeableConcept": {"coding": [{"system": "urn:oid:1.2.392.100495.20.2.74", "code": "612320261"}]}
        });
        type Case<'a> = (&'a str, &'a Value, Vec<(&'a str, &'a str)>, bool);
        let table: Vec<Case> = vec![
            (
                "Observation",
                &systolic,
                vec![("code", "http://loinc.org|8480-6")],
                true,
            ),
            (
                "Observation",
                &systolic,
                vec![("code", "8462-4,8480-6")],
                true,
            ),
            ("Observation", &systolic, vec![("code", "8462-4")], false),
            (
                "Observation",
                &systolic,
                vec![("code", "8480-6"), ("code", "8462-4")],
                false,
            ),
            (
                "Observation",
                &systolic,
                vec![("category", "vital-signs")],
                true,
            ),
            (
                "Observation",
                &systolic,
                vec![("category", "laboratory")],
                false,
            ),
            ("Observation", &systolic, vec![("date", "2024-05-10")], true),
            (
                "Observation",
                &systolic,
                vec![("date", "ge2024-05-11")],
                false,
            ),
            ("Observation", &systolic, vec![("date", "lt2024-06")], true),
            ("Observation", &systolic, vec![("_id", "o2,o1")], true),
            ("Observation", &systolic, vec![("_id", "o2")], false),
            ("Encounter", &encounter, vec![("date", "2024-05-02")], false),
            ("Encounter", &encounter, vec![("date", "2024-05")], true),
            (
                "Encounter",
                &encounter,
                vec![("date", "ge2024-05-02")],
                true,
            ),
            (
                "AllergyIntolerance",
                &allergy,
                vec![("category", "food")],
                true,
            ),
            (
                "AllergyIntolerance",
                &allergy,
                vec![("category", "medication")],
                false,
            ),
            (
                "AllergyIntolerance",
                &allergy,
                vec![("date", "2023-06")],
                false,
            ),
            ("AllergyIntolerance", &allergy, vec![("date", "2023")], true),
            (
                "MedicationDispense",
                &dispense,
                vec![("code", "612320261")],
                true,
            ),
            (
                "MedicationDispense",
                &dispense,
                vec![("code", "urn:oid:1.2.392.100495.20.2.74|")],
                true,
            ),
        ];
        for (resource_type, resource, params, expected) in table {
            assert_eq!(
                matches(resource_type, resource, &query(resource_type, &params)),
                expected,
                "{resource_type} {params:?}"
            );
        }
    }

    #[test]
    fn a_resource_without_the_element_never_matches() {
        let bare = json!({"resourceType": "Observation"});
        for params in [
            vec![("code", "x")],
            vec![("category", "x")],
            vec![("date", "2024")],
        ] {
            assert!(!matches(
                "Observation",
                &bare,
                &query("Observation", &params)
            ));
        }
        assert!(matches("Observation", &bare, &query("Observation", &[])));
    }
}
