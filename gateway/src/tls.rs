//! HTTPS for the gateway: the `[tls]` configuration, the rustls server configuration, and the
//! accept loop that serves an axum router over TLS.
//!
//! The settings follow the Japanese medical-information-system security guideline: TLS 1.3,
//! TLS 1.2 as the floor, and only ECDHE key exchange with AEAD ciphers. Every algorithm is
//! listed explicitly below so a rustls upgrade that widens its defaults cannot widen ours.

use std::fmt;
use std::fs::File;
use std::future::Future;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Once};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use rustls::crypto::{ring as ring_provider, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, SupportedProtocolVersion};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinError, JoinSet};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

/// How long a client may take to finish the TLS handshake. Without a bound, a client that
/// opens a socket and then trickles bytes (slowloris) would pin a task and a file descriptor.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long shutdown waits for open connections to finish before cutting them off.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a client may take to send a complete HTTP/1 request head, for the same reason.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// File names of the self-signed development certificate under `<data_dir>/tls/`.
const DEV_CERT_FILE: &str = "dev-cert.pem";
const DEV_KEY_FILE: &str = "dev-key.pem";

/// Names the development certificate is valid for: the loopback names a local client uses.
const DEV_CERT_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// Lowest TLS version the server accepts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TlsVersion {
    /// TLS 1.2 and 1.3 (the guideline's floor).
    #[default]
    V1_2,
    /// TLS 1.3 only.
    V1_3,
}

impl TlsVersion {
    /// The spelling used in configuration files: `"1.2"` or `"1.3"`.
    pub fn as_str(self) -> &'static str {
        match self {
            TlsVersion::V1_2 => "1.2",
            TlsVersion::V1_3 => "1.3",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        match text.trim() {
            "1.2" => Some(TlsVersion::V1_2),
            "1.3" => Some(TlsVersion::V1_3),
            _ => None,
        }
    }

    fn protocol_versions(self) -> &'static [&'static SupportedProtocolVersion] {
        static TLS12_AND_TLS13: [&SupportedProtocolVersion; 2] =
            [&rustls::version::TLS13, &rustls::version::TLS12];
        static TLS13_ONLY: [&SupportedProtocolVersion; 1] = [&rustls::version::TLS13];
        match self {
            TlsVersion::V1_2 => &TLS12_AND_TLS13,
            TlsVersion::V1_3 => &TLS13_ONLY,
        }
    }
}

impl fmt::Display for TlsVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for TlsVersion {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for TlsVersion {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(TlsVersionVisitor)
    }
}

/// Accepts the strings `"1.2"`/`"1.3"` and also the numbers 1.2/1.3, because environment
/// providers (figment's `PHR_TLS__MIN_VERSION=1.3`) and unquoted TOML hand over a float.
struct TlsVersionVisitor;

impl serde::de::Visitor<'_> for TlsVersionVisitor {
    type Value = TlsVersion;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a TLS version, \"1.2\" or \"1.3\"")
    }

    fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<TlsVersion, E> {
        TlsVersion::parse(value).ok_or_else(|| {
            E::custom(format!(
                "unsupported TLS version `{value}`: expected \"1.2\" or \"1.3\""
            ))
        })
    }

    // Formatting the float gives its shortest round-trip spelling ("1.3"), avoiding float
    // equality and the f32-to-f64 widening (1.2999999523...) of the default visit_f32.
    fn visit_f32<E: serde::de::Error>(self, value: f32) -> Result<TlsVersion, E> {
        self.visit_str(&value.to_string())
    }

    fn visit_f64<E: serde::de::Error>(self, value: f64) -> Result<TlsVersion, E> {
        self.visit_str(&value.to_string())
    }
}

/// Whether a client certificate is demanded when `client_ca_file` is set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// A client may connect without a certificate; one it presents must still verify.
    Optional,
    /// The handshake fails without a certificate signed by the client CA.
    #[default]
    Required,
}

/// The `[tls]` section of the gateway configuration.
#[derive(Debug, Clone, Default, serde::Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Lowest accepted protocol version: "1.2" (default) or "1.3".
    pub min_version: TlsVersion,
    /// PEM certificate chain, leaf first. Without it a self-signed development certificate
    /// is generated under `<data_dir>/tls/`.
    pub cert_file: Option<PathBuf>,
    /// PEM private key (PKCS#8, SEC1 or PKCS#1 RSA) for `cert_file`; must be mode 0600 or
    /// stricter.
    pub key_file: Option<PathBuf>,
    /// PEM bundle of CAs that sign client certificates; setting it enables mutual TLS.
    pub client_ca_file: Option<PathBuf>,
    /// "required" (default) or "optional"; only used with `client_ca_file`.
    pub client_auth: ClientAuth,
}

impl TlsConfig {
    /// Checks the settings that can be checked without touching the file system. The message
    /// names the offending key, e.g. `tls.key_file`.
    pub fn validate(&self) -> Result<(), String> {
        match (&self.cert_file, &self.key_file) {
            (Some(_), None) => {
                return Err("`tls.key_file` is required when `tls.cert_file` is set".into())
            }
            (None, Some(_)) => {
                return Err("`tls.cert_file` is required when `tls.key_file` is set".into())
            }
            _ => {}
        }
        let paths = [
            ("tls.cert_file", &self.cert_file),
            ("tls.key_file", &self.key_file),
            ("tls.client_ca_file", &self.client_ca_file),
        ];
        for (key, path) in paths {
            if path.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                return Err(format!("`{key}` must not be empty"));
            }
        }
        Ok(())
    }
}

/// Why the TLS configuration could not be built. Every file problem names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("invalid TLS configuration: {0}")]
    InvalidConfig(String),

    #[error("cannot read TLS file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("malformed PEM in {}: {source}", path.display())]
    InvalidPem {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("no certificate (BEGIN CERTIFICATE block) found in {}", path.display())]
    NoCertificate { path: PathBuf },

    #[error("certificate in {} is unusable: {reason}", path.display())]
    InvalidCertificate { path: PathBuf, reason: String },

    #[error(
        "no private key (PKCS#8, SEC1 or RSA PEM block) found in {}",
        path.display()
    )]
    NoPrivateKey { path: PathBuf },

    #[error("private key in {} is unusable: {reason}", path.display())]
    BadKey { path: PathBuf, reason: String },

    #[error(
        "private key {} does not belong to the certificate {}",
        key_path.display(),
        cert_path.display()
    )]
    KeyMismatch {
        cert_path: PathBuf,
        key_path: PathBuf,
    },

    #[error(
        "private key file {} has mode {mode:04o}, which lets group or others read it; \
         run `chmod 600 {}`",
        path.display(),
        path.display()
    )]
    KeyPermissions { path: PathBuf, mode: u32 },

    #[error("no CA certificate found in client CA file {}", path.display())]
    NoClientCa { path: PathBuf },

    #[error("client CA file {} is unusable: {reason}", path.display())]
    InvalidClientCa { path: PathBuf, reason: String },

    #[error("cannot generate the development certificate: {0}")]
    CertGeneration(String),

    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Installs ring as the process-wide rustls `CryptoProvider` exactly once. Needed because
/// when a dependency also enables aws-lc-rs, rustls cannot pick a default by itself and
/// `ClientConfig::builder()` panics. Idempotent and safe to call from many tests at once.
pub fn install_crypto_provider() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        if ring_provider::default_provider().install_default().is_err() {
            tracing::debug!("a rustls CryptoProvider was already installed; keeping it");
        }
    });
}

/// ring with exactly the guideline's algorithms: the three TLS 1.3 AEAD suites, TLS 1.2
/// ECDHE with AES-GCM or ChaCha20-Poly1305 (no CBC, no static-RSA key exchange), and the
/// X25519, P-256 and P-384 groups.
fn guideline_crypto_provider() -> CryptoProvider {
    use ring_provider::cipher_suite as suite;
    use ring_provider::kx_group;
    CryptoProvider {
        cipher_suites: vec![
            suite::TLS13_AES_256_GCM_SHA384,
            suite::TLS13_AES_128_GCM_SHA256,
            suite::TLS13_CHACHA20_POLY1305_SHA256,
            suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            suite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            suite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
            suite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
            suite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
        ],
        kx_groups: vec![kx_group::X25519, kx_group::SECP256R1, kx_group::SECP384R1],
        ..ring_provider::default_provider()
    }
}

/// Builds the rustls server configuration from `config`.
///
/// Without `cert_file`, uses `<data_dir>/tls/dev-cert.pem` and `dev-key.pem`, generating a
/// self-signed ECDSA P-256 certificate for localhost, 127.0.0.1 and ::1 on first start and
/// reusing it afterwards. Any key file whose mode grants group or other access is refused.
/// Also calls [`install_crypto_provider`].
pub fn load_server_config(
    config: &TlsConfig,
    data_dir: &Path,
) -> Result<Arc<ServerConfig>, TlsError> {
    load_reloadable_server_config(config, data_dir).map(|(server_config, _)| server_config)
}

/// [`load_server_config`], with the handle that swaps in a renewed certificate and key
/// without a restart ([`ReloadableCert::reload`]).
pub fn load_reloadable_server_config(
    config: &TlsConfig,
    data_dir: &Path,
) -> Result<(Arc<ServerConfig>, Arc<ReloadableCert>), TlsError> {
    config.validate().map_err(TlsError::InvalidConfig)?;
    install_crypto_provider();
    let provider = Arc::new(guideline_crypto_provider());

    let (cert_path, key_path) = match (&config.cert_file, &config.key_file) {
        (Some(cert), Some(key)) => (cert.clone(), key.clone()),
        _ => ensure_dev_certificate(&data_dir.join("tls"))?,
    };
    let certified = ReloadableCert::load(&cert_path, &key_path, &provider)?;
    let resolver = Arc::new(ReloadableCert {
        cert_path,
        key_path,
        provider: Arc::clone(&provider),
        current: std::sync::RwLock::new(certified),
    });

    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(config.min_version.protocol_versions())
        .map_err(|err| TlsError::InvalidConfig(err.to_string()))?;
    let builder = match &config.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(ca_path) => builder.with_client_cert_verifier(client_verifier(
            ca_path,
            config.client_auth,
            &provider,
        )?),
    };
    let mut server_config = builder.with_cert_resolver(resolver.clone());
    // Offer HTTP/2 first; the connection layer serves either.
    server_config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((Arc::new(server_config), resolver))
}

/// The server certificate and key, swappable while serving: each new handshake takes the
/// pair in force at that moment; connections already established keep theirs. A renewal
/// that fails to load (a missing file, a key that does not match) leaves the old pair.
#[derive(Debug)]
pub struct ReloadableCert {
    cert_path: PathBuf,
    key_path: PathBuf,
    provider: Arc<CryptoProvider>,
    current: std::sync::RwLock<Arc<rustls::sign::CertifiedKey>>,
}

impl ReloadableCert {
    fn load(
        cert_path: &Path,
        key_path: &Path,
        provider: &CryptoProvider,
    ) -> Result<Arc<rustls::sign::CertifiedKey>, TlsError> {
        let cert_chain = read_certificates(cert_path)?;
        let key = read_private_key(key_path)?;
        let signing_key =
            provider
                .key_provider
                .load_private_key(key)
                .map_err(|err| TlsError::BadKey {
                    path: key_path.to_path_buf(),
                    reason: err.to_string(),
                })?;
        let certified = rustls::sign::CertifiedKey::new(cert_chain, signing_key);
        certified.keys_match().map_err(|err| match err {
            rustls::Error::InconsistentKeys(_) => TlsError::KeyMismatch {
                cert_path: cert_path.to_path_buf(),
                key_path: key_path.to_path_buf(),
            },
            other => TlsError::InvalidCertificate {
                path: cert_path.to_path_buf(),
                reason: other.to_string(),
            },
        })?;
        Ok(Arc::new(certified))
    }

    /// Re-reads the certificate and key files; on success new handshakes present them.
    /// Returns the SHA-256 fingerprint (hex) of the leaf now served.
    pub fn reload(&self) -> Result<String, TlsError> {
        let certified = Self::load(&self.cert_path, &self.key_path, &self.provider)?;
        let fingerprint = leaf_fingerprint(&certified);
        if let Ok(mut current) = self.current.write() {
            *current = certified;
        }
        Ok(fingerprint)
    }

    /// SHA-256 (hex) of the leaf certificate served now.
    pub fn fingerprint(&self) -> String {
        self.current
            .read()
            .map(|c| leaf_fingerprint(&c))
            .unwrap_or_default()
    }
}

fn leaf_fingerprint(certified: &rustls::sign::CertifiedKey) -> String {
    use sha2::Digest;
    certified
        .cert
        .first()
        .map(|leaf| hex::encode(sha2::Sha256::digest(leaf.as_ref())))
        .unwrap_or_default()
}

impl rustls::server::ResolvesServerCert for ReloadableCert {
    fn resolve(
        &self,
        _client_hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.current.read().ok().map(|c| Arc::clone(&c))
    }
}

fn client_verifier(
    ca_path: &Path,
    client_auth: ClientAuth,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let invalid = |reason: String| TlsError::InvalidClientCa {
        path: ca_path.to_path_buf(),
        reason,
    };
    let pem = read_file(ca_path)?;
    let mut roots = RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        let cert = cert.map_err(|err| invalid(format!("malformed PEM: {err}")))?;
        // Reject the whole file on one bad CA rather than silently trusting fewer CAs.
        roots
            .add(cert)
            .map_err(|err| invalid(format!("bad CA certificate: {err}")))?;
    }
    if roots.is_empty() {
        return Err(TlsError::NoClientCa {
            path: ca_path.to_path_buf(),
        });
    }
    let builder =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(provider));
    let builder = match client_auth {
        ClientAuth::Required => builder,
        ClientAuth::Optional => builder.allow_unauthenticated(),
    };
    builder.build().map_err(|err| invalid(err.to_string()))
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_file(path)?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::InvalidPem {
            path: path.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// Reads the first private key in `path` after checking, on the open file so the check and
/// the read see the same inode, that only the owner can read it.
fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let read_error = |source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(read_error)?;
    let metadata = file.metadata().map_err(read_error)?;
    check_key_permissions(path, &metadata)?;
    let mut pem = Vec::new();
    file.read_to_end(&mut pem).map_err(read_error)?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|source| TlsError::InvalidPem {
            path: path.to_path_buf(),
            source,
        })?
        .ok_or_else(|| TlsError::NoPrivateKey {
            path: path.to_path_buf(),
        })
}

#[cfg(unix)]
fn check_key_permissions(path: &Path, metadata: &std::fs::Metadata) -> Result<(), TlsError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = metadata.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(TlsError::KeyPermissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_key_permissions(_path: &Path, _metadata: &std::fs::Metadata) -> Result<(), TlsError> {
    Ok(())
}

/// Returns the development certificate and key paths in `tls_dir`, generating both when
/// either is missing (a crash between the two writes must not leave a half pair behind).
fn ensure_dev_certificate(tls_dir: &Path) -> Result<(PathBuf, PathBuf), TlsError> {
    let cert_path = tls_dir.join(DEV_CERT_FILE);
    let key_path = tls_dir.join(DEV_KEY_FILE);
    if cert_path.is_file() && key_path.is_file() {
        tracing::warn!(
            cert = %cert_path.display(),
            "serving HTTPS with the self-signed development certificate; \
             set tls.cert_file and tls.key_file for production"
        );
        return Ok((cert_path, key_path));
    }

    create_private_dir(tls_dir)?;
    let (cert_pem, key_pem) = generate_dev_certificate()?;
    // Write each file under a temporary name and rename it into place, so a reader never
    // sees a partly written file and the key never exists with wider permissions.
    write_new_file(&key_path, key_pem.as_bytes(), 0o600)?;
    write_new_file(&cert_path, cert_pem.as_bytes(), 0o644)?;
    tracing::warn!(
        cert = %cert_path.display(),
        "generated a self-signed development certificate for localhost; \
         set tls.cert_file and tls.key_file for production"
    );
    Ok((cert_path, key_path))
}

fn generate_dev_certificate() -> Result<(String, String), TlsError> {
    let generation_error = |err: rcgen::Error| TlsError::CertGeneration(err.to_string());
    let key_pair =
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(generation_error)?;
    let names: Vec<String> = DEV_CERT_NAMES.iter().map(|name| name.to_string()).collect();
    let mut params = rcgen::CertificateParams::new(names).map_err(generation_error)?;
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        "phr-gateway development certificate",
    );
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.self_signed(&key_pair).map_err(generation_error)?;
    Ok((cert.pem(), key_pair.serialize_pem()))
}

fn create_private_dir(dir: &Path) -> Result<(), TlsError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(|source| TlsError::Write {
        path: dir.to_path_buf(),
        source,
    })
}

/// Writes `contents` to `path` via a fresh temporary file created with `mode` (never
/// chmod-ed afterwards, so there is no window with looser permissions).
fn write_new_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), TlsError> {
    let mut temp_name = path.as_os_str().to_owned();
    temp_name.push(".tmp");
    let temp_path = PathBuf::from(temp_name);
    let write_error = |source| TlsError::Write {
        path: path.to_path_buf(),
        source,
    };
    // A leftover from an interrupted run may have any mode; create_new below needs it gone.
    match std::fs::remove_file(&temp_path) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(write_error(err)),
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(&temp_path).map_err(write_error)?;
    file.write_all(contents).map_err(write_error)?;
    file.sync_all().map_err(write_error)?;
    std::fs::rename(&temp_path, path).map_err(write_error)
}

/// Peer facts that [`serve`] puts into every request's extensions.
#[derive(Clone, Debug)]
pub struct ConnectionInfo {
    pub remote_addr: SocketAddr,
    /// "TLSv1.3" or "TLSv1.2"; `None` on plain HTTP.
    pub tls_version: Option<&'static str>,
    /// DER of the client's leaf certificate, when it presented one (mutual TLS).
    pub client_cert_der: Option<Vec<u8>>,
}

impl ConnectionInfo {
    fn from_tls(remote_addr: SocketAddr, session: &rustls::ServerConnection) -> Self {
        let tls_version = session.protocol_version().map(|version| match version {
            rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3",
            rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2",
            // Unreachable with the versions we enable; still report something honest.
            _ => "unknown",
        });
        let client_cert_der = session
            .peer_certificates()
            .and_then(|chain| chain.first())
            .map(|leaf| leaf.as_ref().to_vec());
        ConnectionInfo {
            remote_addr,
            tls_version,
            client_cert_der,
        }
    }
}

/// Timeouts of [`serve_with_options`]; [`serve`] uses the defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeOptions {
    /// Longest a client may take to complete the TLS handshake.
    pub handshake_timeout: Duration,
    /// Longest shutdown waits for open connections before closing them forcibly.
    pub drain_timeout: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            handshake_timeout: HANDSHAKE_TIMEOUT,
            drain_timeout: DRAIN_TIMEOUT,
        }
    }
}

/// Serves `router` on `listener` until `shutdown` completes, with [`ServeOptions::default`].
///
/// With `tls`, each connection first completes a TLS handshake (bounded by
/// [`HANDSHAKE_TIMEOUT`]); with `tls = None` it is plain HTTP, and the caller decides whether
/// that is allowed. HTTP/1.1 and HTTP/2 are both served. Each request carries
/// [`ConnectionInfo`] and `ConnectInfo<SocketAddr>` in its extensions. Failed handshakes and
/// accept errors are logged and never end the loop.
///
/// When `shutdown` completes, the listener is closed, idle connections are closed, busy ones
/// finish their in-flight requests (HTTP/2 clients get GOAWAY), and this returns once every
/// connection has ended, or after [`DRAIN_TIMEOUT`] with the stragglers cut off.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<ServerConfig>>,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    serve_with_options(listener, tls, router, shutdown, ServeOptions::default()).await
}

/// [`serve`] with explicit timeouts.
pub async fn serve_with_options(
    listener: TcpListener,
    tls: Option<Arc<ServerConfig>>,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    options: ServeOptions,
) -> io::Result<()> {
    let acceptor = tls.map(TlsAcceptor::from);
    // A send on this channel tells every connection task to wind down gracefully.
    let (shutdown_sender, shutdown_receiver) = watch::channel(());
    // Tracks connection tasks so shutdown can wait for them, and abort them after the drain
    // timeout (an HTTP/2 client that never acknowledges GOAWAY would otherwise hold us).
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);

    loop {
        let accepted = tokio::select! {
            biased;
            () = &mut shutdown => break,
            // Reap finished tasks as we go so the set does not grow with every connection.
            Some(finished) = connections.join_next() => {
                log_connection_panic(finished);
                continue;
            }
            accepted = listener.accept() => accepted,
        };
        let (tcp, remote_addr) = match accepted {
            Ok(pair) => pair,
            Err(err) if is_per_connection_error(&err) => continue,
            Err(err) => {
                // Typically EMFILE: back off instead of spinning, as hyper and axum do.
                tracing::error!(error = %err, "accept failed; retrying in 1 s");
                tokio::select! {
                    () = &mut shutdown => break,
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::debug!(%remote_addr, error = %err, "cannot set TCP_NODELAY");
        }
        connections.spawn(handle_connection(
            tcp,
            remote_addr,
            acceptor.clone(),
            router.clone(),
            options.handshake_timeout,
            shutdown_receiver.clone(),
        ));
    }

    drop(listener);
    shutdown_sender.send_replace(());
    let drain = async {
        while let Some(finished) = connections.join_next().await {
            log_connection_panic(finished);
        }
    };
    if tokio::time::timeout(options.drain_timeout, drain)
        .await
        .is_err()
    {
        tracing::warn!(
            open_connections = connections.len(),
            "connections still open after the drain timeout; closing them"
        );
        connections.shutdown().await;
    }
    Ok(())
}

fn log_connection_panic(finished: Result<(), JoinError>) {
    if let Err(err) = finished {
        if err.is_panic() {
            tracing::error!(error = %err, "a connection task panicked");
        }
    }
}

/// Accept errors that concern one client only; the listener itself is fine.
fn is_per_connection_error(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

async fn handle_connection(
    tcp: TcpStream,
    remote_addr: SocketAddr,
    acceptor: Option<TlsAcceptor>,
    router: Router,
    handshake_timeout: Duration,
    mut shutdown: watch::Receiver<()>,
) {
    let Some(acceptor) = acceptor else {
        let info = ConnectionInfo {
            remote_addr,
            tls_version: None,
            client_cert_der: None,
        };
        serve_http(tcp, info, router, shutdown).await;
        return;
    };

    let handshake = tokio::time::timeout(handshake_timeout, acceptor.accept(tcp));
    let tls_stream = tokio::select! {
        outcome = handshake => match outcome {
            Ok(Ok(stream)) => stream,
            // Scanners and misconfigured clients cause these all day; not worth a warning.
            Ok(Err(err)) => {
                tracing::debug!(%remote_addr, error = %err, "TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(%remote_addr, "TLS handshake timed out");
                return;
            }
        },
        // A half-done handshake has no request to finish; drop it at shutdown.
        _ = shutdown.changed() => return,
    };
    let info = ConnectionInfo::from_tls(remote_addr, tls_stream.get_ref().1);
    serve_http(tls_stream, info, router, shutdown).await;
}

async fn serve_http<S>(
    stream: S,
    info: ConnectionInfo,
    router: Router,
    mut shutdown: watch::Receiver<()>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let remote_addr = info.remote_addr;
    let service = router.map_request(move |mut request: Request<Incoming>| {
        request.extensions_mut().insert(info.clone());
        request.extensions_mut().insert(ConnectInfo(remote_addr));
        request
    });
    let service = TowerToHyperService::new(service);

    let mut builder = auto::Builder::new(TokioExecutor::new());
    // The timer is what makes hyper enforce the header read timeout at all.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder.http2().timer(TokioTimer::new());
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    tokio::pin!(connection);

    let outcome = tokio::select! {
        outcome = connection.as_mut() => outcome,
        _ = shutdown.changed() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(err) = outcome {
        tracing::debug!(%remote_addr, error = %err, "connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use axum::Extension;
    use rustls::pki_types::{PrivatePkcs8KeyDer, ServerName};
    use rustls::ClientConfig;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::oneshot;
    use tokio::task::JoinHandle;
    use tokio_rustls::client::TlsStream;
    use tokio_rustls::TlsConnector;

    const IO_TIMEOUT: Duration = Duration::from_secs(5);

    fn test_router() -> Router {
        Router::new()
            .route(
                "/version",
                get(|Extension(info): Extension<ConnectionInfo>| async move {
                    info.tls_version.unwrap_or("plain").to_string()
                }),
            )
            .route(
                "/client-cert",
                get(|Extension(info): Extension<ConnectionInfo>| async move {
                    info.client_cert_der.unwrap_or_default()
                }),
            )
            .route(
                "/peer",
                get(
                    |ConnectInfo(peer): ConnectInfo<SocketAddr>,
                     Extension(info): Extension<ConnectionInfo>| async move {
                        format!("{peer} {}", info.remote_addr)
                    },
                ),
            )
            .route(
                "/hang",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    "too late"
                }),
            )
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    "done"
                }),
            )
    }

    struct TestServer {
        addr: SocketAddr,
        stop: Option<oneshot::Sender<()>>,
        task: JoinHandle<io::Result<()>>,
    }

    impl TestServer {
        async fn start(tls: Option<Arc<ServerConfig>>) -> TestServer {
            TestServer::start_with_options(tls, ServeOptions::default()).await
        }

        async fn start_with_options(
            tls: Option<Arc<ServerConfig>>,
            options: ServeOptions,
        ) -> TestServer {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (stop, stopped) = oneshot::channel::<()>();
            let shutdown = async move {
                let _ = stopped.await;
            };
            let task = tokio::spawn(serve_with_options(
                listener,
                tls,
                test_router(),
                shutdown,
                options,
            ));
            TestServer {
                addr,
                stop: Some(stop),
                task,
            }
        }

        async fn stop(mut self) {
            if let Some(stop) = self.stop.take() {
                let _ = stop.send(());
            }
            tokio::time::timeout(IO_TIMEOUT, self.task)
                .await
                .expect("serve did not return after shutdown")
                .unwrap()
                .unwrap();
        }
    }

    /// A server config from `config` with its development certificate in a fresh data dir,
    /// plus that certificate for the client to trust.
    fn server_with_dev_cert(
        config: &TlsConfig,
    ) -> (
        tempfile::TempDir,
        Arc<ServerConfig>,
        CertificateDer<'static>,
    ) {
        let data_dir = tempfile::tempdir().unwrap();
        let server_config = load_server_config(config, data_dir.path()).unwrap();
        let cert = read_certificates(&data_dir.path().join("tls").join(DEV_CERT_FILE))
            .unwrap()
            .remove(0);
        (data_dir, server_config, cert)
    }

    fn client_config(
        versions: &[&'static SupportedProtocolVersion],
        trusted: &CertificateDer<'static>,
        identity: Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>,
    ) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(trusted.clone()).unwrap();
        let builder =
            ClientConfig::builder_with_provider(Arc::new(ring_provider::default_provider()))
                .with_protocol_versions(versions)
                .unwrap()
                .with_root_certificates(roots);
        let mut config = match identity {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => builder.with_client_auth_cert(vec![cert], key).unwrap(),
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }

    async fn tls_connect(
        addr: SocketAddr,
        config: Arc<ClientConfig>,
    ) -> io::Result<TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(addr).await?;
        let name = ServerName::try_from("localhost").unwrap();
        tokio::time::timeout(IO_TIMEOUT, TlsConnector::from(config).connect(name, tcp))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "handshake timed out"))?
    }

    /// A hand-rolled HTTP/1.1 GET, so the tests need no HTTP client crate.
    async fn http1_get<S>(stream: &mut S, path: &str) -> io::Result<(u16, Vec<u8>)>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        stream.flush().await?;
        let mut received = Vec::new();
        let response = tokio::time::timeout(IO_TIMEOUT, async {
            loop {
                if let Some(parsed) = parse_http1_response(&received) {
                    return Ok(parsed);
                }
                let mut chunk = [0u8; 4096];
                let count = stream.read(&mut chunk).await?;
                if count == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed before a full response",
                    ));
                }
                received.extend_from_slice(&chunk[..count]);
            }
        });
        response
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no response"))?
    }

    fn parse_http1_response(received: &[u8]) -> Option<(u16, Vec<u8>)> {
        let head_end = received.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
        let head = std::str::from_utf8(&received[..head_end]).ok()?;
        let status = head.split(' ').nth(1)?.parse().ok()?;
        let content_length: usize = head
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().ok())?
            })
            .unwrap_or(0);
        let body = received.get(head_end..head_end + content_length)?;
        Some((status, body.to_vec()))
    }

    #[tokio::test]
    async fn tls13_handshake_and_get_succeed() {
        let (_dir, server_config, cert) = server_with_dev_cert(&TlsConfig::default());
        let server = TestServer::start(Some(server_config)).await;

        let config = client_config(&[&rustls::version::TLS13], &cert, None);
        let mut stream = tls_connect(server.addr, config).await.unwrap();
        assert_eq!(
            stream.get_ref().1.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        let (status, body) = http1_get(&mut stream, "/version").await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(body, b"TLSv1.3");

        // Both extensions carry the client's own address.
        let client_addr = stream.get_ref().0.local_addr().unwrap();
        let (status, body) = http1_get(&mut stream, "/peer").await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(
            String::from_utf8(body).unwrap(),
            format!("{client_addr} {client_addr}")
        );
        server.stop().await;
    }

    #[tokio::test]
    async fn default_config_accepts_tls12_with_ecdhe_aes_gcm() {
        let (_dir, server_config, cert) = server_with_dev_cert(&TlsConfig::default());
        let server = TestServer::start(Some(server_config)).await;

        let config = client_config(&[&rustls::version::TLS12], &cert, None);
        let mut stream = tls_connect(server.addr, config).await.unwrap();
        let session = stream.get_ref().1;
        assert_eq!(
            session.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_2)
        );
        let suite = session.negotiated_cipher_suite().unwrap().suite();
        assert!(
            matches!(
                suite,
                rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                    | rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
            ),
            "negotiated {suite:?}"
        );
        let (status, body) = http1_get(&mut stream, "/version").await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(body, b"TLSv1.2");
        server.stop().await;
    }

    #[tokio::test]
    async fn min_version_13_refuses_tls12_clients() {
        let config = TlsConfig {
            min_version: TlsVersion::V1_3,
            ..TlsConfig::default()
        };
        let (_dir, server_config, cert) = server_with_dev_cert(&config);
        let server = TestServer::start(Some(server_config)).await;

        let tls12_only = client_config(&[&rustls::version::TLS12], &cert, None);
        let refused = tls_connect(server.addr, tls12_only).await;
        assert!(refused.is_err(), "a TLS 1.2 client got through");

        // The failed handshake did not end the accept loop, and TLS 1.3 still works.
        let tls13 = client_config(&[&rustls::version::TLS13], &cert, None);
        let mut stream = tls_connect(server.addr, tls13).await.unwrap();
        let (status, body) = http1_get(&mut stream, "/version").await.unwrap();
        assert_eq!((status, body.as_slice()), (200, &b"TLSv1.3"[..]));
        server.stop().await;
    }

    /// A TLS 1.2 ClientHello record offering exactly `cipher_suites`, with the extensions an
    /// ECDHE-ECDSA handshake needs.
    fn tls12_client_hello(cipher_suites: &[u16]) -> Vec<u8> {
        fn push_extension(out: &mut Vec<u8>, kind: u16, data: &[u8]) {
            out.extend_from_slice(&kind.to_be_bytes());
            out.extend_from_slice(&(data.len() as u16).to_be_bytes());
            out.extend_from_slice(data);
        }
        let mut extensions = Vec::new();
        // supported_groups: x25519, secp256r1
        push_extension(&mut extensions, 0x000a, &[0, 4, 0x00, 0x1d, 0x00, 0x17]);
        // ec_point_formats: uncompressed
        push_extension(&mut extensions, 0x000b, &[1, 0]);
        // signature_algorithms: ecdsa_secp256r1_sha256, rsa_pss_rsae_sha256, rsa_pkcs1_sha256
        push_extension(
            &mut extensions,
            0x000d,
            &[0, 6, 0x04, 0x03, 0x08, 0x04, 0x04, 0x01],
        );

        let mut hello = vec![0x03, 0x03]; // client_version: TLS 1.2
        hello.extend_from_slice(&[0x5a; 32]); // random
        hello.push(0); // empty session id
        hello.extend_from_slice(&((cipher_suites.len() * 2) as u16).to_be_bytes());
        for suite in cipher_suites {
            hello.extend_from_slice(&suite.to_be_bytes());
        }
        hello.extend_from_slice(&[1, 0]); // compression methods: null only
        hello.extend_from_slice(&(extensions.len() as u16).to_be_bytes());
        hello.extend_from_slice(&extensions);

        let mut handshake = vec![0x01]; // client_hello
        handshake.extend_from_slice(&(hello.len() as u32).to_be_bytes()[1..]);
        handshake.extend_from_slice(&hello);

        let mut record = vec![0x16, 0x03, 0x01]; // handshake record
        record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
        record.extend_from_slice(&handshake);
        record
    }

    #[derive(Debug, PartialEq)]
    enum ServerReply {
        ServerHello,
        Alert { level: u8, description: u8 },
        Closed,
        Other(Vec<u8>),
    }

    async fn send_raw_client_hello(addr: SocketAddr, cipher_suites: &[u16]) -> ServerReply {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(&tls12_client_hello(cipher_suites))
            .await
            .unwrap();
        let mut first = [0u8; 7];
        let read = tokio::time::timeout(IO_TIMEOUT, tcp.read_exact(&mut first))
            .await
            .expect("server neither answered nor closed");
        match read {
            Err(_) => ServerReply::Closed,
            Ok(_) => match first {
                [0x16, _, _, _, _, 0x02, _] => ServerReply::ServerHello,
                [0x15, _, _, _, _, level, description] => ServerReply::Alert { level, description },
                other => ServerReply::Other(other.to_vec()),
            },
        }
    }

    #[tokio::test]
    async fn cbc_and_static_rsa_suites_are_refused() {
        let (_dir, server_config, _cert) = server_with_dev_cert(&TlsConfig::default());
        let server = TestServer::start(Some(server_config)).await;

        // Control: the same hand-built hello with an ECDHE-ECDSA-AES-GCM suite is accepted,
        // so the refusal below is about the suites, not a malformed hello.
        let accepted = send_raw_client_hello(server.addr, &[0xc02b]).await;
        assert_eq!(accepted, ServerReply::ServerHello);

        let weak_suites = [
            0x002f, // TLS_RSA_WITH_AES_128_CBC_SHA
            0x0035, // TLS_RSA_WITH_AES_256_CBC_SHA
            0xc009, // TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA
            0xc013, // TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA
            0xc023, // TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256
            0x009c, // TLS_RSA_WITH_AES_128_GCM_SHA256
            0x009e, // TLS_DHE_RSA_WITH_AES_128_GCM_SHA256
        ];
        let refused = send_raw_client_hello(server.addr, &weak_suites).await;
        assert!(
            matches!(
                refused,
                ServerReply::Alert {
                    level: 2,
                    description: 40
                } | ServerReply::Closed
            ),
            "expected a fatal handshake_failure alert, got {refused:?}"
        );
        server.stop().await;
    }

    #[cfg(unix)]
    fn file_mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[cfg(unix)]
    fn set_file_mode(path: &Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn dev_certificate_is_private_reused_and_guarded() {
        let data_dir = tempfile::tempdir().unwrap();
        let tls_dir = data_dir.path().join("tls");
        let cert_path = tls_dir.join(DEV_CERT_FILE);
        let key_path = tls_dir.join(DEV_KEY_FILE);

        load_server_config(&TlsConfig::default(), data_dir.path()).unwrap();
        assert_eq!(file_mode(&key_path), 0o600);
        assert_eq!(file_mode(&tls_dir), 0o700);
        let first_cert = std::fs::read(&cert_path).unwrap();
        let first_key = std::fs::read(&key_path).unwrap();

        load_server_config(&TlsConfig::default(), data_dir.path()).unwrap();
        assert_eq!(std::fs::read(&cert_path).unwrap(), first_cert);
        assert_eq!(std::fs::read(&key_path).unwrap(), first_key);

        // The certificate names the loopback host in all three spellings.
        let cert = read_certificates(&cert_path).unwrap().remove(0);
        let parsed = webpki_names(&cert);
        for name in DEV_CERT_NAMES {
            assert!(parsed.contains(&name.to_string()), "{name} missing");
        }

        set_file_mode(&key_path, 0o644);
        let err = load_server_config(&TlsConfig::default(), data_dir.path()).unwrap_err();
        assert!(
            matches!(err, TlsError::KeyPermissions { mode: 0o644, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("chmod 600"), "{err}");

        // The same rule applies to a configured key file.
        let configured = TlsConfig {
            cert_file: Some(cert_path.clone()),
            key_file: Some(key_path.clone()),
            ..TlsConfig::default()
        };
        set_file_mode(&key_path, 0o640);
        let err = load_server_config(&configured, data_dir.path()).unwrap_err();
        assert!(matches!(err, TlsError::KeyPermissions { .. }), "{err}");
        set_file_mode(&key_path, 0o400);
        load_server_config(&configured, data_dir.path()).unwrap();
    }

    /// The names a certificate is valid for, checked the way a client would check them.
    fn webpki_names(cert: &CertificateDer<'static>) -> Vec<String> {
        let mut roots = RootCertStore::empty();
        roots.add(cert.clone()).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(ring_provider::default_provider()),
        )
        .build()
        .unwrap();
        let now = rustls::pki_types::UnixTime::now();
        ["localhost", "127.0.0.1", "::1", "example.com"]
            .into_iter()
            .filter(|name| {
                let server_name = ServerName::try_from(*name).unwrap();
                rustls::client::danger::ServerCertVerifier::verify_server_cert(
                    verifier.as_ref(),
                    cert,
                    &[],
                    &server_name,
                    &[],
                    now,
                )
                .is_ok()
            })
            .map(str::to_string)
            .collect()
    }

    struct TestPki {
        ca_pem: String,
        client_cert: CertificateDer<'static>,
        client_key: PrivateKeyDer<'static>,
    }

    /// A CA and a client certificate it signed, made the way an operator's CA would.
    fn test_pki(common_name: &str) -> TestPki {
        let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{common_name} CA"));
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();

        let client_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut client_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        client_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        client_params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let client_cert = client_params
            .signed_by(&client_key, &ca_cert, &ca_key)
            .unwrap();

        TestPki {
            ca_pem: ca_cert.pem(),
            client_cert: client_cert.der().clone(),
            client_key: PrivatePkcs8KeyDer::from(client_key.serialize_der()).into(),
        }
    }

    fn mtls_server(
        client_auth: ClientAuth,
        pki: &TestPki,
    ) -> (
        tempfile::TempDir,
        Arc<ServerConfig>,
        CertificateDer<'static>,
    ) {
        let ca_dir = tempfile::tempdir().unwrap();
        let ca_path = ca_dir.path().join("client-ca.pem");
        std::fs::write(&ca_path, &pki.ca_pem).unwrap();
        let config = TlsConfig {
            client_ca_file: Some(ca_path),
            client_auth,
            ..TlsConfig::default()
        };
        let (_data_dir, server_config, cert) = server_with_dev_cert(&config);
        (ca_dir, server_config, cert)
    }

    /// True when the TLS handshake or the first request on it fails. With TLS 1.3 the
    /// client finishes its side before the server has judged the client certificate, so the
    /// rejection may only show on the first read.
    async fn connection_is_refused(addr: SocketAddr, config: Arc<ClientConfig>) -> bool {
        match tls_connect(addr, config).await {
            Err(_) => true,
            Ok(mut stream) => http1_get(&mut stream, "/version").await.is_err(),
        }
    }

    #[tokio::test]
    async fn mutual_tls_required_demands_a_ca_signed_certificate() {
        let pki = test_pki("clinic-42");
        let (_ca_dir, server_config, server_cert) = mtls_server(ClientAuth::Required, &pki);
        let server = TestServer::start(Some(server_config)).await;

        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let anonymous = client_config(&[version], &server_cert, None);
            assert!(
                connection_is_refused(server.addr, anonymous).await,
                "{version:?} client without a certificate was served"
            );
        }

        let stranger = test_pki("stranger");
        let wrong_ca = client_config(
            &[&rustls::version::TLS13],
            &server_cert,
            Some((
                stranger.client_cert.clone(),
                stranger.client_key.clone_key(),
            )),
        );
        assert!(
            connection_is_refused(server.addr, wrong_ca).await,
            "a certificate from another CA was accepted"
        );

        let member = client_config(
            &[&rustls::version::TLS13],
            &server_cert,
            Some((pki.client_cert.clone(), pki.client_key.clone_key())),
        );
        let mut stream = tls_connect(server.addr, member).await.unwrap();
        let (status, body) = http1_get(&mut stream, "/client-cert").await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(body, pki.client_cert.as_ref());
        server.stop().await;
    }

    #[tokio::test]
    async fn mutual_tls_optional_serves_anonymous_clients() {
        let pki = test_pki("clinic-7");
        let (_ca_dir, server_config, server_cert) = mtls_server(ClientAuth::Optional, &pki);
        let server = TestServer::start(Some(server_config)).await;

        let anonymous = client_config(&[&rustls::version::TLS13], &server_cert, None);
        let mut stream = tls_connect(server.addr, anonymous).await.unwrap();
        let (status, body) = http1_get(&mut stream, "/client-cert").await.unwrap();
        assert_eq!((status, body.len()), (200, 0));

        let member = client_config(
            &[&rustls::version::TLS12],
            &server_cert,
            Some((pki.client_cert.clone(), pki.client_key.clone_key())),
        );
        let mut stream = tls_connect(server.addr, member).await.unwrap();
        let (status, body) = http1_get(&mut stream, "/client-cert").await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(body, pki.client_cert.as_ref());
        server.stop().await;
    }

    #[test]
    fn validate_names_the_missing_key() {
        let cert_only = TlsConfig {
            cert_file: Some("/etc/gateway/cert.pem".into()),
            ..TlsConfig::default()
        };
        let message = cert_only.validate().unwrap_err();
        assert!(message.contains("tls.key_file"), "{message}");

        let key_only = TlsConfig {
            key_file: Some("/etc/gateway/key.pem".into()),
            ..TlsConfig::default()
        };
        let message = key_only.validate().unwrap_err();
        assert!(message.contains("tls.cert_file"), "{message}");

        let data_dir = tempfile::tempdir().unwrap();
        let err = load_server_config(&cert_only, data_dir.path()).unwrap_err();
        assert!(matches!(err, TlsError::InvalidConfig(_)), "{err}");
        assert!(TlsConfig::default().validate().is_ok());
    }

    /// Writes `contents` into `dir/name` with owner-only permissions.
    fn write_private(dir: &Path, name: &str, contents: &[u8]) -> PathBuf {
        let path = dir.join(name);
        write_new_file(&path, contents, 0o600).unwrap();
        path
    }

    #[test]
    fn bad_files_give_clear_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (dev_cert, dev_key) = ensure_dev_certificate(&dir.path().join("tls")).unwrap();
        let configured = |cert: &Path, key: &Path| TlsConfig {
            cert_file: Some(cert.to_path_buf()),
            key_file: Some(key.to_path_buf()),
            ..TlsConfig::default()
        };
        let load = |config: &TlsConfig| load_server_config(config, dir.path()).unwrap_err();

        let garbage = write_private(dir.path(), "garbage.pem", b"this is not PEM at all\n");
        let err = load(&configured(&garbage, &dev_key));
        assert!(matches!(err, TlsError::NoCertificate { .. }), "{err}");
        assert!(err.to_string().contains("garbage.pem"), "{err}");
        assert!(err.to_string().contains("no certificate"), "{err}");

        let bad_base64 = write_private(
            dir.path(),
            "bad-base64.pem",
            b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        );
        let err = load(&configured(&bad_base64, &dev_key));
        assert!(matches!(err, TlsError::InvalidPem { .. }), "{err}");
        assert!(err.to_string().contains("bad-base64.pem"), "{err}");

        let not_a_cert = write_private(
            dir.path(),
            "not-a-cert.pem",
            b"-----BEGIN CERTIFICATE-----\nZ2FyYmFnZQ==\n-----END CERTIFICATE-----\n",
        );
        let err = load(&configured(&not_a_cert, &dev_key));
        assert!(matches!(err, TlsError::InvalidCertificate { .. }), "{err}");

        let err = load(&configured(&dev_cert, &garbage));
        assert!(matches!(err, TlsError::NoPrivateKey { .. }), "{err}");
        assert!(err.to_string().contains("garbage.pem"), "{err}");

        let bad_key = write_private(
            dir.path(),
            "bad-key.pem",
            b"-----BEGIN PRIVATE KEY-----\nZ2FyYmFnZQ==\n-----END PRIVATE KEY-----\n",
        );
        let err = load(&configured(&dev_cert, &bad_key));
        assert!(matches!(err, TlsError::BadKey { .. }), "{err}");
        assert!(err.to_string().contains("bad-key.pem"), "{err}");

        let (_other_cert, other_key) = ensure_dev_certificate(&dir.path().join("other")).unwrap();
        let err = load(&configured(&dev_cert, &other_key));
        assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err}");

        let missing = dir.path().join("missing.pem");
        let err = load(&configured(&missing, &dev_key));
        assert!(matches!(err, TlsError::Read { .. }), "{err}");
        assert!(err.to_string().contains("missing.pem"), "{err}");

        let with_ca = |ca: &Path| TlsConfig {
            client_ca_file: Some(ca.to_path_buf()),
            ..configured(&dev_cert, &dev_key)
        };
        let err = load(&with_ca(&garbage));
        assert!(matches!(err, TlsError::NoClientCa { .. }), "{err}");
        assert!(err.to_string().contains("garbage.pem"), "{err}");
        let err = load(&with_ca(&not_a_cert));
        assert!(matches!(err, TlsError::InvalidClientCa { .. }), "{err}");
        let err = load(&with_ca(&missing));
        assert!(matches!(err, TlsError::Read { .. }), "{err}");

        // The good pair still loads, so the failures above are about the bad files.
        load_server_config(&configured(&dev_cert, &dev_key), dir.path()).unwrap();
    }

    #[test]
    fn config_deserializes_from_strings_and_floats() {
        let config: TlsConfig =
            serde_json::from_str(r#"{"min_version":"1.3","client_auth":"optional"}"#).unwrap();
        assert_eq!(config.min_version, TlsVersion::V1_3);
        assert_eq!(config.client_auth, ClientAuth::Optional);
        assert_eq!(
            serde_json::from_str::<TlsConfig>("{}").unwrap(),
            TlsConfig::default()
        );
        assert_eq!(TlsConfig::default().client_auth, ClientAuth::Required);
        assert_eq!(TlsConfig::default().min_version, TlsVersion::V1_2);

        // Environment providers hand over "1.3" as a float (f32 in figment).
        let from_f32: Result<TlsVersion, serde::de::value::Error> =
            serde::Deserialize::deserialize(serde::de::IntoDeserializer::into_deserializer(1.3f32));
        assert_eq!(from_f32.unwrap(), TlsVersion::V1_3);
        let from_f64: TlsConfig = serde_json::from_str(r#"{"min_version":1.2}"#).unwrap();
        assert_eq!(from_f64.min_version, TlsVersion::V1_2);

        for bad in [
            r#"{"min_version":"1.1"}"#,
            r#"{"min_version":1.0}"#,
            r#"{"client_auth":"sometimes"}"#,
            r#"{"ciphers":"all"}"#,
        ] {
            assert!(serde_json::from_str::<TlsConfig>(bad).is_err(), "{bad}");
        }
        assert_eq!(
            serde_json::to_string(&config).unwrap(),
            r#"{"min_version":"1.3","cert_file":null,"key_file":null,"client_ca_file":null,"client_auth":"optional"}"#
        );
    }

    #[tokio::test]
    async fn plain_http_when_tls_is_off() {
        let server = TestServer::start(None).await;
        let mut tcp = TcpStream::connect(server.addr).await.unwrap();
        let (status, body) = http1_get(&mut tcp, "/version").await.unwrap();
        assert_eq!((status, body.as_slice()), (200, &b"plain"[..]));
        server.stop().await;
    }

    #[tokio::test]
    async fn stalled_handshakes_are_dropped_and_the_loop_goes_on() {
        let (_dir, server_config, cert) = server_with_dev_cert(&TlsConfig::default());
        let options = ServeOptions {
            handshake_timeout: Duration::from_millis(200),
            ..ServeOptions::default()
        };
        let server = TestServer::start_with_options(Some(server_config), options).await;

        // A client that connects and never says anything is disconnected.
        let mut silent = TcpStream::connect(server.addr).await.unwrap();
        let mut buffer = [0u8; 16];
        let read = tokio::time::timeout(IO_TIMEOUT, silent.read(&mut buffer))
            .await
            .expect("a silent client was kept past the handshake timeout");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");

        // Garbage instead of a ClientHello fails the handshake without stopping the server.
        let mut garbage = TcpStream::connect(server.addr).await.unwrap();
        garbage
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();

        let config = client_config(&[&rustls::version::TLS13], &cert, None);
        let mut stream = tls_connect(server.addr, config).await.unwrap();
        let (status, _) = http1_get(&mut stream, "/version").await.unwrap();
        assert_eq!(status, 200);
        server.stop().await;
    }

    #[tokio::test]
    async fn shutdown_lets_in_flight_requests_finish() {
        let (_dir, server_config, cert) = server_with_dev_cert(&TlsConfig::default());
        let mut server = TestServer::start(Some(server_config)).await;
        let addr = server.addr;

        let config = client_config(&[&rustls::version::TLS13], &cert, None);
        let mut stream = tls_connect(addr, config).await.unwrap();
        let in_flight = tokio::spawn(async move { http1_get(&mut stream, "/slow").await });
        tokio::time::sleep(Duration::from_millis(100)).await;

        if let Some(stop) = server.stop.take() {
            stop.send(()).unwrap();
        }
        let (status, body) = in_flight.await.unwrap().unwrap();
        assert_eq!((status, body.as_slice()), (200, &b"done"[..]));
        tokio::time::timeout(IO_TIMEOUT, &mut server.task)
            .await
            .expect("serve did not return after its connections ended")
            .unwrap()
            .unwrap();
        assert!(TcpStream::connect(addr).await.is_err(), "still accepting");
    }

    #[tokio::test]
    async fn shutdown_cuts_off_connections_after_the_drain_timeout() {
        let (_dir, server_config, cert) = server_with_dev_cert(&TlsConfig::default());
        let options = ServeOptions {
            drain_timeout: Duration::from_millis(300),
            ..ServeOptions::default()
        };
        let server = TestServer::start_with_options(Some(server_config), options).await;

        let config = client_config(&[&rustls::version::TLS13], &cert, None);
        let mut stream = tls_connect(server.addr, config).await.unwrap();
        let hanging = tokio::spawn(async move { http1_get(&mut stream, "/hang").await });
        tokio::time::sleep(Duration::from_millis(100)).await;

        let started = tokio::time::Instant::now();
        server.stop().await;
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        let outcome = hanging.await.unwrap();
        assert!(outcome.is_err(), "{outcome:?}");
    }

    #[tokio::test]
    async fn http2_is_served_when_negotiated() {
        let (_dir, server_config, cert) = server_with_dev_cert(&TlsConfig::default());
        let server = TestServer::start(Some(server_config)).await;

        let mut config = (*client_config(&[&rustls::version::TLS13], &cert, None)).clone();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let mut stream = tls_connect(server.addr, Arc::new(config)).await.unwrap();
        assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));

        // Connection preface, empty SETTINGS, then HEADERS for `GET /version` on stream 1
        // (HPACK: :method GET, :scheme https, literal :path, literal :authority).
        let mut header_block = vec![0x82, 0x87, 0x04, 8];
        header_block.extend_from_slice(b"/version");
        header_block.extend_from_slice(&[0x01, 9]);
        header_block.extend_from_slice(b"localhost");
        let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        out.extend_from_slice(&[0, 0, 0, 0x04, 0, 0, 0, 0, 0]);
        out.extend_from_slice(&(header_block.len() as u32).to_be_bytes()[1..]);
        out.extend_from_slice(&[0x01, 0x05, 0, 0, 0, 1]); // HEADERS, END_STREAM|END_HEADERS
        out.extend_from_slice(&header_block);
        stream.write_all(&out).await.unwrap();
        stream.flush().await.unwrap();

        // Read frames until the response body arrives on stream 1.
        let body = tokio::time::timeout(IO_TIMEOUT, async {
            let mut status_ok = false;
            loop {
                let mut header = [0u8; 9];
                stream.read_exact(&mut header).await.unwrap();
                let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
                let mut payload = vec![0u8; length];
                stream.read_exact(&mut payload).await.unwrap();
                let stream_id = u32::from_be_bytes([header[5], header[6], header[7], header[8]]);
                match (header[3], stream_id) {
                    (0x01, 1) => status_ok = payload.first() == Some(&0x88), // :status 200
                    (0x00, 1) => return (status_ok, payload),
                    _ => {}
                }
            }
        })
        .await
        .expect("no HTTP/2 response");
        assert_eq!(body, (true, b"TLSv1.3".to_vec()));
        // This hand-rolled client would never answer the server's GOAWAY ping; hang up so
        // shutdown need not wait out the drain timeout.
        drop(stream);
        server.stop().await;
    }
}
