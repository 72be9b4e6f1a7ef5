//! Maps a [`CheckupDocument`] to a 健康診断結果報告書 FHIR `document` Bundle shaped like the
//! JP eCheckupReport IG (profiles `JP_*_eCheckupGeneral`).
//!
//! Ids are deterministic: `urn:uuid:` + a UUID-shaped SHA-256 of the document key (its id,
//! or the hash of the original bytes when the id is a nullFlavor) and the resource's local
//! name, so the same document always gives the same Bundle.
//!
//! What the profiles require and hc08 does not state is derived, never guessed: every
//! entry's `meta.lastUpdated` is the document's date (the Bundle's timestamp), the
//! Composition is version "1" and identified like the Bundle, the Patient by its 被保険者
//! 個人識別子, and the insurance Coverage's 保険種別 and 被保険者区分 come from the
//! insurer's number, and the Practitioner the profile requires is the doctor the report
//! names (9N516000000000049 健康診断を実施した医師の氏名). A resource that cannot be given
//! what its profile requires (a Patient without a card, a Coverage whose 被保険者区分 the
//! number does not tell, a 受診券 without its number) claims only what it meets, and so does
//! the Bundle: it claims JP_Bundle_eCheckupGeneral only when its entries fill that profile's
//! slices (see [`bundle_profile_gaps`]).

use base64::Engine;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use super::error::{ItemError, ItemErrorReason};
use super::items::{ItemDefinition, ItemTable, ValueType, ITEM_CODE_OID, METHOD_CODE_OID};
use super::model::*;

const UCUM: &str = "http://unitsofmeasure.org";
const OBSERVATION_PROFILE: &str =
    "http://jpfhir.jp/fhir/eCheckup/StructureDefinition/JP_Observation_eCheckupGeneral";
const ITEM_CODE_SYSTEM: &str = "urn:oid:1.2.392.200119.6.1005";
const CATEGORY_SYSTEM: &str =
    "http://jpfhir.jp/fhir/core/CodeSystem/JP_SimpleObservationCategory_CS";
const SECTION_SYSTEM: &str = "http://jpfhir.jp/fhir/eCheckup/CodeSystem/section-code";
const SECTION_CODE_OID: &str = "1.2.392.200119.6.1010";
const INTERPRETATION_OID: &str = "2.16.840.1.113883.5.83";
const RESOURCE_INSTANCE_ID: &str =
    "http://jpfhir.jp/fhir/core/IdSystem/resourceInstance-identifier";
const VERSION_NUMBER_EXTENSION: &str =
    "http://hl7.org/fhir/StructureDefinition/composition-clinicaldocument-versionNumber";
const PATIENT_PROFILE: &str = "http://jpfhir.jp/fhir/eCS/StructureDefinition/JP_Patient_eCS";
/// JP-CLINS's system of the 被保険者個人識別子.
const INSURANCE_MEMBER_ID: &str = "http://jpfhir.jp/fhir/clins/Idsystem/JP_Insurance_memberID";
/// JP Core's Coverage profile: what an insurance Coverage claims when it cannot meet the
/// eCheckup one (see [`insurance_scheme`]).
const JP_CORE_COVERAGE_PROFILE: &str = "http://jpfhir.jp/fhir/core/StructureDefinition/JP_Coverage";
/// 保険種別コード and 被保険者区分コード (電子処方箋 CDA 記述仕様 別表11, 別表12), the
/// systems JP_CoverageInsurance_eCheckupGeneral fixes.
const INSURANCE_CATEGORY_OID: &str = "urn:oid:1.2.392.100495.20.2.61";
const INSURED_PERSON_CATEGORY_OID: &str = "urn:oid:1.2.392.100495.20.2.62";
const PRACTITIONER_PROFILE: &str =
    "http://jpfhir.jp/fhir/eCheckup/StructureDefinition/JP_Practitioner_eCheckupGeneral";
const BUNDLE_PROFILE: &str =
    "http://jpfhir.jp/fhir/eCheckup/StructureDefinition/JP_Bundle_eCheckupGeneral";
const COMPOSITION_PROFILE: &str =
    "http://jpfhir.jp/fhir/eCheckup/StructureDefinition/JP_Composition_eCheckupGeneral";
const ORGANIZATION_INSURER_PROFILE: &str =
    "http://jpfhir.jp/fhir/eCheckup/StructureDefinition/JP_OrganizationInsurer_eCheckupGeneral";
const ORGANIZATION_PROFILE: &str =
    "http://jpfhir.jp/fhir/eCheckup/StructureDefinition/JP_Organization_eCheckupGeneral";
const ENCOUNTER_PROFILE: &str =
    "http://jpfhir.jp/fhir/eCheckup/StructureDefinition/JP_Encounter_eCheckupGeneral";
const COVERAGE_SERVICE_PROFILE: &str =
    "http://jpfhir.jp/fhir/eCheckup/StructureDefinition/JP_CoverageService_eCheckupGeneral";
const COVERAGE_INSURANCE_PROFILE: &str =
    "http://jpfhir.jp/fhir/eCheckup/StructureDefinition/JP_CoverageInsurance_eCheckupGeneral";
/// 健康診断を実施した医師の氏名 (ST, 64 characters): the one person the report names.
const DOCTOR_NAME_ITEM: &str = "9N516000000000049";
/// How a name is written (ideographic, syllabic), as JP Core and the IG's sample mark it.
const NAME_REPRESENTATION_EXTENSION: &str =
    "http://hl7.org/fhir/StructureDefinition/iso21090-EN-representation";
/// Media type of an HL7 v3 (CDA) document, used for the original in the DocumentReference.
pub const CDA_CONTENT_TYPE: &str = "application/hl7-v3+xml";

/// The Bundle, and the items that could not be converted (left out of the Bundle).
#[derive(Debug, Clone)]
pub struct Conversion {
    pub bundle: Value,
    pub item_errors: Vec<ItemError>,
}

pub(crate) fn convert(doc: &CheckupDocument, original_xml: &[u8]) -> Conversion {
    let key = match &doc.document_id {
        Some(id) => format!("{}^{}", id.root, id.extension.as_deref().unwrap_or("")),
        None => format!("sha256:{}", hex(&Sha256::digest(original_xml))),
    };
    let mut b = Builder {
        key,
        doc,
        // Results plus the dozen header resources: sized once, grown never.
        entries: Vec::with_capacity(doc.observations().count() + 12),
        item_errors: Vec::new(),
    };
    b.build(original_xml);
    Conversion {
        bundle: b.finish(),
        item_errors: b.item_errors,
    }
}

struct Builder<'a> {
    key: String,
    doc: &'a CheckupDocument,
    entries: Vec<(String, Value)>,
    item_errors: Vec<ItemError>,
}

/// One converted result, before it is placed (standalone, member, or component).
struct Converted<'a> {
    observation: &'a Observation,
    definition: &'a ItemDefinition,
    value: Map<String, Value>,
}

impl<'a> Builder<'a> {
    fn url(&self, local: &str) -> String {
        deterministic_uuid(&self.key, local)
    }

    fn push(&mut self, url: String, resource: Value) {
        self.entries.push((url, resource));
    }

    fn build(&mut self, original_xml: &[u8]) {
        let doc = self.doc;
        let patient_url = self.url("Patient");
        let institution_url = self.url("Organization/institution");
        let author_same_as_institution = doc.author.organization.number.is_none()
            || doc.author.organization.number == doc.institution.number;
        let author_url = if author_same_as_institution {
            institution_url.clone()
        } else {
            self.url("Organization/author")
        };
        let doctors: Vec<(String, Value)> = doctor_names(doc)
            .into_iter()
            .enumerate()
            .map(|(index, name)| {
                (
                    self.url(&format!("Practitioner/{index}")),
                    practitioner(name),
                )
            })
            .collect();
        let encounter_url = self.url("Encounter");
        let document_reference_url = self.url("DocumentReference");
        let checkup_date = doc
            .checkup_date
            .clone()
            .unwrap_or_else(|| doc.effective_date.clone());

        // Results first: the Composition lists them.
        let mut sections = Vec::new();
        for (index, section) in doc.sections.iter().enumerate() {
            let refs = self.section_results(
                index,
                section,
                &patient_url,
                &institution_url,
                &checkup_date,
            );
            sections.push((section, refs));
        }

        let mut section_json = Vec::new();
        for (section, (refs, lines)) in sections {
            let code = section.code.as_ref().map(|c| {
                let system = match c.system.as_deref() {
                    Some(SECTION_CODE_OID) | None => SECTION_SYSTEM.to_owned(),
                    Some(other) => format!("urn:oid:{other}"),
                };
                json!({"coding": [coding(&system, &c.code, c.display.as_deref())]})
            });
            let mut s = json!({
                "title": section.title.clone().unwrap_or_else(|| "健診結果".into()),
                "text": {"status": "generated", "div": narrative(&lines)},
                "entry": refs.iter().map(|r| json!({"reference": r})).collect::<Vec<_>>(),
            });
            if let Some(code) = code {
                s["code"] = code;
            }
            section_json.push(s);
        }
        section_json.push(json!({
            "title": "添付書類",
            "code": {"coding": [coding(SECTION_SYSTEM, "01995", Some("添付書類セクション"))]},
            "text": {"status": "generated", "div": narrative(&["特定健診情報ファイル (CDA)".to_owned()])},
            "entry": [{"reference": document_reference_url}],
        }));

        // The doctor first, then the organisation, as in the IG's sample.
        let mut authors: Vec<Value> = doctors
            .iter()
            .map(|(url, _)| json!({"reference": url}))
            .collect();
        authors.push(json!({"reference": author_url}));
        let mut composition = json!({
            "resourceType": "Composition",
            "meta": {"profile": [COMPOSITION_PROFILE]},
            "language": "ja",
            // The profile requires the document's version number. hc08 has none (its schema
            // has no `versionNumber`) and nothing in a file says it is a later edition, so it
            // is the first, "1" as the IG numbers a first edition.
            "extension": [{"url": VERSION_NUMBER_EXTENSION, "valueString": "1"}],
            // The same value as Bundle.identifier, as in the IG's sample.
            "identifier": {"system": RESOURCE_INSTANCE_ID, "value": self.document_identifier()},
            "status": "final",
            "type": {"coding": [coding("http://jpfhir.jp/fhir/Common/CodeSystem/doc-typecodes", "53576-5", Some("検診・健診報告書"))]},
            "subject": {"reference": patient_url},
            "encounter": {"reference": encounter_url},
            "date": doc.effective_date,
            "author": authors,
            "title": "健康診断結果報告書",
            "custodian": {"reference": author_url},
            "event": [{
                "period": {"start": checkup_date, "end": checkup_date},
                "detail": [{"reference": encounter_url}],
            }],
        });
        // Assigned, not interpolated: `json!` would copy the whole value by re-serialising it.
        composition["section"] = Value::Array(section_json);
        if let Some(category) = &doc.report_category {
            composition["category"] = json!([{"coding": [coding(
                "http://jpfhir.jp/fhir/eCheckup/CodeSystem/checkup-report-category",
                &category.code,
                category.display.as_deref(),
            )]}]);
        }
        if let Some(program) = &doc.program {
            composition["event"][0]["code"] = json!([{"coding": [coding(
                &oid_system(program.system.as_deref().unwrap_or("1.2.392.200119.6.1002")),
                &program.code,
                program.display.as_deref(),
            )]}]);
        }
        // The profile requires both; a document without them gets a plain Composition.
        if doc.report_category.is_none() || doc.program.is_none() {
            composition["meta"] = json!({});
        }
        let composition_url = self.url("Composition");
        self.entries.insert(0, (composition_url, composition));

        self.push(patient_url.clone(), patient(&doc.patient, &doc.insurance));
        self.push(
            institution_url.clone(),
            organization(&doc.institution, "prov"),
        );
        if !author_same_as_institution {
            self.push(author_url, organization(&doc.author.organization, "prov"));
        }
        for (url, practitioner) in doctors {
            self.push(url, practitioner);
        }
        self.push(encounter_url, json!({
            "resourceType": "Encounter",
            "meta": {"profile": [ENCOUNTER_PROFILE]},
            "status": "finished",
            "class": {"system": "http://jpfhir.jp/fhir/eCheckup/CodeSystem/encounter-category", "code": "checkup", "display": "健診"},
            "subject": {"reference": patient_url},
            "period": {"start": checkup_date, "end": checkup_date},
            "serviceProvider": {"reference": institution_url},
        }));
        self.coverages(&patient_url);
        let mut document_reference = json!({
            "resourceType": "DocumentReference",
            "status": "current",
            "type": {"coding": [coding("http://jpfhir.jp/fhir/Common/CodeSystem/doc-typecodes", "53576-5", Some("検診・健診報告書"))]},
            "subject": {"reference": patient_url},
            "description": "特定健診情報ファイル (HL7 CDA R2, hc08)",
            "content": [{"attachment": {
                "contentType": CDA_CONTENT_TYPE,
                "size": original_xml.len(),
                "title": "特定健診情報ファイル",
            }}],
        });
        document_reference["content"][0]["attachment"]["data"] =
            Value::String(base64::engine::general_purpose::STANDARD.encode(original_xml));
        self.push(document_reference_url, document_reference);
    }

    fn coverages(&mut self, patient_url: &str) {
        let doc = self.doc;
        let insurer_url = self.url("Organization/insurer");
        let ins = &doc.insurance;
        if let Some(insurer_number) = &ins.insurer_number {
            self.push(insurer_url.clone(), json!({
                "resourceType": "Organization",
                "meta": {"profile": [ORGANIZATION_INSURER_PROFILE]},
                "identifier": [{"system": "urn:oid:1.2.392.100495.20.3.61", "value": insurer_number}],
                "type": [{"coding": [coding("http://terminology.hl7.org/CodeSystem/organization-type", "ins", None)]}],
            }));
        }
        if ins.insurer_number.is_some() || ins.symbol.is_some() || ins.number.is_some() {
            let mut extension = Vec::new();
            for (name, value) in [
                ("JP_Coverage_InsuredPersonSymbol", &ins.symbol),
                ("JP_Coverage_InsuredPersonNumber", &ins.number),
                ("JP_Coverage_InsuredPersonSubNumber", &ins.branch),
            ] {
                if let Some(value) = value {
                    extension.push(json!({
                        "url": format!("http://jpfhir.jp/fhir/core/Extension/StructureDefinition/{name}"),
                        "valueString": value,
                    }));
                }
            }
            let mut coverage = json!({
                "resourceType": "Coverage",
                "meta": {"profile": [COVERAGE_INSURANCE_PROFILE]},
                "extension": extension,
                "status": "active",
                "beneficiary": {"reference": patient_url},
                "payor": [{"reference": insurer_url}],
            });
            // The profile requires the 保険種別 and the 被保険者区分, which hc08 does not
            // state: both are read from the insurer's number where it tells them.
            let scheme = ins.insurer_number.as_deref().and_then(insurance_scheme);
            if let Some(scheme) = &scheme {
                coverage["type"] = json!({"coding": [coding(INSURANCE_CATEGORY_OID, scheme.category, Some(scheme.category_name))]});
            }
            if scheme.as_ref().is_some_and(|scheme| scheme.no_dependants) {
                coverage["relationship"] =
                    json!({"coding": [coding(INSURED_PERSON_CATEGORY_OID, "1", Some("被保険者"))]});
            } else {
                // Whether the person is the insured or a dependant (被扶養者) is nowhere in
                // the document, and guessing would misstate it: without the 被保険者区分 the
                // Coverage cannot meet the eCheckup profile, so it claims JP Core's
                // JP_Coverage, which it does meet.
                coverage["meta"]["profile"] = json!([JP_CORE_COVERAGE_PROFILE]);
            }
            let subscriber: Vec<&str> = [&ins.symbol, &ins.number]
                .into_iter()
                .flatten()
                .map(String::as_str)
                .collect();
            if !subscriber.is_empty() {
                coverage["subscriberId"] = json!(subscriber.join(","));
            }
            if let Some(branch) = &ins.branch {
                coverage["dependent"] = json!(branch);
            }
            let url = self.url("Coverage/insurance");
            self.push(url, coverage);
        }
        if let Some(voucher) = &doc.voucher {
            let mut coverage = json!({
                "resourceType": "Coverage",
                "meta": {"profile": [COVERAGE_SERVICE_PROFILE]},
                "status": "active",
                "type": {"coding": [coding("urn:oid:1.2.392.200119.6.208", "1", None)]},
                "beneficiary": {"reference": patient_url},
                "payor": [{"reference": insurer_url}],
            });
            match &voucher.number {
                Some(number) => coverage["subscriberId"] = json!(number),
                // The profile requires the 受診券番号; without it the Coverage is plain.
                None => coverage["meta"] = json!({}),
            }
            if let Some(end) = &voucher.valid_until {
                coverage["period"] = json!({"end": end});
            }
            let url = self.url("Coverage/voucher");
            self.push(url, coverage);
        }
    }

    /// Converts one section's results; returns the Observation references and narrative lines.
    fn section_results(
        &mut self,
        section_index: usize,
        section: &'a Section,
        patient_url: &str,
        performer_url: &str,
        checkup_date: &str,
    ) -> (Vec<String>, Vec<String>) {
        let table = ItemTable::get();
        let observations = &section.observations;
        // Linear scans, not maps: a section has tens of results, and avoiding the extra
        // allocations is measurably faster.
        let position = |code: &str| observations.iter().position(|o| o.code.code == code);
        // Items that qualify another item present in the section (具体的な既往歴 → 既往歴)
        // become components of it, as in the IG's sample.
        // A chain (結果3 → 結果2 → 結果1) goes to its first item.
        let root_of = |code: &str| -> Option<usize> {
            let mut current = code;
            let mut root = None;
            for _ in 0..8 {
                let Some(parent) = table.lookup(current).and_then(|d| d.depends_on) else {
                    break;
                };
                match position(parent) {
                    Some(i) if parent != code => {
                        root = Some(i);
                        current = parent;
                    }
                    _ => break,
                }
            }
            root
        };
        let mut components: Vec<(usize, Converted<'a>)> = Vec::new();
        let mut standalone: Vec<(Option<usize>, Converted<'a>)> =
            Vec::with_capacity(observations.len());
        for (index, observation) in observations.iter().enumerate() {
            let Some(converted) = self.check(observation, table) else {
                continue;
            };
            match root_of(&observation.code.code) {
                Some(root) => components.push((root, converted)),
                None => standalone.push((Some(index), converted)),
            }
        }
        // Components whose root failed its own check stand alone rather than being lost.
        let (mut kept, orphans): (Vec<_>, Vec<_>) = components
            .into_iter()
            .partition(|(root, _)| standalone.iter().any(|(index, _)| *index == Some(*root)));
        standalone.extend(orphans.into_iter().map(|(_, converted)| (None, converted)));
        let mut refs = Vec::with_capacity(standalone.len());
        let mut lines = Vec::with_capacity(standalone.len());
        for (index, converted) in standalone {
            let mut own_components = Vec::new();
            let mut i = 0;
            while i < kept.len() {
                if Some(kept[i].0) == index {
                    own_components.push(kept.remove(i).1);
                } else {
                    i += 1;
                }
            }
            let path = format!("{section_index}/{}", converted.observation.code.code);
            let url = self.observation(
                path,
                converted,
                own_components,
                patient_url,
                performer_url,
                checkup_date,
                &mut lines,
            );
            refs.push(url);
        }
        (refs, lines)
    }

    /// Writes one Observation (and its group members) and returns its fullUrl.
    #[allow(clippy::too_many_arguments)]
    fn observation(
        &mut self,
        path: String,
        converted: Converted<'a>,
        components: Vec<Converted<'a>>,
        patient_url: &str,
        performer_url: &str,
        checkup_date: &str,
        lines: &mut Vec<String>,
    ) -> String {
        let table = ItemTable::get();
        let o = converted.observation;
        let d = converted.definition;
        let url = self.url(&format!("Observation/{path}/{}", o.line));
        // Built key by key: this is the hot path, and `json!` re-serialises nested values.
        let mut resource = object([
            ("resourceType", Value::from("Observation")),
            (
                "meta",
                object([(
                    "profile",
                    Value::Array(vec![Value::from(OBSERVATION_PROFILE)]),
                )]),
            ),
            ("status", Value::from("final")),
            (
                "category",
                Value::Array(vec![codeable(coding(
                    CATEGORY_SYSTEM,
                    category_code(d.category_number),
                    None,
                ))]),
            ),
            (
                "code",
                codeable(coding(ITEM_CODE_SYSTEM, d.code, Some(d.name))),
            ),
            ("subject", reference(patient_url)),
            (
                "effectiveDateTime",
                Value::from(o.effective_date.as_deref().unwrap_or(checkup_date)),
            ),
            ("performer", Value::Array(vec![reference(performer_url)])),
        ]);
        lines.push(format!("{} {}", d.name, summary(&converted.value)));
        let map = resource.as_object_mut();
        if let Some(map) = map {
            map.extend(converted.value);
            if let Some(method) = o.methods.first() {
                let system = oid_system(method.system.as_deref().unwrap_or(METHOD_CODE_OID));
                map.insert(
                    "method".into(),
                    json!({"coding": [coding(&system, &method.code, method.display.as_deref())]}),
                );
            }
            if !o.interpretations.is_empty() {
                let codings: Vec<Value> = o
                    .interpretations
                    .iter()
                    .map(|i| {
                        let system = match i.system.as_deref() {
                            Some(INTERPRETATION_OID) | None => {
                                "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
                                    .to_owned()
                            }
                            Some(other) => oid_system(other),
                        };
                        codeable(coding(&system, &i.code, i.display.as_deref()))
                    })
                    .collect();
                map.insert("interpretation".into(), Value::Array(codings));
            }
            if let Some(range) = &o.reference_range {
                let mut r = Map::new();
                for (name, bound) in [("low", &range.low), ("high", &range.high)] {
                    if let Some(quantity) = bound
                        .as_deref()
                        .and_then(|v| quantity(v, range.unit.as_deref(), d))
                    {
                        r.insert(name.into(), quantity);
                    }
                }
                if !r.is_empty() {
                    map.insert("referenceRange".into(), json!([r]));
                }
            }
            if !components.is_empty() {
                let list: Vec<Value> = components
                    .into_iter()
                    .map(|c| {
                        let mut component = Map::new();
                        component.insert(
                            "code".into(),
                            codeable(coding(
                                ITEM_CODE_SYSTEM,
                                c.definition.code,
                                Some(c.definition.name),
                            )),
                        );
                        component.extend(c.value);
                        Value::Object(component)
                    })
                    .collect();
                map.insert("component".into(), Value::Array(list));
            }
        }
        // Group members (一連検査グループ) are Observations of their own, linked by hasMember;
        // a member that only qualifies the group (e.g. a reason) still gets its own resource.
        let mut members = Vec::new();
        for (index, (_relation, member)) in o.members.iter().enumerate() {
            if let Some(converted_member) = self.check(member, table) {
                let member_url = self.observation(
                    format!("{path}/{index}"),
                    converted_member,
                    Vec::new(),
                    patient_url,
                    performer_url,
                    checkup_date,
                    lines,
                );
                members.push(json!({"reference": member_url}));
            }
        }
        if !members.is_empty() {
            resource["hasMember"] = Value::Array(members);
        }
        self.push(url.clone(), resource);
        url
    }

    /// Checks one result against the item table and builds its value; a result that does not
    /// fit is recorded as an item error and left out.
    fn check(&mut self, o: &'a Observation, table: &'a ItemTable) -> Option<Converted<'a>> {
        let fail = |reason| ItemError {
            item_code: o.code.code.clone(),
            line: o.line,
            reason,
        };
        if let Some(system) = o.code.system.as_deref().filter(|s| *s != ITEM_CODE_OID) {
            self.item_errors
                .push(fail(ItemErrorReason::ForeignCodeSystem(system.to_owned())));
            return None;
        }
        let Some(definition) = table.lookup(&o.code.code) else {
            self.item_errors.push(fail(ItemErrorReason::UnknownItem));
            return None;
        };
        match value_of(o, definition) {
            Ok(value) => Some(Converted {
                observation: o,
                definition,
                value,
            }),
            Err(reason) => {
                self.item_errors.push(fail(reason));
                None
            }
        }
    }

    /// The document's identifier value: its CDA id, or, when that is a nullFlavor (as the
    /// MHLW template writes it), the key the Bundle's ids derive from (the hash of its bytes).
    fn document_identifier(&self) -> String {
        match &self.doc.document_id {
            Some(id) => id.extension.clone().unwrap_or_else(|| id.root.clone()),
            None => self.key.clone(),
        }
    }

    fn finish(&mut self) -> Value {
        let doc = self.doc;
        let timestamp = format!("{}T00:00:00+09:00", doc.effective_date);
        let entries: Vec<Value> = self
            .entries
            .drain(..)
            .map(|(url, mut resource)| {
                if let Some(id) = url.strip_prefix("urn:uuid:") {
                    resource["id"] = json!(id);
                }
                // The eCheckup profiles require `meta.lastUpdated`: every entry was made
                // from the report as of its creation date, the Bundle's timestamp.
                if let Some(map) = resource.as_object_mut() {
                    let meta = map
                        .entry("meta")
                        .or_insert_with(|| Value::Object(Map::new()));
                    if let Some(meta) = meta.as_object_mut() {
                        meta.insert("lastUpdated".into(), Value::String(timestamp.clone()));
                    }
                }
                let mut entry = Map::new();
                entry.insert("fullUrl".into(), Value::String(url));
                entry.insert("resource".into(), resource);
                Value::Object(entry)
            })
            .collect();
        let mut bundle = json!({
            "resourceType": "Bundle",
            "type": "document",
            "timestamp": timestamp,
        });
        if bundle_profile_gaps(&entries).is_empty() {
            bundle["meta"] = json!({"profile": [BUNDLE_PROFILE]});
        }
        bundle["entry"] = Value::Array(entries);
        bundle["identifier"] = json!({
            "system": "http://jpfhir.jp/fhir/core/IdSystem/documentInstance-identifier",
            "value": self.document_identifier(),
        });
        bundle
    }
}

/// The doctors the document names (9N516000000000049), each once, in document order.
fn doctor_names(doc: &CheckupDocument) -> Vec<&str> {
    let mut names: Vec<&str> = Vec::new();
    for o in doc.observations() {
        if o.code.code != DOCTOR_NAME_ITEM || o.null_flavor.is_some() {
            continue;
        }
        if let Some(ObservationValue::Text(text)) = &o.value {
            let name = text.trim();
            if !name.is_empty() && !names.contains(&name) {
                names.push(name);
            }
        }
    }
    names
}

/// A doctor as the IG's sample writes one: the name as written (ideographic).
fn practitioner(name: &str) -> Value {
    json!({
        "resourceType": "Practitioner",
        "meta": {"profile": [PRACTITIONER_PROFILE]},
        "name": [written_name(name, "IDE")],
    })
}

/// A HumanName as written (`IDE` ideographic, `SYL` kana), split into family and given
/// names only where the document separates them with a (full- or half-width) space.
fn written_name(text: &str, representation: &str) -> Value {
    let mut name = json!({
        "extension": [{"url": NAME_REPRESENTATION_EXTENSION, "valueCode": representation}],
        "text": text,
    });
    if let Some((family, given)) = text.split_once([' ', '\u{3000}']) {
        let (family, given) = (family.trim(), given.trim());
        if !family.is_empty() && !given.is_empty() {
            name["family"] = json!(family);
            name["given"] = json!([given]);
        }
    }
    name
}

/// JP_Bundle_eCheckupGeneral's slices of `Bundle.entry` that bound their count, told apart by
/// the profile the entry's resource claims: (slice, the profiles it takes, min, max). The
/// profile's other slices are 0..*. A test holds this table to the vendored profile.
pub(crate) const BUNDLE_SLICES: &[(&str, &[&str], usize, usize)] = &[
    ("composition", &[COMPOSITION_PROFILE], 1, 1),
    ("patient", &[PATIENT_PROFILE], 1, 1),
    ("organization", &[ORGANIZATION_PROFILE], 1, 4),
    ("practitioner", &[PRACTITIONER_PROFILE], 1, 2),
    ("encounter", &[ENCOUNTER_PROFILE], 1, 1),
    (
        "coverage",
        &[COVERAGE_SERVICE_PROFILE, COVERAGE_INSURANCE_PROFILE],
        0,
        2,
    ),
];
/// The profile's least number of entries.
pub(crate) const BUNDLE_MIN_ENTRIES: usize = 5;

/// What keeps entries (`{fullUrl, resource}`, Composition first) from filling
/// JP_Bundle_eCheckupGeneral: each slice whose count is out of bounds, with the count. Empty
/// when the Bundle may claim the profile. Each entry is held to its own profile apart; this
/// counts only what the Bundle profile adds.
pub(crate) fn bundle_profile_gaps(entries: &[Value]) -> Vec<String> {
    let claims = |entry: &Value, profile: &str| {
        entry["resource"]["meta"]["profile"]
            .as_array()
            .is_some_and(|claimed| claimed.iter().any(|p| p == profile))
    };
    let mut gaps = Vec::new();
    if entries.len() < BUNDLE_MIN_ENTRIES {
        gaps.push(format!(
            "{} entries, fewer than {BUNDLE_MIN_ENTRIES}",
            entries.len()
        ));
    }
    if !entries
        .first()
        .is_some_and(|first| claims(first, COMPOSITION_PROFILE))
    {
        gaps.push("the first entry is not the profiled Composition".to_owned());
    }
    for (slice, profiles, min, max) in BUNDLE_SLICES {
        let count = entries
            .iter()
            .filter(|entry| profiles.iter().any(|p| claims(entry, p)))
            .count();
        if count < *min || count > *max {
            gaps.push(format!("entry:{slice} has {count}, needs {min}..{max}"));
        }
    }
    gaps
}

/// The value part (`value[x]` or `dataAbsentReason`) of a result, checked against its item.
fn value_of(o: &Observation, d: &ItemDefinition) -> Result<Map<String, Value>, ItemErrorReason> {
    let mut out = Map::new();
    let wrong_type = |found: &str| ItemErrorReason::WrongType {
        expected: d.value_type.as_xsi_type().to_owned(),
        found: found.to_owned(),
    };
    let value = match (&o.value, &o.null_flavor) {
        (Some(v), _) => v,
        (None, Some(null_flavor)) => {
            out.insert("dataAbsentReason".into(), absent_reason(null_flavor));
            return Ok(out);
        }
        // A group's own observation may carry no value: its members are the results.
        (None, None) if !o.members.is_empty() => return Ok(out),
        (None, None) => {
            return Err(ItemErrorReason::BadValue(
                "no value and no nullFlavor".into(),
            ))
        }
    };
    match value {
        ObservationValue::Null { null_flavor, .. } => {
            out.insert("dataAbsentReason".into(), absent_reason(null_flavor));
        }
        ObservationValue::Quantity { value, unit } => {
            if d.value_type != ValueType::Pq {
                return Err(wrong_type("PQ"));
            }
            let quantity = checked_quantity(value, unit.as_deref(), d)?;
            out.insert("valueQuantity".into(), quantity);
        }
        ObservationValue::Coded { xsi_type, code } => {
            let expected = match d.value_type {
                ValueType::Cd => xsi_type == "CD" || xsi_type == "CE",
                ValueType::Co => xsi_type == "CO",
                _ => false,
            };
            if !expected {
                return Err(wrong_type(xsi_type));
            }
            let max_len = d.max_code_len().unwrap_or(usize::MAX);
            if code.code.is_empty()
                || code.code.len() > max_len
                || !code.code.bytes().all(|b| b.is_ascii_digit())
            {
                return Err(ItemErrorReason::BadValue(format!(
                    "answer code {:?} is not a number of at most {max_len} digits",
                    code.code
                )));
            }
            let table_system = d.result_code_oid.unwrap_or_default();
            let system = match code.system.as_deref() {
                None => table_system,
                Some(s) if d.result_code_oid.is_none() || s == table_system => s,
                Some(s) => {
                    return Err(ItemErrorReason::WrongAnswerSystem {
                        expected: table_system.to_owned(),
                        found: s.to_owned(),
                    })
                }
            };
            if system.is_empty() {
                return Err(ItemErrorReason::BadValue(
                    "coded answer without a code system".into(),
                ));
            }
            let mut c = coding(&oid_system(system), &code.code, code.display.as_deref());
            if d.value_type == ValueType::Co {
                if let Ok(ordinal) = code.code.parse::<u32>() {
                    c["extension"] = json!([{"url": "http://hl7.org/fhir/StructureDefinition/ordinalValue", "valueDecimal": ordinal}]);
                }
            }
            out.insert("valueCodeableConcept".into(), codeable(c));
        }
        ObservationValue::Text(text) => {
            if d.value_type != ValueType::St {
                return Err(wrong_type("ST"));
            }
            let length = text.chars().count();
            if let Some(max) = d.max_text_len().filter(|max| length > *max) {
                return Err(ItemErrorReason::BadValue(format!(
                    "text of {length} characters; at most {max}"
                )));
            }
            out.insert("valueString".into(), json!(text));
        }
        ObservationValue::Other { xsi_type, .. } => return Err(wrong_type(xsi_type)),
    }
    Ok(out)
}

/// A PQ value that fits the item's digits and unit, as a FHIR Quantity.
fn checked_quantity(
    value: &str,
    unit: Option<&str>,
    d: &ItemDefinition,
) -> Result<Value, ItemErrorReason> {
    let (int_max, frac_max) = d.pq_digits().unwrap_or((usize::MAX, usize::MAX));
    let (int, frac) = value.split_once('.').unwrap_or((value, ""));
    let digits_ok = !int.is_empty()
        && int.bytes().all(|b| b.is_ascii_digit())
        && frac.bytes().all(|b| b.is_ascii_digit())
        && !(value.contains('.') && frac.is_empty());
    if !digits_ok {
        return Err(ItemErrorReason::BadValue(format!(
            "{value:?} is not a decimal number"
        )));
    }
    let significant_int = int.trim_start_matches('0').len().max(1);
    if significant_int > int_max || frac.len() > frac_max {
        return Err(ItemErrorReason::BadValue(format!(
            "{value} does not fit the format {}",
            d.format
        )));
    }
    if let Some(expected) = d.display_unit {
        let found = unit.unwrap_or("");
        if found != expected && Some(found) != d.ucum_unit {
            return Err(ItemErrorReason::WrongUnit {
                expected: expected.to_owned(),
                found: found.to_owned(),
            });
        }
    }
    quantity(value, unit, d)
        .ok_or_else(|| ItemErrorReason::BadValue(format!("{value:?} is not a number")))
}

/// `{value, unit, system, code}` with the display unit and the item's UCUM code.
fn quantity(value: &str, unit: Option<&str>, d: &ItemDefinition) -> Option<Value> {
    let number = if value.contains('.') {
        serde_json::Number::from_f64(value.parse::<f64>().ok()?)?
    } else {
        serde_json::Number::from(value.parse::<u64>().ok()?)
    };
    let mut q = Map::with_capacity(4);
    q.insert("value".into(), Value::Number(number));
    if let Some(display) = d.display_unit.or(unit) {
        q.insert("unit".into(), Value::from(display));
    }
    if let Some(ucum) = d.ucum_unit {
        q.insert("system".into(), Value::from(UCUM));
        q.insert("code".into(), Value::from(ucum));
    }
    Some(Value::Object(q))
}

fn absent_reason(null_flavor: &str) -> Value {
    let code = match null_flavor {
        "ASKU" => "asked-unknown",
        "NAV" => "temp-unknown",
        "NASK" => "not-asked",
        "NA" => "not-applicable",
        "MSK" => "masked",
        "NAN" => "not-a-number",
        "NINF" => "negative-infinity",
        "PINF" => "positive-infinity",
        "OTH" => "unsupported",
        _ => "unknown",
    };
    json!({"coding": [coding("http://terminology.hl7.org/CodeSystem/data-absent-reason", code, None)]})
}

/// The IG's simple observation categories, by item table category (区分番号).
fn category_code(category_number: u32) -> &'static str {
    match category_number {
        10 => "body-measurement",
        20 => "exam",
        30 => "vital-signs",
        400 => "survey",
        500 | 600 | 900 => "social-history",
        700 | 800 => "survey",
        _ => "laboratory",
    }
}

/// What an insurer's number (保険者番号) tells of its scheme, through its 法別番号.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct InsuranceScheme {
    /// 保険種別コード (別表11): 1 医保, 2 国保, 7 後期高齢者.
    category: &'static str,
    category_name: &'static str,
    /// Everyone the scheme covers is insured in their own right (国民健康保険 and 後期高齢者
    /// 医療 have no 被扶養者), so the person is the 被保険者 (被保険者区分 1).
    no_dependants: bool,
}

/// The scheme of a 保険者番号: eight digits whose first two are the 法別番号, or six for
/// 国民健康保険, which has none (特定健診 data zero-pads those to eight). `None` for any
/// other number.
fn insurance_scheme(insurer_number: &str) -> Option<InsuranceScheme> {
    let number = insurer_number.trim();
    if !number.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let scheme = |category, category_name, no_dependants| {
        Some(InsuranceScheme {
            category,
            category_name,
            no_dependants,
        })
    };
    match (number.len(), number.get(..2)?) {
        // 市町村国保 and 国保組合.
        (6, _) | (8, "00") => scheme("2", "国保", true),
        (8, "39") => scheme("7", "後期高齢者", true),
        // 退職者医療 is run by 国保 but covers the retired person's 被扶養者 too.
        (8, "67") => scheme("2", "国保", false),
        // 協会けんぽ, 船員保険, 日雇特例, 健保組合, 自衛官等, 共済組合 and 特例退職被保険者.
        (8, "01" | "02" | "03" | "04" | "06" | "07" | "31" | "32" | "33" | "34" | "63")
        | (8, "72" | "73" | "74" | "75") => scheme("1", "医保", false),
        _ => None,
    }
}

/// The 被保険者個人識別子 (JP-CLINS; what JP_Patient_eCS identifies a person by): 保険者番号
/// (zero-padded to eight digits), 記号, 番号 and 枝番 joined by `:`, an absent part empty.
/// `None` without the insurer's or the card's number. The card's values are kept as the
/// document writes them.
fn insured_person_identifier(insurance: &Insurance) -> Option<String> {
    let insurer = insurance.insurer_number.as_deref()?.trim();
    let number = insurance.number.as_deref()?.trim();
    if insurer.is_empty() || number.is_empty() {
        return None;
    }
    let insurer = if insurer.bytes().all(|b| b.is_ascii_digit()) {
        format!("{insurer:0>8}")
    } else {
        insurer.to_owned()
    };
    Some(format!(
        "{insurer}:{}:{number}:{}",
        insurance.symbol.as_deref().unwrap_or("").trim(),
        insurance.branch.as_deref().unwrap_or("").trim(),
    ))
}

fn patient(p: &Patient, insurance: &Insurance) -> Value {
    let mut names = Vec::new();
    for (text, representation) in [(&p.name, "IDE"), (&p.name_kana, "SYL")] {
        if let Some(text) = text {
            let mut name = written_name(text, representation);
            name["use"] = json!("official");
            names.push(name);
        }
    }
    let gender = match p.sex.as_ref().map(|c| c.code.as_str()) {
        Some("1") => "male",
        Some("2") => "female",
        _ => "unknown",
    };
    let mut patient = json!({"resourceType": "Patient"});
    // JP_Patient_eCS (like JP Core's JP_Patient) requires an identifier, and a document
    // without the insurance card gives none: such a Patient claims no profile.
    if let Some(value) = insured_person_identifier(insurance) {
        patient["meta"] = json!({"profile": [PATIENT_PROFILE]});
        patient["identifier"] = json!([{"system": INSURANCE_MEMBER_ID, "value": value}]);
    }
    patient["name"] = Value::Array(names);
    patient["gender"] = Value::from(gender);
    if let Some(birth_date) = &p.birth_date {
        patient["birthDate"] = json!(birth_date);
    }
    if let Some(address) = address(&p.address) {
        patient["address"] = json!([address]);
    }
    patient
}

fn organization(o: &Organization, kind: &str) -> Value {
    let mut org = json!({
        "resourceType": "Organization",
        "meta": {"profile": [ORGANIZATION_PROFILE]},
        "type": [{"coding": [coding("http://terminology.hl7.org/CodeSystem/organization-type", kind, None)]}],
    });
    if let Some(number) = &o.number {
        org["identifier"] = json!([{"system": "http://jpfhir.jp/fhir/core/IdSystem/insurance-medical-institution-no", "value": number}]);
    }
    if let Some(name) = &o.name {
        org["name"] = json!(name);
    }
    if let Some(telecom) = &o.telecom {
        let phone = telecom.strip_prefix("tel:").unwrap_or(telecom);
        org["telecom"] = json!([{"system": "phone", "value": phone}]);
    }
    if let Some(address) = address(&o.address) {
        org["address"] = json!([address]);
    }
    org
}

fn address(a: &Address) -> Option<Value> {
    if a.postal_code.is_none() && a.text.is_none() {
        return None;
    }
    let mut address = json!({"country": "JP"});
    if let Some(text) = &a.text {
        address["text"] = json!(text);
    }
    if let Some(postal_code) = &a.postal_code {
        address["postalCode"] = json!(postal_code);
    }
    Some(address)
}

fn coding(system: &str, code: &str, display: Option<&str>) -> Value {
    let mut c = Map::with_capacity(3);
    c.insert("system".into(), Value::from(system));
    c.insert("code".into(), Value::from(code));
    if let Some(display) = display {
        c.insert("display".into(), Value::from(display));
    }
    Value::Object(c)
}

/// `{"coding": [coding]}`.
fn codeable(coding: Value) -> Value {
    object([("coding", Value::Array(vec![coding]))])
}

fn reference(url: &str) -> Value {
    object([("reference", Value::from(url))])
}

fn object<const N: usize>(pairs: [(&str, Value); N]) -> Value {
    let mut map = Map::with_capacity(N);
    for (key, value) in pairs {
        map.insert(key.to_owned(), value);
    }
    Value::Object(map)
}

fn oid_system(oid: &str) -> String {
    format!("urn:oid:{oid}")
}

/// Short text of a value for the section narrative.
fn summary(value: &Map<String, Value>) -> String {
    if let Some(q) = value.get("valueQuantity") {
        let unit = q.get("unit").and_then(Value::as_str).unwrap_or("");
        return format!(
            "{} {unit}",
            q.get("value").map(Value::to_string).unwrap_or_default()
        );
    }
    if let Some(c) = value
        .get("valueCodeableConcept")
        .and_then(|c| c.pointer("/coding/0"))
    {
        let shown = c.get("display").or_else(|| c.get("code"));
        return shown.and_then(Value::as_str).unwrap_or("").to_owned();
    }
    if let Some(s) = value.get("valueString").and_then(Value::as_str) {
        return s.to_owned();
    }
    "(未実施・不明)".to_owned()
}

/// XHTML narrative; maud escapes the text.
fn narrative(lines: &[String]) -> String {
    maud::html! {
        div xmlns="http://www.w3.org/1999/xhtml" {
            ul { @for line in lines { li { (line) } } }
        }
    }
    .into_string()
}

/// `urn:uuid:` + a UUID (version 5 layout) from SHA-256 of the document key and local name.
fn deterministic_uuid(key: &str, local: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(key.as_bytes());
    hasher.update([0u8]);
    hasher.update(local.as_bytes());
    let digest = hasher.finalize();
    let mut b = [0u8; 16];
    b.copy_from_slice(&digest[..16]);
    b[6] = (b[6] & 0x0f) | 0x50;
    b[8] = (b[8] & 0x3f) | 0x80;
    let mut url = String::with_capacity(45);
    url.push_str("urn:uuid:");
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            url.push('-');
        }
        push_hex(&mut url, *byte);
    }
    url
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        push_hex(&mut out, *byte);
    }
    out
}

fn push_hex(out: &mut String, byte: u8) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    out.push(char::from(DIGITS[usize::from(byte >> 4)]));
    out.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn insurance_schemes_by_insurer_number() {
        let cases: &[(&str, Option<(&str, bool)>)] = &[
            ("138123", Some(("2", true))),
            ("00138123", Some(("2", true))),
            (" 00138123 ", Some(("2", true))),
            ("39131234", Some(("7", true))),
            ("67131234", Some(("2", false))),
            ("01130012", Some(("1", false))),
            ("06123456", Some(("1", false))),
            ("31130012", Some(("1", false))),
            ("63130012", Some(("1", false))),
            ("75130012", Some(("1", false))),
            // No such 法別番号, wrong lengths, not digits.
            ("12130012", None),
            ("8013001", None),
            ("061234567", None),
            ("0612345X", None),
            ("", None),
        ];
        for (number, expected) in cases {
            let got = insurance_scheme(number).map(|s| (s.category, s.no_dependants));
            assert_eq!(got, *expected, "{number:?}");
        }
    }

    #[test]
    fn insured_person_identifier_joins_the_card() {
        let card = |insurer: Option<&str>,
                    symbol: Option<&str>,
                    number: Option<&str>,
                    branch: Option<&str>| Insurance {
            insurer_number: insurer.map(str::to_owned),
            symbol: symbol.map(str::to_owned),
            number: number.map(str::to_owned),
            branch: branch.map(str::to_owned),
        };
        // The JP-CLINS examples: 保険者番号 12345 padded to eight digits; an absent 記号
        // or 枝番 leaves its place empty.
        assert_eq!(
            insured_person_identifier(&card(
                Some("12345"),
                Some("あいう"),
                Some("１８７"),
                Some("05")
            )),
            Some("00012345:あいう:１８７:05".to_owned())
        );
        assert_eq!(
            insured_person_identifier(&card(Some("12345"), None, Some("１８７"), None)),
            Some("00012345::１８７:".to_owned())
        );
        assert_eq!(
            insured_person_identifier(&card(None, Some("a"), Some("1"), None)),
            None
        );
        assert_eq!(
            insured_person_identifier(&card(Some("06123456"), None, None, None)),
            None
        );
        assert_eq!(
            insured_person_identifier(&card(Some("06123456"), None, Some(" "), None)),
            None
        );
    }

    /// Without the card the Patient has no identifier, which JP_Patient_eCS requires, so it
    /// claims no profile.
    #[test]
    fn a_patient_without_a_card_claims_no_profile() {
        let bare = patient(&Patient::default(), &Insurance::default());
        assert!(bare.get("identifier").is_none());
        assert!(bare.get("meta").is_none());
        let with_card = patient(
            &Patient::default(),
            &Insurance {
                insurer_number: Some("06123456".into()),
                number: Some("1".into()),
                ..Insurance::default()
            },
        );
        assert_eq!(with_card["meta"]["profile"][0], PATIENT_PROFILE);
        assert_eq!(with_card["identifier"][0]["value"], "06123456::1:");
    }
}
