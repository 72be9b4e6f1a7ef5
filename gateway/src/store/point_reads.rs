//! Point reads: one row found through an index, as every FHIR request makes (its token and
//! consent, then the resource).
//!
//! On SQLite they run on the calling thread, on a native connection from a small pool.
//! sqlx's SQLite driver runs each statement on its connection's own thread and hands the
//! row back over a channel. For a read of a few pages that is microseconds of SQLite and
//! several thread switches, and on a small machine the switches were most of a read's cost
//! (`docs/benchmarks.md`, FHIR API). Only index lookups belong here: anything that scans
//! would hold up the async worker it runs on. On PostgreSQL the same statement goes
//! through sqlx's pool, so one statement and one row mapping serve both engines.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use sqlx::any::AnyRow;
use sqlx::Row;

use super::{Database, Engine};
use crate::error::{Error, Result};

/// A value bound to a numbered parameter (`$1`, `$2`, … in order).
#[derive(Debug, Clone, Copy)]
pub enum Param<'a> {
    Text(&'a str),
    Int(i64),
    Blob(&'a [u8]),
}

/// `params` bound in order to a sqlx query.
pub fn bind_params<'q>(
    mut query: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    params: &[Param<'_>],
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    for param in params {
        query = match param {
            Param::Text(text) => query.bind(text.to_string()),
            Param::Int(int) => query.bind(*int),
            Param::Blob(blob) => query.bind(blob.to_vec()),
        };
    }
    query
}

/// The columns of one result row, whichever engine produced it.
pub trait RowValues {
    fn text(&self, index: usize) -> Result<String>;
    fn opt_text(&self, index: usize) -> Result<Option<String>>;
    fn int(&self, index: usize) -> Result<i64>;
    fn opt_int(&self, index: usize) -> Result<Option<i64>>;
    fn blob(&self, index: usize) -> Result<Vec<u8>>;
}

impl RowValues for AnyRow {
    fn text(&self, index: usize) -> Result<String> {
        Ok(self.try_get(index)?)
    }
    fn opt_text(&self, index: usize) -> Result<Option<String>> {
        Ok(self.try_get(index)?)
    }
    fn int(&self, index: usize) -> Result<i64> {
        Ok(self.try_get(index)?)
    }
    fn opt_int(&self, index: usize) -> Result<Option<i64>> {
        Ok(self.try_get(index)?)
    }
    fn blob(&self, index: usize) -> Result<Vec<u8>> {
        Ok(self.try_get(index)?)
    }
}

impl RowValues for rusqlite::Row<'_> {
    fn text(&self, index: usize) -> Result<String> {
        Ok(self.get(index)?)
    }
    fn opt_text(&self, index: usize) -> Result<Option<String>> {
        Ok(self.get(index)?)
    }
    fn int(&self, index: usize) -> Result<i64> {
        Ok(self.get(index)?)
    }
    fn opt_int(&self, index: usize) -> Result<Option<i64>> {
        Ok(self.get(index)?)
    }
    fn blob(&self, index: usize) -> Result<Vec<u8>> {
        Ok(self.get(index)?)
    }
}

/// Native read-only connections to the SQLite file, opened as needed and kept for reuse.
pub(crate) struct NativeReads {
    path: PathBuf,
    busy_timeout: Duration,
    idle: Mutex<Vec<rusqlite::Connection>>,
    /// Set by `close`, as sqlx's pools are closed with it: no reads after.
    closed: AtomicBool,
}

/// Connections kept idle; more are opened when more threads read at once, and closed after.
const IDLE_KEPT: usize = 16;
/// Prepared statements each connection keeps.
const STATEMENTS_KEPT: usize = 64;

impl NativeReads {
    /// For the SQLite database at `url` (`sqlite:` URL as sqlx takes it).
    pub(crate) fn for_url(url: &str, busy_timeout: Duration) -> Result<NativeReads> {
        use std::str::FromStr;
        let options = sqlx::sqlite::SqliteConnectOptions::from_str(url)
            .map_err(|e| Error::config("database.url", e.to_string()))?;
        Ok(NativeReads {
            path: options.get_filename().to_path_buf(),
            busy_timeout,
            idle: Mutex::default(),
            closed: AtomicBool::default(),
        })
    }

    fn open(&self) -> Result<rusqlite::Connection> {
        use rusqlite::OpenFlags;
        // Read-write at the file level (a WAL reader updates the shared-memory index), but
        // `query_only` refuses any statement that would change the database.
        let conn = rusqlite::Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(self.busy_timeout)?;
        conn.pragma_update(None, "query_only", true)?;
        conn.set_prepared_statement_cache_capacity(STATEMENTS_KEPT);
        Ok(conn)
    }

    fn fetch_optional<T>(
        &self,
        sql: &str,
        params: &[Param<'_>],
        map: impl FnOnce(&dyn RowValues) -> Result<T>,
    ) -> Result<Option<T>> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Database(sqlx::Error::PoolClosed));
        }
        let taken = self.idle.lock().ok().and_then(|mut idle| idle.pop());
        let conn = match taken {
            Some(conn) => conn,
            None => self.open()?,
        };
        let result = Self::run(&conn, sql, params, map);
        if let Ok(mut idle) = self.idle.lock() {
            if idle.len() < IDLE_KEPT && !self.closed.load(Ordering::Acquire) {
                idle.push(conn);
            }
        }
        result
    }

    fn run<T>(
        conn: &rusqlite::Connection,
        sql: &str,
        params: &[Param<'_>],
        map: impl FnOnce(&dyn RowValues) -> Result<T>,
    ) -> Result<Option<T>> {
        let mut statement = conn.prepare_cached(sql)?;
        for (n, param) in params.iter().enumerate() {
            // `$n` is a named parameter to SQLite, numbered in order of first appearance,
            // which need not be n: look each one up by its name.
            let index = statement
                .parameter_index(&format!("${}", n + 1))?
                .ok_or_else(|| Error::Invalid(format!("the statement has no ${}", n + 1)))?;
            match param {
                Param::Text(text) => statement.raw_bind_parameter(index, *text)?,
                Param::Int(int) => statement.raw_bind_parameter(index, *int)?,
                Param::Blob(blob) => statement.raw_bind_parameter(index, *blob)?,
            }
        }
        let mut rows = statement.raw_query();
        match rows.next()? {
            Some(row) => map(row).map(Some),
            None => Ok(None),
        }
    }

    /// Closes the idle connections (before the database files are removed or replaced).
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        if let Ok(mut idle) = self.idle.lock() {
            idle.clear();
        }
    }
}

impl Database {
    /// The first row of a point read, mapped; `None` when there is none. See the module's
    /// note: on SQLite it runs on the calling thread, so only lookups through an index.
    pub async fn fetch_point<T>(
        &self,
        sql: &str,
        params: &[Param<'_>],
        map: impl FnOnce(&dyn RowValues) -> Result<T>,
    ) -> Result<Option<T>> {
        if let (Engine::Sqlite, Some(native)) = (self.0.engine, &self.0.native) {
            return native.fetch_optional(sql, params, map);
        }
        let query = bind_params(sqlx::query(sql), params);
        match query.fetch_optional(self.read_pool()).await? {
            Some(row) => map(&row).map(Some),
            None => Ok(None),
        }
    }
}
