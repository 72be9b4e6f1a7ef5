//! The test harness: fresh databases per test on either engine, and `spawn_app`, which
//! starts the real server on port 0 and hands back a client that trusts its dev certificate.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use phr_gateway::config::Config;
use phr_gateway::{Gateway, RunningGateway};
use sqlx::{Executor, Row};

pub use phr_gateway::store::Engine;

/// Where the PostgreSQL test server is; each test gets its own database in it.
pub fn postgres_admin_url() -> String {
    std::env::var("PHR_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// Generates the tests `<name>::sqlite` and `<name>::postgres` from `async fn <name>(Engine)`.
#[macro_export]
macro_rules! both_engines {
    ($($name:ident),+ $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    super::$name($crate::helpers::Engine::Sqlite).await
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    super::$name($crate::helpers::Engine::Postgres).await
                }
            }
        )+
    };
}

/// One test's private database and data directory, removed when dropped.
pub struct TestEnv {
    pub dir: tempfile::TempDir,
    pub database_url: Option<String>,
    pg_database: Option<String>,
}

impl TestEnv {
    pub async fn new(engine: Engine) -> TestEnv {
        let dir = tempfile::tempdir().expect("tempdir");
        let (database_url, pg_database) = match engine {
            Engine::Sqlite => (None, None),
            Engine::Postgres => {
                let name = format!("phr_t_{}", uuid::Uuid::new_v4().simple());
                let admin = postgres_admin_pool().await;
                admin
                    .execute(format!("CREATE DATABASE {name}").as_str())
                    .await
                    .expect("create test database (is PostgreSQL running on 127.0.0.1:5432?)");
                admin.close().await;
                let base = postgres_admin_url();
                let url = match base.rfind('/') {
                    Some(i) => format!("{}/{name}", &base[..i]),
                    None => panic!("bad PHR_TEST_POSTGRES_URL"),
                };
                (Some(url), Some(name))
            }
        };
        TestEnv {
            dir,
            database_url,
            pg_database,
        }
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// A configuration for this environment: port 0, fast checkpoints.
    pub fn config(&self) -> Config {
        let mut config = Config {
            data_dir: self.dir.path().join("data"),
            listen: "127.0.0.1:0".parse().expect("addr"),
            ..Config::default()
        };
        config.database.url = self.database_url.clone();
        config.audit.checkpoint_every_leaves = 10;
        config.audit.checkpoint_interval_secs = 1;
        config.log.format = phr_gateway::config::LogFormat::Pretty;
        // Alert rules run where a test asks for them: alerts are audited, and their records
        // would otherwise show up in other tests' counts of audit leaves.
        config.alerts.evaluate = false;
        // The shipped EOL inventory names a superseded Rust toolchain: tests that count alerts
        // would see it. The vulnerability test turns the check on where it wants it.
        config.alerts.check_end_of_life = false;
        config
    }

    pub fn keys_db(&self) -> PathBuf {
        self.dir.path().join("data").join("keys.db")
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let Some(name) = self.pg_database.take() else {
            return;
        };
        // Drop runs outside async code; a short-lived runtime on its own thread does it.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let admin = postgres_admin_pool().await;
                let _ = admin
                    .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
                    .await;
                admin.close().await;
            });
        })
        .join();
    }
}

async fn postgres_admin_pool() -> sqlx::AnyPool {
    sqlx::any::install_default_drivers();
    sqlx::any::AnyPoolOptions::new()
        .max_connections(1)
        .connect(&postgres_admin_url())
        .await
        .expect("connect to PostgreSQL (is it running on 127.0.0.1:5432?)")
}

/// The password `TestApp::sign_in` gives every account.
pub const PASSWORD: &str = "correct horse battery staple";

/// The current TOTP code for a base32 secret.
pub fn totp_code(secret: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    phr_gateway::mfa::totp::code_at_base32(secret, now).expect("TOTP code")
}

/// The real server, running, and a client for it.
pub struct TestApp {
    /// Keeps the test's database and data directory alive as long as the app.
    _env: TestEnv,
    pub gateway: Option<RunningGateway>,
    pub base: String,
    pub client: reqwest::Client,
}

impl TestApp {
    /// The test's database and data directory (to build a second gateway process on them).
    pub fn env(&self) -> &TestEnv {
        &self._env
    }

    pub fn gateway(&self) -> &RunningGateway {
        self.gateway.as_ref().expect("running")
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Stops the server gracefully; the test's database goes with `self`.
    pub async fn stop(mut self) {
        if let Some(gateway) = self.gateway.take() {
            gateway.stop().await;
        }
    }

    /// Creates an account and signs it in; returns the bearer token. An operator gets a
    /// TOTP secret and proves a code from it, as every operator must.
    pub async fn sign_in(
        &self,
        role: phr_gateway::audit::AccountRole,
        username: &str,
        patient: Option<&str>,
    ) -> String {
        let state = &self.gateway().state;
        let account = state
            .accounts
            .create(role, username, PASSWORD, patient)
            .await
            .expect("create account");
        let totp = match role {
            phr_gateway::audit::AccountRole::Operator => Some(
                state
                    .second_factors
                    .provision_totp(&account)
                    .await
                    .expect("provision TOTP")
                    .secret,
            ),
            phr_gateway::audit::AccountRole::Patient => None,
        };
        self.sign_in_existing(username, totp.as_deref()).await
    }

    /// Signs in an existing account (password, then a TOTP code when a secret is given).
    pub async fn sign_in_existing(&self, username: &str, totp_secret: Option<&str>) -> String {
        let response = self
            .client
            .post(self.url("/auth/login"))
            .json(&serde_json::json!({"username": username, "password": PASSWORD}))
            .send()
            .await
            .expect("login");
        assert_eq!(response.status(), 200);
        let body: serde_json::Value = response.json().await.expect("json");
        let token = body["token"].as_str().expect("token").to_string();
        let Some(secret) = totp_secret else {
            assert_eq!(body["stage"], "complete", "{body}");
            return token;
        };
        assert_eq!(body["stage"], "second-factor", "{body}");
        let code = totp_code(secret);
        let response = self
            .client
            .post(self.url("/auth/second-factor/totp"))
            .bearer_auth(&token)
            .json(&serde_json::json!({"code": code}))
            .send()
            .await
            .expect("second factor");
        assert_eq!(response.status(), 200, "{:?}", response.text().await);
        token
    }
}

pub async fn spawn_app(engine: Engine) -> TestApp {
    spawn_app_with(TestEnv::new(engine).await, |_| {}).await
}

pub async fn spawn_app_with(env: TestEnv, adjust: impl FnOnce(&mut Config)) -> TestApp {
    let mut config = env.config();
    adjust(&mut config);
    let data_dir = config.data_dir.clone();
    let plain = config.insecure_http;
    let gateway = Gateway::build(config)
        .await
        .expect("build gateway")
        .start()
        .await
        .expect("start gateway");
    let port = gateway.addr.port();
    let (client, base) = if plain {
        (reqwest::Client::new(), format!("http://127.0.0.1:{port}"))
    } else {
        (
            client_trusting(&data_dir.join("tls").join("dev-cert.pem")),
            format!("https://localhost:{port}"),
        )
    };
    TestApp {
        _env: env,
        gateway: Some(gateway),
        base,
        client,
    }
}

/// An HTTPS client that trusts only the given certificate.
pub fn client_trusting(cert: &Path) -> reqwest::Client {
    phr_gateway::tls::install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(cert).expect("read dev cert");
    for der in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(der.expect("pem")).expect("add root");
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ));
    let tls = builder
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .build()
        .expect("client")
}

/// Builds a gateway that must fail; returns the error message.
pub async fn build_error(config: Config) -> String {
    match Gateway::build(config).await {
        Ok(_) => panic!("the gateway started but should have refused"),
        Err(e) => e.to_string(),
    }
}

/// The simulated hospital as the gateway's source `hospital`, with the given page size.
pub fn hospital_source(base_url: String, page_size: u32) -> phr_gateway::config::SourceConfig {
    phr_gateway::config::SourceConfig {
        id: "hospital".into(),
        display_name: "テスト病院".into(),
        kind: phr_gateway::config::SourceKind::FhirR4,
        base_url,
        client_id: "phr-gateway".into(),
        page_size: Some(page_size),
        max_concurrent_requests: None,
        auth: Default::default(),
        portal_categories: None,
    }
}

/// Audit leaves whose AuditEvent mentions `needle` (read as text, engine-independent),
/// after sequencing what is pending.
pub async fn leaves_containing(app: &TestApp, needle: &str) -> i64 {
    app.gateway()
        .state
        .audit
        .sequence(false)
        .await
        .expect("sequence");
    let rows = sqlx::query("SELECT body FROM audit_leaves")
        .fetch_all(app.gateway().state.db.read_pool())
        .await
        .expect("leaves");
    rows.iter()
        .filter(|r| String::from_utf8_lossy(&r.get::<Vec<u8>, _>(0)).contains(needle))
        .count() as i64
}

/// The first column of the first row of `sql`, as a count.
pub async fn count(app: &TestApp, sql: &str) -> i64 {
    sqlx::query(sql)
        .fetch_one(app.gateway().state.db.read_pool())
        .await
        .expect(sql)
        .get(0)
}

/// Makes every queued pull due now (instead of waiting for its retry or refresh time).
pub async fn make_due(app: &TestApp) {
    sqlx::query("UPDATE pull_jobs SET not_before = 0 WHERE status = 'queued'")
        .execute(app.gateway().state.db.write_pool())
        .await
        .expect("due now");
}

/// The sources named by the Provenance records (read through the patient's own API) that
/// point at the stored resource `id`.
pub async fn provenance_sources_of(app: &TestApp, token: &str, id: &str) -> Vec<String> {
    let resources = app
        .client
        .get(app.url("/patient/resources"))
        .bearer_auth(token)
        .send()
        .await
        .expect("read")
        .text()
        .await
        .expect("ndjson");
    resources
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|r| r["resourceType"] == "Provenance")
        .filter(|r| {
            r["target"].as_array().is_some_and(|targets| {
                targets.iter().any(|t| {
                    t["reference"]
                        .as_str()
                        .is_some_and(|reference| reference.contains(id))
                })
            })
        })
        .filter_map(|r| {
            r["agent"][0]["who"]["identifier"]["value"]
                .as_str()
                .map(str::to_string)
        })
        .collect()
}

/// A consent as the consent screen records it: `performer` lets `recipient` have
/// `categories` of `patient`'s data for the configured `purposes`, for `days`. Returns the
/// consent id and its receipt.
pub async fn grant_consent(
    app: &TestApp,
    patient: &str,
    performer: phr_consent::Performer,
    recipient: &str,
    purposes: &[&str],
    categories: &[phr_consent::DataCategory],
    days: i64,
) -> (String, String) {
    let state = &app.gateway().state;
    let config = state.consents.config();
    let (consent, receipt) = state
        .consents
        .grant(
            &phr_gateway::audit::Agent::system(),
            phr_gateway::consents::GrantRequest {
                patient_id: patient.into(),
                performer,
                performer_account_id: format!("account-of-{patient}"),
                recipient: phr_consent::Recipient::client(recipient),
                recipient_display: "デモPHRアプリ".into(),
                purposes: purposes
                    .iter()
                    .map(|code| {
                        let p = config.purpose(code).expect("configured purpose");
                        phr_consent::Purpose::new(&p.system, &p.code)
                    })
                    .collect(),
                categories: categories.to_vec(),
                ends_at: time::OffsetDateTime::now_utc() + time::Duration::days(days),
            },
            &phr_gateway::consents::ReceiptContext {
                notice_url: app.url("/consent/notice"),
                language: "ja".into(),
                collection_method: "web-form".into(),
            },
        )
        .await
        .expect("grant");
    (consent.id, receipt)
}

/// `GET path` with the bearer `token`, answered 200 with JSON; returns the JSON.
pub async fn get_json(app: &TestApp, path: &str, token: &str) -> serde_json::Value {
    let response = app
        .client
        .get(app.url(path))
        .bearer_auth(token)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    assert_eq!(response.status(), 200, "GET {path}");
    response.json().await.expect("JSON")
}

/// The gateway's published keys.
pub async fn jwks(app: &TestApp) -> jsonwebtoken::jwk::JwkSet {
    app.client
        .get(app.url("/.well-known/jwks.json"))
        .send()
        .await
        .expect("jwks")
        .json()
        .await
        .expect("jwk set")
}

/// The claims of a signed receipt (EdDSA), checked against the key its `kid` names in the
/// gateway's JWKS.
pub async fn receipt_claims(app: &TestApp, receipt: &str) -> serde_json::Value {
    let jwks = jwks(app).await;
    let header = jsonwebtoken::decode_header(receipt).expect("jws header");
    let jwk = jwks
        .find(header.kid.as_deref().expect("kid"))
        .expect("key in jwks");
    let key = jsonwebtoken::DecodingKey::from_jwk(jwk).expect("key");
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::EdDSA);
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    jsonwebtoken::decode::<serde_json::Value>(receipt, &key, &validation)
        .expect("valid signature")
        .claims
}

/// A valid hc08 特定健診 document as the portal simulator makes them (its person 1).
pub fn portal_checkup_document() -> String {
    use phr_adapters::self_info::simulator::{SimulatorConfig, SimulatorHandle};
    use phr_adapters::self_info::Category;
    let jwk = phr_adapters::fhir_r4::BackendKey::generate_es384().public_jwk();
    let portal = SimulatorHandle::new(
        SimulatorConfig::new("phr-gateway", jwk),
        "http://127.0.0.1:1",
    );
    let person = portal.person(1).expect("person");
    portal
        .records(&person.subject)
        .into_iter()
        .filter(|(category, _, _, entered_in_error)| {
            *category == Category::SpecificCheckup && !entered_in_error
        })
        .find_map(|(_, id, ..)| portal.checkup_document(&person.subject, &id))
        .expect("a checkup document")
}

/// Every audit event recorded so far (sequenced first), oldest first, as parsed JSON.
pub async fn audit_events(app: &TestApp) -> Vec<serde_json::Value> {
    use sqlx::Row;
    let state = &app.gateway().state;
    state.audit.sequence(true).await.expect("sequence");
    let rows = sqlx::query("SELECT body FROM audit_leaves ORDER BY id")
        .fetch_all(state.db.read_pool())
        .await
        .expect("leaves");
    rows.iter()
        .map(|row| serde_json::from_slice(&row.get::<Vec<u8>, _>(0)).expect("json"))
        .collect()
}

/// POSTs JSON (with a bearer token when given); the status and the JSON answer (`Null` when
/// the body is empty or not JSON).
pub async fn post_json(
    app: &TestApp,
    path: &str,
    token: Option<&str>,
    body: serde_json::Value,
) -> (reqwest::StatusCode, serde_json::Value) {
    let mut request = app.client.post(app.url(path)).json(&body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("request");
    let status = response.status();
    let bytes = response.bytes().await.expect("body");
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    )
}

/// The patient's Observation number `n` from the source "hospital" (source id `obs-{n}`,
/// its value `n` kg, its subject the hospital's patient), for seeding the store directly.
pub fn numbered_observation(patient: &str, n: usize) -> phr_gateway::store::resources::NewResource {
    use phr_gateway::store::resources::{NewResource, SourceIdentity};
    NewResource {
        patient_id: patient.into(),
        category: "observations".into(),
        source: SourceIdentity {
            source: "hospital".into(),
            resource_type: "Observation".into(),
            source_resource_id: format!("obs-{n}"),
            version_id: Some("1".into()),
        },
        body: serde_json::json!({
            "resourceType": "Observation",
            "id": format!("obs-{n}"),
            "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7"}]},
            "subject": {"reference": "Patient/hosp-1"},
            "valueQuantity": {"value": n, "unit": "kg"}
        })
        .to_string()
        .into_bytes(),
    }
}
