//! Pulls on the patient's instruction, end to end on both engines: the gateway, the real
//! FHIR R4 adapter and the hospital simulator over loopback HTTP.

use std::time::Duration;

use phr_adapters::fhir_r4::simulator::patient_agent::sign_in_and_decide;
use phr_adapters::fhir_r4::simulator::{
    BackendClientRegistration, HospitalSimulator, RunningSimulator, SimulatorConfig,
};
use phr_adapters::fhir_r4::BackendKey;
use phr_gateway::audit::AccountRole;
use phr_gateway::config::SourceAuth;
use phr_gateway::pull::queue::JobOutcome;
use phr_gateway::pull::worker::RunResult;
use reqwest::StatusCode;
use serde_json::Value;

use crate::both_engines;
use crate::helpers::{
    count, hospital_source, jwks, leaves_containing, make_due, receipt_claims, spawn_app_with,
    Engine, TestApp, TestEnv,
};

both_engines!(
    link_pull_and_withdraw,
    a_killed_worker_loses_nothing_and_duplicates_nothing,
    bad_items_are_refused_and_the_rest_is_kept,
    a_source_in_maintenance_degrades_without_losing_data,
    bad_instructions_and_callbacks_get_clear_errors,
    a_hospital_delivering_by_backend_services_is_linked_with_a_code,
);

const PER_PATIENT: usize = 60;

struct PullEnv {
    app: TestApp,
    hospital: RunningSimulator,
    token: String,
}

async fn pull_env(engine: Engine) -> PullEnv {
    let hospital = HospitalSimulator::start(SimulatorConfig {
        patients: 3,
        resources_per_patient: PER_PATIENT,
        offer_everything: false,
        ..SimulatorConfig::default()
    })
    .await
    .expect("simulator");
    let base_url = hospital.base_url.clone();
    let app = spawn_app_with(TestEnv::new(engine).await, move |c| {
        c.pull.workers = 0;
        c.pull.lease_secs = 2;
        c.sources = vec![hospital_source(base_url, 20)];
    })
    .await;
    let token = app
        .sign_in(AccountRole::Patient, "hanako", Some("p-hanako"))
        .await;
    PullEnv {
        app,
        hospital,
        token,
    }
}

/// Gives an instruction, signs in at the hospital as patient-0001, comes back. Returns the
/// instruction id.
async fn link(env: &PullEnv, categories: &[&str]) -> String {
    let given = env
        .app
        .client
        .post(env.app.url("/patient/pull-instructions"))
        .bearer_auth(&env.token)
        .json(&serde_json::json!({"source_id": "hospital", "categories": categories}))
        .send()
        .await
        .expect("give");
    assert_eq!(given.status(), StatusCode::CREATED);
    let given: Value = given.json().await.expect("json");
    assert_eq!(given["instruction"]["status"], "pending");
    verify_receipt(
        &env.app,
        given["receipt"].as_str().expect("receipt"),
        "given",
    )
    .await;
    let authorize_url = given["authorize_url"].as_str().expect("authorize_url");
    assert!(authorize_url.contains("code_challenge_method=S256"));
    let location = sign_in_and_decide(
        authorize_url,
        "patient-0001",
        "phr-sim-0001",
        |_| true,
        true,
    )
    .await
    .expect("patient approves at the hospital");
    assert!(
        location.starts_with(&env.app.url("/patient/sources/callback")),
        "{location}"
    );
    let linked = env
        .app
        .client
        .get(&location)
        .send()
        .await
        .expect("callback");
    assert_eq!(linked.status(), 200);
    let linked: Value = linked.json().await.expect("json");
    assert_eq!(linked["instruction"]["status"], "active");
    verify_receipt(
        &env.app,
        linked["receipt"].as_str().expect("receipt"),
        "authorised",
    )
    .await;
    linked["instruction"]["id"]
        .as_str()
        .expect("id")
        .to_string()
}

async fn verify_receipt(app: &TestApp, receipt: &str, event: &str) {
    let jwks = jwks(app).await;
    assert_eq!(
        jwks.keys.len(),
        3,
        "receipt key, source client key and ID token key"
    );
    assert!(jwks
        .keys
        .iter()
        .any(|k| k.common.key_algorithm == Some(jsonwebtoken::jwk::KeyAlgorithm::ES384)));
    let claims = receipt_claims(app, receipt).await;
    assert_eq!(claims["event"], event);
    assert_eq!(claims["receipt_type"], "pull-instruction");
    assert!(claims["notice"]["ja"]
        .as_str()
        .is_some_and(|t| !t.is_empty()));
}

/// Runs the pull worker until no job is ready.
async fn drain(app: &TestApp) -> Vec<RunResult> {
    let worker = app.gateway().state.pull_worker();
    let mut results = Vec::new();
    for _ in 0..20 {
        match worker.run_once().await.expect("worker pass") {
            Some((_, result)) => results.push(result),
            None => break,
        }
    }
    results
}

/// Withdraws an instruction through the API, with an optional body.
async fn withdraw(env: &PullEnv, token: &str, id: &str, body: Option<Value>) -> reqwest::Response {
    let request = env
        .app
        .client
        .post(
            env.app
                .url(&format!("/patient/pull-instructions/{id}/withdraw")),
        )
        .bearer_auth(token);
    let request = match body {
        Some(body) => request.json(&body),
        None => request,
    };
    request.send().await.expect("withdraw")
}

async fn detail(env: &PullEnv, id: &str) -> Value {
    env.app
        .client
        .get(env.app.url(&format!("/patient/pull-instructions/{id}")))
        .bearer_auth(&env.token)
        .send()
        .await
        .expect("detail")
        .json()
        .await
        .expect("json")
}

/// The instruction's first pull (the list is newest first; after a pull the next one is
/// already scheduled).
fn first_job(view: &Value) -> &Value {
    view["jobs"]
        .as_array()
        .and_then(|jobs| jobs.last())
        .expect("a job")
}

const CLINICAL: &str =
    "SELECT COUNT(*) FROM resources WHERE patient_id = 'p-hanako' AND category <> 'provenance'";

async fn link_pull_and_withdraw(engine: Engine) {
    let env = pull_env(engine).await;
    let all = [
        "demographics",
        "observations",
        "conditions",
        "allergies",
        "medications",
        "immunizations",
        "encounters",
        "documents",
    ];
    let id = link(&env, &all).await;
    assert_eq!(
        drain(&env.app).await,
        vec![RunResult::Finished(JobOutcome::Done)]
    );

    let expected = env.hospital.handle.resource_keys("pt000001").len() as i64;
    assert_eq!(expected, PER_PATIENT as i64);
    assert_eq!(
        count(&env.app, CLINICAL).await,
        expected,
        "every resource of the patient, once"
    );
    let provenances = count(
        &env.app,
        "SELECT COUNT(*) FROM resources WHERE category = 'provenance'",
    )
    .await;
    assert!(
        provenances >= 3,
        "one Provenance per stored page: {provenances}"
    );
    let view = detail(&env, &id).await;
    assert_eq!(
        leaves_containing(&env.app, &format!("pull instruction {id}")).await,
        1,
        "reading an instruction is audited"
    );
    assert_eq!(first_job(&view)["status"], "done");
    assert_eq!(first_job(&view)["received"], expected);
    let events: Vec<&str> = view["history"]
        .as_array()
        .expect("history")
        .iter()
        .map(|e| e["event"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(events, vec!["given", "authorised"]);
    // Pulled batches are audited per batch, naming the job.
    let batch_leaves = leaves_containing(&env.app, "pull job").await;
    assert!(
        batch_leaves >= 3 && batch_leaves < expected,
        "{batch_leaves}"
    );

    // The patient reads what arrived.
    let stream = env
        .app
        .client
        .get(env.app.url("/patient/resources"))
        .bearer_auth(&env.token)
        .send()
        .await
        .expect("read");
    assert_eq!(
        stream.text().await.expect("ndjson").lines().count() as i64,
        expected + provenances
    );

    // A second pull from the cursor finds nothing new and writes nothing.
    let mut conn = env
        .app
        .gateway()
        .state
        .db
        .write_pool()
        .acquire()
        .await
        .expect("conn");
    env.app
        .gateway()
        .state
        .queue
        .enqueue(&mut conn, &id, "p-hanako", "hospital", 0)
        .await
        .expect("enqueue");
    drop(conn);
    make_due(&env.app).await;
    assert_eq!(
        drain(&env.app).await,
        vec![RunResult::Finished(JobOutcome::Done)]
    );
    assert_eq!(count(&env.app, CLINICAL).await, expected);

    // Withdraw in one action: pulls stop, the link is revoked, the data stays.
    let withdrawn = withdraw(&env, &env.token, &id, None).await;
    assert_eq!(withdrawn.status(), 200);
    let withdrawn: Value = withdrawn.json().await.expect("json");
    assert_eq!(withdrawn["instruction"]["status"], "withdrawn");
    assert_eq!(withdrawn["revoked_at_source"], true);
    verify_receipt(
        &env.app,
        withdrawn["receipt"].as_str().expect("receipt"),
        "withdrawn",
    )
    .await;
    assert_eq!(
        count(
            &env.app,
            "SELECT COUNT(*) FROM pull_jobs WHERE status IN ('queued', 'running')"
        )
        .await,
        0
    );
    assert_eq!(
        count(
            &env.app,
            "SELECT COUNT(*) FROM source_links WHERE credentials_sealed IS NOT NULL"
        )
        .await,
        0
    );
    assert!(drain(&env.app).await.is_empty(), "nothing more is pulled");
    assert_eq!(
        count(&env.app, CLINICAL).await,
        expected,
        "data already received is kept"
    );
    let again = withdraw(&env, &env.token, &id, None).await;
    assert_eq!(again.status(), 400);

    // Someone else cannot see or withdraw it.
    let other = env
        .app
        .sign_in(AccountRole::Patient, "taro", Some("p-taro"))
        .await;
    let theirs = env
        .app
        .client
        .get(env.app.url(&format!("/patient/pull-instructions/{id}")))
        .bearer_auth(&other)
        .send()
        .await
        .expect("other");
    assert_eq!(theirs.status(), 404);
    assert_eq!(withdraw(&env, &other, &id, None).await.status(), 404);

    // A second instruction, withdrawn with deletion of what it brought.
    let second = link(&env, &["observations"]).await;
    drain(&env.app).await;
    let deleted = withdraw(
        &env,
        &env.token,
        &second,
        Some(serde_json::json!({"delete_received": true})),
    )
    .await
    .json::<Value>()
    .await
    .expect("json");
    assert!(deleted["deleted_resources"].as_i64().expect("count") >= expected);
    assert_eq!(
        count(
            &env.app,
            "SELECT COUNT(*) FROM resources WHERE source = 'hospital'"
        )
        .await,
        0
    );
    env.hospital.shutdown().await;
    env.app.stop().await;
}

async fn a_killed_worker_loses_nothing_and_duplicates_nothing(engine: Engine) {
    let env = pull_env(engine).await;
    // Slow pages, so the first worker can be killed halfway.
    env.hospital
        .handle
        .update_faults(|f| f.response_delay = Some(Duration::from_millis(300)));
    let id = link(
        &env,
        &["observations", "conditions", "medications", "immunizations"],
    )
    .await;
    let worker = env.app.gateway().state.pull_worker();
    let killed = tokio::spawn(async move { worker.run_once().await });
    // Wait until it has stored something, then kill it like a crash (no clean-up).
    for _ in 0..100 {
        if count(&env.app, CLINICAL).await > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    killed.abort();
    let partial = count(&env.app, CLINICAL).await;
    assert!(partial > 0, "the first worker stored a page before dying");
    env.hospital
        .handle
        .update_faults(|f| f.response_delay = None);
    // Its job is still leased; nobody can take it before the lease runs out.
    assert!(drain(&env.app).await.is_empty());
    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert_eq!(
        drain(&env.app).await,
        vec![RunResult::Finished(JobOutcome::Done)]
    );
    let expected = count_expected(&env).await;
    assert_eq!(count(&env.app, CLINICAL).await, expected);
    let distinct = count(&env.app, "SELECT COUNT(*) FROM (SELECT DISTINCT source, resource_type, source_resource_id FROM resources WHERE category <> 'provenance') AS d").await;
    assert_eq!(distinct, expected, "nothing duplicated");
    let view = detail(&env, &id).await;
    assert_eq!(first_job(&view)["attempts"], 2);
    env.hospital.shutdown().await;
    env.app.stop().await;
}

/// Resources of patient-0001 in the instructed categories (everything but the Patient).
async fn count_expected(env: &PullEnv) -> i64 {
    env.hospital
        .handle
        .resource_keys("pt000001")
        .iter()
        .filter(|(t, _)| {
            [
                "Observation",
                "DiagnosticReport",
                "Condition",
                "MedicationRequest",
                "MedicationDispense",
                "MedicationStatement",
                "Medication",
                "Immunization",
            ]
            .contains(&t.as_str())
        })
        .count() as i64
}

async fn bad_items_are_refused_and_the_rest_is_kept(engine: Engine) {
    let env = pull_env(engine).await;
    env.hospital.handle.update_faults(|f| {
        f.malformed_entries_per_page = 1;
        f.wrong_patient_entries_per_page = 2;
    });
    let id = link(
        &env,
        &["observations", "conditions", "medications", "immunizations"],
    )
    .await;
    assert_eq!(
        drain(&env.app).await,
        vec![RunResult::Finished(JobOutcome::Done)]
    );
    let expected = count_expected(&env).await;
    assert_eq!(
        count(&env.app, CLINICAL).await,
        expected,
        "every good resource kept"
    );
    let view = detail(&env, &id).await;
    let rejected = first_job(&view)["rejected"].as_i64().expect("rejected");
    assert!(rejected >= 3, "{rejected}");
    let wrong = count(
        &env.app,
        "SELECT COUNT(*) FROM pull_item_errors WHERE reason LIKE '%another patient%'",
    )
    .await;
    assert!(
        wrong >= 2,
        "wrong-patient items recorded with their reason: {wrong}"
    );
    assert!(leaves_containing(&env.app, "pull-item-rejected").await >= 1);
    // No resource of another patient got into this record.
    let stream = env
        .app
        .client
        .get(env.app.url("/patient/resources"))
        .bearer_auth(&env.token)
        .send()
        .await
        .expect("read");
    for line in stream.text().await.expect("ndjson").lines() {
        let resource: Value = serde_json::from_str(line).expect("json");
        for field in ["subject", "patient"] {
            if let Some(reference) = resource[field]["reference"].as_str() {
                assert_eq!(reference, "Patient/pt000001", "{line}");
            }
        }
    }
    env.hospital.shutdown().await;
    env.app.stop().await;
}

async fn a_source_in_maintenance_degrades_without_losing_data(engine: Engine) {
    let env = pull_env(engine).await;
    let id = link(&env, &["observations"]).await;
    drain(&env.app).await;
    let stored = count(&env.app, CLINICAL).await;
    assert!(stored > 0);

    env.hospital.handle.update_faults(|f| {
        f.maintenance = true;
        f.retry_after = Duration::from_secs(1);
    });
    make_due(&env.app).await;
    let results = drain(&env.app).await;
    assert!(
        matches!(
            results.as_slice(),
            [RunResult::Finished(JobOutcome::Retry { .. })]
        ),
        "{results:?}"
    );

    let ready: Value = env
        .app
        .client
        .get(env.app.url("/readyz"))
        .send()
        .await
        .expect("readyz")
        .json()
        .await
        .expect("json");
    assert_eq!(ready["status"], "degraded");
    assert_eq!(ready["unavailable_sources"][0]["source_id"], "hospital");
    let list: Value = env
        .app
        .client
        .get(env.app.url("/patient/pull-instructions"))
        .bearer_auth(&env.token)
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    assert!(list["instructions"][0]["source_unavailable_since"].is_string());
    let view = detail(&env, &id).await;
    assert_eq!(
        view["instruction"]["status"], "active",
        "the instruction stays; the job waits"
    );
    assert_eq!(view["jobs"][0]["status"], "queued", "the retry waits");
    // What was pulled before is still served.
    let stream = env
        .app
        .client
        .get(env.app.url("/patient/resources"))
        .bearer_auth(&env.token)
        .send()
        .await
        .expect("read");
    assert_eq!(stream.status(), 200);
    assert!(stream.text().await.expect("ndjson").lines().count() as i64 >= stored);

    // The source comes back: the waiting job runs and the degradation clears.
    env.hospital.handle.update_faults(|f| f.maintenance = false);
    make_due(&env.app).await;
    assert_eq!(
        drain(&env.app).await,
        vec![RunResult::Finished(JobOutcome::Done)]
    );
    let ready: Value = env
        .app
        .client
        .get(env.app.url("/readyz"))
        .send()
        .await
        .expect("readyz")
        .json()
        .await
        .expect("json");
    assert_eq!(ready["status"], "ok");
    env.hospital.shutdown().await;
    env.app.stop().await;
}

/// Two gateway processes (two sets of pools) on one PostgreSQL database: both claim jobs,
/// the claims add up, and the job of a process killed mid-pull is finished by the other
/// once its lease runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_share_jobs_and_finish_a_killed_ones_job() {
    let env = pull_env(Engine::Postgres).await;
    let jobs = 4;
    let mut instructions = Vec::new();
    for _ in 0..jobs {
        instructions.push(link(&env, &["observations", "conditions"]).await);
    }
    // The second process: its own gateway on the same database and key store.
    let mut second_config = env.app.gateway().state.config.as_ref().clone();
    second_config.listen = "127.0.0.1:0".parse().expect("addr");
    let second = phr_gateway::Gateway::build(second_config)
        .await
        .expect("second process");

    env.hospital
        .handle
        .update_faults(|f| f.response_delay = Some(Duration::from_millis(150)));
    let first_worker = env.app.gateway().state.pull_worker();
    let second_worker = second.state.pull_worker();
    // Process 1 takes a job and is killed halfway through it.
    let killed = tokio::spawn(async move { first_worker.run_once().await });
    for _ in 0..100 {
        if count(
            &env.app,
            "SELECT COUNT(*) FROM pull_jobs WHERE status = 'running'",
        )
        .await
            > 0
            && count(&env.app, CLINICAL).await > 0
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    killed.abort();
    let killed_job: String =
        sqlx::query_scalar("SELECT id FROM pull_jobs WHERE status = 'running'")
            .fetch_one(env.app.gateway().state.db.read_pool())
            .await
            .expect("the killed process's job is still running");
    env.hospital
        .handle
        .update_faults(|f| f.response_delay = None);

    // Process 2 works the queue: the other jobs at once, the dead one after its lease.
    let by_second = tokio::spawn(async move {
        let mut done = Vec::new();
        for _ in 0..80 {
            match second_worker.run_once().await {
                Ok(Some((job, _))) => done.push(job.id),
                _ if done.len() == jobs => break,
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        done
    })
    .await
    .expect("second");
    let mut claimed = by_second.clone();
    claimed.sort();
    claimed.dedup();
    assert_eq!(
        claimed.len(),
        jobs,
        "process 2 finished every job: {by_second:?}"
    );
    assert!(
        claimed.contains(&killed_job),
        "the killed process's job was finished by process 2"
    );
    // Process 1 claimed one (then died): each process claimed at least one, the claims
    // total the jobs plus the one reclaimed after the lease.
    let attempts: i64 = sqlx::query_scalar("SELECT attempts FROM pull_jobs WHERE id = $1")
        .bind(&killed_job)
        .fetch_one(env.app.gateway().state.db.read_pool())
        .await
        .expect("attempts");
    assert_eq!(attempts, 2);
    assert_eq!(
        count(
            &env.app,
            "SELECT COUNT(*) FROM pull_jobs WHERE attempts > 0 AND status = 'done'"
        )
        .await,
        jobs as i64
    );
    let distinct = count(&env.app, "SELECT COUNT(*) FROM (SELECT DISTINCT source, resource_type, source_resource_id FROM resources WHERE category <> 'provenance') AS d").await;
    assert_eq!(
        count(&env.app, CLINICAL).await,
        distinct,
        "nothing duplicated"
    );
    second.state.db.close().await;
    env.hospital.shutdown().await;
    env.app.stop().await;
}

async fn bad_instructions_and_callbacks_get_clear_errors(engine: Engine) {
    let env = pull_env(engine).await;
    let give = |body: Value| {
        env.app
            .client
            .post(env.app.url("/patient/pull-instructions"))
            .bearer_auth(&env.token)
            .json(&body)
            .send()
    };
    for body in [
        serde_json::json!({"source_id": "nowhere", "categories": ["observations"]}),
        serde_json::json!({"source_id": "hospital", "categories": []}),
        serde_json::json!({"source_id": "hospital", "categories": ["everything"]}),
    ] {
        let response = give(body.clone()).await.expect("give");
        assert_eq!(response.status(), 400, "{body}");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
    }
    assert_eq!(
        count(&env.app, "SELECT COUNT(*) FROM pull_instructions").await,
        0
    );

    // Callbacks nobody started, or without state: refused, nothing linked.
    for query in ["?code=x", "?code=x&state=forged", "?error=access_denied"] {
        let response = env
            .app
            .client
            .get(env.app.url(&format!("/patient/sources/callback{query}")))
            .send()
            .await
            .expect("callback");
        assert_eq!(response.status(), 400, "{query}");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
    }

    // The patient declines at the hospital: the instruction fails, with the reason kept.
    let given: Value =
        give(serde_json::json!({"source_id": "hospital", "categories": ["conditions"]}))
            .await
            .expect("give")
            .json()
            .await
            .expect("json");
    let id = given["instruction"]["id"].as_str().expect("id").to_string();
    let location = sign_in_and_decide(
        given["authorize_url"].as_str().expect("url"),
        "patient-0001",
        "phr-sim-0001",
        |_| true,
        false,
    )
    .await
    .expect("decline");
    let declined = env
        .app
        .client
        .get(&location)
        .send()
        .await
        .expect("callback");
    assert_eq!(declined.status(), 400);
    let view = detail(&env, &id).await;
    assert_eq!(view["instruction"]["status"], "failed");
    let events = view["history"].as_array().expect("history");
    assert_eq!(events.last().expect("event")["event"], "failed");
    assert!(events.last().expect("event")["detail"]
        .as_str()
        .is_some_and(|d| d.contains("access_denied")));
    // The same answer again finds nothing waiting.
    let replay = env.app.client.get(&location).send().await.expect("replay");
    assert_eq!(replay.status(), 400);
    assert_eq!(
        count(&env.app, "SELECT COUNT(*) FROM pull_jobs").await,
        0,
        "nothing was queued"
    );
    env.hospital.shutdown().await;
    env.app.stop().await;
}

/// A hospital that releases records system to system: the patient enters the linking code
/// the hospital gave them; the gateway reads with its own `private_key_jwt` client.
async fn a_hospital_delivering_by_backend_services_is_linked_with_a_code(engine: Engine) {
    // The gateway's source-client key, registered at the hospital beforehand (as a real
    // hospital would register the key from the gateway's JWKS).
    let key = BackendKey::generate_es384();
    let hospital = HospitalSimulator::start(SimulatorConfig {
        patients: 2,
        resources_per_patient: PER_PATIENT,
        offer_everything: false,
        backend_client: Some(BackendClientRegistration {
            client_id: "phr-backend".into(),
            public_jwk: key.public_jwk(),
        }),
        ..SimulatorConfig::default()
    })
    .await
    .expect("simulator");
    let base_url = hospital.base_url.clone();
    let pem = key.to_pem().expect("pem");
    let app = spawn_app_with(TestEnv::new(engine).await, move |c| {
        c.pull.workers = 0;
        let mut source = hospital_source(base_url, 20);
        source.client_id = "phr-backend".into();
        source.auth = SourceAuth::BackendServices;
        c.sources = vec![source];
        phr_gateway::crypto::key_file::write_private(&c.source_client_key_path(), pem.as_bytes())
            .expect("key file");
    })
    .await;
    let token = app
        .sign_in(AccountRole::Patient, "hanako", Some("p-hanako"))
        .await;
    let env = PullEnv {
        app,
        hospital,
        token,
    };
    let sources: Value = env
        .app
        .client
        .get(env.app.url("/patient/sources"))
        .bearer_auth(&env.token)
        .send()
        .await
        .expect("sources")
        .json()
        .await
        .expect("json");
    assert_eq!(sources["sources"][0]["link_mode"], "linking-code");

    let give = |body: Value| {
        env.app
            .client
            .post(env.app.url("/patient/pull-instructions"))
            .bearer_auth(&env.token)
            .json(&body)
            .send()
    };
    // Without a code, or with a wrong one, nothing is linked.
    let missing =
        give(serde_json::json!({"source_id": "hospital", "categories": ["observations"]}))
            .await
            .expect("give");
    assert_eq!(missing.status(), StatusCode::BAD_REQUEST);
    let problem: Value = missing.json().await.expect("problem");
    assert!(problem["detail"]
        .as_str()
        .is_some_and(|d| d.contains("linking code")));
    let wrong = give(serde_json::json!({
        "source_id": "hospital", "categories": ["observations"], "linking_code": "00000-00000"
    }))
    .await
    .expect("give");
    assert_eq!(wrong.status(), StatusCode::BAD_REQUEST);
    assert!(env.hospital.handle.linked_instructions().is_empty());

    // The code the hospital printed for patient 2 links patient 2 at once.
    let code = env.hospital.handle.issue_linking_code("pt000002");
    let given = give(serde_json::json!({
        "source_id": "hospital",
        "categories": ["demographics", "observations", "conditions", "allergies",
            "medications", "immunizations", "encounters", "documents"],
        "linking_code": code,
    }))
    .await
    .expect("give");
    assert_eq!(given.status(), StatusCode::CREATED);
    let given: Value = given.json().await.expect("json");
    assert_eq!(given["instruction"]["status"], "active");
    assert!(given["authorize_url"].is_null());
    verify_receipt(
        &env.app,
        given["receipt"].as_str().expect("receipt"),
        "given",
    )
    .await;
    verify_receipt(
        &env.app,
        given["link_receipt"].as_str().expect("link receipt"),
        "authorised",
    )
    .await;
    let id = given["instruction"]["id"].as_str().expect("id").to_string();
    assert_eq!(
        env.hospital.handle.linked_instructions(),
        vec![(id.clone(), "pt000002".to_string())],
        "the hospital holds the instruction it releases data for"
    );

    assert_eq!(
        drain(&env.app).await,
        vec![RunResult::Finished(JobOutcome::Done)]
    );
    assert_eq!(
        count(&env.app, CLINICAL).await,
        env.hospital.handle.resource_keys("pt000002").len() as i64,
        "patient 2's whole record, once"
    );
    assert!(env
        .hospital
        .handle
        .request_log()
        .iter()
        .any(|line| line.contains("patient=pt000002")));

    // Withdrawing tells the hospital.
    let withdrawn = withdraw(&env, &env.token, &id, None).await;
    assert_eq!(withdrawn.status(), StatusCode::OK);
    assert!(env.hospital.handle.linked_instructions().is_empty());
}
