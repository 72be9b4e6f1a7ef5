//! The FHIR API end to end on both engines: a recipient's app reads and searches with a
//! token issued under the patient's consent; every response is filtered by the consent as
//! committed now (a denied category never appears, counts and `next` links included); bad
//! input gets the right status with an `OperationOutcome`; the patient reads their own
//! record and consents with their own token; reads and searches are audited.

use std::collections::HashSet;

use phr_adapters::fhir_r4::BackendKey;
use phr_adapters::oauth::pkce_s256_pair;
use phr_consent::{DataCategory, Performer, PersonRef};
use phr_gateway::audit::{AccountRole, Agent};
use phr_gateway::store::resources::{NewResource, SourceIdentity};
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::both_engines;
use crate::helpers::{grant_consent, leaves_containing, Engine};
use crate::oauth::{env, location, Env};

both_engines!(
    a_recipient_reads_and_searches_only_what_the_consent_allows,
    bad_fhir_requests_get_operation_outcomes,
);

pub(crate) const PATIENT: &str = "patient-1";

fn resource(resource_type: &str, id: &str, version: &str, body: Value) -> NewResource {
    let category = DataCategory::of_resource_type(resource_type)
        .map(|c| c.code())
        .unwrap_or("documents");
    let mut body = body;
    body["resourceType"] = json!(resource_type);
    body["id"] = json!(id);
    NewResource {
        patient_id: PATIENT.into(),
        category: category.into(),
        source: SourceIdentity {
            source: "hospital".into(),
            resource_type: resource_type.into(),
            source_resource_id: id.into(),
            version_id: Some(version.into()),
        },
        body: body.to_string().into_bytes(),
    }
}

pub(crate) fn observation(id: &str, loinc: &str, category: &str, date: &str) -> NewResource {
    resource(
        "Observation",
        id,
        "1",
        json!({
            "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": category}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": loinc}]},
            "subject": {"reference": "Patient/hosp-1"},
            "encounter": {"reference": "Encounter/e-1"},
            "effectiveDateTime": date,
            "valueQuantity": {"value": 120, "unit": "mm[Hg]"}
        }),
    )
}

/// The hospital's record of patient-1: eight observations (one in two versions), a
/// condition, a prescription with its medication, an encounter; and another patient's.
pub(crate) async fn seed(env: &Env) -> HashSet<String> {
    let store = &env.app.gateway().state.resources;
    let mut batch = vec![
        resource(
            "Patient",
            "hosp-1",
            "1",
            json!({"name": [{"text": "山田 花子"}], "birthDate": "1980-04-01"}),
        ),
        observation("o-1", "8480-6", "vital-signs", "2024-05-10T09:30:00+09:00"),
        observation("o-2", "8462-4", "vital-signs", "2024-06-10"),
        resource(
            "Condition",
            "c-1",
            "1",
            json!({"code": {"text": "高血圧症"}, "subject": {"reference": "Patient/hosp-1"}}),
        ),
        resource(
            "Medication",
            "m-1",
            "1",
            json!({"code": {"coding": [{"system": "urn:oid:1.2.392.100495.20.2.74", "code": "610463147"}]}}),
        ),
        resource(
            "MedicationRequest",
            "mr-1",
            "1",
            json!({
                "status": "active", "intent": "order",
                "medicationReference": {"reference": "Medication/m-1"},
                "subject": {"reference": "Patient/hosp-1"}
            }),
        ),
        resource(
            "Encounter",
            "e-1",
            "1",
            json!({"status": "finished", "period": {"start": "2024-05-10"}}),
        ),
    ];
    for n in 3..=8 {
        batch.push(observation(
            &format!("o-{n}"),
            "2345-7",
            "laboratory",
            "2023-01-05",
        ));
    }
    store
        .put_batch(&Agent::system(), batch)
        .await
        .expect("seed");
    let mut newer = observation("o-1", "8480-6", "vital-signs", "2024-05-10T09:30:00+09:00");
    newer.source.version_id = Some("2".into());
    let mut body: Value = serde_json::from_slice(&newer.body).expect("json");
    body["valueQuantity"]["value"] = json!(118);
    newer.body = body.to_string().into_bytes();
    store
        .put_batch(&Agent::system(), vec![newer])
        .await
        .expect("o-1 v2");
    let mut other = observation("x-1", "8480-6", "vital-signs", "2024-05-10");
    other.patient_id = "patient-2".into();
    store
        .put_batch(&Agent::system(), vec![other])
        .await
        .expect("other patient");
    ["o-1", "o-2", "o-3", "o-4", "o-5", "o-6", "o-7", "o-8"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// A token for `scope` under a consent to `categories` (patient-1's).
pub(crate) async fn token(env: &Env, categories: &[DataCategory], scope: &str) -> (String, String) {
    let key = BackendKey::generate_es384();
    let client_id = env.key_client(&key).await;
    let (consent_id, _) = grant_consent(
        &env.app,
        PATIENT,
        Performer::patient(&PersonRef::new(PATIENT)),
        &client_id,
        &["PATRQT"],
        categories,
        30,
    )
    .await;
    let (verifier, challenge) = pkce_s256_pair();
    let mut params = env.authorize_params(&client_id, &challenge);
    for (name, value) in params.iter_mut() {
        if name == "scope" {
            *value = scope.to_string();
        }
    }
    let response = env.authorize(&params).await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    let request_id = location(&response)
        .strip_prefix("/consent/authorize/")
        .expect("to the consent page")
        .to_string();
    let code = env.approve(&request_id, &consent_id, scope).await;
    let (status, body) = env.exchange(&key, &client_id, &code, &verifier).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    (
        body["access_token"].as_str().expect("token").to_string(),
        consent_id,
    )
}

async fn get(env: &Env, path: &str, token: &str) -> (StatusCode, Value) {
    get_with(env, path, token, None).await
}

async fn get_with(env: &Env, path: &str, token: &str, prefer: Option<&str>) -> (StatusCode, Value) {
    let url = if path.starts_with("http") {
        path.to_string()
    } else {
        env.url(path)
    };
    let mut request = env.app.client.get(url).bearer_auth(token);
    if let Some(prefer) = prefer {
        request = request.header("prefer", prefer);
    }
    let response = request.send().await.expect("get");
    let status = response.status();
    assert_eq!(
        response.headers()["content-type"],
        "application/fhir+json",
        "{path}"
    );
    (status, response.json().await.expect("json"))
}

fn entries<'a>(bundle: &'a Value, mode: &str) -> Vec<&'a Value> {
    bundle["entry"]
        .as_array()
        .map(|entries| {
            entries
                .iter()
                .filter(|e| e["search"]["mode"] == mode)
                .map(|e| &e["resource"])
                .collect()
        })
        .unwrap_or_default()
}

fn next_link(bundle: &Value) -> Option<String> {
    bundle["link"]
        .as_array()?
        .iter()
        .find(|l| l["relation"] == "next")
        .and_then(|l| l["url"].as_str())
        .map(str::to_string)
}

/// Follows `next` links from `path`; every resource of every page.
async fn all_pages(env: &Env, path: &str, token: &str) -> Vec<Value> {
    let mut found = Vec::new();
    let mut url = Some(path.to_string());
    let mut pages = 0;
    while let Some(current) = url {
        let (status, bundle) = get(env, &current, token).await;
        assert_eq!(status, StatusCode::OK, "{bundle}");
        found.extend(entries(&bundle, "match").into_iter().cloned());
        found.extend(entries(&bundle, "include").into_iter().cloned());
        url = next_link(&bundle);
        pages += 1;
        assert!(pages < 50, "paging never ends");
    }
    found
}

fn source_ids(resources: &[Value], resource_type: &str) -> Vec<String> {
    resources
        .iter()
        .filter(|r| r["resourceType"] == resource_type)
        .filter_map(|r| r["meta"]["source"].as_str().map(str::to_string))
        .collect()
}

async fn a_recipient_reads_and_searches_only_what_the_consent_allows(engine: Engine) {
    let env = env(engine).await;
    let observations = seed(&env).await;
    let consented = [
        DataCategory::Demographics,
        DataCategory::Observations,
        DataCategory::Medications,
        DataCategory::Encounters,
    ];
    let (token, consent_id) = token(&env, &consented, "launch/patient patient/*.rs").await;

    // The CapabilityStatement is open and says FHIR 4.0.1 with SMART.
    let metadata: Value = env
        .app
        .client
        .get(env.url("/fhir/metadata"))
        .send()
        .await
        .expect("metadata")
        .json()
        .await
        .expect("json");
    assert_eq!(metadata["fhirVersion"], "4.0.1");
    assert_eq!(
        metadata["rest"][0]["security"]["service"][0]["coding"][0]["code"],
        "SMART-on-FHIR"
    );
    let patient_capability = metadata["rest"][0]["resource"]
        .as_array()
        .expect("resources")
        .iter()
        .find(|r| r["type"] == "Patient")
        .expect("Patient");
    assert_eq!(patient_capability["operation"][0]["name"], "everything");

    // Search: every observation, paged by three, each once; the count is the permitted one.
    let (status, first) = get(&env, "/fhir/Observation?_count=3", &token).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert_eq!(first["type"], "searchset");
    assert_eq!(first["total"], 8);
    assert_eq!(entries(&first, "match").len(), 3);
    let paged = all_pages(&env, "/fhir/Observation?_count=3", &token).await;
    let ids: HashSet<String> = paged
        .iter()
        .map(|r| r["id"].as_str().expect("id").to_string())
        .collect();
    assert_eq!(paged.len(), 8);
    assert_eq!(ids.len(), 8, "no resource twice across pages");
    assert_eq!(observations.len(), 8);
    for resource in &paged {
        assert_eq!(
            resource["subject"]["reference"],
            format!("Patient/{PATIENT}")
        );
        assert!(
            !resource["id"].as_str().expect("id").starts_with("o-"),
            "gateway ids are served"
        );
    }

    // Read, vread and history of the observation stored in two versions.
    let systolic = paged
        .iter()
        .find(|r| r["code"]["coding"][0]["code"] == "8480-6")
        .expect("systolic");
    let id = systolic["id"].as_str().expect("id");
    assert_eq!(systolic["meta"]["versionId"], "2");
    assert_eq!(systolic["valueQuantity"]["value"], 118);
    let response = env
        .app
        .client
        .get(env.url(&format!("/fhir/Observation/{id}")))
        .bearer_auth(&token)
        .send()
        .await
        .expect("read");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["etag"], "W/\"2\"");
    let read: Value = response.json().await.expect("json");
    assert_eq!(read["id"], id);
    let (status, encounter) = get(
        &env,
        read["encounter"]["reference"]
            .as_str()
            .map(|r| format!("/fhir/{r}"))
            .as_deref()
            .expect("encounter ref"),
        &token,
    )
    .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the reference points at the served Encounter"
    );
    assert_eq!(encounter["resourceType"], "Encounter");
    // Every result of a search page had its references resolved, together, to the same
    // served Encounter.
    for resource in &paged {
        assert_eq!(
            resource["encounter"]["reference"],
            format!("Encounter/{}", encounter["id"].as_str().expect("id"))
        );
    }
    let (status, first_version) =
        get(&env, &format!("/fhir/Observation/{id}/_history/1"), &token).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(first_version["valueQuantity"]["value"], 120);
    assert_eq!(first_version["meta"]["versionId"], "1");
    let (status, history) = get(&env, &format!("/fhir/Observation/{id}/_history"), &token).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(history["type"], "history");
    assert_eq!(history["total"], 2);
    assert_eq!(history["entry"][0]["resource"]["meta"]["versionId"], "2");

    // Content parameters.
    for (query, expected) in [
        ("code=http://loinc.org|8480-6", 1),
        ("code=8480-6,8462-4", 2),
        ("category=laboratory", 6),
        ("category=vital-signs&date=ge2024-06-01", 1),
        ("date=2023-01", 6),
        ("_lastUpdated=ge2000-01-01", 8),
        ("_lastUpdated=lt2000-01-01", 0),
        (&format!("_id={id}"), 1),
        (&format!("patient={PATIENT}"), 8),
        (
            &format!("subject=Patient/{PATIENT}&code=2345-7&_count=4"),
            6,
        ),
    ] {
        let found = all_pages(&env, &format!("/fhir/Observation?{query}"), &token).await;
        assert_eq!(found.len(), expected, "{query}");
    }

    // The same search by POST, parameters in a form body (too long or private for a URL).
    let posted = env
        .app
        .client
        .post(env.url("/fhir/Observation/_search"))
        .bearer_auth(&token)
        .header("content-type", "application/x-www-form-urlencoded")
        .body("code=8480-6%2C8462-4")
        .send()
        .await
        .expect("post search");
    assert_eq!(posted.status(), StatusCode::OK);
    let posted: Value = posted.json().await.expect("json");
    assert_eq!(entries(&posted, "match").len(), 2);
    let not_a_form = env
        .app
        .client
        .post(env.url("/fhir/Observation/_search"))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body("{\"code\": \"x\"}")
        .send()
        .await
        .expect("post search");
    assert_eq!(not_a_form.status(), StatusCode::BAD_REQUEST);

    // _include brings the Medication and the Patient along.
    let (status, bundle) = get(
        &env,
        "/fhir/MedicationRequest?_include=MedicationRequest:medication&_include=MedicationRequest:patient",
        &token,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{bundle}");
    let matched = entries(&bundle, "match");
    let included = entries(&bundle, "include");
    assert_eq!(matched.len(), 1);
    let included_types: HashSet<&str> = included
        .iter()
        .filter_map(|r| r["resourceType"].as_str())
        .collect();
    assert_eq!(included_types, HashSet::from(["Medication", "Patient"]));
    let medication = included
        .iter()
        .find(|r| r["resourceType"] == "Medication")
        .expect("medication");
    assert_eq!(
        matched[0]["medicationReference"]["reference"],
        format!("Medication/{}", medication["id"].as_str().expect("id"))
    );
    let (status, patient) = get(&env, &format!("/fhir/Patient/{PATIENT}"), &token).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(patient["id"], PATIENT);

    // Conditions are not consented: read and search are refused, and they never appear.
    let conditions = env
        .app
        .gateway()
        .state
        .resources
        .latest_of_type(PATIENT, "Condition")
        .await
        .expect("condition");
    let (status, outcome) = get(
        &env,
        &format!("/fhir/Condition/{}", conditions.meta.id),
        &token,
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    let (status, _) = get(&env, "/fhir/Condition", &token).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let posted = env
        .app
        .client
        .post(env.url("/fhir/Condition/_search"))
        .bearer_auth(&token)
        .header("content-type", "application/x-www-form-urlencoded")
        .body("")
        .send()
        .await
        .expect("post search");
    assert_eq!(posted.status(), StatusCode::FORBIDDEN);
    let everything = all_pages(
        &env,
        &format!("/fhir/Patient/{PATIENT}/$everything?_count=2"),
        &token,
    )
    .await;
    assert!(everything.iter().all(|r| r["resourceType"] != "Condition"));
    assert_eq!(
        everything
            .iter()
            .filter(|r| r["resourceType"] == "Observation")
            .count(),
        8
    );
    assert_eq!(
        everything
            .iter()
            .filter(|r| r["resourceType"] == "Patient")
            .count(),
        1
    );
    assert_eq!(source_ids(&everything, "Encounter").len(), 1);
    assert!(leaves_containing(&env.app, "consent-denied").await >= 1);

    // Another patient's resource is "not found"; another patient's search is refused.
    let other = env
        .app
        .gateway()
        .state
        .resources
        .latest_of_type("patient-2", "Observation")
        .await
        .expect("other");
    let (status, _) = get(
        &env,
        &format!("/fhir/Observation/{}", other.meta.id),
        &token,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = get(&env, "/fhir/Observation?patient=patient-2", &token).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = get(&env, "/fhir/Patient/patient-2", &token).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // Reads and searches are audited under the consent.
    assert!(
        leaves_containing(
            &env.app,
            &format!("FHIR search Observation under consent {consent_id}")
        )
        .await
            >= 1
    );
    assert!(
        leaves_containing(
            &env.app,
            &format!("FHIR read Observation under consent {consent_id}")
        )
        .await
            >= 1
    );

    // The patient narrows the consent to observations: the same token now sees nothing else.
    let patient_session = env
        .app
        .sign_in(AccountRole::Patient, "patient1", Some(PATIENT))
        .await;
    // First, the patient's access log shows the app's reads, with categories and consent.
    let log: Value = env
        .app
        .client
        .get(env.url("/patient/access-log?limit=200"))
        .bearer_auth(&patient_session)
        .send()
        .await
        .expect("access log")
        .json()
        .await
        .expect("json");
    let observation_reads = log["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter(|e| e["consent_id"] == consent_id.as_str())
        .filter(|e| {
            e["categories"]
                .as_array()
                .is_some_and(|c| c.iter().any(|c| c["code"] == "observations"))
        })
        .count();
    assert!(observation_reads >= 3, "{log}");
    let ends_on = (time::OffsetDateTime::now_utc() + time::Duration::days(20))
        .date()
        .to_string();
    let changed = env
        .app
        .client
        .post(env.url(&format!("/api/consents/{consent_id}/change")))
        .bearer_auth(&patient_session)
        .json(&json!({"purposes": ["PATRQT"], "categories": ["observations"], "ends_on": ends_on}))
        .send()
        .await
        .expect("change");
    assert_eq!(changed.status(), StatusCode::OK);
    let everything = all_pages(
        &env,
        &format!("/fhir/Patient/{PATIENT}/$everything"),
        &token,
    )
    .await;
    assert!(
        everything
            .iter()
            .all(|r| r["resourceType"] == "Observation"),
        "only observations now"
    );
    assert_eq!(everything.len(), 8);
    let (status, _) = get(&env, "/fhir/MedicationRequest", &token).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // The patient reads everything of their own, consents included, with their own token.
    let (status, conditions) = get(&env, "/fhir/Condition", &patient_session).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(entries(&conditions, "match").len(), 1);
    let (status, consents) = get(&env, "/fhir/Consent", &patient_session).await;
    assert_eq!(status, StatusCode::OK);
    let consent = entries(&consents, "match")
        .into_iter()
        .find(|c| c["id"] == consent_id.as_str())
        .cloned()
        .expect("the consent");
    assert_eq!(consent["resourceType"], "Consent");
    let (status, read_consent) = get(
        &env,
        &format!("/fhir/Consent/{consent_id}"),
        &patient_session,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(read_consent["id"], consent_id.as_str());
    // A recipient cannot read consents through the API.
    let (status, _) = get(&env, "/fhir/Consent", &token).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // Withdrawn: the token is revoked and the next request is refused.
    let withdrawn = env
        .app
        .client
        .post(env.url(&format!("/api/consents/{consent_id}/withdraw")))
        .bearer_auth(&patient_session)
        .send()
        .await
        .expect("withdraw");
    assert_eq!(withdrawn.status(), StatusCode::OK);
    let (status, outcome) = get(&env, "/fhir/Observation", &token).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    env.stop().await;
}

async fn bad_fhir_requests_get_operation_outcomes(engine: Engine) {
    let env = env(engine).await;
    seed(&env).await;
    let (token, _) = token(
        &env,
        &[DataCategory::Observations],
        "launch/patient patient/Observation.rs",
    )
    .await;
    let refused = |status: StatusCode, outcome: &Value, expected: StatusCode, case: &str| {
        assert_eq!(status, expected, "{case}: {outcome}");
        assert_eq!(outcome["resourceType"], "OperationOutcome", "{case}");
        assert!(
            outcome["issue"][0]["diagnostics"]
                .as_str()
                .is_some_and(|d| !d.is_empty()),
            "{case}"
        );
    };
    for (path, expected, case) in [
        (
            "/fhir/Observation?_count=-1",
            StatusCode::BAD_REQUEST,
            "negative _count",
        ),
        (
            "/fhir/Observation?_count=many",
            StatusCode::BAD_REQUEST,
            "_count not a number",
        ),
        (
            "/fhir/Observation?date=yesterday",
            StatusCode::BAD_REQUEST,
            "malformed date",
        ),
        (
            "/fhir/Observation?_lastUpdated=2024-13",
            StatusCode::BAD_REQUEST,
            "malformed _lastUpdated",
        ),
        (
            "/fhir/Observation?date=ap2024",
            StatusCode::BAD_REQUEST,
            "unsupported prefix",
        ),
        (
            "/fhir/Observation?_cursor=%27%3B",
            StatusCode::BAD_REQUEST,
            "forged cursor",
        ),
        (
            "/fhir/MedicationRequest",
            StatusCode::FORBIDDEN,
            "type outside the token's scopes",
        ),
        (
            "/fhir/Practitioner",
            StatusCode::NOT_FOUND,
            "type not served",
        ),
        (
            "/fhir/Observation/no-such-id",
            StatusCode::NOT_FOUND,
            "unknown id",
        ),
        (
            "/fhir/Observation/x/_history/zero",
            StatusCode::NOT_FOUND,
            "bad version",
        ),
        (
            "/fhir/Observation/x/$validate",
            StatusCode::NOT_FOUND,
            "unknown operation",
        ),
    ] {
        let (status, outcome) = get(&env, path, &token).await;
        refused(status, &outcome, expected, case);
    }
    // Unknown parameters: lenient by default (ignored and said so), refused when strict.
    let (status, bundle) = get(&env, "/fhir/Observation?flavour=salty", &token).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(entries(&bundle, "match").len(), 8);
    let outcome = entries(&bundle, "outcome");
    assert!(outcome[0]["issue"][0]["diagnostics"]
        .as_str()
        .is_some_and(|d| d.contains("flavour")));
    let (status, outcome) = get_with(
        &env,
        "/fhir/Observation?flavour=salty",
        &token,
        Some("handling=strict"),
    )
    .await;
    refused(status, &outcome, StatusCode::BAD_REQUEST, "strict handling");
    // _count above the limit: clamped when lenient, refused when strict.
    let (status, _) = get(&env, "/fhir/Observation?_count=100000", &token).await;
    assert_eq!(status, StatusCode::OK);
    let (status, outcome) = get_with(
        &env,
        "/fhir/Observation?_count=100000",
        &token,
        Some("handling=strict"),
    )
    .await;
    refused(status, &outcome, StatusCode::BAD_REQUEST, "strict _count");
    // _count=0: the count only.
    let (status, bundle) = get(&env, "/fhir/Observation?_count=0", &token).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(bundle["total"], 8);
    assert!(entries(&bundle, "match").is_empty() && next_link(&bundle).is_none());
    // No token, a forged token, a system token.
    let response = env
        .app
        .client
        .get(env.url("/fhir/Observation"))
        .send()
        .await
        .expect("get");
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert!(response.headers()["www-authenticate"]
        .to_str()
        .expect("ascii")
        .starts_with("Bearer"));
    let (status, outcome) = get(&env, "/fhir/Observation", "forged-token").await;
    refused(status, &outcome, StatusCode::UNAUTHORIZED, "forged token");
    let key = BackendKey::generate_es384();
    let backend = env.key_client(&key).await;
    let (status, _, body) = env
        .with_key(
            "/oauth/token",
            &key,
            &backend,
            &[
                ("grant_type", "client_credentials"),
                ("scope", "system/Observation.rs"),
            ],
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, outcome) = get(
        &env,
        "/fhir/Observation",
        body["access_token"].as_str().expect("token"),
    )
    .await;
    refused(status, &outcome, StatusCode::FORBIDDEN, "system token");
    env.stop().await;
}
