//! The resource store on both engines: idempotent versioned writes, encryption at rest,
//! streaming reads, crypto-shredding, and all-or-nothing writes.

use futures::TryStreamExt;
use phr_gateway::audit::Agent;
use phr_gateway::provenance::{provenance_for, Origin};
use phr_gateway::store::resources::{NewResource, ResourceMeta, SourceIdentity, WriteOutcome};
use phr_gateway::{Error, Gateway};
use sha2::{Digest, Sha256};
use sqlx::Row;

use crate::both_engines;
use crate::helpers::{Engine, TestEnv};

both_engines!(
    writes_are_idempotent_and_versioned,
    content_digest_is_the_key_without_version_id,
    two_sources_never_collide,
    streaming_read_returns_every_current_resource,
    bodies_are_encrypted_at_rest,
    crypto_shredding_makes_data_unreadable,
    failed_write_leaves_nothing_half_written,
    bad_resources_are_refused_and_nothing_is_written,
    batches_are_atomic_and_audited_once,
    a_batch_and_its_provenance_are_one_write,
);

fn observation(source_id: &str, marker: &str) -> Vec<u8> {
    // Deliberately odd formatting and an unknown field: bodies must be kept as received.
    format!(
        "{{ \"resourceType\" : \"Observation\", \"id\": \"{source_id}\", \"status\": \"final\",\n  \"x-unknown\": {{\"kept\": true}}, \"note\": [{{\"text\": \"{marker}\"}}] }}"
    )
    .into_bytes()
}

fn new_resource(
    patient: &str,
    source: &str,
    id: &str,
    version: Option<&str>,
    body: Vec<u8>,
) -> NewResource {
    NewResource {
        patient_id: patient.into(),
        category: "checkup".into(),
        source: SourceIdentity {
            source: source.into(),
            resource_type: "Observation".into(),
            source_resource_id: id.into(),
            version_id: version.map(str::to_string),
        },
        body,
    }
}

async fn count(gateway: &Gateway, table: &str) -> i64 {
    sqlx::query(&format!("SELECT COUNT(*) FROM {table}"))
        .fetch_one(gateway.state.db.read_pool())
        .await
        .expect("count")
        .get(0)
}

async fn writes_are_idempotent_and_versioned(engine: Engine) {
    let env = TestEnv::new(engine).await;
    let gateway = Gateway::build(env.config()).await.expect("build");
    let store = &gateway.state.resources;
    let agent = Agent::system();
    let v1 = observation("obs-1", "first");
    let (meta1, outcome) = store
        .put(
            &agent,
            new_resource("p1", "hospital-a", "obs-1", Some("1"), v1.clone()),
        )
        .await
        .expect("put v1");
    assert_eq!(outcome, WriteOutcome::Created);
    assert_eq!(meta1.version, 1);
    assert_ne!(meta1.id, "obs-1", "the gateway assigns its own ids");
    assert_eq!(meta1.digest, <[u8; 32]>::from(Sha256::digest(&v1)));

    let leaves_before = count(&gateway, "audit_leaves").await;
    let (again, outcome) = store
        .put(
            &agent,
            new_resource("p1", "hospital-a", "obs-1", Some("1"), v1.clone()),
        )
        .await
        .expect("put v1 again");
    assert_eq!(outcome, WriteOutcome::Unchanged);
    assert_eq!(again.id, meta1.id);
    assert_eq!(count(&gateway, "resource_versions").await, 1);
    assert_eq!(
        count(&gateway, "audit_leaves").await,
        leaves_before,
        "a no-op writes nothing"
    );

    let v2 = observation("obs-1", "corrected");
    let (meta2, outcome) = store
        .put(
            &agent,
            new_resource("p1", "hospital-a", "obs-1", Some("2"), v2.clone()),
        )
        .await
        .expect("put v2");
    assert_eq!(outcome, WriteOutcome::NewVersion);
    assert_eq!((meta2.id.as_str(), meta2.version), (meta1.id.as_str(), 2));
    assert_eq!(
        count(&gateway, "audit_leaves").await,
        leaves_before + 1,
        "each write is audited"
    );

    let current = store.read("p1", &meta1.id).await.expect("read");
    assert_eq!(
        current.body, v2,
        "the body comes back byte for byte as received"
    );
    assert_eq!(current.meta.version, 2);
    let history = store.history("p1", &meta1.id).await.expect("history");
    assert_eq!(history.len(), 2);
    assert_eq!(history[0].body, v1);
    assert_eq!(history[1].body, v2);
    assert_eq!(history[0].meta.source_version, "version:1");

    // Another patient cannot reach it by id.
    assert!(matches!(
        store.read("p2", &meta1.id).await,
        Err(Error::NotFound(_))
    ));
    assert!(matches!(
        store.read("p1", "no-such-id").await,
        Err(Error::NotFound(_))
    ));
}

async fn content_digest_is_the_key_without_version_id(engine: Engine) {
    let env = TestEnv::new(engine).await;
    let gateway = Gateway::build(env.config()).await.expect("build");
    let store = &gateway.state.resources;
    let agent = Agent::system();
    let body = observation("o", "a");
    let put = |body: Vec<u8>| store.put(&agent, new_resource("p1", "portal", "o", None, body));
    let (first, outcome) = put(body.clone()).await.expect("put");
    assert_eq!(outcome, WriteOutcome::Created);
    assert_eq!(
        first.source_version,
        format!("sha256:{}", hex::encode(Sha256::digest(&body)))
    );
    assert_eq!(
        put(body.clone()).await.expect("again").1,
        WriteOutcome::Unchanged
    );
    assert_eq!(
        put(observation("o", "b")).await.expect("changed").1,
        WriteOutcome::NewVersion
    );
}

async fn two_sources_never_collide(engine: Engine) {
    let env = TestEnv::new(engine).await;
    let gateway = Gateway::build(env.config()).await.expect("build");
    let store = &gateway.state.resources;
    let agent = Agent::system();
    let (a, _) = store
        .put(
            &agent,
            new_resource(
                "p1",
                "hospital-a",
                "1",
                Some("1"),
                observation("1", "from a"),
            ),
        )
        .await
        .expect("a");
    let (b, outcome) = store
        .put(
            &agent,
            new_resource(
                "p1",
                "hospital-b",
                "1",
                Some("1"),
                observation("1", "from b"),
            ),
        )
        .await
        .expect("b");
    assert_eq!(outcome, WriteOutcome::Created);
    assert_ne!(a.id, b.id);
    assert_eq!(store.count("p1").await.expect("count"), 2);
}

async fn streaming_read_returns_every_current_resource(engine: Engine) {
    let env = TestEnv::new(engine).await;
    let gateway = Gateway::build(env.config()).await.expect("build");
    let store = &gateway.state.resources;
    let agent = Agent::system();
    // Sixty resources, then a second version of ten: the stream gives only current ones.
    for (range, version) in [(0..60, "1"), (0..10, "2")] {
        for i in range {
            let id = format!("o{i}");
            let body = observation(&id, &format!("v{version}-{i}"));
            store
                .put(&agent, new_resource("p1", "h", &id, Some(version), body))
                .await
                .expect("put");
        }
    }
    store
        .put(
            &agent,
            new_resource("p2", "h", "other", Some("1"), observation("other", "p2")),
        )
        .await
        .expect("other patient");
    let stream = store.stream_current("p1").await.expect("stream");
    let all: Vec<_> = stream.try_collect().await.expect("collect");
    assert_eq!(all.len(), 60);
    let texts: Vec<String> = all
        .iter()
        .map(|r| String::from_utf8(r.body.clone()).expect("utf8"))
        .collect();
    assert_eq!(texts.iter().filter(|t| t.contains("v2-")).count(), 10);
    assert!(texts.iter().all(|t| !t.contains("\"p2\"")));
    assert!(all.iter().all(|r| r.meta.patient_id == "p1"));
}

async fn bodies_are_encrypted_at_rest(engine: Engine) {
    let env = TestEnv::new(engine).await;
    let gateway = Gateway::build(env.config()).await.expect("build");
    let marker = "PLAINTEXT-MARKER-こんにちは";
    gateway
        .state
        .resources
        .put(
            &Agent::system(),
            new_resource("p1", "h", "o1", Some("1"), observation("o1", marker)),
        )
        .await
        .expect("put");
    let rows = sqlx::query("SELECT body FROM resource_versions")
        .fetch_all(gateway.state.db.read_pool())
        .await
        .expect("select");
    for row in rows {
        let stored: Vec<u8> = row.get(0);
        assert!(
            !contains(&stored, marker.as_bytes()),
            "body stored in clear"
        );
        assert!(!contains(&stored, b"Observation"));
    }
    if engine == Engine::Sqlite {
        let dir = env.config().data_dir;
        for file in ["gateway.db", "gateway.db-wal"] {
            if let Ok(bytes) = std::fs::read(dir.join(file)) {
                assert!(
                    !contains(&bytes, marker.as_bytes()),
                    "{file} holds the plaintext"
                );
            }
        }
    }
}

async fn crypto_shredding_makes_data_unreadable(engine: Engine) {
    let env = TestEnv::new(engine).await;
    let gateway = Gateway::build(env.config()).await.expect("build");
    let store = &gateway.state.resources;
    let agent = Agent::system();
    let (meta, _) = store
        .put(
            &agent,
            new_resource("p1", "h", "o1", Some("1"), observation("o1", "secret")),
        )
        .await
        .expect("put");
    store
        .put(
            &agent,
            new_resource("p2", "h", "o1", Some("1"), observation("o1", "other")),
        )
        .await
        .expect("put other");

    // The wrapped key as the key store holds it, read past the gateway's API.
    let wrapped = wrapped_key(&env, engine, "p1")
        .await
        .expect("key exists before shredding");
    assert!(wrapped.len() >= 32);
    if engine == Engine::Sqlite {
        let file_and_wal = key_store_bytes(&env);
        assert!(
            contains(&file_and_wal, &wrapped),
            "sanity: the key is in the key store files"
        );
    }

    assert!(store.shred_patient(&agent, "p1").await.expect("shred"));

    assert!(wrapped_key(&env, engine, "p1").await.is_none());
    if engine == Engine::Sqlite {
        assert!(
            !contains(&key_store_bytes(&env), &wrapped),
            "the wrapped key's bytes are still in keys.db or its WAL"
        );
    }
    // The ciphertext is still in the main database, but nothing can decrypt it.
    assert_eq!(count(&gateway, "resource_versions").await, 2);
    assert!(matches!(
        store.read("p1", &meta.id).await,
        Err(Error::KeyMissing(_))
    ));
    assert!(matches!(
        store.stream_current("p1").await,
        Err(Error::KeyMissing(_))
    ));
    assert!(matches!(
        store.history("p1", &meta.id).await,
        Err(Error::KeyMissing(_))
    ));
    // Other patients are untouched.
    let others: Vec<_> = store
        .stream_current("p2")
        .await
        .expect("p2")
        .try_collect()
        .await
        .expect("p2 rows");
    assert_eq!(others.len(), 1);
    // A write for the shredded patient makes a new key; the old data stays unreadable.
    store
        .put(
            &agent,
            new_resource("p1", "h", "o2", Some("1"), observation("o2", "new")),
        )
        .await
        .expect("new data after shredding");
    assert!(store.read("p1", &meta.id).await.is_err());
}

async fn failed_write_leaves_nothing_half_written(engine: Engine) {
    let env = TestEnv::new(engine).await;
    let gateway = Gateway::build(env.config()).await.expect("build");
    let store = &gateway.state.resources;
    let agent = Agent::system();
    // Make the patient's key exist first, so only the write itself is under test.
    store
        .put(
            &agent,
            new_resource("p1", "h", "seed", Some("1"), observation("seed", "s")),
        )
        .await
        .expect("seed");
    for point in [
        "resources.put.between_statements",
        "resources.put.before_audit",
        "resources.put.before_commit",
    ] {
        for (id, version) in [("new-resource", "1"), ("seed", "2")] {
            let before = (
                count(&gateway, "resources").await,
                count(&gateway, "resource_versions").await,
                count(&gateway, "audit_leaves").await,
            );
            gateway.state.db.inject_fault(point);
            let result = store
                .put(
                    &agent,
                    new_resource("p1", "h", id, Some(version), observation(id, "x")),
                )
                .await;
            assert!(
                matches!(result, Err(Error::InjectedFault(p)) if p == point),
                "{point}: {result:?}"
            );
            let after = (
                count(&gateway, "resources").await,
                count(&gateway, "resource_versions").await,
                count(&gateway, "audit_leaves").await,
            );
            assert_eq!(before, after, "{point} ({id}): something was half-written");
            let current = store
                .read("p1", &store_id(&gateway, "seed").await)
                .await
                .expect("seed");
            assert_eq!(
                current.meta.version, 1,
                "{point}: the old version stays current"
            );
        }
    }
    // And once the fault is gone, the same write goes through.
    let (_, outcome) = store
        .put(
            &agent,
            new_resource("p1", "h", "seed", Some("2"), observation("seed", "x")),
        )
        .await
        .expect("retry");
    assert_eq!(outcome, WriteOutcome::NewVersion);
}

async fn bad_resources_are_refused_and_nothing_is_written(engine: Engine) {
    let env = TestEnv::new(engine).await;
    let mut config = env.config();
    config.store.max_resource_bytes = 2048;
    let gateway = Gateway::build(config).await.expect("build");
    let store = &gateway.state.resources;
    let agent = Agent::system();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("not JSON", b"{not json".to_vec()),
        ("non-UTF-8", vec![b'{', 0xff, 0xfe, b'}']),
        ("wrong type", br#"{"resourceType":"Patient"}"#.to_vec()),
        ("no type", br#"{"id":"x"}"#.to_vec()),
        ("oversized", observation("o", &"x".repeat(4096))),
    ];
    let before = (
        count(&gateway, "resources").await,
        count(&gateway, "audit_leaves").await,
    );
    for (name, body) in cases {
        let result = store
            .put(&agent, new_resource("p1", "h", "o", Some("1"), body))
            .await;
        assert!(
            matches!(result, Err(Error::Invalid(_)) | Err(Error::TooLarge { .. })),
            "{name}: {result:?}"
        );
    }
    let mut empty_source = new_resource("p1", "", "o", Some("1"), observation("o", "x"));
    empty_source.source.source.clear();
    assert!(matches!(
        store.put(&agent, empty_source).await,
        Err(Error::Invalid(_))
    ));
    let after = (
        count(&gateway, "resources").await,
        count(&gateway, "audit_leaves").await,
    );
    assert_eq!(before, after);
}

async fn store_id(gateway: &Gateway, source_id: &str) -> String {
    sqlx::query("SELECT id FROM resources WHERE source_resource_id = $1")
        .bind(source_id)
        .fetch_one(gateway.state.db.read_pool())
        .await
        .expect("id")
        .get(0)
}

/// Reads the wrapped key straight from the key store, as an attacker with the files would.
async fn wrapped_key(env: &TestEnv, engine: Engine, patient: &str) -> Option<Vec<u8>> {
    sqlx::any::install_default_drivers();
    let url = match engine {
        Engine::Sqlite => format!("sqlite://{}", env.keys_db().display()),
        Engine::Postgres => env.database_url.clone().expect("pg url"),
    };
    let table = match engine {
        Engine::Sqlite => "data_keys",
        Engine::Postgres => "phr_keys.data_keys",
    };
    let pool = sqlx::any::AnyPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .expect("connect to key store");
    let row = sqlx::query(&format!(
        "SELECT wrapped_key FROM {table} WHERE patient_id = $1"
    ))
    .bind(patient)
    .fetch_optional(&pool)
    .await
    .expect("select key");
    pool.close().await;
    row.map(|r| r.get(0))
}

fn key_store_bytes(env: &TestEnv) -> Vec<u8> {
    let mut all = Vec::new();
    for suffix in ["", "-wal"] {
        let path = format!("{}{suffix}", env.keys_db().display());
        if let Ok(bytes) = std::fs::read(&path) {
            all.extend(bytes);
        }
    }
    all
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

async fn batches_are_atomic_and_audited_once(engine: Engine) {
    let env = TestEnv::new(engine).await;
    let gateway = Gateway::build(env.config()).await.expect("build");
    let store = &gateway.state.resources;
    let agent = Agent::system();
    let batch = |ids: &[&str]| -> Vec<NewResource> {
        ids.iter()
            .map(|id| new_resource("p1", "h", id, Some("1"), observation(id, id)))
            .collect()
    };
    // One bad member refuses the whole batch before anything is written.
    let mut bad = batch(&["a", "b"]);
    bad.push(new_resource("p1", "h", "c", Some("1"), b"{oops".to_vec()));
    assert!(matches!(
        store.put_batch(&agent, bad).await,
        Err(Error::Invalid(_))
    ));
    assert_eq!(count(&gateway, "resources").await, 0);

    // A failure at commit time keeps none of it.
    gateway.state.db.inject_fault("resources.put.before_commit");
    assert!(store
        .put_batch(&agent, batch(&["a", "b", "c"]))
        .await
        .is_err());
    assert_eq!(count(&gateway, "resources").await, 0);

    let leaves = count(&gateway, "audit_leaves").await;
    let written = store
        .put_batch(&agent, batch(&["a", "b", "c"]))
        .await
        .expect("batch");
    assert!(written.iter().all(|(_, o)| *o == WriteOutcome::Created));
    assert_eq!(count(&gateway, "resources").await, 3);
    assert_eq!(
        count(&gateway, "audit_leaves").await,
        leaves + 1,
        "one leaf per batch"
    );
    let leaf: Vec<u8> = sqlx::query("SELECT body FROM audit_leaves ORDER BY id DESC LIMIT 1")
        .fetch_one(gateway.state.db.read_pool())
        .await
        .expect("leaf")
        .get(0);
    let leaf: serde_json::Value = serde_json::from_slice(&leaf).expect("json");
    let entities = leaf["entity"].as_array().expect("entities");
    assert_eq!(entities.len(), 4, "the patient and each resource written");
    for (meta, _) in &written {
        assert!(entities.iter().any(|e| e["what"]["reference"]
            .as_str()
            .is_some_and(|r| r.contains(&meta.id))));
    }
    // Duplicates inside one batch: the same version once, a new version after it.
    let dupes = vec![
        new_resource("p1", "h", "d", Some("1"), observation("d", "one")),
        new_resource("p1", "h", "d", Some("1"), observation("d", "one")),
        new_resource("p1", "h", "d", Some("2"), observation("d", "two")),
    ];
    let written_dupes = store.put_batch(&agent, dupes).await.expect("dupes");
    let outcomes: Vec<_> = written_dupes.iter().map(|(m, o)| (m.version, *o)).collect();
    assert_eq!(
        outcomes,
        vec![
            (1, WriteOutcome::Created),
            (1, WriteOutcome::Unchanged),
            (2, WriteOutcome::NewVersion)
        ]
    );
    let id = &written_dupes[0].0.id;
    assert_eq!(
        store.read("p1", id).await.expect("read").body,
        observation("d", "two")
    );
    assert_eq!(store.history("p1", id).await.expect("history").len(), 2);
    let leaves = leaves + 1;

    // Re-sending the same batch writes nothing and audits nothing.
    let again = store
        .put_batch(&agent, batch(&["a", "b", "c"]))
        .await
        .expect("again");
    assert!(again.iter().all(|(_, o)| *o == WriteOutcome::Unchanged));
    assert_eq!(count(&gateway, "audit_leaves").await, leaves + 1);
}

/// A batch's Provenance is written in the batch's statements and named in its audit leaf:
/// new when the batch wrote something (no lookup); looked up when the batch wrote nothing,
/// so the same arrival again adds nothing, while another source of the same versions gets
/// its own Provenance.
async fn a_batch_and_its_provenance_are_one_write(engine: Engine) {
    let env = TestEnv::new(engine).await;
    let gateway = Gateway::build(env.config()).await.expect("build");
    let store = &gateway.state.resources;
    let agent = Agent::system();
    let batch = || -> Vec<NewResource> {
        ["a", "b"]
            .iter()
            .map(|id| new_resource("p1", "h", id, Some("1"), observation(id, id)))
            .collect()
    };
    let write = |source_id: &'static str| {
        let gateway = &gateway;
        let agent = agent.clone();
        async move {
            let store = &gateway.state.resources;
            let origin = Origin {
                patient_id: "p1",
                source_id,
                source_display: source_id,
                policy: None,
                entity: None,
            };
            let provenance = |_page: usize, written: &[(ResourceMeta, WriteOutcome)]| {
                let targets: Vec<&ResourceMeta> = written.iter().map(|(meta, _)| meta).collect();
                provenance_for(&origin, &targets)
            };
            let keys = store.data_keys_for(&batch()).await.expect("keys");
            let mut tx = gateway.state.db.begin().await.expect("begin");
            let written = store
                .put_batch_in(&mut tx, &agent, batch(), &keys, None, Some(&provenance))
                .await
                .expect("write");
            tx.commit().await.expect("commit");
            written
        }
    };
    let provenances = || async {
        sqlx::query("SELECT COUNT(*) FROM resources WHERE resource_type = 'Provenance'")
            .fetch_one(gateway.state.db.read_pool())
            .await
            .expect("count")
            .get::<i64, _>(0)
    };
    let newest_leaf = || async {
        let body: Vec<u8> = sqlx::query("SELECT body FROM audit_leaves ORDER BY id DESC LIMIT 1")
            .fetch_one(gateway.state.db.read_pool())
            .await
            .expect("leaf")
            .get(0);
        String::from_utf8(body).expect("utf-8")
    };

    // The patient's data key first: its creation is audited on its own.
    store.data_keys_for(&batch()).await.expect("keys");
    let leaves = count(&gateway, "audit_leaves").await;
    let written = write("s1").await;
    assert!(written.iter().all(|(_, o)| *o == WriteOutcome::Created));
    assert_eq!(written.len(), 2, "the outcomes are the batch's own");
    assert_eq!(provenances().await, 1);
    assert_eq!(count(&gateway, "resources").await, 3);
    assert_eq!(
        count(&gateway, "audit_leaves").await,
        leaves + 1,
        "one leaf"
    );
    let id: String =
        sqlx::query_scalar("SELECT id FROM resources WHERE resource_type = 'Provenance'")
            .fetch_one(gateway.state.db.read_pool())
            .await
            .expect("provenance");
    let leaf = newest_leaf().await;
    assert!(
        leaf.contains(&format!("Provenance/{id}/_history/1")),
        "{leaf}"
    );
    for (meta, _) in &written {
        assert!(leaf.contains(&meta.history_reference()), "{leaf}");
    }
    let body = store.read("p1", &id).await.expect("read provenance").body;
    let body: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(body["target"].as_array().map(Vec::len), Some(2));

    // The same arrival again: nothing new, its Provenance is found, nothing written.
    let again = write("s1").await;
    assert!(again.iter().all(|(_, o)| *o == WriteOutcome::Unchanged));
    assert_eq!(provenances().await, 1);
    assert_eq!(count(&gateway, "audit_leaves").await, leaves + 1);

    // Another source of the same versions: nothing new but its own Provenance.
    let other = write("s2").await;
    assert!(other.iter().all(|(_, o)| *o == WriteOutcome::Unchanged));
    assert_eq!(provenances().await, 2);
    assert_eq!(count(&gateway, "audit_leaves").await, leaves + 2);
    assert_eq!(count(&gateway, "resources").await, 4);
}
