//! One typed configuration, layered: defaults < config file (`--config`) < `PHR_*` environment
//! variables (nested keys with `__`, e.g. `PHR_TLS__MIN_VERSION=1.3`) < command-line flags.
//! Unknown keys are refused and every value is validated before anything starts.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::tls::TlsConfig;

mod alerts;
mod audit_shipping;
mod backup_storage;
mod consent;
pub use alerts::AlertsConfig;
pub use audit_shipping::{AuditShippingConfig, S3SinkConfig, Secret, SinkKind};
pub use backup_storage::{GenerationStoreKind, ObjectLockMode};
pub use consent::{ConsentConfig, ControllerConfig, PurposeConfig};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the SQLite databases, generated keys and the dev certificate live.
    pub data_dir: PathBuf,
    /// Address to listen on; port 0 picks a free port (tests).
    pub listen: SocketAddr,
    /// Serve plain HTTP instead of HTTPS. Refused on non-loopback addresses; logged as a
    /// security event.
    pub insecure_http: bool,
    /// Load balancers whose `X-Forwarded-For` is believed (addresses or CIDR ranges).
    pub trusted_proxies: Vec<IpNet>,
    pub database: DatabaseConfig,
    pub keys: KeysConfig,
    pub tls: TlsConfig,
    pub audit: AuditConfig,
    pub http: HttpConfig,
    pub store: StoreConfig,
    pub sessions: SessionConfig,
    pub pull: PullConfig,
    pub consent: ConsentConfig,
    /// Sources patients can instruct the gateway to fetch from.
    pub sources: Vec<SourceConfig>,
    pub log: LogConfig,
    /// The gateway's external base URL (e.g. `https://phr.example.jp`): receipts' issuer and
    /// the callback sources redirect to. Unset: `https://localhost:<port>`.
    pub public_url: Option<String>,
    /// The deployment's list of subcontractors and component owners (TOML, the format of
    /// the repository's `supply-chain.toml`). Unset: the list shipped with the gateway.
    pub supply_chain_file: Option<PathBuf>,
    /// The OAuth 2 authorisation server for PHR apps.
    pub oauth: OAuthConfig,
    /// Signed notifications (webhooks) to recipients.
    pub notifications: NotificationsConfig,
    /// Bulk Data exports.
    pub export: ExportConfig,
    /// What `phr-gateway disclosure` states beyond what the configuration shows.
    pub disclosure: DisclosureConfig,
    /// `phr-gateway backup`.
    pub backup: BackupConfig,
    /// Emergency operator access.
    pub break_glass: BreakGlassConfig,
    /// Copies of the audit log on write-once storage.
    pub audit_shipping: AuditShippingConfig,
    /// Alerts: rules over the audit stream, delivered to operators.
    pub alerts: AlertsConfig,
    /// Remote maintenance windows.
    pub maintenance: MaintenanceConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("./data"),
            listen: SocketAddr::from(([127, 0, 0, 1], 8443)),
            insecure_http: false,
            trusted_proxies: Vec::new(),
            database: DatabaseConfig::default(),
            keys: KeysConfig::default(),
            tls: TlsConfig::default(),
            audit: AuditConfig::default(),
            http: HttpConfig::default(),
            store: StoreConfig::default(),
            sessions: SessionConfig::default(),
            pull: PullConfig::default(),
            consent: ConsentConfig::default(),
            sources: Vec::new(),
            log: LogConfig::default(),
            public_url: None,
            supply_chain_file: None,
            oauth: OAuthConfig::default(),
            notifications: NotificationsConfig::default(),
            export: ExportConfig::default(),
            break_glass: BreakGlassConfig::default(),
            disclosure: DisclosureConfig::default(),
            backup: BackupConfig::default(),
            audit_shipping: AuditShippingConfig::default(),
            alerts: AlertsConfig::default(),
            maintenance: MaintenanceConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `sqlite://…` or `postgres://…`; unset means SQLite at `<data_dir>/gateway.db`.
    pub url: Option<String>,
    /// The key store. Unset: SQLite at `<data_dir>/keys.db` next to a SQLite database, or the
    /// schema `key_store_schema` of the same PostgreSQL database.
    pub key_store_url: Option<String>,
    pub key_store_schema: String,
    pub max_connections: u32,
    pub connect_timeout_secs: u64,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: None,
            key_store_url: None,
            key_store_schema: "phr_keys".into(),
            max_connections: 8,
            connect_timeout_secs: 10,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KeysConfig {
    /// Key-encryption key (32 random bytes, hex). Unset: `<data_dir>/keys/kek.key`,
    /// generated at first start with mode 0600.
    pub kek_file: Option<PathBuf>,
    /// Ed25519 seed signing audit checkpoints. Unset: `<data_dir>/keys/audit-signing.key`.
    pub audit_signing_key_file: Option<PathBuf>,
    /// Ed25519 seed signing receipts (JWS). Unset: `<data_dir>/keys/receipt-signing.key`.
    pub receipt_signing_key_file: Option<PathBuf>,
    /// ES384 private key (PKCS#8 PEM) for `private_key_jwt` client authentication at sources
    /// (SMART Backend Services). Unset: `<data_dir>/keys/source-client.pem`.
    pub source_client_key_file: Option<PathBuf>,
    /// ES384 private key (PKCS#8 PEM) signing the ID tokens given to apps that ask for
    /// `openid`. Unset: `<data_dir>/keys/id-token-signing.pem`. Rotated keys are kept
    /// beside it as `<file>.previous-<unix seconds>` while the JWKS still publishes them.
    pub id_token_signing_key_file: Option<PathBuf>,
    /// age X25519 recipients (`age1…`) the KEK is escrowed to (`phr-gateway keys escrow`,
    /// and automatically after `keys rotate-kek`); their identities are kept offline.
    pub escrow_recipients: Vec<String>,
    /// Seconds a rotated-out JWS signing key stays in the JWKS so tokens it signed still
    /// verify; at least the longest token lifetime (300 s).
    pub jws_overlap_secs: u64,
    /// Keep the KEK on a PKCS#11 token (an HSM) instead of `kek_file`.
    pub pkcs11: Option<Pkcs11Config>,
}

/// `[keys.pkcs11]`: where the KEK lives when it is kept on a token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Pkcs11Config {
    /// The vendor's PKCS#11 module, e.g. `/usr/lib/softhsm/libsofthsm2.so`.
    pub module: PathBuf,
    /// The token's label.
    pub token_label: String,
    /// A file (0600) holding the user PIN.
    pub pin_file: PathBuf,
    /// The AES key's label on the token; generated there, non-extractable, on first start.
    #[serde(default = "default_pkcs11_key_label")]
    pub key_label: String,
}

fn default_pkcs11_key_label() -> String {
    "phr-gateway-kek".into()
}

impl Default for KeysConfig {
    fn default() -> Self {
        KeysConfig {
            kek_file: None,
            audit_signing_key_file: None,
            receipt_signing_key_file: None,
            source_client_key_file: None,
            id_token_signing_key_file: None,
            escrow_recipients: Vec::new(),
            jws_overlap_secs: 3600,
            pkcs11: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// The checkpoint origin line: a name unique to this log.
    pub origin: String,
    /// Write a checkpoint after this many new leaves…
    pub checkpoint_every_leaves: u64,
    /// …or after this many seconds with new leaves, whichever comes first.
    pub checkpoint_interval_secs: u64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            origin: "phr-gateway.localhost/audit".into(),
            checkpoint_every_leaves: 1000,
            checkpoint_interval_secs: 10,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Largest request body accepted, in bytes.
    pub body_limit_bytes: usize,
    /// Seconds a request may take before it is cut off.
    pub request_timeout_secs: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            body_limit_bytes: 4 * 1024 * 1024,
            request_timeout_secs: 30,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Largest single resource accepted or decrypted, in bytes.
    pub max_resource_bytes: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            max_resource_bytes: 8 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SessionConfig {
    pub idle_timeout_secs: u64,
    pub absolute_timeout_secs: u64,
    /// Failed logins on one account before it is locked.
    pub max_failed_logins: u32,
    /// First lockout; it doubles with each further lockout, up to a day.
    pub lockout_secs: u64,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            idle_timeout_secs: 15 * 60,
            absolute_timeout_secs: 8 * 60 * 60,
            max_failed_logins: 5,
            lockout_secs: 5 * 60,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PullConfig {
    /// Pull workers in this process (0: this process only serves the API). They mostly wait
    /// on sources, and pages that several of them have ready share one commit.
    pub workers: u32,
    /// How long a claimed job stays ours without renewal; a dead worker's job is claimed
    /// again after this.
    pub lease_secs: u64,
    /// How often an idle worker looks for jobs.
    pub poll_millis: u64,
    /// After a successful pull, the next incremental pull of an active instruction.
    pub refresh_interval_secs: u64,
    /// Upper bound of the wait before retrying an unavailable source.
    pub max_backoff_secs: u64,
}

impl Default for PullConfig {
    fn default() -> Self {
        PullConfig {
            workers: 8,
            lease_secs: 60,
            poll_millis: 1000,
            refresh_interval_secs: 24 * 60 * 60,
            max_backoff_secs: 60 * 60,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BackupConfig {
    /// Where generations are written. Unset: `<data_dir>/backups` (a local directory is not
    /// ransomware-resilient: copy generations to write-once storage).
    pub directory: Option<PathBuf>,
    /// The offline age X25519 recipient (`age1…`) backups are encrypted to; its identity is
    /// kept away from this host and is needed only to restore.
    pub recipient: Option<String>,
    /// Generations kept: the newest of each of this many days, weeks (ISO) and months
    /// (Japan time). Unset: 7, 4 and 3.
    pub keep_daily: Option<u32>,
    pub keep_weekly: Option<u32>,
    pub keep_monthly: Option<u32>,
    /// `local` (default: the directory) or `s3` (write-once with Object Lock).
    pub store: GenerationStoreKind,
    /// The bucket for `store = "s3"` (the same keys as `audit_shipping.s3`).
    pub s3: S3SinkConfig,
    /// Object Lock mode of uploaded generations (`compliance` by default).
    pub object_lock_mode: ObjectLockMode,
    /// The offline identity for restore drills run by the gateway itself: setting it puts
    /// the key that decrypts every backup on this host. Unset: drills run elsewhere
    /// (`phr-gateway backup drill --identity FILE` on a restore host).
    pub drill_identity_file: Option<std::path::PathBuf>,
    /// How often the gateway drills when `drill_identity_file` is set. Unset: daily.
    pub drill_interval_secs: Option<u64>,
    /// Where key-store generations (`backup --key-store`) are written, apart from the data
    /// they unlock. Unset: `<data_dir>/key-store-backups`.
    pub key_store_directory: Option<PathBuf>,
    /// The offline age recipient key-store generations are encrypted to. Unset: `recipient`.
    pub key_store_recipient: Option<String>,
    /// Days a key-store generation is kept (shorter than the database generations'): after
    /// it, an erased patient's key is in no backup any more.
    pub key_store_retention_days: u32,
    /// Where `pg_dump`/`pg_restore` are. Unset: `PATH`, then `/usr/lib/postgresql/*/bin`.
    pub pg_bin_dir: Option<PathBuf>,
}

impl Default for BackupConfig {
    fn default() -> Self {
        BackupConfig {
            directory: None,
            recipient: None,
            key_store_directory: None,
            key_store_recipient: None,
            key_store_retention_days: 35,
            pg_bin_dir: None,
            keep_daily: None,
            keep_weekly: None,
            keep_monthly: None,
            store: GenerationStoreKind::default(),
            s3: S3SinkConfig::default(),
            object_lock_mode: ObjectLockMode::default(),
            drill_identity_file: None,
            drill_interval_secs: None,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DisclosureConfig {
    /// Where the data is kept (e.g. "日本国内（東京リージョン）"); unset: not declared.
    pub data_location: Option<String>,
}

/// Emergency (break-glass) operator access, for when the normal sign-in path is down.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BreakGlassConfig {
    /// How long an emergency session lasts (it is not renewed).
    pub session_minutes: u64,
    /// Unreviewed uses are flagged as overdue after this many hours.
    pub review_within_hours: u64,
    /// The external identity provider's health URL: break-glass opens only while it cannot
    /// be reached (or answers an error). Unset: while the store holding the second
    /// factors (the database and its key store) cannot be reached.
    pub normal_login_probe_url: Option<String>,
}

impl Default for BreakGlassConfig {
    fn default() -> Self {
        BreakGlassConfig {
            session_minutes: 60,
            review_within_hours: 24,
            normal_login_probe_url: None,
        }
    }
}

/// Remote maintenance windows: how long one may last and how far ahead it may be asked for.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MaintenanceConfig {
    pub max_window_minutes: u64,
    pub max_lead_days: u64,
    /// The longest validity a client certificate bound to a window may have.
    pub max_client_cert_hours: u64,
}

impl Default for MaintenanceConfig {
    fn default() -> Self {
        MaintenanceConfig {
            max_window_minutes: 8 * 60,
            max_lead_days: 30,
            max_client_cert_hours: 24,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ExportConfig {
    /// Export workers in this process (0: this process only answers).
    pub workers: u32,
    /// How long a finished export's files can be fetched.
    pub file_lifetime_secs: u64,
}

impl Default for ExportConfig {
    fn default() -> Self {
        ExportConfig {
            workers: 1,
            file_lifetime_secs: 60 * 60,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NotificationsConfig {
    /// Whether this process delivers notifications (any number of processes may).
    pub deliver: bool,
    /// How often the deliverer looks for due notifications.
    pub poll_millis: u64,
    /// Attempts before a notification is given up as failed (exponential backoff between).
    pub max_attempts: u32,
    /// Upper bound of the wait between attempts.
    pub max_backoff_secs: u64,
}

impl Default for NotificationsConfig {
    fn default() -> Self {
        NotificationsConfig {
            deliver: true,
            poll_millis: 1000,
            max_attempts: 12,
            max_backoff_secs: 6 * 60 * 60,
        }
    }
}

/// One source, e.g. a hospital's FHIR R4 server reached with SMART on FHIR.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// The gateway's id for it; appears in stored resources' source identity.
    pub id: String,
    /// Shown to patients.
    pub display_name: String,
    pub kind: SourceKind,
    /// The FHIR base URL (https; plain http only on loopback, e.g. the simulator).
    pub base_url: String,
    /// Our client id registered at the source's authorisation server.
    pub client_id: String,
    /// Resources per page asked of the source.
    #[serde(default)]
    pub page_size: Option<u32>,
    /// Requests in flight to this source at once.
    #[serde(default)]
    pub max_concurrent_requests: Option<usize>,
    /// How the gateway authorises at the source.
    #[serde(default)]
    pub auth: SourceAuth,
    /// For `self-info` sources: the portal categories (scope names) to ask for; by default
    /// everything the portal offers today (`checkup.school` only when listed here).
    #[serde(default)]
    pub portal_categories: Option<Vec<String>>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum SourceAuth {
    /// SMART App Launch, standalone patient launch: the patient signs in at the hospital.
    #[default]
    SmartLaunch,
    /// SMART Backend Services (`private_key_jwt` with the gateway's source-client key): the
    /// hospital gives the patient a one-time linking code, which they enter at the gateway.
    BackendServices,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum SourceKind {
    /// A hospital FHIR R4 server (SMART App Launch, or Backend Services with `auth`).
    FhirR4,
    /// A My Number Portal-style self-information API (自己情報取得API).
    SelfInfo,
}

impl SourceKind {
    pub fn code(self) -> &'static str {
        match self {
            SourceKind::FhirR4 => "fhir-r4",
            SourceKind::SelfInfo => "self-info",
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Json,
    Pretty,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `phr_gateway=debug,info`.
    pub filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Json,
            filter: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OAuthConfig {
    /// Access-token lifetime; at most 300 (five minutes), lower is allowed.
    pub access_token_secs: u64,
    /// Refresh-token lifetime (each rotation starts a new one).
    pub refresh_token_days: u64,
    /// How long an authorisation request waits for the patient's decision.
    pub authorization_request_secs: u64,
}

impl Default for OAuthConfig {
    fn default() -> Self {
        OAuthConfig {
            access_token_secs: 300,
            refresh_token_days: 90,
            authorization_request_secs: 600,
        }
    }
}

/// Values given as command-line flags: the top layer.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FlagOverrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub insecure_http: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database: Option<DatabaseFlags>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct DatabaseFlags {
    pub url: String,
}

impl Config {
    /// Layers defaults, the optional file, `PHR_*` variables and flags, then validates.
    pub fn load(file: Option<&Path>, flags: &FlagOverrides) -> Result<Config> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            if !file.exists() {
                return Err(Error::config(
                    "--config",
                    format!("{} does not exist", file.display()),
                ));
            }
            figment = figment.merge(Toml::file_exact(file));
        }
        figment = figment
            .merge(Env::prefixed("PHR_").split("__"))
            .merge(Serialized::defaults(flags));
        let config: Config = figment.extract().map_err(figment_error)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every value that serde's types cannot express; names the key at fault.
    pub fn validate(&self) -> Result<()> {
        self.consent
            .check()
            .map_err(|(key, reason)| Error::config(key, reason))?;
        self.audit_shipping
            .check()
            .map_err(|(key, reason)| Error::config(key, reason))?;
        self.alerts
            .check()
            .map_err(|(key, reason)| Error::config(key, reason))?;
        self.backup
            .check()
            .map_err(|(key, reason)| Error::config(key, reason))?;
        if !self.keys.escrow_recipients.is_empty() {
            crate::crypto::escrow::parse_recipients(&self.keys.escrow_recipients)?;
        }
        if self.keys.jws_overlap_secs < crate::oauth::MAX_ACCESS_TOKEN_SECS {
            return Err(Error::config(
                "keys.jws_overlap_secs",
                format!(
                    "must be at least the longest token lifetime, {} s",
                    crate::oauth::MAX_ACCESS_TOKEN_SECS
                ),
            ));
        }
        if self.backup.key_store_retention_days == 0 {
            return Err(Error::config(
                "backup.key_store_retention_days",
                "must be at least 1 (a key-store generation must live until the next one)",
            ));
        }
        if self.backup.key_store_directory.is_some()
            && self.backup.key_store_directory == self.backup.directory
        {
            return Err(Error::config(
                "backup.key_store_directory",
                "must not be the database generations' directory: keys are kept apart from the data they unlock",
            ));
        }
        if self.insecure_http && !is_loopback(self.listen.ip()) {
            return Err(Error::config(
                "insecure_http",
                format!(
                    "plain HTTP is only allowed on a loopback address, not {}",
                    self.listen.ip()
                ),
            ));
        }
        for (key, url) in [
            ("database.url", &self.database.url),
            ("database.key_store_url", &self.database.key_store_url),
        ] {
            if let Some(url) = url {
                if !(url.starts_with("sqlite:")
                    || url.starts_with("postgres://")
                    || url.starts_with("postgresql://"))
                {
                    return Err(Error::config(
                        key,
                        "must start with sqlite:, postgres:// or postgresql://",
                    ));
                }
            }
        }
        let schema = &self.database.key_store_schema;
        if schema.is_empty()
            || !schema
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            return Err(Error::config(
                "database.key_store_schema",
                "must be a non-empty lower-case identifier ([a-z0-9_])",
            ));
        }
        if self.database.max_connections == 0 {
            return Err(Error::config(
                "database.max_connections",
                "must be at least 1",
            ));
        }
        positive(
            "audit.checkpoint_every_leaves",
            self.audit.checkpoint_every_leaves,
        )?;
        positive(
            "audit.checkpoint_interval_secs",
            self.audit.checkpoint_interval_secs,
        )?;
        if self.audit.origin.trim().is_empty() || self.audit.origin.contains('\n') {
            return Err(Error::config("audit.origin", "must be one non-empty line"));
        }
        positive("http.body_limit_bytes", self.http.body_limit_bytes as u64)?;
        positive("http.request_timeout_secs", self.http.request_timeout_secs)?;
        positive(
            "store.max_resource_bytes",
            self.store.max_resource_bytes as u64,
        )?;
        positive(
            "sessions.idle_timeout_secs",
            self.sessions.idle_timeout_secs,
        )?;
        positive(
            "sessions.max_failed_logins",
            self.sessions.max_failed_logins as u64,
        )?;
        if self.sessions.absolute_timeout_secs < self.sessions.idle_timeout_secs {
            return Err(Error::config(
                "sessions.absolute_timeout_secs",
                "must not be shorter than sessions.idle_timeout_secs",
            ));
        }
        positive("oauth.access_token_secs", self.oauth.access_token_secs)?;
        if self.oauth.access_token_secs > crate::oauth::MAX_ACCESS_TOKEN_SECS {
            return Err(Error::config(
                "oauth.access_token_secs",
                format!(
                    "must not exceed {} (five minutes)",
                    crate::oauth::MAX_ACCESS_TOKEN_SECS
                ),
            ));
        }
        positive("oauth.refresh_token_days", self.oauth.refresh_token_days)?;
        positive(
            "oauth.authorization_request_secs",
            self.oauth.authorization_request_secs,
        )?;
        positive(
            "maintenance.max_window_minutes",
            self.maintenance.max_window_minutes,
        )?;
        tracing_subscriber::EnvFilter::try_new(&self.log.filter)
            .map_err(|e| Error::config("log.filter", e.to_string()))?;
        self.tls
            .validate()
            .map_err(|reason| Error::config("tls", reason))?;
        Ok(())
    }

    pub fn database_url(&self) -> String {
        self.database.url.clone().unwrap_or_else(|| {
            format!(
                "sqlite://{}?mode=rwc",
                self.data_dir.join("gateway.db").display()
            )
        })
    }

    pub fn kek_path(&self) -> PathBuf {
        self.keys
            .kek_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("keys").join("kek.key"))
    }

    pub fn audit_signing_key_path(&self) -> PathBuf {
        self.keys
            .audit_signing_key_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("keys").join("audit-signing.key"))
    }

    pub fn receipt_signing_key_path(&self) -> PathBuf {
        self.keys
            .receipt_signing_key_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("keys").join("receipt-signing.key"))
    }

    pub fn source_client_key_path(&self) -> PathBuf {
        self.keys
            .source_client_key_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("keys").join("source-client.pem"))
    }

    pub fn id_token_key_path(&self) -> PathBuf {
        self.keys
            .id_token_signing_key_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("keys").join("id-token-signing.pem"))
    }

    /// Settings that weaken a secure default; each is logged and audited at start.
    pub fn weakened_settings(&self) -> Vec<&'static str> {
        let mut weakened = Vec::new();
        if self.insecure_http {
            weakened.push("insecure_http");
        }
        weakened
    }
}

fn positive(key: &str, value: u64) -> Result<()> {
    if value == 0 {
        return Err(Error::config(key, "must be greater than 0"));
    }
    Ok(())
}

fn is_loopback(ip: IpAddr) -> bool {
    ip.is_loopback()
}

/// Turns figment's error into ours, keeping the dotted key path it names.
fn figment_error(err: figment::Error) -> Error {
    // Where the bad value came from: a file path, `PHR_…` variables, or flags.
    let origin = err.metadata.as_ref().map(|m| match &m.source {
        Some(source) => format!("{} {source}", m.name),
        None => m.name.to_string(),
    });
    let key = if err.path.is_empty() {
        origin.clone().unwrap_or_else(|| "config".into())
    } else {
        err.path.join(".")
    };
    let from = origin.map(|o| format!(" (from {o})")).unwrap_or_default();
    Error::config(key, format!("{}{from}", err.kind))
}

#[cfg(test)]
// figment's `Jail` closures must return its (large) error type.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::Jail;

    fn load_in(jail: &Jail, file: Option<&str>) -> Result<Config> {
        let path = file.map(|_| jail.directory().join("gateway.toml"));
        Config::load(path.as_deref(), &FlagOverrides::default())
    }

    #[test]
    fn layers_apply_in_order_defaults_file_env_flags() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "gateway.toml",
                "data_dir = \"/file\"\nlisten = \"127.0.0.1:1000\"\n[tls]\nmin_version = \"1.3\"\n",
            )?;
            jail.set_env("PHR_LISTEN", "127.0.0.1:2000");
            let path = jail.directory().join("gateway.toml");
            let from_env = Config::load(Some(&path), &FlagOverrides::default()).unwrap();
            assert_eq!(from_env.data_dir, PathBuf::from("/file"));
            assert_eq!(from_env.listen.port(), 2000);
            assert_eq!(from_env.tls.min_version, crate::tls::TlsVersion::V1_3);
            assert_eq!(from_env.sessions, SessionConfig::default());

            let flags = FlagOverrides {
                listen: Some("127.0.0.1:3000".parse().unwrap()),
                ..Default::default()
            };
            let from_flags = Config::load(Some(&path), &flags).unwrap();
            assert_eq!(from_flags.listen.port(), 3000);
            Ok(())
        });
    }

    #[test]
    fn nested_env_keys_use_double_underscore() {
        Jail::expect_with(|jail| {
            jail.set_env("PHR_SESSIONS__IDLE_TIMEOUT_SECS", "60");
            let config = load_in(jail, None).unwrap();
            assert_eq!(config.sessions.idle_timeout_secs, 60);
            Ok(())
        });
    }

    #[test]
    fn bad_values_name_the_key() {
        let cases: &[(&str, &str)] = &[
            ("unknown_key = 1\n", "unknown_key"),
            ("[tls]\nmin_version = \"1.1\"\n", "tls.min_version"),
            (
                "[sessions]\nidle_timeout_secs = \"soon\"\n",
                "sessions.idle_timeout_secs",
            ),
            (
                "[sessions]\nidle_timeout_secs = 0\n",
                "sessions.idle_timeout_secs",
            ),
            ("[database]\nurl = \"mysql://x\"\n", "database.url"),
            ("[database]\nsurprise = true\n", "database"),
            (
                "listen = \"0.0.0.0:80\"\ninsecure_http = true\n",
                "insecure_http",
            ),
            ("[log]\nfilter = \"[[[\"\n", "log.filter"),
            (
                "[oauth]\naccess_token_secs = 301\n",
                "oauth.access_token_secs",
            ),
            ("this is not toml", "gateway.toml"),
        ];
        for (file, key) in cases {
            Jail::expect_with(|jail| {
                jail.create_file("gateway.toml", file)?;
                let err = load_in(jail, Some(file)).unwrap_err().to_string();
                assert!(err.contains(key), "{file:?}: {err} should name {key}");
                Ok(())
            });
        }
    }

    #[test]
    fn bad_env_value_names_the_key() {
        Jail::expect_with(|jail| {
            jail.set_env("PHR_HTTP__BODY_LIMIT_BYTES", "lots");
            let err = load_in(jail, None).unwrap_err().to_string();
            assert!(err.contains("http.body_limit_bytes"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn missing_config_file_is_an_error() {
        let err = Config::load(
            Some(Path::new("/nonexistent/gateway.toml")),
            &FlagOverrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("--config"), "{err}");
    }

    #[test]
    fn defaults_are_secure() {
        let config = Config::default();
        config.validate().unwrap();
        assert!(!config.insecure_http);
        assert!(config.weakened_settings().is_empty());
        assert!(config.listen.ip().is_loopback());
    }
}
