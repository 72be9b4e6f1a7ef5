//! Rotating the key-encryption key on both engines: every data key is re-wrapped (the
//! stored ciphertexts of the data stay byte for byte the same), the old KEK is kept aside
//! 0600, a fresh gateway reads everything; a rotation interrupted after the key store
//! committed stops start-up with a clear message and finishes when run again.

use std::os::unix::fs::PermissionsExt;

use phr_gateway::audit::Agent;
use phr_gateway::crypto::kek_rotation;
use phr_gateway::Gateway;
use sqlx::Row;

use crate::both_engines;
use crate::helpers::{numbered_observation, spawn_app, Engine, TestApp};

both_engines!(the_kek_rotates_without_re_encrypting_data_and_survives_a_crash,);

async fn wrapped_keys(app: &TestApp) -> Vec<(String, Vec<u8>)> {
    let config = app.env().config();
    let keys = phr_gateway::keystore::KeyStore::open(
        &config,
        &config.database_url(),
        phr_gateway::crypto::Kek::from_bytes(&[0u8; 32]).expect("placeholder kek"),
    )
    .await
    .expect("key store");
    let rows = keys.wrapped_keys().await.expect("rows");
    keys.close().await;
    rows
}

async fn bodies(app: &TestApp) -> Vec<Vec<u8>> {
    sqlx::query("SELECT body FROM resource_versions ORDER BY resource_id")
        .fetch_all(app.gateway().state.db.read_pool())
        .await
        .expect("bodies")
        .iter()
        .map(|row| row.get::<Vec<u8>, _>(0))
        .collect()
}

async fn readable_by_a_fresh_gateway(app: &TestApp, ids: &[String]) {
    let second = Gateway::build(app.env().config())
        .await
        .expect("a gateway starts");
    for id in ids {
        let stored = second
            .state
            .resources
            .read("p-kek", id)
            .await
            .expect("decrypts under the new KEK");
        assert!(String::from_utf8_lossy(&stored.body).contains("Observation"));
    }
    second.state.db.close().await;
}

async fn the_kek_rotates_without_re_encrypting_data_and_survives_a_crash(engine: Engine) {
    let app = spawn_app(engine).await;
    let state = &app.gateway().state;
    let mut ids = Vec::new();
    for n in 0..3 {
        let (meta, _) = state
            .resources
            .put(&Agent::system(), numbered_observation("p-kek", n))
            .await
            .expect("store");
        ids.push(meta.id);
    }
    let config = app.env().config();
    let kek_path = config.kek_path();
    let old_kek = std::fs::read(&kek_path).expect("kek");
    let wrapped_before = wrapped_keys(&app).await;
    let bodies_before = bodies(&app).await;

    let rotated = kek_rotation::rotate(&config).await.expect("rotate");
    assert_eq!(rotated.rewrapped as usize, wrapped_before.len());
    assert_eq!(rotated.already, 0);
    assert_ne!(std::fs::read(&kek_path).expect("kek"), old_kek);
    assert_eq!(std::fs::read(&rotated.retired).expect("retired"), old_kek);
    let mode = std::fs::metadata(&rotated.retired)
        .expect("meta")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let wrapped_after = wrapped_keys(&app).await;
    assert_eq!(wrapped_after.len(), wrapped_before.len());
    for ((id, before), (_, after)) in wrapped_before.iter().zip(&wrapped_after) {
        assert_ne!(before, after, "{id}'s key is re-wrapped");
    }
    assert_eq!(bodies(&app).await, bodies_before, "no data re-encrypted");
    readable_by_a_fresh_gateway(&app, &ids).await;

    // A crash after the key store committed, before the new KEK file was put in place.
    let keys = kek_rotation::prepare(&kek_path).expect("prepare");
    let store = phr_gateway::keystore::KeyStore::open(
        &config,
        &config.database_url(),
        keys.old().expect("old"),
    )
    .await
    .expect("store");
    store
        .rewrap_all(&keys.old().expect("old"), &keys.new_kek().expect("new"))
        .await
        .expect("rewrap");
    store.close().await;
    let refused = match Gateway::build(app.env().config()).await {
        Ok(_) => panic!("started with an interrupted rotation"),
        Err(e) => e.to_string(),
    };
    assert!(refused.contains("rotation was interrupted"), "{refused}");
    let resumed = kek_rotation::rotate(&config).await.expect("resume");
    assert_eq!(resumed.rewrapped, 0);
    assert_eq!(resumed.already as usize, wrapped_before.len());
    readable_by_a_fresh_gateway(&app, &ids).await;
    app.stop().await;
}
