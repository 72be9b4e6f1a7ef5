//! `phr-gateway backup`, `backup prune`, `backup drill` and the store side of
//! `restore --verify`: the command-line glue around generations, storage and drills.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use super::drill::{drill, read_identity, DrillReport};
use super::generations::{prune, record_result, take, PruneReport, VerificationSource};
use super::retention::Policy;
use super::storage;
use crate::app::Gateway;
use crate::config::Config;
use crate::error::{Error, Result};

async fn close(gateway: &Gateway) {
    let _ = gateway.state.audit.sequence(false).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), gateway.state.db.close()).await;
}

/// Prints what a prune did; the exit code says whether it was refused.
fn print_prune(report: &PruneReport) -> ExitCode {
    if let Some(problems) = &report.refused {
        eprintln!(
            "backup prune REFUSED: the live database looks encrypted or corrupt ({}); no generation deleted",
            problems.join("; ")
        );
        return ExitCode::from(4);
    }
    for (name, reasons) in &report.kept {
        let why: Vec<String> = reasons.iter().map(ToString::to_string).collect();
        println!("kept    {name} ({})", why.join(", "));
    }
    for name in &report.removed {
        println!("deleted {name}");
    }
    for (name, answer) in &report.refused_by_store {
        println!("locked  {name} (the store refused the delete: {answer}; retried next time)");
    }
    ExitCode::SUCCESS
}

/// `phr-gateway backup`: takes a generation, stores it, then prunes.
pub async fn backup(config: Config) -> Result<ExitCode> {
    let recipient = config.backup.recipient.clone().ok_or_else(|| {
        Error::config("backup.recipient", "set the offline age recipient (age1…)")
    })?;
    let staging = storage::local_directory(&config.backup, &config.data_dir);
    let store = storage::from_config(&config.backup, &config.data_dir).await?;
    let policy = Policy::of(&config.backup);
    let database_url = config.database_url();
    let options = super::Options::from_config(&config);
    let gateway = Gateway::build(config).await?;
    let state = &gateway.state;
    let taken = take(
        &state.db,
        &state.audit,
        &staging,
        &recipient,
        store.as_ref(),
        &policy,
        &options,
    )
    .await;
    let manifest = match taken {
        Ok(manifest) => manifest,
        Err(error) => {
            close(&gateway).await;
            return Err(error);
        }
    };
    println!(
        "backup {} stored in {} ({} bytes, audit tree size {})",
        manifest.generation,
        store.describe(),
        manifest.archive_bytes,
        manifest.audit_tree_size
    );
    let pruned = prune(
        &state.db,
        &database_url,
        store.as_ref(),
        &policy,
        &state.audit.verifiers(),
    )
    .await;
    close(&gateway).await;
    Ok(print_prune(&pruned?))
}

/// `phr-gateway backup prune`.
pub async fn prune_only(config: Config) -> Result<ExitCode> {
    let store = storage::from_config(&config.backup, &config.data_dir).await?;
    let policy = Policy::of(&config.backup);
    let database_url = config.database_url();
    // A SQLite file that is no database any more cannot even be opened to audit the
    // refusal: refuse before trying (the log says why).
    if let Some(path) = super::health::sqlite_file(&database_url) {
        if path.exists() {
            if let Err(problem) = super::health::check_sqlite_file(&path).await {
                tracing::error!(%problem, "{}", super::generations::PRUNE_REFUSED);
                return Ok(print_prune(&PruneReport {
                    refused: Some(vec![problem]),
                    ..PruneReport::default()
                }));
            }
        }
    }
    let gateway = Gateway::build(config).await?;
    let pruned = prune(
        &gateway.state.db,
        &database_url,
        store.as_ref(),
        &policy,
        &gateway.state.audit.verifiers(),
    )
    .await;
    close(&gateway).await;
    Ok(print_prune(&pruned?))
}

fn print_drill(report: &DrillReport) {
    if report.checks.is_empty() {
        eprintln!("backup drill FAILED: no generation to restore");
    }
    for check in &report.checks {
        match &check.failure {
            None => println!(
                "drill: {} restored and verified in {} ms",
                check.generation, check.restore_millis
            ),
            Some(why) => eprintln!(
                "drill: {} FAILED after {} ms: {why}",
                check.generation, check.restore_millis
            ),
        }
    }
}

/// `phr-gateway backup drill --identity FILE`: exits 3 when anything failed.
pub async fn drill_command(config: Config, identity: &Path) -> Result<ExitCode> {
    let identity = read_identity(identity)?;
    let store = storage::from_config(&config.backup, &config.data_dir).await?;
    let options = super::Options::from_config(&config);
    let gateway = Gateway::build(config).await?;
    let report = drill(
        &gateway.state.db,
        &gateway.state.audit,
        store.as_ref(),
        &identity,
        &options,
    )
    .await;
    close(&gateway).await;
    let report = report?;
    print_drill(&report);
    Ok(if report.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}

/// `phr-gateway restore --verify --generation DIR|NAME`: a directory as given, or a
/// generation of the configured store by name (fetched into scratch, e.g. from S3).
pub async fn restore_verify(
    config: Config,
    generation: &Path,
    identity: &Path,
    options: &super::Options,
) -> Result<ExitCode> {
    let identity_text = std::fs::read_to_string(identity).map_err(|e| Error::io(identity, e))?;
    let scratch = options.scratch_dir.clone();
    let store = storage::from_config(&config.backup, &config.data_dir).await?;
    let name = generation
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let gateway = Gateway::build(config).await?;
    let audit = gateway.state.audit.clone();
    let started = Instant::now();
    let dir: PathBuf = if generation.is_dir() {
        generation.to_path_buf()
    } else {
        store.fetch(&name, &scratch.join("fetched")).await?
    };
    let checked = super::verify_with(
        &dir,
        &identity_text,
        &audit.verifiers(),
        audit.origin(),
        options,
    )
    .await?;
    let restore_millis = started.elapsed().as_millis().min(i64::MAX as u128) as i64;
    super::record_verification(&gateway.state.db, &name, &checked).await?;
    record_result(
        &gateway.state.db,
        &uuid::Uuid::now_v7().to_string(),
        VerificationSource::Restore,
        &name,
        &checked,
        restore_millis,
    )
    .await?;
    close(&gateway).await;
    match checked {
        Ok(verified) => {
            println!(
                "backup {} verified in {restore_millis} ms: signature, digest, {} tables' row counts and the audit log (size {}) match; restored copy at {}",
                verified.manifest.generation,
                verified.manifest.row_counts.len(),
                verified.manifest.audit_tree_size,
                verified.restored.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(damage) => {
            eprintln!("backup FAILED verification: {damage}");
            Ok(ExitCode::from(3))
        }
    }
}
