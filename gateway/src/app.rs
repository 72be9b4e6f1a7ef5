//! Building the gateway from one typed `Config` and running it. Tests call `Gateway::build`
//! and `start` with port 0 against a fresh database; `main` does the same via the CLI.

use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ed25519_dalek::SigningKey;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::audit::shipping::{sink_from_config, AuditSink, Shipper};
use crate::audit::{self, Agent, AuditEvent, AuditLog, EventKind};
use crate::config::Config;
use crate::consents::Consents;
use crate::crypto::{key_file, FileKek, KekProvider};
use crate::error::{Error, Result};
use crate::http::{self, AppState, AppStateInner};
use crate::keystore::KeyStore;
use crate::pull::{Instructions, JobQueue, SourceRegistry};
use crate::receipts::ReceiptSigner;
use crate::store::accounts::Accounts;
use crate::store::representations::Representations;
use crate::store::resources::ResourceStore;
use crate::store::Database;
use crate::tls;
use phr_adapters::fhir_r4::BackendKey;

/// A gateway with its stores open and migrated, not yet listening.
pub struct Gateway {
    pub state: AppState,
    tls: Option<Arc<rustls::ServerConfig>>,
    /// Swaps in a renewed certificate without a restart.
    tls_cert: Option<Arc<tls::ReloadableCert>>,
    /// Replaces the configured audit sink (tests inject failing or lossy sinks).
    audit_sink: Option<Arc<dyn AuditSink>>,
}

/// A gateway serving on `addr`.
pub struct RunningGateway {
    pub addr: SocketAddr,
    pub state: AppState,
    tls_cert: Option<Arc<tls::ReloadableCert>>,
    shutdown: watch::Sender<bool>,
    server: JoinHandle<std::io::Result<()>>,
    sequencer: JoinHandle<()>,
    housekeeping: JoinHandle<()>,
    workers: Vec<JoinHandle<()>>,
    /// Copies the audit log to its sink; `None` when shipping is disabled.
    pub shipper: Option<Shipper>,
    /// Stops the shipper after the sequencer's last pass.
    shipping: Option<(watch::Sender<bool>, JoinHandle<()>)>,
}

impl Gateway {
    /// Opens everything the configuration names: data directory, keys, database, key store,
    /// audit log and TLS. Fails with an error naming the setting at fault.
    pub async fn build(config: Config) -> Result<Gateway> {
        Self::build_inner(config, None).await
    }

    /// `build`, with the sources this gateway can pull from.
    pub async fn build_with_sources(config: Config, registry: SourceRegistry) -> Result<Gateway> {
        Self::build_inner(config, Some(registry)).await
    }

    /// `registry` `None`: the sources named in the configuration.
    async fn build_inner(config: Config, registry: Option<SourceRegistry>) -> Result<Gateway> {
        config.validate()?;
        tls::install_crypto_provider();
        create_data_dir(&config)?;

        let (kek, kek_created) = open_kek(&config)?;
        let (seed, signing_created) =
            key_file::load_or_generate(&config.audit_signing_key_path(), 32)?;
        let seed: [u8; 32] = seed
            .as_slice()
            .try_into()
            .map_err(|_| Error::Crypto("audit signing key must be 32 bytes"))?;
        let signing_key = SigningKey::from_bytes(&seed);
        let (receipt_seed, receipt_created) =
            key_file::load_or_generate(&config.receipt_signing_key_path(), 32)?;
        let receipt_seed: [u8; 32] = receipt_seed
            .as_slice()
            .try_into()
            .map_err(|_| Error::Crypto("receipt signing key must be 32 bytes"))?;

        let (source_client_key, source_key_created) =
            load_or_generate_source_client_key(&config.source_client_key_path())?;
        let (id_token_keys, id_token_key_created) =
            crate::oauth::jws_keys::JwsKeyring::open(&config.id_token_key_path())?;
        let registry = match registry {
            Some(registry) => registry,
            None => SourceRegistry::from_config(&config.sources, &source_client_key)?,
        };
        let url = config.database_url();
        let timeout = Duration::from_secs(config.database.connect_timeout_secs);
        let db = Database::connect(&url, config.database.max_connections, timeout).await?;
        db.migrate().await?;
        let keys = KeyStore::open_with(&config, &url, kek).await?;
        // A key store restored from an older backup must not bring a shredded key back:
        // every erasure since is applied again before anything is served.
        let reshredded = keys.reapply_erasures(&db).await?;
        if reshredded > 0 {
            let event = crate::audit::AuditEvent::new(
                crate::audit::EventKind::DataKeyDestroyed,
                crate::audit::Agent::system(),
            )
            .detail(format!(
                "{reshredded} data key(s) erased earlier were found in the key store (restored from a backup?) and shredded again"
            ));
            let mut tx = db.begin().await?;
            crate::audit::record(&mut tx, &event).await?;
            tx.commit().await?;
        }

        let audit = AuditLog::new(
            db.clone(),
            signing_key,
            &config.audit.origin,
            config.audit.checkpoint_every_leaves,
            Duration::from_secs(config.audit.checkpoint_interval_secs),
        )?;
        let ring = audit::keyring::VerifierRing::load(
            &audit::keyring::history_path(&config.audit_signing_key_path()),
            audit.verifier(),
        )?;
        audit::key_rotation::check_no_interrupted(&config, &ring)?;
        let audit = audit.with_retired_keys(ring.retired().to_vec());
        let (tls, tls_cert) = if config.insecure_http {
            (None, None)
        } else {
            let (server, cert) = tls::load_reloadable_server_config(&config.tls, &config.data_dir)?;
            (Some(server), Some(cert))
        };

        let generated: Vec<&str> = [
            (kek_created, "key-encryption key"),
            (signing_created, "audit signing key"),
            (receipt_created, "receipt signing key"),
            (source_key_created, "source client key"),
            (id_token_key_created, "ID token signing key"),
        ]
        .into_iter()
        .filter_map(|(created, name)| created.then_some(name))
        .collect();
        record_start(&db, &config, &generated).await?;
        registry.sync(&db).await?;

        let issuer = config
            .public_url
            .clone()
            .unwrap_or_else(|| "https://localhost".into());
        let receipts = Arc::new(ReceiptSigner::new(
            &SigningKey::from_bytes(&receipt_seed),
            &issuer,
        )?);
        let resources =
            ResourceStore::new(db.clone(), keys.clone(), config.store.max_resource_bytes);
        let accounts = Accounts::new(db.clone(), config.sessions.clone())?;
        let public_url = Arc::new(OnceLock::new());
        let second_factors = crate::mfa::SecondFactors::new(
            db.clone(),
            keys.clone(),
            accounts.clone(),
            public_url.clone(),
            config.public_url.clone(),
            config.listen.port(),
        );
        let break_glass = crate::break_glass::BreakGlass::new(
            db.clone(),
            accounts.clone(),
            keys.clone(),
            config.break_glass.clone(),
        )?;
        let maintenance = crate::maintenance::Maintenance::new(
            db.clone(),
            config.maintenance.clone(),
            config.tls.client_ca_file.is_some() && !config.insecure_http,
        );
        let queue = JobQueue::new(db.clone());
        let instructions =
            Instructions::new(db.clone(), keys.clone(), receipts.clone(), queue.clone());
        let consents = Consents::new(db.clone(), receipts.clone(), config.consent.clone());
        let uploads = crate::uploads::UploadPermissions::new(db.clone(), receipts.clone());
        let representations = Representations::new(db.clone(), config.consent.age_of_majority);
        let notifications = crate::notifications::delivery::Deliverer::new(
            db.clone(),
            receipts.clone(),
            config.notifications.clone(),
            public_url.clone(),
        )?;
        let exports = crate::export::ExportJobs::new(
            db.clone(),
            keys.clone(),
            resources.clone(),
            consents.clone(),
            Duration::from_secs(config.export.file_lifetime_secs),
        );
        let supply_chain = crate::supply_chain::list_text(&config)?;
        crate::supply_chain::parse(&supply_chain, crate::store::japan_today())?;
        let alerts = crate::alerts::AlertEngine::new(
            db.clone(),
            audit.clone(),
            receipts.clone(),
            &config,
            public_url.clone(),
        )?;
        let state = AppState::new(AppStateInner {
            alerts,
            tls: tls.is_some(),
            config: Arc::new(config),
            db,
            keys,
            resources,
            accounts,
            second_factors,
            break_glass,
            maintenance,
            audit,
            metrics: Arc::default(),
            instructions,
            consents,
            uploads,
            notifications,
            exports,
            representations,
            queue,
            page_commits: Arc::default(),
            registry: Arc::new(registry),
            receipts,
            source_client_key: Arc::new(source_client_key),
            id_token_keys: Arc::new(id_token_keys),
            public_url,
            supply_chain: Arc::new(supply_chain),
        });
        Ok(Gateway {
            state,
            tls,
            tls_cert,
            audit_sink: None,
        })
    }

    /// Ships the audit log to `sink` instead of the configured one.
    pub fn with_audit_sink(mut self, sink: Arc<dyn AuditSink>) -> Self {
        self.audit_sink = Some(sink);
        self
    }

    /// Binds the configured address (port 0 picks one) and serves until `stop`.
    pub async fn start(self) -> Result<RunningGateway> {
        let listen = self.state.config.listen;
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|e| Error::config("listen", format!("cannot bind {listen}: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::config("listen", e.to_string()))?;
        let (shutdown, mut on_shutdown) = watch::channel(false);
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let host = if self.tls.is_some() {
            "localhost".to_string()
        } else {
            addr.ip().to_string()
        };
        let _ = self
            .state
            .public_url
            .set(format!("{scheme}://{host}:{}", addr.port()));
        let sequencer = tokio::spawn(self.state.audit.clone().run_sequencer(shutdown.subscribe()));
        let housekeeping = tokio::spawn(crate::oauth::housekeeping::run(
            self.state.db.clone(),
            shutdown.subscribe(),
        ));
        let mut workers: Vec<JoinHandle<()>> = (0..self.state.config.pull.workers)
            .map(|_| tokio::spawn(self.state.pull_worker().run(shutdown.subscribe())))
            .collect();
        for _ in 0..self.state.config.export.workers {
            workers.push(tokio::spawn(
                self.state
                    .exports
                    .clone()
                    .work(crate::pull::PullWorker::worker_id(), shutdown.subscribe()),
            ));
        }
        if self.state.config.notifications.deliver {
            let state = self.state.clone();
            let mut stop = shutdown.subscribe();
            let poll = Duration::from_millis(state.config.notifications.poll_millis);
            // Transfers waiting for a retry go out with the notifications' rhythm.
            workers.push(tokio::spawn(async move {
                loop {
                    if let Err(error) = http::transfers::deliver_due(&state).await {
                        tracing::warn!(error = %error.detail, "retrying transfers failed");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(poll) => {}
                        _ = stop.changed() => return,
                    }
                }
            }));
            workers.push(tokio::spawn(
                self.state.notifications.clone().run(shutdown.subscribe()),
            ));
        }
        let (shipper, shipping) = if self.state.config.audit_shipping.enabled {
            let sink = match self.audit_sink.clone() {
                Some(sink) => sink,
                None => sink_from_config(&self.state.config)?,
            };
            let settings = &self.state.config.audit_shipping;
            let shipper = Shipper::new(
                self.state.db.clone(),
                sink,
                Duration::from_millis(settings.poll_millis),
                Duration::from_secs(settings.max_backoff_secs),
            )
            .woken_by(self.state.audit.sequenced_notifier());
            let (stop, stopped) = watch::channel(false);
            let task = tokio::spawn(shipper.clone().run(stopped));
            (Some(shipper), Some((stop, task)))
        } else {
            (None, None)
        };
        if self.state.config.backup.drill_identity_file.is_some() {
            workers.push(tokio::spawn(crate::backup::drill::run_scheduled(
                self.state.db.clone(),
                self.state.audit.clone(),
                self.state.config.clone(),
                shutdown.subscribe(),
            )));
        }
        if self.state.config.alerts.evaluate {
            workers.push(tokio::spawn(
                self.state.alerts.clone().run(shutdown.subscribe()),
            ));
        }
        let router = http::router(self.state.clone());
        let server = tokio::spawn(tls::serve(listener, self.tls.clone(), router, async move {
            let _ = on_shutdown.changed().await;
        }));
        tracing::info!(%addr, tls = self.tls.is_some(), "phr-gateway listening");
        Ok(RunningGateway {
            addr,
            state: self.state,
            tls_cert: self.tls_cert,
            shutdown,
            server,
            sequencer,
            housekeeping,
            workers,
            shipper,
            shipping,
        })
    }
}

impl RunningGateway {
    /// Stops accepting, lets requests in flight finish, sequences the last audit leaves.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        let _ = self.server.await;
        for worker in self.workers {
            let _ = worker.await;
        }
        let _ = self.sequencer.await;
        if let Some((stop, task)) = self.shipping {
            let _ = stop.send(true);
            let _ = task.await;
        }
        let _ = self.housekeeping.await;
        self.state.keys.close().await;
        self.state.db.close().await;
    }

    /// Serves until Ctrl-C or SIGTERM, then stops. SIGHUP reloads the TLS certificate and
    /// the JWS signing keys (after a renewal or `keys rotate-jws`).
    pub async fn run_until_signal(self) -> Result<()> {
        #[cfg(unix)]
        if let Ok(mut hangup) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            let stop = wait_for_signal();
            tokio::pin!(stop);
            loop {
                tokio::select! {
                    _ = &mut stop => break,
                    _ = hangup.recv() => {
                        if let Err(error) = self.reload_keys().await {
                            tracing::error!(%error, "reloading keys on SIGHUP failed");
                        }
                    }
                }
            }
            tracing::info!("shutting down");
            self.stop().await;
            return Ok(());
        }
        wait_for_signal().await;
        tracing::info!("shutting down");
        self.stop().await;
        Ok(())
    }

    /// Re-reads the TLS certificate and key and the JWS signing keys from their files, each
    /// audited. New TLS handshakes get the new certificate; open connections keep theirs.
    /// A certificate that fails to load leaves the old one serving (and is audited as a
    /// failure, with the reason).
    pub async fn reload_keys(&self) -> Result<KeysReloaded> {
        let mut events = Vec::new();
        let tls_fingerprint = match &self.tls_cert {
            Some(cert) => match cert.reload() {
                Ok(fingerprint) => {
                    events.push(
                        AuditEvent::new(EventKind::SecurityConfiguration, Agent::system()).detail(
                            format!("TLS certificate reloaded: now serving SHA-256 {fingerprint}"),
                        ),
                    );
                    Some(Ok(fingerprint))
                }
                Err(error) => {
                    events.push(
                        AuditEvent::new(EventKind::SecurityConfiguration, Agent::system())
                            .outcome(audit::Outcome::SeriousFailure)
                            .detail(format!("TLS certificate reload refused, the previous one still serves: {error}")),
                    );
                    Some(Err(error.to_string()))
                }
            },
            None => None,
        };
        let jws = &self.state.id_token_keys;
        let before = jws.current_kid()?;
        let retired = jws.reload(crate::oauth::jws_keys::now_secs())?;
        let current = jws.current_kid()?;
        if current != before {
            events.push(
                AuditEvent::new(EventKind::SecurityConfiguration, Agent::system())
                    .detail(format!("ID token signing key now {current} (was {before}, kept in the JWKS for its overlap)")),
            );
        }
        for kid in &retired {
            events.push(
                AuditEvent::new(EventKind::SecurityConfiguration, Agent::system()).detail(format!(
                    "ID token signing key {kid} retired: its overlap ended, removed from the JWKS"
                )),
            );
        }
        let mut tx = self.state.db.begin().await?;
        audit::record_all(&mut tx, &events).await?;
        tx.commit().await?;
        self.state.audit.notify();
        Ok(KeysReloaded {
            tls_fingerprint,
            id_token_kid: current,
            retired_kids: retired,
        })
    }
}

/// What `RunningGateway::reload_keys` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeysReloaded {
    /// The fingerprint now served, or why the new certificate was refused; `None` on
    /// plain HTTP.
    pub tls_fingerprint: Option<std::result::Result<String, String>>,
    pub id_token_kid: String,
    pub retired_kids: Vec<String>,
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = ctrl_c.await;
}

/// The key the gateway authenticates to sources with (`private_key_jwt`), generated at first
/// start; its public half is in the JWKS.
fn create_data_dir(config: &Config) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&config.data_dir)
        .map_err(|e| Error::io(&config.data_dir, e))
}

/// An ES384 key of the gateway (for `private_key_jwt` at sources, or signing ID tokens;
/// published in its JWKS), generated (0600) on first use; `true` when it was generated now.
pub fn load_or_generate_source_client_key(path: &std::path::Path) -> Result<(BackendKey, bool)> {
    if path.exists() {
        key_file::check_private(path)?;
        let pem =
            zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?);
        let key = BackendKey::from_pem(&pem).map_err(|e| Error::KeyFile {
            path: path.into(),
            reason: e.to_string(),
        })?;
        return Ok((key, false));
    }
    let key = BackendKey::generate_es384();
    let pem = key.to_pem().map_err(|e| Error::KeyFile {
        path: path.into(),
        reason: e.to_string(),
    })?;
    key_file::write_private(path, pem.as_bytes())?;
    Ok((key, true))
}

/// The KEK the configuration names: on a PKCS#11 token, or (the default) in a 0600 file,
/// generated at first start. `true` when it was generated now.
fn open_kek(config: &Config) -> Result<(Arc<dyn KekProvider>, bool)> {
    if let Some(pkcs11) = &config.keys.pkcs11 {
        let opened = crate::crypto::pkcs11::Pkcs11Kek::open(pkcs11)?;
        return Ok((Arc::new(opened.kek), opened.created));
    }
    crate::crypto::kek_rotation::check_no_interrupted(&config.kek_path())?;
    let (kek_bytes, kek_created) = key_file::load_or_generate(&config.kek_path(), 32)?;
    Ok((Arc::new(FileKek::from_bytes(&kek_bytes)?), kek_created))
}

/// Audits the start, any generated key, and every weakened security setting.
async fn record_start(db: &Database, config: &Config, generated_keys: &[&str]) -> Result<()> {
    let mut tx = db.begin().await?;
    audit::record(
        &mut tx,
        &AuditEvent::new(EventKind::ApplicationStart, Agent::system()),
    )
    .await?;
    for key in generated_keys {
        let event = AuditEvent::new(EventKind::SecurityConfiguration, Agent::system())
            .detail(format!("{key} generated"));
        audit::record(&mut tx, &event).await?;
    }
    for setting in config.weakened_settings() {
        tracing::warn!(setting, "security setting weakened by explicit flag");
        let event = AuditEvent::new(EventKind::SecurityConfiguration, Agent::system())
            .detail(format!("security setting weakened: {setting}"));
        audit::record(&mut tx, &event).await?;
    }
    tx.commit().await?;
    Ok(())
}
