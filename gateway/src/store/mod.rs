//! Persistence on two engines through sqlx's `Any` driver: SQLite (the embedded default, WAL)
//! and PostgreSQL (the scale-out store). One schema, migrated at start for either engine.
//!
//! SQLite allows one writer at a time, so writes go through a single-connection pool (no
//! `SQLITE_BUSY` between our own writers) while reads use a wider pool; on PostgreSQL both
//! are the same pool.

pub mod accounts;
pub mod point_reads;
pub mod reconciliation;
pub mod representations;
pub mod resources;
mod writer_thread;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::migrate::Migrator;
use sqlx::{Any, AnyPool, Executor, Transaction};

use crate::error::{Error, Result};

static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/postgres");

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

impl Engine {
    pub fn of_url(url: &str) -> Result<Engine> {
        if url.starts_with("sqlite:") {
            Ok(Engine::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Engine::Postgres)
        } else {
            Err(Error::config(
                "database.url",
                "must start with sqlite:, postgres:// or postgresql://",
            ))
        }
    }

    /// The engine behind a connection of the `Any` driver.
    pub fn of_connection(conn: &sqlx::AnyConnection) -> Engine {
        if conn.backend_name().eq_ignore_ascii_case("sqlite") {
            Engine::Sqlite
        } else {
            Engine::Postgres
        }
    }
}

/// `(…), (…)` placeholders for a multi-row statement of `rows` rows of `columns` values,
/// bound in order. SQLite gets anonymous `?`: it resolves a numbered `$n` by searching the
/// statement's parameter names, which is quadratic in their number and was the largest
/// single cost of storing a page. PostgreSQL needs `$n`.
pub fn row_placeholders(engine: Engine, rows: usize, columns: usize) -> String {
    let mut sql = String::with_capacity(rows * columns * 6);
    for r in 0..rows {
        if r > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for c in 0..columns {
            if c > 0 {
                sql.push_str(", ");
            }
            match engine {
                Engine::Sqlite => sql.push('?'),
                Engine::Postgres => {
                    sql.push('$');
                    sql.push_str(&(r * columns + c + 1).to_string());
                }
            }
        }
        sql.push(')');
    }
    sql
}

/// `?, ?, …` (SQLite) or `$1, $2, …` (PostgreSQL) for an `IN (…)` list of `count` values.
pub fn list_placeholders(engine: Engine, count: usize) -> String {
    let row = row_placeholders(engine, 1, count);
    row[1..row.len() - 1].to_string()
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Engine::Sqlite => "sqlite",
            Engine::Postgres => "postgres",
        })
    }
}

/// How a pool prepares each new connection.
#[derive(Debug, Clone)]
pub(crate) enum SessionSetup {
    Main,
    /// The key store: on SQLite deleted bytes are overwritten; on PostgreSQL its own schema.
    KeyStore {
        schema: String,
    },
}

/// The database's pools, shared: cloning a `Database` is one reference count, since every
/// store holds one and request handlers clone the stores freely.
#[derive(Clone)]
pub struct Database(Arc<Pools>);

struct Pools {
    engine: Engine,
    /// Where it is (for tools that connect on their own: `pg_dump`, `pg_restore`).
    url: Arc<str>,
    read: AnyPool,
    write: AnyPool,
    /// SQLite's point reads, off sqlx's connection threads (see `point_reads`).
    native: Option<point_reads::NativeReads>,
    /// SQLite's group commits run here (see `writer_thread`).
    writer_thread: Option<writer_thread::WriterThread>,
    faults: FaultPoints,
}

impl Database {
    pub async fn connect(url: &str, max_connections: u32, timeout: Duration) -> Result<Self> {
        Self::connect_with(url, max_connections, timeout, SessionSetup::Main).await
    }

    pub(crate) async fn connect_with(
        url: &str,
        max_connections: u32,
        timeout: Duration,
        setup: SessionSetup,
    ) -> Result<Self> {
        sqlx::any::install_default_drivers();
        let engine = Engine::of_url(url)?;
        let options = AnyConnectOptions::from_str(url)
            .map_err(|e| Error::config("database.url", e.to_string()))?;
        if let (Engine::Postgres, SessionSetup::KeyStore { schema }) = (engine, &setup) {
            // The schema must exist before connections set it as their search path.
            let pool = AnyPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(timeout)
                .connect_with(options.clone())
                .await?;
            pool.execute(format!("CREATE SCHEMA IF NOT EXISTS {schema}").as_str())
                .await?;
            pool.close().await;
        }
        let pool_options = |max: u32| {
            let setup = setup.clone();
            AnyPoolOptions::new()
                .max_connections(max)
                .acquire_timeout(timeout)
                .after_connect(move |conn, _meta| {
                    let statements = session_statements(engine, &setup);
                    Box::pin(async move {
                        for statement in statements {
                            conn.execute(statement.as_str()).await?;
                        }
                        Ok(())
                    })
                })
        };
        let (read, write) = match engine {
            Engine::Sqlite => {
                let write = pool_options(1).connect_with(options.clone()).await?;
                let read = pool_options(max_connections.max(2))
                    .connect_with(options)
                    .await?;
                (read, write)
            }
            Engine::Postgres => {
                let pool = pool_options(max_connections).connect_with(options).await?;
                (pool.clone(), pool)
            }
        };
        let native = match (engine, &setup) {
            (Engine::Sqlite, SessionSetup::Main) => {
                spawn_wal_checkpointer(read.clone());
                Some(point_reads::NativeReads::for_url(
                    url,
                    Duration::from_millis(SQLITE_BUSY_TIMEOUT_MS),
                )?)
            }
            _ => None,
        };
        let writer_thread = match (engine, &setup) {
            (Engine::Sqlite, SessionSetup::Main) => Some(writer_thread::WriterThread::start()?),
            _ => None,
        };
        Ok(Database(Arc::new(Pools {
            engine,
            url: Arc::from(url),
            read,
            write,
            native,
            writer_thread,
            faults: FaultPoints::default(),
        })))
    }

    /// Applies the main schema's migrations for this engine.
    pub async fn migrate(&self) -> Result<()> {
        let migrator = match self.0.engine {
            Engine::Sqlite => &SQLITE_MIGRATIONS,
            Engine::Postgres => &POSTGRES_MIGRATIONS,
        };
        migrator.run(&self.0.write).await?;
        Ok(())
    }

    pub(crate) async fn migrate_with(&self, migrator: &Migrator) -> Result<()> {
        migrator.run(&self.0.write).await?;
        Ok(())
    }

    pub fn engine(&self) -> Engine {
        self.0.engine
    }

    /// The URL it was opened with (it may hold a password: never log it).
    pub(crate) fn url(&self) -> &str {
        &self.0.url
    }

    pub fn read_pool(&self) -> &AnyPool {
        &self.0.read
    }

    pub fn write_pool(&self) -> &AnyPool {
        &self.0.write
    }

    /// Runs a group commit's work: on SQLite on the writer's own thread, so the chain of
    /// statements never waits for a runtime worker busy with other work; on PostgreSQL
    /// here. It runs to its end even if the caller goes away.
    pub(crate) async fn run_group_commit<F>(&self, work: F) -> Result<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match &self.0.writer_thread {
            Some(thread) => thread.run(work).await,
            None => Ok(work.await),
        }
    }

    /// Starts a write transaction.
    pub async fn begin(&self) -> Result<Transaction<'static, Any>> {
        Ok(self.0.write.begin().await?)
    }

    pub async fn ping(&self) -> Result<()> {
        self.0.read.execute("SELECT 1").await?;
        Ok(())
    }

    pub async fn close(&self) {
        if let Some(native) = &self.0.native {
            native.close();
        }
        self.0.write.close().await;
        self.0.read.close().await;
    }

    /// Test hook: the next time the named point is reached, it fails. Lets tests prove a
    /// transaction leaves nothing half-written.
    pub fn inject_fault(&self, point: &'static str) {
        self.0.faults.arm(point);
    }

    pub(crate) fn fault_point(&self, point: &'static str) -> Result<()> {
        self.0.faults.check(point)
    }
}

/// How long a SQLite statement waits for a lock before it fails.
const SQLITE_BUSY_TIMEOUT_MS: u64 = 10_000;

/// How often SQLite's write-ahead log is copied back into the database, off the writer.
const WAL_CHECKPOINT_EVERY: Duration = Duration::from_millis(500);
/// The writer's own checkpoint, a backstop should the checkpointer fall behind: at 64 MiB
/// of log (4 KiB pages) rather than SQLite's 4 MiB.
const WRITER_AUTOCHECKPOINT_PAGES: u32 = 16_384;

/// Checkpoints SQLite's WAL from a reading connection every [`WAL_CHECKPOINT_EVERY`] until
/// the database is closed. By default the committing connection checkpoints whenever the log
/// passes 4 MiB, so a bulk pull's writer stopped every few group commits to copy and sync
/// megabytes; a PASSIVE checkpoint here runs beside it (it never blocks a writer or a
/// reader, and does what it can). Every commit is still synced to the log first
/// (`synchronous = FULL`), so durability is unchanged.
fn spawn_wal_checkpointer(pool: AnyPool) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(WAL_CHECKPOINT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if pool.is_closed() {
                break;
            }
            if let Err(error) = pool.execute("PRAGMA wal_checkpoint(PASSIVE)").await {
                if pool.is_closed() {
                    break;
                }
                tracing::warn!(%error, "WAL checkpoint failed; the writer's own still runs");
            }
        }
    });
}

fn session_statements(engine: Engine, setup: &SessionSetup) -> Vec<String> {
    match (engine, setup) {
        (Engine::Sqlite, setup) => {
            let mut statements = vec![
                "PRAGMA journal_mode = WAL".to_string(),
                "PRAGMA synchronous = FULL".to_string(),
                "PRAGMA foreign_keys = ON".to_string(),
                format!("PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}"),
            ];
            if matches!(setup, SessionSetup::Main) {
                statements.push(format!(
                    "PRAGMA wal_autocheckpoint = {WRITER_AUTOCHECKPOINT_PAGES}"
                ));
            }
            if matches!(setup, SessionSetup::KeyStore { .. }) {
                statements.push("PRAGMA secure_delete = ON".to_string());
            }
            statements
        }
        (Engine::Postgres, SessionSetup::KeyStore { schema }) => {
            vec![format!("SET search_path TO {schema}")]
        }
        (Engine::Postgres, SessionSetup::Main) => Vec::new(),
    }
}

#[derive(Clone, Default)]
struct FaultPoints(Arc<Mutex<Vec<&'static str>>>);

impl FaultPoints {
    fn arm(&self, point: &'static str) {
        if let Ok(mut armed) = self.0.lock() {
            armed.push(point);
        }
    }

    fn check(&self, point: &'static str) -> Result<()> {
        let Ok(mut armed) = self.0.lock() else {
            return Ok(());
        };
        if let Some(i) = armed.iter().position(|p| *p == point) {
            armed.remove(i);
            return Err(Error::InjectedFault(point));
        }
        Ok(())
    }
}

/// Records a patient (an opaque id) if it is new, inside the caller's transaction.
pub(crate) async fn insert_patient(
    conn: &mut sqlx::AnyConnection,
    patient_id: &str,
    now: i64,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO patients (id, created_at) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING",
    )
    .bind(patient_id)
    .bind(now)
    .execute(conn)
    .await?;
    Ok(())
}

/// Records each patient that is new, in one statement, inside the caller's transaction.
pub(crate) async fn insert_patients(
    conn: &mut sqlx::AnyConnection,
    patient_ids: &[&str],
    now: i64,
) -> Result<()> {
    // Two parameters a row: well inside every engine's limit per statement.
    for chunk in patient_ids.chunks(400) {
        let sql = format!(
            "INSERT INTO patients (id, created_at) VALUES {} ON CONFLICT (id) DO NOTHING",
            row_placeholders(Engine::of_connection(conn), chunk.len(), 2)
        );
        let mut query = sqlx::query(&sql);
        for patient_id in chunk {
            query = query.bind(*patient_id).bind(now);
        }
        query.execute(&mut *conn).await?;
    }
    Ok(())
}

/// Unix time in milliseconds, the store's one time representation.
pub fn now_millis() -> i64 {
    millis_of(time::OffsetDateTime::now_utc())
}

/// An instant as Unix milliseconds.
pub fn millis_of(at: time::OffsetDateTime) -> i64 {
    (at.unix_timestamp_nanos() / 1_000_000) as i64
}

/// Japan Standard Time: days (end dates, birthdays) are counted by Japan's calendar.
pub const JAPAN: time::UtcOffset = time::macros::offset!(+9);

/// Today by Japan's calendar.
pub fn japan_today() -> time::Date {
    time::OffsetDateTime::now_utc().to_offset(JAPAN).date()
}

/// A `YYYY-MM-DD` day; `Error::Invalid` naming `what` otherwise.
pub fn parse_day(text: &str, what: &str) -> Result<time::Date> {
    let format = time::macros::format_description!("[year]-[month]-[day]");
    time::Date::parse(text.trim(), &format)
        .map_err(|_| Error::Invalid(format!("{what} {text:?} is not YYYY-MM-DD")))
}

pub fn millis_to_rfc3339(millis: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(millis as i128 * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}
