//! SQLite's write-ahead log is checkpointed by a task of its own, not by the writer that
//! happens to commit past the log's threshold (`store::spawn_wal_checkpointer`). SQLite only:
//! PostgreSQL has no such log for the gateway to manage.

use std::time::{Duration, Instant};

use phr_gateway::Gateway;
use sqlx::Row;

use crate::helpers::{Engine, TestEnv};

#[tokio::test]
async fn the_wal_is_checkpointed_beside_the_writer() {
    let env = TestEnv::new(Engine::Sqlite).await;
    let gateway = Gateway::build(env.config()).await.expect("build");
    let db = &gateway.state.db;

    // The writer's own checkpoint waits for 64 MiB of log, not SQLite's 4 MiB.
    let pages: i64 = sqlx::query("PRAGMA wal_autocheckpoint")
        .fetch_one(db.write_pool())
        .await
        .expect("pragma")
        .get(0);
    assert_eq!(pages, 16_384);

    let file: String = sqlx::query("PRAGMA database_list")
        .fetch_one(db.read_pool())
        .await
        .expect("database_list")
        .get(2);
    let size = || std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
    sqlx::query("CREATE TABLE wal_probe (body BLOB NOT NULL)")
        .execute(db.write_pool())
        .await
        .expect("create");
    // Measured before the commit: a checkpoint may start any moment after it.
    let before = size();
    // 6 MiB in one commit: past SQLite's default threshold, far below the writer's, so only
    // the checkpointer copies it into the database file.
    let mut tx = db.begin().await.expect("begin");
    for n in 0..96u8 {
        sqlx::query("INSERT INTO wal_probe (body) VALUES ($1)")
            .bind(vec![n; 64 * 1024])
            .execute(&mut *tx)
            .await
            .expect("insert");
    }
    tx.commit().await.expect("commit");

    // Nothing more is written, yet the rows reach the database file.
    let started = Instant::now();
    while size() < before + 6 * 1024 * 1024 && started.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        size() >= before + 6 * 1024 * 1024,
        "the database file stayed at {} bytes (was {before} before the commit)",
        size()
    );
    let rows: i64 = sqlx::query("SELECT COUNT(*) FROM wal_probe")
        .fetch_one(db.read_pool())
        .await
        .expect("count")
        .get(0);
    assert_eq!(rows, 96);
    db.close().await;
}
