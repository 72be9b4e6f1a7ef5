//! The SQLite side of a generation: what a snapshot holds (row counts per table, the newest
//! signed audit checkpoint).

use std::collections::BTreeMap;

use sqlx::Row;

use crate::error::Result;

/// The tables counted in a manifest (every table but sqlx's own bookkeeping).
pub(super) async fn row_counts(conn: &mut sqlx::SqliteConnection) -> Result<BTreeMap<String, i64>> {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'
         AND name <> '_sqlx_migrations' ORDER BY name",
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut counts = BTreeMap::new();
    for table in tables {
        // Table names come from the schema itself, not from input.
        let count: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM \"{table}\""))
            .fetch_one(&mut *conn)
            .await?;
        counts.insert(table, count);
    }
    Ok(counts)
}

/// The newest signed checkpoint's size and root.
pub(super) async fn audit_head(conn: &mut sqlx::SqliteConnection) -> Result<(u64, String)> {
    let row = sqlx::query(
        "SELECT tree_size, root FROM audit_checkpoints ORDER BY tree_size DESC LIMIT 1",
    )
    .fetch_optional(&mut *conn)
    .await?;
    Ok(match row {
        Some(row) => (
            row.try_get::<i64, _>(0)?.max(0) as u64,
            hex::encode(row.try_get::<Vec<u8>, _>(1)?),
        ),
        None => (0, String::new()),
    })
}
