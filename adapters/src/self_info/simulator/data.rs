//! Deterministic portal records: the same seed gives the same persons, subjects, records,
//! ids and `available_at` times, whatever else happens in the simulator.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::self_info::Category;

/// 2024-04-01T00:00:00Z: generated records become available from here on, a minute apart.
const EPOCH_UNIX: i64 = 1_711_929_600;

const FAMILY_NAMES: &[&str] = &["山田", "佐藤", "鈴木", "高橋", "田中", "伊藤"];
const ADULT_GIVEN: &[&str] = &["太郎", "花子", "健一", "美咲"];
const CHILD_GIVEN: &[&str] = &["陽向", "結衣", "蓮", "芽依"];
const MUNICIPALITIES: &[&str] = &["東京都港区", "大阪市北区", "札幌市中央区"];
const PHARMACIES: &[(&str, &str)] = &[("みなと薬局", "1341234567"), ("さくら薬局", "2741234568")];
const CLINICS: &[(&str, &str)] = &[
    ("みなと内科クリニック", "1311234567"),
    ("さくら病院", "2711234568"),
];

/// (HOT9, YJ, 一般名処方コード, 名称, 単位, 用法)
const DRUGS: &[(&str, &str, &str, &str, &str, &str)] = &[
    (
        "111226401",
        "2171022F2020",
        "2171022F2ZZZ",
        "アムロジピン錠５ｍｇ",
        "錠",
        "１日１回朝食後",
    ),
    (
        "107714301",
        "1149019F1560",
        "1149019F1ZZZ",
        "ロキソプロフェンナトリウム錠６０ｍｇ",
        "錠",
        "疼痛時",
    ),
    (
        "103835401",
        "2233002F1030",
        "2233002F1ZZZ",
        "カルボシステイン錠２５０ｍｇ",
        "錠",
        "１日３回毎食後",
    ),
    (
        "105271807",
        "3962002F1010",
        "3962002F1ZZZ",
        "メトホルミン塩酸塩錠２５０ｍｇ",
        "錠",
        "１日２回朝夕食後",
    ),
];

/// (HOT9, 名称) of vaccines.
const VACCINES: &[(&str, &str)] = &[
    ("113019501", "インフルエンザＨＡワクチン"),
    ("111501701", "肺炎球菌ワクチン"),
    ("116203101", "ＢＣＧワクチン"),
];

/// One person known to the portal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortalPerson {
    /// 1-based.
    pub number: usize,
    /// The opaque, provider-specific id the token response names (never the My Number).
    pub subject: String,
    /// What the simulated card reader "reads", and the 4-digit PIN that unlocks it.
    pub card_number: String,
    pub pin: String,
    pub display_name: String,
    /// Children are represented by a parent (proxy, 代理人) and have 乳幼児健診 records.
    pub is_child: bool,
    /// The persons (by number) this person may act for as a registered proxy.
    pub represents: Vec<usize>,
}

/// One record, in its latest version.
#[derive(Debug, Clone)]
pub(crate) struct PortalRecord {
    pub(crate) category: Category,
    pub(crate) id: String,
    pub(crate) version: u64,
    pub(crate) available_at: OffsetDateTime,
    pub(crate) entered_in_error: bool,
    /// The category-specific fields (everything but id, version, status, available_at).
    pub(crate) fields: Value,
    /// The hc08 CDA document of a 特定健診 record.
    pub(crate) document: Option<String>,
}

impl PortalRecord {
    /// The record as the list endpoint sends it.
    pub(crate) fn to_json(&self, base_url: &str) -> Value {
        let mut item = self.fields.clone();
        item["id"] = json!(self.id);
        item["version"] = json!(self.version);
        item["available_at"] = json!(format_instant(self.available_at));
        if self.entered_in_error {
            item["status"] = json!("entered-in-error");
        }
        if self.category == Category::SpecificCheckup {
            item["document_url"] = json!(format!("{base_url}/v1/checkups/{}/document", self.id));
        }
        item
    }

    /// The keyset position of the record in a list (`available_at`, then id).
    pub(crate) fn page_key(&self) -> (i128, String) {
        (self.available_at.unix_timestamp_nanos(), self.id.clone())
    }
}

pub(crate) fn format_instant(instant: OffsetDateTime) -> String {
    instant.format(&Rfc3339).unwrap_or_default()
}

pub(crate) struct Store {
    pub(crate) persons: Vec<PortalPerson>,
    /// Subject → that person's records, latest versions only.
    pub(crate) records: HashMap<String, Vec<PortalRecord>>,
    /// Minutes after the epoch of the next record to become available.
    next_minute: i64,
    next_serial: u64,
}

impl Store {
    pub(crate) fn generate(seed: u64, persons: usize) -> Store {
        let mut store = Store {
            persons: Vec::new(),
            records: HashMap::new(),
            next_minute: 0,
            next_serial: 1,
        };
        for number in 1..=persons {
            let person = make_person(seed, number, persons);
            store.persons.push(person);
        }
        for number in 1..=persons {
            let mut rng =
                StdRng::seed_from_u64(seed ^ (number as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            store.generate_records_of(number, &mut rng);
        }
        store
    }

    pub(crate) fn person(&self, number: usize) -> Option<&PortalPerson> {
        self.persons.get(number.checked_sub(1)?)
    }

    pub(crate) fn person_by_card(&self, card_number: &str) -> Option<&PortalPerson> {
        self.persons
            .iter()
            .find(|person| person.card_number == card_number)
    }

    fn next_available_at(&mut self) -> OffsetDateTime {
        let minute = self.next_minute;
        self.next_minute += 1;
        OffsetDateTime::from_unix_timestamp(EPOCH_UNIX + minute * 60)
            .unwrap_or(OffsetDateTime::UNIX_EPOCH)
    }

    fn next_id(&mut self, prefix: &str) -> String {
        let serial = self.next_serial;
        self.next_serial += 1;
        format!("{prefix}{serial:06}")
    }

    fn push(
        &mut self,
        subject: &str,
        category: Category,
        fields: Value,
        document: Option<String>,
    ) -> String {
        let prefix = match category {
            Category::SpecificCheckup => "K",
            Category::Medication => "M",
            Category::Immunization => "V",
            Category::InfantCheckup => "I",
            Category::MedicalCost => "C",
            Category::SchoolCheckup => "S",
        };
        let id = self.next_id(prefix);
        let available_at = self.next_available_at();
        self.records
            .entry(subject.to_string())
            .or_default()
            .push(PortalRecord {
                category,
                id: id.clone(),
                version: 1,
                available_at,
                entered_in_error: false,
                fields,
                document,
            });
        id
    }

    fn generate_records_of(&mut self, number: usize, rng: &mut StdRng) {
        let Some(person) = self.person(number).cloned() else {
            return;
        };
        let subject = person.subject.clone();
        for index in 0..3 {
            let fields = medication_fields(rng, index);
            self.push(&subject, Category::Medication, fields, None);
        }
        for dose in 1..=2u64 {
            let (code, name) = VACCINES[rng.gen_range(0..VACCINES.len())];
            let fields = json!({
                "date": clinical_date(rng),
                "vaccine": {"code": code, "code_system": "HOT9", "name": name},
                "dose_number": dose,
                "lot": format!("L{:06}", rng.gen_range(0..1_000_000)),
                "municipality": MUNICIPALITIES[rng.gen_range(0..MUNICIPALITIES.len())],
            });
            self.push(&subject, Category::Immunization, fields, None);
        }
        for month in 1..=3u32 {
            let total: u64 = rng.gen_range(20..400) * 100;
            let (institution, _) = CLINICS[rng.gen_range(0..CLINICS.len())];
            let fields = json!({
                "month": format!("2024-{month:02}"),
                "institution": institution,
                "days": rng.gen_range(1..5),
                "total_yen": total,
                "patient_paid_yen": total * 3 / 10,
            });
            self.push(&subject, Category::MedicalCost, fields, None);
        }
        if person.is_child {
            for age_months in [4u64, 18] {
                let fields = json!({
                    "date": clinical_date(rng),
                    "age_months": age_months,
                    "measurements": measurements(rng, age_months),
                });
                self.push(&subject, Category::InfantCheckup, fields, None);
            }
            let fields = json!({
                "date": clinical_date(rng),
                "measurements": measurements(rng, 84),
            });
            self.push(&subject, Category::SchoolCheckup, fields, None);
        } else {
            let date = clinical_date(rng);
            let (institution, code) = CLINICS[rng.gen_range(0..CLINICS.len())];
            let height = rng.gen_range(1500..1850) as f64 / 10.0;
            let weight = rng.gen_range(450..900) as f64 / 10.0;
            let document = checkup_document(&person, &date, institution, code, height, weight);
            let fields = json!({"date": date, "institution": institution});
            self.push(&subject, Category::SpecificCheckup, fields, Some(document));
        }
        // Every person has a corrected dispensing record (version 2) and a withdrawn
        // vaccination, as the portal would send them after the fact.
        let first_medication = self.first_id(&subject, Category::Medication);
        if let Some(id) = first_medication {
            self.correct(&subject, &id);
        }
        let last_immunization = self
            .records
            .get(&subject)
            .and_then(|records| {
                records
                    .iter()
                    .rev()
                    .find(|record| record.category == Category::Immunization)
            })
            .map(|record| record.id.clone());
        if let Some(id) = last_immunization {
            self.withdraw(&subject, &id);
        }
    }

    fn first_id(&self, subject: &str, category: Category) -> Option<String> {
        self.records
            .get(subject)?
            .iter()
            .find(|record| record.category == category)
            .map(|record| record.id.clone())
    }

    fn record_mut(&mut self, subject: &str, id: &str) -> Option<&mut PortalRecord> {
        self.records
            .get_mut(subject)?
            .iter_mut()
            .find(|record| record.id == id)
    }

    /// Publishes a corrected version of a record: same id, version + 1, available now.
    /// For dispensing records the first item's quantity changes. Returns the new version.
    pub(crate) fn correct(&mut self, subject: &str, id: &str) -> Option<u64> {
        let available_at = self.next_available_at();
        let record = self.record_mut(subject, id)?;
        record.version += 1;
        record.available_at = available_at;
        if let Some(quantity) = record.fields["items"][0]["quantity"].as_f64() {
            record.fields["items"][0]["quantity"] = json!(quantity + 7.0);
        }
        Some(record.version)
    }

    /// Withdraws a record: version + 1 with `status: entered-in-error`.
    pub(crate) fn withdraw(&mut self, subject: &str, id: &str) -> Option<u64> {
        let available_at = self.next_available_at();
        let record = self.record_mut(subject, id)?;
        record.version += 1;
        record.available_at = available_at;
        record.entered_in_error = true;
        Some(record.version)
    }

    /// A new dispensing record, available after everything so far. Returns its id.
    pub(crate) fn add_medication(&mut self, subject: &str, seed: u64) -> String {
        let mut rng = StdRng::seed_from_u64(seed ^ self.next_serial);
        let fields = medication_fields(&mut rng, self.next_serial as usize);
        self.push(subject, Category::Medication, fields, None)
    }
}

fn make_person(seed: u64, number: usize, persons: usize) -> PortalPerson {
    let digest = Sha256::digest(format!("{seed}:{number}:subject").as_bytes());
    // Opaque, and shaped to be a valid FHIR id.
    let subject: String = std::iter::once("p".to_string())
        .chain(digest.iter().take(10).map(|byte| format!("{byte:02x}")))
        .collect();
    // Even numbers (low bit clear; `is_multiple_of` is newer than our MSRV).
    let is_child = number & 1 == 0;
    let family = FAMILY_NAMES[(number - 1) / 2 % FAMILY_NAMES.len()];
    let given = if is_child {
        CHILD_GIVEN[number / 2 % CHILD_GIVEN.len()]
    } else {
        ADULT_GIVEN[number / 2 % ADULT_GIVEN.len()]
    };
    // Each odd-numbered adult is the registered proxy of the next person, a child.
    let represents = if !is_child && number < persons {
        vec![number + 1]
    } else {
        Vec::new()
    };
    PortalPerson {
        number,
        subject,
        card_number: format!("card-{number:04}"),
        pin: format!("{:04}", (number * 7919) % 10_000),
        display_name: format!("{family} {given}"),
        is_child,
        represents,
    }
}

fn clinical_date(rng: &mut StdRng) -> String {
    format!(
        "2024-{:02}-{:02}",
        rng.gen_range(1..=3),
        rng.gen_range(1..=28)
    )
}

/// Two items per dispensing record, their codes in YJ, HOT9 and 一般名 in turn (record
/// `index` starts at the index-th system, so three records use all three twice).
fn medication_fields(rng: &mut StdRng, index: usize) -> Value {
    let (pharmacy, pharmacy_code) = PHARMACIES[rng.gen_range(0..PHARMACIES.len())];
    let (clinic, clinic_code) = CLINICS[rng.gen_range(0..CLINICS.len())];
    let first_system = index % 3;
    let items: Vec<Value> = (0..2)
        .map(|position| {
            let (hot9, yj, general, name, unit, usage) = DRUGS[rng.gen_range(0..DRUGS.len())];
            let days: u64 = rng.gen_range(7..=30);
            let (code_system, code) = match (first_system + position) % 3 {
                0 => ("YJ", yj),
                1 => ("HOT9", hot9),
                _ => ("general-name", general),
            };
            json!({
                "drug_code": code,
                "code_system": code_system,
                "name": name,
                "quantity": days * 2,
                "unit": unit,
                "days": days,
                "usage": usage,
            })
        })
        .collect();
    json!({
        "dispensed_on": clinical_date(rng),
        "pharmacy": {"name": pharmacy, "code": pharmacy_code},
        "prescriber": {"name": clinic, "code": clinic_code},
        "items": items,
    })
}

/// 身長, 体重 (特定健診項目コード) and 頭囲 (no such code: the portal's own) by age.
fn measurements(rng: &mut StdRng, age_months: u64) -> Value {
    let height = 60.0 + age_months as f64 * 0.9 + rng.gen_range(0..30) as f64 / 10.0;
    let weight = 6.0 + age_months as f64 * 0.2 + rng.gen_range(0..10) as f64 / 10.0;
    let head = 40.0 + rng.gen_range(0..80) as f64 / 10.0;
    json!([
        {"code": "9N001000000000001", "name": "身長", "value": height, "unit": "cm"},
        {"code": "9N006000000000001", "name": "体重", "value": weight, "unit": "kg"},
        {"code": "HEAD-CIRC", "name": "頭囲", "value": head, "unit": "cm"},
    ])
}

fn xml_escape(value: &str) -> String {
    value
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A small hc08 document following the MHLW template, valid against the hc08 schema:
/// header (報告区分 10 = 特定健診, the person's insurance card, 作成機関, 実施日 and
/// 実施機関) and one section with 身長, 体重, 医師の診断(判定) and 健康診断を実施した医師の氏名.
/// Not a complete report. Birth dates and
/// card numbers are derived from the person's number; persons 1, 5, 9, … are insured by a
/// 市町村国保 (a six-digit 保険者番号, zero-padded to eight as 特定健診 data writes it), the
/// other adults by a 健康保険組合 (法別番号 06).
fn checkup_document(
    person: &PortalPerson,
    date: &str,
    institution: &str,
    institution_code: &str,
    height: f64,
    weight: f64,
) -> String {
    let compact_date = date.replace('-', "");
    let name = xml_escape(&person.display_name);
    let institution = xml_escape(institution);
    let birth = format!("{}0401", 1950 + person.number % 40);
    let sex = if person.number.is_multiple_of(2) {
        "2"
    } else {
        "1"
    };
    let insurer = if person.number % 4 == 1 {
        format!("{:08}", 130_000 + person.number)
    } else {
        format!("{:08}", 6_130_000 + person.number)
    };
    let card_number = format!("{}", 100_000 + person.number);
    let doctor = ["健診 太郎", "検査 花子", "保健 一郎"][person.number % 3];
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<ClinicalDocument xmlns="urn:hl7-org:v3" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xsi:schemaLocation="urn:hl7-org:v3 ../XSD/hc08_V08.xsd">
  <typeId root="2.16.840.1.113883.1.3" extension="POCD_HD000040"/>
  <id nullFlavor="NI"/>
  <code code="10" codeSystem="1.2.392.200119.6.1001"/>
  <effectiveTime value="{compact_date}"/>
  <confidentialityCode code="N"/>
  <recordTarget><patientRole>
    <id extension="{insurer}" root="1.2.392.200119.6.101"/>
    <id extension="記号{number}" root="1.2.392.200119.6.204"/>
    <id extension="{card_number}" root="1.2.392.200119.6.205"/>
    <id extension="00" root="1.2.392.200119.6.211"/>
    <addr><postalCode>100-0001</postalCode>東京都千代田区</addr>
    <patient><name>{name}</name><administrativeGenderCode code="{sex}" codeSystem="1.2.392.200119.6.1104"/><birthTime value="{birth}"/></patient>
  </patientRole></recordTarget>
  <author><time value="{compact_date}"/><assignedAuthor><id nullFlavor="NI"/><representedOrganization><id extension="{institution_code}" root="1.2.392.200119.6.102"/><name>{institution}</name></representedOrganization></assignedAuthor></author>
  <custodian><assignedCustodian><representedCustodianOrganization><id nullFlavor="NI"/></representedCustodianOrganization></assignedCustodian></custodian>
  <documentationOf><serviceEvent><code code="1" codeSystem="1.2.392.200119.6.1002"/><effectiveTime value="{compact_date}"/>
    <performer typeCode="PRF"><assignedEntity><id nullFlavor="NI"/><representedOrganization><id extension="{institution_code}" root="1.2.392.200119.6.102"/><name>{institution}</name></representedOrganization></assignedEntity></performer>
  </serviceEvent></documentationOf>
  <component><structuredBody><component><section>
    <code code="01010" codeSystem="1.2.392.200119.6.1010" displayName="身体計測"/>
    <title>身体計測</title>
    <text><list><item>身長 {height:.1} cm</item><item>体重 {weight:.1} kg</item><item>医師の診断 異常なし</item><item>医師の氏名 {doctor}</item></list></text>
    <entry><observation classCode="OBS" moodCode="EVN"><code code="9N001000000000001" codeSystem="1.2.392.200119.6.1005" displayName="身長"/><value xsi:type="PQ" value="{height:.1}" unit="cm"/></observation></entry>
    <entry><observation classCode="OBS" moodCode="EVN"><code code="9N006000000000001" codeSystem="1.2.392.200119.6.1005" displayName="体重"/><value xsi:type="PQ" value="{weight:.1}" unit="kg"/></observation></entry>
    <entry><observation classCode="OBS" moodCode="EVN"><code code="9N511000000000049" codeSystem="1.2.392.200119.6.1005" displayName="医師の診断(判定)"/><value xsi:type="ST">異常なし</value></observation></entry>
    <entry><observation classCode="OBS" moodCode="EVN"><code code="9N516000000000049" codeSystem="1.2.392.200119.6.1005" displayName="健康診断を実施した医師の氏名"/><value xsi:type="ST">{doctor}</value></observation></entry>
  </section></component></structuredBody></component>
</ClinicalDocument>
"#,
        number = person.number,
    )
}

#[cfg(test)]
mod unit_tests {
    use super::*;
    use crate::self_info::mapping;

    #[test]
    fn same_seed_same_data_and_every_record_maps() {
        let first = Store::generate(5, 4);
        let again = Store::generate(5, 4);
        assert_eq!(first.persons, again.persons);
        for person in &first.persons {
            assert!(
                crate::fhir_r4::smart::is_fhir_id(&person.subject),
                "{}",
                person.subject
            );
            let records = &first.records[&person.subject];
            let records_again = &again.records[&person.subject];
            assert_eq!(records.len(), records_again.len());
            for record in records {
                let item = record.to_json("http://127.0.0.1:1");
                if record.category == Category::SpecificCheckup {
                    let listing = mapping::checkup_listing(&item).expect("listing");
                    let document = record.document.as_deref().unwrap_or_default();
                    crate::tokutei_cda::validate(document.as_bytes())
                        .expect("the simulator's 特定健診 documents pass the hc08 schema");
                    let parsed = crate::tokutei_cda::parse(document.as_bytes()).expect("parses");
                    let conversion =
                        crate::tokutei_cda::to_fhir_bundle(&parsed, document.as_bytes());
                    assert!(
                        conversion.item_errors.is_empty(),
                        "{:?}",
                        conversion.item_errors
                    );
                    mapping::map_checkup_document(&listing, document.as_bytes(), &person.subject)
                        .expect("document maps");
                } else {
                    for mapped in mapping::map_record(record.category, &item, &person.subject) {
                        mapped.expect("generated records map");
                    }
                }
            }
        }
        assert_eq!(first.persons[0].represents, vec![2]);
        assert!(first.persons[1].is_child);
    }
}
