//! Point reads (`Database::fetch_point`) on both engines: on SQLite they run on native
//! connections of their own, so they must see what the writer committed at once, bind
//! numbered parameters by number, and refuse to write.

use phr_gateway::store::now_millis;
use phr_gateway::store::point_reads::Param;
use phr_gateway::Gateway;

use crate::both_engines;
use crate::helpers::{Engine, TestEnv};

both_engines!(a_point_read_sees_each_commit_and_binds_by_number);

async fn a_point_read_sees_each_commit_and_binds_by_number(engine: Engine) {
    let env = TestEnv::new(engine).await;
    let gateway = Gateway::build(env.config()).await.expect("build");
    let db = &gateway.state.db;
    let created = now_millis();
    sqlx::query("INSERT INTO patients (id, created_at) VALUES ('point-p1', $1)")
        .bind(created)
        .execute(db.write_pool())
        .await
        .expect("insert");
    // `$2` comes first in the text: each value still goes to its own number.
    let sql = "SELECT id, created_at FROM patients WHERE created_at >= $2 AND id = $1";
    let read = |id: &'static str, since: i64| async move {
        db.fetch_point(sql, &[Param::Text(id), Param::Int(since)], |row| {
            Ok((row.text(0)?, row.int(1)?))
        })
        .await
        .expect("point read")
    };
    assert_eq!(
        read("point-p1", created).await,
        Some(("point-p1".to_string(), created))
    );
    assert_eq!(read("point-p1", created + 1).await, None, "$2 is the time");
    assert_eq!(read("nobody", 0).await, None);

    // A commit after a read is seen by the next read (no snapshot held between reads).
    for round in 1..=3 {
        sqlx::query("UPDATE patients SET created_at = $1 WHERE id = 'point-p1'")
            .bind(created + round)
            .execute(db.write_pool())
            .await
            .expect("update");
        assert_eq!(
            read("point-p1", 0).await.map(|(_, at)| at),
            Some(created + round),
            "round {round}"
        );
    }

    if engine == Engine::Sqlite {
        // The native connections are read-only: a write is an error, not a change.
        let refused = db
            .fetch_point(
                "DELETE FROM patients WHERE id = $1 RETURNING id",
                &[Param::Text("point-p1")],
                |row| row.text(0),
            )
            .await;
        assert!(refused.is_err(), "a point read cannot write: {refused:?}");
        assert!(read("point-p1", 0).await.is_some(), "nothing was deleted");
    }

    // Closed with the database, as sqlx's pools are: no reads after.
    db.close().await;
    let after = db
        .fetch_point(sql, &[Param::Text("point-p1"), Param::Int(0)], |row| {
            row.text(0)
        })
        .await;
    assert!(after.is_err(), "read after close: {after:?}");
}
