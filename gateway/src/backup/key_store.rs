//! Key-store generations: the key store (each patient's wrapped data key) is backed up on
//! its own — its own archive, signed manifest (kind `key-store`) and directory
//! (`backup.key_store_directory`), optionally to its own recipient — never in the archive of
//! the data it unlocks. They expire after `backup.key_store_retention_days` (shorter than
//! the database generations'): `prune_key_store` deletes them, and with them each retired
//! KEK (`kek.key.retired-<time>`) that only they still needed, so an erased patient's key
//! is unrecoverable from backups once the retention has passed. Restoring one applies the
//! erasure ledger again before the gateway serves (see `crate::keystore::reapply_erasures`).

use std::path::{Path, PathBuf};

use sqlx::Connection;

use super::archive::{decrypt, encrypt};
use super::postgres::{self, ScratchDatabase, Tables};
use super::{
    archive_name, compare, new_generation, open_generation, parse_identity, parse_recipient,
    record_written, rfc3339, sha256_file, sqlite, write_manifest, BackupDamage, Kind, Manifest,
    Options, Verified,
};
use crate::audit::keyring::VerifierRing;
use crate::audit::{self, Agent, AuditEvent, AuditLog, EventKind};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::keystore::KeyStore;
use crate::store::{Database, Engine};

/// Takes a key-store generation into `directory/<generation>/`. `db` is the main database
/// (the backup is audited there).
pub async fn create_key_store(
    keys: &KeyStore,
    db: &Database,
    audit: &AuditLog,
    directory: &Path,
    recipient: &str,
    options: &Options,
) -> Result<Manifest> {
    let recipient = parse_recipient("backup.key_store_recipient", recipient)?;
    let store = keys.database();
    let pg_dump = match store.engine() {
        Engine::Sqlite => None,
        Engine::Postgres => Some(options.tool("pg_dump")?),
    };
    let (generation, now, target) = new_generation(directory)?;
    let engine = match store.engine() {
        Engine::Sqlite => "sqlite",
        Engine::Postgres => "postgres",
    };
    let archive = target.join(archive_name(Kind::KeyStore, engine));
    let sealed = async {
        match pg_dump {
            None => {
                let snapshot = target.join(".snapshot.sqlite");
                let result = seal_sqlite(store, &snapshot, &archive, &recipient).await;
                let _ = std::fs::remove_file(&snapshot);
                result
            }
            Some(pg_dump) => {
                let snapshot = postgres::dump_sealed(
                    store.url(),
                    &pg_dump,
                    Tables::Only(&options.key_store_schema),
                    &archive,
                    &recipient,
                )
                .await?;
                Ok((snapshot.row_counts, snapshot.schema_version))
            }
        }
    }
    .await;
    let (row_counts, schema_version) = match sealed {
        Ok(sealed) => sealed,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&target);
            return Err(e);
        }
    };
    let (archive_sha256, archive_bytes) = sha256_file(&archive)?;
    let manifest = Manifest {
        format: 2,
        kind: Kind::KeyStore,
        generation,
        created_at: rfc3339(now),
        engine: engine.into(),
        schema_version,
        row_counts,
        archive_sha256,
        archive_bytes,
        // The key store has no audit log of its own.
        audit_tree_size: 0,
        audit_root: String::new(),
    };
    write_manifest(audit, &target, &manifest)?;
    record_written(db, &manifest).await?;
    Ok(manifest)
}

/// SQLite: `VACUUM INTO` a transient snapshot (removed by the caller), counted and sealed.
async fn seal_sqlite(
    store: &Database,
    snapshot: &Path,
    archive: &Path,
    recipient: &age::x25519::Recipient,
) -> Result<(std::collections::BTreeMap<String, i64>, i64)> {
    super::archive::create_private(snapshot)?;
    sqlx::query("VACUUM INTO $1")
        .bind(snapshot.display().to_string())
        .execute(store.write_pool())
        .await?;
    let (counts, version) = sqlite_contents(snapshot).await?;
    encrypt(snapshot, archive, recipient)?;
    Ok((counts, version))
}

async fn sqlite_contents(path: &Path) -> Result<(std::collections::BTreeMap<String, i64>, i64)> {
    let mut conn =
        sqlx::SqliteConnection::connect(&format!("sqlite://{}?mode=ro", path.display())).await?;
    let counts = sqlite::row_counts(&mut conn).await?;
    let version: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM _sqlx_migrations")
        .fetch_one(&mut conn)
        .await?;
    conn.close().await?;
    Ok((counts, version))
}

/// Verifies a key-store generation: signature, kind, generation, digest, key, then a
/// restore into scratch whose row counts must match.
pub async fn verify_key_store(
    generation_dir: &Path,
    identity: &str,
    verifier: &VerifierRing,
    options: &Options,
) -> Result<std::result::Result<Verified, BackupDamage>> {
    let (manifest, archive) = match open_generation(generation_dir, verifier, Kind::KeyStore)? {
        Ok(opened) => opened,
        Err(damage) => return Ok(Err(damage)),
    };
    let identity = parse_identity(identity)?;
    if manifest.engine == "sqlite" {
        let scratch_dir = &options.scratch_dir;
        std::fs::create_dir_all(scratch_dir).map_err(|e| Error::io(scratch_dir, e))?;
        let restored = scratch_dir.join(format!("restored-keys-{}.sqlite", manifest.generation));
        if !decrypt(&archive, &restored, &identity)? {
            return Ok(Err(BackupDamage::WrongKey));
        }
        let (counts, _) = sqlite_contents(&restored).await?;
        if let Some(damage) = compare(&manifest, &counts, None) {
            return Ok(Err(damage));
        }
        return Ok(Ok(Verified {
            manifest,
            restored,
            scratch_database: None,
        }));
    }
    let server = super::scratch_server(options)?;
    let pg_restore = options.tool("pg_restore")?;
    let scratch = ScratchDatabase::create(server, &format!("keys_{}", manifest.generation)).await?;
    let checked: Result<Option<BackupDamage>> = async {
        match postgres::restore(&pg_restore, &scratch.url, &archive, &identity, false).await? {
            postgres::Restore::Done => {}
            postgres::Restore::WrongKey => return Ok(Some(BackupDamage::WrongKey)),
            postgres::Restore::Failed(message) => {
                return Ok(Some(BackupDamage::Contents(format!(
                    "pg_restore refused it: {message}"
                ))))
            }
        }
        let mut conn = sqlx::PgConnection::connect(&scratch.url).await?;
        let counts =
            postgres::row_counts(&mut conn, Tables::Only(&options.key_store_schema)).await?;
        conn.close().await?;
        Ok(compare(&manifest, &counts, None))
    }
    .await;
    super::settle_scratch(scratch, checked, manifest, options.keep_scratch).await
}

/// What restoring a key-store generation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyStoreRestored {
    pub manifest: Manifest,
    /// Keys in the restored copy that the erasure ledger says were erased after it was
    /// taken, shredded again before anything could use them.
    pub reshredded: u64,
}

/// Restores a key-store generation over the live key store, then applies the erasure
/// ledger of `main` again. Every gateway process using the key store must be stopped (the
/// caller closes its own pool first). Audited in `main`.
pub async fn restore_key_store(
    config: &Config,
    main: &Database,
    generation_dir: &Path,
    identity: &str,
    verifier: &VerifierRing,
    options: &Options,
) -> Result<std::result::Result<KeyStoreRestored, BackupDamage>> {
    let (manifest, archive) = match open_generation(generation_dir, verifier, Kind::KeyStore)? {
        Ok(opened) => opened,
        Err(damage) => return Ok(Err(damage)),
    };
    let identity = parse_identity(identity)?;
    let url = crate::keystore::url_of(config, &config.database_url())?;
    let live_engine = match Engine::of_url(&url)? {
        Engine::Sqlite => "sqlite",
        Engine::Postgres => "postgres",
    };
    if manifest.engine != live_engine {
        return Err(Error::Invalid(format!(
            "the generation is of a {} key store, this gateway's is {live_engine}",
            manifest.engine
        )));
    }
    if live_engine == "sqlite" {
        let path = sqlite_path(&url);
        let restoring = PathBuf::from(format!("{}.restoring", path.display()));
        let _ = std::fs::remove_file(&restoring);
        if !decrypt(&archive, &restoring, &identity)? {
            let _ = std::fs::remove_file(&restoring);
            return Ok(Err(BackupDamage::WrongKey));
        }
        restrict(&restoring)?;
        let (counts, _) = sqlite_contents(&restoring).await?;
        if let Some(damage) = compare(&manifest, &counts, None) {
            let _ = std::fs::remove_file(&restoring);
            return Ok(Err(damage));
        }
        for suffix in ["-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
        std::fs::rename(&restoring, &path).map_err(|e| Error::io(&path, e))?;
    } else {
        let pg_restore = options.tool("pg_restore")?;
        match postgres::restore(&pg_restore, &url, &archive, &identity, true).await? {
            postgres::Restore::Done => {}
            postgres::Restore::WrongKey => return Ok(Err(BackupDamage::WrongKey)),
            postgres::Restore::Failed(message) => {
                return Ok(Err(BackupDamage::Contents(format!(
                    "pg_restore refused it (nothing was changed): {message}"
                ))))
            }
        }
    }
    // Before anything uses the restored keys: every erasure since is applied again.
    let store = crate::keystore::open_database(config, &config.database_url()).await?;
    let reshredded = crate::keystore::reapply_erasures(main, &store).await;
    store.close().await;
    let reshredded = reshredded?;
    let event = AuditEvent::new(EventKind::SecurityConfiguration, Agent::system()).detail(format!(
        "key store restored from key-store backup generation {}; {reshredded} data key(s) erased since were shredded again",
        manifest.generation
    ));
    let mut tx = main.begin().await?;
    audit::record(&mut tx, &event).await?;
    tx.commit().await?;
    Ok(Ok(KeyStoreRestored {
        manifest,
        reshredded,
    }))
}

/// The file of a `sqlite://path?options` URL.
fn sqlite_path(url: &str) -> PathBuf {
    let rest = url
        .trim_start_matches("sqlite://")
        .trim_start_matches("sqlite:");
    PathBuf::from(rest.split('?').next().unwrap_or(rest))
}

#[cfg(unix)]
fn restrict(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io(path, e))
}

#[cfg(not(unix))]
fn restrict(_path: &Path) -> Result<()> {
    Ok(())
}

/// What a prune deleted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pruned {
    pub generations: Vec<String>,
    pub retired_keks: Vec<PathBuf>,
}

/// The generation names among `names` taken more than `retention_days` before `now`.
/// Names that are not generation names are never expired.
pub fn expired_generations<'a>(
    names: impl IntoIterator<Item = &'a str>,
    now: time::OffsetDateTime,
    retention_days: u32,
) -> Vec<String> {
    let cutoff = now - time::Duration::days(i64::from(retention_days));
    let format = time::macros::format_description!("[year][month][day]T[hour][minute][second]Z");
    let mut expired: Vec<String> = names
        .into_iter()
        .filter(|name| {
            time::PrimitiveDateTime::parse(name, &format)
                .map(|taken| taken.assume_utc() < cutoff)
                .unwrap_or(false)
        })
        .map(str::to_string)
        .collect();
    expired.sort();
    expired
}

/// Deletes the key-store generations in `directory` older than `retention_days` at `now`,
/// and each retired KEK beside `kek_path` retired before the same cutoff: every key-store
/// generation it could unwrap is gone with them. Only directories holding a key-store
/// archive are deleted (a database generation put here by mistake stays).
pub fn prune_key_store(
    directory: &Path,
    retention_days: u32,
    now: time::OffsetDateTime,
    kek_path: &Path,
) -> Result<Pruned> {
    let mut pruned = Pruned::default();
    let names: Vec<String> = match std::fs::read_dir(directory) {
        Ok(entries) => entries
            .flatten()
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(Error::io(directory, e)),
    };
    for name in expired_generations(names.iter().map(String::as_str), now, retention_days) {
        let dir = directory.join(&name);
        let is_key_store = ["sqlite", "postgres"]
            .iter()
            .any(|engine| dir.join(archive_name(Kind::KeyStore, engine)).exists());
        if !is_key_store {
            continue;
        }
        std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        pruned.generations.push(name);
    }
    let cutoff = (now - time::Duration::days(i64::from(retention_days))).unix_timestamp();
    if let (Some(keys_dir), Some(kek_name)) = (
        kek_path.parent(),
        kek_path.file_name().and_then(|n| n.to_str()),
    ) {
        let prefix = format!("{kek_name}.retired-");
        let entries = match std::fs::read_dir(keys_dir) {
            Ok(entries) => entries.flatten().collect(),
            Err(_) => Vec::new(),
        };
        for entry in entries {
            let name = entry.file_name();
            let Some(retired_at) = name
                .to_str()
                .and_then(|n| n.strip_prefix(&prefix))
                .and_then(|secs| secs.parse::<i64>().ok())
            else {
                continue;
            };
            if retired_at < cutoff {
                let path = entry.path();
                std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
                pruned.retired_keks.push(path);
            }
        }
        pruned.retired_keks.sort();
    }
    Ok(pruned)
}

/// Puts a prune on the record (nothing when it deleted nothing).
pub async fn record_prune(db: &Database, pruned: &Pruned) -> Result<()> {
    if pruned.generations.is_empty() && pruned.retired_keks.is_empty() {
        return Ok(());
    }
    let event = AuditEvent::new(EventKind::DataDeleted, Agent::system()).detail(format!(
        "expired key-store backup generations deleted ({}) and {} retired key-encryption key(s) destroyed",
        pruned.generations.join(", "),
        pruned.retired_keks.len()
    ));
    let mut tx = db.begin().await?;
    audit::record(&mut tx, &event).await?;
    tx.commit().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_expire_after_the_retention_and_nothing_else_does() {
        let now = time::macros::datetime!(2026-03-01 12:00:00 UTC);
        let cases: [(&str, u32, bool); 6] = [
            ("20260130T115959Z", 30, true),
            ("20260130T120000Z", 30, false),
            ("20260228T000000Z", 30, false),
            ("20260125T120000Z", 35, false),
            ("20260125T115959Z", 35, true),
            ("not-a-generation", 0, false),
        ];
        for (name, days, expired) in cases {
            assert_eq!(
                expired_generations([name], now, days) == vec![name.to_string()],
                expired,
                "{name} after {days} days"
            );
        }
    }

    #[test]
    fn sqlite_urls_name_their_file() {
        for (url, path) in [
            ("sqlite:///data/keys.db?mode=rwc", "/data/keys.db"),
            ("sqlite://keys.db", "keys.db"),
            ("sqlite:keys.db?mode=ro", "keys.db"),
        ] {
            assert_eq!(sqlite_path(url), PathBuf::from(path));
        }
    }
}
