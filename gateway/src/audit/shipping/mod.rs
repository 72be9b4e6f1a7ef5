//! Audit shipping: sequenced leaves and signed checkpoints copied in near real time to a
//! sink outside the database, ideally write-once storage (S3 Object Lock in compliance
//! mode), so a rewrite of the live log can be caught by `audit verify --against`.
//!
//! Layout, every object immutable once written:
//! - `leaves/<first index, 20 digits>.ndjson`: consecutive leaves from that index, one
//!   `{"index": n, "leaf": "<base64 of the exact leaf bytes>"}` per line;
//! - `checkpoints/<tree size, 20 digits>.note`: the signed checkpoint note as stored.
//!
//! Objects are keyed by their first index, so a batch shipped twice (after a crash, or by
//! two processes) lands on the same key and the create-only write refuses the second.
//! While the sink is down the leaves stay in `audit_leaves` (the buffer) and the cursor in
//! `audit_shipping` stays put; the shipper retries with backoff and backfills on recovery.

pub mod against;
pub mod local;
pub mod s3;

use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use tokio::sync::{watch, Notify};

pub use async_trait::async_trait;
pub use local::LocalSink;
pub use s3::S3Sink;

use crate::audit::{self, Agent, AuditEvent, EventKind, Outcome};
use crate::config::{Config, SinkKind};
use crate::error::{Error, Result};
use crate::store::{now_millis, Database};

/// Leaves per shipped object: bounds one request's size (a leaf is about 1–2 KiB).
pub const LEAVES_PER_OBJECT: u64 = 1000;

pub const LEAVES_PREFIX: &str = "leaves/";
pub const CHECKPOINTS_PREFIX: &str = "checkpoints/";

/// What a create-only write found (shared with the S3 client).
pub use crate::s3::PutOutcome;

/// Where shipped copies go. Implementations never overwrite: `put_if_absent` creates the
/// object or reports that it exists.
#[async_trait]
pub trait AuditSink: Send + Sync {
    /// For logs and audit events, e.g. `local directory /var/lib/phr/audit-shipped`.
    fn describe(&self) -> String;
    /// Whether objects, once written, cannot be deleted or rewritten even by someone holding
    /// this host's credentials (ransomware-resilient). A local directory is not.
    fn is_write_once(&self) -> bool;
    async fn put_if_absent(&self, key: &str, bytes: Vec<u8>) -> Result<PutOutcome>;
    /// The object as first written; `None` when there is none.
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>>;
    /// Keys starting with `prefix`, sorted.
    async fn list(&self, prefix: &str) -> Result<Vec<String>>;
    /// Re-reads what the sink can tell about itself (an S3 bucket's Object Lock setting).
    async fn refresh(&self) -> Result<()> {
        Ok(())
    }
}

/// The sink the configuration names.
pub fn sink_from_config(config: &Config) -> Result<Arc<dyn AuditSink>> {
    let shipping = &config.audit_shipping;
    Ok(match shipping.sink {
        SinkKind::Local => Arc::new(LocalSink::new(shipping.directory_in(&config.data_dir))),
        SinkKind::S3 => Arc::new(S3Sink::from_config(&shipping.s3)?),
    })
}

pub fn leaf_key(first: u64) -> String {
    format!("{LEAVES_PREFIX}{first:020}.ndjson")
}

pub fn checkpoint_key(size: u64) -> String {
    format!("{CHECKPOINTS_PREFIX}{size:020}.note")
}

/// The number in a key of our layout (`leaves/…ndjson`, `checkpoints/…note`).
pub fn key_number(key: &str, prefix: &str, suffix: &str) -> Option<u64> {
    let digits = key.strip_prefix(prefix)?.strip_suffix(suffix)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

#[derive(Serialize, Deserialize)]
struct LeafLine {
    index: u64,
    leaf: String,
}

/// One leaves object: consecutive leaves from `first`.
pub fn encode_leaves(first: u64, leaves: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for (index, leaf) in (first..).zip(leaves) {
        let line = LeafLine {
            index,
            leaf: BASE64.encode(leaf),
        };
        // Serialising a struct of a number and a string cannot fail.
        if let Ok(json) = serde_json::to_vec(&line) {
            out.extend_from_slice(&json);
            out.push(b'\n');
        }
    }
    out
}

/// The leaves of an object keyed `first`; refuses lines out of order or unreadable.
pub fn decode_leaves(first: u64, bytes: &[u8]) -> std::result::Result<Vec<Vec<u8>>, String> {
    let mut leaves = Vec::new();
    for (n, line) in bytes.split(|b| *b == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        let parsed: LeafLine =
            serde_json::from_slice(line).map_err(|e| format!("line {}: {e}", n + 1))?;
        let expected = first + leaves.len() as u64;
        if parsed.index != expected {
            return Err(format!(
                "line {}: leaf index {} where {expected} was expected",
                n + 1,
                parsed.index
            ));
        }
        let leaf = BASE64
            .decode(parsed.leaf.as_bytes())
            .map_err(|e| format!("line {}: {e}", n + 1))?;
        leaves.push(leaf);
    }
    Ok(leaves)
}

/// How far shipping has got, for alerts, `/metrics` and operators.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ShippingStatus {
    /// Leaves sequenced into the tree.
    pub tree_size: u64,
    /// Leaves in the sink (indices below this).
    pub shipped_leaves: u64,
    /// Sequenced leaves not yet in the sink.
    pub leaves_behind: u64,
    /// Largest checkpoint in the sink (0: none).
    pub shipped_checkpoint_size: u64,
    pub last_success_at: Option<i64>,
    /// Since the last successful pass; `None` before the first.
    pub seconds_since_success: Option<u64>,
    /// Whether the last pass failed.
    pub failing: bool,
    pub failing_since: Option<i64>,
    pub last_error: Option<String>,
}

/// Shipping's state as recorded in the database (any process's shipper).
pub async fn status(db: &Database) -> Result<ShippingStatus> {
    let row = sqlx::query(
        "SELECT s.shipped_leaves, s.shipped_checkpoint_size, s.last_success_at, s.failing,
                s.failing_since, s.last_error,
                COALESCE((SELECT tree_size FROM audit_sequencer WHERE id = 1), 0)
         FROM audit_shipping s WHERE s.id = 1",
    )
    .fetch_optional(db.read_pool())
    .await?;
    let Some(row) = row else {
        return Err(Error::Audit("audit_shipping has no cursor row".into()));
    };
    let shipped_leaves = row.try_get::<i64, _>(0)?.max(0) as u64;
    let tree_size = row.try_get::<i64, _>(6)?.max(0) as u64;
    let last_success_at: Option<i64> = row.try_get(2)?;
    Ok(ShippingStatus {
        tree_size,
        shipped_leaves,
        leaves_behind: tree_size.saturating_sub(shipped_leaves),
        shipped_checkpoint_size: row.try_get::<i64, _>(1)?.max(0) as u64,
        last_success_at,
        seconds_since_success: last_success_at.map(|at| ((now_millis() - at).max(0) / 1000) as u64),
        failing: row.try_get::<i64, _>(3)? != 0,
        failing_since: row.try_get(4)?,
        last_error: row.try_get(5)?,
    })
}

/// What one successful pass shipped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShipPass {
    pub leaves: u64,
    pub checkpoints: u64,
}

/// Ships everything after the cursor, then waits for more; see the module comment.
#[derive(Clone)]
pub struct Shipper {
    db: Database,
    sink: Arc<dyn AuditSink>,
    poll: Duration,
    max_backoff: Duration,
    wake: Arc<Notify>,
}

impl Shipper {
    pub fn new(
        db: Database,
        sink: Arc<dyn AuditSink>,
        poll: Duration,
        max_backoff: Duration,
    ) -> Self {
        Shipper {
            db,
            sink,
            poll,
            max_backoff,
            wake: Arc::new(Notify::new()),
        }
    }

    pub fn sink(&self) -> &Arc<dyn AuditSink> {
        &self.sink
    }

    /// Ships when `wake` is notified too (the sequencer's), besides polling.
    pub fn woken_by(mut self, wake: Arc<Notify>) -> Self {
        self.wake = wake;
        self
    }

    /// Nudges the shipper to look now (it also polls).
    pub fn notify(&self) {
        self.wake.notify_one();
    }

    pub async fn status(&self) -> Result<ShippingStatus> {
        status(&self.db).await
    }

    /// One pass: ships what is pending and records the outcome (auditing the start of a
    /// failure and the recovery, once each).
    pub async fn ship_once(&self) -> Result<ShipPass> {
        match self.ship_pending().await {
            Ok(pass) => {
                if let Err(e) = self.record_success(pass).await {
                    tracing::warn!(error = %e, "recording audit shipping success failed");
                }
                Ok(pass)
            }
            Err(error) => {
                if let Err(e) = self.record_failure(&error).await {
                    tracing::warn!(error = %e, "recording audit shipping failure failed");
                }
                Err(error)
            }
        }
    }

    async fn ship_pending(&self) -> Result<ShipPass> {
        let (mut next, checkpoint_size) = self.cursor().await?;
        let mut pass = ShipPass::default();
        loop {
            let leaves = self.live_leaves(next, LEAVES_PER_OBJECT).await?;
            if leaves.is_empty() {
                break;
            }
            let key = leaf_key(next);
            let end = match self
                .sink
                .put_if_absent(&key, encode_leaves(next, &leaves))
                .await?
            {
                PutOutcome::Created => next + leaves.len() as u64,
                PutOutcome::AlreadyExists => next + self.accept_existing_leaves(&key, next).await?,
            };
            sqlx::query(
                "UPDATE audit_shipping SET shipped_leaves = $1 WHERE id = 1 AND shipped_leaves < $1",
            )
            .bind(end as i64)
            .execute(self.db.write_pool())
            .await?;
            pass.leaves += end - next;
            next = end;
        }
        let rows = sqlx::query(
            "SELECT tree_size, note FROM audit_checkpoints
             WHERE tree_size > $1 AND tree_size <= $2 ORDER BY tree_size",
        )
        .bind(checkpoint_size as i64)
        .bind(next as i64)
        .fetch_all(self.db.read_pool())
        .await?;
        for row in rows {
            let size = row.try_get::<i64, _>(0)? as u64;
            let note: String = row.try_get(1)?;
            let key = checkpoint_key(size);
            if self
                .sink
                .put_if_absent(&key, note.clone().into_bytes())
                .await?
                == PutOutcome::AlreadyExists
            {
                let existing = self.sink.get(&key).await?;
                if existing.as_deref() != Some(note.as_bytes()) {
                    return Err(Error::Audit(format!(
                        "audit shipping: {key} in the sink differs from the live checkpoint"
                    )));
                }
            }
            sqlx::query(
                "UPDATE audit_shipping SET shipped_checkpoint_size = $1
                 WHERE id = 1 AND shipped_checkpoint_size < $1",
            )
            .bind(size as i64)
            .execute(self.db.write_pool())
            .await?;
            pass.checkpoints += 1;
        }
        Ok(pass)
    }

    /// A leaves object already at `key` (shipped before a crash, or by another process):
    /// accepted only if every leaf in it equals the live one; returns how many it holds.
    async fn accept_existing_leaves(&self, key: &str, first: u64) -> Result<u64> {
        let bytes = self.sink.get(key).await?.ok_or_else(|| {
            Error::Audit(format!(
                "audit shipping: the sink reports {key} exists but returns nothing"
            ))
        })?;
        let theirs = decode_leaves(first, &bytes)
            .map_err(|e| Error::Audit(format!("audit shipping: {key} in the sink: {e}")))?;
        let ours = self.live_leaves(first, theirs.len() as u64).await?;
        if theirs.is_empty() || theirs != ours {
            return Err(Error::Audit(format!(
                "audit shipping: {key} in the sink differs from the live log"
            )));
        }
        Ok(theirs.len() as u64)
    }

    async fn cursor(&self) -> Result<(u64, u64)> {
        let row = sqlx::query(
            "SELECT shipped_leaves, shipped_checkpoint_size FROM audit_shipping WHERE id = 1",
        )
        .fetch_optional(self.db.read_pool())
        .await?
        .ok_or_else(|| Error::Audit("audit_shipping has no cursor row".into()))?;
        Ok((
            row.try_get::<i64, _>(0)?.max(0) as u64,
            row.try_get::<i64, _>(1)?.max(0) as u64,
        ))
    }

    /// Up to `limit` consecutive sequenced leaves from `first`.
    async fn live_leaves(&self, first: u64, limit: u64) -> Result<Vec<Vec<u8>>> {
        let mut rows = sqlx::query(
            "SELECT tree_index, body FROM audit_leaves
             WHERE tree_index >= $1 AND tree_index < $2 ORDER BY tree_index",
        )
        .bind(first as i64)
        .bind(first.saturating_add(limit) as i64)
        .fetch(self.db.read_pool());
        let mut leaves = Vec::new();
        while let Some(row) = rows.try_next().await? {
            let index = row.try_get::<i64, _>(0)? as u64;
            if index != first + leaves.len() as u64 {
                break;
            }
            leaves.push(row.try_get::<Vec<u8>, _>(1)?);
        }
        Ok(leaves)
    }

    async fn record_success(&self, pass: ShipPass) -> Result<()> {
        let now = now_millis();
        let mut tx = self.db.begin().await?;
        let recovered = sqlx::query(
            "UPDATE audit_shipping SET failing = 0, failing_since = NULL
             WHERE id = 1 AND failing = 1",
        )
        .execute(&mut *tx)
        .await?
        .rows_affected()
            > 0;
        sqlx::query("UPDATE audit_shipping SET last_success_at = $1 WHERE id = 1")
            .bind(now)
            .execute(&mut *tx)
            .await?;
        if recovered {
            tracing::info!(sink = %self.sink.describe(), backfilled = pass.leaves, "audit shipping recovered");
            let event = AuditEvent::new(EventKind::AuditShipping, Agent::system()).detail(format!(
                "audit shipping to {} recovered; backfilled {} leaves",
                self.sink.describe(),
                pass.leaves
            ));
            audit::record(&mut tx, &event).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn record_failure(&self, error: &Error) -> Result<()> {
        let now = now_millis();
        let reason = error.to_string();
        let mut tx = self.db.begin().await?;
        // Only the pass that flips the flag audits, so a long outage is one event.
        let started = sqlx::query(
            "UPDATE audit_shipping SET failing = 1, failing_since = $1
             WHERE id = 1 AND failing = 0",
        )
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            > 0;
        sqlx::query("UPDATE audit_shipping SET last_failure_at = $1, last_error = $2 WHERE id = 1")
            .bind(now)
            .bind(&reason)
            .execute(&mut *tx)
            .await?;
        if started {
            tracing::error!(sink = %self.sink.describe(), error = %reason, "audit shipping failing");
            let event = AuditEvent::new(EventKind::AuditShipping, Agent::system())
                .outcome(Outcome::SeriousFailure)
                .detail(format!(
                    "audit shipping to {} failing: {reason}",
                    self.sink.describe()
                ));
            audit::record(&mut tx, &event).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Ships until `stop` fires, then makes one last bounded pass (the caller fires it after
    /// the sequencer's last pass, so the final leaves go out too).
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        if let Err(e) = self.sink.refresh().await {
            tracing::warn!(error = %e, "cannot read the audit sink's settings");
        }
        tracing::info!(
            sink = %self.sink.describe(),
            write_once = self.sink.is_write_once(),
            "audit shipping started"
        );
        let mut failures = 0u32;
        loop {
            let wait = match self.ship_once().await {
                Ok(_) => {
                    failures = 0;
                    self.poll
                }
                Err(error) => {
                    failures = failures.saturating_add(1);
                    tracing::warn!(error = %error, failures, "audit shipping pass failed");
                    backoff(self.poll, self.max_backoff, failures)
                }
            };
            let stopped = if failures == 0 {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => false,
                    _ = self.wake.notified() => false,
                    _ = stop.changed() => true,
                }
            } else {
                // While failing, a nudge does not cut the backoff short.
                tokio::select! {
                    _ = tokio::time::sleep(wait) => false,
                    _ = stop.changed() => true,
                }
            };
            if stopped || *stop.borrow() {
                let _ = tokio::time::timeout(Duration::from_secs(5), self.ship_once()).await;
                return;
            }
        }
    }
}

/// Exponential backoff from `poll`, capped at `max`.
pub fn backoff(poll: Duration, max: Duration, failures: u32) -> Duration {
    let factor = 2u32.saturating_pow(failures.saturating_sub(1).min(20));
    poll.saturating_mul(factor).min(max).max(poll.min(max))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_by_number_and_parse_back() {
        assert_eq!(leaf_key(7), "leaves/00000000000000000007.ndjson");
        assert!(leaf_key(9) < leaf_key(10));
        assert_eq!(
            key_number(&leaf_key(1234), LEAVES_PREFIX, ".ndjson"),
            Some(1234)
        );
        assert_eq!(
            key_number(&checkpoint_key(10), CHECKPOINTS_PREFIX, ".note"),
            Some(10)
        );
        assert_eq!(
            key_number("leaves/x.ndjson", LEAVES_PREFIX, ".ndjson"),
            None
        );
        assert_eq!(key_number("leaves/.ndjson", LEAVES_PREFIX, ".ndjson"), None);
    }

    #[test]
    fn leaves_round_trip_byte_exact() {
        let leaves = vec![b"{\"a\":1}".to_vec(), vec![0, 159, 146, 150], Vec::new()];
        let bytes = encode_leaves(40, &leaves);
        assert_eq!(decode_leaves(40, &bytes).unwrap(), leaves);
        // Keyed at another index: the lines do not fit.
        assert!(decode_leaves(41, &bytes).is_err());
        assert!(decode_leaves(0, b"not json\n").is_err());
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let poll = Duration::from_millis(100);
        let max = Duration::from_secs(1);
        assert_eq!(backoff(poll, max, 1), poll);
        assert_eq!(backoff(poll, max, 2), Duration::from_millis(200));
        assert_eq!(backoff(poll, max, 4), Duration::from_millis(800));
        assert_eq!(backoff(poll, max, 5), max);
        assert_eq!(backoff(poll, max, u32::MAX), max);
    }
}
