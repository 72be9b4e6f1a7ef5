//! The PostgreSQL side of a generation: `pg_dump -Fc` run in a snapshot exported by a
//! REPEATABLE READ transaction, so the row counts and audit head the manifest records are
//! taken from exactly what the dump holds; the dump is piped straight into the age
//! encryptor (no plaintext on disk). Verification `pg_restore`s into a scratch database
//! made for it and dropped afterwards.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sqlx::{Connection, Executor, Row};

use super::archive::{decrypt_into, encrypt_from, Decrypted};
use crate::error::{Error, Result};

/// The directories searched for the PostgreSQL client tools: `configured` alone when set,
/// else `PATH` and then each installed `/usr/lib/postgresql/<version>/bin`, newest first.
pub(super) fn search_dirs(configured: Option<&Path>) -> Vec<PathBuf> {
    if let Some(dir) = configured {
        return vec![dir.to_path_buf()];
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect())
        .unwrap_or_default();
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .collect();
    versions.sort_by_key(|v| std::cmp::Reverse(v.0));
    dirs.extend(versions.into_iter().map(|(_, dir)| dir));
    dirs
}

/// The first `tool` found in `dirs`, or an error saying where it looked and what to install.
pub(super) fn locate(tool: &str, dirs: &[PathBuf]) -> Result<PathBuf> {
    dirs.iter()
        .map(|dir| dir.join(tool))
        .find(|path| path.is_file())
        .ok_or_else(|| {
            Error::config(
                "backup.pg_bin_dir",
                format!(
                    "{tool} not found (looked in {}): install the PostgreSQL client tools (e.g. postgresql-client, the server's major version or newer) or set backup.pg_bin_dir",
                    dirs.iter()
                        .map(|d| d.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
        })
}

/// A URL for libpq without its password, and the password: the password goes to the tool
/// in its environment (`PGPASSWORD`), never on a command line other users can read.
pub(super) fn libpq_target(url: &str) -> Result<(String, Option<String>)> {
    let mut parsed =
        url::Url::parse(url).map_err(|e| Error::config("database.url", e.to_string()))?;
    let password = parsed.password().map(|p| {
        percent_encoding::percent_decode_str(p)
            .decode_utf8_lossy()
            .into_owned()
    });
    let _ = parsed.set_password(None);
    Ok((parsed.to_string(), password))
}

/// The same server, another database.
pub(super) fn with_database(url: &str, database: &str) -> Result<String> {
    let mut parsed =
        url::Url::parse(url).map_err(|e| Error::config("database.url", e.to_string()))?;
    parsed.set_path(&format!("/{database}"));
    Ok(parsed.to_string())
}

fn tool_command(tool: &Path, url: &str) -> Result<Command> {
    let (target, password) = libpq_target(url)?;
    let mut command = Command::new(tool);
    command.arg(format!("--dbname={target}"));
    command.env_remove("PGPASSWORD");
    if let Some(password) = password {
        command.env("PGPASSWORD", password);
    }
    Ok(command)
}

/// Which tables a generation holds: the main database without the key-store schema, or
/// the key-store schema alone.
#[derive(Debug, Clone, Copy)]
pub(super) enum Tables<'a> {
    AllBut(&'a str),
    Only(&'a str),
}

impl Tables<'_> {
    /// `pg_dump`'s selection of the same.
    fn dump_args(&self) -> Vec<String> {
        match self {
            Tables::AllBut(schema) => vec![format!("--exclude-schema={schema}")],
            Tables::Only(schema) => vec![format!("--schema={schema}")],
        }
    }
}

fn quote(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\""))
}

/// Row counts per table (`table` in `public`, else `schema.table`), sqlx's bookkeeping aside.
pub(super) async fn row_counts(
    conn: &mut sqlx::PgConnection,
    tables: Tables<'_>,
) -> Result<BTreeMap<String, i64>> {
    let (only, but) = match tables {
        Tables::AllBut(schema) => (None, Some(schema)),
        Tables::Only(schema) => (Some(schema), None),
    };
    let names = sqlx::query(
        "SELECT table_schema::text, table_name::text FROM information_schema.tables
         WHERE table_type = 'BASE TABLE'
           AND table_schema NOT IN ('pg_catalog', 'information_schema')
           AND table_schema NOT LIKE 'pg\\_%'
           AND table_name <> '_sqlx_migrations'
           AND ($1::text IS NULL OR table_schema = $1)
           AND ($2::text IS NULL OR table_schema <> $2)
         ORDER BY 1, 2",
    )
    .bind(only)
    .bind(but)
    .fetch_all(&mut *conn)
    .await?;
    let mut counts = BTreeMap::new();
    for row in names {
        let schema: String = row.try_get(0)?;
        let table: String = row.try_get(1)?;
        // Names come from the catalogue, quoted all the same.
        let count: i64 = sqlx::query_scalar(&format!(
            "SELECT COUNT(*) FROM {}.{}",
            quote(&schema),
            quote(&table)
        ))
        .fetch_one(&mut *conn)
        .await?;
        let name = if schema == "public" {
            table
        } else {
            format!("{schema}.{table}")
        };
        counts.insert(name, count);
    }
    Ok(counts)
}

/// The newest signed audit checkpoint's size and root.
pub(super) async fn audit_head(conn: &mut sqlx::PgConnection) -> Result<(u64, String)> {
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

/// The newest applied migration of the main database, or of the key-store schema.
pub(super) async fn schema_version(
    conn: &mut sqlx::PgConnection,
    tables: Tables<'_>,
) -> Result<i64> {
    let table = match tables {
        Tables::AllBut(_) => "_sqlx_migrations".to_string(),
        Tables::Only(schema) => format!("{}._sqlx_migrations", quote(schema)),
    };
    Ok(
        sqlx::query_scalar(&format!("SELECT COALESCE(MAX(version), 0) FROM {table}"))
            .fetch_one(&mut *conn)
            .await?,
    )
}

/// What the snapshot the dump was taken in held.
pub(super) struct Snapshot {
    pub row_counts: BTreeMap<String, i64>,
    pub schema_version: i64,
    /// `None` for the key store (it has no audit log).
    pub audit_head: Option<(u64, String)>,
}

/// Dumps `tables` of the database at `url` into the encrypted `archive`, in one snapshot
/// shared with the counts it returns.
pub(super) async fn dump_sealed(
    url: &str,
    pg_dump: &Path,
    tables: Tables<'_>,
    archive: &Path,
    recipient: &age::x25519::Recipient,
) -> Result<Snapshot> {
    let mut conn = sqlx::PgConnection::connect(url).await?;
    conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .await?;
    let snapshot_id: String = sqlx::query_scalar("SELECT pg_export_snapshot()")
        .fetch_one(&mut conn)
        .await?;
    let row_counts = row_counts(&mut conn, tables).await?;
    let schema_version = schema_version(&mut conn, tables).await?;
    let audit_head = match tables {
        Tables::AllBut(_) => Some(audit_head(&mut conn).await?),
        Tables::Only(_) => None,
    };
    let mut command = tool_command(pg_dump, url)?;
    command
        .arg("--format=custom")
        .arg(format!("--snapshot={snapshot_id}"))
        .args(tables.dump_args());
    let archive_path = archive.to_path_buf();
    let recipient = recipient.clone();
    // The transaction stays open (holding the snapshot) until pg_dump is done.
    let dumped =
        tokio::task::spawn_blocking(move || run_dump(command, &archive_path, &recipient)).await;
    let _ = conn.execute("COMMIT").await;
    let _ = conn.close().await;
    match dumped {
        Ok(Ok(())) => Ok(Snapshot {
            row_counts,
            schema_version,
            audit_head,
        }),
        Ok(Err(e)) => {
            let _ = std::fs::remove_file(archive);
            Err(e)
        }
        Err(e) => {
            let _ = std::fs::remove_file(archive);
            Err(Error::Invalid(format!("pg_dump task: {e}")))
        }
    }
}

fn run_dump(
    mut command: Command,
    archive: &Path,
    recipient: &age::x25519::Recipient,
) -> Result<()> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::io(Path::new("pg_dump"), e))?;
    let stderr = drain(child.stderr.take());
    let sealed = match child.stdout.take() {
        Some(mut stdout) => encrypt_from(&mut stdout, archive, recipient),
        None => Err(Error::Invalid("pg_dump gave no output".into())),
    };
    let status = child
        .wait()
        .map_err(|e| Error::io(Path::new("pg_dump"), e))?;
    let stderr = stderr.join().unwrap_or_default();
    if !status.success() {
        return Err(Error::Invalid(format!(
            "pg_dump failed ({status}): {}",
            stderr.trim()
        )));
    }
    sealed
}

/// Reads a child's standard error on its own thread (so a chatty tool cannot block).
fn drain(stream: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut stream) = stream {
            let _ = stream.read_to_string(&mut text);
        }
        text
    })
}

/// How a `pg_restore` of an archive went.
#[derive(Debug)]
pub(super) enum Restore {
    Done,
    WrongKey,
    /// `pg_restore` refused the dump (its message).
    Failed(String),
}

/// Decrypts `archive` into `pg_restore` restoring into the database at `url`, in one
/// transaction. `clean`: drop what the dump holds first (restoring over a live schema).
pub(super) async fn restore(
    pg_restore: &Path,
    url: &str,
    archive: &Path,
    identity: &age::x25519::Identity,
    clean: bool,
) -> Result<Restore> {
    let mut command = tool_command(pg_restore, url)?;
    command.args([
        "--no-owner",
        "--no-privileges",
        "--exit-on-error",
        "--single-transaction",
    ]);
    if clean {
        command.args(["--clean", "--if-exists"]);
    }
    let archive = archive.to_path_buf();
    let identity = identity.clone();
    tokio::task::spawn_blocking(move || run_restore(command, &archive, &identity))
        .await
        .map_err(|e| Error::Invalid(format!("pg_restore task: {e}")))?
}

fn run_restore(
    mut command: Command,
    archive: &Path,
    identity: &age::x25519::Identity,
) -> Result<Restore> {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::io(Path::new("pg_restore"), e))?;
    let stderr = drain(child.stderr.take());
    let decrypted = match child.stdin.take() {
        Some(mut stdin) => decrypt_into(archive, &mut stdin, identity)?,
        None => Decrypted::WriterClosed,
    };
    if decrypted == Decrypted::WrongKey {
        // Nothing authentic was restored: stop pg_restore before it commits anything.
        let _ = child.kill();
        let _ = child.wait();
        return Ok(Restore::WrongKey);
    }
    let status = child
        .wait()
        .map_err(|e| Error::io(Path::new("pg_restore"), e))?;
    let stderr = stderr.join().unwrap_or_default();
    if !status.success() || decrypted == Decrypted::WriterClosed {
        return Ok(Restore::Failed(format!("{status}: {}", stderr.trim())));
    }
    Ok(Restore::Done)
}

/// A database made on the live server to restore a generation into.
pub(super) struct ScratchDatabase {
    server_url: String,
    pub name: String,
    pub url: String,
}

impl ScratchDatabase {
    /// A new empty database with a name no other run uses (`label`: what is restored).
    pub async fn create(server_url: &str, label: &str) -> Result<Self> {
        let name = format!(
            "phr_restore_{}_{}",
            label.to_ascii_lowercase(),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let mut conn = sqlx::PgConnection::connect(server_url).await?;
        conn.execute(format!("CREATE DATABASE {}", quote(&name)).as_str())
            .await?;
        conn.close().await?;
        Ok(ScratchDatabase {
            url: with_database(server_url, &name)?,
            server_url: server_url.to_string(),
            name,
        })
    }

    pub async fn drop_database(self) -> Result<()> {
        let mut conn = sqlx::PgConnection::connect(&self.server_url).await?;
        conn.execute(
            format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", quote(&self.name)).as_str(),
        )
        .await?;
        conn.close().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_leave_the_url_for_the_environment() {
        let cases = [
            (
                "postgres://app:s%40cret@db.example:5433/phr?sslmode=require",
                "postgres://app@db.example:5433/phr?sslmode=require",
                Some("s@cret"),
            ),
            (
                "postgres://postgres@127.0.0.1:5432/test",
                "postgres://postgres@127.0.0.1:5432/test",
                None,
            ),
        ];
        for (url, target, password) in cases {
            let (t, p) = libpq_target(url).expect("parse");
            assert_eq!(t, target);
            assert_eq!(p.as_deref(), password);
        }
        assert_eq!(
            with_database("postgres://a:b@h:1/live?sslmode=require", "scratch").expect("url"),
            "postgres://a:b@h:1/scratch?sslmode=require"
        );
    }

    #[test]
    fn a_missing_tool_is_named_with_where_it_was_looked_for() {
        let empty = tempfile::tempdir().expect("tempdir");
        let dirs = search_dirs(Some(empty.path()));
        assert_eq!(dirs, vec![empty.path().to_path_buf()]);
        let error = locate("pg_dump", &dirs).unwrap_err().to_string();
        assert!(error.contains("pg_dump not found"), "{error}");
        assert!(
            error.contains(&empty.path().display().to_string()),
            "{error}"
        );
        std::fs::write(empty.path().join("pg_dump"), "").expect("file");
        assert_eq!(
            locate("pg_dump", &dirs).expect("found"),
            empty.path().join("pg_dump")
        );
    }
}
