//! Portal records → JP Core FHIR R4 JSON. Pure functions: one record (or one item of a
//! record) in, one resource out, or the reason it cannot be stored.
//!
//! Conventions shared by every mapping:
//! - The resource id is `{prefix}-{portal id}` (plus the item's position or code where a
//!   record yields several resources), so ids of different categories never collide and
//!   a corrected record (same portal id, higher `version`) lands on the same resource.
//! - `meta.versionId` is the record's `version` (1 when the portal leaves it out).
//! - `status: "entered-in-error"` on the record becomes the resource's `entered-in-error`
//!   status: a withdrawn record is kept, never dropped.
//! - The person is `Patient/{subject}`, the portal's `subject` for the link, the same
//!   relative `Patient/{id}` form the hospital source receives.
//! - Code systems are written in the canonical form the gateway stores (the code-system
//!   normaliser's URL where one exists, else the `urn:oid:`).
//!
//! 医療費通知 becomes an ExplanationOfBenefit: it is what FHIR has for "what a claim cost
//! and who paid what" after adjudication, which is exactly what a 医療費通知 reports (total
//! cost, the patient's share, days, institution, month). A Claim would be the request
//! for payment, which the patient never sees; a financial Invoice lacks the insurer side.
//! The insurer, provider and coverage are logical references with display text only: the
//! notice names the institution but carries no resolvable identifiers for them.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde_json::{json, Map, Value};

use super::Category;
use crate::codesystem::{url_for_oid, ORDER_IN_RP_SYSTEM, RP_NUMBER_SYSTEM};

pub const PROFILE_MEDICATION_DISPENSE: &str =
    "http://jpfhir.jp/fhir/core/StructureDefinition/JP_MedicationDispense";
pub const PROFILE_IMMUNIZATION: &str =
    "http://jpfhir.jp/fhir/core/StructureDefinition/JP_Immunization";
pub const PROFILE_OBSERVATION_COMMON: &str =
    "http://jpfhir.jp/fhir/core/StructureDefinition/JP_Observation_Common";

/// 個別医薬品コード (YJ), MEDIS HOT9, 一般名処方マスタ, JLAC10 and 特定健診項目コード by OID;
/// written in their canonical form through the code-system table.
const YJ_OID: &str = "urn:oid:1.2.392.100495.20.2.73";
const HOT9_OID: &str = "urn:oid:1.2.392.200119.4.403.1";
const GENERAL_NAME_OID: &str = "urn:oid:1.2.392.100495.20.2.81";
const JLAC10_OID: &str = "urn:oid:1.2.392.200119.4.504";
/// 特定健診項目コード (XML用項目コード): it has no URL form, so the OID is canonical.
pub const CHECKUP_ITEM_OID: &str = "urn:oid:1.2.392.200119.6.1005";
/// 報告区分コード; `10` is 特定健診情報.
const REPORT_KIND_OID: &str = "urn:oid:1.2.392.200119.6.1001";
/// Items the portal codes in neither JLAC10 nor 特定健診項目コード (頭囲, 胸囲, …).
pub const PORTAL_ITEM_CODE_SYSTEM: &str = "urn:phr-gateway:self-info:item-code";
/// 10-digit 保険医療機関・薬局コード as JP Core names it.
const INSTITUTION_CODE_SYSTEM: &str =
    "http://jpfhir.jp/fhir/core/IdSystem/insurance-medical-institution-no";
const UCUM: &str = "http://unitsofmeasure.org";
pub const CDA_CONTENT_TYPE: &str = "application/hl7-v3+xml";

/// The canonical `system` for an OID, as the gateway's normaliser would store it.
pub fn canonical(oid: &'static str) -> &'static str {
    url_for_oid(oid).unwrap_or(oid)
}

/// One resource made from a portal record.
#[derive(Debug, Clone, PartialEq)]
pub struct MappedResource {
    pub resource_type: &'static str,
    pub id: String,
    pub version: u64,
    pub body: Value,
}

/// Why a record (or one of its items) cannot be stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappingError {
    /// The resource id it would have had, when the record's id could be read.
    pub id: Option<String>,
    pub reason: String,
}

impl MappingError {
    fn new(id: Option<&str>, reason: impl Into<String>) -> Self {
        MappingError {
            id: id.map(str::to_string),
            reason: reason.into(),
        }
    }
}

pub type Mapped = Result<MappedResource, MappingError>;

/// What every record has: id, version, status and when it became available.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordHeader {
    pub id: String,
    pub version: u64,
    pub entered_in_error: bool,
    /// When the record became available at the portal (RFC 3339), if it says.
    pub available_at: Option<String>,
}

/// Reads the fields every record shares. The id must fit in a FHIR id.
pub fn record_header(record: &Value) -> Result<RecordHeader, MappingError> {
    let Some(object) = record.as_object() else {
        return Err(MappingError::new(None, "record is not a JSON object"));
    };
    let id = match object.get("id") {
        Some(Value::String(id)) => id.clone(),
        Some(Value::Number(number)) => number.to_string(),
        _ => return Err(MappingError::new(None, "record has no id")),
    };
    if id.is_empty()
        || id.len() > 40
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        return Err(MappingError::new(
            None,
            "record id is not 1-40 letters, digits, '-' or '.'",
        ));
    }
    let version = match object.get("version") {
        None | Some(Value::Null) => 1,
        Some(Value::Number(number)) => number
            .as_u64()
            .filter(|version| *version >= 1)
            .ok_or_else(|| MappingError::new(Some(&id), "version is not a positive integer"))?,
        Some(Value::String(text)) => text
            .parse::<u64>()
            .ok()
            .filter(|version| *version >= 1)
            .ok_or_else(|| MappingError::new(Some(&id), "version is not a positive integer"))?,
        Some(_) => return Err(MappingError::new(Some(&id), "version is not a number")),
    };
    let entered_in_error = match object.get("status") {
        None | Some(Value::Null) => false,
        Some(Value::String(status)) => status == "entered-in-error",
        Some(_) => return Err(MappingError::new(Some(&id), "status is not a string")),
    };
    let available_at = object
        .get("available_at")
        .and_then(Value::as_str)
        .map(str::to_string);
    Ok(RecordHeader {
        id,
        version,
        entered_in_error,
        available_at,
    })
}

/// Maps one record of `category` (not 特定健診, whose document must be fetched first; see
/// [`checkup_listing`] and [`map_checkup_document`]).
pub fn map_record(category: Category, record: &Value, patient_id: &str) -> Vec<Mapped> {
    match category {
        Category::Medication => map_medication(record, patient_id),
        Category::Immunization => vec![map_immunization(record, patient_id)],
        Category::InfantCheckup => map_measurements(record, patient_id, "inf"),
        Category::SchoolCheckup => map_measurements(record, patient_id, "sch"),
        Category::MedicalCost => vec![map_medical_cost(record, patient_id)],
        Category::SpecificCheckup => vec![Err(MappingError::new(
            None,
            "特定健診 records are mapped from their document",
        ))],
    }
}

fn patient_reference(patient_id: &str) -> Value {
    json!({ "reference": format!("Patient/{patient_id}") })
}

fn meta(version: u64, profile: Option<&str>) -> Value {
    let mut meta = json!({ "versionId": version.to_string() });
    if let Some(profile) = profile {
        meta["profile"] = json!([profile]);
    }
    meta
}

/// A required non-empty string member.
fn text<'a>(object: &'a Map<String, Value>, name: &str, id: &str) -> Result<&'a str, MappingError> {
    object
        .get(name)
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|value| !value.is_empty())
        .ok_or_else(|| MappingError::new(Some(id), format!("{name} is missing or empty")))
}

fn optional_text<'a>(object: &'a Map<String, Value>, name: &str) -> Option<&'a str> {
    object
        .get(name)
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|value| !value.is_empty())
}

/// A required `YYYY-MM-DD` date.
fn date<'a>(object: &'a Map<String, Value>, name: &str, id: &str) -> Result<&'a str, MappingError> {
    let value = text(object, name, id)?;
    if is_date(value) {
        Ok(value)
    } else {
        Err(MappingError::new(
            Some(id),
            format!("{name} is not a YYYY-MM-DD date"),
        ))
    }
}

fn is_date(value: &str) -> bool {
    let format = time::macros::format_description!("[year]-[month]-[day]");
    value.len() == 10 && time::Date::parse(value, format).is_ok()
}

fn finite_number(value: Option<&Value>) -> Option<f64> {
    value
        .and_then(Value::as_f64)
        .filter(|number| number.is_finite())
}

fn object_of<'a>(record: &'a Value, id: &str) -> Result<&'a Map<String, Value>, MappingError> {
    record
        .as_object()
        .ok_or_else(|| MappingError::new(Some(id), "record is not a JSON object"))
}

/// A record's header and body, or a single error for the whole record.
fn open_record(record: &Value) -> Result<(RecordHeader, &Map<String, Value>), MappingError> {
    let header = record_header(record)?;
    let object = object_of(record, &header.id)?;
    Ok((header, object))
}

/// `{name, code}` of an institution as a logical reference.
fn institution_reference(value: Option<&Value>) -> Option<Value> {
    let object = value?.as_object()?;
    let name = optional_text(object, "name");
    let code = optional_text(object, "code");
    if name.is_none() && code.is_none() {
        return None;
    }
    let mut reference = Map::new();
    if let Some(code) = code {
        reference.insert(
            "identifier".into(),
            json!({ "system": INSTITUTION_CODE_SYSTEM, "value": code }),
        );
    }
    if let Some(name) = name {
        reference.insert("display".into(), json!(name));
    }
    Some(Value::Object(reference))
}

/// The canonical system of a drug code, checking the code's shape.
fn drug_code_system(code_system: &str, code: &str) -> Result<&'static str, String> {
    let alphanumeric = code.bytes().all(|b| b.is_ascii_alphanumeric());
    match code_system {
        // 12 characters: 7 digits of 薬価基準収載医薬品コード classes, then letters/digits.
        "YJ" if code.len() == 12 && alphanumeric => Ok(canonical(YJ_OID)),
        "HOT9" if code.len() == 9 && code.bytes().all(|b| b.is_ascii_digit()) => {
            Ok(canonical(HOT9_OID))
        }
        // 一般名処方マスタ codes look like YJ codes with `ZZZ` at the end.
        "general-name" if code.len() == 12 && alphanumeric => Ok(canonical(GENERAL_NAME_OID)),
        "YJ" | "HOT9" | "general-name" => Err(format!("{code:?} is not a {code_system} code")),
        other => Err(format!("unknown code_system {other:?}")),
    }
}

/// JP_MedicationDispense's required Rp number (剤グループ) and place within the Rp of the
/// `position`-th (1-based) item of a dispensing record. The portal lists a record's drugs
/// in order but says nothing of how the prescription grouped them, so each item is written
/// as an Rp of its own, numbered in the record's order, its only drug first: that keeps
/// the order the record gives and claims no grouping it does not.
fn rp_identifiers(position: usize) -> Value {
    json!([
        { "system": RP_NUMBER_SYSTEM, "value": position.to_string() },
        { "system": ORDER_IN_RP_SYSTEM, "value": "1" },
    ])
}

/// 薬剤情報: one MedicationDispense per item of the dispensing record.
pub fn map_medication(record: &Value, patient_id: &str) -> Vec<Mapped> {
    let (header, object) = match open_record(record) {
        Ok(opened) => opened,
        Err(error) => return vec![Err(error)],
    };
    let record_id = format!("med-{}", header.id);
    let dispensed_on = match date(object, "dispensed_on", &record_id) {
        Ok(date) => date,
        Err(error) => return vec![Err(error)],
    };
    let Some(items) = object
        .get("items")
        .and_then(Value::as_array)
        .filter(|items| !items.is_empty())
    else {
        return vec![Err(MappingError::new(
            Some(&record_id),
            "dispensing record lists no items",
        ))];
    };
    let performer = institution_reference(object.get("pharmacy"));
    let prescriber = institution_reference(object.get("prescriber"));
    items
        .iter()
        .enumerate()
        .map(|(index, item)| {
            let id = format!("{record_id}-{}", index + 1);
            let item = item
                .as_object()
                .ok_or_else(|| MappingError::new(Some(&id), "item is not a JSON object"))?;
            let code = text(item, "drug_code", &id)?;
            let code_system = text(item, "code_system", &id)?;
            let system = drug_code_system(code_system, code)
                .map_err(|reason| MappingError::new(Some(&id), reason))?;
            let name = text(item, "name", &id)?;
            let quantity = finite_number(item.get("quantity"))
                .filter(|quantity| *quantity >= 0.0)
                .ok_or_else(|| MappingError::new(Some(&id), "quantity is not a number"))?;
            let unit = text(item, "unit", &id)?;
            let status = if header.entered_in_error {
                "entered-in-error"
            } else {
                "completed"
            };
            let mut body = json!({
                "resourceType": "MedicationDispense",
                "id": id,
                "meta": meta(header.version, Some(PROFILE_MEDICATION_DISPENSE)),
                "identifier": rp_identifiers(index + 1),
                "status": status,
                "medicationCodeableConcept": {
                    "coding": [{ "system": system, "code": code, "display": name }],
                    "text": name,
                },
                "subject": patient_reference(patient_id),
                "quantity": { "value": quantity, "unit": unit },
                "whenHandedOver": dispensed_on,
            });
            if let Some(days) = item.get("days").filter(|days| !days.is_null()) {
                let days = days
                    .as_u64()
                    .ok_or_else(|| MappingError::new(Some(&id), "days is not a whole number"))?;
                body["daysSupply"] =
                    json!({ "value": days, "unit": "日", "system": UCUM, "code": "d" });
            }
            if let Some(usage) = optional_text(item, "usage") {
                body["dosageInstruction"] = json!([{ "text": usage }]);
            }
            if let Some(performer) = &performer {
                body["performer"] = json!([{ "actor": performer }]);
            }
            if let Some(prescriber) = &prescriber {
                // MedicationDispense names the prescription, not its author: the prescribing
                // institution goes on a contained MedicationRequest.
                body["contained"] = json!([{
                    "resourceType": "MedicationRequest",
                    "id": "prescription",
                    "status": "completed",
                    "intent": "order",
                    "medicationCodeableConcept": body["medicationCodeableConcept"].clone(),
                    "subject": patient_reference(patient_id),
                    "requester": prescriber,
                }]);
                body["authorizingPrescription"] = json!([{ "reference": "#prescription" }]);
            }
            Ok(MappedResource {
                resource_type: "MedicationDispense",
                id,
                version: header.version,
                body,
            })
        })
        .collect()
}

/// 予防接種 → Immunization.
pub fn map_immunization(record: &Value, patient_id: &str) -> Mapped {
    let (header, object) = open_record(record)?;
    let id = format!("imm-{}", header.id);
    let occurred = date(object, "date", &id)?;
    let vaccine = object
        .get("vaccine")
        .and_then(Value::as_object)
        .ok_or_else(|| MappingError::new(Some(&id), "vaccine is missing"))?;
    let code = text(vaccine, "code", &id)?;
    match optional_text(vaccine, "code_system") {
        None | Some("HOT9") => {}
        Some(other) => {
            return Err(MappingError::new(
                Some(&id),
                format!("vaccine code_system {other:?} is not HOT9"),
            ))
        }
    }
    let system =
        drug_code_system("HOT9", code).map_err(|reason| MappingError::new(Some(&id), reason))?;
    let name = text(vaccine, "name", &id)?;
    let status = if header.entered_in_error {
        "entered-in-error"
    } else {
        "completed"
    };
    let mut body = json!({
        "resourceType": "Immunization",
        "id": id,
        "meta": meta(header.version, Some(PROFILE_IMMUNIZATION)),
        "status": status,
        "vaccineCode": {
            "coding": [{ "system": system, "code": code, "display": name }],
            "text": name,
        },
        "patient": patient_reference(patient_id),
        "occurrenceDateTime": occurred,
    });
    if let Some(lot) = optional_text(object, "lot") {
        body["lotNumber"] = json!(lot);
    }
    if let Some(municipality) = optional_text(object, "municipality") {
        // The municipality runs the vaccination programme: the organisation responsible.
        body["performer"] = json!([{
            "function": { "text": "実施自治体" },
            "actor": { "display": municipality },
        }]);
    }
    match object.get("dose_number") {
        None | Some(Value::Null) => {}
        Some(dose) => {
            let dose = dose.as_u64().filter(|dose| *dose >= 1).ok_or_else(|| {
                MappingError::new(Some(&id), "dose_number is not a positive integer")
            })?;
            body["protocolApplied"] = json!([{ "doseNumberPositiveInt": dose }]);
        }
    }
    Ok(MappedResource {
        resource_type: "Immunization",
        id,
        version: header.version,
        body,
    })
}

/// The code system of a checkup measurement code: 特定健診項目コード (17 characters from
/// `9N`), JLAC10 (17 other letters and digits), else the portal's own item code.
fn measurement_code_system(code: &str) -> Option<&'static str> {
    // The code becomes part of the resource id: FHIR id characters only.
    if code.is_empty()
        || code.len() > 32
        || !code
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        return None;
    }
    Some(if code.len() == 17 && code.starts_with("9N") {
        CHECKUP_ITEM_OID
    } else if code.len() == 17 && code.bytes().all(|b| b.is_ascii_alphanumeric()) {
        canonical(JLAC10_OID)
    } else {
        PORTAL_ITEM_CODE_SYSTEM
    })
}

/// Units the portal writes → UCUM codes.
fn ucum_code(unit: &str) -> Option<&'static str> {
    Some(match unit {
        "cm" => "cm",
        "kg" => "kg",
        "g" => "g",
        "kg/m2" => "kg/m2",
        "%" => "%",
        "mmHg" => "mm[Hg]",
        "mg/dL" => "mg/dL",
        "/min" | "回/分" => "/min",
        _ => return None,
    })
}

/// 乳幼児健診 (and 学校健診, same shape): one Observation per measurement.
pub fn map_measurements(record: &Value, patient_id: &str, prefix: &str) -> Vec<Mapped> {
    let (header, object) = match open_record(record) {
        Ok(opened) => opened,
        Err(error) => return vec![Err(error)],
    };
    let record_id = format!("{prefix}-{}", header.id);
    let effective = match date(object, "date", &record_id) {
        Ok(date) => date,
        Err(error) => return vec![Err(error)],
    };
    let Some(measurements) = object
        .get("measurements")
        .and_then(Value::as_array)
        .filter(|measurements| !measurements.is_empty())
    else {
        return vec![Err(MappingError::new(
            Some(&record_id),
            "checkup lists no measurements",
        ))];
    };
    let age_months = object.get("age_months").and_then(Value::as_u64);
    measurements
        .iter()
        .enumerate()
        .map(|(index, measurement)| {
            let position_id = format!("{record_id}-{}", index + 1);
            let measurement = measurement.as_object().ok_or_else(|| {
                MappingError::new(Some(&position_id), "measurement is not a JSON object")
            })?;
            let code = text(measurement, "code", &position_id)?;
            let system = measurement_code_system(code).ok_or_else(|| {
                MappingError::new(Some(&position_id), format!("{code:?} is not an item code"))
            })?;
            // Keyed by code, not position: a correction may reorder the measurements.
            let id = format!("{record_id}-{code}");
            if id.len() > 64 {
                return Err(MappingError::new(
                    Some(&position_id),
                    "id would exceed 64 characters",
                ));
            }
            let value = finite_number(measurement.get("value"))
                .ok_or_else(|| MappingError::new(Some(&id), "value is not a number"))?;
            let unit = text(measurement, "unit", &id)?;
            let mut quantity = json!({ "value": value, "unit": unit });
            if let Some(ucum) = ucum_code(unit) {
                quantity["system"] = json!(UCUM);
                quantity["code"] = json!(ucum);
            }
            let status = match (header.entered_in_error, header.version > 1) {
                (true, _) => "entered-in-error",
                (false, true) => "amended",
                (false, false) => "final",
            };
            let mut code_concept = json!({ "coding": [{ "system": system, "code": code }] });
            if let Some(name) = optional_text(measurement, "name") {
                code_concept["coding"][0]["display"] = json!(name);
                code_concept["text"] = json!(name);
            }
            let mut body = json!({
                "resourceType": "Observation",
                "id": id,
                "meta": meta(header.version, Some(PROFILE_OBSERVATION_COMMON)),
                "status": status,
                "category": [{ "coding": [{
                    "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                    "code": "exam",
                    "display": "Exam",
                }] }],
                "code": code_concept,
                "subject": patient_reference(patient_id),
                "effectiveDateTime": effective,
                "valueQuantity": quantity,
            });
            if let Some(months) = age_months {
                body["note"] = json!([{ "text": format!("月齢 {months} か月の健診") }]);
            }
            Ok(MappedResource {
                resource_type: "Observation",
                id,
                version: header.version,
                body,
            })
        })
        .collect()
}

/// 医療費通知 → ExplanationOfBenefit (see the module docs for why).
pub fn map_medical_cost(record: &Value, patient_id: &str) -> Mapped {
    let (header, object) = open_record(record)?;
    let id = format!("cost-{}", header.id);
    let month = text(object, "month", &id)?;
    let first_day = format!("{month}-01");
    if month.len() != 7 || !is_date(&first_day) {
        return Err(MappingError::new(Some(&id), "month is not YYYY-MM"));
    }
    let last_day = last_day_of_month(&first_day)
        .ok_or_else(|| MappingError::new(Some(&id), "month is not YYYY-MM"))?;
    let institution = text(object, "institution", &id)?;
    let yen = |name: &str| {
        object.get(name).and_then(Value::as_u64).ok_or_else(|| {
            MappingError::new(Some(&id), format!("{name} is not a whole yen amount"))
        })
    };
    let total = yen("total_yen")?;
    let patient_paid = yen("patient_paid_yen")?;
    if patient_paid > total {
        return Err(MappingError::new(
            Some(&id),
            "patient_paid_yen exceeds total_yen",
        ));
    }
    let days = object.get("days").and_then(Value::as_u64);
    let status = if header.entered_in_error {
        "entered-in-error"
    } else {
        "active"
    };
    let money = |value: u64| json!({ "value": value, "currency": "JPY" });
    let adjudication = |code: &str, display: &str| {
        json!({ "coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/adjudication",
            "code": code,
            "display": display,
        }] })
    };
    let mut item = json!({
        "sequence": 1,
        "productOrService": { "text": "保険診療" },
        "servicedPeriod": { "start": first_day, "end": last_day },
        "adjudication": [
            { "category": adjudication("submitted", "Submitted Amount"), "amount": money(total) },
            { "category": adjudication("copay", "CoPay"), "amount": money(patient_paid) },
        ],
    });
    if let Some(days) = days {
        item["quantity"] = json!({ "value": days, "unit": "日", "system": UCUM, "code": "d" });
    }
    let body = json!({
        "resourceType": "ExplanationOfBenefit",
        "id": id,
        "meta": meta(header.version, None),
        "status": status,
        "type": { "coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/claim-type",
            "code": "professional",
        }], "text": "医療費通知" },
        "use": "claim",
        "patient": patient_reference(patient_id),
        "billablePeriod": { "start": first_day, "end": last_day },
        "created": first_day,
        "insurer": { "display": "医療保険者" },
        "provider": { "display": institution },
        "outcome": "complete",
        "insurance": [{ "focal": true, "coverage": { "display": "医療保険" } }],
        "item": [item],
        "total": [
            { "category": adjudication("submitted", "Submitted Amount"), "amount": money(total) },
            { "category": adjudication("copay", "CoPay"), "amount": money(patient_paid) },
            { "category": adjudication("benefit", "Benefit Amount"), "amount": money(total - patient_paid) },
        ],
    });
    Ok(MappedResource {
        resource_type: "ExplanationOfBenefit",
        id,
        version: header.version,
        body,
    })
}

fn last_day_of_month(first_day: &str) -> Option<String> {
    let format = time::macros::format_description!("[year]-[month]-[day]");
    let first = time::Date::parse(first_day, format).ok()?;
    let last = first.replace_day(first.month().length(first.year())).ok()?;
    last.format(format).ok()
}

/// A 特定健診 list entry: what to fetch and what to call it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckupListing {
    pub header: RecordHeader,
    pub resource_id: String,
    pub date: String,
    pub institution: Option<String>,
    pub document_url: String,
}

pub fn checkup_listing(record: &Value) -> Result<CheckupListing, MappingError> {
    let (header, object) = open_record(record)?;
    let resource_id = format!("chk-{}", header.id);
    let date = date(object, "date", &resource_id)?.to_string();
    let document_url = text(object, "document_url", &resource_id)?.to_string();
    let institution = optional_text(object, "institution").map(str::to_string);
    Ok(CheckupListing {
        header,
        resource_id,
        date,
        institution,
        document_url,
    })
}

/// Whether `document` looks like one hc08 CDA document. Not a parser (another module turns
/// CDAs into FHIR): it catches what a portal or proxy sends by mistake (HTML error pages,
/// truncated bodies, other XML).
pub fn check_cda_document(document: &[u8]) -> Result<(), String> {
    let text = std::str::from_utf8(document).map_err(|_| "document is not UTF-8".to_string())?;
    let text = text.trim_start_matches('\u{feff}').trim();
    if !text.starts_with('<') {
        return Err("document is not XML".into());
    }
    let root = text
        .find("<ClinicalDocument")
        .ok_or_else(|| "document has no ClinicalDocument root".to_string())?;
    if text[..root].contains("<html") || text[..root].contains("<HTML") {
        return Err("document is an HTML page".into());
    }
    if !text.ends_with("</ClinicalDocument>") {
        return Err("document does not end with </ClinicalDocument> (truncated?)".into());
    }
    if !text.contains("urn:hl7-org:v3") {
        return Err("document is not in the HL7 v3 namespace".into());
    }
    Ok(())
}

/// 特定健診: the CDA document, attached as is to a DocumentReference.
pub fn map_checkup_document(listing: &CheckupListing, document: &[u8], patient_id: &str) -> Mapped {
    check_cda_document(document)
        .map_err(|reason| MappingError::new(Some(&listing.resource_id), reason))?;
    let attachment = json!({
        "contentType": CDA_CONTENT_TYPE,
        "data": STANDARD.encode(document),
        "size": document.len(),
        "title": format!("特定健診 {}", listing.date),
        "creation": listing.date,
    });
    Ok(checkup_reference(listing, attachment, patient_id))
}

/// A withdrawn 特定健診 whose document the portal no longer serves: still recorded, as
/// `entered-in-error`, with an attachment that only names what it was.
pub fn map_withdrawn_checkup(listing: &CheckupListing, patient_id: &str) -> Mapped {
    if !listing.header.entered_in_error {
        return Err(MappingError::new(
            Some(&listing.resource_id),
            "only a withdrawn checkup may come without its document",
        ));
    }
    let attachment = json!({
        "contentType": CDA_CONTENT_TYPE,
        "title": format!("特定健診 {}（取消）", listing.date),
    });
    Ok(checkup_reference(listing, attachment, patient_id))
}

fn checkup_reference(
    listing: &CheckupListing,
    attachment: Value,
    patient_id: &str,
) -> MappedResource {
    let status = if listing.header.entered_in_error {
        "entered-in-error"
    } else {
        "current"
    };
    let mut body = json!({
        "resourceType": "DocumentReference",
        "id": listing.resource_id,
        "meta": meta(listing.header.version, None),
        "status": status,
        "type": {
            "coding": [{ "system": REPORT_KIND_OID, "code": "10", "display": "特定健診情報" }],
            "text": "特定健診結果報告",
        },
        "subject": patient_reference(patient_id),
        "content": [{ "attachment": attachment }],
        "context": { "period": { "start": listing.date, "end": listing.date } },
    });
    if let Some(institution) = &listing.institution {
        body["author"] = json!([{ "display": institution }]);
    }
    MappedResource {
        resource_type: "DocumentReference",
        id: listing.resource_id.clone(),
        version: listing.header.version,
        body,
    }
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    const PATIENT: &str = "s-0001";

    fn medication(items: Value) -> Value {
        json!({
            "id": "rx1", "version": 1, "available_at": "2024-05-01T00:00:00Z",
            "dispensed_on": "2024-04-02",
            "pharmacy": {"name": "みなと薬局", "code": "1341234567"},
            "prescriber": {"name": "みなと病院", "code": "1311234567"},
            "items": items,
        })
    }

    #[test]
    fn canonical_systems_come_from_the_code_system_table() {
        assert_eq!(
            canonical(YJ_OID),
            "http://capstandard.jp/iyaku.info/CodeSystem/YJ-code"
        );
        assert_eq!(
            canonical(HOT9_OID),
            "http://medis.or.jp/CodeSystem/master-HOT9"
        );
        assert_eq!(
            canonical(GENERAL_NAME_OID),
            "http://jpfhir.jp/fhir/core/mhlw/CodeSystem/MedicationGeneralOrderCode"
        );
        assert_eq!(
            canonical(JLAC10_OID),
            "http://medis.or.jp/CodeSystem/master-JLAC10-17digits"
        );
        assert_eq!(canonical(CHECKUP_ITEM_OID), CHECKUP_ITEM_OID);
    }

    #[test]
    fn medication_items_table() {
        // (code_system, drug_code, expected system or the start of the rejection)
        let cases: &[(&str, &str, Result<&str, &str>)] = &[
            (
                "YJ",
                "2171022F2020",
                Ok("http://capstandard.jp/iyaku.info/CodeSystem/YJ-code"),
            ),
            (
                "HOT9",
                "111226401",
                Ok("http://medis.or.jp/CodeSystem/master-HOT9"),
            ),
            (
                "general-name",
                "2171022F2ZZZ",
                Ok("http://jpfhir.jp/fhir/core/mhlw/CodeSystem/MedicationGeneralOrderCode"),
            ),
            ("YJ", "XYZ", Err("\"XYZ\" is not a YJ code")),
            ("HOT9", "11122640A", Err("\"11122640A\" is not a HOT9 code")),
            ("ATC", "C08CA01", Err("unknown code_system")),
        ];
        for (code_system, code, expected) in cases {
            let record = medication(json!([{
                "drug_code": code, "code_system": code_system, "name": "アムロジピン錠５ｍｇ",
                "quantity": 28, "unit": "錠", "days": 28, "usage": "１日１回朝食後"
            }]));
            let mapped = map_medication(&record, PATIENT);
            assert_eq!(mapped.len(), 1);
            match (&mapped[0], expected) {
                (Ok(resource), Ok(system)) => {
                    let body = &resource.body;
                    assert_eq!(resource.id, "med-rx1-1");
                    assert_eq!(
                        body["medicationCodeableConcept"]["coding"][0]["system"],
                        *system
                    );
                    assert_eq!(
                        body["medicationCodeableConcept"]["coding"][0]["code"],
                        *code
                    );
                    assert_eq!(body["subject"]["reference"], "Patient/s-0001");
                    assert_eq!(body["quantity"]["value"], 28.0);
                    assert_eq!(body["quantity"]["unit"], "錠");
                    assert_eq!(body["daysSupply"]["value"], 28);
                    assert_eq!(body["dosageInstruction"][0]["text"], "１日１回朝食後");
                    assert_eq!(body["performer"][0]["actor"]["display"], "みなと薬局");
                    assert_eq!(body["contained"][0]["requester"]["display"], "みなと病院");
                    assert_eq!(
                        body["authorizingPrescription"][0]["reference"],
                        "#prescription"
                    );
                    assert_eq!(body["meta"]["profile"][0], PROFILE_MEDICATION_DISPENSE);
                    assert_eq!(
                        body["identifier"],
                        json!([
                            {"system": "http://jpfhir.jp/fhir/core/mhlw/IdSystem/Medication-RPGroupNumber", "value": "1"},
                            {"system": "http://jpfhir.jp/fhir/core/mhlw/IdSystem/MedicationAdministrationIndex", "value": "1"},
                        ])
                    );
                    assert_eq!(body["status"], "completed");
                }
                (Err(error), Err(reason)) => {
                    assert!(error.reason.starts_with(reason), "{}", error.reason);
                    assert_eq!(error.id.as_deref(), Some("med-rx1-1"));
                }
                (got, want) => panic!("{code_system} {code}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn one_bad_item_does_not_spoil_the_others() {
        let record = medication(json!([
            {"drug_code": "111226401", "code_system": "HOT9", "name": "a", "quantity": 1, "unit": "錠"},
            {"code_system": "HOT9", "name": "b", "quantity": 1, "unit": "錠"},
            {"drug_code": "103835401", "code_system": "HOT9", "name": "c", "quantity": 2, "unit": "錠"},
        ]));
        let mapped = map_medication(&record, PATIENT);
        assert!(mapped[0].is_ok());
        assert_eq!(
            mapped[1].as_ref().map_err(|e| e.reason.as_str()),
            Err("drug_code is missing or empty")
        );
        assert_eq!(mapped[2].as_ref().map(|r| r.id.as_str()), Ok("med-rx1-3"));
        // Each item is its own Rp, numbered by its place in the record (a failed item
        // keeps its number), the only drug in it.
        let rp_of = |mapped: &Mapped| {
            mapped.as_ref().ok().map(|r| {
                (
                    r.body["identifier"][0]["value"].clone(),
                    r.body["identifier"][1]["value"].clone(),
                )
            })
        };
        assert_eq!(rp_of(&mapped[0]), Some((json!("1"), json!("1"))));
        assert_eq!(rp_of(&mapped[2]), Some((json!("3"), json!("1"))));
    }

    #[test]
    fn records_table() {
        let immunization = json!({
            "id": "im1", "version": 2, "status": "entered-in-error", "date": "2024-04-10",
            "vaccine": {"code": "113019501", "code_system": "HOT9", "name": "インフルエンザＨＡワクチン"},
            "dose_number": 2, "lot": "L123", "municipality": "港区"
        });
        let resource = map_immunization(&immunization, PATIENT).expect("maps");
        assert_eq!(resource.id, "imm-im1");
        assert_eq!(resource.version, 2);
        assert_eq!(resource.body["status"], "entered-in-error");
        assert_eq!(resource.body["meta"]["versionId"], "2");
        assert_eq!(resource.body["patient"]["reference"], "Patient/s-0001");
        assert_eq!(
            resource.body["protocolApplied"][0]["doseNumberPositiveInt"],
            2
        );
        assert_eq!(resource.body["lotNumber"], "L123");
        assert_eq!(resource.body["performer"][0]["actor"]["display"], "港区");

        let checkup = json!({
            "id": "ic1", "date": "2024-06-01", "age_months": 18,
            "measurements": [
                {"code": "9N001000000000001", "value": 80.5, "unit": "cm"},
                {"code": "HEAD", "value": 47.0, "unit": "cm"},
                {"code": "9N006000000000001", "value": "heavy", "unit": "kg"},
            ]
        });
        let mapped = map_measurements(&checkup, PATIENT, "inf");
        let height = mapped[0].as_ref().expect("height");
        assert_eq!(height.id, "inf-ic1-9N001000000000001");
        assert_eq!(height.body["code"]["coding"][0]["system"], CHECKUP_ITEM_OID);
        assert_eq!(height.body["valueQuantity"]["code"], "cm");
        assert_eq!(height.body["valueQuantity"]["system"], UCUM);
        assert_eq!(height.body["status"], "final");
        let head = mapped[1].as_ref().expect("head");
        assert_eq!(
            head.body["code"]["coding"][0]["system"],
            PORTAL_ITEM_CODE_SYSTEM
        );
        assert!(mapped[2].is_err());

        let cost = json!({"id": "c1", "month": "2024-02", "institution": "みなと病院",
            "days": 2, "total_yen": 12000, "patient_paid_yen": 3600});
        let resource = map_medical_cost(&cost, PATIENT).expect("maps");
        assert_eq!(resource.body["billablePeriod"]["end"], "2024-02-29");
        assert_eq!(resource.body["total"][2]["amount"]["value"], 8400);
        assert_eq!(resource.body["provider"]["display"], "みなと病院");
        let overpaid = json!({"id": "c2", "month": "2024-02", "institution": "x",
            "total_yen": 1, "patient_paid_yen": 3});
        assert!(map_medical_cost(&overpaid, PATIENT).is_err());
        assert!(map_medical_cost(&json!({"id": "c3", "month": "2024-13", "institution": "x", "total_yen": 1, "patient_paid_yen": 0}), PATIENT).is_err());
    }

    #[test]
    fn checkup_documents() {
        let listing = checkup_listing(&json!({"id": "k1", "date": "2024-07-01",
            "institution": "みなと健診センター", "document_url": "https://p.example/d/k1"}))
        .expect("listing");
        let document = br#"<?xml version="1.0" encoding="UTF-8"?><ClinicalDocument xmlns="urn:hl7-org:v3"></ClinicalDocument>"#;
        let resource = map_checkup_document(&listing, document, PATIENT).expect("maps");
        assert_eq!(resource.id, "chk-k1");
        let attachment = &resource.body["content"][0]["attachment"];
        assert_eq!(attachment["contentType"], CDA_CONTENT_TYPE);
        assert_eq!(
            STANDARD
                .decode(attachment["data"].as_str().expect("data"))
                .expect("base64"),
            document
        );
        assert!(map_withdrawn_checkup(&listing, PATIENT).is_err());
        let mut withdrawn = listing.clone();
        withdrawn.header.entered_in_error = true;
        withdrawn.header.version = 2;
        let resource = map_withdrawn_checkup(&withdrawn, PATIENT).expect("kept");
        assert_eq!(resource.body["status"], "entered-in-error");
        assert_eq!(resource.body["meta"]["versionId"], "2");
        assert!(resource.body["content"][0]["attachment"]
            .get("data")
            .is_none());
        for bad in [
            &b"<html><body>maintenance</body></html>"[..],
            b"{\"x\":1}",
            b"<ClinicalDocument xmlns=\"urn:hl7-org:v3\">",
            &[0xff, 0xfe],
        ] {
            assert!(map_checkup_document(&listing, bad, PATIENT).is_err());
        }
    }

    #[test]
    fn record_headers() {
        assert!(record_header(&json!([])).is_err());
        assert!(record_header(&json!({"id": "a/b"})).is_err());
        assert!(record_header(&json!({"id": "a", "version": 0})).is_err());
        let header = record_header(&json!({"id": 7, "version": "3"})).expect("header");
        assert_eq!((header.id.as_str(), header.version), ("7", 3));
    }
}
