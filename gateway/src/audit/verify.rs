//! `phr-gateway audit verify`: recompute the tree from the stored leaves, check every signed
//! checkpoint, and (given a checkpoint saved or shipped earlier) prove the log is an
//! append-only extension of it — which catches a rewrite re-signed with the local key.

use futures::TryStreamExt;
use sqlx::Row;

use super::checkpoint::Checkpoint;
use super::keyring::VerifierRing;
use super::log::to_hash;
use super::merkle::{self, CompactRange, Hash};
use crate::error::Error;
use crate::store::Database;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub tree_size: u64,
    pub checkpoints_checked: u64,
    pub latest_checkpoint: Option<u64>,
    /// Leaves committed but not yet sequenced (not an error).
    pub unsequenced: u64,
    /// Size of the trusted checkpoint proven consistent, when one was given.
    pub trusted_size: Option<u64>,
}

/// Each distinct way the log can fail verification.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Tamper {
    #[error("leaf {index} is missing (the next stored leaf has index {found})")]
    LeafMissing { index: u64, found: u64 },
    #[error("leaf {index} was changed: its stored bytes do not hash to its leaf hash")]
    LeafChanged { index: u64 },
    #[error("checkpoint at size {size}: signature does not verify ({reason})")]
    CheckpointSignature { size: u64, reason: String },
    #[error("checkpoint at size {size}: origin {found:?} is not this log's {expected:?}")]
    CheckpointOrigin {
        size: u64,
        found: String,
        expected: String,
    },
    #[error(
        "checkpoint at size {size} does not match the leaves: a leaf in {from}..{size} was changed, removed or reordered"
    )]
    CheckpointRoot { size: u64, from: u64 },
    #[error(
        "checkpoint at size {size} is beyond the log's {log_size} leaves: leaves were deleted"
    )]
    Truncated { size: u64, log_size: u64 },
    #[error("audit key rotation at size {size}: {reason}")]
    KeyTransition { size: u64, reason: String },
    #[error("trusted checkpoint: {0}")]
    TrustedUnreadable(String),
    #[error(
        "the log is not an append-only extension of the trusted checkpoint at size {size}: it was rewritten or forked"
    )]
    Fork { size: u64 },
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Tamper(#[from] Tamper),
    #[error(transparent)]
    Store(#[from] Error),
}

impl From<sqlx::Error> for VerifyError {
    fn from(e: sqlx::Error) -> Self {
        VerifyError::Store(Error::Database(e))
    }
}

struct StoredCheckpoint {
    size: u64,
    root: Vec<u8>,
    note: String,
}

/// `verifiers`: the ring of every audit key (`AuditLog::verifiers`), or one key for a log
/// that never rotated its key.
pub async fn verify(
    db: &Database,
    verifiers: impl Into<VerifierRing>,
    origin: &str,
    trusted_note: Option<&str>,
) -> Result<VerifyReport, VerifyError> {
    let verifiers = &verifiers.into();
    let trusted = match trusted_note {
        Some(note) => {
            let body = verifiers
                .verify_any(note)
                .map_err(|e| Tamper::TrustedUnreadable(e.to_string()))?;
            let cp = Checkpoint::parse_body(&body)
                .map_err(|e| Tamper::TrustedUnreadable(e.to_string()))?;
            if cp.origin != origin {
                return Err(Tamper::TrustedUnreadable(format!(
                    "origin {:?} is not this log's {origin:?}",
                    cp.origin
                ))
                .into());
            }
            Some(cp)
        }
        None => None,
    };

    let mut checkpoints = Vec::new();
    let rows =
        sqlx::query("SELECT tree_size, root, note FROM audit_checkpoints ORDER BY tree_size")
            .fetch_all(db.read_pool())
            .await?;
    for row in rows {
        checkpoints.push(StoredCheckpoint {
            size: row.try_get::<i64, _>(0)? as u64,
            root: row.try_get(1)?,
            note: row.try_get(2)?,
        });
    }

    let leaf_hashes = scan_leaves(db).await?;
    let mut range = CompactRange::new();
    let mut next_checkpoint = 0usize;
    let mut last_good_size = 0u64;
    let mut checked = 0u64;
    for hash in &leaf_hashes {
        range.append(*hash);
        while let Some(cp) = checkpoints.get(next_checkpoint) {
            if cp.size != range.size() {
                break;
            }
            check_checkpoint(cp, &range.root(), verifiers, origin, last_good_size)?;
            last_good_size = cp.size;
            checked += 1;
            next_checkpoint += 1;
        }
    }
    let tree_size = range.size();
    // A checkpoint for the empty tree, then any checkpoint beyond the leaves we have.
    while let Some(cp) = checkpoints.get(next_checkpoint) {
        if cp.size == 0 {
            check_checkpoint(cp, &merkle::empty_root(), verifiers, origin, 0)?;
            checked += 1;
            next_checkpoint += 1;
        } else {
            return Err(Tamper::Truncated {
                size: cp.size,
                log_size: tree_size,
            }
            .into());
        }
    }

    check_key_transitions(db, verifiers, &checkpoints, tree_size).await?;

    let trusted_size = match trusted {
        Some(cp) => {
            if cp.size > tree_size {
                return Err(Tamper::Truncated {
                    size: cp.size,
                    log_size: tree_size,
                }
                .into());
            }
            // Prove it the way a remote auditor would: a consistency proof from the
            // trusted tree to the current one.
            let proof = merkle::consistency_proof(&leaf_hashes, cp.size)
                .map_err(|e| VerifyError::Store(Error::Audit(e.to_string())))?;
            merkle::verify_consistency(cp.size, tree_size, &cp.root, &range.root(), &proof)
                .map_err(|_| Tamper::Fork { size: cp.size })?;
            Some(cp.size)
        }
        None => None,
    };

    let unsequenced: i64 =
        sqlx::query("SELECT COUNT(*) FROM audit_leaves WHERE tree_index IS NULL")
            .fetch_one(db.read_pool())
            .await?
            .try_get(0)?;
    Ok(VerifyReport {
        tree_size,
        checkpoints_checked: checked,
        latest_checkpoint: checkpoints.last().map(|c| c.size),
        unsequenced: unsequenced as u64,
        trusted_size,
    })
}

/// Readers over contiguous index ranges run in parallel, one per core: reading rows, not
/// hashing them, is the cost, and more readers than cores only contend.
fn scan_parts() -> u64 {
    std::thread::available_parallelism().map_or(2, |n| n.get() as u64)
}

/// Reads every sequenced leaf, checks that indices are contiguous from 0 and that each body
/// hashes to its stored leaf hash, and returns the leaf hashes in order.
async fn scan_leaves(db: &Database) -> Result<Vec<Hash>, VerifyError> {
    let max: Option<i64> = sqlx::query("SELECT MAX(tree_index) FROM audit_leaves")
        .fetch_one(db.read_pool())
        .await?
        .try_get(0)?;
    let size = max.map_or(0, |m| (m + 1).max(0) as u64);
    let part = size.div_ceil(scan_parts()).max(1);
    let mut tasks = Vec::new();
    let mut start = 0;
    while start < size {
        let end = (start + part).min(size);
        let pool = db.read_pool().clone();
        tasks.push(tokio::spawn(scan_range(pool, start, end)));
        start = end;
    }
    let mut hashes = Vec::with_capacity(size as usize);
    // Parts are joined in order, so the first failure reported is the first bad leaf.
    for task in tasks {
        let part = task
            .await
            .map_err(|e| VerifyError::Store(Error::Audit(format!("verify task failed: {e}"))))??;
        match part {
            RangeScan::Complete(part) => hashes.extend(part),
            RangeScan::Missing(index) => {
                let found: Option<i64> =
                    sqlx::query("SELECT MIN(tree_index) FROM audit_leaves WHERE tree_index > $1")
                        .bind(index as i64)
                        .fetch_one(db.read_pool())
                        .await?
                        .try_get(0)?;
                return Err(Tamper::LeafMissing {
                    index,
                    found: found.map_or(size, |f| f as u64),
                }
                .into());
            }
        }
    }
    Ok(hashes)
}

enum RangeScan {
    Complete(Vec<Hash>),
    /// The first index in the range with no leaf.
    Missing(u64),
}

async fn scan_range(pool: sqlx::AnyPool, start: u64, end: u64) -> Result<RangeScan, VerifyError> {
    let mut rows = sqlx::query(
        "SELECT tree_index, body, leaf_hash FROM audit_leaves
         WHERE tree_index >= $1 AND tree_index < $2 ORDER BY tree_index",
    )
    .bind(start as i64)
    .bind(end as i64)
    .fetch(&pool);
    let mut hashes = Vec::with_capacity((end - start) as usize);
    let mut index = start;
    while let Some(row) = rows.try_next().await? {
        let stored_index = row.try_get::<i64, _>(0)? as u64;
        if stored_index != index {
            return Ok(RangeScan::Missing(index));
        }
        let body: &[u8] = row.try_get(1)?;
        let stored_hash: &[u8] = row.try_get(2)?;
        let hash = merkle::leaf_hash(body);
        if stored_hash != hash {
            return Err(Tamper::LeafChanged { index }.into());
        }
        hashes.push(hash);
        index += 1;
    }
    if index < end {
        return Ok(RangeScan::Missing(index));
    }
    Ok(RangeScan::Complete(hashes))
}

/// Each retired key signed a checkpoint at the size where it retired, and that checkpoint
/// covers a leaf naming the key that follows it (checked leaves and checkpoints only: the
/// caller has already checked every leaf's hash and every checkpoint's root).
async fn check_key_transitions(
    db: &Database,
    verifiers: &VerifierRing,
    checkpoints: &[StoredCheckpoint],
    tree_size: u64,
) -> Result<(), VerifyError> {
    for (i, retired) in verifiers.retired().iter().enumerate() {
        let size = retired.last_size;
        let fail = |reason: String| Tamper::KeyTransition { size, reason };
        if size > tree_size {
            return Err(fail(format!("the log has only {tree_size} leaves")).into());
        }
        if !checkpoints.iter().any(|cp| cp.size == size) {
            return Err(
                fail("no checkpoint signed by the retiring key at that size".into()).into(),
            );
        }
        let body: Option<Vec<u8>> =
            sqlx::query("SELECT body FROM audit_leaves WHERE tree_index = $1")
                .bind(retired.transition_leaf as i64)
                .fetch_optional(db.read_pool())
                .await?
                .map(|row| row.try_get(0))
                .transpose()?;
        let successor = verifiers.successor(i).verifier_key();
        let names_successor = body
            .as_deref()
            .map(String::from_utf8_lossy)
            .is_some_and(|text| {
                text.contains("audit signing key transition") && text.contains(&successor)
            });
        if !names_successor {
            return Err(fail(format!(
                "leaf {} is not a transition record naming the next key {successor}",
                retired.transition_leaf
            ))
            .into());
        }
    }
    Ok(())
}

fn check_checkpoint(
    cp: &StoredCheckpoint,
    computed_root: &Hash,
    verifiers: &VerifierRing,
    origin: &str,
    last_good_size: u64,
) -> Result<(), Tamper> {
    let body =
        verifiers
            .for_size(cp.size)
            .verify(&cp.note)
            .map_err(|e| Tamper::CheckpointSignature {
                size: cp.size,
                reason: e.to_string(),
            })?;
    let signed = Checkpoint::parse_body(&body).map_err(|e| Tamper::CheckpointSignature {
        size: cp.size,
        reason: e.to_string(),
    })?;
    if signed.origin != origin {
        return Err(Tamper::CheckpointOrigin {
            size: cp.size,
            found: signed.origin,
            expected: origin.to_string(),
        });
    }
    let stored_root = to_hash(&cp.root).ok();
    if signed.size != cp.size
        || &signed.root != computed_root
        || stored_root.as_ref() != Some(computed_root)
    {
        return Err(Tamper::CheckpointRoot {
            size: cp.size,
            from: last_good_size,
        });
    }
    Ok(())
}
