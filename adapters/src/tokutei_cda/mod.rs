//! 特定健診 (specific health checkup) results in the MHLW HL7 CDA format (特定健診情報ファイル,
//! hc08, 第4期) → a 健康診断結果報告書 FHIR `document` Bundle (JP eCheckupReport IG).
//!
//! Pure functions, no I/O except the schema cache (see [`schema`]):
//!
//! - [`validate`]: the document against `hc08_V08.xsd` with libxml2; violations list line
//!   and element path.
//! - [`parse`]: the document into a [`CheckupDocument`] (XSD default code systems applied).
//! - [`to_fhir_bundle`]: the Bundle as `serde_json::Value`, plus item-level errors for
//!   results that do not fit the item table (XMLhc24tab); those results are left out and
//!   the rest converts.
//! - [`CheckupDocument::reconciliation_key`]: (機関番号, 実施日, 被保険者証) to recognise
//!   the same checkup arriving from two sources.
//! - [`read_exchange_zip`]: the MHLW exchange archive (index checked against ix08_V08.xsd,
//!   record count checked, hostile entries refused); each data file's bytes for the above.
//!
//! Input larger than [`MAX_DOCUMENT_BYTES`] (8 MiB; a real file is 10–50 KB) or not UTF-8
//! (the MHLW format mandates UTF-8) is refused before any XML parsing.
//!
//! Building needs libxml2's development files and pkg-config, and libclang for the binding
//! generator (Debian: `libxml2-dev pkg-config libclang-dev`).

mod bundle;
mod error;
mod exchange;
mod items;
mod model;
mod parse;
mod schema;

#[cfg(test)]
mod generator;
#[cfg(test)]
mod tests;

pub use bundle::{Conversion, CDA_CONTENT_TYPE};
pub use error::{CdaError, ItemError, ItemErrorReason, SchemaViolation};
pub use exchange::{
    ArchiveDocument, ExchangeArchive, ExchangeIndex, MAX_ARCHIVE_BYTES, MAX_ARCHIVE_ENTRIES,
    MAX_UNPACKED_BYTES,
};
pub use items::{
    GroupMembership, ItemDefinition, ItemTable, ValueType, ITEM_CODE_OID, METHOD_CODE_OID,
};
pub use model::{
    Address, Author, CheckupDocument, Code, InstanceId, Insurance, Observation, ObservationValue,
    Organization, Patient, ReconciliationKey, ReferenceRange, Section, Voucher,
};

/// Largest document accepted, in bytes.
pub const MAX_DOCUMENT_BYTES: usize = 8 * 1024 * 1024;

/// Validates a 特定健診情報ファイル against `hc08_V08.xsd`.
pub fn validate(xml: &[u8]) -> Result<(), CdaError> {
    let text = check_input(xml)?;
    // Well-formedness and the DTD refusal first, so libxml2 only sees plain documents.
    parse::parse_tree(text)?;
    schema::validate_against(schema::SchemaKind::CheckupDocument, text)
}

/// Reads a 特定健診情報ファイル. Does not validate against the XSD; call [`validate`] first
/// when the source is not trusted to send valid files.
pub fn parse(xml: &[u8]) -> Result<CheckupDocument, CdaError> {
    parse::parse_document(check_input(xml)?)
}

/// Maps a parsed document to a FHIR document Bundle; `original_xml` is attached as the
/// DocumentReference's content. Never fails: results that cannot be converted are reported
/// in [`Conversion::item_errors`] and left out.
pub fn to_fhir_bundle(doc: &CheckupDocument, original_xml: &[u8]) -> Conversion {
    bundle::convert(doc, original_xml)
}

/// Reads an MHLW exchange archive (ZIP).
pub fn read_exchange_zip(bytes: &[u8]) -> Result<ExchangeArchive, CdaError> {
    exchange::read(bytes)
}

/// Size limit, then UTF-8 (a leading BOM is dropped).
fn check_input(xml: &[u8]) -> Result<&str, CdaError> {
    if xml.len() > MAX_DOCUMENT_BYTES {
        return Err(CdaError::TooLarge {
            size: xml.len(),
            limit: MAX_DOCUMENT_BYTES,
        });
    }
    let text = std::str::from_utf8(xml).map_err(|e| CdaError::NotUtf8 {
        offset: e.valid_up_to(),
    })?;
    Ok(text.strip_prefix('\u{feff}').unwrap_or(text))
}
