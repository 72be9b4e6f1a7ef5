//! Backup generations: retention prunes what the policy lets go (audited) and nothing while
//! the live database looks gutted; verifications are recorded and fewer than three
//! verified-good generations raise an alert until healed (both engines); restore drills
//! restore the latest and a random older generation and show in `/metrics`; and the
//! ransomware test — generations on S3 with Object Lock survive the gateway's own
//! credentials and a database overwritten with random bytes, and restore every record.

use std::collections::BTreeMap;
use std::path::Path;

use age::secrecy::ExposeSecret;
use phr_gateway::audit::{AccountRole, Agent};
use phr_gateway::backup::generations::{
    last_drill, prune, record_result, take, verified_good, VerificationSource,
};
use phr_gateway::backup::retention::Policy;
use phr_gateway::backup::storage::{
    GenerationStore, LocalGenerationStore, Removal, S3GenerationStore,
};
use phr_gateway::backup::{self, drill::drill, BackupDamage, Manifest};
use phr_gateway::config::{GenerationStoreKind, Secret};
use phr_gateway::s3::DeleteOutcome;
use phr_gateway::store::resources::{NewResource, SourceIdentity};
use phr_gateway::Gateway;
use sqlx::Row;

use crate::audit_shipping::{metric, metrics_text, s3_script, start_s3, ACCESS_KEY, SECRET_KEY};
use crate::both_engines;
use crate::helpers::{
    count, leaves_containing, spawn_app, spawn_app_with, Engine, TestApp, TestEnv,
};

both_engines!(
    prune_follows_the_policy_and_refuses_while_the_database_looks_gutted,
    fewer_than_three_verified_generations_raise_an_alert_until_healed,
);

/// Writes a generation directory by hand: a signed manifest claiming `row_counts` and a
/// placeholder archive (retention and the live check read only manifests).
fn fake_generation(app: &TestApp, dir: &Path, name: &str, row_counts: &[(&str, i64)]) {
    let manifest = Manifest {
        format: 2,
        kind: backup::Kind::Database,
        generation: name.into(),
        created_at: "2026-11-01T00:00:00Z".into(),
        engine: "sqlite".into(),
        schema_version: 15,
        row_counts: row_counts
            .iter()
            .map(|(t, n)| (t.to_string(), *n))
            .collect::<BTreeMap<_, _>>(),
        archive_sha256: "00".repeat(32),
        archive_bytes: 1,
        audit_tree_size: 0,
        audit_root: String::new(),
    };
    let body = serde_json::to_string(&manifest).expect("json") + "\n";
    let target = dir.join(name);
    std::fs::create_dir_all(&target).expect("dir");
    std::fs::write(
        target.join("manifest.note"),
        app.gateway().state.audit.sign_note(&body),
    )
    .expect("manifest");
    std::fs::write(target.join("database.sqlite.age"), b"x").expect("archive");
}

async fn live_count(app: &TestApp, table: &str) -> i64 {
    count(app, &format!("SELECT COUNT(*) FROM {table}")).await
}

async fn prune_follows_the_policy_and_refuses_while_the_database_looks_gutted(engine: Engine) {
    let app = spawn_app(engine).await;
    for n in 0..3 {
        app.sign_in(
            AccountRole::Patient,
            &format!("p{n}"),
            Some(&format!("patient-{n}")),
        )
        .await;
    }
    let state = &app.gateway().state;
    let directory = app.env().data_dir().join("backups");
    let store = LocalGenerationStore {
        directory: directory.clone(),
    };
    let accounts = live_count(&app, "accounts").await;
    // Ten days of generations at noon JST.
    let names: Vec<String> = (1..=10)
        .map(|day| format!("202611{day:02}T030000Z"))
        .collect();
    for name in &names {
        fake_generation(&app, &directory, name, &[("accounts", accounts)]);
    }
    let policy = Policy {
        daily: 3,
        weekly: 0,
        monthly: 0,
    };
    let url = state.config.database_url();
    let verifier = state.audit.verifiers();
    let report = prune(&state.db, &url, &store, &policy, &verifier)
        .await
        .expect("prune");
    assert_eq!(report.refused, None);
    let kept: Vec<&str> = report.kept.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        kept,
        ["20261110T030000Z", "20261109T030000Z", "20261108T030000Z"]
    );
    assert_eq!(report.removed.len(), 7);
    assert_eq!(store.list().await.expect("list"), names[7..].to_vec());
    assert!(!directory.join(&names[0]).exists());
    assert_eq!(
        leaves_containing(&app, "deleted from local directory").await,
        7,
        "each deletion is audited"
    );
    assert_eq!(count(&app, "SELECT COUNT(*) FROM backup_pruned").await, 7);

    // The newest generation says there were 100 resources; the live database has none:
    // someone emptied it. Nothing is deleted, the refusal is audited and alerted.
    fake_generation(
        &app,
        &directory,
        "20261111T030000Z",
        &[("accounts", accounts), ("resources", 100)],
    );
    let refused = prune(&state.db, &url, &store, &policy, &verifier)
        .await
        .expect("prune");
    let problems = refused.refused.expect("refused");
    assert!(problems[0].contains("resources has 0 rows"), "{problems:?}");
    assert!(refused.removed.is_empty());
    assert_eq!(
        store.list().await.expect("list").len(),
        4,
        "nothing deleted"
    );
    assert_eq!(leaves_containing(&app, "backup prune refused").await, 1);
    state.audit.sequence(false).await.expect("sequence");
    state.alerts.evaluate_once().await.expect("evaluate");
    state.alerts.evaluate_once().await.expect("evaluate again");
    assert_eq!(
        count(
            &app,
            "SELECT COUNT(*) FROM alerts WHERE rule = 'backup-prune-refused' AND severity = 'critical'"
        )
        .await,
        1,
        "raised once"
    );
    app.stop().await;
}

/// Sequences what is pending and runs the alert rules once.
async fn evaluate(app: &TestApp) {
    let state = &app.gateway().state;
    state.audit.sequence(false).await.expect("sequence");
    state.alerts.evaluate_once().await.expect("evaluate");
}

async fn alert_count(app: &TestApp) -> i64 {
    count(
        app,
        "SELECT COUNT(*) FROM alerts WHERE rule = 'backup-verified-generations'",
    )
    .await
}

fn verified(name: &str) -> Result<backup::Verified, BackupDamage> {
    Ok(backup::Verified {
        manifest: Manifest {
            format: 2,
            kind: backup::Kind::Database,
            generation: name.into(),
            created_at: String::new(),
            engine: "sqlite".into(),
            schema_version: 15,
            row_counts: BTreeMap::new(),
            archive_sha256: String::new(),
            archive_bytes: 0,
            audit_tree_size: 0,
            audit_root: String::new(),
        },
        restored: std::path::PathBuf::new(),
        scratch_database: None,
    })
}

async fn fewer_than_three_verified_generations_raise_an_alert_until_healed(engine: Engine) {
    let identity = age::x25519::Identity::generate();
    let app = spawn_app_with(TestEnv::new(engine).await, |config| {
        config.backup.recipient = Some(identity.to_public().to_string());
    })
    .await;
    let state = &app.gateway().state;
    let operator = app.sign_in(AccountRole::Operator, "ops", None).await;
    for name in ["20261101T000000Z", "20261102T000000Z"] {
        record_result(
            &state.db,
            "run-1",
            VerificationSource::Restore,
            name,
            &verified(name),
            40,
        )
        .await
        .expect("record");
    }
    evaluate(&app).await;
    evaluate(&app).await;
    assert_eq!(
        alert_count(&app).await,
        1,
        "two verified: one alert, deduplicated"
    );
    let text = metrics_text(&app, &operator).await;
    assert_eq!(metric(&text, "phr_gateway_backup_verified_generations"), 2);
    assert_eq!(metric(&text, "phr_gateway_backup_last_drill_success"), -1);

    // A third verified generation heals it: nothing new.
    record_result(
        &state.db,
        "run-2",
        VerificationSource::Drill,
        "20261103T000000Z",
        &verified("20261103T000000Z"),
        50,
    )
    .await
    .expect("record");
    evaluate(&app).await;
    assert_eq!(alert_count(&app).await, 1);
    assert_eq!(verified_good(&state.db).await.expect("good").len(), 3);

    // The newest fails its next check: short again, a new alert.
    record_result(
        &state.db,
        "run-3",
        VerificationSource::Drill,
        "20261103T000000Z",
        &Err(BackupDamage::Digest),
        50,
    )
    .await
    .expect("record");
    evaluate(&app).await;
    assert_eq!(alert_count(&app).await, 2);
    let drill = last_drill(&state.db).await.expect("drill").expect("one");
    assert!(!drill.success);
    let text = metrics_text(&app, &operator).await;
    assert_eq!(metric(&text, "phr_gateway_backup_verified_generations"), 2);
    assert_eq!(metric(&text, "phr_gateway_backup_last_drill_success"), 0);
    app.stop().await;
}

fn seconds_metric(text: &str, name: &str) -> f64 {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drill_restores_the_latest_and_an_older_generation_and_shows_in_metrics() {
    let identity = age::x25519::Identity::generate();
    let recipient = identity.to_public().to_string();
    let secret = identity.to_string().expose_secret().to_string();
    let app = spawn_app_with(TestEnv::new(Engine::Sqlite).await, |config| {
        config.backup.recipient = Some(recipient.clone());
    })
    .await;
    let state = &app.gateway().state;
    let operator = app.sign_in(AccountRole::Operator, "ops", None).await;
    let directory = app.env().data_dir().join("backups");
    let store = LocalGenerationStore {
        directory: directory.clone(),
    };
    let policy = Policy::default();
    let mut names = Vec::new();
    for n in 0..2 {
        if n > 0 {
            // Generations are named by the second.
            tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        }
        let manifest = take(
            &state.db,
            &state.audit,
            &directory,
            &recipient,
            &store,
            &policy,
            &backup::Options::new(&directory),
        )
        .await
        .expect("take");
        names.push(manifest.generation);
    }
    let scratch = app.env().data_dir().join("scratch");
    let report = drill(
        &state.db,
        &state.audit,
        &store,
        &secret,
        &backup::Options::new(&scratch),
    )
    .await
    .expect("drill");
    assert!(report.success(), "{report:?}");
    let drilled: Vec<&str> = report
        .checks
        .iter()
        .map(|c| c.generation.as_str())
        .collect();
    assert_eq!(drilled, [names[1].as_str(), names[0].as_str()]);
    assert!(
        !std::fs::read_dir(&scratch).expect("scratch").any(|e| e
            .expect("entry")
            .path()
            .extension()
            .is_some_and(|x| x == "sqlite")),
        "no plaintext restore is left behind"
    );
    assert!(leaves_containing(&app, &format!("backup drill {}", report.run)).await >= 1);
    let text = metrics_text(&app, &operator).await;
    assert_eq!(metric(&text, "phr_gateway_backup_last_drill_success"), 1);
    assert_eq!(metric(&text, "phr_gateway_backup_verified_generations"), 2);
    assert!(seconds_metric(&text, "phr_gateway_backup_last_drill_seconds") > 0.0);

    // A damaged latest archive fails the drill.
    let archive = directory.join(&names[1]).join("database.sqlite.age");
    let mut bytes = std::fs::read(&archive).expect("archive");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 1;
    std::fs::write(&archive, bytes).expect("damage");
    let failed = drill(
        &state.db,
        &state.audit,
        &store,
        &secret,
        &backup::Options::new(&scratch),
    )
    .await
    .expect("drill");
    assert!(!failed.success());
    assert!(failed.checks[0]
        .failure
        .as_deref()
        .is_some_and(|f| f.contains("SHA-256")));
    let text = metrics_text(&app, &operator).await;
    assert_eq!(metric(&text, "phr_gateway_backup_last_drill_success"), 0);
    assert_eq!(metric(&text, "phr_gateway_backup_verified_generations"), 1);
    app.stop().await;
}

/// `n` random bytes (from v4 UUIDs' random bits).
/// With `backup.drill_identity_file` set (a restore host), the gateway drills on its own
/// schedule: the result is recorded like a command-line drill's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_drills_on_its_schedule_when_it_holds_the_identity() {
    use std::os::unix::fs::PermissionsExt;
    let identity = age::x25519::Identity::generate();
    let recipient = identity.to_public().to_string();
    let env = TestEnv::new(Engine::Sqlite).await;
    let key = env.data_dir().join("drill.key");
    std::fs::write(&key, identity.to_string().expose_secret()).expect("identity");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let app = spawn_app_with(env, |config| {
        config.backup.recipient = Some(recipient.clone());
        config.backup.drill_identity_file = Some(key.clone());
        config.backup.drill_interval_secs = Some(1);
    })
    .await;
    let state = &app.gateway().state;
    // Where the configured (local) store keeps generations.
    let directory = state.config.data_dir.join("backups");
    let manifest = take(
        &state.db,
        &state.audit,
        &directory,
        &recipient,
        &LocalGenerationStore {
            directory: directory.clone(),
        },
        &Policy::default(),
        &backup::Options::new(&directory),
    )
    .await
    .expect("take");
    // Wait for the scheduler's pass (it runs every second); no speed is measured here.
    let mut drilled = None;
    for _ in 0..300 {
        if let Some(last) = backup::generations::last_drill(&state.db)
            .await
            .expect("last drill")
        {
            drilled = Some(last);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let drilled = drilled.expect("the gateway ran a drill on its schedule");
    assert!(drilled.success, "{drilled:?}");
    // Audited like any drill (the leaf may still be waiting for the sequencer).
    let mut audited = 0;
    for _ in 0..100 {
        audited = leaves_containing(&app, &format!("{} verified in", manifest.generation)).await;
        if audited > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(audited >= 1, "the drill is in the audit log");
    app.stop().await;
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(n + 16);
    while bytes.len() < n {
        bytes.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
    }
    bytes.truncate(n);
    bytes
}

fn observation(id: &str, marker: &str) -> Vec<u8> {
    format!(
        "{{\"resourceType\":\"Observation\",\"id\":\"{id}\",\"status\":\"final\",\"note\":[{{\"text\":\"{marker}\"}}]}}"
    )
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ransomware_cannot_take_the_generations_on_s3_and_the_newest_restores_everything() {
    let server = start_s3().await;
    let bucket = "phr-backups";
    s3_script(&["create-bucket", &server.endpoint, bucket]);

    let identity = age::x25519::Identity::generate();
    let recipient = identity.to_public().to_string();
    let secret = identity.to_string().expose_secret().to_string();
    let endpoint = server.endpoint.clone();
    let app = spawn_app_with(TestEnv::new(Engine::Sqlite).await, |config| {
        let backup = &mut config.backup;
        backup.recipient = Some(recipient.clone());
        backup.store = GenerationStoreKind::S3;
        backup.s3.endpoint = Some(endpoint);
        backup.s3.bucket = Some(bucket.into());
        backup.s3.prefix = "gateway-1/".into();
        backup.s3.access_key_id = Some(ACCESS_KEY.into());
        backup.s3.secret_access_key = Some(Secret(SECRET_KEY.into()));
    })
    .await;
    let state = &app.gateway().state;
    let config = (*state.config).clone();

    // Seed: patients with resources (encrypted per patient) and their audit trail.
    let mut seeded = Vec::new();
    for p in 0..3 {
        let patient = format!("patient-{p}");
        app.sign_in(AccountRole::Patient, &format!("p{p}"), Some(&patient))
            .await;
        for r in 0..4 {
            let body = observation(&format!("obs-{p}-{r}"), &format!("result {p}.{r}"));
            let (meta, _) = state
                .resources
                .put(
                    &Agent::system(),
                    NewResource {
                        patient_id: patient.clone(),
                        category: "checkup".into(),
                        source: SourceIdentity {
                            source: "hospital-a".into(),
                            resource_type: "Observation".into(),
                            source_resource_id: format!("obs-{p}-{r}"),
                            version_id: Some("1".into()),
                        },
                        body: body.clone(),
                    },
                )
                .await
                .expect("put");
            seeded.push((patient.clone(), meta.id, body));
        }
    }

    // Three generations to S3.
    let store = S3GenerationStore::connect(&config.backup)
        .await
        .expect("s3 store");
    assert!(
        store.is_write_once(),
        "the bucket enforces compliance-mode Object Lock"
    );
    let staging = config.data_dir.join("backups");
    let policy = Policy::of(&config.backup);
    let mut manifests = Vec::new();
    for n in 0..3 {
        if n > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        }
        let manifest = take(
            &state.db,
            &state.audit,
            &staging,
            &recipient,
            &store,
            &policy,
            &backup::Options::new(&staging),
        )
        .await
        .expect("take a generation");
        assert!(
            !staging.join(&manifest.generation).exists(),
            "no local copy is left once uploaded"
        );
        manifests.push(manifest);
    }
    let newest = manifests[2].clone();
    assert_eq!(newest.row_counts["resources"], 12);
    let names: Vec<String> = manifests.iter().map(|m| m.generation.clone()).collect();
    assert_eq!(store.list().await.expect("list"), names);
    let root_before: Vec<u8> =
        sqlx::query("SELECT root FROM audit_checkpoints WHERE tree_size = $1")
            .bind(newest.audit_tree_size as i64)
            .fetch_one(state.db.read_pool())
            .await
            .expect("checkpoint")
            .get(0);
    assert_eq!(hex::encode(&root_before), newest.audit_root);

    // The attack: the live database becomes random bytes…
    let live = config.data_dir.join("gateway.db");
    let size = std::fs::metadata(&live).expect("db").len() as usize;
    std::fs::write(&live, random_bytes(size)).expect("overwrite the database");
    let wal = config.data_dir.join("gateway.db-wal");
    if wal.exists() {
        let len = std::fs::metadata(&wal).expect("wal").len() as usize;
        std::fs::write(&wal, random_bytes(len)).expect("overwrite the WAL");
    }

    // …and, with the gateway's own credentials, through the S3 API: delete each object's
    // version, overwrite it (conditionally and plainly) and delete it plainly.
    for generation in &names {
        for file in ["database.sqlite.age", "manifest.note"] {
            let key = store.key(generation, file);
            let versions = store.client().versions(&key).await.expect("versions");
            let (_, original) = versions.last().expect("a version").clone();
            assert_eq!(
                store
                    .client()
                    .delete_version(&key, &original)
                    .await
                    .expect("delete"),
                DeleteOutcome::Refused("AccessDenied".into()),
                "{key}"
            );
            let result = s3_script(&["attack", &server.endpoint, bucket, &key]);
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
            assert_eq!(result["original_version"], original.as_str(), "{result}");
        }
    }
    // The locked versions remain: every generation is still listed, behind its markers.
    assert_eq!(store.list().await.expect("list"), names);
    assert_eq!(
        store.remove(&names[0]).await.expect("remove"),
        Removal::Refused("AccessDenied".into())
    );

    // Retention will not rotate anything out while the database is random bytes.
    let report = prune(
        &state.db,
        &config.database_url(),
        &store,
        &Policy {
            daily: 1,
            weekly: 0,
            monthly: 0,
        },
        &state.audit.verifiers(),
    )
    .await
    .expect("prune");
    let problems = report.refused.expect("refused");
    assert!(problems[0].contains("SQLite header"), "{problems:?}");
    assert!(report.removed.is_empty() && report.refused_by_store.is_empty());
    assert_eq!(store.list().await.expect("list"), names);
    let verifier = state.audit.verifiers();
    let origin = state.audit.origin().to_string();
    // The gateway stops; its data directory (key store, KEK, keys) stays for the restore.
    let mut app = app;
    if let Some(gateway) = app.gateway.take() {
        gateway.stop().await;
    }

    // Restore the newest generation from S3 and prove it is all there.
    let scratch = config.data_dir.join("restore-scratch");
    let fetched = store
        .fetch(&newest.generation, &scratch.join("fetched"))
        .await
        .expect("fetch");
    let verified = backup::verify(&fetched, &secret, &verifier, &origin, &scratch)
        .await
        .expect("no I/O error")
        .expect("the newest generation verifies");
    assert_eq!(verified.manifest, newest);

    let mut restored_config = config.clone();
    restored_config.database.url =
        Some(format!("sqlite://{}?mode=rwc", verified.restored.display()));
    let restored = Gateway::build(restored_config)
        .await
        .expect("build on the restored copy");
    for (patient, id, body) in &seeded {
        let resource = restored
            .state
            .resources
            .read(patient, id)
            .await
            .expect("every seeded resource is back");
        assert_eq!(&resource.body, body, "decrypts to what was seeded");
    }
    let root_after: Vec<u8> =
        sqlx::query("SELECT root FROM audit_checkpoints WHERE tree_size = $1")
            .bind(newest.audit_tree_size as i64)
            .fetch_one(restored.state.db.read_pool())
            .await
            .expect("checkpoint")
            .get(0);
    assert_eq!(root_after, root_before, "the audit root came back");
    let patients: i64 = sqlx::query("SELECT COUNT(*) FROM patients")
        .fetch_one(restored.state.db.read_pool())
        .await
        .expect("patients")
        .get(0);
    assert_eq!(patients, newest.row_counts["patients"]);
    restored.state.db.close().await;
    drop(app);
    drop(server);
}
