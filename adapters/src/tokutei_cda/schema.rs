//! Real XSD validation with libxml2 against the MHLW schemas shipped in the repository.
//!
//! The schemas are compiled into the binary (`include_bytes!`) and written once into a
//! per-content cache directory under the system temp dir (`phr-tokutei-cda-xsd-<hash>`).
//! Why a directory and not memory: `hc08_V08.xsd` pulls in its core schemas with
//! `xs:include schemaLocation="./coreschemas/…"`, which libxml2 resolves relative to the
//! schema's own location; loading from memory would need a process-global entity loader.
//! Why embedded and not a caller-given directory: the gateway then needs no deployment
//! step, and the hash in the directory name means a stale or different copy is never used.
//!
//! libxml2 validation contexts are not thread-safe, so each thread compiles the schema once
//! and keeps its own context (`thread_local!`); compiling takes a fraction of a second.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libxml::parser::{Parser, ParserOptions, XmlParseFailure};
use libxml::schemas::{SchemaParserContext, SchemaValidationContext};
use sha2::{Digest, Sha256};

use super::error::{CdaError, SchemaViolation};

/// Schema files, by path relative to the schema directory.
const SCHEMA_FILES: &[(&str, &[u8])] = &[
    (
        "hc08_V08.xsd",
        include_bytes!("../../../fixtures/tokutei-cda/XSD/hc08_V08.xsd"),
    ),
    (
        "ix08_V08.xsd",
        include_bytes!("../../../fixtures/tokutei-cda/XSD/ix08_V08.xsd"),
    ),
    (
        "su08_V08.xsd",
        include_bytes!("../../../fixtures/tokutei-cda/XSD/su08_V08.xsd"),
    ),
    (
        "co08_V08.xsd",
        include_bytes!("../../../fixtures/tokutei-cda/XSD/co08_V08.xsd"),
    ),
    (
        "coreschemas/datatypes-base_hcgv08.xsd",
        include_bytes!("../../../fixtures/tokutei-cda/XSD/coreschemas/datatypes-base_hcgv08.xsd"),
    ),
    (
        "coreschemas/datatypes_hcgv08.xsd",
        include_bytes!("../../../fixtures/tokutei-cda/XSD/coreschemas/datatypes_hcgv08.xsd"),
    ),
    (
        "coreschemas/narrativeBlock_hcgv08.xsd",
        include_bytes!("../../../fixtures/tokutei-cda/XSD/coreschemas/narrativeBlock_hcgv08.xsd"),
    ),
    (
        "coreschemas/voc_hcgv08.xsd",
        include_bytes!("../../../fixtures/tokutei-cda/XSD/coreschemas/voc_hcgv08.xsd"),
    ),
];

/// Which of the MHLW schemas to validate against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchemaKind {
    /// 特定健診情報ファイル (HL7 CDA R2 subset).
    CheckupDocument,
    /// Exchange archive index (ix08).
    ExchangeIndex,
    /// Exchange archive summary (su08).
    ExchangeSummary,
}

impl SchemaKind {
    fn file_name(self) -> &'static str {
        match self {
            SchemaKind::CheckupDocument => "hc08_V08.xsd",
            SchemaKind::ExchangeIndex => "ix08_V08.xsd",
            SchemaKind::ExchangeSummary => "su08_V08.xsd",
        }
    }
}

/// Writes the embedded schemas into their cache directory (once per process) and returns it.
fn schema_dir() -> Result<&'static Path, CdaError> {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(materialise)
        .as_ref()
        .map(PathBuf::as_path)
        .map_err(|e| CdaError::SchemaSetup(e.clone()))
}

fn materialise() -> Result<PathBuf, String> {
    let mut hasher = Sha256::new();
    for (name, bytes) in SCHEMA_FILES {
        hasher.update(name.as_bytes());
        hasher.update((bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    }
    let hash: String = hasher.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let dir = std::env::temp_dir().join(format!("phr-tokutei-cda-xsd-{hash}"));
    for (name, bytes) in SCHEMA_FILES {
        let path = dir.join(name);
        if std::fs::read(&path).is_ok_and(|existing| existing == *bytes) {
            continue;
        }
        let parent = path.parent().unwrap_or(&dir);
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        // Write then rename, so a concurrent process never reads a half-written schema.
        let partial = parent.join(format!(
            ".{}.{}.partial",
            std::process::id(),
            file_stem(name)
        ));
        std::fs::write(&partial, bytes).map_err(|e| format!("{}: {e}", partial.display()))?;
        std::fs::rename(&partial, &path).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(dir)
}

fn file_stem(name: &str) -> &str {
    name.rsplit('/').next().unwrap_or(name)
}

/// A compiled schema with its validation context, owned by one thread.
struct Validator {
    context: SchemaValidationContext,
}

impl Validator {
    fn compile(kind: SchemaKind) -> Result<Validator, CdaError> {
        let path = schema_dir()?.join(kind.file_name());
        let path = path.to_str().ok_or_else(|| {
            CdaError::SchemaSetup(format!("schema path {} is not UTF-8", path.display()))
        })?;
        let mut parser = SchemaParserContext::from_file(path);
        let context = SchemaValidationContext::from_parser(&mut parser).map_err(|errors| {
            let messages: Vec<String> = errors
                .iter()
                .filter_map(|e| e.message.as_deref().map(str::trim).map(str::to_owned))
                .collect();
            CdaError::SchemaSetup(format!(
                "{} does not compile: {}",
                kind.file_name(),
                messages.join("; ")
            ))
        })?;
        Ok(Validator { context })
    }
}

thread_local! {
    static VALIDATORS: RefCell<Vec<(SchemaKind, Validator)>> = const { RefCell::new(Vec::new()) };
}

/// Validates well-formed UTF-8 XML against one of the MHLW schemas.
pub(crate) fn validate_against(kind: SchemaKind, xml: &str) -> Result<(), CdaError> {
    let options = ParserOptions {
        recover: false,
        no_net: true,
        no_error: true,
        no_warning: true,
        encoding: Some("UTF-8"),
        ..ParserOptions::default()
    };
    let document = match Parser::default().parse_string_with_diagnostics(xml.as_bytes(), options) {
        Ok((document, _)) => document,
        Err(XmlParseFailure::ParseFailed(errors)) => {
            let first = errors.iter().find_map(|e| {
                e.message
                    .as_deref()
                    .map(|m| format!("line {}: {}", e.line.unwrap_or(0), m.trim()))
            });
            return Err(CdaError::Malformed(
                first.unwrap_or_else(|| "unreadable XML".into()),
            ));
        }
        Err(other) => return Err(CdaError::Malformed(format!("{other:?}"))),
    };
    let outcome = VALIDATORS.with(
        |cell| -> Result<Result<(), Vec<libxml::error::StructuredError>>, CdaError> {
            let mut validators = cell.borrow_mut();
            let index = match validators.iter().position(|(k, _)| *k == kind) {
                Some(index) => index,
                None => {
                    validators.push((kind, Validator::compile(kind)?));
                    validators.len() - 1
                }
            };
            let validator = &mut validators[index].1;
            let result = validator.context.validate_document(&document);
            // Errors are collected per call; never let one document's leftovers reach the next.
            validator.context.drain_errors();
            Ok(result)
        },
    )?;
    match outcome {
        Ok(()) => Ok(()),
        Err(errors) => Err(CdaError::SchemaInvalid(locate(xml, &errors))),
    }
}

/// Turns libxml2's messages into violations with element paths, found from the line and the
/// element name libxml2 names in its message.
fn locate(xml: &str, errors: &[libxml::error::StructuredError]) -> Vec<SchemaViolation> {
    let tree = roxmltree::Document::parse(xml).ok();
    errors
        .iter()
        .map(|error| {
            let message = error
                .message
                .as_deref()
                .unwrap_or("schema violation")
                .trim()
                .to_owned();
            let line = error
                .line
                .and_then(|l| u32::try_from(l).ok())
                .filter(|l| *l > 0);
            let path = match (&tree, line) {
                (Some(tree), Some(line)) => element_path_at(tree, line, element_named_in(&message)),
                _ => None,
            };
            SchemaViolation {
                line,
                path,
                message,
            }
        })
        .collect()
}

/// libxml2 writes `Element '{urn:hl7-org:v3}value', attribute 'unit': …`.
fn element_named_in(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("Element '")?;
    let name = &rest[..rest.find('\'')?];
    Some(name.rsplit('}').next().unwrap_or(name))
}

fn element_path_at(tree: &roxmltree::Document, line: u32, name: Option<&str>) -> Option<String> {
    let on_line = tree
        .descendants()
        .filter(|n| n.is_element() && tree.text_pos_at(n.range().start).row == line);
    let mut candidates: Vec<roxmltree::Node> = match name {
        Some(name) => on_line.filter(|n| n.tag_name().name() == name).collect(),
        None => on_line.collect(),
    };
    // Several matches on one line (a document written on a single line): the last one is
    // the innermost, most specific guess; say that it is ambiguous.
    let count = candidates.len();
    let node = candidates.pop()?;
    let path = element_path(node);
    Some(if count > 1 {
        format!("{path} (one of {count} on this line)")
    } else {
        path
    })
}

/// `/ClinicalDocument/component/structuredBody/component[2]/section/entry[5]/observation`.
pub(crate) fn element_path(node: roxmltree::Node) -> String {
    let mut parts = Vec::new();
    for n in node.ancestors().filter(|n| n.is_element()) {
        let name = n.tag_name().name();
        let same_named = |s: &roxmltree::Node| s.is_element() && s.tag_name().name() == name;
        let siblings = n
            .parent()
            .map(|p| p.children().filter(same_named).count())
            .unwrap_or(1);
        if siblings > 1 {
            let position = n.prev_siblings().filter(same_named).count();
            parts.push(format!("{name}[{position}]"));
        } else {
            parts.push(name.to_owned());
        }
    }
    parts.reverse();
    format!("/{}", parts.join("/"))
}
