//! Tests on documents generated from CDAtemplate-hc18.xml and the item table. Every
//! generated document is checked against the XSD before it is converted.

use std::collections::BTreeMap;
use std::io::{Cursor, Write};

use proptest::prelude::*;
use serde_json::Value;

use super::generator::{render, GenObservation, GenValue, Header};
use super::*;

const SAMPLE_BUNDLE: &str =
    include_str!("../../../fixtures/echeckup-report/Bundle-Bundle-eCheckupReport-Sample-01.json");

type IsReason = fn(&ItemErrorReason) -> bool;
type IsError = fn(&CdaError) -> bool;

/// Renders and asserts the result passes the XSD.
fn valid_document(header: &Header, observations: &[GenObservation]) -> Vec<u8> {
    let xml = render(header, observations);
    if let Err(e) = validate(&xml) {
        panic!(
            "generated document fails the XSD: {e}\n{}",
            String::from_utf8_lossy(&xml)
        );
    }
    xml
}

fn convert(xml: &[u8]) -> Conversion {
    let doc = parse(xml).expect("parses");
    to_fhir_bundle(&doc, xml)
}

fn resources<'a>(
    bundle: &'a Value,
    resource_type: &'a str,
) -> impl Iterator<Item = &'a Value> + 'a {
    bundle["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| &e["resource"])
        .filter(move |r| r["resourceType"] == resource_type)
}

fn observations_by_code(bundle: &Value) -> BTreeMap<String, &Value> {
    resources(bundle, "Observation")
        .map(|o| {
            (
                o["code"]["coding"][0]["code"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned(),
                o,
            )
        })
        .collect()
}

fn pq(value: &str, unit: &str) -> GenValue {
    GenValue::Pq {
        value: value.into(),
        unit: unit.into(),
    }
}

fn coded(xsi_type: &'static str, code: &str, system: &str) -> GenValue {
    GenValue::Coded {
        xsi_type,
        code: code.into(),
        system: Some(system.into()),
    }
}

#[test]
fn item_table_reads_every_row() {
    let table = ItemTable::get();
    let rows = include_str!("../../../fixtures/tokutei-cda/code-tables/XMLhc24tab.csv")
        .lines()
        .count()
        - 3;
    assert_eq!(table.len(), rows);
    let height = table.lookup("9N001000000000001").expect("身長");
    assert_eq!(
        (
            height.name,
            height.value_type,
            height.display_unit,
            height.ucum_unit
        ),
        ("身長", ValueType::Pq, Some("cm"), Some("cm"))
    );
    assert_eq!(height.pq_digits(), Some((3, 1)));
    let urine = table.lookup("1A020000000191111").expect("尿糖");
    assert_eq!(
        (urine.value_type, urine.result_code_oid),
        (ValueType::Co, Some("1.2.392.200119.6.2102"))
    );
    let member = table.lookup("9E100166000000011").expect("眼底検査 member");
    assert_eq!(
        member.group.as_ref().map(|g| (g.group_code, g.relation)),
        Some(("9E100161000000049", "COMP"))
    );
    assert_eq!(
        table.lookup("9N056160400000049").and_then(|d| d.depends_on),
        Some("9N056000000000011")
    );
}

/// Every item of the table, each with a value of its type, in one document.
#[test]
fn every_item_of_the_table_converts() {
    let table = ItemTable::get();
    let observations: Vec<GenObservation> = table
        .iter()
        .enumerate()
        .map(|(n, d)| GenObservation::typical(d.code, n))
        .collect();
    let xml = valid_document(&Header::default(), &observations);
    let conversion = convert(&xml);
    assert!(
        conversion.item_errors.is_empty(),
        "{:#?}",
        conversion.item_errors
    );
    let by_code = observations_by_code(&conversion.bundle);
    for d in table.iter() {
        let converted = by_code.get(d.code).copied().or_else(|| {
            // Qualifying items are components of the first item of their chain.
            let mut root = d.depends_on?;
            while let Some(parent) = table.lookup(root).and_then(|p| p.depends_on) {
                root = parent;
            }
            let parent = by_code.get(root)?;
            parent["component"]
                .as_array()?
                .iter()
                .find(|c| c["code"]["coding"][0]["code"] == d.code)
        });
        let Some(converted) = converted else {
            panic!("{} {} missing from the Bundle", d.code, d.name)
        };
        match d.value_type {
            ValueType::Pq => {
                assert!(
                    converted["valueQuantity"]["value"].is_number(),
                    "{}",
                    d.code
                );
                assert_eq!(
                    converted["valueQuantity"]["code"].as_str(),
                    d.ucum_unit,
                    "{}",
                    d.code
                );
            }
            ValueType::Cd | ValueType::Co => {
                let coding = &converted["valueCodeableConcept"]["coding"][0];
                assert_eq!(
                    coding["system"],
                    format!("urn:oid:{}", d.result_code_oid.unwrap_or_default()),
                    "{}",
                    d.code
                );
                assert_eq!(coding["code"], "1");
            }
            ValueType::St if d.max_text_len().is_some_and(|max| max < 20) => {
                assert_eq!(converted["valueString"], "20240401")
            }
            ValueType::St => assert!(converted["valueString"]
                .as_str()
                .is_some_and(|s| s.contains("<特記> & \"引用\""))),
        }
    }
}

/// Blood pressure readings (1回目/2回目 with method codes, interpretation, reference range),
/// a 一連検査グループ with members and a reason, omitted code systems, missing values.
#[test]
fn groups_readings_defaults_and_missing_values() {
    let mut systolic1 = GenObservation::new("9A751000000000001", pq("149", "mmHg"));
    systolic1.interpretation = Some("H".into());
    systolic1.reference_range = Some(("80".into(), "130".into(), "mmHg".into()));
    systolic1.method = Some("9A75100000".into());
    let mut systolic2 = GenObservation::new("9A752000000000001", pq("139", "mmHg"));
    systolic2.explicit_code_system = false;
    systolic2.method = Some("9A75200000".into());
    let diastolic1 = GenObservation::new("9A761000000000001", pq("90", "mmHg"));
    let mut fundus = GenObservation::new("9E100161000000049", GenValue::St("異常なし".into()));
    fundus.members = vec![
        (
            "COMP",
            GenObservation::new(
                "9E100166000000011",
                coded("CO", "2", "1.2.392.200119.6.2110"),
            ),
        ),
        (
            "COMP",
            GenObservation::new(
                "9E100166100000011",
                GenValue::Coded {
                    xsi_type: "CO",
                    code: "1".into(),
                    system: None,
                },
            ),
        ),
        (
            "RSON",
            GenObservation::new("9E100161000000049", GenValue::St("高血圧のため".into())),
        ),
    ];
    let not_measured = GenObservation::new(
        "3D046000001906202",
        GenValue::Null {
            xsi_type: "PQ",
            null_flavor: "NI".into(),
        },
    );
    let header = Header {
        voucher: None,
        symbol: None,
        branch: None,
        ..Header::default()
    };
    let xml = valid_document(
        &header,
        &[systolic1, systolic2, diastolic1, fundus, not_measured],
    );

    let doc = parse(&xml).expect("parses");
    assert_eq!(doc.insurance.symbol, None);
    assert_eq!(doc.voucher, None);
    let second = doc
        .observations()
        .find(|o| o.code.code == "9A752000000000001")
        .expect("2回目");
    assert_eq!(
        second.code.system.as_deref(),
        Some(ITEM_CODE_OID),
        "XSD default code system applied"
    );
    assert_eq!(
        second.methods[0].system.as_deref(),
        Some(METHOD_CODE_OID),
        "XSD default method code system"
    );

    let conversion = to_fhir_bundle(&doc, &xml);
    assert!(
        conversion.item_errors.is_empty(),
        "{:#?}",
        conversion.item_errors
    );
    let obs = observations_by_code(&conversion.bundle);
    let s1 = obs["9A751000000000001"];
    assert_eq!(
        s1["valueQuantity"],
        serde_json::json!({"value": 149, "unit": "mmHg", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"})
    );
    assert_eq!(s1["interpretation"][0]["coding"][0]["code"], "H");
    assert_eq!(s1["referenceRange"][0]["high"]["value"], 130);
    assert_eq!(
        s1["method"]["coding"][0],
        serde_json::json!({"system": "urn:oid:1.2.392.200119.6.1007", "code": "9A75100000"})
    );
    assert_eq!(obs["9A752000000000001"]["valueQuantity"]["value"], 139);
    assert_eq!(
        obs["3D046000001906202"]["dataAbsentReason"]["coding"][0]["code"],
        "unknown"
    );
    assert!(obs["3D046000001906202"].get("valueQuantity").is_none());

    let group = resources(&conversion.bundle, "Observation")
        .find(|o| {
            o["code"]["coding"][0]["code"] == "9E100161000000049" && o.get("hasMember").is_some()
        })
        .expect("group Observation");
    let members: Vec<&str> = group["hasMember"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["reference"].as_str())
        .collect();
    assert_eq!(members.len(), 3);
    let member_codes: Vec<&Value> = members
        .iter()
        .map(|url| {
            let entry = conversion.bundle["entry"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|e| e["fullUrl"] == *url);
            &entry.expect("member entry")["resource"]["code"]["coding"][0]["code"]
        })
        .collect();
    assert_eq!(
        member_codes,
        [
            "9E100166000000011",
            "9E100166100000011",
            "9E100161000000049"
        ]
    );
    let h_member = obs["9E100166100000011"];
    assert_eq!(
        h_member["valueCodeableConcept"]["coding"][0]["system"], "urn:oid:1.2.392.200119.6.2111",
        "table's answer system applied"
    );
    assert_eq!(
        h_member["valueCodeableConcept"]["coding"][0]["extension"][0]["valueDecimal"],
        1
    );
    assert_eq!(
        resources(&conversion.bundle, "Coverage").count(),
        1,
        "no voucher → one Coverage"
    );
}

/// The same values as the IG's sample Bundle, generated as CDA, convert to the sample's
/// Observations: same codes, values, units and answer codes.
#[test]
fn matches_the_ig_sample_bundle_item_by_item() {
    let sample: Value = serde_json::from_str(SAMPLE_BUNDLE).expect("sample parses");
    let sample_obs: Vec<&Value> = resources(&sample, "Observation").collect();
    let observations: Vec<GenObservation> = sample_obs
        .iter()
        .flat_map(|o| {
            let mut generated = vec![from_sample(o)];
            for c in o["component"].as_array().into_iter().flatten() {
                generated.push(from_sample(c));
            }
            generated
        })
        .collect();
    let header = Header {
        checkup_date: "20200404".into(),
        ..Header::default()
    };
    let xml = valid_document(&header, &observations);
    let conversion = convert(&xml);
    assert!(
        conversion.item_errors.is_empty(),
        "{:#?}",
        conversion.item_errors
    );
    let ours = observations_by_code(&conversion.bundle);

    let mut differences = Vec::new();
    let sample_by_code: BTreeMap<String, &Value> = sample_obs
        .iter()
        .map(|o| {
            (
                o["code"]["coding"][0]["code"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned(),
                *o,
            )
        })
        .collect();
    for (code, expected) in &sample_by_code {
        let Some(actual) = ours.get(code) else {
            differences.push(format!("{code}: missing"));
            continue;
        };
        compare_item(code, expected, actual, &mut differences);
        let expected_components = expected["component"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let actual_components = actual["component"].as_array().cloned().unwrap_or_default();
        if expected_components.len() != actual_components.len() {
            differences.push(format!(
                "{code}: {} components, sample has {}",
                actual_components.len(),
                expected_components.len()
            ));
        }
        for (e, a) in expected_components.iter().zip(&actual_components) {
            let component_code = e["code"]["coding"][0]["code"].as_str().unwrap_or("");
            if a["code"]["coding"][0]["code"] != component_code {
                differences.push(format!(
                    "{code}: component {} instead of {component_code}",
                    a["code"]["coding"][0]["code"]
                ));
            }
            compare_item(
                &format!("{code} component {component_code}"),
                e,
                a,
                &mut differences,
            );
        }
    }
    for code in ours.keys().filter(|c| !sample_by_code.contains_key(*c)) {
        differences.push(format!("{code}: not in the sample"));
    }
    assert!(
        differences.is_empty(),
        "differences from the IG sample:\n{}",
        differences.join("\n")
    );
    assert_eq!(ours.len(), sample_by_code.len());
    // The comparison does see a changed value or unit.
    for (pointer, changed) in [
        ("/valueQuantity/value", serde_json::json!(162.4)),
        ("/valueQuantity/code", serde_json::json!("m")),
    ] {
        let mut altered = ours["9N001000000000001"].clone();
        if let Some(slot) = altered.pointer_mut(pointer) {
            *slot = changed;
        }
        let mut found = Vec::new();
        compare_item(
            "altered",
            sample_by_code["9N001000000000001"],
            &altered,
            &mut found,
        );
        assert_eq!(found.len(), 1, "{pointer}: {found:?}");
    }

    // Header resources carry the same identifiers as the sample's.
    let patient = resources(&conversion.bundle, "Patient")
        .next()
        .expect("Patient");
    let sample_patient = resources(&sample, "Patient")
        .next()
        .expect("sample Patient");
    assert_eq!(patient["gender"], sample_patient["gender"]);
    assert_eq!(patient["birthDate"], sample_patient["birthDate"]);
    let insurer = resources(&conversion.bundle, "Organization")
        .find(|o| o["identifier"][0]["system"] == "urn:oid:1.2.392.100495.20.3.61")
        .expect("insurer");
    assert_eq!(insurer["identifier"][0]["value"], "06123456");
    let institution = resources(&conversion.bundle, "Organization")
        .find(|o| {
            o["identifier"][0]["system"]
                == "http://jpfhir.jp/fhir/core/IdSystem/insurance-medical-institution-no"
        })
        .expect("institution");
    assert_eq!(institution["identifier"][0]["value"], "1311234567");
    assert_eq!(institution["name"], "厚生労働省第一病院");
}

/// A generated result with the values of one of the sample's Observations or components.
fn from_sample(o: &Value) -> GenObservation {
    let code = o["code"]["coding"][0]["code"].as_str().unwrap_or("");
    let table = ItemTable::get();
    let value = if let Some(q) = o.get("valueQuantity") {
        pq(&q["value"].to_string(), q["unit"].as_str().unwrap_or(""))
    } else if let Some(c) = o.pointer("/valueCodeableConcept/coding/0") {
        let is_ordinal = table
            .lookup(code)
            .is_some_and(|d| d.value_type == ValueType::Co);
        let system = c["system"]
            .as_str()
            .unwrap_or("")
            .trim_start_matches("urn:oid:");
        coded(
            if is_ordinal { "CO" } else { "CD" },
            c["code"].as_str().unwrap_or(""),
            system,
        )
    } else {
        GenValue::St(o["valueString"].as_str().unwrap_or("").into())
    };
    let mut g = GenObservation::new(code, value);
    g.method = o
        .pointer("/method/coding/0/code")
        .and_then(Value::as_str)
        .map(str::to_owned);
    g.interpretation = o
        .pointer("/interpretation/0/coding/0/code")
        .and_then(Value::as_str)
        .map(str::to_owned);
    if let Some(range) = o.pointer("/referenceRange/0") {
        g.reference_range = Some((
            range["low"]["value"].to_string(),
            range["high"]["value"].to_string(),
            range["low"]["unit"].as_str().unwrap_or("").into(),
        ));
    }
    g
}

/// Compares the values that carry meaning: value (number, unit, UCUM code), answer
/// (system, code), text, method and interpretation codes, reference range.
fn compare_item(label: &str, expected: &Value, actual: &Value, differences: &mut Vec<String>) {
    let pointers = [
        "/valueQuantity/value",
        "/valueQuantity/unit",
        "/valueQuantity/code",
        "/valueQuantity/system",
        "/valueCodeableConcept/coding/0/system",
        "/valueCodeableConcept/coding/0/code",
        "/valueString",
        "/method/coding/0/code",
        "/method/coding/0/system",
        "/interpretation/0/coding/0/code",
        "/interpretation/0/coding/0/system",
        "/referenceRange/0/low/value",
        "/referenceRange/0/high/value",
        "/referenceRange/0/low/code",
    ];
    for pointer in pointers {
        let e = expected.pointer(pointer);
        let a = actual.pointer(pointer);
        let same = match (e, a) {
            (Some(Value::Number(x)), Some(Value::Number(y))) => x.as_f64() == y.as_f64(),
            _ => e == a,
        };
        if !same {
            differences.push(format!("{label} {pointer}: ours {a:?}, sample {e:?}"));
        }
    }
}

#[test]
fn converting_twice_gives_the_same_bundle_and_ids_differ_per_document() {
    let observations = [GenObservation::typical("9N001000000000001", 1)];
    let xml = valid_document(&Header::default(), &observations);
    let first = convert(&xml).bundle;
    assert_eq!(first, convert(&xml).bundle);
    let other = valid_document(
        &Header {
            document_id: Some(("1.2.392.200119.6.102.1311234567".into(), "99".into())),
            ..Header::default()
        },
        &observations,
    );
    assert_ne!(
        first["entry"][0]["fullUrl"],
        convert(&other).bundle["entry"][0]["fullUrl"]
    );
    // An id-less document is keyed on its bytes: still deterministic.
    let anonymous = valid_document(
        &Header {
            document_id: None,
            ..Header::default()
        },
        &observations,
    );
    assert_eq!(convert(&anonymous).bundle, convert(&anonymous).bundle);
    let url = first["entry"][0]["fullUrl"].as_str().unwrap_or("");
    assert!(url.starts_with("urn:uuid:") && url.len() == 45, "{url}");
}

#[test]
fn bundle_is_a_document_with_the_original_attached() {
    let xml = valid_document(
        &Header::default(),
        &[GenObservation::typical("9N006000000000001", 2)],
    );
    let bundle = convert(&xml).bundle;
    assert_eq!(bundle["type"], "document");
    assert_eq!(
        bundle["entry"][0]["resource"]["resourceType"],
        "Composition"
    );
    let document_reference = resources(&bundle, "DocumentReference")
        .next()
        .expect("DocumentReference");
    let attachment = &document_reference["content"][0]["attachment"];
    assert_eq!(attachment["contentType"], CDA_CONTENT_TYPE);
    let data = attachment["data"].as_str().unwrap_or("");
    use base64::Engine;
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(data)
            .expect("base64"),
        xml
    );
    let url = bundle["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["resource"]["resourceType"] == "DocumentReference")
        .and_then(|e| e["fullUrl"].as_str())
        .unwrap_or("");
    let composition = &bundle["entry"][0]["resource"];
    let referenced = composition["section"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| s["entry"].as_array().into_iter().flatten())
        .any(|e| e["reference"] == url);
    assert!(referenced, "Composition references the DocumentReference");
    // Every reference resolves inside the Bundle.
    let urls: Vec<&str> = bundle["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["fullUrl"].as_str())
        .collect();
    let text = bundle.to_string();
    for reference in text
        .split("\"reference\":\"")
        .skip(1)
        .map(|s| &s[..s.find('"').unwrap_or(0)])
    {
        assert!(urls.contains(&reference), "{reference} does not resolve");
    }
    let coverage = resources(&bundle, "Coverage")
        .find(|c| c.get("dependent").is_some())
        .expect("insurance Coverage");
    assert_eq!(coverage["dependent"], "01");
    assert_eq!(coverage["extension"][1]["valueString"], "６７８９０");
}

/// What the eCheckup profiles require of the header resources: `meta.lastUpdated` on every
/// entry, the Composition's identifier and version number, the Patient's 被保険者個人識別子,
/// and the insurance Coverage's 保険種別 and 被保険者区分, which only claims the eCheckup
/// profile when the insurer's number tells both.
#[test]
fn header_resources_carry_what_the_echeckup_profiles_require() {
    let observations = [GenObservation::typical("9N001000000000001", 1)];
    let xml = valid_document(&Header::default(), &observations);
    let bundle = convert(&xml).bundle;
    assert_eq!(bundle["timestamp"], "2024-04-05T00:00:00+09:00");
    for entry in bundle["entry"].as_array().into_iter().flatten() {
        assert_eq!(
            entry["resource"]["meta"]["lastUpdated"], bundle["timestamp"],
            "{}",
            entry["resource"]["resourceType"]
        );
    }
    let composition = &bundle["entry"][0]["resource"];
    assert_eq!(
        composition["identifier"],
        serde_json::json!({"system": "http://jpfhir.jp/fhir/core/IdSystem/resourceInstance-identifier", "value": "12345"})
    );
    assert_eq!(
        composition["identifier"]["value"],
        bundle["identifier"]["value"]
    );
    assert_eq!(
        composition["extension"],
        serde_json::json!([{"url": "http://hl7.org/fhir/StructureDefinition/composition-clinicaldocument-versionNumber", "valueString": "1"}])
    );
    let patient = resources(&bundle, "Patient").next().expect("Patient");
    assert_eq!(
        patient["meta"]["profile"][0],
        "http://jpfhir.jp/fhir/eCS/StructureDefinition/JP_Patient_eCS"
    );
    assert_eq!(
        patient["identifier"],
        serde_json::json!([{"system": "http://jpfhir.jp/fhir/clins/Idsystem/JP_Insurance_memberID", "value": "06123456:１２３４５:６７８９０:01"}])
    );
    // 06: a 健康保険組合, whose members may be the insured or a dependant; the document
    // does not say which, so the Coverage has no 被保険者区分 and claims JP Core's profile.
    let insurance = resources(&bundle, "Coverage")
        .find(|c| c.get("dependent").is_some())
        .expect("insurance Coverage");
    assert_eq!(
        insurance["type"],
        serde_json::json!({"coding": [{"system": "urn:oid:1.2.392.100495.20.2.61", "code": "1", "display": "医保"}]})
    );
    assert!(insurance.get("relationship").is_none());
    assert_eq!(
        insurance["meta"]["profile"],
        serde_json::json!(["http://jpfhir.jp/fhir/core/StructureDefinition/JP_Coverage"])
    );

    // An id-less document: the Composition's identifier is the Bundle's, the key its ids
    // derive from.
    let anonymous = convert(&valid_document(
        &Header {
            document_id: None,
            ..Header::default()
        },
        &observations,
    ))
    .bundle;
    let value = anonymous["entry"][0]["resource"]["identifier"]["value"]
        .as_str()
        .unwrap_or("");
    assert!(value.starts_with("sha256:"), "{value}");
    assert_eq!(anonymous["identifier"]["value"], value);

    // 市町村国保 (six digits, or zero-padded to eight) and 後期高齢者医療 (39) have no
    // dependants: the person is the 被保険者 and the Coverage meets the eCheckup profile.
    for (insurer, padded, category) in [
        ("138123", "00138123", "2"),
        ("00138123", "00138123", "2"),
        ("39131234", "39131234", "7"),
    ] {
        let bundle = convert(&valid_document(
            &Header {
                insurer_number: insurer.into(),
                ..Header::default()
            },
            &observations,
        ))
        .bundle;
        let insurance = resources(&bundle, "Coverage")
            .find(|c| c.get("dependent").is_some())
            .expect("insurance Coverage");
        assert_eq!(
            insurance["type"]["coding"][0]["code"], category,
            "{insurer}"
        );
        assert_eq!(
            insurance["relationship"],
            serde_json::json!({"coding": [{"system": "urn:oid:1.2.392.100495.20.2.62", "code": "1", "display": "被保険者"}]}),
            "{insurer}"
        );
        assert_eq!(
            insurance["meta"]["profile"],
            serde_json::json!([
                "http://jpfhir.jp/fhir/eCheckup/StructureDefinition/JP_CoverageInsurance_eCheckupGeneral"
            ]),
            "{insurer}"
        );
        let patient = resources(&bundle, "Patient").next().expect("Patient");
        assert_eq!(
            patient["identifier"][0]["value"],
            format!("{padded}:１２３４５:６７８９０:01"),
            "{insurer}"
        );
    }
}

const BUNDLE_PROFILE: &str =
    "http://jpfhir.jp/fhir/eCheckup/StructureDefinition/JP_Bundle_eCheckupGeneral";

fn bundle_profile(bundle: &Value) -> Vec<&str> {
    bundle["meta"]["profile"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect()
}

/// The doctor the report names (健康診断を実施した医師の氏名) is the Practitioner that
/// JP_Bundle_eCheckupGeneral requires and the Composition's first author; the result itself
/// stays an Observation.
#[test]
fn the_doctor_who_carried_out_the_checkup_is_the_practitioner_and_author() {
    let observations = [
        GenObservation::typical("9N001000000000001", 1),
        GenObservation::new("9N511000000000049", GenValue::St("異常なし".into())),
        GenObservation::new("9N516000000000049", GenValue::St("健診　太郎".into())),
    ];
    let bundle = convert(&valid_document(&Header::default(), &observations)).bundle;
    let practitioners: Vec<&Value> = resources(&bundle, "Practitioner").collect();
    assert_eq!(practitioners.len(), 1, "{bundle:#}");
    let practitioner = practitioners[0];
    assert_eq!(
        practitioner["meta"]["profile"],
        serde_json::json!([
            "http://jpfhir.jp/fhir/eCheckup/StructureDefinition/JP_Practitioner_eCheckupGeneral"
        ])
    );
    assert_eq!(
        practitioner["name"],
        serde_json::json!([{
            "extension": [{"url": "http://hl7.org/fhir/StructureDefinition/iso21090-EN-representation", "valueCode": "IDE"}],
            "text": "健診　太郎",
            "family": "健診",
            "given": ["太郎"],
        }])
    );
    let practitioner_url = bundle["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["resource"]["resourceType"] == "Practitioner")
        .map(|e| e["fullUrl"].clone())
        .expect("fullUrl");
    let composition = &bundle["entry"][0]["resource"];
    assert_eq!(composition["author"][0]["reference"], practitioner_url);
    assert_eq!(composition["author"].as_array().map(Vec::len), Some(2));
    assert!(observations_by_code(&bundle).contains_key("9N516000000000049"));
    assert_eq!(bundle_profile(&bundle), [BUNDLE_PROFILE]);

    // A name written without a space is kept whole, and the same doctor twice is one
    // Practitioner.
    let once = [
        GenObservation::new("9N516000000000049", GenValue::St("健診太郎".into())),
        GenObservation::new("9N516000000000049", GenValue::St(" 健診太郎 ".into())),
    ];
    let bundle = convert(&valid_document(&Header::default(), &once)).bundle;
    let practitioners: Vec<&Value> = resources(&bundle, "Practitioner").collect();
    assert_eq!(practitioners.len(), 1);
    assert_eq!(
        practitioners[0]["name"][0]["text"], "健診太郎",
        "{:#}",
        practitioners[0]
    );
    assert!(practitioners[0]["name"][0].get("family").is_none());
}

/// The Bundle claims JP_Bundle_eCheckupGeneral only when its entries fill the profile's
/// slices: a report that names no doctor, names three, or whose Patient cannot claim
/// JP_Patient_eCS is a plain document Bundle (its entries still claim what they meet).
#[test]
fn the_bundle_claims_its_profile_only_when_its_entries_fill_it() {
    let doctor = |name: &str| GenObservation::new("9N516000000000049", GenValue::St(name.into()));
    let height = GenObservation::typical("9N001000000000001", 1);
    let cases: Vec<(&str, Header, Vec<GenObservation>, bool)> = vec![
        (
            "one doctor",
            Header::default(),
            vec![height.clone(), doctor("健診 太郎")],
            true,
        ),
        (
            "two doctors",
            Header::default(),
            vec![doctor("健診 太郎"), doctor("検査 花子")],
            true,
        ),
        ("no doctor", Header::default(), vec![height.clone()], false),
        (
            "three doctors",
            Header::default(),
            vec![
                doctor("健診 太郎"),
                doctor("検査 花子"),
                doctor("保健 一郎"),
            ],
            false,
        ),
    ];
    for (label, header, observations, claims) in cases {
        let bundle = convert(&valid_document(&header, &observations)).bundle;
        let entries = bundle["entry"].as_array().cloned().unwrap_or_default();
        let gaps = super::bundle::bundle_profile_gaps(&entries);
        assert_eq!(gaps.is_empty(), claims, "{label}: {gaps:?}");
        assert_eq!(!bundle_profile(&bundle).is_empty(), claims, "{label}");
        if !claims {
            assert!(
                gaps.iter().any(|g| g.contains("entry:practitioner")),
                "{label}: {gaps:?}"
            );
        }
    }
    // Without the card the Patient claims no profile, and so neither can the Bundle.
    let xml = valid_document(&Header::default(), &[doctor("健診 太郎")]);
    let mut doc = parse(&xml).expect("parses");
    doc.insurance = Insurance::default();
    let bundle = to_fhir_bundle(&doc, &xml).bundle;
    let entries = bundle["entry"].as_array().cloned().unwrap_or_default();
    let gaps = super::bundle::bundle_profile_gaps(&entries);
    assert_eq!(gaps, ["entry:patient has 0, needs 1..1"]);
    assert!(bundle_profile(&bundle).is_empty());

    // JP_Composition_eCheckupGeneral requires the report's category and its program: a
    // document without one has a plain Composition, and the Bundle no profile.
    for strip in [
        (|doc: &mut CheckupDocument| doc.program = None) as fn(&mut CheckupDocument),
        |doc: &mut CheckupDocument| doc.report_category = None,
    ] {
        let mut doc = parse(&xml).expect("parses");
        strip(&mut doc);
        let bundle = to_fhir_bundle(&doc, &xml).bundle;
        let composition = &bundle["entry"][0]["resource"];
        assert_eq!(composition["resourceType"], "Composition");
        assert!(
            composition["meta"].get("profile").is_none(),
            "{composition:#}"
        );
        let entries = bundle["entry"].as_array().cloned().unwrap_or_default();
        assert_eq!(
            super::bundle::bundle_profile_gaps(&entries),
            [
                "the first entry is not the profiled Composition",
                "entry:composition has 0, needs 1..1"
            ]
        );
        assert!(bundle_profile(&bundle).is_empty());
    }
}

/// The slice table the Bundle's claim is decided by says what the vendored
/// JP_Bundle_eCheckupGeneral says: every slice of `Bundle.entry` that bounds its count, with
/// its profiles, and the least number of entries.
#[test]
fn the_bundle_slice_table_matches_the_vendored_profile() {
    let definition: Value = serde_json::from_str(include_str!(
        "../../../fixtures/echeckup-report/profiles/StructureDefinition-JP-Bundle-eCheckupGeneral.json"
    ))
    .expect("the vendored profile parses");
    let elements = definition["snapshot"]["element"]
        .as_array()
        .expect("a snapshot");
    let element = |id: &str| elements.iter().find(|e| e["id"] == id);
    let bounded: Vec<(String, Vec<String>, usize, usize)> = elements
        .iter()
        // The slices themselves (`Bundle.entry:patient`), not their elements.
        .filter(|e| {
            e["id"]
                .as_str()
                .and_then(|id| id.strip_prefix("Bundle.entry:"))
                .is_some_and(|slice| !slice.contains('.'))
        })
        .filter(|e| e["min"].as_u64().unwrap_or(0) > 0 || e["max"] != "*")
        .map(|e| {
            let name = e["sliceName"].as_str().unwrap_or_default().to_owned();
            let resource = element(&format!("Bundle.entry:{name}.resource")).expect("resource");
            let profiles = resource["type"][0]["profile"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect();
            let max = e["max"]
                .as_str()
                .and_then(|m| m.parse().ok())
                .expect("a bounded max");
            (name, profiles, e["min"].as_u64().unwrap_or(0) as usize, max)
        })
        .collect();
    let ours: Vec<(String, Vec<String>, usize, usize)> = super::bundle::BUNDLE_SLICES
        .iter()
        .map(|(name, profiles, min, max)| {
            (
                (*name).to_owned(),
                profiles.iter().map(|p| (*p).to_owned()).collect(),
                *min,
                *max,
            )
        })
        .collect();
    assert_eq!(ours, bounded);
    let entry = element("Bundle.entry").expect("Bundle.entry");
    assert_eq!(
        entry["min"].as_u64(),
        Some(super::bundle::BUNDLE_MIN_ENTRIES as u64)
    );
}

/// JP_CoverageService_eCheckupGeneral requires the 受診券番号: a voucher without one is a
/// plain Coverage (its validity kept), never a profile claim it breaks.
#[test]
fn a_voucher_without_its_number_claims_no_profile() {
    let observations = [GenObservation::new(
        "9N516000000000049",
        GenValue::St("健診 太郎".into()),
    )];
    let header = Header::default();
    let (number, _) = header
        .voucher
        .clone()
        .expect("the default header has a voucher");
    let with_number = convert(&valid_document(&header, &observations)).bundle;
    let voucher = |bundle: &Value| {
        resources(bundle, "Coverage")
            .find(|c| c["type"]["coding"][0]["system"] == "urn:oid:1.2.392.200119.6.208")
            .cloned()
            .expect("voucher Coverage")
    };
    let numbered = voucher(&with_number);
    assert_eq!(numbered["subscriberId"], number.as_str());
    assert_eq!(
        numbered["meta"]["profile"],
        serde_json::json!([
            "http://jpfhir.jp/fhir/eCheckup/StructureDefinition/JP_CoverageService_eCheckupGeneral"
        ])
    );

    for without in [
        String::from_utf8_lossy(&valid_document(&header, &observations))
            .replace(&format!("extension=\"{number}\""), "extension=\"\""),
        String::from_utf8_lossy(&valid_document(&header, &observations))
            .replace(&format!("extension=\"{number}\""), "extension=\"  \""),
    ] {
        assert!(!without.contains(&number));
        let bundle = convert(without.as_bytes()).bundle;
        let plain = voucher(&bundle);
        assert!(plain.get("subscriberId").is_none(), "{plain:#}");
        assert!(plain["meta"].get("profile").is_none(), "{plain:#}");
        assert_eq!(plain["period"], numbered["period"]);
        assert_eq!(
            plain["meta"]["lastUpdated"],
            numbered["meta"]["lastUpdated"]
        );
    }
}

#[test]
fn reconciliation_key_ignores_document_id_and_author() {
    let observations = [GenObservation::typical("9N001000000000001", 1)];
    let a = parse(&valid_document(&Header::default(), &observations)).expect("parses");
    let b = parse(&valid_document(
        &Header {
            document_id: Some(("1.2.392.200119.6.102.9999999999".into(), "other".into())),
            effective_time: "20240501".into(),
            ..Header::default()
        },
        &observations,
    ))
    .expect("parses");
    assert_eq!(a.reconciliation_key(), b.reconciliation_key());
    let key = a.reconciliation_key();
    assert_eq!(key.institution_number.as_deref(), Some("1311234567"));
    assert_eq!(key.checkup_date, "2020-04-04");
    assert_eq!(key.insurance.insurer_number.as_deref(), Some("06123456"));
    let c = parse(&valid_document(
        &Header {
            number: "1".into(),
            ..Header::default()
        },
        &observations,
    ))
    .expect("parses");
    assert_ne!(a.reconciliation_key(), c.reconciliation_key());
}

#[test]
fn parse_reads_the_header() {
    let xml = valid_document(
        &Header::default(),
        &[GenObservation::typical("9N001000000000001", 1)],
    );
    let doc = parse(&xml).expect("parses");
    assert_eq!(doc.effective_date, "2024-04-05");
    assert_eq!(doc.patient.name_kana.as_deref(), Some("ケンシン タロウ"));
    assert_eq!(doc.patient.birth_date.as_deref(), Some("1950-05-04"));
    assert_eq!(doc.patient.sex.as_ref().map(|s| s.code.as_str()), Some("1"));
    assert_eq!(doc.patient.address.postal_code.as_deref(), Some("123-4567"));
    assert_eq!(
        doc.patient.address.text.as_deref(),
        Some("神奈川県横浜市港区１－２－３")
    );
    assert_eq!(doc.insurance.symbol.as_deref(), Some("１２３４５"));
    assert_eq!(doc.insurance.branch.as_deref(), Some("01"));
    assert_eq!(doc.institution.number.as_deref(), Some("1311234567"));
    assert_eq!(
        doc.author.organization.name.as_deref(),
        Some("厚生労働省第一病院")
    );
    assert_eq!(
        doc.report_category
            .as_ref()
            .and_then(|c| c.system.as_deref()),
        Some("1.2.392.200119.6.1001")
    );
    assert_eq!(
        doc.program
            .as_ref()
            .map(|c| (c.code.as_str(), c.system.as_deref())),
        Some(("010", Some("1.2.392.200119.6.1002")))
    );
    assert_eq!(
        doc.voucher.as_ref().and_then(|v| v.valid_until.as_deref()),
        Some("2025-03-31")
    );
    assert_eq!(
        doc.sections[0].code.as_ref().map(|c| c.code.as_str()),
        Some("01010")
    );
}

#[test]
fn schema_invalid_document_lists_the_failing_path_and_line() {
    let xml = render(
        &Header::default(),
        &[GenObservation::new("9N001000000000001", pq("abc", "cm"))],
    );
    let Err(CdaError::SchemaInvalid(violations)) = validate(&xml) else {
        panic!("expected a schema error")
    };
    let text = String::from_utf8_lossy(&xml);
    let line = text
        .lines()
        .position(|l| l.contains("value=\"abc\""))
        .map(|i| i as u32 + 1);
    let violation = violations
        .iter()
        .find(|v| v.line == line)
        .unwrap_or_else(|| panic!("{violations:#?}"));
    assert_eq!(
        violation.path.as_deref(),
        Some(
            "/ClinicalDocument/component/structuredBody/component/section/entry/observation/value"
        )
    );
    let message = CdaError::SchemaInvalid(violations.clone()).to_string();
    assert!(
        message.contains("entry/observation/value") && message.contains("abc"),
        "{message}"
    );

    // A missing required element, in a document written on one line like the template.
    let one_line = String::from_utf8_lossy(&xml).replace('\n', "");
    let missing = one_line.replacen("<confidentialityCode code=\"N\"/>", "", 1);
    let Err(CdaError::SchemaInvalid(violations)) = validate(missing.as_bytes()) else {
        panic!("expected a schema error")
    };
    let violation = violations
        .iter()
        .find(|v| v.message.contains("recordTarget"))
        .unwrap_or_else(|| panic!("{violations:#?}"));
    assert_eq!(
        (violation.line, violation.path.as_deref()),
        (Some(1), Some("/ClinicalDocument/recordTarget"))
    );
}

#[test]
fn the_template_passes_the_xsd_but_its_placeholder_date_does_not_parse() {
    let template = include_bytes!("../../../fixtures/tokutei-cda/CDAtemplate-hc18.xml");
    validate(template).expect("the template is schema-valid");
    match parse(template) {
        Err(CdaError::Invalid { path, reason }) => {
            assert_eq!(path, "/ClinicalDocument/effectiveTime");
            assert!(reason.contains("YYYYMMDD"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
}

/// Results that do not fit the item table are reported per item; the rest converts.
#[test]
fn item_errors_are_reported_per_item() {
    use ItemErrorReason as R;
    let cases: Vec<(GenObservation, IsReason)> = vec![
        (
            GenObservation::new("9Z999000000000001", pq("1", "cm")),
            |r| *r == R::UnknownItem,
        ),
        (
            GenObservation::new("9N001000000000001", GenValue::St("高い".into())),
            |r| matches!(r, R::WrongType { .. }),
        ),
        (
            GenObservation::new("9N001000000000001", pq("170.5", "kg")),
            |r| matches!(r, R::WrongUnit { .. }),
        ),
        (
            GenObservation::new("9N001000000000001", pq("1700.5", "cm")),
            |r| matches!(r, R::BadValue(_)),
        ),
        (
            GenObservation::new("9N001000000000001", pq("170.55", "cm")),
            |r| matches!(r, R::BadValue(_)),
        ),
        (
            GenObservation::new("9N001000000000001", pq("-170", "cm")),
            |r| matches!(r, R::BadValue(_)),
        ),
        (
            GenObservation::new(
                "9N056000000000011",
                coded("CD", "1", "1.2.392.200119.6.9999"),
            ),
            |r| matches!(r, R::WrongAnswerSystem { .. }),
        ),
        (
            GenObservation::new(
                "9N056000000000011",
                coded("CD", "12", "1.2.392.200119.6.2001"),
            ),
            |r| matches!(r, R::BadValue(_)),
        ),
        (
            GenObservation::new(
                "1A020000000191111",
                coded("CD", "1", "1.2.392.200119.6.2102"),
            ),
            |r| matches!(r, R::WrongType { .. }),
        ),
        (
            GenObservation::new("9N511000000000049", GenValue::St("長".repeat(257))),
            |r| matches!(r, R::BadValue(_)),
        ),
    ];
    for (bad, expected) in cases {
        let code = bad.code.clone();
        let good = GenObservation::typical("9N006000000000001", 3);
        let xml = valid_document(&Header::default(), &[bad, good]);
        let conversion = convert(&xml);
        assert_eq!(
            conversion.item_errors.len(),
            1,
            "{code}: {:#?}",
            conversion.item_errors
        );
        let error = &conversion.item_errors[0];
        assert_eq!(error.item_code, code);
        assert!(expected(&error.reason), "{code}: {error}");
        assert!(error.line > 1 && error.to_string().contains(&code));
        let obs = observations_by_code(&conversion.bundle);
        assert!(
            obs.contains_key("9N006000000000001"),
            "the rest still converts"
        );
        assert!(
            !obs.contains_key(code.as_str()),
            "the failing item is left out"
        );
    }
}

#[test]
fn input_that_is_not_a_document_is_refused_clearly() {
    let mut not_utf8 = render(&Header::default(), &[]).to_vec();
    not_utf8.extend_from_slice(&[0xff, 0xfe]);
    assert!(matches!(parse(&not_utf8), Err(CdaError::NotUtf8 { .. })));
    assert!(matches!(validate(&not_utf8), Err(CdaError::NotUtf8 { .. })));

    let huge = vec![b' '; MAX_DOCUMENT_BYTES + 1];
    assert!(matches!(parse(&huge), Err(CdaError::TooLarge { .. })));
    assert!(matches!(validate(&huge), Err(CdaError::TooLarge { .. })));

    let with_dtd = b"<?xml version=\"1.0\"?><!DOCTYPE a [<!ENTITY x \"y\">]><ClinicalDocument xmlns=\"urn:hl7-org:v3\"/>";
    assert!(matches!(parse(with_dtd), Err(CdaError::Malformed(_))));
    assert!(matches!(validate(with_dtd), Err(CdaError::Malformed(_))));
    assert!(matches!(
        parse(b"<ClinicalDocument"),
        Err(CdaError::Malformed(_))
    ));
    assert!(matches!(
        parse(b"<index xmlns=\"urn:other\"/>"),
        Err(CdaError::WrongRoot { .. })
    ));
    assert!(matches!(
        parse(b"<ClinicalDocument xmlns=\"urn:hl7-org:v3\"/>"),
        Err(CdaError::Missing("ClinicalDocument/effectiveTime"))
    ));
}

#[test]
fn validation_works_from_many_threads_at_once() {
    let xml = valid_document(
        &Header::default(),
        &[GenObservation::typical("9N001000000000001", 1)],
    );
    let invalid = render(
        &Header::default(),
        &[GenObservation::new("9N001000000000001", pq("x", "cm"))],
    );
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                for _ in 0..20 {
                    validate(&xml).expect("valid");
                    assert!(matches!(validate(&invalid), Err(CdaError::SchemaInvalid(v)) if v.len() == 1));
                }
            });
        }
    });
}

// ---- Exchange archive ----

fn index_xml(count: usize) -> String {
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<index xmlns="https://www.mhlw.go.jp/stf/seisakunitsuite/bunya/0000161103.html">
 <interactionType code="1"/>
 <creationTime value="20240405"/>
 <sender><id root="1.2.392.200119.6.102" extension="1311234567"/></sender>
 <receiver><id root="1.2.392.200119.6.101" extension="06123456"/></receiver>
 <serviceEventType code="1"/>
 <totalRecordCount value="{count}"/>
</index>"#
    )
}

const SUMMARY_XML: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<summary xmlns="https://www.mhlw.go.jp/stf/seisakunitsuite/bunya/0000161103.html">
 <serviceEventType code="1"/>
 <totalSubjectCount value="2"/>
 <totalCostAmount value="20000"/>
 <totalPaymentAmount value="2000"/>
 <totalClaimAmount value="18000"/>
</summary>"#;

fn zip_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    for (name, bytes) in entries {
        writer.start_file(*name, options).expect("start entry");
        writer.write_all(bytes).expect("write entry");
    }
    writer.finish().expect("finish").into_inner()
}

fn two_documents() -> (Vec<u8>, Vec<u8>) {
    let a = valid_document(
        &Header::default(),
        &[GenObservation::typical("9N001000000000001", 1)],
    );
    let b = valid_document(
        &Header {
            number: "2".into(),
            ..Header::default()
        },
        &[GenObservation::typical("9N006000000000001", 2)],
    );
    (a, b)
}

const ROOT: &str = "1311234567_00000000_202404050_1";

#[test]
fn exchange_archive_yields_its_documents() {
    let (a, b) = two_documents();
    let index = index_xml(2);
    let bytes = zip_of(&[
        (&format!("{ROOT}/ix08_V08.xml"), index.as_bytes()),
        (&format!("{ROOT}/su08_V08.xml"), SUMMARY_XML.as_bytes()),
        (&format!("{ROOT}/DATA/h1311234567_00_1.xml"), &a),
        (&format!("{ROOT}/DATA/h1311234567_00_2.xml"), &b),
        (&format!("{ROOT}/XSD/hc08_V08.xsd"), b"<xs:schema/>"),
    ]);
    let archive = read_exchange_zip(&bytes).expect("reads");
    assert_eq!(archive.index.total_record_count, 2);
    assert_eq!(archive.index.sender_id, "1311234567");
    assert_eq!(archive.index.creation_date, "2024-04-05");
    assert!(archive.summary.is_some());
    assert_eq!(archive.other_entries, [format!("{ROOT}/XSD/hc08_V08.xsd")]);
    let documents: Vec<&ArchiveDocument> = archive.checkup_documents().collect();
    assert_eq!(documents.len(), 2);
    for document in documents {
        validate(&document.bytes).expect("valid");
        let doc = parse(&document.bytes).expect("parses");
        assert!(to_fhir_bundle(&doc, &document.bytes).item_errors.is_empty());
    }
}

#[test]
fn exchange_archive_with_a_bad_index_is_refused() {
    let (a, _) = two_documents();
    let doc_name = format!("{ROOT}/DATA/h1.xml");
    let index_name = format!("{ROOT}/ix08_V08.xml");
    let no_count = index_xml(1).replace("<totalRecordCount value=\"1\"/>", "");
    let bad_sender = index_xml(1).replace("extension=\"1311234567\"", "extension=\"ABC\"");
    let cases: Vec<(&str, Vec<u8>, IsError)> = vec![
        (
            "missing index",
            zip_of(&[(&doc_name, &a)]),
            |e| matches!(e, CdaError::BadIndex(m) if m.contains("missing")),
        ),
        (
            "index without count",
            zip_of(&[(&index_name, no_count.as_bytes()), (&doc_name, &a)]),
            |e| matches!(e, CdaError::BadIndex(m) if m.contains("totalRecordCount")),
        ),
        (
            "index fails ix08 XSD",
            zip_of(&[(&index_name, bad_sender.as_bytes()), (&doc_name, &a)]),
            |e| matches!(e, CdaError::BadIndex(m) if m.contains("sender") || m.contains("extension")),
        ),
        (
            "count mismatch",
            zip_of(&[(&index_name, index_xml(3).as_bytes()), (&doc_name, &a)]),
            |e| {
                matches!(
                    e,
                    CdaError::CountMismatch {
                        declared: 3,
                        found: 1
                    }
                )
            },
        ),
        ("not a ZIP", b"PK\x03\x04 not really".to_vec(), |e| {
            matches!(e, CdaError::Zip(_))
        }),
    ];
    for (label, bytes, expected) in cases {
        match read_exchange_zip(&bytes) {
            Err(e) => assert!(expected(&e), "{label}: {e}"),
            Ok(_) => panic!("{label}: accepted"),
        }
    }
}

#[test]
fn exchange_archive_entry_names_that_escape_are_refused() {
    let index = index_xml(1);
    for evil in [
        "../DATA/h1.xml",
        "/DATA/h1.xml",
        "DATA\\h1.xml",
        "a/../../DATA/h1.xml",
        "C:/DATA/h1.xml",
    ] {
        let bytes = zip_of(&[("ix08_V08.xml", index.as_bytes()), (evil, b"<x/>")]);
        match read_exchange_zip(&bytes) {
            Err(CdaError::UnsafeEntryName(name)) => assert_eq!(name, evil),
            other => panic!("{evil}: {other:?}"),
        }
    }
}

#[test]
fn exchange_archive_bombs_are_refused() {
    let index = index_xml(1);
    let zeros = vec![0u8; MAX_DOCUMENT_BYTES + 1024];
    let bomb = zip_of(&[("ix08_V08.xml", index.as_bytes()), ("DATA/h1.xml", &zeros)]);
    assert!(bomb.len() < 100_000, "deflated to {} bytes", bomb.len());
    assert!(matches!(
        read_exchange_zip(&bomb),
        Err(CdaError::EntryTooLarge { .. })
    ));

    // The same archive with its headers claiming 100 bytes: caught while inflating.
    let mut forged = bomb.clone();
    let claimed = 100u32.to_le_bytes();
    let real = (zeros.len() as u32).to_le_bytes();
    for at in find_all(&forged, &real) {
        forged[at..at + 4].copy_from_slice(&claimed);
    }
    assert!(find_all(&forged, &real).is_empty());
    match read_exchange_zip(&forged) {
        Err(CdaError::EntryTooLarge { .. } | CdaError::Zip(_)) => {}
        other => panic!("forged sizes accepted: {other:?}"),
    }
}

fn find_all(haystack: &[u8], needle: &[u8]) -> Vec<usize> {
    haystack
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .collect()
}

// ---- Fuzz ----

fn fuzz_base() -> Vec<u8> {
    let mut bp = GenObservation::new("9A751000000000001", pq("149", "mmHg"));
    bp.reference_range = Some(("80".into(), "130".into(), "mmHg".into()));
    render(
        &Header::default(),
        &[
            bp,
            GenObservation::typical("1A020000000191111", 1),
            GenObservation::typical("9N056000000000011", 2),
            GenObservation::typical("9N056160400000049", 3),
        ],
    )
}

/// A small valid archive, built once for the fuzz cases.
fn fuzz_archive() -> &'static Vec<u8> {
    static ARCHIVE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    ARCHIVE.get_or_init(|| {
        let index = index_xml(1);
        let document = fuzz_base();
        zip_of(&[
            ("ix08_V08.xml", index.as_bytes()),
            ("DATA/h1.xml", &document),
        ])
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        if let Ok(doc) = parse(&bytes) {
            let _ = to_fhir_bundle(&doc, &bytes);
        }
        let _ = read_exchange_zip(&bytes);
    }

    #[test]
    fn mutated_documents_never_panic(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..8)
    ) {
        let mut xml = fuzz_base();
        for (at, byte, kind) in edits {
            if xml.is_empty() { break; }
            let i = at.index(xml.len());
            match kind {
                0 => xml[i] = byte,
                1 => { xml.remove(i); }
                _ => xml.insert(i, byte),
            }
        }
        if let Ok(doc) = parse(&xml) {
            let _ = to_fhir_bundle(&doc, &xml);
        }
    }

    #[test]
    fn mutated_archives_never_panic(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6)
    ) {
        let mut bytes = fuzz_archive().clone();
        for (at, byte) in edits {
            let i = at.index(bytes.len());
            bytes[i] = byte;
        }
        if let Ok(archive) = read_exchange_zip(&bytes) {
            for document in archive.checkup_documents() {
                let _ = validate(&document.bytes);
                if let Ok(doc) = parse(&document.bytes) {
                    let _ = to_fhir_bundle(&doc, &document.bytes);
                }
            }
        }
    }

    #[test]
    fn mutated_documents_never_panic_the_validator(
        at in any::<prop::sample::Index>(), replacement in "[a-zA-Z0-9<>/=\" .&;-]{0,6}"
    ) {
        let xml = String::from_utf8(fuzz_base()).unwrap_or_default();
        let mut i = at.index(xml.len());
        while !xml.is_char_boundary(i) { i -= 1; }
        let mutated = format!("{}{}{}", &xml[..i], replacement, &xml[i..]);
        let _ = validate(mutated.as_bytes());
    }
}
