//! The gateway's one error type. HTTP rendering lives in `http::error`, the one place that
//! turns these into `application/problem+json` or FHIR `OperationOutcome` responses.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("configuration: `{key}`: {reason}")]
    Config { key: String, reason: String },

    #[error("database: {0}")]
    Database(#[from] sqlx::Error),

    /// From a native SQLite connection (`store::point_reads`).
    #[error("database: {0}")]
    NativeDatabase(#[from] rusqlite::Error),

    #[error("database migration: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),

    #[error("key file {path}: {reason}")]
    KeyFile { path: PathBuf, reason: String },

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),

    #[error("encryption: {0}")]
    Crypto(&'static str),

    /// The patient's data key is gone (crypto-shredded) or never existed.
    #[error("no data key for patient {0}: the data cannot be decrypted")]
    KeyMissing(String),

    /// The data key was wrapped by another KEK than the one this process holds (a rotation
    /// not finished, a key store restored from elsewhere).
    #[error("a data key is wrapped by KEK {wrapped_by}, but this gateway holds KEK {held}")]
    KekMismatch { wrapped_by: String, held: String },

    /// Key escrow or recovery failed; the message says what to do.
    #[error("key escrow: {0}")]
    Escrow(String),

    #[error("not found: {0}")]
    NotFound(String),

    #[error("invalid input: {0}")]
    Invalid(String),

    #[error("resource of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },

    #[error("unauthenticated: {0}")]
    Unauthenticated(&'static str),

    #[error("forbidden: {0}")]
    Forbidden(&'static str),

    /// The request does not fit the current state (e.g. withdrawing what is withdrawn).
    #[error("conflict: {0}")]
    Conflict(String),

    #[error("too many attempts; retry after {retry_after_secs} s")]
    RateLimited { retry_after_secs: u64 },

    #[error(transparent)]
    Source(#[from] phr_adapters::SourceError),

    #[error("audit log: {0}")]
    Audit(String),

    /// Backup generations' storage (e.g. the S3 bucket) failed.
    #[error("backup storage: {0}")]
    BackupStorage(String),

    /// Raised by a test-only fault point between two statements of one transaction.
    #[error("injected fault at {0}")]
    InjectedFault(&'static str),

    /// A refusal in OAuth terms (RFC 6749 §5.2): the OAuth endpoints render it as such.
    #[error("{0}")]
    OAuth(crate::oauth::OAuthError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn config(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Config {
            key: key.into(),
            reason: reason.into(),
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
