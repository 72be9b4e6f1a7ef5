//! `phr-gateway audit verify --against <shipped copy>`: checks the shipped copy on its own
//! (signatures, leaves rebuilding each shipped checkpoint), that it holds everything the
//! gateway recorded as shipped, and that the live log extends it: every shipped leaf equals
//! the live one and the live tree is consistent with the latest shipped checkpoint.

use std::collections::BTreeMap;

use futures::TryStreamExt;
use sqlx::Row;

use super::{decode_leaves, key_number, AuditSink, CHECKPOINTS_PREFIX, LEAVES_PREFIX};
use crate::audit::checkpoint::Checkpoint;
use crate::audit::keyring::VerifierRing;
use crate::audit::merkle::{self, CompactRange, Hash};
use crate::audit::verify::{self, Tamper, VerifyError};
use crate::error::Error;
use crate::store::Database;

/// The shipped copy as read from a sink.
#[derive(Debug, Clone, Default)]
pub struct ShippedCopy {
    /// Leaves objects: (first index, leaves).
    pub leaves: Vec<(u64, Vec<Vec<u8>>)>,
    /// (tree size, signed note).
    pub checkpoints: Vec<(u64, String)>,
}

/// The live side of the comparison.
#[derive(Debug, Clone, Default)]
pub struct LiveLog {
    /// Leaf hashes recomputed from the live leaf bytes, by tree index from 0 (up to the
    /// first gap).
    pub leaf_hashes: Vec<Hash>,
    /// The live signed checkpoint notes: (tree size, note).
    pub checkpoints: Vec<(u64, String)>,
    /// What the gateway recorded as shipped: leaves below this…
    pub shipped_leaves: u64,
    /// …and checkpoints up to this size.
    pub shipped_checkpoint_size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgainstReport {
    pub shipped_leaves: u64,
    pub shipped_checkpoints: u64,
    pub latest_shipped_checkpoint: Option<u64>,
    pub live_tree_size: u64,
}

/// Each distinct way the live log and its shipped copy can disagree.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Divergence {
    #[error("the shipped copy is missing objects: {0} (a sink that reported success did not store them, or they were removed)")]
    Missing(String),
    #[error("the shipped copy is damaged: {key}: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("shipped checkpoint at size {size} does not match the shipped leaves: the shipped copy was altered")]
    ShippedInconsistent { size: u64 },
    #[error("leaf {index} of the live log differs from the shipped copy ({differing} shipped leaves differ): the live history was rewritten")]
    Rewritten { index: u64, differing: u64 },
    #[error("the live log has {live} leaves but {shipped} were shipped: leaves were deleted")]
    Truncated { shipped: u64, live: u64 },
    #[error("the live log is not an append-only extension of the shipped checkpoint at size {size}: its history was forked")]
    Fork { size: u64 },
}

#[derive(Debug, thiserror::Error)]
pub enum AgainstError {
    #[error(transparent)]
    Divergence(#[from] Divergence),
    /// The live log fails its own verification.
    #[error(transparent)]
    Live(Tamper),
    #[error(transparent)]
    Store(#[from] Error),
}

impl From<sqlx::Error> for AgainstError {
    fn from(e: sqlx::Error) -> Self {
        AgainstError::Store(Error::Database(e))
    }
}

/// Reads every object of our layout from the sink.
pub async fn load_shipped(sink: &dyn AuditSink) -> Result<ShippedCopy, AgainstError> {
    let mut copy = ShippedCopy::default();
    for key in sink.list(LEAVES_PREFIX).await? {
        let Some(first) = key_number(&key, LEAVES_PREFIX, ".ndjson") else {
            continue;
        };
        let bytes = sink
            .get(&key)
            .await?
            .ok_or_else(|| Divergence::Missing(format!("{key} is listed but cannot be read")))?;
        let leaves = decode_leaves(first, &bytes).map_err(|reason| Divergence::Corrupt {
            key: key.clone(),
            reason,
        })?;
        copy.leaves.push((first, leaves));
    }
    for key in sink.list(CHECKPOINTS_PREFIX).await? {
        let Some(size) = key_number(&key, CHECKPOINTS_PREFIX, ".note") else {
            continue;
        };
        let bytes = sink
            .get(&key)
            .await?
            .ok_or_else(|| Divergence::Missing(format!("{key} is listed but cannot be read")))?;
        let note = String::from_utf8(bytes).map_err(|_| Divergence::Corrupt {
            key: key.clone(),
            reason: "not UTF-8".into(),
        })?;
        copy.checkpoints.push((size, note));
    }
    copy.leaves.sort_by_key(|(first, _)| *first);
    copy.checkpoints.sort_by_key(|(size, _)| *size);
    Ok(copy)
}

/// The comparison itself, without I/O.
pub fn compare(
    shipped: &ShippedCopy,
    live: &LiveLog,
    verifier: &VerifierRing,
    origin: &str,
) -> Result<AgainstReport, Divergence> {
    // Shipped leaves by index; objects may overlap only if they agree.
    let mut by_index: BTreeMap<u64, Hash> = BTreeMap::new();
    for (first, leaves) in &shipped.leaves {
        for (index, leaf) in (*first..).zip(leaves) {
            let hash = merkle::leaf_hash(leaf);
            if by_index.insert(index, hash).is_some_and(|h| h != hash) {
                return Err(Divergence::Corrupt {
                    key: super::leaf_key(*first),
                    reason: format!("disagrees with another shipped object about leaf {index}"),
                });
            }
        }
    }
    let mut shipped_hashes = Vec::with_capacity(by_index.len());
    for (expected, (index, hash)) in (0u64..).zip(&by_index) {
        if *index != expected {
            return Err(Divergence::Missing(format!(
                "leaves {expected}..{index} are not in the copy"
            )));
        }
        shipped_hashes.push(*hash);
    }
    let shipped_len = shipped_hashes.len() as u64;

    // Everything the gateway recorded as shipped must be there.
    if live.shipped_leaves > shipped_len {
        return Err(Divergence::Missing(format!(
            "the gateway shipped leaves 0..{} but the copy holds {shipped_len}",
            live.shipped_leaves
        )));
    }
    for (size, _) in &live.checkpoints {
        if *size <= live.shipped_checkpoint_size
            && !shipped.checkpoints.iter().any(|(s, _)| s == size)
        {
            return Err(Divergence::Missing(format!(
                "the gateway shipped the checkpoint at size {size} but the copy lacks it"
            )));
        }
    }

    // The copy on its own: signed by this log, and its leaves rebuild each checkpoint.
    let mut shipped_roots = Vec::with_capacity(shipped.checkpoints.len());
    let mut range = CompactRange::new();
    let mut appended = 0usize;
    for (size, note) in &shipped.checkpoints {
        let key = super::checkpoint_key(*size);
        let cp =
            signed_checkpoint(note, verifier, origin).map_err(|reason| Divergence::Corrupt {
                key: key.clone(),
                reason,
            })?;
        if cp.size != *size {
            return Err(Divergence::Corrupt {
                key,
                reason: format!("signed for size {}", cp.size),
            });
        }
        if *size > shipped_len {
            return Err(Divergence::Missing(format!(
                "leaves {shipped_len}..{size} under the shipped checkpoint at size {size}"
            )));
        }
        while (appended as u64) < *size {
            range.append(shipped_hashes[appended]);
            appended += 1;
        }
        if range.root() != cp.root {
            return Err(Divergence::ShippedInconsistent { size: *size });
        }
        shipped_roots.push((*size, cp.root));
    }

    // The live log against the copy: the same leaves…
    let common = shipped_hashes.len().min(live.leaf_hashes.len());
    let differing: Vec<u64> = (0..common)
        .filter(|&i| shipped_hashes[i] != live.leaf_hashes[i])
        .map(|i| i as u64)
        .collect();
    if let Some(&index) = differing.first() {
        return Err(Divergence::Rewritten {
            index,
            differing: differing.len() as u64,
        });
    }
    let live_len = live.leaf_hashes.len() as u64;
    if live_len < shipped_len {
        return Err(Divergence::Truncated {
            shipped: shipped_len,
            live: live_len,
        });
    }
    // …no live signed tree head contradicting a shipped one…
    for (size, note) in &live.checkpoints {
        let Ok(cp) = signed_checkpoint(note, verifier, origin) else {
            // Left to the live log's own verification, which names it.
            continue;
        };
        if let Some((_, root)) = shipped_roots.iter().find(|(s, _)| s == size) {
            if *root != cp.root {
                return Err(Divergence::Fork { size: *size });
            }
        }
    }
    // …and, as a remote auditor would check it, a consistency proof from the latest shipped
    // checkpoint to the live tree.
    if let Some((size, root)) = shipped_roots.last() {
        let live_root = merkle::root_from_leaves(&live.leaf_hashes);
        let proof = merkle::consistency_proof(&live.leaf_hashes, *size)
            .map_err(|_| Divergence::Fork { size: *size })?;
        merkle::verify_consistency(*size, live_len, root, &live_root, &proof)
            .map_err(|_| Divergence::Fork { size: *size })?;
    }
    Ok(AgainstReport {
        shipped_leaves: shipped_len,
        shipped_checkpoints: shipped.checkpoints.len() as u64,
        latest_shipped_checkpoint: shipped_roots.last().map(|(s, _)| *s),
        live_tree_size: live_len,
    })
}

fn signed_checkpoint(
    note: &str,
    verifier: &VerifierRing,
    origin: &str,
) -> Result<Checkpoint, String> {
    let body = verifier.verify_any(note).map_err(|e| e.to_string())?;
    let cp = Checkpoint::parse_body(&body).map_err(|e| e.to_string())?;
    if cp.origin != origin {
        return Err(format!(
            "origin {:?} is not this log's {origin:?}",
            cp.origin
        ));
    }
    Ok(cp)
}

/// Reads the live side from the database.
pub async fn load_live(db: &Database) -> Result<LiveLog, AgainstError> {
    let mut live = LiveLog::default();
    let mut rows = sqlx::query(
        "SELECT tree_index, body FROM audit_leaves WHERE tree_index IS NOT NULL
         ORDER BY tree_index",
    )
    .fetch(db.read_pool());
    while let Some(row) = rows.try_next().await? {
        let index = row.try_get::<i64, _>(0)?;
        if index != live.leaf_hashes.len() as i64 {
            // A gap: the live log's own verification reports it.
            break;
        }
        let body: &[u8] = row.try_get(1)?;
        live.leaf_hashes.push(merkle::leaf_hash(body));
    }
    drop(rows);
    for row in sqlx::query("SELECT tree_size, note FROM audit_checkpoints ORDER BY tree_size")
        .fetch_all(db.read_pool())
        .await?
    {
        live.checkpoints
            .push((row.try_get::<i64, _>(0)?.max(0) as u64, row.try_get(1)?));
    }
    (live.shipped_leaves, live.shipped_checkpoint_size) = load_live_cursor(db).await?;
    Ok(live)
}

/// What the gateway recorded as shipped: (leaves, checkpoint size).
async fn load_live_cursor(db: &Database) -> Result<(u64, u64), AgainstError> {
    let row = sqlx::query(
        "SELECT shipped_leaves, shipped_checkpoint_size FROM audit_shipping WHERE id = 1",
    )
    .fetch_optional(db.read_pool())
    .await?;
    Ok(match row {
        Some(row) => (
            row.try_get::<i64, _>(0)?.max(0) as u64,
            row.try_get::<i64, _>(1)?.max(0) as u64,
        ),
        None => (0, 0),
    })
}

/// Verifies the live log against the shipped copy in `sink`, then the live log on its own
/// with the latest shipped checkpoint as its trusted checkpoint.
pub async fn verify_against(
    db: &Database,
    verifier: impl Into<VerifierRing>,
    origin: &str,
    sink: &dyn AuditSink,
) -> Result<AgainstReport, AgainstError> {
    let verifier = &verifier.into();
    // The cursor first, the copy next, the live leaves last: the shipper may run meanwhile,
    // and this order only ever finds more than the cursor and the copy promise.
    let cursor = load_live_cursor(db).await?;
    let shipped = load_shipped(sink).await?;
    let mut live = load_live(db).await?;
    (live.shipped_leaves, live.shipped_checkpoint_size) = cursor;
    let report = compare(&shipped, &live, verifier, origin)?;
    let trusted = shipped.checkpoints.last().map(|(_, note)| note.as_str());
    match verify::verify(db, verifier, origin, trusted).await {
        Ok(_) => Ok(report),
        Err(VerifyError::Tamper(t)) => Err(AgainstError::Live(t)),
        Err(VerifyError::Store(e)) => Err(AgainstError::Store(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::checkpoint::NoteSigner;
    use ed25519_dalek::SigningKey;

    const ORIGIN: &str = "test.example/audit";

    fn signer() -> NoteSigner {
        NoteSigner::new(ORIGIN, SigningKey::from_bytes(&[7; 32])).unwrap()
    }

    fn leaves(n: u64, tag: &str) -> Vec<Vec<u8>> {
        (0..n).map(|i| format!("{tag}{i}").into_bytes()).collect()
    }

    fn note_for(signer: &NoteSigner, leaves: &[Vec<u8>]) -> (u64, String) {
        let hashes: Vec<Hash> = leaves.iter().map(|l| merkle::leaf_hash(l)).collect();
        let cp = Checkpoint {
            origin: ORIGIN.into(),
            size: leaves.len() as u64,
            root: merkle::root_from_leaves(&hashes),
        };
        (cp.size, signer.sign(&cp.body()))
    }

    /// A log of `n` leaves shipped up to `shipped`, with checkpoints at 4 and `shipped`.
    fn scenario(n: u64, shipped: u64) -> (ShippedCopy, LiveLog) {
        let s = signer();
        let all = leaves(n, "leaf");
        let cps = vec![
            note_for(&s, &all[..4]),
            note_for(&s, &all[..shipped as usize]),
        ];
        let copy = ShippedCopy {
            leaves: vec![
                (0, all[..3].to_vec()),
                (3, all[3..shipped as usize].to_vec()),
            ],
            checkpoints: cps.clone(),
        };
        let live = LiveLog {
            leaf_hashes: all.iter().map(|l| merkle::leaf_hash(l)).collect(),
            checkpoints: cps,
            shipped_leaves: shipped,
            shipped_checkpoint_size: shipped,
        };
        (copy, live)
    }

    fn check(copy: &ShippedCopy, live: &LiveLog) -> Result<AgainstReport, Divergence> {
        compare(copy, live, &signer().verifier().into(), ORIGIN)
    }

    #[test]
    fn an_extension_of_the_copy_passes() {
        let (copy, live) = scenario(12, 8);
        let report = check(&copy, &live).unwrap();
        assert_eq!(report.shipped_leaves, 8);
        assert_eq!(report.latest_shipped_checkpoint, Some(8));
        assert_eq!(report.live_tree_size, 12);
    }

    #[test]
    fn a_rewritten_live_leaf_is_named() {
        let (copy, mut live) = scenario(12, 8);
        live.leaf_hashes[5] = merkle::leaf_hash(b"rewritten");
        assert_eq!(
            check(&copy, &live),
            Err(Divergence::Rewritten {
                index: 5,
                differing: 1
            })
        );
    }

    #[test]
    fn a_sink_that_stored_nothing_is_missing_objects() {
        let (_, live) = scenario(12, 8);
        assert!(matches!(
            check(&ShippedCopy::default(), &live),
            Err(Divergence::Missing(_))
        ));
    }

    #[test]
    fn a_gap_in_the_copy_is_missing_objects() {
        let (mut copy, live) = scenario(12, 8);
        copy.leaves.remove(0);
        assert!(matches!(check(&copy, &live), Err(Divergence::Missing(_))));
    }

    #[test]
    fn deleted_live_leaves_are_truncation() {
        let (copy, mut live) = scenario(12, 8);
        live.leaf_hashes.truncate(6);
        assert_eq!(
            check(&copy, &live),
            Err(Divergence::Truncated {
                shipped: 8,
                live: 6
            })
        );
    }

    #[test]
    fn a_conflicting_live_checkpoint_is_a_fork() {
        let (copy, mut live) = scenario(12, 8);
        // Same leaves, but the live log also holds a signed head for size 4 over other
        // leaves: two views of the same tree size.
        let other = note_for(&signer(), &leaves(4, "other"));
        live.checkpoints[0] = other;
        assert_eq!(check(&copy, &live), Err(Divergence::Fork { size: 4 }));
    }

    #[test]
    fn an_altered_copy_is_caught() {
        let (mut copy, live) = scenario(12, 8);
        copy.leaves[1].1[0] = b"changed".to_vec();
        assert_eq!(
            check(&copy, &live),
            Err(Divergence::ShippedInconsistent { size: 4 })
        );
        let (mut copy, live) = scenario(12, 8);
        let stranger = NoteSigner::new(ORIGIN, SigningKey::from_bytes(&[9; 32])).unwrap();
        copy.checkpoints[1] = note_for(&stranger, &leaves(8, "leaf"));
        assert!(matches!(
            check(&copy, &live),
            Err(Divergence::Corrupt { .. })
        ));
    }
}
