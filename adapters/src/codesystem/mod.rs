//! Code-system normalisation: Japanese FHIR data names the same code system either by OID
//! (`urn:oid:1.2.392.200119.4.504`) or by URL (`http://medis.or.jp/CodeSystem/master-JLAC10-17digits`).
//! The gateway stores one form, the URL when JP Core / JP-CLINS define one, so that searches
//! and comparisons do not depend on which form a source happened to send.
//!
//! What is rewritten: the string value of every object member named `system`, wherever it
//! occurs (Coding, Identifier, Quantity, `valueCoding`, `valueIdentifier`, contained
//! resources, extensions, Bundle entries…), when it is a known OID. The JP Core example
//! twins show why the rule is that wide: JP Core itself rewrites `Identifier.system`
//! (RP番号, 医籍登録番号, 医療機関コード) and `Quantity.system` (MERIT-9 units) as well as
//! `Coding.system`. What is safe anyway: UCUM (`http://unitsofmeasure.org`) is a URL and
//! so never changes, `ContactPoint.system` holds codes like `phone`, and OIDs with a
//! per-institution branch (`urn:oid:1.2.392.100495.20.3.51.1…`) are not in the table
//! because only exact OIDs match.

mod splice;
mod table;

#[cfg(test)]
mod fixture_tests;
#[cfg(test)]
mod tests;

use std::borrow::Cow;

use serde_json::Value;

pub use table::{known_code_systems, CodeSystemName, SystemKind};

/// JP Core's identifier systems of a prescription's Rp (剤グループ) number and of a drug's
/// place within its Rp, which JP_MedicationRequest and JP_MedicationDispense require.
pub const RP_NUMBER_SYSTEM: &str =
    "http://jpfhir.jp/fhir/core/mhlw/IdSystem/Medication-RPGroupNumber";
pub const ORDER_IN_RP_SYSTEM: &str =
    "http://jpfhir.jp/fhir/core/mhlw/IdSystem/MedicationAdministrationIndex";

/// The member name whose string value is a code-system (or identifier-system) reference.
const SYSTEM_MEMBER: &str = "system";

/// How an OID is written as a URI (RFC 3001).
const OID_URN_PREFIX: &str = "urn:oid:";

/// What normalisation changed, for audit and tests.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NormalizationReport {
    /// `(JSON pointer, from, to)` for every rewritten `system`, in document order.
    pub changed: Vec<(String, String, String)>,
}

impl NormalizationReport {
    /// True when normalisation left the resource as it was.
    pub fn is_unchanged(&self) -> bool {
        self.changed.is_empty()
    }
}

/// Why [`normalize_json_bytes`] could not normalise a body.
#[derive(Debug, thiserror::Error)]
pub enum NormalizeError {
    /// The body does not parse as JSON.
    #[error("body is not valid JSON: {0}")]
    InvalidJson(#[source] serde_json::Error),
    /// The normalised value could not be written back (not expected for parsed JSON).
    #[error("could not serialise the normalised body: {0}")]
    Reserialize(#[source] serde_json::Error),
}

/// The OID part of a `system` value, with or without the `urn:oid:` prefix. The prefix is
/// matched case-insensitively because URN scheme and namespace are case-insensitive
/// (RFC 8141).
fn oid_part(system: &str) -> &str {
    let split = OID_URN_PREFIX.len();
    match (system.get(..split), system.get(split..)) {
        (Some(prefix), Some(oid)) if prefix.eq_ignore_ascii_case(OID_URN_PREFIX) => oid,
        _ => system,
    }
}

/// The table entry whose OIDs include `oid` (exact match: a branch below a known OID is a
/// different namespace).
fn find_by_oid(oid: &str) -> Option<&'static CodeSystemName> {
    // Every OID starts with a digit; this skips the scan for URLs and codes like `phone`.
    if !oid.starts_with(|c: char| c.is_ascii_digit()) {
        return None;
    }
    // A linear scan is fine: the table has a few dozen entries and only OID-shaped
    // values get here.
    known_code_systems()
        .iter()
        .find(|entry| entry.oids.contains(&oid))
}

/// The canonical URL for `system` when it is an OID (bare or `urn:oid:`) of a known code
/// system; `None` when `system` is already canonical or unknown, i.e. when normalisation
/// leaves it alone.
pub fn url_for_oid(system: &str) -> Option<&'static str> {
    find_by_oid(oid_part(system)).map(|entry| entry.url)
}

/// The known code system that `system` names in any of its forms: OID (bare or
/// `urn:oid:`), canonical URL, or one of its other URLs.
pub fn find_code_system(system: &str) -> Option<&'static CodeSystemName> {
    find_by_oid(oid_part(system)).or_else(|| {
        known_code_systems()
            .iter()
            .find(|entry| entry.url == system || entry.other_urls.contains(&system))
    })
}

/// The canonical form of a `system` value: `urn:oid:X` (or bare `X`) -> its URL when known;
/// a known URL stays; anything else unchanged.
///
/// Always `Cow::Borrowed`: the canonical URL is a `'static` table entry, so nothing is
/// allocated. Compare with the input (or use [`url_for_oid`]) to learn whether it changed.
pub fn canonical_system(system: &str) -> Cow<'_, str> {
    Cow::Borrowed(url_for_oid(system).unwrap_or(system))
}

/// One step of the path from the resource root to a node.
#[derive(Clone, Copy)]
enum PathToken<'a> {
    Member(&'a str),
    Index(usize),
}

/// The RFC 6901 JSON pointer for a path.
fn json_pointer(path: &[PathToken<'_>]) -> String {
    let mut pointer = String::new();
    for token in path {
        pointer.push('/');
        match token {
            PathToken::Member(name) => {
                for c in name.chars() {
                    match c {
                        '~' => pointer.push_str("~0"),
                        '/' => pointer.push_str("~1"),
                        other => pointer.push(other),
                    }
                }
            }
            PathToken::Index(index) => pointer.push_str(&index.to_string()),
        }
    }
    pointer
}

/// A node still to visit: how long its parent's path is, the step to it, the value, and
/// whether it is the value of a `system` member (the only strings we may rewrite).
struct PendingNode<'a> {
    parent_path_len: usize,
    token: Option<PathToken<'a>>,
    value: &'a mut Value,
    is_system_member: bool,
}

/// Rewrites every code-system reference in a FHIR resource in place: the string value of
/// every `system` member that is a known OID becomes its URL. Everything else (unknown
/// fields, extensions, key order, other `system` values) is left exactly as it was.
pub fn normalize_resource(resource: &mut Value) -> NormalizationReport {
    let mut report = NormalizationReport::default();
    // An explicit stack rather than recursion: a Value built in memory (not parsed) has no
    // nesting limit, and recursion could overflow the thread's stack. The path is kept as
    // tokens and only spelled out as a pointer when something changes.
    let mut path: Vec<PathToken<'_>> = Vec::new();
    let mut pending = vec![PendingNode {
        parent_path_len: 0,
        token: None,
        value: resource,
        is_system_member: false,
    }];
    while let Some(node) = pending.pop() {
        path.truncate(node.parent_path_len);
        path.extend(node.token);
        match node.value {
            Value::String(system) if node.is_system_member => {
                if let Some(url) = url_for_oid(system) {
                    let from = std::mem::replace(system, url.to_owned());
                    report
                        .changed
                        .push((json_pointer(&path), from, url.to_owned()));
                }
            }
            // Children are pushed in reverse so they are popped, and reported, in document
            // order.
            Value::Object(members) => {
                for (name, member) in members.iter_mut().rev() {
                    let is_system_member = name == SYSTEM_MEMBER;
                    if is_system_member || is_container(member) {
                        pending.push(PendingNode {
                            parent_path_len: path.len(),
                            token: Some(PathToken::Member(name)),
                            value: member,
                            is_system_member,
                        });
                    }
                }
            }
            Value::Array(items) => {
                for (index, item) in items.iter_mut().enumerate().rev() {
                    if is_container(item) {
                        pending.push(PendingNode {
                            parent_path_len: path.len(),
                            token: Some(PathToken::Index(index)),
                            value: item,
                            is_system_member: false,
                        });
                    }
                }
            }
            _ => {}
        }
    }
    report
}

fn is_container(value: &Value) -> bool {
    matches!(value, Value::Object(_) | Value::Array(_))
}

/// Convenience for the store: parse bytes, normalise, and produce new bytes ONLY if
/// something changed; otherwise return the input bytes untouched (so a body with nothing
/// to normalise is kept byte for byte as received). Errors on non-JSON input.
///
/// When something changed, only the rewritten `system` strings differ from the input:
/// whitespace, escapes, key order and number spellings are kept. That matters because
/// serde_json without `arbitrary_precision` would re-print a FHIR decimal `1.50` as `1.5`,
/// and FHIR decimals carry their precision in their spelling.
pub fn normalize_json_bytes(
    body: &[u8],
) -> Result<(Cow<'_, [u8]>, NormalizationReport), NormalizeError> {
    let mut resource: Value = serde_json::from_slice(body).map_err(NormalizeError::InvalidJson)?;
    let report = normalize_resource(&mut resource);
    if report.is_unchanged() {
        return Ok((Cow::Borrowed(body), report));
    }
    let rewritten = match splice::rewrite_system_strings(body) {
        // The splice applies the same rule to the raw text; if its count disagrees with the
        // parsed view (duplicate keys, which serde_json collapses), trust the parsed view.
        Some(spliced) if spliced.replacements == report.changed.len() => spliced.bytes,
        _ => serde_json::to_vec(&resource).map_err(NormalizeError::Reserialize)?,
    };
    Ok((Cow::Owned(rewritten), report))
}
