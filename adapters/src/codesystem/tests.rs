use std::borrow::Cow;
use std::collections::HashSet;

use proptest::prelude::*;
use serde_json::{json, Value};

use super::*;

const JLAC10_URL: &str = "http://medis.or.jp/CodeSystem/master-JLAC10-17digits";
const HOT9_URL: &str = "http://medis.or.jp/CodeSystem/master-HOT9";
const MERIT9_URL: &str = "http://jpfhir.jp/fhir/core/mhlw/CodeSystem/MedicationUnitMERIT9Code";

// ---------------------------------------------------------------- canonical_system

#[test]
fn canonical_system_maps_known_oids_and_leaves_everything_else() {
    let cases: &[(&str, &str)] = &[
        // Known OID in every accepted spelling.
        ("urn:oid:1.2.392.200119.4.504", JLAC10_URL),
        ("1.2.392.200119.4.504", JLAC10_URL),
        ("URN:OID:1.2.392.200119.4.504", JLAC10_URL),
        ("Urn:Oid:1.2.392.100495.20.2.101", MERIT9_URL),
        // A system with two OIDs.
        ("urn:oid:1.2.392.200119.4.403.1", HOT9_URL),
        ("urn:oid:1.2.392.100495.20.2.74", HOT9_URL),
        // Identifier namespaces that JP Core rewrites.
        (
            "urn:oid:1.2.392.100495.20.3.81",
            "http://jpfhir.jp/fhir/core/mhlw/IdSystem/Medication-RPGroupNumber",
        ),
        // Known URLs stay, canonical or not.
        (JLAC10_URL, JLAC10_URL),
        (
            "http://jpfhir.jp/fhir/core/CodeSystem/JP_ObservationLabResultCode_CS",
            "http://jpfhir.jp/fhir/core/CodeSystem/JP_ObservationLabResultCode_CS",
        ),
        // Unknown OIDs, including branches and parents of known ones.
        (
            "urn:oid:1.2.392.200119.6.1005",
            "urn:oid:1.2.392.200119.6.1005",
        ),
        (
            "urn:oid:1.2.392.100495.20.3.51.11311234567",
            "urn:oid:1.2.392.100495.20.3.51.11311234567",
        ),
        ("urn:oid:1.2.392.200119.4", "urn:oid:1.2.392.200119.4"),
        (
            "urn:oid:1.2.392.200119.4.504.1",
            "urn:oid:1.2.392.200119.4.504.1",
        ),
        (
            "urn:oid:1.2.392.200119.4.504.",
            "urn:oid:1.2.392.200119.4.504.",
        ),
        (
            "urn:oid:01.2.392.200119.4.504",
            "urn:oid:01.2.392.200119.4.504",
        ),
        // Odd inputs: nothing to recognise, so nothing changes.
        ("", ""),
        ("urn:oid:", "urn:oid:"),
        ("urn:oid", "urn:oid"),
        (
            " urn:oid:1.2.392.200119.4.504",
            " urn:oid:1.2.392.200119.4.504",
        ),
        (
            "urn:oid:1.2.392.200119.4.504 ",
            "urn:oid:1.2.392.200119.4.504 ",
        ),
        (
            "urn:oid:urn:oid:1.2.392.200119.4.504",
            "urn:oid:urn:oid:1.2.392.200119.4.504",
        ),
        ("oid:1.2.392.200119.4.504", "oid:1.2.392.200119.4.504"),
        (
            "urn:oid:１.2.392.200119.4.504",
            "urn:oid:１.2.392.200119.4.504",
        ),
        ("urn:oi日本", "urn:oi日本"),
        ("日本語のコード体系", "日本語のコード体系"),
        ("phone", "phone"),
        ("http://unitsofmeasure.org", "http://unitsofmeasure.org"),
        ("urn:ietf:rfc:3986", "urn:ietf:rfc:3986"),
        (
            "urn:uuid:2c2a9d5e-4f3b-4a55-9a65-7f3f1c0b9e11",
            "urn:uuid:2c2a9d5e-4f3b-4a55-9a65-7f3f1c0b9e11",
        ),
    ];
    for (input, expected) in cases {
        assert_eq!(canonical_system(input), *expected, "input {input:?}");
        let changed = input != expected;
        assert_eq!(url_for_oid(input).is_some(), changed, "input {input:?}");
    }
}

#[test]
fn canonical_system_borrows_the_input_when_unchanged() {
    let input = String::from("urn:oid:1.2.392.200119.6.1005");
    match canonical_system(&input) {
        Cow::Borrowed(output) => assert!(std::ptr::eq(output, input.as_str())),
        Cow::Owned(_) => panic!("unchanged input must not be copied"),
    }
}

#[test]
fn find_code_system_recognises_every_form() {
    let jlac10 = find_code_system(JLAC10_URL).expect("JLAC10 is known");
    for form in [
        "urn:oid:1.2.392.200119.4.504",
        "1.2.392.200119.4.504",
        JLAC10_URL,
        "http://jpfhir.jp/fhir/core/CodeSystem/JP_ObservationLabResultCode_CS",
    ] {
        assert_eq!(find_code_system(form), Some(jlac10), "{form}");
    }
    assert_eq!(find_code_system("urn:oid:1.2.392.200119.6.1005"), None);
    assert_eq!(find_code_system(""), None);
}

// ---------------------------------------------------------------- the table itself

fn is_well_formed_oid(oid: &str) -> bool {
    oid.split('.').count() >= 2
        && oid.split('.').all(|arc| {
            !arc.is_empty()
                && arc.bytes().all(|b| b.is_ascii_digit())
                && (arc == "0" || !arc.starts_with('0'))
        })
}

#[test]
fn table_is_consistent() {
    let mut seen_oids = HashSet::new();
    let mut seen_urls = HashSet::new();
    for entry in known_code_systems() {
        assert!(!entry.title.trim().is_empty(), "{} has no title", entry.url);
        for url in std::iter::once(&entry.url).chain(entry.other_urls) {
            assert!(
                url.starts_with("http://") || url.starts_with("https://"),
                "{url}"
            );
            // Plain ASCII without quotes or backslashes, so splicing it into JSON is trivial
            // and it can never be mistaken for an OID.
            assert!(
                url.bytes()
                    .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\'),
                "{url}"
            );
            assert!(seen_urls.insert(*url), "URL listed twice: {url}");
        }
        for oid in entry.oids {
            assert!(is_well_formed_oid(oid), "malformed OID {oid:?}");
            assert!(seen_oids.insert(*oid), "OID listed twice: {oid}");
        }
    }
}

#[test]
fn every_table_entry_round_trips_through_canonical_system() {
    for entry in known_code_systems() {
        for oid in entry.oids {
            assert_eq!(canonical_system(&format!("urn:oid:{oid}")), entry.url);
            assert_eq!(canonical_system(oid), entry.url);
            assert_eq!(find_code_system(oid), Some(entry));
        }
        assert_eq!(canonical_system(entry.url), entry.url);
        assert_eq!(find_code_system(entry.url), Some(entry));
        for other in entry.other_urls {
            assert_eq!(canonical_system(other), *other, "other URLs are kept");
            assert_eq!(find_code_system(other), Some(entry));
        }
    }
}

// ---------------------------------------------------------------- normalize_resource

#[test]
fn rewrites_coding_identifier_quantity_and_value_x_everywhere() {
    let mut resource = json!({
        "resourceType": "MedicationRequest",
        "identifier": [
            {"system": "urn:oid:1.2.392.100495.20.3.81", "value": "1"},
            {"system": "urn:oid:1.2.392.100495.20.3.51.11311234567", "value": "00001"}
        ],
        "contained": [{
            "resourceType": "Observation",
            "code": {"coding": [{"system": "urn:oid:1.2.392.200119.4.504", "code": "3A010000002327101"}]}
        }],
        "extension": [{
            "url": "http://example.org/ext",
            "extension": [{"url": "inner", "valueCoding": {"system": "1.2.392.100495.20.3.21", "code": "13"}}]
        }],
        "dispenseRequest": {"quantity": {"value": 21, "unit": "錠", "system": "urn:oid:1.2.392.100495.20.2.101", "code": "TAB"}},
        "dosageInstruction": [{"doseAndRate": [{"rateRatio": {
            "numerator": {"value": 3, "system": "urn:oid:1.2.392.100495.20.2.101", "code": "TAB"},
            "denominator": {"value": 1, "system": "http://unitsofmeasure.org", "code": "d"}
        }}]}],
        "note": [{"text": "urn:oid:1.2.392.200119.4.504 is only text here"}],
        "telecom": [{"system": "phone", "value": "0312345678"}]
    });
    let report = normalize_resource(&mut resource);

    let expected_changes = [
        (
            "/identifier/0/system",
            "urn:oid:1.2.392.100495.20.3.81",
            "http://jpfhir.jp/fhir/core/mhlw/IdSystem/Medication-RPGroupNumber",
        ),
        (
            "/contained/0/code/coding/0/system",
            "urn:oid:1.2.392.200119.4.504",
            JLAC10_URL,
        ),
        (
            "/extension/0/extension/0/valueCoding/system",
            "1.2.392.100495.20.3.21",
            "http://jpfhir.jp/fhir/core/mhlw/CodeSystem/PrefectureNo-2digits",
        ),
        (
            "/dispenseRequest/quantity/system",
            "urn:oid:1.2.392.100495.20.2.101",
            MERIT9_URL,
        ),
        (
            "/dosageInstruction/0/doseAndRate/0/rateRatio/numerator/system",
            "urn:oid:1.2.392.100495.20.2.101",
            MERIT9_URL,
        ),
    ]
    .map(|(p, f, t)| (p.to_owned(), f.to_owned(), t.to_owned()));
    assert_eq!(report.changed, expected_changes);
    for (pointer, _, to) in &report.changed {
        assert_eq!(resource.pointer(pointer), Some(&json!(to)));
    }
    // Branch OIDs, UCUM, ContactPoint codes and free text are untouched.
    assert_eq!(
        resource["identifier"][1]["system"],
        "urn:oid:1.2.392.100495.20.3.51.11311234567"
    );
    assert_eq!(
        resource["dosageInstruction"][0]["doseAndRate"][0]["rateRatio"]["denominator"]["system"],
        "http://unitsofmeasure.org"
    );
    assert_eq!(resource["telecom"][0]["system"], "phone");
    assert_eq!(
        resource["note"][0]["text"],
        "urn:oid:1.2.392.200119.4.504 is only text here"
    );
}

#[test]
fn reports_in_document_order_and_keeps_key_order() {
    let mut resource = json!({
        "z": {"coding": [{"code": "a", "system": "urn:oid:1.2.392.200119.4.403.1"}]},
        "system": "urn:oid:1.2.392.200119.4.504",
        "a": [{"system": "urn:oid:1.2.392.200119.4.804", "unknown": {"x": [1, 2.5, null]}}]
    });
    let report = normalize_resource(&mut resource);
    let pointers: Vec<&str> = report.changed.iter().map(|c| c.0.as_str()).collect();
    assert_eq!(pointers, ["/z/coding/0/system", "/system", "/a/0/system"]);
    assert_eq!(
        serde_json::to_string(&resource).unwrap(),
        r#"{"z":{"coding":[{"code":"a","system":"http://medis.or.jp/CodeSystem/master-HOT9"}]},"system":"http://medis.or.jp/CodeSystem/master-JLAC10-17digits","a":[{"system":"http://medis.or.jp/CodeSystem/master-nursingObservationKeyCode","unknown":{"x":[1,2.5,null]}}]}"#
    );
}

#[test]
fn escapes_json_pointer_tokens() {
    let mut resource = json!({"a/b": {"c~d": [{"system": "urn:oid:1.2.392.200119.4.504"}]}});
    let report = normalize_resource(&mut resource);
    assert_eq!(report.changed[0].0, "/a~1b/c~0d/0/system");
    assert_eq!(
        resource.pointer(&report.changed[0].0),
        Some(&json!(JLAC10_URL))
    );
}

#[test]
fn only_string_system_values_are_rewritten() {
    let mut resource = json!({
        "system": {"system": "urn:oid:1.2.392.200119.4.504"},
        "other": {"system": 1.2},
        "list": {"system": ["urn:oid:1.2.392.200119.4.504"]},
        "_system": {"extension": [{"url": "x", "valueString": "urn:oid:1.2.392.200119.4.504"}]},
        "code": "urn:oid:1.2.392.200119.4.504"
    });
    let before = resource.clone();
    let report = normalize_resource(&mut resource);
    // The only string that is a `system` member's value is the nested one.
    assert_eq!(report.changed.len(), 1);
    assert_eq!(report.changed[0].0, "/system/system");
    assert_eq!(resource["other"], before["other"]);
    assert_eq!(resource["list"], before["list"]);
    assert_eq!(resource["_system"], before["_system"]);
    assert_eq!(resource["code"], before["code"]);
}

#[test]
fn scalars_and_empty_containers_are_left_alone() {
    for mut value in [
        json!(null),
        json!("urn:oid:1.2.392.200119.4.504"),
        json!(12),
        json!([]),
        json!({}),
    ] {
        let before = value.clone();
        assert!(normalize_resource(&mut value).is_unchanged());
        assert_eq!(value, before);
    }
}

#[test]
fn deep_nesting_does_not_overflow_the_stack() {
    let mut value = json!({"system": "urn:oid:1.2.392.200119.4.504"});
    for _ in 0..100_000 {
        value = Value::Array(vec![value]);
    }
    let report = normalize_resource(&mut value);
    assert_eq!(report.changed.len(), 1);
    // Dropping a Value recurses inside serde_json; unwind it by hand so the test itself
    // does not overflow.
    let mut current = value;
    while let Value::Array(mut items) = current {
        current = items.pop().unwrap_or(Value::Null);
    }
}

// ---------------------------------------------------------------- normalize_json_bytes

#[test]
fn unchanged_body_is_returned_as_is() {
    let body = br#"{ "resourceType" : "Observation", "valueQuantity": {"value": 1.50, "system": "http://unitsofmeasure.org"} }"#;
    let (output, report) = normalize_json_bytes(body).unwrap();
    assert!(report.is_unchanged());
    assert!(matches!(output, Cow::Borrowed(bytes) if std::ptr::eq(bytes, &body[..])));
}

#[test]
fn changed_body_differs_only_in_the_rewritten_strings() {
    let body = "{\n  \"code\": {\"coding\": [ {\"system\" : \"urn:oid:1.2.392.200119.4.504\", \"code\": \"3A010\"} ]},\n  \"valueQuantity\": {\"value\": 1.50, \"comparator\": \"\\u003c\", \"unit\": \"g/dL\"},\n  \"big\": 12345678901234567890123, \"exp\": 1E+2\n}\n";
    let (output, report) = normalize_json_bytes(body.as_bytes()).unwrap();
    assert_eq!(report.changed.len(), 1);
    let expected = body.replace("urn:oid:1.2.392.200119.4.504", JLAC10_URL);
    assert_eq!(std::str::from_utf8(&output).unwrap(), expected);
}

#[test]
fn escaped_keys_and_values_are_recognised() {
    let body = br#"{"sys\u0074em": "urn:oid:1.2.392.200119.4.50\u0034", "code": "x"}"#;
    let (output, report) = normalize_json_bytes(body).unwrap();
    assert_eq!(report.changed.len(), 1);
    assert_eq!(
        std::str::from_utf8(&output).unwrap(),
        format!(r#"{{"sys\u0074em": "{JLAC10_URL}", "code": "x"}}"#)
    );
}

#[test]
fn duplicate_keys_fall_back_to_the_parsed_view() {
    // serde_json keeps the last duplicate; the raw text has two `system` members.
    let body =
        br#"{"system": "urn:oid:1.2.392.200119.4.504", "system": "urn:oid:1.2.392.200119.4.504"}"#;
    let (output, report) = normalize_json_bytes(body).unwrap();
    assert_eq!(report.changed.len(), 1);
    let parsed: Value = serde_json::from_slice(&output).unwrap();
    assert_eq!(parsed, json!({"system": JLAC10_URL}));
}

#[test]
fn non_json_is_an_error() {
    for body in [
        &b""[..],
        b"   ",
        b"{",
        b"{\"system\": \"urn:oid:1.2.392.200119.4.504\"} trailing",
        b"\xEF\xBB\xBF{}",
        b"<Patient xmlns=\"http://hl7.org/fhir\"/>",
        b"{\"a\": \"\xff\"}",
        b"{'system': 'x'}",
    ] {
        assert!(
            matches!(
                normalize_json_bytes(body),
                Err(NormalizeError::InvalidJson(_))
            ),
            "{body:?}"
        );
    }
}

#[test]
fn top_level_need_not_be_an_object() {
    let body = br#"[{"system":"urn:oid:1.2.392.200119.4.504"}, "x", 1]"#;
    let (output, report) = normalize_json_bytes(body).unwrap();
    assert_eq!(report.changed[0].0, "/0/system");
    assert_eq!(
        std::str::from_utf8(&output).unwrap(),
        format!(r#"[{{"system":"{JLAC10_URL}"}}, "x", 1]"#)
    );
}

// ---------------------------------------------------------------- properties

/// `system` values worth generating: every known form, near misses, and other text.
fn system_like_string() -> impl Strategy<Value = String> {
    let table_forms: Vec<String> = known_code_systems()
        .iter()
        .flat_map(|entry| {
            entry
                .oids
                .iter()
                .flat_map(|oid| [format!("urn:oid:{oid}"), (*oid).to_owned()])
                .chain(std::iter::once(entry.url.to_owned()))
                .chain(entry.other_urls.iter().map(|url| (*url).to_owned()))
        })
        .collect();
    prop_oneof![
        4 => proptest::sample::select(table_forms),
        1 => proptest::sample::select(vec![
            "urn:oid:1.2.392.100495.20.3.51.11311234567".to_owned(),
            "http://unitsofmeasure.org".to_owned(),
            "phone".to_owned(),
            "URN:OID:1.2.392.200119.4.504".to_owned(),
            String::new(),
        ]),
        1 => "[ -~\u{3042}-\u{3093}\\\\\"/]{0,12}",
    ]
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => Just("system".to_owned()),
        3 => proptest::sample::select(vec![
            "code", "coding", "valueCoding", "identifier", "extension", "url", "value",
            "contained", "_system", "a/b", "~",
        ])
        .prop_map(str::to_owned),
        1 => "[a-z\u{3042}-\u{3093}\"\\\\]{0,6}",
    ]
}

fn arbitrary_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        1 => Just(Value::Null),
        1 => any::<bool>().prop_map(Value::Bool),
        1 => any::<i64>().prop_map(Value::from),
        1 => any::<f64>().prop_map(Value::from),
        1 => system_like_string().prop_map(Value::String),
        // Coding-shaped objects, so that many cases have something to rewrite.
        3 => (system_like_string(), "[0-9A-Z]{0,8}").prop_map(|(system, code)| {
            serde_json::json!({"system": system, "code": code})
        }),
    ];
    leaf.prop_recursive(5, 64, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::vec((key(), inner), 0..6)
                .prop_map(|members| Value::Object(members.into_iter().collect())),
        ]
    })
}

/// The value with every string that is a `system` member's value replaced by "", so two
/// values compare equal when they differ only there.
fn blank_system_strings(value: &Value) -> Value {
    match value {
        Value::Object(members) => Value::Object(
            members
                .iter()
                .map(|(key, member)| {
                    let blanked = match member {
                        Value::String(_) if key == "system" => Value::String(String::new()),
                        other => blank_system_strings(other),
                    };
                    (key.clone(), blanked)
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(blank_system_strings).collect()),
        other => other.clone(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn normalizing_is_idempotent(value in arbitrary_json()) {
        let mut once = value;
        normalize_resource(&mut once);
        let mut twice = once.clone();
        let second = normalize_resource(&mut twice);
        prop_assert!(second.is_unchanged());
        prop_assert_eq!(twice, once);
    }

    #[test]
    fn only_system_strings_change(value in arbitrary_json()) {
        let mut normalized = value.clone();
        let report = normalize_resource(&mut normalized);
        // Serialised, so key order counts too.
        prop_assert_eq!(
            serde_json::to_string(&blank_system_strings(&normalized)).unwrap(),
            serde_json::to_string(&blank_system_strings(&value)).unwrap()
        );
        for (pointer, from, to) in &report.changed {
            prop_assert_eq!(value.pointer(pointer), Some(&Value::String(from.clone())));
            prop_assert_eq!(normalized.pointer(pointer), Some(&Value::String(to.clone())));
            prop_assert_eq!(canonical_system(from), to.as_str());
        }
    }

    #[test]
    fn bytes_match_the_value_view_and_keep_the_rest(value in arbitrary_json(), pretty in any::<bool>()) {
        let body = if pretty {
            serde_json::to_vec_pretty(&value).unwrap()
        } else {
            serde_json::to_vec(&value).unwrap()
        };
        let (output, report) = normalize_json_bytes(&body).unwrap();
        let mut normalized: Value = serde_json::from_slice(&body).unwrap();
        let expected_report = normalize_resource(&mut normalized);
        prop_assert_eq!(&report, &expected_report);
        if report.is_unchanged() {
            prop_assert!(matches!(output, Cow::Borrowed(bytes) if std::ptr::eq(bytes, &body[..])));
        } else {
            // Splicing into serde_json's own output must give serde_json's output for the
            // normalised value: nothing but the system strings moved.
            let mut normalized_original = value.clone();
            normalize_resource(&mut normalized_original);
            let reprinted = if pretty {
                serde_json::to_vec_pretty(&normalized_original).unwrap()
            } else {
                serde_json::to_vec(&normalized_original).unwrap()
            };
            prop_assert_eq!(output.as_ref(), &reprinted[..]);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = normalize_json_bytes(&body);
        let _ = splice::rewrite_system_strings(&body);
    }

    #[test]
    fn damaged_json_never_panics(value in arbitrary_json(), cut in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let mut body = serde_json::to_vec(&value).unwrap();
        if !body.is_empty() {
            let at = cut.index(body.len());
            body[at] = byte;
            let _ = normalize_json_bytes(&body);
            let _ = splice::rewrite_system_strings(&body);
            body.truncate(at);
            let _ = normalize_json_bytes(&body);
            let _ = splice::rewrite_system_strings(&body);
        }
    }

    #[test]
    fn canonical_system_never_panics_and_is_idempotent(system in any::<String>()) {
        let once = canonical_system(&system).into_owned();
        prop_assert_eq!(canonical_system(&once), once.as_str());
    }
}
