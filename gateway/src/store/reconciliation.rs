//! The keys under which records from several sources were recognised as one
//! (`reconciliation_keys`): digests only, never clinical values. Dispensings
//! (`crate::medications`) are matched by clinical keys; every reconciled record (dispensings
//! and 特定健診 reports) also has one origin key per source that delivered it, which says
//! whose it is when the patient deletes what one source delivered.

use std::collections::{HashMap, HashSet};

use sha2::{Digest, Sha256};
use sqlx::{AnyConnection, Row};

use crate::checkups::CHECKUP_SOURCE;
use crate::error::Result;
use crate::medications::DISPENSING_SOURCE;

/// The sources whose resources are reconciled records.
const RECONCILED_SOURCES: [&str; 2] = [DISPENSING_SOURCE, CHECKUP_SOURCE];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// The record's identity at the source that delivered it.
    Origin,
    /// What the record is about (a dispensing's day, institution and drug).
    Clinical,
}

impl KeyKind {
    fn code(self) -> &'static str {
        match self {
            KeyKind::Origin => "origin",
            KeyKind::Clinical => "clinical",
        }
    }
}

/// A key to remember: it leads to `target` (the reconciled resource's source id).
#[derive(Debug, Clone)]
pub struct NewKey {
    pub match_key: String,
    pub kind: KeyKind,
    pub target: String,
    pub origin_source: String,
}

/// The key of a record's identity at its source.
pub fn origin_key(source: &str, resource_type: &str, source_resource_id: &str) -> String {
    digest(&["origin", source, resource_type, source_resource_id])
}

/// A short, separator-safe digest of `parts`.
pub fn digest(parts: &[&str]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part.as_bytes());
        hasher.update([0x1f]);
    }
    hex::encode(&hasher.finalize()[..16])
}

/// Remembers keys; a key already known keeps its first target.
pub async fn insert_keys(tx: &mut AnyConnection, patient_id: &str, keys: &[NewKey]) -> Result<()> {
    for key in keys {
        sqlx::query(
            "INSERT INTO reconciliation_keys (patient_id, match_key, kind, target, origin_source)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
        )
        .bind(patient_id)
        .bind(&key.match_key)
        .bind(key.kind.code())
        .bind(&key.target)
        .bind(&key.origin_source)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

/// Records that `origin_source` delivered the reconciled record `target` (`resource_type`).
pub async fn record_origin_in(
    tx: &mut AnyConnection,
    patient_id: &str,
    resource_type: &str,
    target: &str,
    origin_source: &str,
) -> Result<()> {
    let key = NewKey {
        match_key: origin_key(origin_source, resource_type, target),
        kind: KeyKind::Origin,
        target: target.to_string(),
        origin_source: origin_source.to_string(),
    };
    insert_keys(tx, patient_id, &[key]).await
}

/// Forgets a patient's keys (with their data key destroyed, the digests would still say
/// which dispensings they had).
pub async fn forget_patient_in(tx: &mut AnyConnection, patient_id: &str) -> Result<()> {
    sqlx::query("DELETE FROM reconciliation_keys WHERE patient_id = $1")
        .bind(patient_id)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// When the patient deletes what one source delivered: the reconciled records that only this
/// source delivered are deleted (all versions, with their keys); those another source also
/// delivered stay, as that source's record, and only this source's claim on them goes.
/// Returns how many resources were deleted.
pub async fn delete_from_source_in(
    tx: &mut AnyConnection,
    patient_id: &str,
    source: &str,
) -> Result<u64> {
    let targets: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT target FROM reconciliation_keys
         WHERE patient_id = $1 AND kind = 'origin' AND origin_source = $2",
    )
    .bind(patient_id)
    .bind(source)
    .fetch_all(&mut *tx)
    .await?;
    let held_elsewhere = origin_sources_at(tx, patient_id, &targets).await?;
    let mut deleted = 0;
    for target in &targets {
        let shared = held_elsewhere
            .get(target)
            .is_some_and(|sources| sources.iter().any(|s| s != source));
        if shared {
            continue;
        }
        for reconciled in RECONCILED_SOURCES {
            sqlx::query(
                "DELETE FROM resource_versions WHERE resource_id IN
                     (SELECT id FROM resources WHERE patient_id = $1 AND source = $2
                      AND source_resource_id = $3)",
            )
            .bind(patient_id)
            .bind(reconciled)
            .bind(target)
            .execute(&mut *tx)
            .await?;
            deleted += sqlx::query(
                "DELETE FROM resources WHERE patient_id = $1 AND source = $2
                 AND source_resource_id = $3",
            )
            .bind(patient_id)
            .bind(reconciled)
            .bind(target)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        sqlx::query("DELETE FROM reconciliation_keys WHERE patient_id = $1 AND target = $2")
            .bind(patient_id)
            .bind(target)
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query(
        "DELETE FROM reconciliation_keys
         WHERE patient_id = $1 AND kind = 'origin' AND origin_source = $2",
    )
    .bind(patient_id)
    .bind(source)
    .execute(&mut *tx)
    .await?;
    Ok(deleted)
}

const KEYS_PER_STATEMENT: usize = 200;

/// The targets of those of `keys` that are known.
pub async fn known_keys(
    tx: &mut AnyConnection,
    patient_id: &str,
    keys: &[&str],
) -> Result<HashMap<String, String>> {
    let mut known = HashMap::new();
    for chunk in keys.chunks(KEYS_PER_STATEMENT) {
        let sql = format!(
            "SELECT match_key, target FROM reconciliation_keys
             WHERE patient_id = $1 AND match_key IN ({})",
            numbered(chunk.len())
        );
        let mut query = sqlx::query(&sql).bind(patient_id);
        for key in chunk {
            query = query.bind(*key);
        }
        for row in query.fetch_all(&mut *tx).await? {
            known.insert(row.try_get(0)?, row.try_get(1)?);
        }
    }
    Ok(known)
}

/// Which sources delivered each of `targets`.
pub async fn origin_sources_at(
    tx: &mut AnyConnection,
    patient_id: &str,
    targets: &[String],
) -> Result<HashMap<String, HashSet<String>>> {
    let mut targets: Vec<&String> = targets.iter().collect();
    targets.sort_unstable();
    targets.dedup();
    let mut sources: HashMap<String, HashSet<String>> = HashMap::new();
    for chunk in targets.chunks(KEYS_PER_STATEMENT) {
        let sql = format!(
            "SELECT target, origin_source FROM reconciliation_keys
             WHERE patient_id = $1 AND kind = 'origin' AND target IN ({})",
            numbered(chunk.len())
        );
        let mut query = sqlx::query(&sql).bind(patient_id);
        for target in chunk {
            query = query.bind(target.as_str());
        }
        for row in query.fetch_all(&mut *tx).await? {
            sources
                .entry(row.try_get(0)?)
                .or_default()
                .insert(row.try_get(1)?);
        }
    }
    Ok(sources)
}

/// `$2, $3, …` for `count` values after the patient id.
fn numbered(count: usize) -> String {
    (2..count + 2)
        .map(|n| format!("${n}"))
        .collect::<Vec<_>>()
        .join(", ")
}
