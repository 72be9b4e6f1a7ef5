//! Reads a 特定健診情報ファイル (hc08 CDA) into [`CheckupDocument`].
//!
//! Code systems the XSD gives as `default`/`fixed` are applied where the document leaves
//! them out: observation `code` → 1.2.392.200119.6.1005, `methodCode` →
//! 1.2.392.200119.6.1007, document `code` → 1.2.392.200119.6.1001, `serviceEvent/code` →
//! 1.2.392.200119.6.1002.

use roxmltree::{Node, ParsingOptions};

use super::error::CdaError;
use super::items::{ITEM_CODE_OID, METHOD_CODE_OID};
use super::model::*;
use super::schema::element_path;

const HL7: &str = "urn:hl7-org:v3";
const XSI: &str = "http://www.w3.org/2001/XMLSchema-instance";
const REPORT_CATEGORY_OID: &str = "1.2.392.200119.6.1001";
const PROGRAM_TYPE_OID: &str = "1.2.392.200119.6.1002";
const INSURER_NUMBER_OID: &str = "1.2.392.200119.6.101";
const INSTITUTION_NUMBER_OID: &str = "1.2.392.200119.6.102";
const INSURED_SYMBOL_OID: &str = "1.2.392.200119.6.204";
const INSURED_NUMBER_OID: &str = "1.2.392.200119.6.205";
const INSURED_BRANCH_OID: &str = "1.2.392.200119.6.211";
const VOUCHER_FUNCTION_OID: &str = "1.2.392.200119.6.208";
/// Far above any real document (a full checkup has a few hundred elements) and low enough
/// to bound memory on hostile input.
const NODES_LIMIT: u32 = 1_000_000;

/// Parses well-formed XML (no DTD: a checkup file never has one, and refusing it rules out
/// entity expansion attacks).
pub(crate) fn parse_tree(xml: &str) -> Result<roxmltree::Document<'_>, CdaError> {
    let options = ParsingOptions {
        allow_dtd: false,
        nodes_limit: NODES_LIMIT,
    };
    roxmltree::Document::parse_with_options(xml, options)
        .map_err(|e| CdaError::Malformed(e.to_string()))
}

pub(crate) fn parse_document(xml: &str) -> Result<CheckupDocument, CdaError> {
    let tree = parse_tree(xml)?;
    let root = tree.root_element();
    if root.tag_name().name() != "ClinicalDocument" || root.tag_name().namespace() != Some(HL7) {
        return Err(CdaError::WrongRoot {
            found: format!(
                "{{{}}}{}",
                root.tag_name().namespace().unwrap_or(""),
                root.tag_name().name()
            ),
            expected: "{urn:hl7-org:v3}ClinicalDocument",
        });
    }
    let reader = Reader {
        line_starts: line_starts(xml),
    };

    let document_id = child(root, "id").and_then(instance_id);
    let report_category = child(root, "code").and_then(|c| code_of(c, Some(REPORT_CATEGORY_OID)));
    let effective_time =
        child(root, "effectiveTime").ok_or(CdaError::Missing("ClinicalDocument/effectiveTime"))?;
    let effective_date = ts_date(effective_time).ok_or_else(|| CdaError::Invalid {
        path: element_path(effective_time),
        reason: "effectiveTime/@value is not a YYYYMMDD date".into(),
    })?;

    let patient_role = path(root, &["recordTarget", "patientRole"])
        .ok_or(CdaError::Missing("recordTarget/patientRole"))?;
    let mut insurance = Insurance::default();
    for id in children(patient_role, "id") {
        let extension = id.attribute("extension").map(str::to_owned);
        match id.attribute("root") {
            Some(INSURER_NUMBER_OID) => insurance.insurer_number = extension,
            Some(INSURED_SYMBOL_OID) => insurance.symbol = extension,
            Some(INSURED_NUMBER_OID) => insurance.number = extension,
            Some(INSURED_BRANCH_OID) => insurance.branch = extension,
            _ => {}
        }
    }
    let patient = patient_of(patient_role);

    let author_node = child(root, "author");
    let author = Author {
        time: author_node.and_then(|a| child(a, "time")).and_then(ts_date),
        organization: author_node
            .and_then(|a| path(a, &["assignedAuthor", "representedOrganization"]))
            .map(organization_of)
            .unwrap_or_default(),
    };

    let voucher = children(root, "participant")
        .find(|p| {
            child(*p, "functionCode").is_some_and(|f| {
                f.attribute("code") == Some("1")
                    && f.attribute("codeSystem") == Some(VOUCHER_FUNCTION_OID)
            })
        })
        .map(|p| Voucher {
            // An empty number is no number (a 受診券番号 is required wherever one is given).
            number: path(p, &["associatedEntity", "id"])
                .and_then(|id| id.attribute("extension"))
                .map(str::trim)
                .filter(|number| !number.is_empty())
                .map(str::to_owned),
            valid_until: path(p, &["time", "high"]).and_then(ts_date),
        });

    let service_event = path(root, &["documentationOf", "serviceEvent"]);
    let program = service_event
        .and_then(|e| child(e, "code"))
        .and_then(|c| code_of(c, Some(PROGRAM_TYPE_OID)));
    let checkup_date = service_event
        .and_then(|e| child(e, "effectiveTime"))
        .and_then(|t| ts_date(t).or_else(|| child(t, "low").and_then(ts_date)));
    let institution = service_event
        .and_then(|e| {
            path(
                e,
                &["performer", "assignedEntity", "representedOrganization"],
            )
        })
        .map(organization_of)
        .unwrap_or_default();

    let body = path(root, &["component", "structuredBody"])
        .ok_or(CdaError::Missing("component/structuredBody"))?;
    let mut sections = Vec::new();
    for section in children(body, "component").filter_map(|c| child(c, "section")) {
        sections.push(reader.section(section));
    }

    Ok(CheckupDocument {
        document_id,
        report_category,
        effective_date,
        patient,
        insurance,
        author,
        voucher,
        program,
        checkup_date,
        institution,
        sections,
    })
}

struct Reader {
    /// Byte offset where each line starts; `text_pos_at` would rescan the text per node.
    line_starts: Vec<usize>,
}

fn line_starts(text: &str) -> Vec<usize> {
    std::iter::once(0)
        .chain(
            text.bytes()
                .enumerate()
                .filter(|(_, b)| *b == b'\n')
                .map(|(i, _)| i + 1),
        )
        .collect()
}

impl Reader {
    /// 1-based line of a byte offset.
    fn line_at(&self, offset: usize) -> u32 {
        let line = self.line_starts.partition_point(|start| *start <= offset);
        u32::try_from(line).unwrap_or(u32::MAX)
    }

    fn section(&self, section: Node) -> Section {
        let mut observations = Vec::new();
        for entry in children(section, "entry") {
            if let Some(o) = child(entry, "observation") {
                observations.push(self.observation(o, 0));
            }
        }
        // Nested sections (allowed by CDA) contribute their entries to the parent.
        for nested in children(section, "component").filter_map(|c| child(c, "section")) {
            observations.extend(self.section(nested).observations);
        }
        Section {
            code: child(section, "code").and_then(|c| code_of(c, None)),
            title: child(section, "title")
                .map(text_of)
                .filter(|t| !t.is_empty()),
            observations,
        }
    }

    fn observation(&self, node: Node, depth: usize) -> Observation {
        let code = child(node, "code")
            .and_then(|c| code_of(c, Some(ITEM_CODE_OID)))
            .unwrap_or(Code {
                code: String::new(),
                system: Some(ITEM_CODE_OID.into()),
                display: None,
            });
        let value = child(node, "value").map(value_of);
        let reference_range =
            path(node, &["referenceRange", "observationRange", "value"]).map(|v| ReferenceRange {
                low: child(v, "low")
                    .and_then(|l| l.attribute("value"))
                    .map(str::to_owned),
                high: child(v, "high")
                    .and_then(|h| h.attribute("value"))
                    .map(str::to_owned),
                unit: child(v, "low")
                    .or_else(|| child(v, "high"))
                    .and_then(|b| b.attribute("unit"))
                    .map(str::to_owned),
            });
        // Groups nest one or two levels; a hostile document cannot recurse without bound.
        let members = if depth < 8 {
            children(node, "entryRelationship")
                .filter_map(|r| {
                    let member = child(r, "observation")?;
                    Some((
                        r.attribute("typeCode").unwrap_or("COMP").to_owned(),
                        self.observation(member, depth + 1),
                    ))
                })
                .collect()
        } else {
            Vec::new()
        };
        Observation {
            code,
            null_flavor: node.attribute("nullFlavor").map(str::to_owned),
            value,
            effective_date: child(node, "effectiveTime")
                .and_then(|t| ts_date(t).or_else(|| child(t, "low").and_then(ts_date))),
            methods: children(node, "methodCode")
                .filter_map(|m| code_of(m, Some(METHOD_CODE_OID)))
                .collect(),
            interpretations: children(node, "interpretationCode")
                .filter_map(|i| code_of(i, None))
                .collect(),
            reference_range,
            members,
            line: self.line_at(node.range().start),
        }
    }
}

fn value_of(value: Node) -> ObservationValue {
    let xsi_type = value
        .attribute((XSI, "type"))
        .map(|t| t.rsplit(':').next().unwrap_or(t).to_owned());
    if let Some(null_flavor) = value.attribute("nullFlavor") {
        return ObservationValue::Null {
            xsi_type,
            null_flavor: null_flavor.to_owned(),
        };
    }
    match xsi_type.as_deref() {
        Some("PQ") => ObservationValue::Quantity {
            value: value.attribute("value").unwrap_or("").to_owned(),
            unit: value.attribute("unit").map(str::to_owned),
        },
        Some(t @ ("CD" | "CO" | "CE" | "CV" | "CS")) => ObservationValue::Coded {
            xsi_type: t.to_owned(),
            code: Code {
                code: value.attribute("code").unwrap_or("").to_owned(),
                system: value.attribute("codeSystem").map(str::to_owned),
                display: value.attribute("displayName").map(str::to_owned),
            },
        },
        Some("ST") => ObservationValue::Text(text_of(value)),
        other => ObservationValue::Other {
            xsi_type: other.unwrap_or("").to_owned(),
            raw: value
                .attributes()
                .filter(|a| a.namespace() != Some(XSI))
                .map(|a| format!("{}={}", a.name(), a.value()))
                .chain(Some(text_of(value)).filter(|t| !t.is_empty()))
                .collect::<Vec<_>>()
                .join(" "),
        },
    }
}

fn patient_of(patient_role: Node) -> Patient {
    let patient = child(patient_role, "patient");
    let mut name = None;
    let mut name_kana = None;
    for n in patient.into_iter().flat_map(|p| children(p, "name")) {
        let text = text_of(n);
        if text.is_empty() {
            continue;
        }
        let is_kana = n.attribute("use") == Some("SYL")
            || (n.attribute("use").is_none() && is_katakana(&text));
        let slot = if is_kana { &mut name_kana } else { &mut name };
        slot.get_or_insert(text);
    }
    Patient {
        name,
        name_kana,
        birth_date: patient
            .and_then(|p| child(p, "birthTime"))
            .and_then(ts_date),
        sex: patient
            .and_then(|p| child(p, "administrativeGenderCode"))
            .and_then(|c| code_of(c, None)),
        address: child(patient_role, "addr")
            .map(address_of)
            .unwrap_or_default(),
    }
}

fn organization_of(org: Node) -> Organization {
    Organization {
        number: children(org, "id")
            .find(|id| id.attribute("root") == Some(INSTITUTION_NUMBER_OID))
            .and_then(|id| id.attribute("extension"))
            .map(str::to_owned),
        name: child(org, "name").map(text_of).filter(|t| !t.is_empty()),
        telecom: child(org, "telecom")
            .and_then(|t| t.attribute("value"))
            .map(str::to_owned),
        address: child(org, "addr").map(address_of).unwrap_or_default(),
    }
}

fn address_of(addr: Node) -> Address {
    let text: String = addr
        .children()
        .filter(|n| n.is_text())
        .filter_map(|n| n.text())
        .collect::<String>()
        .trim()
        .to_owned();
    Address {
        postal_code: child(addr, "postalCode")
            .map(text_of)
            .filter(|t| !t.is_empty()),
        text: (!text.is_empty()).then_some(text),
    }
}

fn is_katakana(s: &str) -> bool {
    s.chars()
        .all(|c| matches!(c, '\u{30A0}'..='\u{30FF}' | '\u{FF66}'..='\u{FF9F}' | ' ' | '\u{3000}'))
}

fn instance_id(id: Node) -> Option<InstanceId> {
    if id.attribute("nullFlavor").is_some() {
        return None;
    }
    Some(InstanceId {
        root: id.attribute("root")?.to_owned(),
        extension: id.attribute("extension").map(str::to_owned),
    })
}

/// A coded element; `default_system` is the XSD's default or fixed `codeSystem`.
fn code_of(node: Node, default_system: Option<&str>) -> Option<Code> {
    let code = node.attribute("code")?;
    Some(Code {
        code: code.to_owned(),
        system: node
            .attribute("codeSystem")
            .or(default_system)
            .map(str::to_owned),
        display: node.attribute("displayName").map(str::to_owned),
    })
}

/// `YYYYMMDD…` → `YYYY-MM-DD`.
pub(crate) fn ts_date(node: Node) -> Option<String> {
    hl7_date(node.attribute("value")?)
}

pub(crate) fn hl7_date(value: &str) -> Option<String> {
    let digits = value.get(..8)?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (y, m, d) = (&digits[..4], &digits[4..6], &digits[6..8]);
    let month: u8 = m.parse().ok()?;
    let day: u8 = d.parse().ok()?;
    ((1..=12).contains(&month) && (1..=31).contains(&day)).then(|| format!("{y}-{m}-{d}"))
}

fn text_of(node: Node) -> String {
    node.descendants()
        .filter(|n| n.is_text())
        .filter_map(|n| n.text())
        .collect::<String>()
        .trim()
        .to_owned()
}

fn is_hl7(node: &Node, name: &str) -> bool {
    node.is_element() && node.tag_name().name() == name && node.tag_name().namespace() == Some(HL7)
}

fn child<'a, 'input>(node: Node<'a, 'input>, name: &str) -> Option<Node<'a, 'input>> {
    node.children().find(|n| is_hl7(n, name))
}

fn children<'a, 'input: 'a>(
    node: Node<'a, 'input>,
    name: &'a str,
) -> impl Iterator<Item = Node<'a, 'input>> + 'a {
    node.children().filter(move |n| is_hl7(n, name))
}

fn path<'a, 'input>(node: Node<'a, 'input>, names: &[&str]) -> Option<Node<'a, 'input>> {
    names.iter().try_fold(node, |n, name| child(n, name))
}
