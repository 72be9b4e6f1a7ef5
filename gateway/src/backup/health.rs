//! Does the live database look sound enough to let retention delete good generations?
//! Ransomware that encrypts or corrupts the database must not also rotate out the backups
//! that could undo it. SQLite: the file header and `PRAGMA quick_check`; both engines: the
//! record tables' row counts against the newest signed manifest (a table that lost most of
//! its rows, or is gone, looks wrong).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sqlx::Connection;

use crate::store::{Database, Engine};

/// The tables that hold records and never lose most of their rows in normal operation.
pub const GUARDED_TABLES: &[&str] = &[
    "patients",
    "resources",
    "resource_versions",
    "accounts",
    "consents",
    "consent_versions",
    "audit_leaves",
    "audit_checkpoints",
];

/// Below this many rows in the manifest a table's shrinking is not judged (too few to tell).
pub const MIN_JUDGED_ROWS: i64 = 20;

/// The 16 bytes every SQLite database file starts with.
const SQLITE_HEADER: &[u8; 16] = b"SQLite format 3\0";

/// What looks wrong in the live row counts compared with the newest manifest's; empty when
/// nothing does. Pure.
pub fn shrunk_tables(
    reference: &BTreeMap<String, i64>,
    live: &BTreeMap<String, i64>,
) -> Vec<String> {
    let mut problems = Vec::new();
    for table in GUARDED_TABLES {
        let Some(&before) = reference.get(*table) else {
            continue;
        };
        match live.get(*table) {
            None => problems.push(format!("table {table} is missing")),
            // The audit log is append-only: any loss is wrong.
            Some(&now) if *table == "audit_leaves" && now < before => problems.push(format!(
                "audit_leaves has {now} rows, the newest generation {before}"
            )),
            Some(&now) if before >= MIN_JUDGED_ROWS && now.saturating_mul(2) < before => problems
                .push(format!(
                    "{table} has {now} rows, the newest generation {before}"
                )),
            Some(_) => {}
        }
    }
    problems
}

/// The file of a `sqlite://` URL.
pub fn sqlite_file(url: &str) -> Option<PathBuf> {
    let rest = url.strip_prefix("sqlite://")?;
    let path = rest.split('?').next().unwrap_or(rest);
    (!path.is_empty() && path != ":memory:").then(|| PathBuf::from(path))
}

/// Problems with the live database (empty: it looks sound). `reference` is the newest
/// signed manifest's row counts, when there is one.
pub async fn check_live(
    db: &Database,
    database_url: &str,
    reference: Option<&BTreeMap<String, i64>>,
) -> Vec<String> {
    let live = match db.engine() {
        Engine::Sqlite => match sqlite_file(database_url) {
            Some(path) => match check_sqlite_file(&path).await {
                Ok(counts) => counts,
                Err(problem) => return vec![problem],
            },
            None => return vec!["the SQLite database has no file to check".into()],
        },
        Engine::Postgres => match counts_through(db).await {
            Ok(counts) => counts,
            Err(problem) => return vec![problem],
        },
    };
    match reference {
        Some(reference) => shrunk_tables(reference, &live),
        None => Vec::new(),
    }
}

/// Header and quick_check on a fresh read-only connection (the pool's cached pages could
/// hide what is on disk), then the guarded tables' row counts.
pub(super) async fn check_sqlite_file(
    path: &Path,
) -> std::result::Result<BTreeMap<String, i64>, String> {
    let mut header = [0u8; 16];
    let read = std::fs::File::open(path).and_then(|mut file| {
        use std::io::Read;
        file.read_exact(&mut header)
    });
    if let Err(e) = read {
        return Err(format!("the database file cannot be read ({e})"));
    }
    if &header != SQLITE_HEADER {
        return Err(
            "the database file does not start with the SQLite header (encrypted or overwritten?)"
                .into(),
        );
    }
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}?mode=ro", path.display()))
        .await
        .map_err(|e| format!("the database cannot be opened ({e})"))?;
    let checked: std::result::Result<Vec<String>, sqlx::Error> =
        sqlx::query_scalar("PRAGMA quick_check")
            .fetch_all(&mut conn)
            .await;
    match checked {
        Ok(lines) if lines.len() == 1 && lines[0] == "ok" => {}
        Ok(lines) => {
            let _ = conn.close().await;
            return Err(format!(
                "PRAGMA quick_check: {}",
                lines.into_iter().take(3).collect::<Vec<_>>().join("; ")
            ));
        }
        Err(e) => {
            let _ = conn.close().await;
            return Err(format!("PRAGMA quick_check failed ({e})"));
        }
    }
    let mut counts = BTreeMap::new();
    for table in GUARDED_TABLES {
        // Table names are constants of ours, not input.
        let count: std::result::Result<i64, sqlx::Error> =
            sqlx::query_scalar(&format!("SELECT COUNT(*) FROM \"{table}\""))
                .fetch_one(&mut conn)
                .await;
        if let Ok(count) = count {
            counts.insert(table.to_string(), count);
        }
    }
    let _ = conn.close().await;
    Ok(counts)
}

async fn counts_through(db: &Database) -> std::result::Result<BTreeMap<String, i64>, String> {
    let mut counts = BTreeMap::new();
    for table in GUARDED_TABLES {
        let count: std::result::Result<i64, sqlx::Error> =
            sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table}"))
                .fetch_one(db.read_pool())
                .await;
        match count {
            Ok(count) => {
                counts.insert(table.to_string(), count);
            }
            // A missing table is judged against the manifest; an unreachable database is not
            // a reason to delete anything either.
            Err(sqlx::Error::Database(e)) if e.message().contains("does not exist") => {}
            Err(e) => return Err(format!("the database cannot be read ({e})")),
        }
    }
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn counts(pairs: &[(&str, i64)]) -> BTreeMap<String, i64> {
        pairs.iter().map(|(t, n)| (t.to_string(), *n)).collect()
    }

    #[test]
    fn what_looks_wrong_as_the_table_says() {
        type Case = (
            &'static str,
            Vec<(&'static str, i64)>,
            Vec<(&'static str, i64)>,
            usize,
        );
        let cases: Vec<Case> = vec![
            (
                "the same",
                vec![("resources", 100)],
                vec![("resources", 100)],
                0,
            ),
            (
                "grown",
                vec![("resources", 100)],
                vec![("resources", 150)],
                0,
            ),
            (
                "a few erased",
                vec![("resources", 100)],
                vec![("resources", 80)],
                0,
            ),
            (
                "most rows gone",
                vec![("resources", 100)],
                vec![("resources", 10)],
                1,
            ),
            ("a table gone", vec![("patients", 5)], vec![], 1),
            (
                "small tables are not judged",
                vec![("patients", 10)],
                vec![("patients", 1)],
                0,
            ),
            (
                "the audit log lost one",
                vec![("audit_leaves", 10)],
                vec![("audit_leaves", 9)],
                1,
            ),
            (
                "unguarded tables are not judged",
                vec![("sessions", 100)],
                vec![("sessions", 0)],
                0,
            ),
        ];
        for (name, reference, live, problems) in cases {
            assert_eq!(
                shrunk_tables(&counts(&reference), &counts(&live)).len(),
                problems,
                "{name}"
            );
        }
    }

    #[test]
    fn sqlite_urls_name_their_file() {
        assert_eq!(
            sqlite_file("sqlite:///data/gateway.db?mode=rwc"),
            Some(PathBuf::from("/data/gateway.db"))
        );
        assert_eq!(sqlite_file("postgres://localhost/test"), None);
        assert_eq!(sqlite_file("sqlite://:memory:"), None);
    }

    proptest! {
        #[test]
        fn growth_never_looks_wrong_and_losing_everything_always_does(
            before in prop::collection::vec(0i64..10_000, GUARDED_TABLES.len()),
            growth in prop::collection::vec(0i64..10_000, GUARDED_TABLES.len()),
        ) {
            let reference: BTreeMap<String, i64> =
                GUARDED_TABLES.iter().map(|t| t.to_string()).zip(before.clone()).collect();
            let grown: BTreeMap<String, i64> = reference
                .iter()
                .zip(&growth)
                .map(|((t, n), g)| (t.clone(), n + g))
                .collect();
            prop_assert!(shrunk_tables(&reference, &grown).is_empty());
            let emptied: BTreeMap<String, i64> =
                reference.keys().map(|t| (t.clone(), 0)).collect();
            let judged = before.iter().enumerate().filter(|(i, n)| {
                **n >= MIN_JUDGED_ROWS || (GUARDED_TABLES[*i] == "audit_leaves" && **n > 0)
            }).count();
            prop_assert_eq!(shrunk_tables(&reference, &emptied).len(), judged);
        }
    }
}
