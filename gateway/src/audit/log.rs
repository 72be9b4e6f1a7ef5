//! Writing leaves and sequencing them into the tree.

use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use sqlx::{AnyConnection, Row};
use tokio::sync::Notify;

use super::checkpoint::{Checkpoint, NoteSigner, NoteVerifier};
use super::event::AuditEvent;
use super::keyring::{RetiredKey, VerifierRing};
use super::merkle::{self, CompactRange, Hash};
use crate::error::{Error, Result};
use crate::group_commit::GroupCommit;
use crate::store::{now_millis, row_placeholders, Database, Engine};

/// Leaves sequenced per statement; bounds the memory and lock time of one pass.
const SEQUENCE_BATCH: i64 = 5000;

/// Writes one leaf inside the caller's transaction, so it commits or rolls back with the
/// change it records.
pub async fn record(conn: &mut AnyConnection, event: &AuditEvent) -> Result<()> {
    record_all(conn, std::slice::from_ref(event)).await
}

/// Leaves per INSERT statement (four parameters each, anonymous on SQLite: see
/// `row_placeholders`).
const INSERT_CHUNK: usize = 240;

/// Writes several leaves inside the caller's transaction with multi-row inserts.
pub async fn record_all(conn: &mut AnyConnection, events: &[AuditEvent]) -> Result<()> {
    let now = now_millis();
    for chunk in events.chunks(INSERT_CHUNK) {
        let sql = format!(
            "INSERT INTO audit_leaves (recorded_at, body, leaf_hash, patient_id) VALUES {}",
            row_placeholders(Engine::of_connection(conn), chunk.len(), 4)
        );
        let mut query = sqlx::query(&sql);
        for event in chunk {
            let body = event.to_leaf();
            let leaf_hash = merkle::leaf_hash(&body);
            // Beside the leaf, for the patient's access log; the hashed bytes stay as they are.
            query = query
                .bind(now)
                .bind(body)
                .bind(leaf_hash.to_vec())
                .bind(event.patient.clone());
        }
        query.execute(&mut *conn).await?;
    }
    Ok(())
}

#[derive(Clone)]
pub struct AuditLog {
    db: Database,
    signer: Arc<NoteSigner>,
    /// Keys this log was signed with before (see `keyring`).
    retired: Arc<Vec<RetiredKey>>,
    origin: String,
    every_leaves: u64,
    interval: Duration,
    wake: Arc<Notify>,
    /// Told after a pass that sequenced leaves (the audit shipper listens).
    sequenced: Arc<Notify>,
    /// Stand-alone leaves (reads, refusals) share commits.
    group: Arc<GroupCommit<AuditEvent, std::result::Result<(), String>>>,
}

/// What one sequencer pass did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SequenceOutcome {
    pub sequenced: u64,
    pub tree_size: u64,
    pub checkpoint: Option<Checkpoint>,
}

struct SequencerState {
    range: CompactRange,
    checkpoint_size: u64,
    checkpoint_at: i64,
}

impl AuditLog {
    pub fn new(
        db: Database,
        signing_key: SigningKey,
        origin: &str,
        every_leaves: u64,
        interval: Duration,
    ) -> Result<Self> {
        // C2SP: the checkpoint's key name is its origin line.
        let signer =
            NoteSigner::new(origin, signing_key).map_err(|e| Error::Audit(e.to_string()))?;
        Ok(AuditLog {
            db,
            signer: Arc::new(signer),
            retired: Arc::default(),
            origin: origin.to_string(),
            every_leaves,
            interval,
            wake: Arc::new(Notify::new()),
            sequenced: Arc::new(Notify::new()),
            group: Arc::default(),
        })
    }

    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The keys retired by earlier rotations, read from the key history file.
    pub fn with_retired_keys(mut self, retired: Vec<RetiredKey>) -> Self {
        self.retired = Arc::new(retired);
        self
    }

    /// Every key this log was signed with: what `audit verify` checks checkpoints against.
    pub fn verifiers(&self) -> VerifierRing {
        VerifierRing::new(self.retired.to_vec(), self.signer.verifier())
    }

    /// Signs a text (ending in a newline) as a signed note with the audit key, e.g. a
    /// backup's manifest; `verifier()` checks it.
    pub fn sign_note(&self, body: &str) -> String {
        self.signer.sign(body)
    }

    pub fn verifier(&self) -> NoteVerifier {
        self.signer.verifier()
    }

    /// The verifier key in the signed-note `name+hash+key` form, to keep off-site.
    pub fn verifier_key(&self) -> String {
        self.signer.verifier_key()
    }

    pub fn database(&self) -> &Database {
        &self.db
    }

    /// Records an event that goes with no other change (a read, a failed login); returns
    /// once it is committed, possibly together with other callers' leaves.
    pub async fn record_now(&self, event: &AuditEvent) -> Result<()> {
        let log = self.clone();
        let committed = self
            .group
            .submit(event.clone(), move |events| async move {
                let outcome = log.commit_leaves(&events).await.map_err(|e| e.to_string());
                log.wake.notify_one();
                vec![outcome; events.len()]
            })
            .await;
        match committed {
            Some(Ok(())) => Ok(()),
            Some(Err(reason)) => Err(Error::Audit(format!("audit leaf not written: {reason}"))),
            None => Err(Error::Audit("audit commit abandoned".into())),
        }
    }

    async fn commit_leaves(&self, events: &[AuditEvent]) -> Result<()> {
        if events.len() <= INSERT_CHUNK {
            // One statement is atomic on its own: no BEGIN and COMMIT to wait for.
            let mut conn = self.db.write_pool().acquire().await?;
            return record_all(&mut conn, events).await;
        }
        let mut tx = self.db.begin().await?;
        record_all(&mut tx, events).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Notified after each sequencer pass that numbered new leaves.
    pub fn sequenced_notifier(&self) -> Arc<Notify> {
        self.sequenced.clone()
    }

    /// Nudges the background sequencer after a commit.
    pub fn notify(&self) {
        self.wake.notify_one();
    }

    /// Assigns tree indices to committed leaves in commit order and writes a signed
    /// checkpoint when enough leaves or time have passed (or `force_checkpoint`).
    pub async fn sequence(&self, force_checkpoint: bool) -> Result<SequenceOutcome> {
        let mut total = 0u64;
        loop {
            let outcome = self.sequence_batch(force_checkpoint).await?;
            total += outcome.sequenced;
            if outcome.sequenced < SEQUENCE_BATCH as u64 {
                return Ok(SequenceOutcome {
                    sequenced: total,
                    ..outcome
                });
            }
        }
    }

    async fn sequence_batch(&self, force_checkpoint: bool) -> Result<SequenceOutcome> {
        let mut tx = self.db.begin().await?;
        let mut state = load_state(&mut tx, self.db.engine()).await?;
        let base = state.range.size();
        // One statement picks and numbers the batch, so the set we hash is exactly the set
        // we numbered even while other transactions commit.
        let rows = sqlx::query(
            "UPDATE audit_leaves SET tree_index = s.idx
             FROM (SELECT id, $1 + ROW_NUMBER() OVER (ORDER BY id) - 1 AS idx
                   FROM audit_leaves WHERE tree_index IS NULL ORDER BY id LIMIT $2) AS s
             WHERE audit_leaves.id = s.id
             RETURNING audit_leaves.tree_index, audit_leaves.leaf_hash",
        )
        .bind(base as i64)
        .bind(SEQUENCE_BATCH)
        .fetch_all(&mut *tx)
        .await?;
        let mut leaves = Vec::with_capacity(rows.len());
        for row in rows {
            let index: i64 = row.try_get(0)?;
            let hash: Vec<u8> = row.try_get(1)?;
            leaves.push((index, to_hash(&hash)?));
        }
        leaves.sort_unstable_by_key(|(index, _)| *index);
        let now = now_millis();
        let mut checkpoints = Vec::new();
        for (expected, (index, hash)) in (base as i64..).zip(&leaves) {
            if *index != expected {
                return Err(Error::Audit(format!(
                    "sequencer numbered leaf {index}, expected {expected}"
                )));
            }
            state.range.append(*hash);
            // Every N leaves exactly, even inside one large batch.
            if state.range.size() - state.checkpoint_size >= self.every_leaves {
                checkpoints.push(self.checkpoint_of(&state.range));
                state.checkpoint_size = state.range.size();
                state.checkpoint_at = now;
            }
        }
        let new_leaves = state.range.size() - state.checkpoint_size;
        let interval_passed = now - state.checkpoint_at >= self.interval.as_millis() as i64;
        if new_leaves > 0 && (interval_passed || force_checkpoint) {
            checkpoints.push(self.checkpoint_of(&state.range));
            state.checkpoint_size = state.range.size();
            state.checkpoint_at = now;
        }
        for cp in &checkpoints {
            let note = self.signer.sign(&cp.body());
            sqlx::query(
                "INSERT INTO audit_checkpoints (tree_size, root, note, created_at)
                 VALUES ($1, $2, $3, $4) ON CONFLICT (tree_size) DO NOTHING",
            )
            .bind(cp.size as i64)
            .bind(cp.root.to_vec())
            .bind(note)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query(
            "UPDATE audit_sequencer SET tree_size = $1, compact_range = $2,
                 checkpoint_size = $3, checkpoint_at = $4 WHERE id = 1",
        )
        .bind(state.range.size() as i64)
        .bind(state.range.to_bytes())
        .bind(state.checkpoint_size as i64)
        .bind(state.checkpoint_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(SequenceOutcome {
            sequenced: leaves.len() as u64,
            tree_size: state.range.size(),
            checkpoint: checkpoints.pop(),
        })
    }

    fn checkpoint_of(&self, range: &CompactRange) -> Checkpoint {
        Checkpoint {
            origin: self.origin.clone(),
            size: range.size(),
            root: range.root(),
        }
    }

    /// Hashes of the first `size` sequenced leaves, in order.
    async fn leaf_hashes(&self, size: u64) -> Result<Vec<Hash>> {
        let rows = sqlx::query(
            "SELECT leaf_hash FROM audit_leaves WHERE tree_index IS NOT NULL AND tree_index < $1
             ORDER BY tree_index",
        )
        .bind(size as i64)
        .fetch_all(self.db.read_pool())
        .await?;
        let hashes = rows
            .iter()
            .map(|row| to_hash(&row.try_get::<Vec<u8>, _>(0)?))
            .collect::<Result<Vec<_>>>()?;
        if hashes.len() as u64 != size {
            return Err(Error::Audit(format!(
                "the log has {} sequenced leaves, not {size}",
                hashes.len()
            )));
        }
        Ok(hashes)
    }

    /// An RFC 6962 inclusion proof of leaf `index` in the tree of `size` leaves.
    pub async fn inclusion_proof(&self, index: u64, size: u64) -> Result<Vec<Hash>> {
        let hashes = self.leaf_hashes(size).await?;
        merkle::inclusion_proof(&hashes, index).map_err(|e| Error::Audit(e.to_string()))
    }

    /// An RFC 6962 consistency proof from the tree of `old_size` leaves to `new_size`.
    pub async fn consistency_proof(&self, old_size: u64, new_size: u64) -> Result<Vec<Hash>> {
        let hashes = self.leaf_hashes(new_size).await?;
        merkle::consistency_proof(&hashes, old_size).map_err(|e| Error::Audit(e.to_string()))
    }

    /// The newest signed checkpoint note, if any.
    pub async fn latest_checkpoint(&self) -> Result<Option<String>> {
        let row = sqlx::query("SELECT note FROM audit_checkpoints ORDER BY tree_size DESC LIMIT 1")
            .fetch_optional(self.db.read_pool())
            .await?;
        Ok(match row {
            Some(row) => Some(row.try_get(0)?),
            None => None,
        })
    }

    /// Runs the sequencer until `shutdown` fires: on every nudge, and at least once per
    /// checkpoint interval so quiet periods still get checkpointed.
    pub async fn run_sequencer(self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let tick = self.interval.min(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(tick) => {}
                _ = shutdown.changed() => {
                    let _ = self.sequence(true).await;
                    return;
                }
            }
            // Let a burst of commits gather into one pass.
            tokio::time::sleep(Duration::from_millis(20)).await;
            match self.sequence(false).await {
                Ok(outcome) if outcome.sequenced > 0 => self.sequenced.notify_one(),
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "audit sequencer pass failed"),
            }
        }
    }
}

async fn load_state(conn: &mut AnyConnection, engine: Engine) -> Result<SequencerState> {
    // On PostgreSQL the row lock makes this the only sequencer across processes; SQLite has
    // one writer anyway.
    let select = match engine {
        Engine::Postgres => {
            "SELECT compact_range, checkpoint_size, checkpoint_at FROM audit_sequencer WHERE id = 1 FOR UPDATE"
        }
        Engine::Sqlite => {
            "SELECT compact_range, checkpoint_size, checkpoint_at FROM audit_sequencer WHERE id = 1"
        }
    };
    let row = sqlx::query(select).fetch_optional(&mut *conn).await?;
    match row {
        Some(row) => {
            let bytes: Vec<u8> = row.try_get(0)?;
            let range = CompactRange::from_bytes(&bytes)
                .map_err(|e| Error::Audit(format!("sequencer state: {e}")))?;
            Ok(SequencerState {
                range,
                checkpoint_size: row.try_get::<i64, _>(1)? as u64,
                checkpoint_at: row.try_get(2)?,
            })
        }
        None => {
            let range = CompactRange::new();
            sqlx::query(
                "INSERT INTO audit_sequencer (id, tree_size, compact_range, checkpoint_size, checkpoint_at)
                 VALUES (1, 0, $1, 0, $2) ON CONFLICT (id) DO NOTHING",
            )
            .bind(range.to_bytes())
            .bind(now_millis())
            .execute(&mut *conn)
            .await?;
            if engine == Engine::Postgres {
                // Lost a race to create the row: lock the winner's.
                let row = sqlx::query(
                    "SELECT compact_range, checkpoint_size, checkpoint_at FROM audit_sequencer WHERE id = 1 FOR UPDATE",
                )
                .fetch_one(&mut *conn)
                .await?;
                let bytes: Vec<u8> = row.try_get(0)?;
                return Ok(SequencerState {
                    range: CompactRange::from_bytes(&bytes)
                        .map_err(|e| Error::Audit(format!("sequencer state: {e}")))?,
                    checkpoint_size: row.try_get::<i64, _>(1)? as u64,
                    checkpoint_at: row.try_get(2)?,
                });
            }
            Ok(SequencerState {
                range,
                checkpoint_size: 0,
                checkpoint_at: now_millis(),
            })
        }
    }
}

pub(crate) fn to_hash(bytes: &[u8]) -> Result<Hash> {
    bytes
        .try_into()
        .map_err(|_| Error::Audit(format!("stored hash has {} bytes, not 32", bytes.len())))
}
