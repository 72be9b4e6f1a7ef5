//! The `phr-gateway` command line. Flags are the top configuration layer.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use phr_adapters::fhir_r4::simulator::{HospitalSimulator, SimulatorConfig};

use crate::app::Gateway;
use crate::audit::verify::{verify, VerifyError};
use crate::audit::AccountRole;
use crate::config::{Config, DatabaseFlags, FlagOverrides};
use crate::error::{Error, Result};

#[derive(Debug, Parser)]
#[command(name = "phr-gateway", version, about = "PHR data-exchange gateway")]
pub struct Cli {
    /// Configuration file (TOML). Environment variables PHR_* override it; flags override both.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Data directory (default ./data).
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// postgres://… for the scale-out store; default is SQLite in the data directory.
    #[arg(long, global = true)]
    database_url: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the gateway over HTTPS.
    Serve {
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Serve plain HTTP (loopback only). Weakens security; logged and audited.
        #[arg(long)]
        insecure_http: bool,
    },
    /// Serve with demo accounts and simulated data, printing how to try it.
    Demo {
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Run a simulator of an outside system (for demos and trials; loopback only).
    Simulate {
        #[command(subcommand)]
        system: SimulatedSystem,
    },
    /// Print the OpenAPI document generated from the code.
    Openapi {
        /// Write to this file instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// The tamper-evident audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// The service disclosure for institutions, from the live configuration (Japanese,
    /// with English beside it).
    Disclosure {
        /// `html` (printable) or `json`.
        #[arg(long, default_value = "html")]
        format: String,
        /// Write to this file instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Write the CycloneDX SBOM of this build (made from its Cargo.lock).
    Sbom {
        /// Write to this file instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Take a backup generation of the database (SQLite or PostgreSQL), encrypted to
    /// `backup.recipient`, store it (`backup.store`) and delete what the retention policy
    /// lets go.
    Backup {
        /// Back up the key store instead, into `backup.key_store_directory` (to
        /// `backup.key_store_recipient`), then prune key-store generations older than
        /// `backup.key_store_retention_days` and the retired KEKs only they needed.
        #[arg(long)]
        key_store: bool,
        #[command(subcommand)]
        command: Option<BackupCommand>,
    },
    /// Check a backup generation by restoring it into scratch; with `--key-store` and
    /// without `--verify`, restore a key-store generation over the live key store (stop the
    /// gateway first; every erasure since is applied again).
    Restore {
        /// Verify only: restore into a scratch directory (or database) and check everything.
        #[arg(long)]
        verify: bool,
        /// The generation is a key-store generation.
        #[arg(long)]
        key_store: bool,
        /// PostgreSQL: keep the scratch database after a successful verification.
        #[arg(long)]
        keep_scratch: bool,
        /// The generation's directory, or the name of a generation in the configured store
        /// (e.g. on S3).
        #[arg(long)]
        generation: PathBuf,
        /// The age identity file (the offline key).
        #[arg(long)]
        identity: PathBuf,
    },
    /// Key management.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Operator accounts: each has a second factor from the start.
    Operator {
        #[command(subcommand)]
        command: OperatorCommand,
    },
}

#[derive(Debug, Subcommand)]
enum BackupCommand {
    /// Delete the generations the retention policy lets go (refused while the live
    /// database looks encrypted or corrupt; exit code 4).
    Prune,
    /// Restore the latest generation and a random older one into scratch and verify them
    /// (on a restore host holding the offline identity); exit code 3 on failure.
    Drill {
        /// The age identity file (the offline key; mode 0600).
        #[arg(long)]
        identity: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Re-wrap every data key under a new key-encryption key (no data is re-encrypted).
    /// Stop every gateway process using this key store first. Safe to run again after a
    /// crash: it finishes the interrupted rotation. With `keys.escrow_recipients` set, the
    /// new KEK is escrowed at once; otherwise run `keys escrow`.
    RotateKek,
    /// Write the KEK encrypted (age) to `keys.escrow_recipients`, with a header signed by
    /// the audit key naming the KEK and the time. Copy the file off-site.
    Escrow {
        /// Default: <data_dir>/escrow/kek-<id>-<time>.escrow
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Restore the KEK from an escrow file with one recipient's age identity (0600). Refuses
    /// to replace a different KEK unless --force (which keeps it as <kek>.replaced-<time>).
    RecoverKek {
        #[arg(long)]
        escrow: PathBuf,
        /// The age identity file (AGE-SECRET-KEY-…) of one escrow recipient.
        #[arg(long)]
        identity: PathBuf,
        #[arg(long)]
        force: bool,
    },
    /// New ID-token (JWS) signing key; the old one stays in the JWKS for
    /// `keys.jws_overlap_secs`. Send SIGHUP to running gateways (or restart them).
    RotateJws,
    /// New audit checkpoint signing key; old checkpoints stay verifiable and the log records
    /// the transition under the old key. Stop every gateway process using this log first.
    RotateAudit,
    /// Which KEK wraps how many data keys (more than one line: a mixed state).
    Status,
}

#[derive(Debug, Subcommand)]
enum OperatorCommand {
    /// Create an operator with a generated password, a TOTP secret and recovery codes
    /// (printed once: hand them over in person).
    Add {
        #[arg(long)]
        username: String,
    },
    /// Replace an operator's TOTP secret (a lost device) and issue new recovery codes.
    ResetSecondFactor {
        #[arg(long)]
        username: String,
    },
    /// Create a break-glass account; prints its one-time secret to seal and keep offline.
    AddEmergency {
        #[arg(long)]
        username: String,
    },
    /// Issue a new one-time secret for a break-glass account (after a use).
    ReissueEmergencySecret {
        #[arg(long)]
        username: String,
    },
}

#[derive(Debug, Subcommand)]
enum SimulatedSystem {
    /// A hospital FHIR R4 server with a SMART authorisation server and patient login page.
    Hospital {
        #[arg(long, default_value = "127.0.0.1:8089")]
        listen: SocketAddr,
        #[arg(long, default_value_t = 10)]
        patients: usize,
        #[arg(long, default_value_t = 50)]
        resources_per_patient: usize,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Recompute the Merkle tree and check every signed checkpoint.
    Verify {
        /// A checkpoint saved or shipped earlier: prove the log is an append-only extension.
        #[arg(long)]
        trusted_checkpoint: Option<PathBuf>,
        /// A shipped copy (a directory, or s3://bucket/prefix with the configured endpoint
        /// and credentials): check it, and that the live log extends it.
        #[arg(long)]
        against: Option<String>,
    },
    /// Sequence pending leaves, sign a checkpoint, and print it (save it off-site).
    Checkpoint,
    /// Write AuditEvents recorded since a time (RFC 3339) as NDJSON.
    Export {
        #[arg(long)]
        since: String,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Print the checkpoint verifier key (signed-note format).
    VerifierKey,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    let mut flags = FlagOverrides {
        data_dir: cli.data_dir.clone(),
        database: cli.database_url.clone().map(|url| DatabaseFlags { url }),
        ..Default::default()
    };
    match cli.command {
        Command::Disclosure { format, out } => {
            let config = Config::load(cli.config.as_deref(), &flags)?;
            let document =
                crate::disclosure::disclosure(&crate::disclosure::gather(&config).await?);
            let text = match format.as_str() {
                "html" => crate::disclosure::render_html(&document),
                "json" => serde_json::to_string_pretty(&document)
                    .map_err(|e| Error::Invalid(format!("disclosure: {e}")))?,
                other => {
                    return Err(Error::config(
                        "--format",
                        format!("{other:?}: choose html or json"),
                    ))
                }
            };
            match out {
                Some(path) => std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?,
                None => println!("{text}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Sbom { out } => {
            let doc = crate::supply_chain::sbom::document()?;
            match out {
                Some(path) => std::fs::write(&path, doc).map_err(|e| Error::io(&path, e))?,
                None => print!("{doc}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Openapi { out } => {
            let doc = crate::http::openapi::document();
            match out {
                Some(path) => std::fs::write(&path, doc).map_err(|e| Error::io(&path, e))?,
                None => print!("{doc}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve {
            listen,
            insecure_http,
        } => {
            flags.listen = listen;
            flags.insecure_http = insecure_http;
            let config = Config::load(cli.config.as_deref(), &flags)?;
            crate::telemetry::init(&config.log);
            let running = Gateway::build(config).await?.start().await?;
            running.run_until_signal().await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo { listen } => {
            flags.listen = listen;
            let config = Config::load(cli.config.as_deref(), &flags)?;
            crate::telemetry::init(&config.log);
            let demo = crate::demo::Demo::start(config).await?;
            demo.run_until_signal().await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Simulate {
            system:
                SimulatedSystem::Hospital {
                    listen,
                    patients,
                    resources_per_patient,
                },
        } => {
            if !listen.ip().is_loopback() {
                return Err(Error::config(
                    "--listen",
                    "the simulator listens on loopback only",
                ));
            }
            let simulator = HospitalSimulator::start(SimulatorConfig {
                bind_address: listen,
                patients,
                resources_per_patient,
                ..SimulatorConfig::default()
            })
            .await
            .map_err(|e| Error::config("--listen", e.to_string()))?;
            println!(
                "hospital simulator: FHIR base {} (client id phr-gateway); patients patient-0001 … with passwords phr-sim-0001 …",
                simulator.base_url
            );
            let _ = tokio::signal::ctrl_c().await;
            simulator.shutdown().await;
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit { command } => {
            let config = Config::load(cli.config.as_deref(), &flags)?;
            audit_command(config, command).await
        }
        Command::Backup { key_store, command } => {
            let config = offline(Config::load(cli.config.as_deref(), &flags)?);
            if key_store {
                let recipient = config.backup.recipient.clone();
                let options = crate::backup::Options::from_config(&config);
                return key_store_backup(config, recipient, options).await;
            }
            match command {
                None => crate::backup::commands::backup(config).await,
                Some(BackupCommand::Prune) => crate::backup::commands::prune_only(config).await,
                Some(BackupCommand::Drill { identity }) => {
                    crate::backup::commands::drill_command(config, &identity).await
                }
            }
        }
        Command::Restore {
            verify,
            key_store,
            keep_scratch,
            generation,
            identity,
        } => {
            if !verify && !key_store {
                return Err(Error::config(
                    "--verify",
                    "only verification into scratch is built for database generations; a key-store generation restores with --key-store",
                ));
            }
            let config = offline(Config::load(cli.config.as_deref(), &flags)?);
            let mut options = crate::backup::Options::from_config(&config);
            options.keep_scratch = keep_scratch;
            if !key_store {
                return crate::backup::commands::restore_verify(
                    config,
                    &generation,
                    &identity,
                    &options,
                )
                .await;
            }
            let identity_text =
                std::fs::read_to_string(&identity).map_err(|e| Error::io(&identity, e))?;
            if !verify {
                return restore_key_store(config, &generation, &identity_text, &options).await;
            }
            verify_key_store_command(config, &generation, &identity_text, &options).await
        }
        Command::Keys { command } => {
            let config = Config::load(cli.config.as_deref(), &flags)?;
            keys_command(config, command).await
        }
        Command::Operator { command } => {
            let config = Config::load(cli.config.as_deref(), &flags)?;
            operator_command(config, command).await
        }
    }
}

async fn keys_command(config: Config, command: KeysCommand) -> Result<ExitCode> {
    use crate::crypto::escrow;
    let now_secs = crate::oauth::jws_keys::now_secs();
    match command {
        KeysCommand::RecoverKek {
            escrow: escrow_path,
            identity,
            force,
        } => {
            // Before anything builds a gateway, which would generate a fresh KEK.
            escrow::refuse_token_kek(&config)?;
            let text =
                std::fs::read_to_string(&escrow_path).map_err(|e| Error::io(&escrow_path, e))?;
            let file = escrow::EscrowFile::parse(&text)?;
            let identity_text = zeroize::Zeroizing::new(
                std::fs::read_to_string(&identity).map_err(|e| Error::io(&identity, e))?,
            );
            let kek = file.open(&identity_text)?;
            let ring = audit_verifiers(&config)?;
            let signed = escrow::check_signature(&file, ring.as_ref())?;
            let kek_path = config.kek_path();
            let outcome = escrow::install(&kek_path, &kek, force, now_secs)?;
            let gateway = Gateway::build(offline(config)).await?;
            let mismatched: u64 = gateway
                .state
                .keys
                .kek_ids()
                .await?
                .iter()
                .filter(|(id, _)| id.as_deref().is_some_and(|id| id != file.header.kek_id))
                .map(|(_, n)| n)
                .sum();
            let what = match &outcome {
                escrow::Recovered::Written => "written".to_string(),
                escrow::Recovered::AlreadyInPlace => "already in place".to_string(),
                escrow::Recovered::Replaced { moved_to } => {
                    format!("replaced the KEK there (kept as {})", moved_to.display())
                }
            };
            let detail =
                format!(
                "key-encryption key {} recovered from escrow made {} ({what}; header signature {})",
                file.header.kek_id,
                file.header.created,
                if signed { "verified" } else { "not checked: no audit key at hand" }
            );
            record_system_event(&gateway, detail.clone()).await?;
            finish(&gateway).await;
            println!("{detail}");
            println!("written to {} (mode 0600)", kek_path.display());
            if mismatched > 0 {
                println!("warning: {mismatched} data keys in the key store are wrapped by another KEK (see `phr-gateway keys status`)");
            }
            Ok(ExitCode::SUCCESS)
        }
        KeysCommand::RotateKek => {
            let rotated = crate::crypto::kek_rotation::rotate(&config).await?;
            let gateway = Gateway::build(offline(config)).await?;
            record_system_event(
                &gateway,
                format!(
                    "key-encryption key rotated to {}: {} data keys re-wrapped, {} already under the new key",
                    gateway.state.keys.kek_id(),
                    rotated.rewrapped,
                    rotated.already
                ),
            )
            .await?;
            println!(
                "key-encryption key rotated: {} data keys re-wrapped ({} already under the new key)",
                rotated.rewrapped, rotated.already
            );
            println!(
                "the old key is at {}: keep it while key-store backups made before now are kept, then destroy it",
                rotated.retired.display()
            );
            let state = &gateway.state;
            if state.config.keys.escrow_recipients.is_empty() {
                println!("the new key-encryption key has no escrow yet: set keys.escrow_recipients and run `phr-gateway keys escrow`");
            } else {
                let escrowed =
                    escrow::escrow_kek(&state.config, &state.audit, &state.db, None).await?;
                println!(
                    "the new key-encryption key {} is escrowed to {} recipient(s) at {}: copy it off-site",
                    escrowed.kek_id,
                    escrowed.recipients,
                    escrowed.path.display()
                );
            }
            finish(&gateway).await;
            Ok(ExitCode::SUCCESS)
        }
        KeysCommand::Escrow { out } => {
            let gateway = Gateway::build(offline(config)).await?;
            let state = &gateway.state;
            let escrowed = escrow::escrow_kek(&state.config, &state.audit, &state.db, out).await;
            finish(&gateway).await;
            let escrowed = escrowed?;
            println!(
                "key-encryption key {} escrowed to {} recipient(s) at {}: copy it off-site; it opens only with an offline identity",
                escrowed.kek_id,
                escrowed.recipients,
                escrowed.path.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        KeysCommand::RotateJws => {
            let path = config.id_token_key_path();
            // Generates the key on a first run, so there is one to rotate.
            crate::oauth::jws_keys::JwsKeyring::open(&path)?;
            let overlap = config.keys.jws_overlap_secs;
            let rotated = crate::oauth::jws_keys::rotate(&path, overlap, now_secs)?;
            let gateway = Gateway::build(offline(config)).await?;
            record_system_event(
                &gateway,
                format!(
                    "ID token signing key rotated: {} signs from now on; {} stays in the JWKS for {overlap} s",
                    rotated.new_kid, rotated.old_kid
                ),
            )
            .await?;
            finish(&gateway).await;
            println!(
                "ID token signing key rotated: new kid {}, old kid {} published until unix time {}",
                rotated.new_kid, rotated.old_kid, rotated.retires_at
            );
            println!(
                "send SIGHUP to running gateways (or restart them) so they sign with the new key"
            );
            Ok(ExitCode::SUCCESS)
        }
        KeysCommand::RotateAudit => {
            let rotated = crate::audit::key_rotation::rotate(&config).await?;
            // The rotation is in the log already: the transition leaf, under the old key.
            println!(
                "audit signing key rotated: checkpoints up to size {} are signed by the old key, later ones by the new; the transition is leaf {}",
                rotated.last_size, rotated.transition_leaf
            );
            println!(
                "new verifier key (keep it off-site with the old one):\n{}",
                rotated.current
            );
            println!("retired verifier key:\n{}", rotated.retired);
            Ok(ExitCode::SUCCESS)
        }
        KeysCommand::Status => {
            let gateway = Gateway::build(offline(config)).await?;
            let keys = &gateway.state.keys;
            println!("this gateway's key-encryption key: {}", keys.kek_id());
            let ids = keys.kek_ids().await?;
            for (id, count) in &ids {
                println!(
                    "  {count} data keys wrapped by {}",
                    id.as_deref()
                        .unwrap_or("(not recorded: wrapped before KEK ids were kept)")
                );
            }
            if ids.len() > 1 {
                println!("mixed state: more than one KEK wraps data keys (an unfinished rotation or keys restored from elsewhere)");
            }
            finish(&gateway).await;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The audit verifier keys of this data directory, when its audit key survived.
fn audit_verifiers(config: &Config) -> Result<Option<crate::audit::keyring::VerifierRing>> {
    let path = config.audit_signing_key_path();
    if !path.exists() {
        return Ok(None);
    }
    let seed = crate::crypto::key_file::load(&path, 32)?;
    let seed: [u8; 32] = seed
        .as_slice()
        .try_into()
        .map_err(|_| Error::Crypto("audit signing key must be 32 bytes"))?;
    let signer = crate::audit::checkpoint::NoteSigner::new(
        &config.audit.origin,
        ed25519_dalek::SigningKey::from_bytes(&seed),
    )
    .map_err(|e| Error::Audit(e.to_string()))?;
    crate::audit::keyring::VerifierRing::load(
        &crate::audit::keyring::history_path(&path),
        signer.verifier(),
    )
    .map(Some)
}

async fn record_system_event(gateway: &Gateway, detail: String) -> Result<()> {
    let event = crate::audit::AuditEvent::new(
        crate::audit::EventKind::SecurityConfiguration,
        crate::audit::Agent::system(),
    )
    .detail(detail);
    let mut tx = gateway.state.db.begin().await?;
    crate::audit::record(&mut tx, &event).await?;
    tx.commit().await?;
    Ok(())
}

/// Sequences what the command recorded and closes the database.
async fn finish(gateway: &Gateway) {
    let _ = gateway.state.audit.sequence(false).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), gateway.state.db.close()).await;
}

async fn operator_command(mut config: Config, command: OperatorCommand) -> Result<ExitCode> {
    config = offline(config);
    let gateway = Gateway::build(config).await?;
    let state = &gateway.state;
    let result = async {
        match command {
            OperatorCommand::Add { username } => {
                let password = crate::break_glass::new_secret();
                let account = state
                    .accounts
                    .create(AccountRole::Operator, &username, &password, None)
                    .await?;
                let totp = state.second_factors.provision_totp(&account).await?;
                let codes = state
                    .second_factors
                    .issue_recovery_codes(&account, None)
                    .await?;
                println!("operator {username} ({})", account.id);
                println!("password:      {password}");
                print_second_factor(&totp, &codes);
            }
            OperatorCommand::ResetSecondFactor { username } => {
                let account = state
                    .accounts
                    .by_username(&username)
                    .await?
                    .ok_or_else(|| Error::NotFound(format!("account {username:?}")))?;
                let totp = state.second_factors.provision_totp(&account).await?;
                let codes = state
                    .second_factors
                    .issue_recovery_codes(&account, None)
                    .await?;
                print_second_factor(&totp, &codes);
            }
            OperatorCommand::AddEmergency { username } => {
                let (account, secret) = state.break_glass.create_account(&username).await?;
                println!("break-glass account {username} ({})", account.id);
                println!("one-time secret: {secret}");
                println!("Seal it and keep it offline. It works only while normal sign-in is down, once.");
            }
            OperatorCommand::ReissueEmergencySecret { username } => {
                let secret = state.break_glass.reissue_secret(&username).await?;
                println!("one-time secret: {secret}");
            }
        }
        Ok::<_, Error>(ExitCode::SUCCESS)
    }
    .await;
    let _ = state.audit.sequence(false).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), state.db.close()).await;
    result
}

fn print_second_factor(totp: &crate::mfa::TotpEnrolment, codes: &[String]) {
    println!("TOTP secret:   {}", totp.secret);
    println!("TOTP URI:      {}", totp.otpauth_uri);
    println!("recovery codes (each works once):");
    for code in codes {
        println!("  {code}");
    }
}

async fn audit_command(mut config: Config, command: AuditCommand) -> Result<ExitCode> {
    // The CLI never serves, so it needs no certificate.
    config = offline(config);
    let gateway = Gateway::build(config).await?;
    let audit = gateway.state.audit.clone();
    let result = match command {
        AuditCommand::VerifierKey => {
            println!("{}", audit.verifier_key());
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Checkpoint => {
            audit.sequence(true).await?;
            match audit.latest_checkpoint().await? {
                Some(note) => {
                    print!("{note}");
                    Ok(ExitCode::SUCCESS)
                }
                None => Err(Error::Audit("the log is empty".into())),
            }
        }
        AuditCommand::Verify {
            trusted_checkpoint,
            against,
        } => {
            // Start-up itself appended leaves; number them so verify sees the whole log.
            audit.sequence(true).await?;
            if let Some(target) = &against {
                let code = verify_against_cli(&gateway.state.config, &audit, target).await?;
                if code != ExitCode::SUCCESS || trusted_checkpoint.is_none() {
                    let _ = tokio::time::timeout(Duration::from_secs(5), gateway.state.db.close())
                        .await;
                    return Ok(code);
                }
            }
            let trusted = match &trusted_checkpoint {
                Some(path) => Some(std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?),
                None => None,
            };
            match verify(
                audit.database(),
                audit.verifiers(),
                audit.origin(),
                trusted.as_deref(),
            )
            .await
            {
                Ok(report) => {
                    println!(
                        "audit log OK: {} leaves, {} checkpoints verified (latest at size {}){}",
                        report.tree_size,
                        report.checkpoints_checked,
                        report.latest_checkpoint.unwrap_or(0),
                        match report.trusted_size {
                            Some(size) =>
                                format!(", consistent with trusted checkpoint at size {size}"),
                            None => String::new(),
                        }
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(VerifyError::Tamper(t)) => {
                    eprintln!("audit log FAILED verification: {t}");
                    Ok(ExitCode::from(3))
                }
                Err(VerifyError::Store(e)) => Err(e),
            }
        }
        AuditCommand::Export { since, out } => {
            let since_ms = parse_time(&since)?;
            let mut writer: Box<dyn Write> = match &out {
                Some(path) => Box::new(std::io::BufWriter::new(
                    std::fs::File::create(path).map_err(|e| Error::io(path, e))?,
                )),
                None => Box::new(std::io::BufWriter::new(std::io::stdout())),
            };
            let count =
                crate::audit::export::export_since(audit.database(), since_ms, &mut writer).await?;
            eprintln!("exported {count} audit events");
            Ok(ExitCode::SUCCESS)
        }
    };
    // Keep the CLI's own start-up leaves sequenced before leaving.
    let _ = audit.sequence(false).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), gateway.state.db.close()).await;
    result
}

/// `audit verify --against`: exit 3 when the live log and the shipped copy disagree.
async fn verify_against_cli(
    config: &Config,
    audit: &crate::audit::AuditLog,
    target: &str,
) -> Result<ExitCode> {
    use crate::audit::shipping::against::{verify_against, AgainstError};
    use crate::audit::shipping::{AuditSink, LocalSink, S3Sink};
    let sink: Box<dyn AuditSink> = match target.strip_prefix("s3://") {
        Some(rest) => {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let mut s3 = config.audit_shipping.s3.clone();
            s3.bucket = Some(bucket.to_string());
            Box::new(S3Sink::from_config(&s3)?.with_prefix(prefix))
        }
        None => {
            let dir = PathBuf::from(target);
            if !dir.is_dir() {
                return Err(Error::config(
                    "--against",
                    format!("{target} is not a directory"),
                ));
            }
            Box::new(LocalSink::new(dir))
        }
    };
    match verify_against(audit.database(), audit.verifiers(), audit.origin(), &*sink).await {
        Ok(report) => {
            println!(
                "audit log OK against {}: {} shipped leaves and {} shipped checkpoints verified (latest at size {}); the live log ({} leaves) extends them",
                sink.describe(),
                report.shipped_leaves,
                report.shipped_checkpoints,
                report.latest_shipped_checkpoint.unwrap_or(0),
                report.live_tree_size,
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(AgainstError::Divergence(d)) => {
            eprintln!(
                "audit log FAILED verification against {}: {d}",
                sink.describe()
            );
            Ok(ExitCode::from(3))
        }
        Err(AgainstError::Live(t)) => {
            eprintln!("audit log FAILED verification: {t}");
            Ok(ExitCode::from(3))
        }
        Err(AgainstError::Store(e)) => Err(e),
    }
}

/// `backup --key-store`: a key-store generation, then the prune of expired ones.
async fn key_store_backup(
    config: Config,
    recipient: Option<String>,
    options: crate::backup::Options,
) -> Result<ExitCode> {
    let recipient = config
        .backup
        .key_store_recipient
        .clone()
        .or(recipient)
        .ok_or_else(|| {
            Error::config(
                "backup.key_store_recipient",
                "set the offline age recipient (age1…) of key-store generations (or backup.recipient)",
            )
        })?;
    let directory = config
        .backup
        .key_store_directory
        .clone()
        .unwrap_or_else(|| config.data_dir.join("key-store-backups"));
    let retention = config.backup.key_store_retention_days;
    let kek_path = config.kek_path();
    let gateway = Gateway::build(config).await?;
    let state = &gateway.state;
    let result = async {
        let manifest = crate::backup::create_key_store(
            &state.keys,
            &state.db,
            &state.audit,
            &directory,
            &recipient,
            &options,
        )
        .await?;
        let pruned = crate::backup::prune_key_store(
            &directory,
            retention,
            time::OffsetDateTime::now_utc(),
            &kek_path,
        )?;
        crate::backup::record_prune(&state.db, &pruned).await?;
        Ok::<_, Error>((manifest, pruned))
    }
    .await;
    let _ = state.audit.sequence(false).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), state.db.close()).await;
    let (manifest, pruned) = result?;
    println!(
        "key-store backup {} ({}) written to {} ({} bytes); kept {retention} days",
        manifest.generation,
        manifest.engine,
        directory.join(&manifest.generation).display(),
        manifest.archive_bytes,
    );
    for generation in &pruned.generations {
        println!("expired key-store generation {generation} deleted");
    }
    for kek in &pruned.retired_keks {
        println!("retired key-encryption key {} destroyed", kek.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// `restore --key-store` (no `--verify`): the live key store replaced by a generation.
async fn restore_key_store(
    config: Config,
    generation: &std::path::Path,
    identity: &str,
    options: &crate::backup::Options,
) -> Result<ExitCode> {
    let gateway = Gateway::build(config.clone()).await?;
    let state = &gateway.state;
    // The key store is about to be replaced: this process lets go of it first.
    state.keys.close().await;
    let restored = crate::backup::restore_key_store(
        &config,
        &state.db,
        generation,
        identity,
        &state.audit.verifiers(),
        options,
    )
    .await;
    let _ = state.audit.sequence(false).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), state.db.close()).await;
    match restored? {
        Ok(restored) => {
            println!(
                "key store restored from {} ({} data keys in it); {} key(s) erased since were shredded again",
                restored.manifest.generation,
                restored.manifest.row_counts.get("data_keys").copied().unwrap_or(0),
                restored.reshredded
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(damage) => {
            eprintln!("key-store generation FAILED verification, nothing restored: {damage}");
            Ok(ExitCode::from(3))
        }
    }
}

/// The configuration for a CLI command that builds the gateway but never serves: no
/// certificate is needed and nothing listens beyond an ephemeral loopback port.
fn offline(mut config: Config) -> Config {
    config.insecure_http = true;
    config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config
}

fn parse_time(text: &str) -> Result<i64> {
    let time = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map_err(|e| Error::config("--since", format!("not an RFC 3339 time ({e})")))?;
    Ok((time.unix_timestamp_nanos() / 1_000_000) as i64)
}

/// `restore --verify --key-store`: a key-store generation restored into scratch and checked.
async fn verify_key_store_command(
    config: Config,
    generation: &std::path::Path,
    identity: &str,
    options: &crate::backup::Options,
) -> Result<ExitCode> {
    let name = generation
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let gateway = Gateway::build(config).await?;
    let audit = gateway.state.audit.clone();
    let checked =
        crate::backup::verify_key_store(generation, identity, &audit.verifiers(), options).await;
    let checked = match checked {
        Ok(checked) => checked,
        Err(e) => {
            let _ = tokio::time::timeout(Duration::from_secs(5), gateway.state.db.close()).await;
            return Err(e);
        }
    };
    crate::backup::record_verification(&gateway.state.db, &name, &checked).await?;
    let _ = audit.sequence(false).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), gateway.state.db.close()).await;
    match checked {
        Ok(verified) => {
            println!(
                "key-store backup {} verified: signature, digest and {} tables' row counts match; restored copy at {}",
                verified.manifest.generation,
                verified.manifest.row_counts.len(),
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
