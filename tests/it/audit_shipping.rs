//! Audit shipping on both engines: leaves and signed checkpoints reach the sink, `verify
//! --against` catches a rewritten live log and a sink that lied about storing, the gateway
//! keeps serving while the sink is down and backfills after, and on S3 with Object Lock
//! (a local S3-compatible server) the gateway's own credentials cannot destroy the copy.

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use phr_gateway::audit::merkle;
use phr_gateway::audit::shipping::against::{
    verify_against, AgainstError, AgainstReport, Divergence,
};
use phr_gateway::audit::shipping::{
    leaf_key, status, AuditSink, LocalSink, PutOutcome, S3Sink, Shipper,
};
use phr_gateway::audit::{Agent, AuditEvent, EventKind};
use phr_gateway::config::{Config, Secret, SinkKind};
use phr_gateway::error::{Error, Result};
use phr_gateway::{Gateway, RunningGateway};
use sqlx::Row;

use crate::both_engines;
use crate::helpers::{client_trusting, spawn_app_with, Engine, TestApp, TestEnv};

both_engines!(
    ships_to_a_local_directory_and_catches_a_rewrite,
    a_sink_that_stores_nothing_is_caught,
    sink_down_buffers_alerts_and_backfills,
    metrics_show_the_lag_of_a_blocked_directory_until_it_clears,
    reshipping_after_a_crash_is_idempotent_and_a_foreign_object_is_refused,
    s3_object_lock_keeps_the_copy_from_the_gateways_own_credentials,
);

/// Fast shipping for tests.
fn config(env: &TestEnv) -> Config {
    let mut config = env.config();
    config.audit_shipping.poll_millis = 50;
    config.audit_shipping.max_backoff_secs = 1;
    config
}

async fn start(config: Config, sink: Option<Arc<dyn AuditSink>>) -> RunningGateway {
    let mut gateway = Gateway::build(config).await.expect("build");
    if let Some(sink) = sink {
        gateway = gateway.with_audit_sink(sink);
    }
    gateway.start().await.expect("start")
}

async fn record_reads(gateway: &RunningGateway, n: usize) {
    for i in 0..n {
        let event = AuditEvent::new(EventKind::Read, Agent::system())
            .patient(format!("p{i}"))
            .resource(format!("Observation/o{i}"));
        gateway
            .state
            .audit
            .record_now(&event)
            .await
            .expect("record");
    }
}

/// Sequences and signs what is pending, then ships it all (the background shipper may
/// also be at it; shipping is idempotent).
async fn sequence_and_ship(gateway: &RunningGateway) {
    gateway.state.audit.sequence(true).await.expect("sequence");
    shipper(gateway).ship_once().await.expect("ship");
}

fn shipper(gateway: &RunningGateway) -> &phr_gateway::audit::shipping::Shipper {
    gateway.shipper.as_ref().expect("shipping enabled")
}

async fn against(
    gateway: &RunningGateway,
    sink: &dyn AuditSink,
) -> std::result::Result<AgainstReport, AgainstError> {
    let audit = &gateway.state.audit;
    verify_against(audit.database(), &audit.verifier(), audit.origin(), sink).await
}

fn divergence(result: std::result::Result<AgainstReport, AgainstError>) -> Divergence {
    match result {
        Err(AgainstError::Divergence(d)) => d,
        other => panic!("expected a divergence from the shipped copy, got {other:?}"),
    }
}

async fn tree_size(gateway: &RunningGateway) -> u64 {
    sqlx::query("SELECT COUNT(*) FROM audit_leaves WHERE tree_index IS NOT NULL")
        .fetch_one(gateway.state.db.read_pool())
        .await
        .expect("count")
        .get::<i64, _>(0) as u64
}

/// Audit leaves mentioning `needle`.
async fn leaves_mentioning(gateway: &RunningGateway, needle: &str) -> usize {
    sqlx::query("SELECT body FROM audit_leaves")
        .fetch_all(gateway.state.db.read_pool())
        .await
        .expect("leaves")
        .iter()
        .filter(|r| String::from_utf8_lossy(&r.get::<Vec<u8>, _>(0)).contains(needle))
        .count()
}

/// Rewrites leaf `index` consistently (bytes and leaf hash), as an attacker with database
/// access would, so only a copy kept elsewhere can tell.
async fn rewrite_leaf(gateway: &RunningGateway, index: i64) {
    let body = br#"{"resourceType":"AuditEvent","rewritten":true}"#.to_vec();
    sqlx::query("UPDATE audit_leaves SET body = $1, leaf_hash = $2 WHERE tree_index = $3")
        .bind(body.clone())
        .bind(merkle::leaf_hash(&body).to_vec())
        .bind(index)
        .execute(gateway.state.db.write_pool())
        .await
        .expect("rewrite");
}

async fn wait_for(what: &str, mut check: impl AsyncFnMut() -> bool) {
    for _ in 0..200 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

async fn ships_to_a_local_directory_and_catches_a_rewrite(engine: Engine) {
    let env = TestEnv::new(engine).await;
    let config = config(&env);
    let dir = config.audit_shipping.directory_in(&config.data_dir);
    let gateway = start(config, None).await;
    assert!(
        !shipper(&gateway).sink().is_write_once(),
        "a local directory is not write-once"
    );
    record_reads(&gateway, 25).await;
    sequence_and_ship(&gateway).await;

    let shipped = status(&gateway.state.db).await.expect("status");
    assert_eq!(shipped.leaves_behind, 0, "{shipped:?}");
    assert!(shipped.shipped_checkpoint_size > 0);
    assert!(!shipped.failing);
    let local = LocalSink::new(&dir);
    let report = against(&gateway, &local).await.expect("verify --against");
    assert!(report.shipped_leaves >= 25);
    assert_eq!(
        report.latest_shipped_checkpoint,
        Some(shipped.shipped_checkpoint_size)
    );
    // Private files in private directories.
    let first = dir.join("leaves").join("00000000000000000000.ndjson");
    assert_eq!(mode(&first), 0o600);
    assert_eq!(mode(&dir.join("leaves")), 0o700);
    assert_eq!(mode(&dir.join("checkpoints")), 0o700);

    rewrite_leaf(&gateway, 3).await;
    assert_eq!(
        divergence(against(&gateway, &local).await),
        Divergence::Rewritten {
            index: 3,
            differing: 1
        }
    );
    gateway.stop().await;
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Says every write succeeded and stores nothing.
struct BlackHole;

#[async_trait]
impl AuditSink for BlackHole {
    fn describe(&self) -> String {
        "a sink that stores nothing".into()
    }
    fn is_write_once(&self) -> bool {
        true
    }
    async fn put_if_absent(&self, _key: &str, _bytes: Vec<u8>) -> Result<PutOutcome> {
        Ok(PutOutcome::Created)
    }
    async fn get(&self, _key: &str) -> Result<Option<Vec<u8>>> {
        Ok(None)
    }
    async fn list(&self, _prefix: &str) -> Result<Vec<String>> {
        Ok(Vec::new())
    }
}

async fn a_sink_that_stores_nothing_is_caught(engine: Engine) {
    let env = TestEnv::new(engine).await;
    let gateway = start(config(&env), Some(Arc::new(BlackHole))).await;
    record_reads(&gateway, 12).await;
    sequence_and_ship(&gateway).await;
    let shipped = status(&gateway.state.db).await.expect("status");
    assert_eq!(shipped.leaves_behind, 0, "the sink said yes to everything");
    match divergence(against(&gateway, &BlackHole).await) {
        Divergence::Missing(what) => assert!(what.contains("shipped leaves 0.."), "{what}"),
        other => panic!("expected missing objects, got {other}"),
    }
    gateway.stop().await;
}

/// A local directory that can be switched off.
struct Flaky {
    inner: LocalSink,
    down: AtomicBool,
}

impl Flaky {
    fn check(&self) -> Result<()> {
        if self.down.load(Ordering::SeqCst) {
            return Err(Error::Audit("sink unreachable (test)".into()));
        }
        Ok(())
    }
}

#[async_trait]
impl AuditSink for Flaky {
    fn describe(&self) -> String {
        "a sink that is down".into()
    }
    fn is_write_once(&self) -> bool {
        false
    }
    async fn put_if_absent(&self, key: &str, bytes: Vec<u8>) -> Result<PutOutcome> {
        self.check()?;
        self.inner.put_if_absent(key, bytes).await
    }
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.check()?;
        self.inner.get(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        self.check()?;
        self.inner.list(prefix).await
    }
}

async fn sink_down_buffers_alerts_and_backfills(engine: Engine) {
    let env = TestEnv::new(engine).await;
    let config = config(&env);
    let cert = config.data_dir.join("tls").join("dev-cert.pem");
    let flaky = Arc::new(Flaky {
        inner: LocalSink::new(env.data_dir().join("sink")),
        down: AtomicBool::new(true),
    });
    let gateway = start(config, Some(flaky.clone())).await;
    let client = client_trusting(&cert);
    let base = format!("https://localhost:{}", gateway.addr.port());

    record_reads(&gateway, 15).await;
    // Requests are still served while the sink is down.
    for _ in 0..3 {
        let response = client
            .get(format!("{base}/healthz"))
            .send()
            .await
            .expect("healthz");
        assert_eq!(response.status(), 200);
    }
    gateway.state.audit.sequence(true).await.expect("sequence");
    let db = gateway.state.db.clone();
    wait_for("shipping to report the outage", async || {
        status(&db)
            .await
            .is_ok_and(|s| s.failing && s.leaves_behind > 0)
    })
    .await;
    let lagging = status(&db).await.expect("status");
    assert!(lagging
        .last_error
        .as_deref()
        .unwrap_or_default()
        .contains("unreachable"));
    assert!(lagging.failing_since.is_some());
    assert_eq!(lagging.shipped_leaves, 0, "nothing reached the sink");
    // The outage is audited once, however many retries fail.
    tokio::time::sleep(Duration::from_millis(300)).await;
    gateway.state.audit.sequence(true).await.expect("sequence");
    assert_eq!(
        leaves_mentioning(&gateway, "a sink that is down failing").await,
        1
    );

    flaky.down.store(false, Ordering::SeqCst);
    wait_for("backfill", async || {
        status(&db)
            .await
            .is_ok_and(|s| !s.failing && s.shipped_leaves >= lagging.tree_size)
    })
    .await;
    gateway.state.audit.sequence(true).await.expect("sequence");
    assert_eq!(
        leaves_mentioning(&gateway, "a sink that is down recovered").await,
        1
    );
    shipper(&gateway).ship_once().await.expect("ship");
    let report = against(&gateway, &*flaky).await.expect("verify --against");
    assert_eq!(report.shipped_leaves, tree_size(&gateway).await);
    gateway.stop().await;
}

/// The value of a metric in Prometheus text.
pub(crate) fn metric(text: &str, name: &str) -> i64 {
    text.lines()
        .find_map(|line| {
            line.strip_prefix(name)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no metric {name} in {text}"))
}

pub(crate) async fn metrics_text(app: &TestApp, token: &str) -> String {
    let response = app
        .client
        .get(app.url("/metrics"))
        .bearer_auth(token)
        .send()
        .await
        .expect("metrics");
    assert_eq!(response.status(), 200);
    response.text().await.expect("text")
}

async fn metrics_show_the_lag_of_a_blocked_directory_until_it_clears(engine: Engine) {
    let env = TestEnv::new(engine).await;
    // The configured directory cannot be created while a file stands in its way.
    let blocker = env.data_dir().join("blocked");
    std::fs::write(&blocker, b"in the way").expect("blocker");
    let app = spawn_app_with(env, |config| {
        config.audit_shipping.poll_millis = 50;
        config.audit_shipping.max_backoff_secs = 1;
        config.audit_shipping.directory = Some(blocker.join("shipped"));
    })
    .await;
    let operator = app
        .sign_in(phr_gateway::audit::AccountRole::Operator, "op", None)
        .await;
    let gateway = app.gateway();
    gateway.state.audit.sequence(true).await.expect("sequence");
    let db = gateway.state.db.clone();
    wait_for("the outage", async || {
        status(&db)
            .await
            .is_ok_and(|s| s.failing && s.leaves_behind > 0)
    })
    .await;
    let text = metrics_text(&app, &operator).await;
    assert_eq!(
        metric(&text, "phr_gateway_audit_shipping_failing"),
        1,
        "{text}"
    );
    assert!(
        metric(&text, "phr_gateway_audit_shipping_leaves_behind") > 0,
        "{text}"
    );

    std::fs::remove_file(&blocker).expect("unblock");
    wait_for("the backfill", async || {
        status(&db)
            .await
            .is_ok_and(|s| !s.failing && s.leaves_behind == 0)
    })
    .await;
    let text = metrics_text(&app, &operator).await;
    assert_eq!(
        metric(&text, "phr_gateway_audit_shipping_failing"),
        0,
        "{text}"
    );
    assert!(metric(&text, "phr_gateway_audit_shipping_seconds_since_success") >= 0);
    app.stop().await;
}

async fn reshipping_after_a_crash_is_idempotent_and_a_foreign_object_is_refused(engine: Engine) {
    let env = TestEnv::new(engine).await;
    let mut config = config(&env);
    // This test drives its own shipper, step by step.
    config.audit_shipping.enabled = false;
    let dir = config.audit_shipping.directory_in(&config.data_dir);
    let gateway = start(config, None).await;
    assert!(gateway.shipper.is_none());
    let sink = Arc::new(LocalSink::new(&dir));
    let shipper = Shipper::new(
        gateway.state.db.clone(),
        sink.clone(),
        Duration::from_millis(50),
        Duration::from_secs(1),
    );
    record_reads(&gateway, 12).await;
    gateway.state.audit.sequence(true).await.expect("sequence");
    shipper.ship_once().await.expect("ship");

    // A crash after the objects were written but before the cursor moved: the next pass
    // finds them in place, checks they hold the live leaves, and moves on.
    sqlx::query("UPDATE audit_shipping SET shipped_leaves = 0, shipped_checkpoint_size = 0")
        .execute(gateway.state.db.write_pool())
        .await
        .expect("rewind");
    record_reads(&gateway, 5).await;
    gateway.state.audit.sequence(true).await.expect("sequence");
    shipper.ship_once().await.expect("ship again");
    let after = shipper.status().await.expect("status");
    assert_eq!(after.leaves_behind, 0, "{after:?}");
    assert!(!after.failing);
    against(&gateway, &*sink).await.expect("verify --against");

    // Someone else's object where the next batch goes: never replaced, and flagged.
    record_reads(&gateway, 3).await;
    gateway.state.audit.sequence(true).await.expect("sequence");
    let foreign =
        phr_gateway::audit::shipping::encode_leaves(after.shipped_leaves, &[b"not ours".to_vec()]);
    sink.put_if_absent(&leaf_key(after.shipped_leaves), foreign.clone())
        .await
        .expect("plant");
    let error = shipper.ship_once().await.expect_err("must not accept it");
    assert!(
        error.to_string().contains("differs from the live log"),
        "{error}"
    );
    let failing = shipper.status().await.expect("status");
    assert!(failing.failing && failing.leaves_behind > 0, "{failing:?}");
    assert_eq!(
        sink.get(&leaf_key(after.shipped_leaves))
            .await
            .expect("get"),
        Some(foreign)
    );
    gateway.stop().await;
}

/// The local S3-compatible server, stopped when dropped (the backup tests use it too).
pub(crate) struct S3Server {
    child: Child,
    pub(crate) endpoint: String,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) const ACCESS_KEY: &str = "gateway-test-key";
pub(crate) const SECRET_KEY: &str = "gateway-test-secret";

fn python_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("python")
}

pub(crate) async fn start_s3() -> S3Server {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let child = Command::new("python3")
        .args([
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start moto's server (pip install -r tests/python/s3-requirements.txt)");
    let server = S3Server {
        child,
        endpoint: format!("http://127.0.0.1:{port}"),
    };
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return server;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the S3 server did not start");
}

/// Runs tests/python/s3_object_lock.py with the gateway's credentials; its JSON output.
pub(crate) fn s3_script(args: &[&str]) -> serde_json::Value {
    let output = Command::new("python3")
        .arg(python_dir().join("s3_object_lock.py"))
        .args(args)
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .output()
        .expect("run s3_object_lock.py");
    assert!(
        output.status.success(),
        "s3_object_lock.py {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("JSON from s3_object_lock.py")
}

async fn s3_object_lock_keeps_the_copy_from_the_gateways_own_credentials(engine: Engine) {
    let server = start_s3().await;
    let bucket = "phr-audit";
    s3_script(&["create-bucket", &server.endpoint, bucket]);

    let env = TestEnv::new(engine).await;
    let mut config = config(&env);
    config.audit_shipping.sink = SinkKind::S3;
    let s3 = &mut config.audit_shipping.s3;
    s3.endpoint = Some(server.endpoint.clone());
    s3.bucket = Some(bucket.into());
    s3.prefix = "gateway-1/".into();
    s3.access_key_id = Some(ACCESS_KEY.into());
    s3.secret_access_key = Some(Secret(SECRET_KEY.into()));
    let sink = Arc::new(S3Sink::from_config(&config.audit_shipping.s3).expect("s3 sink"));
    assert!(sink.check_object_lock().await.expect("object lock"));
    assert!(
        sink.is_write_once(),
        "compliance-mode Object Lock is write-once"
    );
    let gateway = start(config, Some(sink.clone())).await;
    record_reads(&gateway, 12).await;
    sequence_and_ship(&gateway).await;
    assert_eq!(
        status(&gateway.state.db)
            .await
            .expect("status")
            .leaves_behind,
        0
    );
    against(&gateway, &*sink)
        .await
        .expect("verify --against S3");

    // The gateway's own writes never replace: a second put of a key is refused.
    let key = "leaves/00000000000000000000.ndjson";
    assert_eq!(
        sink.put_if_absent(key, b"rewritten".to_vec())
            .await
            .expect("put"),
        PutOutcome::AlreadyExists
    );
    let original = sink.get(key).await.expect("get").expect("shipped");

    // With the same credentials, straight through the S3 API. What moto (like S3) does on a
    // versioned bucket under COMPLIANCE retention: deleting the original *version* is
    // refused (AccessDenied), even when asking to bypass governance; a conditional
    // overwrite is refused (412); a plain overwrite succeeds but only adds a newer version,
    // and a plain delete only adds a delete marker. So the strongest honest property is
    // that the original version survives every attempt unchanged — and verify reads
    // first versions, so it still passes.
    let result = s3_script(&[
        "attack",
        &server.endpoint,
        bucket,
        &format!("gateway-1/{key}"),
    ]);
    assert_eq!(result["retention_mode"], "COMPLIANCE", "{result}");
    assert_eq!(result["delete_version"], "AccessDenied", "{result}");
    assert_eq!(
        result["delete_version_bypassing_governance"], "AccessDenied",
        "{result}"
    );
    assert_eq!(
        result["conditional_overwrite"], "PreconditionFailed",
        "{result}"
    );
    assert_eq!(result["original_intact"], true, "{result}");
    assert_eq!(
        result["original_sha256"],
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&original)),
        "{result}"
    );
    // After the plain delete the key's latest is a delete marker.
    assert_eq!(result["latest_readable"], "NoSuchKey", "{result}");
    assert_eq!(
        sink.get(key).await.expect("get").as_deref(),
        Some(&original[..])
    );
    against(&gateway, &*sink)
        .await
        .expect("verify --against S3 after the attempts");
    gateway.stop().await;
    drop(server);
}
