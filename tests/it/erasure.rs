//! "Delete my data" end to end on both engines: step-up first (a wrong password deletes
//! nothing), then every consent, pull instruction and upload permission is withdrawn, the
//! data key destroyed and the record deleted; a copy of the encrypted rows taken before
//! (a backup) can no longer be decrypted; tokens stop working; a signed receipt explains
//! what happens to backups and recipients; another patient's record is untouched.

use phr_adapters::fhir_r4::simulator::{HospitalSimulator, SimulatorConfig};
use phr_consent::DataCategory;
use phr_gateway::audit::AccountRole;
use phr_gateway::Error;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::both_engines;
use crate::fhir_api::{seed, token, PATIENT};
use crate::helpers::{count, hospital_source, leaves_containing, receipt_claims, Engine};
use crate::oauth::env_with;

both_engines!(deleting_my_data_leaves_nothing_decryptable,);

async fn erase(env: &crate::oauth::Env, session: &str, password: &str) -> reqwest::Response {
    env.app
        .client
        .post(env.url("/patient/erasure"))
        .bearer_auth(session)
        .json(&json!({"password": password}))
        .send()
        .await
        .expect("erase")
}

async fn deleting_my_data_leaves_nothing_decryptable(engine: Engine) {
    let hospital = HospitalSimulator::start(SimulatorConfig {
        patients: 1,
        ..SimulatorConfig::default()
    })
    .await
    .expect("hospital");
    let base_url = hospital.base_url.clone();
    let env = env_with(engine, move |c| {
        c.sources = vec![hospital_source(base_url, 50)]
    })
    .await;
    seed(&env).await;
    let (access, consent_id) = token(
        &env,
        &[DataCategory::Observations],
        "launch/patient patient/Observation.rs",
    )
    .await;
    let state = &env.app.gateway().state;
    let session = env
        .app
        .sign_in(AccountRole::Patient, "patient1", Some(PATIENT))
        .await;
    let password = "correct horse battery staple";
    // A pull instruction waiting for the hospital's sign-in.
    let given = env
        .app
        .client
        .post(env.url("/patient/pull-instructions"))
        .bearer_auth(&session)
        .json(&json!({"source_id": "hospital", "categories": ["observations"]}))
        .send()
        .await
        .expect("give");
    assert_eq!(given.status(), StatusCode::CREATED);
    let (status, _) = (
        env.app
            .client
            .get(env.url("/fhir/Observation"))
            .bearer_auth(&access)
            .send()
            .await
            .expect("read")
            .status(),
        (),
    );
    assert_eq!(status, StatusCode::OK);
    // A "backup": the encrypted rows as they are now.
    let backup: Vec<Vec<u8>> =
        sqlx::query_scalar("SELECT body FROM resource_versions WHERE patient_id = $1")
            .bind(PATIENT)
            .fetch_all(state.db.read_pool())
            .await
            .expect("backup");
    assert!(backup.len() >= 10);
    let others_before = count(
        &env.app,
        "SELECT COUNT(*) FROM resources WHERE patient_id = 'patient-2'",
    )
    .await;
    assert_eq!(others_before, 1);

    // Step-up: a wrong password deletes nothing.
    let refused = erase(&env, &session, "not my password").await;
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    let problem: Value = refused.json().await.expect("problem");
    assert!(problem["detail"].as_str().is_some());
    assert_eq!(
        count(
            &env.app,
            "SELECT COUNT(*) FROM resources WHERE patient_id = 'patient-1'"
        )
        .await,
        backup.len() as i64 - 1,
        "one resource has two versions; nothing deleted"
    );

    let erased = erase(&env, &session, password).await;
    assert_eq!(erased.status(), StatusCode::OK);
    let erased: Value = erased.json().await.expect("json");
    assert_eq!(erased["deleted_resources"], backup.len() as u64 - 1);
    assert_eq!(erased["data_key_destroyed"], true);
    assert_eq!(erased["withdrawn_consents"], 1);
    assert_eq!(erased["withdrawn_pull_instructions"], 1);
    assert!(erased["explanation"]["ja"]
        .as_str()
        .is_some_and(|t| t.contains("バックアップ")));
    assert!(erased["explanation"]["en"]
        .as_str()
        .is_some_and(|t| t.contains("backups")));
    let claims = receipt_claims(&env.app, erased["receipt"].as_str().expect("receipt")).await;
    assert_eq!(claims["receipt_type"], "erasure");
    assert_eq!(claims["subject"], PATIENT);

    // Nothing of the patient's is left, and the backup cannot be decrypted: no key.
    for table in ["resources", "resource_versions", "reconciliation_keys"] {
        let left = count(
            &env.app,
            &format!("SELECT COUNT(*) FROM {table} WHERE patient_id = 'patient-1'"),
        )
        .await;
        assert_eq!(left, 0, "{table}");
    }
    assert!(matches!(
        state.keys.data_key(PATIENT).await,
        Err(Error::KeyMissing(_))
    ));
    let sealed_secrets = count(
        &env.app,
        "SELECT COUNT(*) FROM source_links WHERE patient_id = 'patient-1'
             AND (credentials_sealed IS NOT NULL OR pending_sealed IS NOT NULL)",
    )
    .await;
    assert_eq!(sealed_secrets, 0);
    // The recipient's token is revoked; the consent is withdrawn.
    let after = env
        .app
        .client
        .get(env.url("/fhir/Observation"))
        .bearer_auth(&access)
        .send()
        .await
        .expect("read");
    assert_eq!(after.status(), StatusCode::UNAUTHORIZED);
    let consent: Value = env
        .app
        .client
        .get(env.url(&format!("/api/consents/{consent_id}")))
        .bearer_auth(&session)
        .send()
        .await
        .expect("consent")
        .json()
        .await
        .expect("json");
    assert_ne!(consent["status"], "active", "{consent}");
    // The patient's own view is empty; another patient's record is untouched.
    let own = env
        .app
        .client
        .get(env.url("/fhir/Observation"))
        .bearer_auth(&session)
        .send()
        .await
        .expect("own");
    assert_eq!(own.status(), StatusCode::OK);
    let own: Value = own.json().await.expect("json");
    assert_eq!(own["total"], 0);
    assert_eq!(
        count(
            &env.app,
            "SELECT COUNT(*) FROM resources WHERE patient_id = 'patient-2'"
        )
        .await,
        others_before
    );
    assert!(state.keys.data_key("patient-2").await.is_ok());
    assert!(leaves_containing(&env.app, "record erased at the patient's request").await >= 1);
    assert!(leaves_containing(&env.app, "data-key-destroyed").await >= 1);
    assert!(leaves_containing(&env.app, "step-up re-authentication").await >= 1);
    hospital.shutdown().await;
    env.stop().await;
}
