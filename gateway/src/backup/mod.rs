//! Backups of the main database (SQLite so far; PostgreSQL's `pg_dump` path is still to
//! come): a consistent snapshot (`VACUUM INTO`), encrypted to an offline age recipient (the
//! gateway holds only the public key), with a manifest signed by the audit key as a signed
//! note — time, schema version, row counts per table, the archive's SHA-256 and the audit
//! tree size and root — so a restore can prove it got back exactly what was saved.
//! `verify` restores into a scratch file and checks all of it; each kind of damage has its
//! own error. Generations live in their own directories under `backup.directory`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sqlx::Connection;

use crate::audit::checkpoint::NoteVerifier;
use crate::audit::{self, Agent, AuditEvent, AuditLog, EventKind, Outcome};
use crate::error::{Error, Result};
use crate::store::{Database, Engine};

mod archive;
pub mod commands;
pub mod drill;
pub mod generations;
pub mod health;
pub mod retention;
mod sqlite;
pub mod storage;

use archive::{decrypt, encrypt, sha256_file};
use sqlite::{audit_head, row_counts};

const ARCHIVE: &str = "database.sqlite.age";
const MANIFEST: &str = "manifest.note";

/// What a generation holds, signed by the gateway's audit key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
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

/// Takes a generation into `directory/<generation>/`; returns its manifest.
pub async fn create(
    db: &Database,
    audit: &AuditLog,
    directory: &Path,
    recipient: &str,
) -> Result<Manifest> {
    if db.engine() != Engine::Sqlite {
        return Err(Error::config(
            "database",
            "backups of PostgreSQL are not built yet (pg_dump); back it up with your PostgreSQL tooling",
        ));
    }
    let recipient = age::x25519::Recipient::from_str(recipient).map_err(|e| {
        Error::config(
            "backup.recipient",
            format!("not an age X25519 recipient: {e}"),
        )
    })?;
    // The snapshot's checkpoint must cover what it holds: sequence and sign first.
    audit.sequence(true).await?;
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
    // The plaintext snapshot lives only until it is encrypted (removed on every path).
    let snapshot = target.join(".snapshot.sqlite");
    let result =
        snapshot_and_seal(db, audit, &target, &snapshot, generation, now, &recipient).await;
    let _ = std::fs::remove_file(&snapshot);
    result
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
    // VACUUM INTO writes a consistent copy while the gateway keeps serving.
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

    let archive = target.join(ARCHIVE);
    encrypt(snapshot, &archive, recipient)?;
    let (archive_sha256, archive_bytes) = sha256_file(&archive)?;
    let manifest = Manifest {
        format: 1,
        generation,
        created_at: crate::store::millis_to_rfc3339(
            (now.unix_timestamp_nanos() / 1_000_000) as i64,
        ),
        engine: "sqlite".into(),
        schema_version,
        row_counts,
        archive_sha256,
        archive_bytes,
        audit_tree_size,
        audit_root,
    };
    let body = serde_json::to_string(&manifest).map_err(|e| Error::Invalid(e.to_string()))? + "\n";
    let note = audit.sign_note(&body);
    let path = target.join(MANIFEST);
    std::fs::write(&path, note).map_err(|e| Error::io(&path, e))?;
    // A backup is a (sealed) copy of every record: on the record like any export.
    let event = AuditEvent::new(EventKind::Export, Agent::system()).detail(format!(
        "backup generation {} written ({} bytes encrypted, audit tree size {})",
        manifest.generation, manifest.archive_bytes, manifest.audit_tree_size
    ));
    let mut tx = db.begin().await?;
    audit::record(&mut tx, &event).await?;
    tx.commit().await?;
    Ok(manifest)
}

/// What a successful verification proved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub manifest: Manifest,
    /// Where the restored copy was written (a scratch file the caller may keep or remove).
    pub restored: PathBuf,
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
    verifier: &NoteVerifier,
    origin: &str,
    scratch_dir: &Path,
) -> Result<std::result::Result<Verified, BackupDamage>> {
    let note_path = generation_dir.join(MANIFEST);
    let note = std::fs::read_to_string(&note_path).map_err(|e| Error::io(&note_path, e))?;
    let body = match verifier.verify(&note) {
        Ok(body) => body,
        Err(e) => return Ok(Err(BackupDamage::Signature(e.to_string()))),
    };
    let manifest: Manifest = serde_json::from_str(body.trim_end())
        .map_err(|e| Error::Invalid(format!("manifest: {e}")))?;
    let expected = generation_dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_string();
    if manifest.generation != expected {
        return Ok(Err(BackupDamage::OtherGeneration {
            expected,
            found: manifest.generation,
        }));
    }
    let archive = generation_dir.join(ARCHIVE);
    let (digest, _) = sha256_file(&archive)?;
    if digest != manifest.archive_sha256 {
        return Ok(Err(BackupDamage::Digest));
    }
    let identity = age::x25519::Identity::from_str(identity.trim())
        .map_err(|e| Error::config("--identity", format!("not an age X25519 identity: {e}")))?;
    std::fs::create_dir_all(scratch_dir).map_err(|e| Error::io(scratch_dir, e))?;
    let restored = scratch_dir.join(format!("restored-{}.sqlite", manifest.generation));
    if !decrypt(&archive, &restored, &identity)? {
        return Ok(Err(BackupDamage::WrongKey));
    }
    let mut conn =
        sqlx::SqliteConnection::connect(&format!("sqlite://{}?mode=ro", restored.display()))
            .await?;
    let counts = row_counts(&mut conn).await?;
    let (size, root) = audit_head(&mut conn).await?;
    conn.close().await?;
    if counts != manifest.row_counts {
        return Ok(Err(BackupDamage::Contents("row counts differ".into())));
    }
    if size != manifest.audit_tree_size || root != manifest.audit_root {
        return Ok(Err(BackupDamage::Contents(
            "audit checkpoint differs".into(),
        )));
    }
    // Recompute the whole audit tree from the restored leaves and check every checkpoint.
    // The restored copy is a scratch file of our own: the pool may set its pragmas on it.
    let restored_db = Database::connect(
        &format!("sqlite://{}", restored.display()),
        1,
        std::time::Duration::from_secs(5),
    )
    .await?;
    let report = crate::audit::verify::verify(&restored_db, verifier, origin, None).await;
    restored_db.close().await;
    match report {
        Ok(report) if report.latest_checkpoint.unwrap_or(0) == manifest.audit_tree_size => {}
        Ok(report) => {
            return Ok(Err(BackupDamage::Contents(format!(
                "the restored audit log ends at checkpoint {:?}, the manifest says {}",
                report.latest_checkpoint, manifest.audit_tree_size
            ))))
        }
        Err(e) => return Ok(Err(BackupDamage::Contents(format!("audit log: {e}")))),
    }
    Ok(Ok(Verified { manifest, restored }))
}
