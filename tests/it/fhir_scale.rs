//! Two gateway processes behind one PostgreSQL serve the FHIR API consistently: an app's
//! token issued by process A reads and searches on process B with the same results; data
//! stored through either process is found by a search on the other; the patient withdraws
//! the consent on A and the very next request on B is refused with an OperationOutcome.
//! (SQLite is the one-process store: PostgreSQL only.)

use std::collections::BTreeMap;

use phr_consent::DataCategory;
use phr_gateway::audit::{AccountRole, Agent};
use phr_gateway::store::resources::{NewResource, SourceIdentity};
use phr_gateway::Gateway;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::fhir_api::{seed, token, PATIENT};
use crate::helpers::Engine;
use crate::oauth::{env, Env};

/// `GET base + path` with the app's token; every answer is FHIR JSON.
async fn fhir(env: &Env, base: &str, path: &str, token: &str) -> (StatusCode, Value) {
    let url = if path.starts_with("https://") {
        path.to_string()
    } else {
        format!("{base}{path}")
    };
    let response = env
        .app
        .client
        .get(&url)
        .bearer_auth(token)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = response.status();
    assert_eq!(
        response.headers()["content-type"],
        "application/fhir+json",
        "{url}"
    );
    (status, response.json().await.expect("json"))
}

/// A search on one process, every page: the first page's `total` (absent when content
/// parameters filter) and the resources by type and id. Each `next` link names the process
/// that answered.
async fn search(
    env: &Env,
    base: &str,
    path: &str,
    token: &str,
) -> (Option<u64>, BTreeMap<String, Value>) {
    let (status, first) = fhir(env, base, path, token).await;
    assert_eq!(status, StatusCode::OK, "{base}{path}: {first}");
    let total = first["total"].as_u64();
    let mut found = BTreeMap::new();
    let mut page = Some(first);
    let mut pages = 0;
    while let Some(bundle) = page.take() {
        for entry in bundle["entry"].as_array().into_iter().flatten() {
            let resource = entry["resource"].clone();
            let key = format!(
                "{}/{}",
                resource["resourceType"].as_str().expect("type"),
                resource["id"].as_str().expect("id")
            );
            assert!(found.insert(key, resource).is_none(), "a resource twice");
        }
        let next = bundle["link"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|l| l["relation"] == "next")
            .and_then(|l| l["url"].as_str())
            .map(str::to_string);
        if let Some(next) = next {
            assert!(next.starts_with(base), "{next} is not on {base}");
            let (status, bundle) = fhir(env, base, &next, token).await;
            assert_eq!(status, StatusCode::OK, "{next}: {bundle}");
            page = Some(bundle);
        }
        pages += 1;
        assert!(pages < 50, "paging never ends");
    }
    (total, found)
}

fn observation(id: &str, loinc: &str) -> NewResource {
    NewResource {
        patient_id: PATIENT.into(),
        category: "observations".into(),
        source: SourceIdentity {
            source: "hospital".into(),
            resource_type: "Observation".into(),
            source_resource_id: id.into(),
            version_id: Some("1".into()),
        },
        body: json!({
            "resourceType": "Observation",
            "id": id,
            "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": loinc}]},
            "subject": {"reference": "Patient/hosp-1"},
            "effectiveDateTime": "2024-07-01",
            "valueQuantity": {"value": 61.5, "unit": "kg"}
        })
        .to_string()
        .into_bytes(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_on_one_postgresql_serve_the_fhir_api_consistently() {
    let env = env(Engine::Postgres).await;
    seed(&env).await;
    // Conditions are not consented to.
    let (token, consent_id) = token(
        &env,
        &[DataCategory::Demographics, DataCategory::Observations],
        "launch/patient patient/*.rs",
    )
    .await;

    // Process B: its own listener and state, the same database, keys and data directory.
    let mut config = env.app.env().config();
    config.pull.workers = 0;
    let second = Gateway::build(config)
        .await
        .expect("second process")
        .start()
        .await
        .expect("start");
    let a = env.app.base.clone();
    let b = format!("https://localhost:{}", second.addr.port());
    assert_ne!(a, b);

    // A token from A's token endpoint reads and searches on B with the same results.
    for path in [
        "/fhir/Observation?_count=3",
        "/fhir/Observation?code=2345-7&_count=4",
        "/fhir/Observation?category=vital-signs",
        &format!("/fhir/Patient/{PATIENT}/$everything?_count=4"),
    ] {
        let (total_a, on_a) = search(&env, &a, path, &token).await;
        let (total_b, on_b) = search(&env, &b, path, &token).await;
        assert!(!on_a.is_empty(), "{path}");
        assert_eq!(total_a, total_b, "{path}");
        assert_eq!(
            on_a, on_b,
            "{path}: the same resources, byte for byte as JSON"
        );
    }
    let (_, observations) = search(&env, &b, "/fhir/Observation", &token).await;
    assert_eq!(observations.len(), 8);
    let some_observation = observations.keys().next().expect("one").clone();
    for path in [
        format!("/fhir/Patient/{PATIENT}"),
        format!("/fhir/{some_observation}"),
        format!("/fhir/{some_observation}/_history"),
    ] {
        let (status_a, on_a) = fhir(&env, &a, &path, &token).await;
        let (status_b, on_b) = fhir(&env, &b, &path, &token).await;
        assert_eq!(status_a, StatusCode::OK, "{path}: {on_a}");
        assert_eq!(status_b, StatusCode::OK, "{path}: {on_b}");
        if on_a["resourceType"] == "Bundle" {
            // Entries' full URLs name the process; the resources are the same.
            let resources = |bundle: &Value| -> Vec<Value> {
                bundle["entry"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|e| e["resource"].clone())
                    .collect()
            };
            assert_eq!(on_a["total"], on_b["total"], "{path}");
            assert!(!resources(&on_a).is_empty(), "{path}");
            assert_eq!(resources(&on_a), resources(&on_b), "{path}");
        } else {
            assert_eq!(on_a, on_b, "{path}");
        }
    }
    // What the consent does not cover is refused by both.
    for base in [&a, &b] {
        let (status, outcome) = fhir(&env, base, "/fhir/Condition", &token).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{base}");
        assert_eq!(outcome["resourceType"], "OperationOutcome");
    }

    // Stored through A, found on B; stored through B, found on A.
    env.app
        .gateway()
        .state
        .resources
        .put_batch(&Agent::system(), vec![observation("w-1", "29463-7")])
        .await
        .expect("store on A");
    let (_, found) = search(&env, &b, "/fhir/Observation?code=29463-7", &token).await;
    assert_eq!(found.len(), 1);
    let weight = found.values().next().expect("the weight");
    assert_eq!(weight["valueQuantity"]["value"], 61.5);
    second
        .state
        .resources
        .put_batch(&Agent::system(), vec![observation("h-1", "8302-2")])
        .await
        .expect("store on B");
    let (_, found) = search(&env, &a, "/fhir/Observation?code=8302-2", &token).await;
    assert_eq!(found.len(), 1);
    let (total_a, on_a) = search(&env, &a, "/fhir/Observation", &token).await;
    let (total_b, on_b) = search(&env, &b, "/fhir/Observation", &token).await;
    assert_eq!((total_a, total_b), (Some(10), Some(10)));
    assert_eq!(on_a.len(), 10);
    assert_eq!(on_a, on_b);

    // The patient withdraws on A; the very next request, on B, is refused.
    let patient = env
        .app
        .sign_in(AccountRole::Patient, "patient1", Some(PATIENT))
        .await;
    let withdrawn = env
        .app
        .client
        .post(format!("{a}/api/consents/{consent_id}/withdraw"))
        .bearer_auth(&patient)
        .send()
        .await
        .expect("withdraw");
    assert_eq!(withdrawn.status(), StatusCode::OK);
    for (base, path) in [
        (&b, "/fhir/Observation".to_string()),
        (&b, format!("/fhir/Patient/{PATIENT}")),
        (&a, "/fhir/Observation".to_string()),
    ] {
        let (status, outcome) = fhir(&env, base, &path, &token).await;
        // Withdrawing revoked the consent's tokens: 401, in every process.
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{base}{path}: {outcome}");
        assert_eq!(outcome["resourceType"], "OperationOutcome", "{outcome}");
    }

    second.stop().await;
    env.stop().await;
}
