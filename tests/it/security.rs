//! Secure defaults end to end: TLS versions and suites, key files, plain HTTP only on
//! loopback and audited.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use phr_gateway::Gateway;
use rustls::pki_types::ServerName;
use sqlx::Row;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{build_error, spawn_app, spawn_app_with, Engine, TestEnv};

fn client_config(
    cert: &std::path::Path,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(cert).expect("cert");
    for der in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(der.expect("pem")).expect("root");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(versions)
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    Arc::new(config)
}

/// Connects with the given versions; returns the negotiated version and suite.
async fn handshake(
    port: u16,
    cert: &std::path::Path,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> std::io::Result<(rustls::ProtocolVersion, rustls::CipherSuite)> {
    let connector = tokio_rustls::TlsConnector::from(client_config(cert, versions));
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    let name = ServerName::try_from("localhost").expect("name");
    let mut tls = connector.connect(name, tcp).await?;
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await?;
    let mut response = Vec::new();
    tls.read_to_end(&mut response).await?;
    assert!(String::from_utf8_lossy(&response).starts_with("HTTP/1.1 200"));
    let (_, session) = tls.get_ref();
    Ok((
        session.protocol_version().expect("version"),
        session.negotiated_cipher_suite().expect("suite").suite(),
    ))
}

#[tokio::test]
async fn tls13_by_default_and_tls12_only_with_ecdhe_aead() {
    let app = spawn_app(Engine::Sqlite).await;
    let port = app.gateway().addr.port();
    let cert = app.gateway().state.config.data_dir.join("tls/dev-cert.pem");
    let (version, _) = handshake(
        port,
        &cert,
        &[&rustls::version::TLS13, &rustls::version::TLS12],
    )
    .await
    .expect("TLS 1.3");
    assert_eq!(version, rustls::ProtocolVersion::TLSv1_3);
    let (version, suite) = handshake(port, &cert, &[&rustls::version::TLS12])
        .await
        .expect("TLS 1.2");
    assert_eq!(version, rustls::ProtocolVersion::TLSv1_2);
    let name = format!("{suite:?}");
    assert!(
        name.contains("ECDHE") && (name.contains("GCM") || name.contains("CHACHA20")),
        "{name}"
    );
    app.stop().await;
}

#[tokio::test]
async fn min_version_13_refuses_a_tls12_handshake() {
    let env = TestEnv::new(Engine::Sqlite).await;
    let app = spawn_app_with(env, |c| {
        c.tls.min_version = phr_gateway::tls::TlsVersion::V1_3
    })
    .await;
    let port = app.gateway().addr.port();
    let cert = app.gateway().state.config.data_dir.join("tls/dev-cert.pem");
    assert!(handshake(port, &cert, &[&rustls::version::TLS12])
        .await
        .is_err());
    let (version, _) = handshake(port, &cert, &[&rustls::version::TLS13])
        .await
        .expect("1.3 still works");
    assert_eq!(version, rustls::ProtocolVersion::TLSv1_3);
    app.stop().await;
}

#[tokio::test]
async fn key_files_are_private_and_loose_ones_refuse_start() {
    let env = TestEnv::new(Engine::Sqlite).await;
    let config = env.config();
    drop(Gateway::build(config.clone()).await.expect("first start"));
    for path in [
        config.kek_path(),
        config.audit_signing_key_path(),
        config.receipt_signing_key_path(),
        config.source_client_key_path(),
        config.data_dir.join("tls/dev-key.pem"),
    ] {
        let mode = std::fs::metadata(&path)
            .expect("key file")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{}", path.display());
    }
    for path in [
        config.kek_path(),
        config.audit_signing_key_path(),
        config.source_client_key_path(),
    ] {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        let err = build_error(config.clone()).await;
        assert!(
            err.contains(&path.display().to_string()) && err.contains("0640"),
            "{err}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .expect("chmod back");
    }
    Gateway::build(config)
        .await
        .expect("starts again once fixed");
}

#[tokio::test]
async fn a_different_kek_cannot_read_existing_data() {
    let env = TestEnv::new(Engine::Sqlite).await;
    let config = env.config();
    let gateway = Gateway::build(config.clone()).await.expect("build");
    let body = br#"{"resourceType":"Observation","status":"final"}"#.to_vec();
    let (meta, _) = gateway
        .state
        .resources
        .put(
            &phr_gateway::audit::Agent::system(),
            phr_gateway::store::resources::NewResource {
                patient_id: "p1".into(),
                category: "checkup".into(),
                source: phr_gateway::store::resources::SourceIdentity {
                    source: "h".into(),
                    resource_type: "Observation".into(),
                    source_resource_id: "o".into(),
                    version_id: None,
                },
                body,
            },
        )
        .await
        .expect("put");
    gateway.state.db.close().await;
    // Someone swaps in another key-encryption key (supplied by config).
    let other = env.data_dir().join("other-kek.key");
    std::fs::write(&other, format!("{}\n", "ab".repeat(32))).expect("write");
    std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let mut swapped = config;
    swapped.keys.kek_file = Some(other);
    let gateway = Gateway::build(swapped).await.expect("build with other KEK");
    let err = gateway
        .state
        .resources
        .read("p1", &meta.id)
        .await
        .expect_err("must fail");
    // The key store names the KEK that wrapped the key, so the mismatch is said plainly.
    assert!(
        matches!(err, phr_gateway::Error::KekMismatch { .. }),
        "{err}"
    );
}

#[tokio::test]
async fn plain_http_only_on_loopback_and_it_is_audited() {
    let env = TestEnv::new(Engine::Sqlite).await;
    let mut public = env.config();
    public.insecure_http = true;
    public.listen = "0.0.0.0:0".parse().expect("addr");
    let err = build_error(public).await;
    assert!(
        err.contains("insecure_http") && err.contains("loopback"),
        "{err}"
    );

    let app = spawn_app_with(env, |c| c.insecure_http = true).await;
    let url = format!("http://127.0.0.1:{}/healthz", app.gateway().addr.port());
    let response = reqwest::Client::new()
        .get(url)
        .send()
        .await
        .expect("plain http");
    assert_eq!(response.status(), 200);
    assert!(!response.headers().contains_key("strict-transport-security"));
    let rows = sqlx::query("SELECT body FROM audit_leaves")
        .fetch_all(app.gateway().state.db.read_pool())
        .await
        .expect("leaves");
    let weakened = rows
        .iter()
        .filter(|r| {
            String::from_utf8_lossy(&r.get::<Vec<u8>, _>(0))
                .contains("security setting weakened: insecure_http")
        })
        .count();
    assert_eq!(weakened, 1);
    app.stop().await;
}

#[tokio::test]
async fn unreachable_database_stops_start_with_a_clear_error() {
    let env = TestEnv::new(Engine::Sqlite).await;
    let mut config = env.config();
    config.database.url = Some("postgres://postgres@127.0.0.1:1/none".into());
    config.database.connect_timeout_secs = 2;
    let err = build_error(config).await;
    assert!(err.starts_with("database"), "{err}");

    let mut config = env.config();
    config.database.url = Some("sqlite:///nonexistent-dir/deeper/gateway.db?mode=rwc".into());
    let err = build_error(config).await;
    assert!(err.starts_with("database"), "{err}");
}
