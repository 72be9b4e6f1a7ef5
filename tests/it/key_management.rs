//! Key management end to end: KEK escrow and recovery, the KEK provider interface and the
//! KEK ids the key store records, the audit signing key's rotation (every old checkpoint
//! still verifies; the transition is in the log under the old key), the ID-token key's
//! rotation with overlap in the JWKS, and the TLS certificate swapped under live traffic.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use age::secrecy::ExposeSecret;
use phr_gateway::audit::keyring::{history_path, VerifierRing};
use phr_gateway::audit::verify::{verify, Tamper, VerifyError};
use phr_gateway::audit::Agent;
use phr_gateway::crypto::{escrow, FileKek, KekProvider};
use phr_gateway::keystore::KeyStore;
use phr_gateway::oauth::jws_keys;
use phr_gateway::store::resources::ResourceStore;
use phr_gateway::{Error, Gateway};
use rustls::pki_types::ServerName;
use sqlx::Row;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::both_engines;
use crate::helpers::{
    leaves_containing, numbered_observation, spawn_app, spawn_app_with, Engine, TestEnv,
};

both_engines!(
    a_lost_kek_is_recovered_from_escrow_and_the_data_reads_again,
    kek_ids_are_recorded_and_a_mixed_state_is_named,
    the_audit_key_rotates_and_every_checkpoint_still_verifies,
);

async fn put(resources: &ResourceStore, patient: &str, n: usize) -> String {
    resources
        .put(&Agent::system(), numbered_observation(patient, n))
        .await
        .expect("store")
        .0
        .id
}

async fn a_lost_kek_is_recovered_from_escrow_and_the_data_reads_again(engine: Engine) {
    let (institution, operator, stranger) = (
        age::x25519::Identity::generate(),
        age::x25519::Identity::generate(),
        age::x25519::Identity::generate(),
    );
    let env = TestEnv::new(engine).await;
    let recipients = vec![
        institution.to_public().to_string(),
        operator.to_public().to_string(),
    ];
    let app = spawn_app_with(env, |c| c.keys.escrow_recipients = recipients).await;
    let state = &app.gateway().state;
    let ids = [
        put(&state.resources, "p-escrow", 0).await,
        put(&state.resources, "p-escrow", 1).await,
    ];
    let config = app.env().config();
    let kek_path = config.kek_path();
    let kek_id = state.keys.kek_id().to_string();
    let out = app.env().data_dir().join("offsite/kek.escrow");
    let escrowed = escrow::escrow_kek(&state.config, &state.audit, &state.db, Some(out.clone()))
        .await
        .expect("escrow");
    assert_eq!(escrowed.kek_id, kek_id);
    assert_eq!(escrowed.recipients, 2);
    assert_eq!(
        leaves_containing(&app, &format!("{kek_id} escrowed")).await,
        1
    );
    let text = std::fs::read_to_string(&out).expect("escrow file");
    assert!(!text.contains(
        &std::fs::read_to_string(&kek_path)
            .expect("kek")
            .trim()
            .to_string()
    ));
    let ring = app.gateway().state.audit.verifiers();
    let app_config = app.env().config();
    // Stop the gateway, keep its data directory.
    let mut app = app;
    app.gateway.take().expect("running").stop().await;

    // Disaster: the KEK file is gone.
    std::fs::remove_file(&kek_path).expect("lose the KEK");
    let file = escrow::EscrowFile::parse(&text).expect("parse");
    assert_eq!(file.header.kek_id, kek_id);
    assert!(escrow::check_signature(&file, Some(&ring)).expect("signed by the audit key"));
    let wrong = file
        .open(stranger.to_string().expose_secret())
        .expect_err("a stranger's identity");
    assert!(
        wrong
            .to_string()
            .contains("not one of the escrow's recipients"),
        "{wrong}"
    );
    // Either recipient alone recovers it.
    let kek = file
        .open(operator.to_string().expose_secret())
        .expect("the operator's identity");
    assert_eq!(
        file.open(institution.to_string().expose_secret())
            .expect("the institution's identity")
            .as_slice(),
        kek.as_slice()
    );
    assert_eq!(
        escrow::install(&kek_path, &kek, false, 1).expect("install"),
        escrow::Recovered::Written
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&kek_path)
        .expect("kek")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);

    let again = Gateway::build(app_config)
        .await
        .expect("starts with the recovered KEK");
    assert_eq!(again.state.keys.kek_id(), kek_id);
    for id in &ids {
        let stored = again
            .state
            .resources
            .read("p-escrow", id)
            .await
            .expect("readable after recovery");
        assert!(String::from_utf8_lossy(&stored.body).contains("Observation"));
    }
    again.state.db.close().await;
    drop(app);
}

/// A provider that counts what it is asked: the key store must go through it for every
/// wrap and unwrap (it is all the gateway knows of an HSM or KMS).
struct CountingKek {
    inner: FileKek,
    wraps: AtomicUsize,
    unwraps: AtomicUsize,
}

impl KekProvider for CountingKek {
    fn key_id(&self) -> &str {
        "test-double:1"
    }
    fn wrap(&self, patient_id: &str, data_key: &[u8]) -> phr_gateway::Result<Vec<u8>> {
        self.wraps.fetch_add(1, Ordering::SeqCst);
        self.inner.wrap(patient_id, data_key)
    }
    fn unwrap(
        &self,
        patient_id: &str,
        wrapped: &[u8],
    ) -> phr_gateway::Result<zeroize::Zeroizing<Vec<u8>>> {
        self.unwraps.fetch_add(1, Ordering::SeqCst);
        self.inner.unwrap(patient_id, wrapped)
    }
}

async fn kek_ids_are_recorded_and_a_mixed_state_is_named(engine: Engine) {
    let app = spawn_app(engine).await;
    let state = &app.gateway().state;
    put(&state.resources, "p-file", 0).await;
    let file_id = state.keys.kek_id().to_string();
    assert!(file_id.starts_with("file:"), "{file_id}");
    assert_eq!(
        state.keys.kek_ids().await.expect("ids"),
        vec![(Some(file_id.clone()), 1)]
    );

    // Another provider on the same key store: only it is asked, and it is named per key.
    let config = app.env().config();
    let double = Arc::new(CountingKek {
        inner: FileKek::from_bytes(&[7u8; 32]).expect("kek"),
        wraps: AtomicUsize::new(0),
        unwraps: AtomicUsize::new(0),
    });
    let keys = KeyStore::open_with(&config, &config.database_url(), double.clone())
        .await
        .expect("key store");
    let resources = ResourceStore::new(state.db.clone(), keys.clone(), 1 << 20);
    let id = put(&resources, "p-double", 0).await;
    resources.read("p-double", &id).await.expect("read");
    assert_eq!(double.wraps.load(Ordering::SeqCst), 1);
    assert!(double.unwraps.load(Ordering::SeqCst) >= 1);

    // The mixed state is explicit: two KEK ids, and each side names the other's key.
    let mut ids = keys.kek_ids().await.expect("ids");
    ids.sort();
    assert_eq!(
        ids,
        vec![
            (Some(file_id.clone()), 1),
            (Some("test-double:1".to_string()), 1)
        ]
    );
    let err = state
        .resources
        .read("p-double", &id)
        .await
        .expect_err("the file KEK does not hold this key");
    match err {
        Error::KekMismatch { wrapped_by, held } => {
            assert_eq!(wrapped_by, "test-double:1");
            assert_eq!(held, file_id);
        }
        other => panic!("expected a KEK mismatch, got {other}"),
    }
    keys.close().await;
    app.stop().await;
}

async fn the_audit_key_rotates_and_every_checkpoint_still_verifies(engine: Engine) {
    let app = spawn_app(engine).await;
    put(&app.gateway().state.resources, "p-audit", 0).await;
    let old_verifier = app.gateway().state.audit.verifier();
    let config = app.env().config();
    app.gateway().state.audit.sequence(true).await.expect("seq");
    let before: Vec<(i64, String)> =
        sqlx::query("SELECT tree_size, note FROM audit_checkpoints ORDER BY tree_size")
            .fetch_all(app.gateway().state.db.read_pool())
            .await
            .expect("checkpoints")
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
    assert!(!before.is_empty());
    // Rotation needs every gateway process on the log stopped.
    let env_config = config.clone();
    let mut app = app;
    app.gateway.take().expect("running").stop().await;

    let rotated = phr_gateway::audit::key_rotation::rotate(&env_config)
        .await
        .expect("rotate");
    assert_eq!(rotated.retired, old_verifier.verifier_key());
    assert_ne!(rotated.current, rotated.retired);

    let gateway = Gateway::build(env_config.clone())
        .await
        .expect("starts with the new key");
    let audit = gateway.state.audit.clone();
    assert_eq!(audit.verifier_key(), rotated.current);
    put(&gateway.state.resources, "p-audit", 1).await;
    audit.sequence(true).await.expect("seq");
    let report = verify(audit.database(), audit.verifiers(), audit.origin(), None)
        .await
        .expect("verifies across the rotation");
    assert!(report.latest_checkpoint.expect("latest") > rotated.last_size);
    // Old checkpoints are unchanged and still verify with the retired key.
    for (size, note) in &before {
        old_verifier.verify(note).expect("old checkpoint, old key");
        assert!(*size as u64 <= rotated.last_size);
    }
    let transition: String = {
        let body: Vec<u8> = sqlx::query("SELECT body FROM audit_leaves WHERE tree_index = $1")
            .bind(rotated.transition_leaf as i64)
            .fetch_one(audit.database().read_pool())
            .await
            .expect("transition leaf")
            .get(0);
        String::from_utf8_lossy(&body).into_owned()
    };
    assert!(transition.contains("audit signing key transition"));
    assert!(transition.contains(&rotated.current));

    // Without the retired key the old checkpoints are refused.
    match verify(audit.database(), audit.verifier(), audit.origin(), None).await {
        Err(VerifyError::Tamper(Tamper::CheckpointSignature { size, .. })) => {
            assert!(size <= rotated.last_size)
        }
        other => panic!("expected a signature failure, got {other:?}"),
    }
    // A history that points at a leaf that does not name the new key is refused.
    let history = history_path(&env_config.audit_signing_key_path());
    let text = std::fs::read_to_string(&history).expect("history");
    let forged = text.replacen(
        &format!(" {} ", rotated.transition_leaf),
        &format!(" {} ", rotated.transition_leaf - 1),
        1,
    );
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::write(dir.path().join("h"), forged).expect("write");
    let ring = VerifierRing::load(&dir.path().join("h"), audit.verifier()).expect("ring");
    match verify(audit.database(), &ring, audit.origin(), None).await {
        Err(VerifyError::Tamper(Tamper::KeyTransition { size, .. })) => {
            assert_eq!(size, rotated.last_size)
        }
        other => panic!("expected a key transition failure, got {other:?}"),
    }
    gateway.state.db.close().await;
    drop(app);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_token_signed_before_rotation_verifies_during_the_overlap_only() {
    let app = spawn_app(Engine::Sqlite).await;
    let state = &app.gateway().state;
    let jwks = |app: &crate::helpers::TestApp| {
        let request = app.client.get(app.url("/.well-known/jwks.json"));
        async move {
            let body: serde_json::Value = request
                .send()
                .await
                .expect("jwks")
                .json()
                .await
                .expect("json");
            body["keys"].as_array().expect("keys").clone()
        }
    };
    let before = state
        .id_token_keys
        .sign(&serde_json::json!({"sub": "p1"}))
        .expect("sign");
    let old_kid = state.id_token_keys.current_kid().expect("kid");
    assert!(jws_keys::verify_with_jwks(&before, &jwks(&app).await).is_ok());

    let path = app.env().config().id_token_key_path();
    let now = jws_keys::now_secs();
    let rotated = jws_keys::rotate(&path, 3600, now).expect("rotate");
    assert_eq!(rotated.old_kid, old_kid);
    let reloaded = app.gateway().reload_keys().await.expect("reload");
    assert_eq!(reloaded.id_token_kid, rotated.new_kid);
    let after = state
        .id_token_keys
        .sign(&serde_json::json!({"sub": "p2"}))
        .expect("sign");
    let published = jwks(&app).await;
    let kids: Vec<&str> = published.iter().filter_map(|k| k["kid"].as_str()).collect();
    assert!(kids.contains(&old_kid.as_str()) && kids.contains(&rotated.new_kid.as_str()));
    assert_eq!(
        jws_keys::verify_with_jwks(&before, &published).expect("old token")["sub"],
        "p1"
    );
    assert_eq!(
        jws_keys::verify_with_jwks(&after, &published).expect("new token")["sub"],
        "p2"
    );
    assert_eq!(
        leaves_containing(
            &app,
            &format!("ID token signing key now {}", rotated.new_kid)
        )
        .await,
        1
    );

    // The overlap ends: the old key leaves the JWKS and its tokens are refused.
    let retired = state
        .id_token_keys
        .reload(rotated.retires_at)
        .expect("reload at the end of the overlap");
    assert_eq!(retired, vec![old_kid.clone()]);
    let published = jwks(&app).await;
    assert!(!published.iter().any(|k| k["kid"] == old_kid.as_str()));
    assert!(jws_keys::verify_with_jwks(&before, &published)
        .expect_err("refused")
        .contains(&old_kid));
    assert!(jws_keys::verify_with_jwks(&after, &published).is_ok());
    app.stop().await;
}

fn certificate(dir: &std::path::Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let cert = params.self_signed(&key).expect("cert");
    let (cert_path, key_path) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&cert_path, cert.pem()).expect("cert");
    std::fs::write(&key_path, key.serialize_pem()).expect("key");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    (cert_path, key_path)
}

fn client_trusting(certs: &[&std::path::Path]) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs {
        let pem = std::fs::read(cert).expect("cert");
        for der in rustls_pemfile::certs(&mut pem.as_slice()) {
            roots.add(der.expect("pem")).expect("root");
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    // Every connection a full handshake: a resumed session carries on with the certificate
    // of the session it resumes.
    let mut config = config;
    config.resumption = rustls::client::Resumption::disabled();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

async fn connect(connector: &tokio_rustls::TlsConnector, port: u16) -> Tls {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("tcp");
    connector
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("handshake")
}

/// The leaf the server presented on this connection.
fn served(tls: &Tls) -> Vec<u8> {
    tls.get_ref().1.peer_certificates().expect("certs")[0]
        .as_ref()
        .to_vec()
}

fn pem_der(path: &std::path::Path) -> Vec<u8> {
    let pem = std::fs::read(path).expect("pem");
    let der = rustls_pemfile::certs(&mut pem.as_slice())
        .next()
        .expect("one")
        .expect("der");
    der.as_ref().to_vec()
}

/// One keep-alive request on an open connection; the response must be a 200.
async fn healthz(tls: &mut Tls) {
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .expect("write");
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tls.read(&mut buf).await.expect("read");
        assert!(n > 0, "connection closed");
        response.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&response);
        if let Some(head_end) = text.find("\r\n\r\n") {
            let length = text[..head_end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                })
                .unwrap_or(0);
            if response.len() >= head_end + 4 + length {
                break;
            }
        }
    }
    assert!(String::from_utf8_lossy(&response).starts_with("HTTP/1.1 200"));
}

/// Audit leaves mentioning `needle`, after sequencing.
async fn leaves_with(state: &phr_gateway::http::AppState, needle: &str) -> usize {
    state.audit.sequence(false).await.expect("sequence");
    sqlx::query("SELECT body FROM audit_leaves")
        .fetch_all(state.db.read_pool())
        .await
        .expect("leaves")
        .iter()
        .filter(|r| String::from_utf8_lossy(&r.get::<Vec<u8>, _>(0)).contains(needle))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_tls_certificate_is_served_to_new_handshakes_without_a_restart() {
    let certs = tempfile::tempdir().expect("tmp");
    let (a_cert, a_key) = certificate(certs.path(), "first");
    let (b_cert, b_key) = certificate(certs.path(), "second");
    let live_cert = certs.path().join("live.pem");
    let live_key = certs.path().join("live.key");
    std::fs::copy(&a_cert, &live_cert).expect("copy");
    std::fs::copy(&a_key, &live_key).expect("copy");
    let env = TestEnv::new(Engine::Sqlite).await;
    let mut config = env.config();
    config.tls.cert_file = Some(live_cert.clone());
    config.tls.key_file = Some(live_key.clone());
    let running = Gateway::build(config)
        .await
        .expect("build")
        .start()
        .await
        .expect("start");
    let port = running.addr.port();
    let connector = client_trusting(&[&a_cert, &b_cert]);
    let mut open = connect(&connector, port).await;
    healthz(&mut open).await;
    assert_eq!(served(&open), pem_der(&a_cert));

    // Renewal: new files in place, then the trigger (SIGHUP runs the same).
    std::fs::copy(&b_cert, &live_cert).expect("renew cert");
    std::fs::copy(&b_key, &live_key).expect("renew key");
    let reloaded = running.reload_keys().await.expect("reload");
    let fingerprint = reloaded.tls_fingerprint.expect("tls").expect("loaded");
    use sha2::Digest;
    assert_eq!(
        fingerprint,
        hex::encode(sha2::Sha256::digest(pem_der(&b_cert)))
    );

    let fresh = connect(&connector, port).await;
    assert_eq!(
        served(&fresh),
        pem_der(&b_cert),
        "new handshakes get the new certificate"
    );
    healthz(&mut open).await;
    assert_eq!(
        served(&open),
        pem_der(&a_cert),
        "the open connection keeps working"
    );

    // A broken renewal (key of another certificate) is refused and audited; B still serves.
    std::fs::copy(&a_key, &live_key).expect("mismatched key");
    let refused = running.reload_keys().await.expect("reload");
    let reason = refused.tls_fingerprint.expect("tls").expect_err("refused");
    assert!(reason.contains("does not belong"), "{reason}");
    let still = connect(&connector, port).await;
    assert_eq!(served(&still), pem_der(&b_cert));
    assert_eq!(
        leaves_with(&running.state, "TLS certificate reloaded").await,
        1
    );
    assert_eq!(
        leaves_with(&running.state, "TLS certificate reload refused").await,
        1
    );
    drop((open, fresh, still));
    running.stop().await;
    drop(env);
}

/// SoftHSM2 with one token, in a temporary directory.
struct SoftHsm {
    dir: tempfile::TempDir,
    token: String,
}

const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

impl SoftHsm {
    fn new() -> SoftHsm {
        let dir = tempfile::tempdir().expect("tmp");
        let tokens = dir.path().join("tokens");
        std::fs::create_dir(&tokens).expect("tokens");
        let conf = dir.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .expect("conf");
        // The module reads it when first initialised in this process; only this test uses it.
        std::env::set_var("SOFTHSM2_CONF", &conf);
        let token = "phr-test".to_string();
        let init = std::process::Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", &conf)
            .args(["--init-token", "--free", "--label", &token])
            .args(["--so-pin", "12345678", "--pin", "87654321"])
            .output()
            .expect("softhsm2-util (apt package softhsm2; .ci/run installs it)");
        assert!(
            init.status.success(),
            "{}",
            String::from_utf8_lossy(&init.stderr)
        );
        SoftHsm { dir, token }
    }

    fn config(&self, key_label: &str, pin: &str) -> phr_gateway::config::Pkcs11Config {
        use std::os::unix::fs::PermissionsExt;
        let pin_file = self.dir.path().join(format!("pin-{pin}"));
        std::fs::write(&pin_file, format!("{pin}\n")).expect("pin");
        std::fs::set_permissions(&pin_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        phr_gateway::config::Pkcs11Config {
            module: SOFTHSM_MODULE.into(),
            token_label: self.token.clone(),
            pin_file,
            key_label: key_label.into(),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kek_on_a_pkcs11_token_wraps_data_keys_and_never_leaves_it() {
    let hsm = SoftHsm::new();
    // A wrong PIN first, while nothing in this process is logged in to the token.
    let env = TestEnv::new(Engine::Sqlite).await;
    let mut config = env.config();
    config.keys.pkcs11 = Some(hsm.config("kek-refused", "00000000"));
    let refused = crate::helpers::build_error(config).await;
    assert!(
        refused.contains("keys.pkcs11.pin_file") && refused.contains("login"),
        "{refused}"
    );

    for engine in [Engine::Sqlite, Engine::Postgres] {
        let label = format!("kek-{engine:?}");
        let token_config = hsm.config(&label, "87654321");
        let env = TestEnv::new(engine).await;
        let setting = token_config.clone();
        let app = spawn_app_with(env, move |c| c.keys.pkcs11 = Some(setting)).await;
        let state = &app.gateway().state;
        let kek_id = state.keys.kek_id().to_string();
        assert!(
            kek_id.starts_with(&format!("pkcs11:phr-test/{label}/")),
            "{kek_id}"
        );
        let id = put(&state.resources, "p-hsm", 0).await;
        state.resources.read("p-hsm", &id).await.expect("read");
        let config = app.env().config();
        assert!(
            !config.kek_path().exists(),
            "no KEK file when the KEK is on a token"
        );
        assert_eq!(
            leaves_containing(&app, "key-encryption key generated").await,
            1,
            "the key generated on the token is audited"
        );
        let rows = state.keys.kek_ids().await.expect("ids");
        assert_eq!(rows, vec![(Some(kek_id.clone()), 1)]);

        // The key on the token cannot be read out, and file escrow refuses it plainly.
        let opened = phr_gateway::crypto::pkcs11::Pkcs11Kek::open(&token_config).expect("open");
        assert!(!opened.created, "found again, not generated twice");
        assert!(!opened.kek.extractable().expect("attributes"));
        let mut escrow_config = state.config.as_ref().clone();
        escrow_config.keys.escrow_recipients =
            vec![age::x25519::Identity::generate().to_public().to_string()];
        let err = escrow::escrow_kek(&escrow_config, &state.audit, &state.db, None)
            .await
            .expect_err("no file escrow of a token key");
        assert!(err.to_string().contains("PKCS#11"), "{err}");

        // Another gateway on the same token reads what the first wrote.
        let mut second_config = config.clone();
        second_config.keys.pkcs11 = Some(token_config.clone());
        let second = Gateway::build(second_config).await.expect("second gateway");
        let stored = second
            .state
            .resources
            .read("p-hsm", &id)
            .await
            .expect("read");
        assert!(String::from_utf8_lossy(&stored.body).contains("Observation"));
        second.state.db.close().await;
        app.stop().await;
    }
}
