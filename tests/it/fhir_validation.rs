//! What the gateway hands out is valid FHIR R4, checked by tools that are not the
//! gateway's: realistic data is pulled from both simulators (the hospital's JP Core
//! resources and the portal's 特定健診 report Bundles, medicines, immunizations and medical
//! costs), then exported every way a recipient or the patient can take it — a Bulk
//! `Group/$export`, the patient's `ndjson-zip` and `bundle` exports and the FHIR API's
//! `$everything` — and every resource is checked:
//!
//! - in Rust, through the adapters' typed check (the fhir-sdk models the gateway uses on
//!   what it receives);
//! - by `tests/python/validate_fhir.py`: the plain R4 models of `fhir.resources` 6.4.0 and
//!   the official R4 JSON Schema (required code sets), plus the Bundle invariants.
//!
//! SQLite only: storage is covered on both engines elsewhere; this is about the output.
//! Needs what `.ci/run` installs (`tests/python/.venv` and `tests/python/node_modules`).

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use phr_adapters::fhir_r4::simulator::patient_agent::sign_in_and_decide;
use phr_adapters::fhir_r4::simulator::{HospitalSimulator, SimulatorConfig as HospitalConfig};
use phr_adapters::fhir_r4::typed_check::check_typed;
use phr_adapters::fhir_r4::BackendKey;
use phr_adapters::self_info::simulator::patient_agent::read_card_and_decide;
use phr_adapters::self_info::simulator::{PortalSimulator, SimulatorConfig as PortalConfig};
use phr_consent::{DataCategory, Performer, PersonRef};
use phr_gateway::audit::AccountRole;
use phr_gateway::config::{SourceConfig, SourceKind};
use phr_gateway::export::ExportStatus;
use phr_gateway::pull::queue::JobOutcome;
use phr_gateway::pull::worker::RunResult;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::bulk_export::{backend_token, manifest, run, started};
use crate::helpers::{grant_consent, hospital_source, Engine};
use crate::oauth::{env_with, Env};

const PATIENT: &str = "p-hanako";
const PASSWORD: &str = "correct horse battery staple";

const ECHECKUP_BUNDLE: &str =
    "http://jpfhir.jp/fhir/eCheckup/StructureDefinition/JP_Bundle_eCheckupGeneral";
const JP_CORE: &str = "http://jpfhir.jp/fhir/core/StructureDefinition/";

/// The interpreter `.ci/run` installs the validator's packages into.
fn python() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/.venv/bin/python")
}

fn validator() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/validate_fhir.py")
}

fn jp_profile_validator() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/validate_jp_profiles.py")
}

const INSTALL: &str = "the FHIR validation test needs what .ci/run installs: \
    `python3 -m venv tests/python/.venv && tests/python/.venv/bin/pip install -r \
    tests/python/validation-requirements.txt` and `npm ci --prefix tests/python` \
    (run .ci/run, or those two steps)";

/// Hospital JP Core data and the portal's checkups, medicines, immunizations and costs,
/// pulled into `PATIENT`; a gateway without background workers.
async fn pulled(env_key: &BackendKey) -> (Env, String) {
    let hospital = HospitalSimulator::start(HospitalConfig {
        patients: 1,
        resources_per_patient: 80,
        offer_everything: false,
        ..HospitalConfig::default()
    })
    .await
    .expect("hospital simulator");
    let portal = PortalSimulator::start(PortalConfig::new("phr-gateway", env_key.public_jwk()))
        .await
        .expect("portal simulator");
    let hospital_url = hospital.base_url.clone();
    let portal_url = portal.base_url.clone();
    let pem = env_key.to_pem().expect("pem");
    let env = env_with(Engine::Sqlite, move |c| {
        c.export.workers = 0;
        c.notifications.deliver = false;
        c.sources = vec![
            hospital_source(hospital_url, 20),
            SourceConfig {
                id: "portal".into(),
                display_name: "マイナポータル".into(),
                kind: SourceKind::SelfInfo,
                base_url: portal_url,
                client_id: "phr-gateway".into(),
                page_size: Some(5),
                max_concurrent_requests: None,
                auth: Default::default(),
                portal_categories: None,
            },
        ];
        phr_gateway::crypto::key_file::write_private(&c.source_client_key_path(), pem.as_bytes())
            .expect("key file");
    })
    .await;
    let session = env
        .app
        .sign_in(AccountRole::Patient, "hanako", Some(PATIENT))
        .await;

    // The hospital: every category it offers, approved at its sign-in page.
    let given = instruct(
        &env,
        &session,
        "hospital",
        &[
            "demographics",
            "observations",
            "conditions",
            "allergies",
            "medications",
            "immunizations",
            "encounters",
            "documents",
        ],
    )
    .await;
    let location = sign_in_and_decide(&given, "patient-0001", "phr-sim-0001", |_| true, true)
        .await
        .expect("the patient approves at the hospital");
    come_back(&env, &location).await;

    // The portal: the card read and consent given there.
    let given = instruct(
        &env,
        &session,
        "portal",
        &["medications", "immunizations", "documents", "medical-costs"],
    )
    .await;
    let person = portal.handle.person(1).expect("person 1");
    let visit = read_card_and_decide(&given, &person.card_number, &person.pin, true)
        .await
        .expect("consent at the portal");
    come_back(&env, &visit.location).await;

    let worker = env.app.gateway().state.pull_worker();
    let mut results = Vec::new();
    for _ in 0..20 {
        match worker.run_once().await.expect("worker pass") {
            Some((_, result)) => results.push(result),
            None => break,
        }
    }
    assert_eq!(
        results,
        vec![
            RunResult::Finished(JobOutcome::Done),
            RunResult::Finished(JobOutcome::Done)
        ],
        "both pulls finish"
    );
    // The simulators are needed only for the pulls.
    drop((hospital, portal));
    (env, session)
}

/// Gives a pull instruction; returns the source's authorisation URL.
async fn instruct(env: &Env, session: &str, source: &str, categories: &[&str]) -> String {
    let given = env
        .app
        .client
        .post(env.url("/patient/pull-instructions"))
        .bearer_auth(session)
        .json(&json!({"source_id": source, "categories": categories}))
        .send()
        .await
        .expect("give");
    assert_eq!(given.status(), StatusCode::CREATED, "{source}");
    let given: Value = given.json().await.expect("json");
    given["authorize_url"]
        .as_str()
        .expect("authorize_url")
        .to_string()
}

async fn come_back(env: &Env, location: &str) {
    let linked = env.app.client.get(location).send().await.expect("callback");
    assert_eq!(linked.status(), StatusCode::OK);
    let linked: Value = linked.json().await.expect("json");
    assert_eq!(linked["instruction"]["status"], "active");
}

async fn patient_export(env: &Env, session: &str, format: &str) -> reqwest::Response {
    let response = env
        .app
        .client
        .post(env.url("/patient/export"))
        .bearer_auth(session)
        .json(&json!({"password": PASSWORD, "format": format}))
        .send()
        .await
        .expect("export");
    assert_eq!(response.status(), StatusCode::OK, "{format}");
    response
}

fn write(path: &Path, contents: &[u8]) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, contents).expect("write");
}

/// Every resource in `text` (NDJSON lines, or one JSON resource), Bundle entries included.
fn resources_in(name: &str, text: &str) -> Vec<Value> {
    let top: Vec<Value> = if name.ends_with(".ndjson") {
        text.lines()
            .filter(|line| !line.trim().is_empty())
            .map(|line| serde_json::from_str(line).expect("each NDJSON line is JSON"))
            .collect()
    } else {
        vec![serde_json::from_str(text).expect("JSON")]
    };
    let mut all = Vec::new();
    let mut pending = top;
    while let Some(resource) = pending.pop() {
        if let Some(entries) = resource["entry"].as_array() {
            pending.extend(entries.iter().filter_map(|e| e.get("resource").cloned()));
        }
        all.push(resource);
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_exported_resource_passes_external_r4_validation() {
    // Fail early, and clearly, when the validator cannot run.
    assert!(
        python().is_file(),
        "{} is missing: {INSTALL}",
        python().display()
    );

    let portal_key = BackendKey::generate_es384();
    let (env, session) = pulled(&portal_key).await;
    let out = tempfile::tempdir().expect("tempdir");

    // (a) A recipient's backend, consented to everything, exports its group.
    let key = BackendKey::generate_es384();
    let client_id = env.key_client(&key).await;
    grant_consent(
        &env.app,
        PATIENT,
        Performer::patient(&PersonRef::new(PATIENT)),
        &client_id,
        &["PATRQT"],
        &DataCategory::ALL,
        30,
    )
    .await;
    let token = backend_token(&env, &key, &client_id, "system/*.rs").await;
    let status_url = started(&env, &token, &format!("/fhir/Group/{client_id}/$export")).await;
    assert_eq!(run(&env).await, Some(ExportStatus::Done));
    let done = manifest(&env, &token, &status_url).await;
    let mut bulk_types = Vec::new();
    for (n, output) in done["output"]
        .as_array()
        .expect("output")
        .iter()
        .enumerate()
    {
        let resource_type = output["type"].as_str().expect("type");
        let url = output["url"].as_str().expect("url");
        let response = env
            .app
            .client
            .get(url)
            .bearer_auth(&token)
            .send()
            .await
            .expect("file");
        assert_eq!(response.status(), StatusCode::OK, "{url}");
        let text = response.text().await.expect("ndjson");
        write(
            &out.path()
                .join(format!("bulk/{n:02}-{resource_type}.ndjson")),
            text.as_bytes(),
        );
        bulk_types.push(resource_type.to_string());
    }
    for expected in [
        "Patient",
        "Observation",
        "Condition",
        "MedicationDispense",
        "Immunization",
        "Bundle",
        "DocumentReference",
        "ExplanationOfBenefit",
    ] {
        assert!(
            bulk_types.iter().any(|t| t == expected),
            "bulk export has {expected}: {bulk_types:?}"
        );
    }

    // (b) The patient's ZIP of NDJSON, unzipped (the summary page is not FHIR).
    let zip = patient_export(&env, &session, "ndjson-zip")
        .await
        .bytes()
        .await
        .expect("zip");
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(zip.to_vec())).expect("a ZIP");
    let mut zipped = 0;
    for i in 0..archive.len() {
        let mut file = archive.by_index(i).expect("entry");
        let name = file.name().to_string();
        if !name.ends_with(".ndjson") {
            continue;
        }
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).expect("read");
        write(&out.path().join("zip").join(&name), &bytes);
        zipped += 1;
    }
    assert!(zipped >= 8, "NDJSON files in the ZIP: {zipped}");

    // (c) The patient's collection Bundle.
    let bundle = patient_export(&env, &session, "bundle")
        .await
        .bytes()
        .await
        .expect("bundle");
    write(&out.path().join("bundle/record.json"), &bundle);

    // (d) The FHIR API: the patient's `$everything`, page by page.
    let mut next = Some(env.url(&format!("/fhir/Patient/{PATIENT}/$everything?_count=50")));
    let mut pages = 0;
    while let Some(url) = next.take() {
        let response = env
            .app
            .client
            .get(&url)
            .bearer_auth(&session)
            .send()
            .await
            .expect("$everything");
        assert_eq!(response.status(), StatusCode::OK, "{url}");
        let page: Value = response.json().await.expect("searchset");
        assert_eq!(page["type"], "searchset");
        next = page["link"].as_array().and_then(|links| {
            links
                .iter()
                .find(|l| l["relation"] == "next")
                .and_then(|l| l["url"].as_str())
                .map(str::to_string)
        });
        write(
            &out.path().join(format!("api/everything-{pages:02}.json")),
            page.to_string().as_bytes(),
        );
        pages += 1;
        assert!(pages < 50, "$everything pages end");
    }

    // Every file, every resource, through the gateway's own typed check (fhir-sdk).
    let mut typed_failures = Vec::new();
    let mut typed_checked = 0;
    let mut checkup_bundles = 0;
    let mut profiled: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for entry in walk(out.path()) {
        let name = entry.display().to_string();
        let text = std::fs::read_to_string(&entry).expect("utf-8");
        for resource in resources_in(&name, &text) {
            let resource_type = resource["resourceType"].as_str().unwrap_or("").to_string();
            if let Err(error) = check_typed(&resource_type, &resource.to_string()) {
                typed_failures.push(format!(
                    "{name}: {resource_type}/{}: {error}",
                    resource["id"]
                ));
            }
            typed_checked += 1;
            let profiles: Vec<&str> = resource["meta"]["profile"]
                .as_array()
                .map(|p| p.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let counts = profiled.entry(resource_type.clone()).or_default();
            counts.0 += 1;
            if !profiles.is_empty() {
                counts.1 += 1;
            }
            if resource_type == "Bundle" && resource["type"] == "document" {
                checkup_bundles += 1;
                assert!(
                    profiles.contains(&ECHECKUP_BUNDLE),
                    "{name}: a checkup report Bundle carries the eCheckupReport profile: {profiles:?}"
                );
            }
            // What the hospital sent (JP Core) and what the portal's records were mapped to
            // keep or carry their JP Core profile; checkup report contents carry eCheckup's.
            let source = resource["meta"]["source"].as_str().unwrap_or_default();
            if matches!(
                source,
                "urn:phr-gateway:source:hospital" | "urn:phr-gateway:source:portal"
            ) && matches!(
                resource_type.as_str(),
                "Patient"
                    | "Observation"
                    | "Condition"
                    | "AllergyIntolerance"
                    | "MedicationRequest"
                    | "MedicationDispense"
                    | "Immunization"
                    | "Encounter"
            ) {
                assert!(
                    profiles.iter().any(|p| p.starts_with(JP_CORE)),
                    "{name}: {resource_type} from {source} carries a JP Core profile: {profiles:?}"
                );
            }
        }
    }
    assert!(
        typed_failures.is_empty(),
        "the typed check refuses exported resources:\n{}",
        typed_failures.join("\n")
    );
    assert!(typed_checked > 200, "typed check saw {typed_checked}");
    assert!(
        checkup_bundles >= 4,
        "checkup report Bundles in the exports: {checkup_bundles}"
    );
    println!("meta.profile present (type: resources, with a profile): {profiled:?}");

    // The external validators over every line and every Bundle.
    let summary_path = out.path().join("validation-summary.json");
    let validated = Command::new(python())
        .arg(validator())
        .arg(out.path().join("bulk"))
        .arg(out.path().join("zip"))
        .arg(out.path().join("bundle"))
        .arg(out.path().join("api"))
        .arg("--summary-json")
        .arg(&summary_path)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}; {INSTALL}", python().display()));
    let stdout = String::from_utf8_lossy(&validated.stdout);
    let stderr = String::from_utf8_lossy(&validated.stderr);
    assert_ne!(
        validated.status.code(),
        Some(3),
        "the validator's packages or schema are missing: {stderr}\n{INSTALL}"
    );
    assert!(
        validated.status.success(),
        "external FHIR R4 validation failed ({}):\n{stdout}\n{stderr}",
        validated.status
    );
    let summary: HashMap<String, (u64, u64)> =
        serde_json::from_str(&std::fs::read_to_string(&summary_path).expect("summary"))
            .expect("summary JSON");
    assert!(
        summary.values().all(|(_, failed)| *failed == 0),
        "{summary:?}"
    );
    let checked = |t: &str| summary.get(t).map(|(n, _)| *n).unwrap_or(0);
    for (resource_type, at_least) in [
        // Each export way carries the pulled record (about 80 hospital resources, the
        // portal's records and one checkup), so four times what one patient holds.
        ("Observation", 120),
        ("Patient", 4),
        ("Condition", 16),
        ("AllergyIntolerance", 16),
        ("Encounter", 16),
        ("MedicationRequest", 16),
        ("MedicationDispense", 16),
        ("Immunization", 16),
        ("ExplanationOfBenefit", 8),
        ("Bundle", 7),
        ("Composition", 4),
        ("DocumentReference", 4),
        ("Provenance", 8),
        ("Consent", 2),
    ] {
        assert!(
            checked(resource_type) >= at_least,
            "the validator checked {} {resource_type} (at least {at_least} expected): {summary:?}",
            checked(resource_type)
        );
    }
    let total: u64 = summary.values().map(|(n, _)| n).sum();
    assert!(total as usize >= typed_checked, "{total} < {typed_checked}");
    println!("{stdout}");

    // The JP profiles every exported resource claims in `meta.profile`, against the
    // vendored JP Core and eCheckup StructureDefinitions (what that validator does and
    // does not check is in its docstring).
    let jp_summary_path = out.path().join("jp-profile-summary.json");
    let jp = Command::new(python())
        .arg(jp_profile_validator())
        .arg(out.path().join("bulk"))
        .arg(out.path().join("zip"))
        .arg(out.path().join("bundle"))
        .arg(out.path().join("api"))
        .arg("--summary-json")
        .arg(&jp_summary_path)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}; {INSTALL}", python().display()));
    let jp_stdout = String::from_utf8_lossy(&jp.stdout);
    let jp_stderr = String::from_utf8_lossy(&jp.stderr);
    assert_ne!(
        jp.status.code(),
        Some(3),
        "the JP profile validator's packages or definitions are missing: {jp_stderr}\n{INSTALL}"
    );
    assert!(
        jp.status.success(),
        "JP profile validation failed ({}):\n{jp_stdout}\n{jp_stderr}",
        jp.status
    );
    let jp_summary: HashMap<String, Vec<u64>> =
        serde_json::from_str(&std::fs::read_to_string(&jp_summary_path).expect("summary"))
            .expect("summary JSON");
    let jp_checked = |profile: &str| {
        jp_summary
            .get(&format!("{JP_CORE}{profile}"))
            .and_then(|counts| counts.first().copied())
            .unwrap_or(0)
    };
    for (profile, at_least) in [
        ("JP_Patient", 4),
        ("JP_Observation_LabResult", 40),
        ("JP_Condition", 16),
        ("JP_AllergyIntolerance", 16),
        ("JP_Encounter", 16),
        ("JP_MedicationRequest", 16),
        ("JP_MedicationDispense", 16),
        ("JP_Immunization", 16),
    ] {
        assert!(
            jp_checked(profile) >= at_least,
            "the JP profile validator checked {} {profile} (at least {at_least} expected): \
             {jp_summary:?}",
            jp_checked(profile)
        );
    }
    // The checkup reports' Bundle profile too (its entry slices counted by the script).
    let bundle_counts = jp_summary.get(ECHECKUP_BUNDLE).cloned().unwrap_or_default();
    assert!(
        bundle_counts.first().is_some_and(|checked| *checked >= 1)
            && bundle_counts.get(1) == Some(&0),
        "the checkup report Bundles are checked against {ECHECKUP_BUNDLE}: {jp_summary:?}"
    );
    let not_checked: Vec<&String> = jp_summary
        .iter()
        .filter(|(_, counts)| counts.get(2).is_some_and(|n| *n > 0))
        .map(|(profile, _)| profile)
        .collect();
    assert!(
        not_checked.is_empty(),
        "profiles not checked: {not_checked:?}"
    );
    println!("{jp_stdout}");

    // The validator does refuse: a code outside its required set (only the schema sees
    // it), an element R4 does not have, and a request in a collection Bundle.
    let canary = out.path().join("canary/bad.ndjson");
    write(
        &canary,
        concat!(
            r#"{"resourceType":"Observation","id":"a","status":"finalised","code":{"text":"x"}}"#,
            "\n",
            r#"{"resourceType":"Observation","id":"b","status":"final","code":{"text":"x"},"notR4":1}"#,
            "\n",
            r#"{"resourceType":"Bundle","id":"c","type":"collection","entry":[{"fullUrl":"urn:uuid:6f1c2a1e-0000-4000-8000-000000000001","resource":{"resourceType":"Patient"},"request":{"method":"PUT","url":"Patient/x"}}]}"#,
            "\n"
        )
        .as_bytes(),
    );
    let refused = Command::new(python())
        .arg(validator())
        .arg(&canary)
        .output()
        .expect("validator");
    let said = String::from_utf8_lossy(&refused.stdout);
    assert_eq!(refused.status.code(), Some(1), "{said}");
    for expected in [
        "bad.ndjson:1 Observation/a [schema] status",
        "bad.ndjson:2 Observation/b [fhir.resources] notR4",
        "bad.ndjson:3 Bundle/c [invariant] bdl-3",
    ] {
        assert!(said.contains(expected), "{expected} in:\n{said}");
    }
}

/// The JP profile validator itself: the publishers' examples pass, a broken variant of each
/// (one rule its profile really states) fails with the element named, and its known gaps
/// stay pinned (`tests/python/test_validate_jp_profiles.py`).
#[test]
fn the_jp_profile_validator_passes_the_examples_and_refuses_broken_variants() {
    let tests =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/test_validate_jp_profiles.py");
    let ran = Command::new(python())
        .arg(&tests)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}; {INSTALL}", python().display()));
    let said = String::from_utf8_lossy(&ran.stderr);
    assert!(ran.status.success(), "{said}\n{INSTALL}");
    // unittest reports on stderr: "Ran N tests" and "OK".
    let ran_count: usize = said
        .lines()
        .find_map(|line| line.strip_prefix("Ran ")?.split(' ').next()?.parse().ok())
        .expect("a unittest summary");
    assert!(ran_count >= 30, "{said}");
}

/// The files under `dir`, sorted.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).expect("dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                pending.push(path);
            } else if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("ndjson" | "json")
            ) {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}
