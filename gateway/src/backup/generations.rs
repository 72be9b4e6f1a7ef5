//! The life of generations: take one and hand it to the store, prune what the policy lets
//! go (only while the live database looks sound), and record each verification so the
//! gateway knows how many generations are verified-good.

use std::path::Path;

use sqlx::Row;

use super::health::check_live;
use super::retention::{decide, Generation, Policy, Reason};
use super::storage::{created_at, GenerationStore, Removal};
use super::{BackupDamage, Manifest, Verified};
use crate::audit::keyring::VerifierRing;
use crate::audit::{self, Agent, AuditEvent, AuditLog, EventKind, Outcome};
use crate::error::{Error, Result};
use crate::store::{now_millis, Database};

/// The detail every refused prune's audit event starts with (the alert rule looks for it).
pub const PRUNE_REFUSED: &str = "backup prune refused";

/// Verified-good generations below this raise an alert.
pub const MIN_VERIFIED_GENERATIONS: u64 = 3;

/// Takes a generation, stores it (locked until its planned expiry where the store can
/// lock) and, on a store other than the local directory, removes the local staging copy.
pub async fn take(
    db: &Database,
    audit: &AuditLog,
    staging: &Path,
    recipient: &str,
    store: &dyn GenerationStore,
    policy: &Policy,
    options: &super::Options,
) -> Result<Manifest> {
    let manifest = super::create_with(db, audit, staging, recipient, options).await?;
    let written = staging.join(&manifest.generation);
    let created = created_at(&manifest.generation)
        .ok_or_else(|| Error::Invalid(format!("generation name {}", manifest.generation)))?;
    let retain_until = policy.planned_expiry(created);
    store
        .store(&manifest.generation, &written, retain_until)
        .await?;
    if !store.keeps_in_place() {
        std::fs::remove_dir_all(&written).map_err(|e| Error::io(&written, e))?;
    }
    record(
        db,
        AuditEvent::new(EventKind::Export, Agent::system()).detail(format!(
            "backup generation {} stored in {} (retained until {} under the policy {})",
            manifest.generation,
            store.describe(),
            crate::store::millis_to_rfc3339(crate::store::millis_of(retain_until)),
            policy.describe()
        )),
    )
    .await?;
    Ok(manifest)
}

/// What a prune did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// Kept generations, newest first, with the reasons.
    pub kept: Vec<(String, Vec<Reason>)>,
    pub removed: Vec<String>,
    /// Generations the store refused to delete (its lock holds), with its answer.
    pub refused_by_store: Vec<(String, String)>,
    /// Nothing was deleted because the live database looks wrong: what looks wrong.
    pub refused: Option<Vec<String>>,
}

/// The newest generation's manifest whose signature verifies: the reference the live
/// database is compared with.
async fn newest_signed_manifest(
    store: &dyn GenerationStore,
    names: &[String],
    verifier: &VerifierRing,
) -> Option<Manifest> {
    for name in names.iter().rev() {
        let Ok(Some(note)) = store.manifest(name).await else {
            continue;
        };
        let Ok(body) = verifier.verify_any(&note) else {
            continue;
        };
        if let Ok(manifest) = serde_json::from_str::<Manifest>(body.trim_end()) {
            if &manifest.generation == name {
                return Some(manifest);
            }
        }
    }
    None
}

/// Deletes what `policy` lets go, each deletion audited — unless the live database looks
/// encrypted or corrupt: then nothing is deleted, the refusal is audited (where the
/// database still takes it) and the alert rules raise it.
pub async fn prune(
    db: &Database,
    database_url: &str,
    store: &dyn GenerationStore,
    policy: &Policy,
    verifier: &VerifierRing,
) -> Result<PruneReport> {
    let names = store.list().await?;
    let reference = newest_signed_manifest(store, &names, verifier).await;
    let problems = check_live(db, database_url, reference.as_ref().map(|m| &m.row_counts)).await;
    if !problems.is_empty() {
        let text = problems.join("; ");
        tracing::error!(problems = %text, "{PRUNE_REFUSED}: the live database looks wrong");
        let event = AuditEvent::new(EventKind::SecurityConfiguration, Agent::system())
            .outcome(Outcome::SeriousFailure)
            .detail(format!(
                "{PRUNE_REFUSED}: the live database looks encrypted or corrupt ({text}); no generation deleted"
            ));
        if let Err(error) = record(db, event).await {
            tracing::error!(%error, "the refused prune could not be audited");
        }
        return Ok(PruneReport {
            refused: Some(problems),
            ..PruneReport::default()
        });
    }
    let generations: Vec<Generation> = names
        .iter()
        .filter_map(|name| {
            created_at(name).map(|created| Generation {
                name: name.clone(),
                created,
            })
        })
        .collect();
    let decision = decide(&generations, policy);
    let mut report = PruneReport {
        kept: decision.keep,
        ..PruneReport::default()
    };
    for name in decision.delete {
        match store.remove(&name).await? {
            Removal::Removed => {
                sqlx::query(
                    "INSERT INTO backup_pruned (generation, pruned_at) VALUES ($1, $2)
                     ON CONFLICT (generation) DO NOTHING",
                )
                .bind(&name)
                .bind(now_millis())
                .execute(db.write_pool())
                .await?;
                record(
                    db,
                    AuditEvent::new(EventKind::DataDeleted, Agent::system()).detail(format!(
                        "backup generation {name} deleted from {} by retention (policy {})",
                        store.describe(),
                        policy.describe()
                    )),
                )
                .await?;
                report.removed.push(name);
            }
            Removal::Refused(answer) => {
                record(
                    db,
                    AuditEvent::new(EventKind::DataDeleted, Agent::system())
                        .outcome(Outcome::MinorFailure)
                        .detail(format!(
                            "backup generation {name} not deleted: {} refused ({answer}); its lock still holds, retried at the next prune",
                            store.describe()
                        )),
                )
                .await?;
                report.refused_by_store.push((name, answer));
            }
        }
    }
    Ok(report)
}

async fn record(db: &Database, event: AuditEvent) -> Result<()> {
    let mut tx = db.begin().await?;
    audit::record(&mut tx, &event).await?;
    tx.commit().await?;
    Ok(())
}

/// Where a verification came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerificationSource {
    Restore,
    Drill,
}

impl VerificationSource {
    fn code(self) -> &'static str {
        match self {
            VerificationSource::Restore => "restore",
            VerificationSource::Drill => "drill",
        }
    }
}

/// Stores one verification's result (the audit event is `super::record_verification`'s).
pub async fn record_result(
    db: &Database,
    run: &str,
    source: VerificationSource,
    generation: &str,
    result: &std::result::Result<Verified, BackupDamage>,
    restore_millis: i64,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO backup_verifications (id, generation, verified_at, result, detail,
             restore_millis, source, run)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(uuid::Uuid::now_v7().to_string())
    .bind(generation)
    .bind(now_millis())
    .bind(if result.is_ok() { "ok" } else { "failed" })
    .bind(result.as_ref().err().map(ToString::to_string))
    .bind(restore_millis)
    .bind(source.code())
    .bind(run)
    .execute(db.write_pool())
    .await?;
    Ok(())
}

/// Generations whose latest verification passed and that retention has not deleted,
/// newest first.
pub async fn verified_good(db: &Database) -> Result<Vec<String>> {
    let rows = sqlx::query(
        "SELECT v.generation FROM backup_verifications v
         WHERE v.result = 'ok'
           AND NOT EXISTS (SELECT 1 FROM backup_verifications w
                           WHERE w.generation = v.generation
                             AND (w.verified_at > v.verified_at
                                  OR (w.verified_at = v.verified_at AND w.id > v.id)))
           AND NOT EXISTS (SELECT 1 FROM backup_pruned p WHERE p.generation = v.generation)
         ORDER BY v.generation DESC",
    )
    .fetch_all(db.read_pool())
    .await?;
    rows.iter()
        .map(|row| row.try_get::<String, _>(0).map_err(Error::from))
        .collect()
}

/// When the newest verification (of any result) was recorded.
pub async fn last_verification_at(db: &Database) -> Result<Option<i64>> {
    Ok(
        sqlx::query_scalar::<_, Option<i64>>("SELECT MAX(verified_at) FROM backup_verifications")
            .fetch_one(db.read_pool())
            .await?,
    )
}

/// The last verified restore (any source): generation, when, how long it took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastVerified {
    pub generation: String,
    pub verified_at_millis: i64,
    pub restore_millis: i64,
}

pub async fn last_verified(db: &Database) -> Result<Option<LastVerified>> {
    let row = sqlx::query(
        "SELECT generation, verified_at, restore_millis FROM backup_verifications
         WHERE result = 'ok' ORDER BY verified_at DESC, id DESC LIMIT 1",
    )
    .fetch_optional(db.read_pool())
    .await?;
    row.map(|row| {
        Ok(LastVerified {
            generation: row.try_get(0)?,
            verified_at_millis: row.try_get(1)?,
            restore_millis: row.try_get(2)?,
        })
    })
    .transpose()
}

/// The last drill: whether every generation it checked verified, and how long its
/// restores took in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LastDrill {
    pub success: bool,
    pub restore_millis: i64,
    pub at_millis: i64,
}

pub async fn last_drill(db: &Database) -> Result<Option<LastDrill>> {
    let row = sqlx::query(
        "SELECT CAST(SUM(CASE WHEN result = 'ok' THEN 0 ELSE 1 END) AS BIGINT),
                CAST(SUM(restore_millis) AS BIGINT), MAX(verified_at)
         FROM backup_verifications
         WHERE run = (SELECT run FROM backup_verifications WHERE source = 'drill'
                      ORDER BY verified_at DESC, id DESC LIMIT 1)",
    )
    .fetch_one(db.read_pool())
    .await?;
    let failures: Option<i64> = row.try_get(0)?;
    let Some(failures) = failures else {
        return Ok(None);
    };
    Ok(Some(LastDrill {
        success: failures == 0,
        restore_millis: row.try_get::<Option<i64>, _>(1)?.unwrap_or(0),
        at_millis: row.try_get::<Option<i64>, _>(2)?.unwrap_or(0),
    }))
}
