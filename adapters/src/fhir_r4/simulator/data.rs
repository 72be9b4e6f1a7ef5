//! Deterministic JP Core-shaped records: the same seed gives the same patients, resources,
//! ids and timestamps, whatever the number of patients.

use std::collections::HashMap;
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::codesystem::{ORDER_IN_RP_SYSTEM, RP_NUMBER_SYSTEM};

/// 2024-04-01T00:00:00Z: every generated `meta.lastUpdated` is this plus a few seconds.
const EPOCH_MS: i64 = 1_711_929_600_000;

/// JLAC10 as an OID (JP Core's `urn:oid` form) and as MEDIS's URL form.
pub const JLAC10_OID: &str = "urn:oid:1.2.392.200119.4.504";
pub const JLAC10_URL: &str = "http://medis.or.jp/CodeSystem/master-JLAC10-17digits";
pub const HOT9_OID: &str = "urn:oid:1.2.392.200119.4.403.1";
pub const HOT9_URL: &str = "http://medis.or.jp/CodeSystem/master-HOT9";
pub const YJ_OID: &str = "urn:oid:1.2.392.100495.20.2.73";
const ICD10_JP: &str = "http://jpfhir.jp/fhir/core/mhlw/CodeSystem/ICD10-2013-full";
/// JLAC10 材料コード as JP Core names it, and HL7 v2 table 0487 (specimen type).
const SAMPLE_MATERIAL: &str =
    "http://jpfhir.jp/fhir/core/CodeSystem/JP_ObservationSampleMaterialCode_CS";
const V2_SPECIMEN_TYPE: &str = "http://terminology.hl7.org/CodeSystem/v2-0487";

const FAMILY_NAMES: &[(&str, &str)] = &[
    ("山田", "ヤマダ"),
    ("佐藤", "サトウ"),
    ("鈴木", "スズキ"),
    ("高橋", "タカハシ"),
    ("田中", "タナカ"),
    ("伊藤", "イトウ"),
    ("渡辺", "ワタナベ"),
    ("中村", "ナカムラ"),
];
const MALE_GIVEN: &[(&str, &str)] = &[("太郎", "タロウ"), ("健一", "ケンイチ"), ("翔", "ショウ")];
const FEMALE_GIVEN: &[(&str, &str)] = &[("花子", "ハナコ"), ("美咲", "ミサキ"), ("陽子", "ヨウコ")];

/// (JLAC10 17-digit code, 項目名, UCUM unit, low, high) of a few common lab tests. Digits
/// 10-12 of a JLAC10 code are its 材料コード (specimen material): see [`specimen_of`].
const LAB_TESTS: &[(&str, &str, &str, f64, f64)] = &[
    ("3D010000001926101", "グルコース", "mg/dL", 70.0, 140.0),
    ("3C020000002327101", "尿酸", "mg/dL", 3.0, 8.0),
    (
        "3F050000002327101",
        "総コレステロール",
        "mg/dL",
        140.0,
        260.0,
    ),
    ("3B035000002327201", "AST", "U/L", 10.0, 45.0),
    ("3B045000002327201", "ALT", "U/L", 5.0, 50.0),
    ("3C015000002327101", "クレアチニン", "mg/dL", 0.5, 1.3),
    ("3D046000001906202", "HbA1c", "%", 4.6, 8.0),
];

/// (HOT9, YJ, 医薬品名) shaped like the MEDIS HOT and YJ masters.
const DRUGS: &[(&str, &str, &str)] = &[
    ("103835401", "2233002F1030", "ムコダイン錠２５０ｍｇ"),
    ("107714301", "1149019F1560", "ロキソニン錠６０ｍｇ"),
    ("111226401", "2171022F2020", "アムロジピン錠５ｍｇ"),
    (
        "105271807",
        "3962002F1010",
        "メトホルミン塩酸塩錠２５０ｍｇ",
    ),
];

const CONDITIONS: &[(&str, &str)] = &[
    ("E119", "２型糖尿病"),
    ("I10", "本態性高血圧症"),
    ("E785", "脂質異常症"),
    ("J304", "アレルギー性鼻炎"),
];

const VACCINES: &[(&str, &str)] = &[
    ("111501701", "肺炎球菌ワクチン"),
    ("113019501", "インフルエンザＨＡワクチン"),
];

const ALLERGENS: &[(&str, &str)] = &[
    ("J9FA15000016", "小麦粉"),
    ("J9FA11000016", "鶏卵"),
    ("J9FA14000016", "そば"),
];

/// One stored resource: its JSON exactly as served, and what the server indexes it by.
#[derive(Debug)]
pub(crate) struct StoredResource {
    pub(crate) resource_type: String,
    pub(crate) id: String,
    pub(crate) patient_id: String,
    pub(crate) last_updated_ms: i64,
    pub(crate) json: String,
}

/// A patient's credentials at the simulated portal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatientLogin {
    pub username: String,
    pub password: String,
    /// The FHIR `Patient.id` (what the token's `patient` will say).
    pub patient_id: String,
    pub display_name: String,
}

impl PatientLogin {
    /// Patient number `n` (1-based): `patient-0001` / `phr-sim-0001` / `pt000001`.
    pub fn for_number(number: usize, display_name: String) -> Self {
        PatientLogin {
            username: format!("patient-{number:04}"),
            password: format!("phr-sim-{number:04}"),
            patient_id: format!("pt{number:06}"),
            display_name,
        }
    }
}

#[derive(Default)]
pub(crate) struct PatientRecords {
    pub(crate) login: Option<PatientLogin>,
    /// Every resource of the patient in `lastUpdated` order (the Patient first).
    pub(crate) all: Vec<Arc<StoredResource>>,
    pub(crate) by_type: HashMap<String, Vec<Arc<StoredResource>>>,
}

#[derive(Default)]
pub(crate) struct Store {
    pub(crate) patients: HashMap<String, PatientRecords>,
    pub(crate) by_username: HashMap<String, String>,
    pub(crate) by_key: HashMap<(String, String), Arc<StoredResource>>,
    /// The newest `lastUpdated` handed out; later additions go after it.
    clock_ms: i64,
    added: u64,
}

pub(crate) fn instant(ms: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|instant| instant.format(&Rfc3339).ok())
        .unwrap_or_default()
}

impl Store {
    pub(crate) fn generate(seed: u64, patients: usize, resources_per_patient: usize) -> Self {
        let mut store = Store::default();
        for number in 1..=patients {
            store.generate_patient(seed, number, resources_per_patient.max(1));
        }
        store
    }

    fn generate_patient(&mut self, seed: u64, number: usize, resources: usize) {
        // Each patient has its own stream, so patient N is the same whatever the count.
        let mut rng =
            StdRng::seed_from_u64(seed ^ (number as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let (family, family_kana) = FAMILY_NAMES[rng.gen_range(0..FAMILY_NAMES.len())];
        let male = rng.gen_bool(0.5);
        let given_names = if male { MALE_GIVEN } else { FEMALE_GIVEN };
        let (given, given_kana) = given_names[rng.gen_range(0..given_names.len())];
        let login = PatientLogin::for_number(number, format!("{family} {given}"));
        let patient_id = login.patient_id.clone();
        let birth_year = rng.gen_range(1940..2010);
        let patient = json!({
            "resourceType": "Patient",
            "id": patient_id,
            "meta": meta(EPOCH_MS, "http://jpfhir.jp/fhir/core/StructureDefinition/JP_Patient"),
            "identifier": [{"system": "urn:oid:1.2.392.100495.20.3.51.11319999999", "value": format!("{number:08}")}],
            "name": [
                {"extension": [{"url": "http://hl7.org/fhir/StructureDefinition/iso21090-EN-representation", "valueCode": "IDE"}],
                 "use": "official", "text": format!("{family} {given}"), "family": family, "given": [given]},
                {"extension": [{"url": "http://hl7.org/fhir/StructureDefinition/iso21090-EN-representation", "valueCode": "SYL"}],
                 "use": "official", "text": format!("{family_kana} {given_kana}"), "family": family_kana, "given": [given_kana]}
            ],
            "gender": if male { "male" } else { "female" },
            "birthDate": format!("{birth_year}-{:02}-{:02}", rng.gen_range(1..=12), rng.gen_range(1..=28)),
            "address": [{"text": "東京都新宿区", "postalCode": "1600023"}]
        });
        self.by_username
            .insert(login.username.clone(), patient_id.clone());
        self.patients.entry(patient_id.clone()).or_default().login = Some(login);
        self.insert("Patient", &patient_id, &patient_id, EPOCH_MS, &patient);
        for sequence in 1..resources {
            let updated_ms = EPOCH_MS + sequence as i64 * 1_000;
            let (resource_type, resource) =
                clinical_resource(&mut rng, &patient_id, number, sequence, updated_ms);
            let id = resource
                .get("id")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            self.insert(resource_type, &id, &patient_id, updated_ms, &resource);
        }
    }

    fn insert(
        &mut self,
        resource_type: &str,
        id: &str,
        patient_id: &str,
        last_updated_ms: i64,
        resource: &Value,
    ) {
        let stored = Arc::new(StoredResource {
            resource_type: resource_type.to_string(),
            id: id.to_string(),
            patient_id: patient_id.to_string(),
            last_updated_ms,
            json: resource.to_string(),
        });
        self.clock_ms = self.clock_ms.max(last_updated_ms);
        let records = self.patients.entry(patient_id.to_string()).or_default();
        records.all.push(Arc::clone(&stored));
        records
            .by_type
            .entry(resource_type.to_string())
            .or_default()
            .push(Arc::clone(&stored));
        self.by_key
            .insert((resource_type.to_string(), id.to_string()), stored);
    }

    /// Adds `count` new lab Observations for the patient, newer than anything stored.
    pub(crate) fn add_observations(&mut self, patient_id: &str, count: usize) -> Vec<String> {
        let mut ids = Vec::new();
        if !self.patients.contains_key(patient_id) {
            return ids;
        }
        let mut rng = StdRng::seed_from_u64(self.added ^ 0xA5A5);
        for _ in 0..count {
            self.added += 1;
            let updated_ms = self.clock_ms + 1_000;
            let id = format!("obs-new-{:06}", self.added);
            let resource =
                lab_observation(&mut rng, &id, patient_id, self.added as usize, updated_ms);
            self.insert("Observation", &id, patient_id, updated_ms, &resource);
            ids.push(id);
        }
        ids
    }

    /// Adds one resource as given (its `id`, `meta.versionId` "1" and `meta.lastUpdated`
    /// set here, newer than everything stored); returns its id, or `None` for an unknown
    /// patient or a resource without a type.
    pub(crate) fn add_resource(&mut self, patient_id: &str, mut resource: Value) -> Option<String> {
        if !self.patients.contains_key(patient_id) {
            return None;
        }
        let resource_type = resource.get("resourceType")?.as_str()?.to_string();
        self.added += 1;
        let updated_ms = self.clock_ms + 1_000;
        let id = format!("added-{:06}", self.added);
        resource["id"] = json!(id);
        resource["meta"] = json!({"versionId": "1", "lastUpdated": instant(updated_ms)});
        self.insert(&resource_type, &id, patient_id, updated_ms, &resource);
        Some(id)
    }
}

fn meta(updated_ms: i64, profile: &str) -> Value {
    json!({"versionId": "1", "lastUpdated": instant(updated_ms), "profile": [profile]})
}

fn clinical_resource(
    rng: &mut StdRng,
    patient_id: &str,
    number: usize,
    sequence: usize,
    updated_ms: i64,
) -> (&'static str, Value) {
    let subject = json!({"reference": format!("Patient/{patient_id}")});
    let id_for = |prefix: &str| format!("{prefix}-{number:06}-{sequence:06}");
    let day = format!(
        "20{:02}-{:02}-{:02}",
        rng.gen_range(15..24),
        rng.gen_range(1..=12),
        rng.gen_range(1..=28)
    );
    match sequence % 10 {
        1..=5 => (
            "Observation",
            lab_observation(rng, &id_for("obs"), patient_id, sequence, updated_ms),
        ),
        6 => {
            let (code, name) = CONDITIONS[rng.gen_range(0..CONDITIONS.len())];
            (
                "Condition",
                json!({
                    "resourceType": "Condition",
                    "id": id_for("cond"),
                    "meta": meta(updated_ms, "http://jpfhir.jp/fhir/core/StructureDefinition/JP_Condition"),
                    "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]},
                    "verificationStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": "confirmed"}]},
                    "code": {"coding": [{"system": ICD10_JP, "code": code, "display": name}], "text": name},
                    "subject": subject,
                    "recordedDate": day
                }),
            )
        }
        7 => {
            let (hot9, yj, name) = DRUGS[rng.gen_range(0..DRUGS.len())];
            let hot_system = if sequence % 20 == 7 {
                HOT9_OID
            } else {
                HOT9_URL
            };
            (
                "MedicationRequest",
                json!({
                    "resourceType": "MedicationRequest",
                    "id": id_for("medreq"),
                    "meta": meta(updated_ms, "http://jpfhir.jp/fhir/core/StructureDefinition/JP_MedicationRequest"),
                    // Each order prescribes one drug: Rp 1, the first (only) drug in it.
                    "identifier": [
                        {"system": RP_NUMBER_SYSTEM, "value": "1"},
                        {"system": ORDER_IN_RP_SYSTEM, "value": "1"}
                    ],
                    "status": "active",
                    "intent": "order",
                    "medicationCodeableConcept": {"coding": [
                        {"system": hot_system, "code": hot9, "display": name},
                        {"system": YJ_OID, "code": yj, "display": name}
                    ], "text": name},
                    "subject": subject,
                    "authoredOn": day,
                    "dosageInstruction": [{"text": "内服・経口・１日３回朝昼夕食後"}]
                }),
            )
        }
        8 => {
            let (code, name) = VACCINES[rng.gen_range(0..VACCINES.len())];
            (
                "Immunization",
                json!({
                    "resourceType": "Immunization",
                    "id": id_for("imm"),
                    "meta": meta(updated_ms, "http://jpfhir.jp/fhir/core/StructureDefinition/JP_Immunization"),
                    "status": "completed",
                    "vaccineCode": {"coding": [{"system": HOT9_URL, "code": code, "display": name}]},
                    "patient": subject,
                    "occurrenceDateTime": day
                }),
            )
        }
        9 => {
            let (code, name) = ALLERGENS[rng.gen_range(0..ALLERGENS.len())];
            (
                "AllergyIntolerance",
                json!({
                    "resourceType": "AllergyIntolerance",
                    "id": id_for("allergy"),
                    "meta": meta(updated_ms, "http://jpfhir.jp/fhir/core/StructureDefinition/JP_AllergyIntolerance"),
                    "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical", "code": "active"}]},
                    "type": "allergy",
                    "category": ["food"],
                    "code": {"coding": [{"system": "http://jpfhir.jp/fhir/core/CodeSystem/JP_JfagyFoodAllergen_CS", "code": code, "display": name}], "text": name},
                    "patient": subject,
                    "recordedDate": day
                }),
            )
        }
        _ => (
            "Encounter",
            json!({
                "resourceType": "Encounter",
                "id": id_for("enc"),
                "meta": meta(updated_ms, "http://jpfhir.jp/fhir/core/StructureDefinition/JP_Encounter"),
                "status": "finished",
                "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB", "display": "外来"},
                "serviceType": {"text": "内科"},
                "subject": subject,
                "period": {"start": day, "end": day}
            }),
        ),
    }
}

/// A JP Core lab result; even sequences use the JLAC10 OID, odd ones the URL form.
fn lab_observation(
    rng: &mut StdRng,
    id: &str,
    patient_id: &str,
    sequence: usize,
    updated_ms: i64,
) -> Value {
    let (code, name, unit, low, high) = LAB_TESTS[rng.gen_range(0..LAB_TESTS.len())];
    let system = if sequence & 1 == 0 {
        JLAC10_OID
    } else {
        JLAC10_URL
    };
    let value = ((low + (high - low) * rng.gen::<f64>()) * 10.0).round() / 10.0;
    let mut observation = json!({
        "resourceType": "Observation",
        "id": id,
        "meta": meta(updated_ms, "http://jpfhir.jp/fhir/core/StructureDefinition/JP_Observation_LabResult"),
        "status": "final",
        "category": [{"coding": [{"system": "http://jpfhir.jp/fhir/core/CodeSystem/JP_SimpleObservationCategory_CS", "code": "laboratory"}]}],
        "code": {"coding": [{"system": system, "code": code, "display": name}], "text": name},
        "subject": {"reference": format!("Patient/{patient_id}")},
        "effectiveDateTime": instant(updated_ms),
        "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit}
    });
    // JP_Observation_LabResult requires `specimen` (1..1). The specimen is no resource of
    // its own at this server, so it travels contained, as JP-CLINS's lab results carry it.
    if let Some((material, material_name, v2_code, v2_name)) = specimen_of(code) {
        observation["contained"] = json!([{
            "resourceType": "Specimen",
            "id": "specimen",
            "meta": {"profile": ["http://jpfhir.jp/fhir/core/StructureDefinition/JP_Specimen"]},
            "type": {"coding": [
                {"system": SAMPLE_MATERIAL, "code": material, "display": material_name},
                {"system": V2_SPECIMEN_TYPE, "code": v2_code, "display": v2_name}
            ], "text": material_name}
        }]);
        observation["specimen"] = json!({"reference": "#specimen", "display": material_name});
    }
    observation
}

/// The specimen a JLAC10 code names in its 材料コード (digits 10-12): (材料コード, 名称,
/// HL7 v2-0487 code, its display), for the materials [`LAB_TESTS`] use.
fn specimen_of(jlac10: &str) -> Option<(&'static str, &'static str, &'static str, &'static str)> {
    match jlac10.get(9..12)? {
        "019" => Some(("019", "全血（添加物入り）", "WB", "Whole blood")),
        "023" => Some(("023", "血清", "SER", "Serum")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_lab_test_names_a_known_specimen() {
        for (code, name, ..) in LAB_TESTS {
            assert_eq!(code.len(), 17, "{name}");
            assert!(specimen_of(code).is_some(), "{code} {name}");
        }
        // HbA1c is measured in whole blood with an additive, cholesterol in serum.
        assert_eq!(
            specimen_of("3D046000001906202").map(|s| s.1),
            Some("全血（添加物入り）")
        );
        assert_eq!(specimen_of("3F050000002327101").map(|s| s.1), Some("血清"));
        assert_eq!(specimen_of("3F05000000"), None);
    }
}
