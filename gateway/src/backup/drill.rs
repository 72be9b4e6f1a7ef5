//! Restore drills: the latest generation and one older one picked at random are restored
//! into scratch and verified, each result and restore time recorded (verification table,
//! audit log; `/metrics` reads them). Meant for a restore host that holds the offline
//! identity (`phr-gateway backup drill --identity FILE`, e.g. from cron).

use std::path::Path;
use std::time::Instant;

use rand::seq::SliceRandom;

use super::generations::{record_result, VerificationSource};
use super::storage::GenerationStore;
use crate::audit::{self, Agent, AuditEvent, AuditLog, EventKind, Outcome};
use crate::error::{Error, Result};
use crate::store::Database;

/// One generation restored in a drill.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrillCheck {
    pub generation: String,
    /// What failed, if anything.
    pub failure: Option<String>,
    pub restore_millis: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrillReport {
    pub run: String,
    pub checks: Vec<DrillCheck>,
}

impl DrillReport {
    /// Something was restored and all of it verified.
    pub fn success(&self) -> bool {
        !self.checks.is_empty() && self.checks.iter().all(|c| c.failure.is_none())
    }

    pub fn restore_millis(&self) -> i64 {
        self.checks.iter().map(|c| c.restore_millis).sum()
    }
}

/// The generations a drill restores: the latest, and one older picked by `rng`.
pub fn pick<R: rand::Rng>(names: &[String], rng: &mut R) -> Vec<String> {
    let Some((latest, older)) = names.split_last() else {
        return Vec::new();
    };
    let mut picked = vec![latest.clone()];
    if let Some(other) = older.choose(rng) {
        picked.push(other.clone());
    }
    picked
}

/// Runs one drill with `identity` (the offline age identity's text).
pub async fn drill(
    db: &Database,
    audit: &AuditLog,
    store: &dyn GenerationStore,
    identity: &str,
    options: &super::Options,
) -> Result<DrillReport> {
    let scratch = &options.scratch_dir;
    let run = uuid::Uuid::now_v7().to_string();
    let names = store.list().await?;
    let picked = pick(&names, &mut rand::thread_rng());
    let mut report = DrillReport {
        run: run.clone(),
        checks: Vec::new(),
    };
    let fetched = scratch.join("fetched");
    for generation in picked {
        let started = Instant::now();
        let dir = store.fetch(&generation, &fetched).await?;
        let result =
            super::verify_with(&dir, identity, &audit.verifiers(), audit.origin(), options).await?;
        let restore_millis = started.elapsed().as_millis().min(i64::MAX as u128) as i64;
        // The restored copy is plaintext: it goes as soon as it is checked.
        if let Ok(verified) = &result {
            let _ = std::fs::remove_file(&verified.restored);
        }
        if dir.starts_with(&fetched) {
            let _ = std::fs::remove_dir_all(&dir);
        }
        record_result(
            db,
            &run,
            VerificationSource::Drill,
            &generation,
            &result,
            restore_millis,
        )
        .await?;
        super::record_verification(db, &generation, &result).await?;
        report.checks.push(DrillCheck {
            generation,
            failure: result.err().map(|damage| damage.to_string()),
            restore_millis,
        });
    }
    let summary = if report.checks.is_empty() {
        format!(
            "backup drill {run} FAILED: no generation in {}",
            store.describe()
        )
    } else {
        let list: Vec<String> = report
            .checks
            .iter()
            .map(|c| match &c.failure {
                None => format!("{} verified in {} ms", c.generation, c.restore_millis),
                Some(why) => format!(
                    "{} FAILED after {} ms: {why}",
                    c.generation, c.restore_millis
                ),
            })
            .collect();
        format!("backup drill {run}: {}", list.join("; "))
    };
    let mut event = AuditEvent::new(EventKind::Read, Agent::system()).detail(summary);
    if !report.success() {
        event = event.outcome(Outcome::SeriousFailure);
    }
    let mut tx = db.begin().await?;
    audit::record(&mut tx, &event).await?;
    tx.commit().await?;
    Ok(report)
}

/// Drills every `backup.drill_interval_secs` (default daily) inside the gateway, when
/// `backup.drill_identity_file` puts the offline identity on this host. Failures are
/// recorded like any drill's (audit, verification table, metrics, alert rule) and logged.
pub async fn run_scheduled(
    db: Database,
    audit: AuditLog,
    config: std::sync::Arc<crate::config::Config>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let Some(identity_file) = config.backup.drill_identity_file.clone() else {
        return;
    };
    let every = std::time::Duration::from_secs(config.backup.drill_interval_secs.unwrap_or(86_400));
    let options = super::Options::from_config(&config);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return,
        }
        let outcome = async {
            let identity = read_identity(&identity_file)?;
            let store = super::storage::from_config(&config.backup, &config.data_dir).await?;
            drill(&db, &audit, store.as_ref(), &identity, &options).await
        }
        .await;
        match outcome {
            Ok(report) if report.success() => {
                tracing::info!(run = %report.run, millis = report.restore_millis(), "backup drill passed")
            }
            Ok(report) => tracing::error!(run = %report.run, "backup drill FAILED"),
            Err(error) => tracing::error!(%error, "backup drill could not run"),
        }
    }
}

/// Reads an identity file; refuses one that others can read (it decrypts every backup).
pub fn read_identity(path: &Path) -> Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(Error::config(
            "backup.drill_identity_file",
            format!(
                "{} is readable by others (mode {:o}); chmod 600 it",
                path.display(),
                mode & 0o777
            ),
        ));
    }
    std::fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn a_drill_picks_the_latest_and_one_older() {
        let names: Vec<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
        assert!(pick(&[], &mut rand::rngs::StdRng::seed_from_u64(1)).is_empty());
        assert_eq!(
            pick(&names[..1], &mut rand::rngs::StdRng::seed_from_u64(1)),
            vec!["a".to_string()]
        );
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..50 {
            let picked = pick(&names, &mut rand::rngs::StdRng::seed_from_u64(seed));
            assert_eq!(picked.len(), 2);
            assert_eq!(picked[0], "d");
            assert_ne!(picked[1], "d");
            seen.insert(picked[1].clone());
        }
        assert_eq!(
            seen.len(),
            3,
            "every older generation gets picked: {seen:?}"
        );
    }
}
