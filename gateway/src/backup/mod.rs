//! Backups of the main database: a consistent snapshot (SQLite `VACUUM INTO`; PostgreSQL
//! `pg_dump -Fc` in one exported snapshot, without the key-store schema), encrypted to an
//! offline age recipient (the gateway holds only the public key), with a manifest signed by
//! the audit key as a signed note — time, schema version, row counts per table, the
//! archive's SHA-256 and the audit tree size and root — so a restore can prove it got back
//! exactly what was saved. `verify` restores into a scratch file (SQLite) or a scratch
//! database it drops afterwards (PostgreSQL) and checks all of it; each kind of damage has
//! its own error. Generations live in their own directories under `backup.directory`.
//! The key store is backed up apart, in generations of its own kind (see `key_store`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sqlx::Connection;

use crate::audit::keyring::VerifierRing;
use crate::audit::{self, Agent, AuditEvent, AuditLog, EventKind, Outcome};
use crate::error::{Error, Result};
use crate::store::{Database, Engine};

mod archive;
pub mod commands;
pub mod drill;
pub mod generations;
pub mod health;
mod key_store;
mod postgres;
pub mod retention;
mod sqlite;
pub mod storage;

use archive::{decrypt, encrypt, sha256_file};
use postgres::{ScratchDatabase, Tables};
use sqlite::{audit_head, row_counts};

pub use key_store::{
    create_key_store, expired_generations, prune_key_store, record_prune, restore_key_store,
    verify_key_store, KeyStoreRestored, Pruned,
};

const MANIFEST: &str = "manifest.note";

/// What a generation is a copy of. The two kinds never share a generation (nor, by
/// default, a directory): the key store unlocks the data, so it is kept apart and
/// expires sooner.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// The main database (every record, sealed under keys it does not hold).
    #[default]
    Database,
    /// The key store (each patient's wrapped data key).
    KeyStore,
}

impl Kind {
    fn describe(self) -> &'static str {
        match self {
            Kind::Database => "a database generation",
            Kind::KeyStore => "a key-store generation",
        }
    }
}

/// The archive's file name in a generation of `kind` taken from `engine`.
pub fn archive_name(kind: Kind, engine: &str) -> &'static str {
    match (kind, engine) {
        (Kind::Database, "sqlite") => "database.sqlite.age",
        (Kind::Database, _) => "database.pgdump.age",
        (Kind::KeyStore, "sqlite") => "keys.sqlite.age",
        (Kind::KeyStore, _) => "keys.pgdump.age",
    }
}

/// What taking and checking generations needs beyond the database itself.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where `pg_dump`/`pg_restore` are; unset: `PATH`, then `/usr/lib/postgresql/*/bin`.
    pub pg_bin_dir: Option<PathBuf>,
    /// The PostgreSQL schema of the key store: left out of database generations, the only
    /// thing in key-store generations.
    pub key_store_schema: String,
    /// Where SQLite generations are restored to be checked.
    pub scratch_dir: PathBuf,
    /// A PostgreSQL server (URL) to make scratch databases on; the gateway's own.
    pub postgres_server: Option<String>,
    /// Keep a PostgreSQL scratch database after a successful verification.
    pub keep_scratch: bool,
}

impl Options {
    pub fn new(scratch_dir: &Path) -> Self {
        Options {
            pg_bin_dir: None,
            key_store_schema: "phr_keys".into(),
            scratch_dir: scratch_dir.to_path_buf(),
            postgres_server: None,
            keep_scratch: false,
        }
    }

    /// From the configuration: its tools directory, key-store schema and database server.
    pub fn from_config(config: &crate::config::Config) -> Self {
        let url = config.database_url();
        Options {
            pg_bin_dir: config.backup.pg_bin_dir.clone(),
            key_store_schema: config.database.key_store_schema.clone(),
            scratch_dir: config.data_dir.join("restore-scratch"),
            postgres_server: (Engine::of_url(&url).ok() == Some(Engine::Postgres)).then_some(url),
            keep_scratch: false,
        }
    }

    fn tool(&self, name: &str) -> Result<PathBuf> {
        postgres::locate(name, &postgres::search_dirs(self.pg_bin_dir.as_deref()))
    }
}

/// What a generation holds, signed by the gateway's audit key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    /// Absent in the first format (database generations only).
    #[serde(default)]
    pub kind: Kind,
    /// The generation's name (also its directory's).
    pub generation: String,
    pub created_at: String,
    pub engine: String,
    /// The newest applied migration.
    pub schema_version: i64,
    pub row_counts: BTreeMap<String, i64>,
    pub archive_sha256: String,
    pub archive_bytes: u64,
    pub audit_tree_size: u64,
    /// Hex of the audit tree's root at `audit_tree_size` (the newest signed checkpoint).
    pub audit_root: String,
}

/// Each way a generation can fail verification.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BackupDamage {
    #[error("the manifest's signature does not verify with this gateway's audit key ({0})")]
    Signature(String),
    #[error("the manifest belongs to generation {found}, not {expected}")]
    OtherGeneration { expected: String, found: String },
    #[error("the archive's SHA-256 is not the manifest's: the file was changed or truncated")]
    Digest,
    #[error("the archive does not decrypt with this identity (wrong key)")]
    WrongKey,
    #[error("the restored database differs from the manifest: {0}")]
    Contents(String),
}

/// Parses the offline recipient named by `setting`.
fn parse_recipient(setting: &str, recipient: &str) -> Result<age::x25519::Recipient> {
    age::x25519::Recipient::from_str(recipient)
        .map_err(|e| Error::config(setting, format!("not an age X25519 recipient: {e}")))
}

/// A new generation's name (its time, to the second) and its empty directory.
fn new_generation(directory: &Path) -> Result<(String, time::OffsetDateTime, PathBuf)> {
    let now = time::OffsetDateTime::now_utc();
    let generation = format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second()
    );
    let target = directory.join(&generation);
    if target.exists() {
        return Err(Error::Conflict(format!(
            "generation {generation} exists; try again in a second"
        )));
    }
    std::fs::create_dir_all(&target).map_err(|e| Error::io(&target, e))?;
    Ok((generation, now, target))
}

/// Signs `manifest` and writes it beside the archive.
fn write_manifest(audit: &AuditLog, target: &Path, manifest: &Manifest) -> Result<()> {
    let body = serde_json::to_string(manifest).map_err(|e| Error::Invalid(e.to_string()))? + "\n";
    let note = audit.sign_note(&body);
    let path = target.join(MANIFEST);
    std::fs::write(&path, note).map_err(|e| Error::io(&path, e))
}

fn rfc3339(now: time::OffsetDateTime) -> String {
    crate::store::millis_to_rfc3339((now.unix_timestamp_nanos() / 1_000_000) as i64)
}

/// Takes a generation into `directory/<generation>/`; returns its manifest.
pub async fn create(
    db: &Database,
    audit: &AuditLog,
    directory: &Path,
    recipient: &str,
) -> Result<Manifest> {
    create_with(db, audit, directory, recipient, &Options::new(directory)).await
}

/// `create`, with the PostgreSQL tools and key-store schema of `options`.
pub async fn create_with(
    db: &Database,
    audit: &AuditLog,
    directory: &Path,
    recipient: &str,
    options: &Options,
) -> Result<Manifest> {
    let recipient = parse_recipient("backup.recipient", recipient)?;
    // Find the tool before anything is written.
    let pg_dump = match db.engine() {
        Engine::Sqlite => None,
        Engine::Postgres => Some(options.tool("pg_dump")?),
    };
    // The snapshot's checkpoint must cover what it holds: sequence and sign first.
    audit.sequence(true).await?;
    let (generation, now, target) = new_generation(directory)?;
    let result = match pg_dump {
        None => {
            // The plaintext snapshot lives only until it is encrypted (removed on every path).
            let snapshot = target.join(".snapshot.sqlite");
            let result =
                snapshot_and_seal(db, audit, &target, &snapshot, generation, now, &recipient).await;
            let _ = std::fs::remove_file(&snapshot);
            result
        }
        Some(pg_dump) => {
            dump_and_seal(
                db, audit, &target, &pg_dump, generation, now, &recipient, options,
            )
            .await
        }
    };
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&target);
    }
    result
}

/// PostgreSQL: `pg_dump` of everything but the key store, straight into the encryptor.
#[allow(clippy::too_many_arguments)]
async fn dump_and_seal(
    db: &Database,
    audit: &AuditLog,
    target: &Path,
    pg_dump: &Path,
    generation: String,
    now: time::OffsetDateTime,
    recipient: &age::x25519::Recipient,
    options: &Options,
) -> Result<Manifest> {
    let archive = target.join(archive_name(Kind::Database, "postgres"));
    let snapshot = postgres::dump_sealed(
        db.url(),
        pg_dump,
        Tables::AllBut(&options.key_store_schema),
        &archive,
        recipient,
    )
    .await?;
    let (archive_sha256, archive_bytes) = sha256_file(&archive)?;
    let (audit_tree_size, audit_root) = snapshot.audit_head.unwrap_or_default();
    let manifest = Manifest {
        format: 2,
        kind: Kind::Database,
        generation,
        created_at: rfc3339(now),
        engine: "postgres".into(),
        schema_version: snapshot.schema_version,
        row_counts: snapshot.row_counts,
        archive_sha256,
        archive_bytes,
        audit_tree_size,
        audit_root,
    };
    write_manifest(audit, target, &manifest)?;
    record_written(db, &manifest).await?;
    Ok(manifest)
}

/// A backup is a (sealed) copy of every record: on the record like any export.
async fn record_written(db: &Database, manifest: &Manifest) -> Result<()> {
    let what = match manifest.kind {
        Kind::Database => "backup generation",
        Kind::KeyStore => "key-store backup generation",
    };
    let event = AuditEvent::new(EventKind::Export, Agent::system()).detail(format!(
        "{what} {} written ({}, {} bytes encrypted, audit tree size {})",
        manifest.generation, manifest.engine, manifest.archive_bytes, manifest.audit_tree_size
    ));
    let mut tx = db.begin().await?;
    audit::record(&mut tx, &event).await?;
    tx.commit().await?;
    Ok(())
}

async fn snapshot_and_seal(
    db: &Database,
    audit: &AuditLog,
    target: &Path,
    snapshot: &Path,
    generation: String,
    now: time::OffsetDateTime,
    recipient: &age::x25519::Recipient,
) -> Result<Manifest> {
    // VACUUM INTO writes a consistent copy while the gateway keeps serving (into an empty
    // file made first, so the plaintext copy is the owner's alone).
    archive::create_private(snapshot)?;
    sqlx::query("VACUUM INTO $1")
        .bind(snapshot.display().to_string())
        .execute(db.write_pool())
        .await?;
    let mut conn =
        sqlx::SqliteConnection::connect(&format!("sqlite://{}?mode=ro", snapshot.display()))
            .await?;
    let row_counts = row_counts(&mut conn).await?;
    let (audit_tree_size, audit_root) = audit_head(&mut conn).await?;
    let schema_version: i64 =
        sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM _sqlx_migrations")
            .fetch_one(&mut conn)
            .await?;
    conn.close().await?;

    let archive = target.join(archive_name(Kind::Database, "sqlite"));
    encrypt(snapshot, &archive, recipient)?;
    let (archive_sha256, archive_bytes) = sha256_file(&archive)?;
    let manifest = Manifest {
        format: 2,
        kind: Kind::Database,
        generation,
        created_at: rfc3339(now),
        engine: "sqlite".into(),
        schema_version,
        row_counts,
        archive_sha256,
        archive_bytes,
        audit_tree_size,
        audit_root,
    };
    write_manifest(audit, target, &manifest)?;
    record_written(db, &manifest).await?;
    Ok(manifest)
}

/// What a successful verification proved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub manifest: Manifest,
    /// Where the restored copy was written (a scratch file the caller may keep or remove);
    /// empty for PostgreSQL.
    pub restored: PathBuf,
    /// PostgreSQL: the scratch database, when kept (`Options::keep_scratch`).
    pub scratch_database: Option<String>,
}

/// Records a verification's result in the live gateway's audit log.
pub async fn record_verification(
    db: &Database,
    generation: &str,
    result: &std::result::Result<Verified, BackupDamage>,
) -> Result<()> {
    let event = match result {
        Ok(_) => AuditEvent::new(EventKind::Read, Agent::system()).detail(format!(
            "backup generation {generation} restored into scratch and verified"
        )),
        Err(damage) => AuditEvent::new(EventKind::Read, Agent::system())
            .outcome(Outcome::SeriousFailure)
            .detail(format!(
                "backup generation {generation} failed verification: {damage}"
            )),
    };
    let mut tx = db.begin().await?;
    audit::record(&mut tx, &event).await?;
    tx.commit().await?;
    Ok(())
}

/// Verifies a generation: signature, generation, digest, decryption with `identity`, then
/// a restore into `scratch_dir` whose row counts and audit log (recomputed and checked
/// against its signed checkpoints) must match the manifest.
pub async fn verify(
    generation_dir: &Path,
    identity: &str,
    verifier: &VerifierRing,
    origin: &str,
    scratch_dir: &Path,
) -> Result<std::result::Result<Verified, BackupDamage>> {
    verify_with(
        generation_dir,
        identity,
        verifier,
        origin,
        &Options::new(scratch_dir),
    )
    .await
}

/// `verify` on either engine: a PostgreSQL generation is restored into a scratch database
/// on `options.postgres_server`, dropped afterwards unless `options.keep_scratch`.
pub async fn verify_with(
    generation_dir: &Path,
    identity: &str,
    verifier: &VerifierRing,
    origin: &str,
    options: &Options,
) -> Result<std::result::Result<Verified, BackupDamage>> {
    let (manifest, archive) = match open_generation(generation_dir, verifier, Kind::Database)? {
        Ok(opened) => opened,
        Err(damage) => return Ok(Err(damage)),
    };
    let identity = parse_identity(identity)?;
    match manifest.engine.as_str() {
        "sqlite" => verify_sqlite(manifest, &archive, &identity, verifier, origin, options).await,
        "postgres" => {
            verify_postgres(manifest, &archive, &identity, verifier, origin, options).await
        }
        other => Err(Error::Invalid(format!(
            "a generation of unknown engine {other}"
        ))),
    }
}

fn parse_identity(identity: &str) -> Result<age::x25519::Identity> {
    age::x25519::Identity::from_str(identity.trim())
        .map_err(|e| Error::config("--identity", format!("not an age X25519 identity: {e}")))
}

/// The checks every generation passes before anything is decrypted: the manifest's
/// signature, its kind (refused clearly when it is the other kind), its generation, and
/// the archive's digest.
fn open_generation(
    generation_dir: &Path,
    verifier: &VerifierRing,
    expected: Kind,
) -> Result<std::result::Result<(Manifest, PathBuf), BackupDamage>> {
    let note_path = generation_dir.join(MANIFEST);
    let note = std::fs::read_to_string(&note_path).map_err(|e| Error::io(&note_path, e))?;
    let body = match verifier.verify_any(&note) {
        Ok(body) => body,
        Err(e) => return Ok(Err(BackupDamage::Signature(e.to_string()))),
    };
    let manifest: Manifest = serde_json::from_str(body.trim_end())
        .map_err(|e| Error::Invalid(format!("manifest: {e}")))?;
    if manifest.kind != expected {
        let hint = match manifest.kind {
            Kind::KeyStore => "use `restore --key-store` for it",
            Kind::Database => "use `restore` without --key-store for it",
        };
        return Err(Error::Invalid(format!(
            "{} is {}, not {}: {hint}",
            generation_dir.display(),
            manifest.kind.describe(),
            expected.describe()
        )));
    }
    let expected_name = generation_dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_string();
    if manifest.generation != expected_name {
        return Ok(Err(BackupDamage::OtherGeneration {
            expected: expected_name,
            found: manifest.generation,
        }));
    }
    let archive = generation_dir.join(archive_name(manifest.kind, &manifest.engine));
    let (digest, _) = sha256_file(&archive)?;
    if digest != manifest.archive_sha256 {
        return Ok(Err(BackupDamage::Digest));
    }
    Ok(Ok((manifest, archive)))
}

/// Row counts and audit head of a restored copy against the manifest.
fn compare(
    manifest: &Manifest,
    counts: &BTreeMap<String, i64>,
    head: Option<(u64, &str)>,
) -> Option<BackupDamage> {
    if counts != &manifest.row_counts {
        return Some(BackupDamage::Contents("row counts differ".into()));
    }
    match head {
        Some((size, root)) if size != manifest.audit_tree_size || root != manifest.audit_root => {
            Some(BackupDamage::Contents("audit checkpoint differs".into()))
        }
        _ => None,
    }
}

/// Recomputes the whole audit tree from the restored leaves and checks every checkpoint.
async fn check_audit_log(
    restored_url: &str,
    manifest: &Manifest,
    verifier: &VerifierRing,
    origin: &str,
) -> Result<Option<BackupDamage>> {
    let restored_db = Database::connect(restored_url, 1, std::time::Duration::from_secs(5)).await?;
    let report = crate::audit::verify::verify(&restored_db, verifier, origin, None).await;
    restored_db.close().await;
    Ok(match report {
        Ok(report) if report.latest_checkpoint.unwrap_or(0) == manifest.audit_tree_size => None,
        Ok(report) => Some(BackupDamage::Contents(format!(
            "the restored audit log ends at checkpoint {:?}, the manifest says {}",
            report.latest_checkpoint, manifest.audit_tree_size
        ))),
        Err(e) => Some(BackupDamage::Contents(format!("audit log: {e}"))),
    })
}

async fn verify_sqlite(
    manifest: Manifest,
    archive: &Path,
    identity: &age::x25519::Identity,
    verifier: &VerifierRing,
    origin: &str,
    options: &Options,
) -> Result<std::result::Result<Verified, BackupDamage>> {
    let scratch_dir = &options.scratch_dir;
    std::fs::create_dir_all(scratch_dir).map_err(|e| Error::io(scratch_dir, e))?;
    let restored = scratch_dir.join(format!("restored-{}.sqlite", manifest.generation));
    if !decrypt(archive, &restored, identity)? {
        return Ok(Err(BackupDamage::WrongKey));
    }
    let mut conn =
        sqlx::SqliteConnection::connect(&format!("sqlite://{}?mode=ro", restored.display()))
            .await?;
    let counts = row_counts(&mut conn).await?;
    let (size, root) = audit_head(&mut conn).await?;
    conn.close().await?;
    if let Some(damage) = compare(&manifest, &counts, Some((size, &root))) {
        return Ok(Err(damage));
    }
    // The restored copy is a scratch file of our own: the pool may set its pragmas on it.
    let url = format!("sqlite://{}", restored.display());
    if let Some(damage) = check_audit_log(&url, &manifest, verifier, origin).await? {
        return Ok(Err(damage));
    }
    Ok(Ok(Verified {
        manifest,
        restored,
        scratch_database: None,
    }))
}

/// The PostgreSQL server scratch databases are made on.
fn scratch_server(options: &Options) -> Result<&str> {
    options.postgres_server.as_deref().ok_or_else(|| {
        Error::config(
            "database.url",
            "a PostgreSQL generation is verified in a scratch database: run this with the gateway's PostgreSQL configuration",
        )
    })
}

async fn verify_postgres(
    manifest: Manifest,
    archive: &Path,
    identity: &age::x25519::Identity,
    verifier: &VerifierRing,
    origin: &str,
    options: &Options,
) -> Result<std::result::Result<Verified, BackupDamage>> {
    let server = scratch_server(options)?;
    let pg_restore = options.tool("pg_restore")?;
    let scratch = ScratchDatabase::create(server, &manifest.generation).await?;
    let checked = async {
        match postgres::restore(&pg_restore, &scratch.url, archive, identity, false).await? {
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
            postgres::row_counts(&mut conn, Tables::AllBut(&options.key_store_schema)).await?;
        let (size, root) = postgres::audit_head(&mut conn).await?;
        conn.close().await?;
        if let Some(damage) = compare(&manifest, &counts, Some((size, &root))) {
            return Ok(Some(damage));
        }
        check_audit_log(&scratch.url, &manifest, verifier, origin).await
    }
    .await;
    settle_scratch(scratch, checked, manifest, options.keep_scratch).await
}

/// The end of a check in a PostgreSQL scratch database: dropped unless the check passed and
/// `keep_scratch` asks to keep it.
async fn settle_scratch(
    scratch: ScratchDatabase,
    checked: Result<Option<BackupDamage>>,
    manifest: Manifest,
    keep_scratch: bool,
) -> Result<std::result::Result<Verified, BackupDamage>> {
    let keep = keep_scratch && matches!(checked, Ok(None));
    let name = scratch.name.clone();
    if !keep {
        scratch.drop_database().await?;
    }
    match checked? {
        Some(damage) => Ok(Err(damage)),
        None => Ok(Ok(Verified {
            manifest,
            restored: PathBuf::new(),
            scratch_database: keep.then_some(name),
        })),
    }
}
