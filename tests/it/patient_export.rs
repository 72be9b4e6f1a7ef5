//! The patient's own export end to end on both engines: step-up first; the whole record as
//! a FHIR `collection` Bundle and as a ZIP of NDJSON per type with Consents and a readable
//! Japanese summary; nothing of another patient; no file left behind; audited.

use std::collections::{HashMap, HashSet};
use std::io::Read;

use phr_consent::{DataCategory, Performer, PersonRef};
use phr_gateway::audit::AccountRole;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::both_engines;
use crate::fhir_api::{seed, PATIENT};
use crate::helpers::{grant_consent, leaves_containing, Engine};
use crate::oauth::{env, env_with, Env};

both_engines!(
    the_patient_takes_everything_out,
    an_export_imported_into_a_fresh_gateway_comes_back_the_same,
);

async fn export(env: &Env, session: &str, password: &str, format: &str) -> reqwest::Response {
    env.app
        .client
        .post(env.url("/patient/export"))
        .bearer_auth(session)
        .json(&json!({"password": password, "format": format}))
        .send()
        .await
        .expect("export")
}

async fn the_patient_takes_everything_out(engine: Engine) {
    let env = env(engine).await;
    seed(&env).await;
    let (consent_id, _) = grant_consent(
        &env.app,
        PATIENT,
        Performer::patient(&PersonRef::new(PATIENT)),
        "some-app",
        &["PATRQT"],
        &[DataCategory::Observations],
        30,
    )
    .await;
    let session = env
        .app
        .sign_in(AccountRole::Patient, "patient1", Some(PATIENT))
        .await;
    let password = "correct horse battery staple";
    assert_eq!(
        export(&env, &session, "wrong", "bundle").await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        export(&env, &session, password, "pdf").await.status(),
        StatusCode::BAD_REQUEST
    );

    // The Bundle: the Patient under the patient's id, every resource once, the consent.
    let response = export(&env, &session, password, "bundle").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "application/fhir+json");
    assert!(response.headers()["content-disposition"]
        .to_str()
        .expect("ascii")
        .starts_with("attachment"));
    let bundle: Value = response.json().await.expect("a JSON Bundle");
    assert_eq!(bundle["resourceType"], "Bundle");
    assert_eq!(bundle["type"], "collection");
    let entries = bundle["entry"].as_array().expect("entries");
    let mut by_type: HashMap<String, usize> = HashMap::new();
    for entry in entries {
        *by_type
            .entry(
                entry["resource"]["resourceType"]
                    .as_str()
                    .expect("type")
                    .to_string(),
            )
            .or_default() += 1;
    }
    let expected: HashMap<String, usize> = [
        ("Patient", 1),
        ("Observation", 8),
        ("Condition", 1),
        ("Medication", 1),
        ("MedicationRequest", 1),
        ("Encounter", 1),
        ("Consent", 1),
    ]
    .into_iter()
    .map(|(t, n)| (t.to_string(), n))
    .collect();
    assert_eq!(
        by_type, expected,
        "nothing of another patient, nothing twice"
    );
    let full_urls: HashSet<&str> = entries
        .iter()
        .filter_map(|e| e["fullUrl"].as_str())
        .collect();
    assert_eq!(full_urls.len(), entries.len());
    let patient = entries
        .iter()
        .find(|e| e["resource"]["resourceType"] == "Patient")
        .expect("patient");
    assert_eq!(patient["resource"]["id"], PATIENT);
    assert!(entries
        .iter()
        .filter(|e| e["resource"]["resourceType"] == "Observation")
        .all(|e| e["resource"]["subject"]["reference"] == format!("Patient/{PATIENT}")));
    assert!(entries
        .iter()
        .any(|e| e["resource"]["id"] == consent_id.as_str()));

    // The ZIP: one NDJSON file per type, the consents and the summary.
    let response = export(&env, &session, password, "ndjson-zip").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "application/zip");
    let bytes = response.bytes().await.expect("zip");
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes.to_vec())).expect("a ZIP");
    let mut lines: HashMap<String, usize> = HashMap::new();
    let mut summary = String::new();
    for i in 0..archive.len() {
        let mut file = archive.by_index(i).expect("entry");
        let name = file.name().to_string();
        let mut text = String::new();
        file.read_to_string(&mut text).expect("utf-8");
        if name == "summary.html" {
            summary = text;
            continue;
        }
        for line in text.lines() {
            let resource: Value = serde_json::from_str(line).expect("NDJSON line");
            assert_eq!(
                format!(
                    "{}.ndjson",
                    resource["resourceType"].as_str().expect("type")
                ),
                name
            );
        }
        lines.insert(
            name.trim_end_matches(".ndjson").to_string(),
            text.lines().count(),
        );
    }
    assert_eq!(lines, expected);
    assert!(summary.contains("健康記録のまとめ"), "a Japanese summary");
    assert!(summary.contains("収縮期血圧"), "blood pressure over time");
    assert!(summary.contains("高血圧症"), "conditions listed");
    // No export file stays on disk.
    let tmp = env.app.gateway().state.config.data_dir.join("tmp");
    let left = std::fs::read_dir(&tmp).map(|d| d.count()).unwrap_or(0);
    assert_eq!(left, 0);

    // The summary as a portal page.
    let page = env
        .app
        .client
        .get(env.url("/portal/summary"))
        .bearer_auth(&session)
        .send()
        .await
        .expect("summary");
    assert_eq!(page.status(), StatusCode::OK);
    assert!(page.text().await.expect("html").contains("拡張期血圧"));
    assert!(leaves_containing(&env.app, "patient export (bundle)").await >= 1);
    assert!(leaves_containing(&env.app, "patient export (ndjson-zip)").await >= 1);
    env.stop().await;
}

/// Content without the ids a gateway assigns: no `id`, no `meta`, references by type only.
fn normalised(resource: &Value) -> String {
    fn strip(value: &mut Value) {
        match value {
            Value::Object(map) => {
                map.remove("id");
                map.remove("meta");
                if let Some(Value::String(reference)) = map.get_mut("reference") {
                    *reference = reference.split('/').next().unwrap_or_default().to_string();
                }
                map.values_mut().for_each(strip);
            }
            Value::Array(items) => items.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let mut copy = resource.clone();
    strip(&mut copy);
    copy.to_string()
}

fn contents(bundle: &Value) -> Vec<(String, String)> {
    let mut all: Vec<(String, String)> = bundle["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| &e["resource"])
        // Consents are the gateway's own records, Provenance its own account of arrivals.
        .filter(|r| r["resourceType"] != "Consent" && r["resourceType"] != "Provenance")
        .map(|r| {
            (
                r["resourceType"].as_str().unwrap_or_default().to_string(),
                normalised(r),
            )
        })
        .collect();
    all.sort();
    all
}

async fn import(env: &Env, session: &str, content_type: &str, body: Vec<u8>) -> reqwest::Response {
    env.app
        .client
        .post(env.url("/patient/import"))
        .bearer_auth(session)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .expect("import")
}

async fn an_export_imported_into_a_fresh_gateway_comes_back_the_same(engine: Engine) {
    let source = env(engine).await;
    seed(&source).await;
    grant_consent(
        &source.app,
        PATIENT,
        Performer::patient(&PersonRef::new(PATIENT)),
        "some-app",
        &["PATRQT"],
        &[DataCategory::Observations],
        30,
    )
    .await;
    let session = source
        .app
        .sign_in(AccountRole::Patient, "patient1", Some(PATIENT))
        .await;
    let password = "correct horse battery staple";
    let exported: Value = export(&source, &session, password, "bundle")
        .await
        .json()
        .await
        .expect("bundle");
    let zip = export(&source, &session, password, "ndjson-zip")
        .await
        .bytes()
        .await
        .expect("zip")
        .to_vec();

    // A small limit, so the oversize body still fits in the socket buffers and the 413 is read.
    let target = env_with(engine, |c| c.http.body_limit_bytes = 16 * 1024).await;
    let newcomer = target
        .app
        .sign_in(AccountRole::Patient, "newcomer", Some("p-new"))
        .await;
    // Not FHIR, and not JSON at all: refused, nothing stored.
    for (content_type, body) in [
        (
            "application/fhir+json",
            br#"{"resourceType":"Patient","id":"x"}"#.to_vec(),
        ),
        ("application/fhir+json", b"\xff\xfe".to_vec()),
        ("text/csv", b"a,b".to_vec()),
    ] {
        let refused = import(&target, &newcomer, content_type, body).await;
        assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    }
    let huge = import(
        &target,
        &newcomer,
        "application/fhir+json",
        vec![b' '; target.app.gateway().state.config.http.body_limit_bytes + 1],
    )
    .await;
    assert_eq!(huge.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        target
            .app
            .gateway()
            .state
            .resources
            .count("p-new")
            .await
            .expect("count"),
        0
    );

    let response = import(
        &target,
        &newcomer,
        "application/fhir+json",
        exported.to_string().into_bytes(),
    )
    .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let imported: Value = response.json().await.expect("json");
    assert_eq!(imported["created"], 13, "{imported}");
    assert!(imported["skipped"][0]
        .as_str()
        .is_some_and(|s| s.starts_with("Consent")));
    // The same file again changes nothing; the ZIP of the same record neither.
    let again: Value = import(
        &target,
        &newcomer,
        "application/fhir+json",
        exported.to_string().into_bytes(),
    )
    .await
    .json()
    .await
    .expect("json");
    assert_eq!(again["unchanged"], 13, "{again}");
    let from_zip = import(&target, &newcomer, "application/zip", zip).await;
    assert_eq!(from_zip.status(), StatusCode::CREATED);
    let from_zip: Value = from_zip.json().await.expect("json");
    assert_eq!(from_zip["created"], 0, "{from_zip}");

    // Exported again from the new gateway: the same resources, the same contents.
    let round_trip: Value = export(&target, &newcomer, password, "bundle")
        .await
        .json()
        .await
        .expect("bundle");
    assert_eq!(contents(&round_trip), contents(&exported));

    // Someone else's record is refused: the birth dates differ.
    let mut other = exported.clone();
    for entry in other["entry"].as_array_mut().expect("entries") {
        if entry["resource"]["resourceType"] == "Patient" {
            entry["resource"]["birthDate"] = json!("1955-05-05");
        }
    }
    let refused = import(
        &target,
        &newcomer,
        "application/fhir+json",
        other.to_string().into_bytes(),
    )
    .await;
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    assert!(leaves_containing(&target.app, "import refused").await >= 4);
    source.stop().await;
    target.stop().await;
}
