//! FHIR Bulk Data export end to end on both engines: a recipient's backend (client
//! credentials, `system/` scopes) kicks off `Group/[id]/$export` and `Patient/$export`,
//! polls, reads the manifest and fetches NDJSON with its token; each patient's consent
//! decides per resource type at export time, so what a patient did not consent to never
//! appears; bad kick-offs are refused with OperationOutcomes; a withdrawal or an amendment
//! during an export stops it and drops its files; `_since` lists withdrawn patients in
//! `deleted`; DELETE cancels; files expire.

use phr_adapters::fhir_r4::BackendKey;
use phr_consent::{DataCategory, Performer, PersonRef};
use phr_gateway::audit::{AccountRole, Agent};
use phr_gateway::export::ExportStatus;
use phr_gateway::store::resources::NewResource;
use reqwest::StatusCode;
use serde_json::Value;

use crate::both_engines;
use crate::fhir_api::{seed, token, PATIENT};
use crate::helpers::{grant_consent, leaves_containing, numbered_observation, Engine};
use crate::oauth::{env_with, Env};

both_engines!(
    a_backend_exports_only_what_each_patient_consented_to,
    an_export_whose_output_cannot_be_stored_fails_and_serves_nothing,
    a_patient_of_many_pages_is_exported_whole_and_once,
);

pub(crate) async fn backend_token(
    env: &Env,
    key: &BackendKey,
    client_id: &str,
    scope: &str,
) -> String {
    let (status, _, body) = env
        .with_key(
            "/oauth/token",
            key,
            client_id,
            &[("grant_type", "client_credentials"), ("scope", scope)],
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["access_token"].as_str().expect("token").to_string()
}

async fn kick_off(env: &Env, token: &str, path: &str, prefer: bool) -> reqwest::Response {
    let mut request = env
        .app
        .client
        .get(env.url(path))
        .bearer_auth(token)
        .header("accept", "application/fhir+json");
    if prefer {
        request = request.header("prefer", "respond-async");
    }
    request.send().await.expect("kick-off")
}

pub(crate) async fn started(env: &Env, token: &str, path: &str) -> String {
    let response = kick_off(env, token, path, true).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED, "{path}");
    response.headers()["content-location"]
        .to_str()
        .expect("ascii")
        .to_string()
}

async fn poll(env: &Env, token: &str, status_url: &str) -> reqwest::Response {
    // Polls here are spaced by the test, not by the clock.
    sqlx::query("UPDATE export_jobs SET last_polled_at = NULL")
        .execute(env.app.gateway().state.db.write_pool())
        .await
        .expect("reset poll time");
    env.app
        .client
        .get(status_url)
        .bearer_auth(token)
        .send()
        .await
        .expect("poll")
}

pub(crate) async fn run(env: &Env) -> Option<ExportStatus> {
    env.app
        .gateway()
        .state
        .exports
        .run_once("test-worker")
        .await
        .expect("run")
}

pub(crate) async fn manifest(env: &Env, token: &str, status_url: &str) -> Value {
    let response = poll(env, token, status_url).await;
    assert_eq!(response.status(), StatusCode::OK);
    response.json().await.expect("manifest")
}

fn output_counts(manifest: &Value) -> Vec<(String, i64)> {
    let mut counts: Vec<(String, i64)> = manifest["output"]
        .as_array()
        .expect("output")
        .iter()
        .map(|o| {
            (
                o["type"].as_str().expect("type").to_string(),
                o["count"].as_i64().expect("count"),
            )
        })
        .collect();
    counts.sort();
    counts
}

async fn fetch_lines(env: &Env, token: &str, url: &str) -> Vec<Value> {
    let response = env
        .app
        .client
        .get(url)
        .bearer_auth(token)
        .send()
        .await
        .expect("file");
    assert_eq!(response.status(), StatusCode::OK, "{url}");
    assert_eq!(
        response.headers()["content-type"],
        "application/fhir+ndjson"
    );
    response
        .text()
        .await
        .expect("ndjson")
        .lines()
        .map(|line| serde_json::from_str(line).expect("each line is JSON"))
        .collect()
}

/// The export at `status_url` was stopped by a patient's consent change: it is not run
/// again, and its status answers with an OperationOutcome saying why.
/// Each patient consents to the client's receiving their Observations.
async fn consent_to_observations(env: &Env, client_id: &str, patients: &[&str]) {
    for &patient in patients {
        grant_consent(
            &env.app,
            patient,
            Performer::patient(&PersonRef::new(patient)),
            client_id,
            &["PATRQT"],
            &[DataCategory::Observations],
            30,
        )
        .await;
    }
}

async fn assert_stopped(env: &Env, token: &str, status_url: &str, case: &str) {
    assert_eq!(run(env).await, None, "{case}: the stopped job is not run");
    let stopped = poll(env, token, status_url).await;
    let status = stopped.status();
    let body = stopped.text().await.expect("body");
    outcome_of(status, &body, StatusCode::INTERNAL_SERVER_ERROR, case);
    assert!(
        body.contains("withdrew or changed a consent"),
        "{case}: {body}"
    );
}

fn outcome_of(status: StatusCode, body: &str, expected: StatusCode, case: &str) {
    assert_eq!(status, expected, "{case}: {body}");
    let outcome: Value = serde_json::from_str(body).expect("OperationOutcome");
    assert_eq!(outcome["resourceType"], "OperationOutcome", "{case}");
}

async fn a_backend_exports_only_what_each_patient_consented_to(engine: Engine) {
    let env = env_with(engine, |c| {
        c.export.workers = 0;
        c.notifications.deliver = false;
    })
    .await;
    seed(&env).await;
    let key = BackendKey::generate_es384();
    let client_id = env.key_client(&key).await;
    let consent_to = |patient: &'static str, categories: Vec<DataCategory>| {
        let app = &env.app;
        let client_id = client_id.clone();
        async move {
            grant_consent(
                app,
                patient,
                Performer::patient(&PersonRef::new(patient)),
                &client_id,
                &["PATRQT"],
                &categories,
                30,
            )
            .await
            .0
        }
    };
    consent_to(
        PATIENT,
        vec![DataCategory::Observations, DataCategory::Demographics],
    )
    .await;
    let second_consent = consent_to("patient-2", vec![DataCategory::Observations]).await;
    let all = backend_token(&env, &key, &client_id, "system/*.rs").await;
    let observations_only = backend_token(&env, &key, &client_id, "system/Observation.rs").await;

    // Bad kick-offs.
    let group = format!("/fhir/Group/{client_id}/$export");
    for (path, token, prefer, expected, case) in [
        (
            group.clone(),
            &all,
            false,
            StatusCode::BAD_REQUEST,
            "no Prefer: respond-async",
        ),
        (
            format!("{group}?_type=Practitioner"),
            &all,
            true,
            StatusCode::BAD_REQUEST,
            "unknown _type",
        ),
        (
            format!("{group}?_since=soon"),
            &all,
            true,
            StatusCode::BAD_REQUEST,
            "bad _since",
        ),
        (
            format!("{group}?_outputFormat=text/csv"),
            &all,
            true,
            StatusCode::BAD_REQUEST,
            "unsupported _outputFormat",
        ),
        (
            "/fhir/Group/someone-else/$export".to_string(),
            &all,
            true,
            StatusCode::NOT_FOUND,
            "another group",
        ),
        (
            format!("{group}?_type=Condition"),
            &observations_only,
            true,
            StatusCode::FORBIDDEN,
            "type outside the scopes",
        ),
    ] {
        let response = kick_off(&env, token, &path, prefer).await;
        let status = response.status();
        outcome_of(
            status,
            &response.text().await.expect("body"),
            expected,
            case,
        );
    }
    let (patient_token, _) = token(
        &env,
        &[DataCategory::Observations],
        "launch/patient patient/Observation.rs",
    )
    .await;
    let response = kick_off(&env, &patient_token, &group, true).await;
    assert_eq!(
        response.status(),
        StatusCode::FORBIDDEN,
        "a patient token cannot bulk export"
    );

    // The group export: polled while queued (too fast is 429), run, then the manifest.
    let status_url = started(
        &env,
        &all,
        &format!("{group}?_type=Observation,Patient,Condition"),
    )
    .await;
    let queued = poll(&env, &all, &status_url).await;
    assert_eq!(queued.status(), StatusCode::ACCEPTED);
    assert!(queued.headers().contains_key("x-progress"));
    let too_fast = env
        .app
        .client
        .get(&status_url)
        .bearer_auth(&all)
        .send()
        .await
        .expect("poll");
    assert_eq!(too_fast.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(too_fast.headers().contains_key("retry-after"));
    assert_eq!(run(&env).await, Some(ExportStatus::Done));
    let done = manifest(&env, &all, &status_url).await;
    assert_eq!(done["requiresAccessToken"], true);
    assert!(done["transactionTime"].is_string());
    // Patient-1: 8 observations and the Patient; patient-2: 1 observation. No Condition:
    // nobody consented to conditions.
    assert_eq!(
        output_counts(&done),
        vec![("Observation".to_string(), 9), ("Patient".to_string(), 1)]
    );
    let observation_url = done["output"]
        .as_array()
        .expect("output")
        .iter()
        .find(|o| o["type"] == "Observation")
        .and_then(|o| o["url"].as_str())
        .expect("observation file")
        .to_string();
    let lines = fetch_lines(&env, &all, &observation_url).await;
    assert_eq!(lines.len(), 9);
    assert!(lines.iter().all(|r| r["resourceType"] == "Observation"));
    let subjects: std::collections::HashSet<&str> = lines
        .iter()
        .filter_map(|r| r["subject"]["reference"].as_str())
        .collect();
    assert!(subjects.contains(&"Patient/patient-1") && subjects.contains(&"Patient/patient-2"));
    // The file needs the token, and it is this client's.
    let anonymous = env
        .app
        .client
        .get(&observation_url)
        .send()
        .await
        .expect("file");
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    let other_key = BackendKey::generate_es384();
    let other_client = env.key_client(&other_key).await;
    let other = backend_token(&env, &other_key, &other_client, "system/*.rs").await;
    let stranger = env
        .app
        .client
        .get(&observation_url)
        .bearer_auth(&other)
        .send()
        .await
        .expect("file");
    assert_eq!(stranger.status(), StatusCode::NOT_FOUND);
    let polled_by_stranger = poll(&env, &other, &status_url).await;
    assert_eq!(polled_by_stranger.status(), StatusCode::NOT_FOUND);
    assert!(leaves_containing(&env.app, "bulk export").await >= 3);

    // A worker that dies holding a job: after its lease another worker (another process on
    // PostgreSQL) takes the job over and finishes it, once.
    let orphan = started(&env, &all, &format!("{group}?_type=Observation")).await;
    let exports = &env.app.gateway().state.exports;
    let claimed = exports
        .claim("dying-worker")
        .await
        .expect("claim")
        .expect("a job");
    assert!(orphan.ends_with(&claimed.id));
    assert!(
        exports
            .claim("other-worker")
            .await
            .expect("claim")
            .is_none(),
        "leased"
    );
    sqlx::query("UPDATE export_jobs SET lease_expires_at = 0 WHERE id = $1")
        .bind(&claimed.id)
        .execute(env.app.gateway().state.db.write_pool())
        .await
        .expect("lease runs out");
    assert_eq!(run(&env).await, Some(ExportStatus::Done));
    assert_eq!(
        output_counts(&manifest(&env, &all, &orphan).await),
        vec![("Observation".to_string(), 9)]
    );

    // _typeFilter narrows a type.
    let filtered = started(
        &env,
        &all,
        "/fhir/Patient/$export?_type=Observation&_typeFilter=Observation%3Fcategory%3Dlaboratory",
    )
    .await;
    assert_eq!(run(&env).await, Some(ExportStatus::Done));
    assert_eq!(
        output_counts(&manifest(&env, &all, &filtered).await),
        vec![("Observation".to_string(), 6)]
    );

    // An amendment during an export stops it too: the export read the consents of a run of
    // patients ahead, and the new terms may permit less.
    let patient_2 = env
        .app
        .sign_in(AccountRole::Patient, "patient2", Some("patient-2"))
        .await;
    let amended_midway = started(&env, &all, &group).await;
    let ends_on = (time::OffsetDateTime::now_utc() + time::Duration::days(20))
        .date()
        .to_string();
    let amended = env
        .app
        .client
        .post(env.url(&format!("/api/consents/{second_consent}/change")))
        .bearer_auth(&patient_2)
        .json(&serde_json::json!({"purposes": ["PATRQT"], "categories": ["observations"], "ends_on": ends_on}))
        .send()
        .await
        .expect("amend");
    assert_eq!(amended.status(), StatusCode::OK);
    assert_stopped(&env, &all, &amended_midway, "stopped by an amendment").await;

    // A withdrawal during an export stops it and drops what it gathered.
    let before_withdrawal = time::OffsetDateTime::now_utc() - time::Duration::minutes(1);
    let interrupted = started(&env, &all, &group).await;
    let withdrawn = env
        .app
        .client
        .post(env.url(&format!("/api/consents/{second_consent}/withdraw")))
        .bearer_auth(&patient_2)
        .send()
        .await
        .expect("withdraw");
    assert_eq!(withdrawn.status(), StatusCode::OK);
    assert_stopped(&env, &all, &interrupted, "stopped by a withdrawal").await;

    // _since: patient-2 withdrew since then, so the manifest lists them as deleted.
    let since = before_withdrawal
        .format(&time::format_description::well_known::Rfc3339)
        .expect("rfc3339");
    let incremental = started(
        &env,
        &all,
        &format!("{group}?_since={}", since.replace('+', "%2B")),
    )
    .await;
    assert_eq!(run(&env).await, Some(ExportStatus::Done));
    let incremental = manifest(&env, &all, &incremental).await;
    let deleted_url = incremental["deleted"][0]["url"]
        .as_str()
        .expect("deleted file")
        .to_string();
    let deleted = fetch_lines(&env, &all, &deleted_url).await;
    assert_eq!(deleted.len(), 1);
    assert_eq!(deleted[0]["entry"][0]["request"]["method"], "DELETE");
    assert_eq!(
        deleted[0]["entry"][0]["request"]["url"],
        "Patient/patient-2"
    );

    // DELETE cancels: 202, then the status URL is gone and nothing runs.
    let cancelled = started(&env, &all, &group).await;
    let response = env
        .app
        .client
        .delete(&cancelled)
        .bearer_auth(&all)
        .send()
        .await
        .expect("cancel");
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    assert_eq!(
        poll(&env, &all, &cancelled).await.status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(run(&env).await, None);

    // Files expire.
    sqlx::query("UPDATE export_jobs SET expires_at = 1 WHERE status = 'done'")
        .execute(env.app.gateway().state.db.write_pool())
        .await
        .expect("expire");
    let expired = env
        .app
        .client
        .get(&observation_url)
        .bearer_auth(&all)
        .send()
        .await
        .expect("file");
    assert_eq!(expired.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        poll(&env, &all, &status_url).await.status(),
        StatusCode::NOT_FOUND
    );
    assert!(
        env.app
            .gateway()
            .state
            .exports
            .forget_expired()
            .await
            .expect("forget")
            >= 1
    );
    env.stop().await;
}

/// The export's reader serves patients while its writer stores their lines: when the writer
/// fails, the job fails as a whole (its reader is stopped), the recipient is told, no file
/// of it is served, and its partial output is deleted.
async fn an_export_whose_output_cannot_be_stored_fails_and_serves_nothing(engine: Engine) {
    let env = env_with(engine, |c| {
        c.export.workers = 0;
        c.notifications.deliver = false;
    })
    .await;
    seed(&env).await;
    let key = BackendKey::generate_es384();
    let client_id = env.key_client(&key).await;
    consent_to_observations(&env, &client_id, &[PATIENT, "patient-2"]).await;
    let all = backend_token(&env, &key, &client_id, "system/*.rs").await;
    let group = format!("/fhir/Group/{client_id}/$export?_type=Observation");
    let chunks = |job: &str| {
        let (db, job) = (env.app.gateway().state.db.clone(), job.to_string());
        async move {
            let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM export_chunks WHERE job_id = $1")
                .bind(job)
                .fetch_one(db.read_pool())
                .await
                .expect("chunks");
            n
        }
    };

    let failing = started(&env, &all, &group).await;
    env.app
        .gateway()
        .state
        .db
        .inject_fault("export.write_lines");
    assert_eq!(run(&env).await, Some(ExportStatus::Failed));
    let response = poll(&env, &all, &failing).await;
    let status = response.status();
    let body = response.text().await.expect("body");
    outcome_of(
        status,
        &body,
        StatusCode::INTERNAL_SERVER_ERROR,
        "a failed export",
    );
    assert!(body.contains("export.write_lines"), "says why: {body}");
    let job = failing.rsplit('/').next().expect("job id");
    env.app
        .gateway()
        .state
        .exports
        .forget_expired()
        .await
        .expect("forget");
    assert_eq!(chunks(job).await, 0, "nothing of the failed export is kept");

    // The fault was one-off: the same export runs to its end the next time.
    let next = started(&env, &all, &group).await;
    assert_eq!(run(&env).await, Some(ExportStatus::Done));
    let done = manifest(&env, &all, &next).await;
    assert_eq!(output_counts(&done), vec![("Observation".to_string(), 9)]);
}

/// More than two of the export's pages of one patient (the next page is read while the
/// last is served): every resource once, in id order, none left out at a page's edge.
async fn a_patient_of_many_pages_is_exported_whole_and_once(engine: Engine) {
    let env = env_with(engine, |c| {
        c.export.workers = 0;
        c.notifications.deliver = false;
    })
    .await;
    // Two full pages of 500 and a part page, and a second patient after the first.
    const MANY: usize = 1_234;
    let store = &env.app.gateway().state.resources;
    for (patient, count) in [(PATIENT, MANY), ("patient-2", 3)] {
        let batch: Vec<NewResource> = (0..count)
            .map(|n| numbered_observation(patient, n))
            .collect();
        store
            .put_batch(&Agent::system(), batch)
            .await
            .expect("seed");
    }
    let key = BackendKey::generate_es384();
    let client_id = env.key_client(&key).await;
    consent_to_observations(&env, &client_id, &[PATIENT, "patient-2"]).await;
    let all = backend_token(&env, &key, &client_id, "system/*.rs").await;
    let status_url = started(
        &env,
        &all,
        &format!("/fhir/Group/{client_id}/$export?_type=Observation"),
    )
    .await;
    assert_eq!(run(&env).await, Some(ExportStatus::Done));
    let done = manifest(&env, &all, &status_url).await;
    assert_eq!(
        output_counts(&done),
        vec![("Observation".to_string(), MANY as i64 + 3)]
    );
    let mut lines = Vec::new();
    for output in done["output"].as_array().expect("output") {
        lines.extend(fetch_lines(&env, &all, output["url"].as_str().expect("url")).await);
    }
    let of_patient: Vec<&Value> = lines
        .iter()
        .filter(|line| line["subject"]["reference"] == format!("Patient/{PATIENT}"))
        .collect();
    assert_eq!(of_patient.len(), MANY, "every resource of the patient");
    let ids: Vec<&str> = of_patient
        .iter()
        .map(|line| line["id"].as_str().expect("id"))
        .collect();
    let mut sorted = ids.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), MANY, "none twice");
    assert_eq!(ids, sorted, "in id order, page after page");
    let mut values: Vec<i64> = of_patient
        .iter()
        .map(|line| line["valueQuantity"]["value"].as_i64().expect("value"))
        .collect();
    values.sort_unstable();
    assert_eq!(
        values,
        (0..MANY as i64).collect::<Vec<_>>(),
        "each as stored"
    );
}
