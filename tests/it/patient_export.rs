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
use crate::oauth::{env, Env};

both_engines!(the_patient_takes_everything_out,);

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
