//! Backups on both engines: a generation encrypted to an offline age key with a signed
//! manifest restores into scratch (a file, or a PostgreSQL database dropped afterwards)
//! whose row counts and recomputed audit log match; a flipped byte, a truncated archive, a
//! manifest from another generation and the wrong key each fail with their own error. The
//! key store is backed up apart (its own kind of generation, refused where a database
//! generation is expected); restoring an older key-store generation re-applies every later
//! erasure, and after the retention the prune leaves no backup holding an erased key.

use std::str::FromStr;

use age::secrecy::ExposeSecret;
use phr_gateway::audit::{AccountRole, Agent};
use phr_gateway::backup::{self, BackupDamage, Kind};
use phr_gateway::{Error, Gateway};

use crate::both_engines;
use crate::helpers::{leaves_containing, postgres_admin_url, spawn_app, Engine, TestApp, TestEnv};

both_engines!(
    a_generation_restores_and_each_kind_of_damage_is_named,
    key_store_generations_are_apart_and_refused_as_data,
    a_restored_key_store_never_brings_back_an_erased_key,
);

fn options(app: &TestApp) -> backup::Options {
    let mut options = backup::Options::from_config(&app.env().config());
    options.scratch_dir = app.env().data_dir().join("scratch");
    options
}

async fn verify(
    app: &TestApp,
    generation: &std::path::Path,
    identity: &str,
) -> Result<backup::Verified, BackupDamage> {
    let audit = &app.gateway().state.audit;
    backup::verify_with(
        generation,
        identity,
        &audit.verifiers(),
        audit.origin(),
        &options(app),
    )
    .await
    .expect("no I/O error")
}

fn engine_name(engine: Engine) -> &'static str {
    match engine {
        Engine::Sqlite => "sqlite",
        Engine::Postgres => "postgres",
    }
}

/// PostgreSQL databases whose name starts with `prefix` (scratch databases left behind).
async fn databases_named(prefix: &str) -> i64 {
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&postgres_admin_url())
        .await
        .expect("admin");
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM pg_database WHERE datname LIKE $1")
        .bind(format!("{prefix}%"))
        .fetch_one(&mut conn)
        .await
        .expect("count");
    n
}

async fn a_generation_restores_and_each_kind_of_damage_is_named(engine: Engine) {
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
    let identity = age::x25519::Identity::generate();
    let recipient = identity.to_public().to_string();
    let secret = identity.to_string().expose_secret().to_string();
    let directory = app.env().data_dir().join("backups");

    let first = backup::create_with(
        &state.db,
        &state.audit,
        &directory,
        &recipient,
        &options(&app),
    )
    .await
    .expect("backup");
    assert_eq!(first.engine, engine_name(engine));
    assert_eq!(first.row_counts["accounts"], 3);
    assert!(
        !first
            .row_counts
            .keys()
            .any(|t| t == "data_keys" || t.ends_with(".data_keys")),
        "the key store is not in a database generation: {:?}",
        first.row_counts.keys()
    );
    assert!(
        leaves_containing(&app, "backup generation").await >= 1,
        "the backup is audited"
    );
    assert!(first.audit_tree_size > 0);
    let first_dir = directory.join(&first.generation);
    // Nothing readable is left beside the archive.
    let names: Vec<String> = std::fs::read_dir(&first_dir)
        .expect("dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    let archive = first_dir.join(backup::archive_name(Kind::Database, engine_name(engine)));
    let bytes = std::fs::read(&archive).expect("archive");
    assert!(
        !bytes
            .windows(6)
            .any(|w| w == b"SQLite" || w == b"PGDMP\x01"),
        "the archive is encrypted"
    );

    let verified = verify(&app, &first_dir, &secret)
        .await
        .expect("a good generation verifies");
    assert_eq!(verified.manifest, first);
    let scratch_prefix = format!("phr_restore_{}", first.generation.to_ascii_lowercase());
    if engine == Engine::Postgres {
        assert_eq!(
            databases_named(&scratch_prefix).await,
            0,
            "the scratch database is dropped"
        );
    }

    // The wrong key.
    let other = age::x25519::Identity::generate();
    assert_eq!(
        verify(&app, &first_dir, other.to_string().expose_secret())
            .await
            .unwrap_err(),
        BackupDamage::WrongKey
    );

    // A flipped byte, then a truncated archive.
    let mut flipped = bytes.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x01;
    std::fs::write(&archive, &flipped).expect("flip");
    assert_eq!(
        verify(&app, &first_dir, &secret).await.unwrap_err(),
        BackupDamage::Digest
    );
    std::fs::write(&archive, &bytes[..bytes.len() / 2]).expect("truncate");
    assert_eq!(
        verify(&app, &first_dir, &secret).await.unwrap_err(),
        BackupDamage::Digest
    );
    std::fs::write(&archive, &bytes).expect("restore the file");

    // A manifest copied from another generation.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    app.sign_in(AccountRole::Patient, "p9", Some("patient-9"))
        .await;
    let second = backup::create_with(
        &state.db,
        &state.audit,
        &directory,
        &recipient,
        &options(&app),
    )
    .await
    .expect("second backup");
    assert_eq!(second.row_counts["accounts"], 4);
    std::fs::copy(
        directory.join(&second.generation).join("manifest.note"),
        first_dir.join("manifest.note"),
    )
    .expect("swap manifests");
    assert!(matches!(
        verify(&app, &first_dir, &secret).await.unwrap_err(),
        BackupDamage::OtherGeneration { .. }
    ));

    // A manifest edited by hand no longer verifies.
    let second_dir = directory.join(&second.generation);
    let note = std::fs::read_to_string(second_dir.join("manifest.note")).expect("note");
    std::fs::write(
        second_dir.join("manifest.note"),
        note.replace("\"accounts\":4", "\"accounts\":5"),
    )
    .expect("edit");
    assert!(matches!(
        verify(&app, &second_dir, &secret).await.unwrap_err(),
        BackupDamage::Signature(_)
    ));
    assert!(age::x25519::Recipient::from_str(&recipient).is_ok());
    if engine == Engine::Postgres {
        assert_eq!(
            databases_named(&scratch_prefix).await,
            0,
            "no scratch database is left by a failed verification"
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn a_missing_pg_dump_is_named_and_nothing_is_written() {
    let app = spawn_app(Engine::Postgres).await;
    let state = &app.gateway().state;
    let identity = age::x25519::Identity::generate();
    let empty = tempfile::tempdir().expect("tempdir");
    let mut options = options(&app);
    options.pg_bin_dir = Some(empty.path().to_path_buf());
    let directory = app.env().data_dir().join("backups");
    let error = backup::create_with(
        &state.db,
        &state.audit,
        &directory,
        &identity.to_public().to_string(),
        &options,
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(error.contains("pg_dump not found"), "{error}");
    assert!(error.contains("backup.pg_bin_dir"), "{error}");
    assert!(!directory.exists() || std::fs::read_dir(&directory).expect("dir").count() == 0);
    app.stop().await;
}

async fn key_store_generations_are_apart_and_refused_as_data(engine: Engine) {
    let app = spawn_app(engine).await;
    let state = &app.gateway().state;
    state
        .keys
        .data_key_or_create("patient-1")
        .await
        .expect("key");
    let identity = age::x25519::Identity::generate();
    let secret = identity.to_string().expose_secret().to_string();
    let keys_dir = app.env().data_dir().join("key-store-backups");
    let made = backup::create_key_store(
        &state.keys,
        &state.db,
        &state.audit,
        &keys_dir,
        &identity.to_public().to_string(),
        &options(&app),
    )
    .await
    .expect("key-store backup");
    assert_eq!(made.kind, Kind::KeyStore);
    assert_eq!(made.row_counts.len(), 1, "{:?}", made.row_counts);
    assert_eq!(made.row_counts.values().sum::<i64>(), 1);
    let dir = keys_dir.join(&made.generation);
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .expect("dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            backup::archive_name(Kind::KeyStore, engine_name(engine)),
            "manifest.note"
        ]
    );
    assert!(leaves_containing(&app, "key-store backup generation").await >= 1);

    let audit = &state.audit;
    let checked = backup::verify_key_store(&dir, &secret, &audit.verifiers(), &options(&app))
        .await
        .expect("no I/O error");
    assert_eq!(checked.expect("verifies").manifest, made);
    let other = age::x25519::Identity::generate();
    assert_eq!(
        backup::verify_key_store(
            &dir,
            other.to_string().expose_secret(),
            &audit.verifiers(),
            &options(&app)
        )
        .await
        .expect("no I/O error")
        .unwrap_err(),
        BackupDamage::WrongKey
    );
    // A key-store generation where a database generation is expected: refused clearly.
    let refused = backup::verify_with(
        &dir,
        &secret,
        &audit.verifiers(),
        audit.origin(),
        &options(&app),
    )
    .await
    .unwrap_err();
    assert!(matches!(refused, Error::Invalid(_)), "{refused}");
    assert!(
        refused.to_string().contains("is a key-store generation"),
        "{refused}"
    );
    // And the other way round.
    let data = backup::create_with(
        &state.db,
        &state.audit,
        &app.env().data_dir().join("backups"),
        &identity.to_public().to_string(),
        &options(&app),
    )
    .await
    .expect("database backup");
    let data_dir = app.env().data_dir().join("backups").join(&data.generation);
    let refused = backup::verify_key_store(&data_dir, &secret, &audit.verifiers(), &options(&app))
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("is a database generation"),
        "{refused}"
    );
    app.stop().await;
}

async fn a_restored_key_store_never_brings_back_an_erased_key(engine: Engine) {
    let env = TestEnv::new(engine).await;
    let config = env.config();
    let gateway = Gateway::build(config.clone()).await.expect("build");
    let state = &gateway.state;
    state
        .keys
        .data_key_or_create("patient-1")
        .await
        .expect("key 1");
    state
        .keys
        .data_key_or_create("patient-2")
        .await
        .expect("key 2");
    let identity = age::x25519::Identity::generate();
    let secret = identity.to_string().expose_secret().to_string();
    let keys_dir = env.data_dir().join("key-store-backups");
    let mut options = backup::Options::from_config(&config);
    options.scratch_dir = env.data_dir().join("scratch");
    let before = backup::create_key_store(
        &state.keys,
        &state.db,
        &state.audit,
        &keys_dir,
        &identity.to_public().to_string(),
        &options,
    )
    .await
    .expect("key-store backup before the erasure");
    assert_eq!(before.row_counts.values().sum::<i64>(), 2);

    // The erasure: the key is gone live.
    state
        .resources
        .erase_patient(&Agent::system(), "patient-1")
        .await
        .expect("erase");
    assert!(matches!(
        state.keys.data_key("patient-1").await,
        Err(Error::KeyMissing(_))
    ));

    // Restore the key-store generation taken before it (this process lets go of the key
    // store first, as the command does).
    state.keys.close().await;
    let restored = backup::restore_key_store(
        &config,
        &state.db,
        &keys_dir.join(&before.generation),
        &secret,
        &state.audit.verifiers(),
        &options,
    )
    .await
    .expect("no I/O error")
    .expect("restored");
    assert_eq!(
        restored.reshredded, 1,
        "the ledger shreds the key the backup held"
    );
    assert!(leaves_containing_db(&gateway, "shredded again").await >= 1);
    state.db.close().await;

    // The gateway after the restore: the erased patient's key is not usable, the other is.
    let again = Gateway::build(config.clone())
        .await
        .expect("build after restore");
    assert!(matches!(
        again.state.keys.data_key("patient-1").await,
        Err(Error::KeyMissing(_))
    ));
    again
        .state
        .keys
        .data_key("patient-2")
        .await
        .expect("untouched key");

    // Within the retention the generation stays; after it, the prune deletes it and the
    // retired KEK that wrapped it, so no backup holds the erased key any more.
    let taken = time::OffsetDateTime::now_utc();
    let kek = config.kek_path();
    let retired = std::path::PathBuf::from(format!(
        "{}.retired-{}",
        kek.display(),
        taken.unix_timestamp() - 60
    ));
    std::fs::write(&retired, [0u8; 32]).expect("a retired KEK");
    let days = config.backup.key_store_retention_days;
    assert_eq!(days, 35);
    let kept = backup::prune_key_store(
        &keys_dir,
        days,
        taken + time::Duration::days(i64::from(days) - 1),
        &kek,
    )
    .expect("prune");
    assert_eq!(kept, backup::Pruned::default());
    assert!(keys_dir.join(&before.generation).exists());
    let pruned = backup::prune_key_store(
        &keys_dir,
        days,
        taken + time::Duration::days(i64::from(days) + 1),
        &kek,
    )
    .expect("prune");
    assert_eq!(pruned.generations, vec![before.generation.clone()]);
    assert_eq!(pruned.retired_keks, vec![retired.clone()]);
    assert!(!keys_dir.join(&before.generation).exists());
    assert!(!retired.exists());
    assert!(kek.exists(), "the KEK in force is never pruned");
    backup::record_prune(&again.state.db, &pruned)
        .await
        .expect("audit");
    assert!(
        leaves_containing_db(&again, "expired key-store backup generations deleted").await >= 1
    );
    again.state.db.close().await;
}

async fn leaves_containing_db(gateway: &Gateway, needle: &str) -> usize {
    gateway.state.audit.sequence(false).await.expect("sequence");
    let db = &gateway.state.db;
    let rows: Vec<Vec<u8>> = sqlx::query_scalar("SELECT body FROM audit_leaves")
        .fetch_all(db.read_pool())
        .await
        .expect("leaves");
    rows.iter()
        .filter(|body| String::from_utf8_lossy(body).contains(needle))
        .count()
}
