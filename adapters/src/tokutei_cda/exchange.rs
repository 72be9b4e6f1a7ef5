//! The MHLW exchange archive (提出用 ZIP): an index `ix08_V08.xml`, a summary
//! `su08_V08.xml`, and the data files under `DATA/` (特定健診情報ファイル `h…xml`, and
//! claim files). Only what the gateway needs is read: the index (validated against
//! ix08_V08.xsd and counted against the data files) and each data file's bytes.
//!
//! Hostile archives are refused: entry names that could escape a directory, more entries
//! than any real submission has, and entries that unpack beyond the document size limit
//! (checked while reading, since a ZIP header's size can lie).

use std::io::{Cursor, Read};

use super::error::CdaError;
use super::schema::{validate_against, SchemaKind};
use super::{check_input, MAX_DOCUMENT_BYTES};

const INDEX_NAMESPACE: &str = "https://www.mhlw.go.jp/stf/seisakunitsuite/bunya/0000161103.html";
/// Largest archive accepted (packed).
pub const MAX_ARCHIVE_BYTES: usize = 256 * 1024 * 1024;
/// Most entries accepted; a submission holds at most a few thousand files.
pub const MAX_ARCHIVE_ENTRIES: usize = 20_000;
/// Most bytes unpacked from one archive in total.
pub const MAX_UNPACKED_BYTES: u64 = 1024 * 1024 * 1024;

/// What the index (ix08) says about the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExchangeIndex {
    /// 種別 (interactionType/@code).
    pub interaction_type: String,
    /// 作成日, `YYYY-MM-DD`.
    pub creation_date: String,
    /// Sender id: OID (機関番号 1.2.392.200119.6.102, 保険者番号 …101) and number.
    pub sender_root: String,
    pub sender_id: String,
    pub receiver_root: Option<String>,
    pub receiver_id: Option<String>,
    /// 実施区分 (serviceEventType/@code).
    pub service_event_type: String,
    /// Number of data files under `DATA/`.
    pub total_record_count: u64,
}

/// A data file of the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveDocument {
    /// Path inside the archive, e.g. `1311234567_00263129_202404050_1/DATA/h1311234567_….xml`.
    pub path: String,
    /// True for a 特定健診情報ファイル (file name starting with `h`); false for claim files.
    pub is_checkup_result: bool,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExchangeArchive {
    pub index: ExchangeIndex,
    /// The summary (su08) when present; validated against su08_V08.xsd.
    pub summary: Option<Vec<u8>>,
    pub documents: Vec<ArchiveDocument>,
    /// Other files (e.g. the XSD folder), by path; not read.
    pub other_entries: Vec<String>,
}

impl ExchangeArchive {
    /// The 特定健診情報ファイル of the archive, for [`super::parse`] / [`super::validate`].
    pub fn checkup_documents(&self) -> impl Iterator<Item = &ArchiveDocument> {
        self.documents.iter().filter(|d| d.is_checkup_result)
    }
}

pub(crate) fn read(bytes: &[u8]) -> Result<ExchangeArchive, CdaError> {
    if bytes.len() > MAX_ARCHIVE_BYTES {
        return Err(CdaError::TooLarge {
            size: bytes.len(),
            limit: MAX_ARCHIVE_BYTES,
        });
    }
    let mut archive =
        zip::ZipArchive::new(Cursor::new(bytes)).map_err(|e| CdaError::Zip(e.to_string()))?;
    if archive.len() > MAX_ARCHIVE_ENTRIES {
        return Err(CdaError::TooManyEntries {
            count: archive.len(),
            limit: MAX_ARCHIVE_ENTRIES,
        });
    }
    let mut index_bytes = None;
    let mut summary = None;
    let mut documents = Vec::new();
    let mut other_entries = Vec::new();
    let mut unpacked_total = 0u64;
    for i in 0..archive.len() {
        let mut entry = archive
            .by_index(i)
            .map_err(|e| CdaError::Zip(e.to_string()))?;
        let name = entry.name().to_owned();
        check_entry_name(&name)?;
        if entry.is_dir() {
            continue;
        }
        let file_name = name.rsplit('/').next().unwrap_or(&name);
        let lower = file_name.to_ascii_lowercase();
        let in_data = name
            .split('/')
            .any(|part| part.eq_ignore_ascii_case("DATA"));
        let wanted = lower == "ix08_v08.xml"
            || lower == "su08_v08.xml"
            || (in_data && lower.ends_with(".xml"));
        if !wanted {
            other_entries.push(name);
            continue;
        }
        let limit = MAX_DOCUMENT_BYTES as u64;
        if entry.size() > limit {
            return Err(CdaError::EntryTooLarge { name, limit });
        }
        // The header's size is only a claim: cap what is actually inflated.
        let mut content = Vec::new();
        (&mut entry)
            .take(limit + 1)
            .read_to_end(&mut content)
            .map_err(|e| CdaError::Zip(format!("{name}: {e}")))?;
        if content.len() as u64 > limit {
            return Err(CdaError::EntryTooLarge { name, limit });
        }
        unpacked_total += content.len() as u64;
        if unpacked_total > MAX_UNPACKED_BYTES {
            return Err(CdaError::EntryTooLarge {
                name,
                limit: MAX_UNPACKED_BYTES,
            });
        }
        if lower == "ix08_v08.xml" {
            if index_bytes.replace(content).is_some() {
                return Err(CdaError::BadIndex("more than one ix08_V08.xml".into()));
            }
        } else if lower == "su08_v08.xml" {
            summary = Some(content);
        } else {
            documents.push(ArchiveDocument {
                path: name,
                is_checkup_result: lower.starts_with('h'),
                bytes: content,
            });
        }
    }
    let index_bytes =
        index_bytes.ok_or_else(|| CdaError::BadIndex("ix08_V08.xml is missing".into()))?;
    let index = read_index(&index_bytes)?;
    if let Some(summary) = &summary {
        let text = check_input(summary)?;
        validate_against(SchemaKind::ExchangeSummary, text)
            .map_err(|e| CdaError::BadIndex(format!("su08_V08.xml: {e}")))?;
    }
    if index.total_record_count != documents.len() as u64 {
        return Err(CdaError::CountMismatch {
            declared: index.total_record_count,
            found: documents.len() as u64,
        });
    }
    Ok(ExchangeArchive {
        index,
        summary,
        documents,
        other_entries,
    })
}

/// Refuses names that could be written outside a target directory if anyone unpacked them.
fn check_entry_name(name: &str) -> Result<(), CdaError> {
    let unsafe_name = name.is_empty()
        || name.starts_with('/')
        || name.contains('\\')
        || name.contains('\0')
        || name.contains(':')
        || name.split('/').any(|part| part == "..");
    if unsafe_name {
        return Err(CdaError::UnsafeEntryName(name.to_owned()));
    }
    Ok(())
}

fn read_index(bytes: &[u8]) -> Result<ExchangeIndex, CdaError> {
    let text = check_input(bytes).map_err(|e| CdaError::BadIndex(e.to_string()))?;
    validate_against(SchemaKind::ExchangeIndex, text)
        .map_err(|e| CdaError::BadIndex(e.to_string()))?;
    let tree = super::parse::parse_tree(text).map_err(|e| CdaError::BadIndex(e.to_string()))?;
    let root = tree.root_element();
    let find = |name: &str| {
        root.children().find(|n| {
            n.is_element()
                && n.tag_name().name() == name
                && n.tag_name().namespace() == Some(INDEX_NAMESPACE)
        })
    };
    let attr = |element: &str, attribute: &str| -> Result<String, CdaError> {
        find(element)
            .and_then(|n| n.attribute(attribute))
            .map(str::to_owned)
            .ok_or_else(|| CdaError::BadIndex(format!("{element}/@{attribute} is missing")))
    };
    let id_attr = |element: &str, attribute: &str| {
        find(element)
            .and_then(|n| {
                n.children()
                    .find(|c| c.is_element() && c.tag_name().name() == "id")
            })
            .and_then(|id| id.attribute(attribute))
            .map(str::to_owned)
    };
    let creation = attr("creationTime", "value")?;
    let total = attr("totalRecordCount", "value")?;
    Ok(ExchangeIndex {
        interaction_type: attr("interactionType", "code")?,
        creation_date: super::parse::hl7_date(&creation).ok_or_else(|| {
            CdaError::BadIndex(format!("creationTime {creation:?} is not YYYYMMDD"))
        })?,
        sender_root: id_attr("sender", "root")
            .ok_or_else(|| CdaError::BadIndex("sender/id is missing".into()))?,
        sender_id: id_attr("sender", "extension")
            .ok_or_else(|| CdaError::BadIndex("sender/id is missing".into()))?,
        receiver_root: id_attr("receiver", "root"),
        receiver_id: id_attr("receiver", "extension"),
        service_event_type: attr("serviceEventType", "code")?,
        total_record_count: total.parse().map_err(|_| {
            CdaError::BadIndex(format!("totalRecordCount {total:?} is not a number"))
        })?,
    })
}
