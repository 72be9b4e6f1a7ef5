//! `phr-gateway audit export`: AuditEvents recorded since a time, as NDJSON, for an incident
//! investigation. Each line is a leaf exactly as stored, so SHA-256(0x00 || line) is its leaf
//! hash and the export can be checked against a checkpoint.

use std::io::Write;

use futures::TryStreamExt;
use sqlx::Row;

use crate::error::{Error, Result};
use crate::store::Database;

/// Writes every leaf recorded at or after `since_millis`, in log order; returns the count.
pub async fn export_since(db: &Database, since_millis: i64, out: &mut dyn Write) -> Result<u64> {
    let mut rows = sqlx::query(
        "SELECT body FROM audit_leaves WHERE recorded_at >= $1
         ORDER BY CASE WHEN tree_index IS NULL THEN 1 ELSE 0 END, tree_index, id",
    )
    .bind(since_millis)
    .fetch(db.read_pool());
    let mut count = 0u64;
    while let Some(row) = rows.try_next().await? {
        let body: Vec<u8> = row.try_get(0)?;
        out.write_all(&body)
            .and_then(|_| out.write_all(b"\n"))
            .map_err(|e| Error::io("audit export", e))?;
        count += 1;
    }
    out.flush().map_err(|e| Error::io("audit export", e))?;
    Ok(count)
}
