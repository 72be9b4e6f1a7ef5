//! Test documents: CDAtemplate-hc18.xml filled from the item table. The template is copied
//! element by element; its `99999999` placeholders are replaced from a [`Header`] and its one
//! `entry` is replaced by the given results. Written with quick-xml (which escapes), one
//! element per line so XSD error lines point at one element.
//!
//! Uses only the module's public API, so the benchmark can include it too.

use quick_xml::events::{BytesDecl, BytesEnd, BytesStart, BytesText, Event};
use quick_xml::Writer;

use super::{ItemTable, ValueType};

const TEMPLATE: &str = include_str!("../../../fixtures/tokutei-cda/CDAtemplate-hc18.xml");
const HL7: &str = "urn:hl7-org:v3";
const PLACEHOLDER: &str = "99999999";

/// The header values of a generated document.
#[derive(Debug, Clone)]
pub struct Header {
    pub document_id: Option<(String, String)>,
    pub report_category: String,
    pub effective_time: String,
    pub insurer_number: String,
    pub symbol: Option<String>,
    pub number: String,
    pub branch: Option<String>,
    pub patient_name: String,
    pub patient_name_use: &'static str,
    pub sex: String,
    pub birth_time: String,
    pub patient_postal_code: String,
    pub patient_address: String,
    pub institution_number: String,
    pub institution_name: String,
    pub institution_telecom: String,
    pub institution_postal_code: String,
    pub institution_address: String,
    pub voucher: Option<(String, String)>,
    pub program: String,
    pub checkup_date: String,
    pub section_code: String,
    pub section_title: String,
}

impl Default for Header {
    fn default() -> Self {
        Header {
            document_id: Some(("1.2.392.200119.6.102.1311234567".into(), "12345".into())),
            report_category: "10".into(),
            effective_time: "20240405".into(),
            insurer_number: "06123456".into(),
            symbol: Some("１２３４５".into()),
            number: "６７８９０".into(),
            branch: Some("01".into()),
            patient_name: "ケンシン タロウ".into(),
            patient_name_use: "SYL",
            sex: "1".into(),
            birth_time: "19500504".into(),
            patient_postal_code: "123-4567".into(),
            patient_address: "神奈川県横浜市港区１－２－３".into(),
            institution_number: "1311234567".into(),
            institution_name: "厚生労働省第一病院".into(),
            institution_telecom: "tel:0123-456-7890".into(),
            institution_postal_code: "100-0001".into(),
            institution_address: "東京都千代田区千代田９－９－９".into(),
            voucher: Some(("24100000123".into(), "20250331".into())),
            program: "010".into(),
            checkup_date: "20200404".into(),
            section_code: "01010".into(),
            section_title: "特定健診結果".into(),
        }
    }
}

/// The value of a generated result.
#[derive(Debug, Clone)]
pub enum GenValue {
    Pq {
        value: String,
        unit: String,
    },
    /// CD or CO (by `xsi_type`); `system: None` leaves `codeSystem` out.
    Coded {
        xsi_type: &'static str,
        code: String,
        system: Option<String>,
    },
    St(String),
    /// A value element with this xsi:type and a nullFlavor.
    Null {
        xsi_type: &'static str,
        null_flavor: String,
    },
}

/// A generated result.
#[derive(Debug, Clone)]
pub struct GenObservation {
    pub code: String,
    /// `false` leaves the code's `codeSystem` out (the XSD default applies).
    pub explicit_code_system: bool,
    pub value: Option<GenValue>,
    pub interpretation: Option<String>,
    pub method: Option<String>,
    /// (low, high, unit).
    pub reference_range: Option<(String, String, String)>,
    pub members: Vec<(&'static str, GenObservation)>,
}

impl GenObservation {
    pub fn new(code: &str, value: GenValue) -> Self {
        GenObservation {
            code: code.into(),
            explicit_code_system: true,
            value: Some(value),
            interpretation: None,
            method: None,
            reference_range: None,
            members: Vec::new(),
        }
    }

    /// A result of the right type for its item, with the table's unit, result system and
    /// method; `n` varies the value.
    pub fn typical(code: &str, n: usize) -> Self {
        let table = ItemTable::get();
        let d = table
            .lookup(code)
            .unwrap_or_else(|| panic!("{code} not in the item table"));
        let value = match d.value_type {
            ValueType::Pq => {
                let (int, frac) = d.pq_digits().unwrap_or((3, 0));
                let int_part = (1 + n % 9).to_string().repeat(int.clamp(1, 2));
                let value = if frac > 0 {
                    format!("{int_part}.{}", n % 10)
                } else {
                    int_part
                };
                GenValue::Pq {
                    value,
                    unit: d.display_unit.unwrap_or("1").into(),
                }
            }
            ValueType::Cd | ValueType::Co => GenValue::Coded {
                xsi_type: if d.value_type == ValueType::Cd {
                    "CD"
                } else {
                    "CO"
                },
                code: "1".into(),
                system: d.result_code_oid.map(str::to_owned),
            },
            // Short text items are dates (撮影年月日, YYYYMMDD).
            ValueType::St if d.max_text_len().is_some_and(|max| max < 20) => {
                GenValue::St("20240401".into())
            }
            ValueType::St => GenValue::St(format!("所見 {n} <特記> & \"引用\"")),
        };
        let mut o = GenObservation::new(code, value);
        o.method = d.method_code.map(str::to_owned);
        o
    }
}

/// Renders a document from the template.
pub fn render(header: &Header, observations: &[GenObservation]) -> Vec<u8> {
    let template = roxmltree::Document::parse(TEMPLATE).expect("template parses");
    let mut writer = Writer::new_with_indent(Vec::new(), b' ', 1);
    writer
        .write_event(Event::Decl(BytesDecl::new("1.0", Some("UTF-8"), None)))
        .expect("write");
    let mut r = Renderer {
        header,
        observations,
        writer,
    };
    r.element(template.root_element(), "");
    r.writer.into_inner()
}

struct Renderer<'a> {
    header: &'a Header,
    observations: &'a [GenObservation],
    writer: Writer<Vec<u8>>,
}

impl Renderer<'_> {
    fn element(&mut self, node: roxmltree::Node, parent_path: &str) {
        let name = node.tag_name().name();
        let path = format!("{parent_path}/{name}");
        let h = self.header;
        // Optional header parts left out.
        if path.ends_with("/ClinicalDocument/participant") && h.voucher.is_none() {
            return;
        }
        if path.ends_with("/patientRole/id") {
            let value = match node.attribute("root") {
                Some("1.2.392.200119.6.204") => h.symbol.clone(),
                Some("1.2.392.200119.6.211") => h.branch.clone(),
                _ => Some(String::new()),
            };
            if value.is_none() {
                return;
            }
        }
        if path.ends_with("/section/entry") {
            for o in self.observations {
                self.start("entry", &[]);
                self.observation(o);
                self.end("entry");
            }
            return;
        }
        if path.ends_with("/section/text/list/item") {
            let table = ItemTable::get();
            for o in self.observations {
                let name = table
                    .lookup(&o.code)
                    .map(|d| d.name)
                    .unwrap_or("(不明な項目)");
                self.text_element("item", &[], name);
            }
            return;
        }

        let mut attributes: Vec<(String, String)> = Vec::new();
        if node == node.document().root_element() {
            attributes.push(("xmlns".into(), HL7.into()));
            attributes.push((
                "xmlns:xsi".into(),
                "http://www.w3.org/2001/XMLSchema-instance".into(),
            ));
        }
        if path == "/ClinicalDocument/id" {
            match &h.document_id {
                Some((root, extension)) => {
                    attributes.push(("root".into(), root.clone()));
                    attributes.push(("extension".into(), extension.clone()));
                }
                None => attributes.push(("nullFlavor".into(), "NI".into())),
            }
        } else {
            for a in node.attributes() {
                if a.namespace().is_some() {
                    continue; // xsi:schemaLocation points outside the document.
                }
                let value = if a.value().contains(PLACEHOLDER) {
                    self.fill_attribute(&path, node, a.name(), a.value())
                } else {
                    a.value().to_owned()
                };
                attributes.push((a.name().to_owned(), value));
            }
        }
        if path == "/ClinicalDocument/recordTarget/patientRole/patient/name" {
            attributes.push(("use".into(), h.patient_name_use.into()));
        }
        let attribute_refs: Vec<(&str, &str)> = attributes
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let element_children: Vec<roxmltree::Node> =
            node.children().filter(|c| c.is_element()).collect();
        let own_text: String = node
            .children()
            .filter(|c| c.is_text())
            .filter_map(|c| c.text())
            .collect();
        let own_text = own_text.trim();
        if element_children.is_empty() && own_text.is_empty() {
            self.empty(name, &attribute_refs);
            return;
        }
        if element_children.is_empty() {
            let text = if own_text == PLACEHOLDER {
                self.fill_text(&path)
            } else {
                own_text.to_owned()
            };
            self.text_element(name, &attribute_refs, &text);
            return;
        }
        self.start(name, &attribute_refs);
        for child in element_children {
            self.element(child, &path);
        }
        // Address text after the postal code (mixed content in AD).
        if name == "addr" && own_text == PLACEHOLDER {
            let text = self.fill_text(&path);
            self.writer
                .write_event(Event::Text(BytesText::new(&text)))
                .expect("write");
        }
        self.end(name);
    }

    fn fill_attribute(
        &self,
        path: &str,
        node: roxmltree::Node,
        attribute: &str,
        value: &str,
    ) -> String {
        let h = self.header;
        let root = node.attribute("root");
        match (path.rsplit('/').next().unwrap_or(""), attribute) {
            ("code", "code") if path == "/ClinicalDocument/code" => h.report_category.clone(),
            ("effectiveTime", "value") if path == "/ClinicalDocument/effectiveTime" => {
                h.effective_time.clone()
            }
            ("effectiveTime", "value") => h.checkup_date.clone(),
            ("id", "extension") => match root {
                Some("1.2.392.200119.6.101") => h.insurer_number.clone(),
                Some("1.2.392.200119.6.204") => h.symbol.clone().unwrap_or_default(),
                Some("1.2.392.200119.6.205") => h.number.clone(),
                Some("1.2.392.200119.6.211") => h.branch.clone().unwrap_or_default(),
                Some("1.2.392.200119.6.102") => h.institution_number.clone(),
                _ => h.voucher.clone().map(|v| v.0).unwrap_or_default(),
            },
            // An OID arc has no leading zeros: 保険者番号 06123456 → arc 6123456.
            ("id", "root") => value.replace(PLACEHOLDER, h.insurer_number.trim_start_matches('0')),
            ("administrativeGenderCode", "code") => h.sex.clone(),
            ("birthTime", "value") => h.birth_time.clone(),
            ("time", "value") => h.effective_time.clone(),
            ("high", "value") => h.voucher.clone().map(|v| v.1).unwrap_or_default(),
            ("telecom", "value") => h.institution_telecom.clone(),
            ("code", "code") if path.ends_with("serviceEvent/code") => h.program.clone(),
            ("code", "code") => h.section_code.clone(),
            ("code", "displayName") => h.section_title.clone(),
            _ => value.replace(PLACEHOLDER, ""),
        }
    }

    fn fill_text(&self, path: &str) -> String {
        let h = self.header;
        let patient = path.contains("/patientRole/");
        match path.rsplit('/').next().unwrap_or("") {
            "postalCode" if patient => h.patient_postal_code.clone(),
            "postalCode" => h.institution_postal_code.clone(),
            "addr" if patient => h.patient_address.clone(),
            "addr" => h.institution_address.clone(),
            "name" if patient => h.patient_name.clone(),
            "name" => h.institution_name.clone(),
            "title" => h.section_title.clone(),
            _ => String::new(),
        }
    }

    fn observation(&mut self, o: &GenObservation) {
        self.start("observation", &[("classCode", "OBS"), ("moodCode", "EVN")]);
        if o.explicit_code_system {
            self.empty(
                "code",
                &[("code", &o.code), ("codeSystem", "1.2.392.200119.6.1005")],
            );
        } else {
            self.empty("code", &[("code", &o.code)]);
        }
        match &o.value {
            Some(GenValue::Pq { value, unit }) => self.empty(
                "value",
                &[("xsi:type", "PQ"), ("value", value), ("unit", unit)],
            ),
            Some(GenValue::Coded {
                xsi_type,
                code,
                system,
            }) => match system {
                Some(system) => self.empty(
                    "value",
                    &[
                        ("xsi:type", xsi_type),
                        ("code", code),
                        ("codeSystem", system),
                    ],
                ),
                None => self.empty("value", &[("xsi:type", xsi_type), ("code", code)]),
            },
            Some(GenValue::St(text)) => self.text_element("value", &[("xsi:type", "ST")], text),
            Some(GenValue::Null {
                xsi_type,
                null_flavor,
            }) => self.empty(
                "value",
                &[("xsi:type", xsi_type), ("nullFlavor", null_flavor)],
            ),
            None => {}
        }
        if let Some(interpretation) = &o.interpretation {
            self.empty(
                "interpretationCode",
                &[
                    ("code", interpretation),
                    ("codeSystem", "2.16.840.1.113883.5.83"),
                ],
            );
        }
        if let Some(method) = &o.method {
            self.empty("methodCode", &[("code", method)]);
        }
        for (relation, member) in &o.members {
            self.start("entryRelationship", &[("typeCode", relation)]);
            self.observation(member);
            self.end("entryRelationship");
        }
        if let Some((low, high, unit)) = &o.reference_range {
            self.start("referenceRange", &[]);
            self.start("observationRange", &[]);
            self.start("value", &[("xsi:type", "IVL_PQ")]);
            self.empty("low", &[("value", low), ("unit", unit)]);
            self.empty("high", &[("value", high), ("unit", unit)]);
            self.end("value");
            self.end("observationRange");
            self.end("referenceRange");
        }
        self.end("observation");
    }

    fn start(&mut self, name: &str, attributes: &[(&str, &str)]) {
        let mut start = BytesStart::new(name);
        for a in attributes {
            start.push_attribute(*a);
        }
        self.writer.write_event(Event::Start(start)).expect("write");
    }

    fn empty(&mut self, name: &str, attributes: &[(&str, &str)]) {
        let mut start = BytesStart::new(name);
        for a in attributes {
            start.push_attribute(*a);
        }
        self.writer.write_event(Event::Empty(start)).expect("write");
    }

    fn end(&mut self, name: &str) {
        self.writer
            .write_event(Event::End(BytesEnd::new(name)))
            .expect("write");
    }

    fn text_element(&mut self, name: &str, attributes: &[(&str, &str)], text: &str) {
        self.start(name, attributes);
        self.writer
            .write_event(Event::Text(BytesText::new(text)))
            .expect("write");
        self.end(name);
    }
}
