//! The one error type of the 特定健診 CDA module, and the item-level findings that do not stop
//! a conversion.

use std::fmt;

/// Why a document, an archive or one of its entries could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CdaError {
    #[error("input is {size} bytes; the limit is {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("input is not UTF-8 (first invalid byte at offset {offset})")]
    NotUtf8 { offset: usize },
    #[error("input is not well-formed XML: {0}")]
    Malformed(String),
    #[error("root element is {found}, expected {expected}")]
    WrongRoot {
        found: String,
        expected: &'static str,
    },
    #[error("document fails the XSD: {}", SchemaViolations(.0))]
    SchemaInvalid(Vec<SchemaViolation>),
    #[error("the embedded XSD could not be prepared: {0}")]
    SchemaSetup(String),
    #[error("required element missing: {0}")]
    Missing(&'static str),
    #[error("{path}: {reason}")]
    Invalid { path: String, reason: String },
    #[error("exchange archive is not a readable ZIP: {0}")]
    Zip(String),
    #[error("exchange archive entry name {0:?} is unsafe (absolute, backslash or '..')")]
    UnsafeEntryName(String),
    #[error("exchange archive entry {name:?} is larger than {limit} bytes when unpacked")]
    EntryTooLarge { name: String, limit: u64 },
    #[error("exchange archive has {count} entries; the limit is {limit}")]
    TooManyEntries { count: usize, limit: usize },
    #[error("exchange archive index: {0}")]
    BadIndex(String),
    #[error("exchange archive index counts {declared} records but the archive holds {found}")]
    CountMismatch { declared: u64, found: u64 },
}

/// One XSD violation: where it is and what libxml2 said about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaViolation {
    /// 1-based line in the document, when libxml2 knows it.
    pub line: Option<u32>,
    /// Element path such as `/ClinicalDocument/recordTarget/patientRole/id[2]`, when the line
    /// identifies an element.
    pub path: Option<String>,
    pub message: String,
}

impl fmt::Display for SchemaViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.line, &self.path) {
            (Some(line), Some(path)) => write!(f, "line {line} {path}: {}", self.message),
            (Some(line), None) => write!(f, "line {line}: {}", self.message),
            (None, Some(path)) => write!(f, "{path}: {}", self.message),
            (None, None) => f.write_str(&self.message),
        }
    }
}

struct SchemaViolations<'a>(&'a [SchemaViolation]);

impl fmt::Display for SchemaViolations<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, violation) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{violation}")?;
        }
        Ok(())
    }
}

/// A result item that could not be converted faithfully. The rest of the document still
/// converts; the caller decides whether to keep the Bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemError {
    /// The 17-digit item code as written in the document (may be empty when it was missing).
    pub item_code: String,
    /// 1-based line of the observation in the document.
    pub line: u32,
    pub reason: ItemErrorReason,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ItemErrorReason {
    /// The code is not in the item table (XMLhc24tab).
    UnknownItem,
    /// The observation code uses a code system other than 1.2.392.200119.6.1005.
    ForeignCodeSystem(String),
    /// The value's xsi:type is not the table's XML data type.
    WrongType { expected: String, found: String },
    /// The unit is neither the table's display unit nor its UCUM code.
    WrongUnit { expected: String, found: String },
    /// The value does not fit the table's format (digits, decimals, length) or is unreadable.
    BadValue(String),
    /// A coded answer uses a code system other than the table's result code OID.
    WrongAnswerSystem { expected: String, found: String },
}

impl fmt::Display for ItemError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "item {} (line {}): ", self.item_code, self.line)?;
        match &self.reason {
            ItemErrorReason::UnknownItem => f.write_str("not in the item table"),
            ItemErrorReason::ForeignCodeSystem(s) => {
                write!(f, "code system {s} is not 1.2.392.200119.6.1005")
            }
            ItemErrorReason::WrongType { expected, found } => {
                write!(f, "value type {found}, the table says {expected}")
            }
            ItemErrorReason::WrongUnit { expected, found } => {
                write!(f, "unit {found:?}, the table says {expected:?}")
            }
            ItemErrorReason::BadValue(why) => write!(f, "bad value: {why}"),
            ItemErrorReason::WrongAnswerSystem { expected, found } => {
                write!(f, "answer code system {found}, the table says {expected}")
            }
        }
    }
}
