//! Reconciliation across sources, end to end on both engines: a dispensing the hospital
//! reports (its own MedicationDispense) and the portal reports (薬剤情報 from claims) is
//! stored once, its history keeps both copies, and its Provenance names both sources.

use phr_adapters::fhir_r4::simulator::patient_agent::sign_in_and_decide;
use phr_adapters::fhir_r4::simulator::{HospitalSimulator, SimulatorConfig as HospitalConfig};
use phr_adapters::fhir_r4::BackendKey;
use phr_adapters::self_info::simulator::patient_agent::read_card_and_decide;
use phr_adapters::self_info::simulator::{PortalSimulator, SimulatorConfig as PortalConfig};
use phr_adapters::self_info::Category;
use phr_gateway::audit::AccountRole;
use phr_gateway::config::{SourceConfig, SourceKind};
use phr_gateway::pull::queue::JobOutcome;
use phr_gateway::pull::worker::RunResult;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::both_engines;
use crate::helpers::{
    count, hospital_source, make_due, provenance_sources_of, spawn_app_with, Engine, TestApp,
    TestEnv,
};

both_engines!(a_dispensing_from_the_hospital_and_the_portal_is_stored_once);

const YJ: &str = "http://capstandard.jp/iyaku.info/CodeSystem/YJ-code";
const HOT9: &str = "http://medis.or.jp/CodeSystem/master-HOT9";
const INSTITUTION: &str = "http://jpfhir.jp/fhir/core/IdSystem/insurance-medical-institution-no";

async fn run_jobs(app: &TestApp) {
    let worker = app.gateway().state.pull_worker();
    while let Some((_, result)) = worker.run_once().await.expect("worker") {
        assert_eq!(result, RunResult::Finished(JobOutcome::Done));
    }
}

async fn dispensings(app: &TestApp) -> i64 {
    count(
        app,
        "SELECT COUNT(*) FROM resources WHERE patient_id = 'p-hanako' \
         AND resource_type = 'MedicationDispense'",
    )
    .await
}

/// Gives a pull instruction for medications; returns its id and the source's authorize URL.
async fn give(app: &TestApp, token: &str, source_id: &str) -> (String, String) {
    let given = app
        .client
        .post(app.url("/patient/pull-instructions"))
        .bearer_auth(token)
        .json(&json!({"source_id": source_id, "categories": ["medications"]}))
        .send()
        .await
        .expect("give");
    assert_eq!(given.status(), StatusCode::CREATED);
    let given: Value = given.json().await.expect("json");
    (
        given["instruction"]["id"].as_str().expect("id").to_string(),
        given["authorize_url"]
            .as_str()
            .expect("authorize_url")
            .to_string(),
    )
}

async fn come_back(app: &TestApp, location: &str) {
    let linked = app.client.get(location).send().await.expect("callback");
    assert_eq!(linked.status(), StatusCode::OK);
}

async fn a_dispensing_from_the_hospital_and_the_portal_is_stored_once(engine: Engine) {
    let key = BackendKey::generate_es384();
    let portal = PortalSimulator::start(PortalConfig::new("phr-gateway", key.public_jwk()))
        .await
        .expect("portal");
    let hospital = HospitalSimulator::start(HospitalConfig {
        patients: 1,
        resources_per_patient: 5,
        offer_everything: false,
        ..HospitalConfig::default()
    })
    .await
    .expect("hospital");
    let (portal_url, hospital_url) = (portal.base_url.clone(), hospital.base_url.clone());
    let pem = key.to_pem().expect("pem");
    let app = spawn_app_with(TestEnv::new(engine).await, move |c| {
        c.pull.workers = 0;
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
    let token = app
        .sign_in(AccountRole::Patient, "hanako", Some("p-hanako"))
        .await;

    // The portal first: every item of every dispensing record is one MedicationDispense.
    let person = portal.handle.person(1).expect("person 1");
    let (portal_instruction, url) = give(&app, &token, "portal").await;
    let visit = read_card_and_decide(&url, &person.card_number, &person.pin, true)
        .await
        .expect("consent at the portal");
    come_back(&app, &visit.location).await;
    run_jobs(&app).await;
    let records: Vec<Value> = portal
        .handle
        .records(&person.subject)
        .into_iter()
        .filter(|(category, _, _, withdrawn)| *category == Category::Medication && !withdrawn)
        .filter_map(|(_, id, ..)| portal.handle.record_json(&person.subject, &id))
        .collect();
    let from_portal = dispensings(&app).await;
    assert!(from_portal > 0);

    // The hospital dispensed one of those drugs itself (院内処方) and reports it with both
    // YJ and HOT9 codes; it also reports a dispensing the portal does not know.
    let (record, item) = records
        .iter()
        .find_map(|r| {
            let item = r["items"]
                .as_array()?
                .iter()
                .find(|i| i["code_system"] == "YJ" || i["code_system"] == "HOT9")?;
            Some((r, item))
        })
        .expect("a dispensing coded in YJ or HOT9");
    let (system, other) = if item["code_system"] == "YJ" {
        (YJ, (HOT9, "999999999"))
    } else {
        (HOT9, (YJ, "9999999F9999"))
    };
    let hospital_patient = hospital.handle.patient(1).expect("patient 1").patient_id;
    let dispense = |day: &str, code: &str| {
        json!({
            "resourceType": "MedicationDispense",
            "status": "completed",
            "subject": {"reference": format!("Patient/{hospital_patient}")},
            "medicationCodeableConcept": {"coding": [
                {"system": system, "code": code},
                {"system": other.0, "code": other.1},
            ]},
            "performer": [{"actor": {
                "identifier": {"system": INSTITUTION, "value": record["pharmacy"]["code"]},
                "display": record["pharmacy"]["name"],
            }}],
            "quantity": {"value": item["quantity"], "unit": item["unit"]},
            "whenHandedOver": format!("{}T10:00:00+09:00", day),
        })
    };
    let day = record["dispensed_on"].as_str().expect("dispensed_on");
    let code = item["drug_code"].as_str().expect("drug_code");
    hospital
        .handle
        .add_resource(&hospital_patient, dispense(day, code))
        .expect("same dispensing");
    hospital
        .handle
        .add_resource(&hospital_patient, dispense("2020-01-01", code))
        .expect("another dispensing");
    let (_, url) = give(&app, &token, "hospital").await;
    let location = sign_in_and_decide(&url, "patient-0001", "phr-sim-0001", |_| true, true)
        .await
        .expect("patient approves at the hospital");
    come_back(&app, &location).await;
    run_jobs(&app).await;

    // One more, not two: the matching one joined the portal's copy.
    assert_eq!(dispensings(&app).await, from_portal + 1);
    let joined: Vec<(String, i64)> = sqlx::query_as(
        "SELECT id, current_version FROM resources WHERE patient_id = 'p-hanako' \
         AND resource_type = 'MedicationDispense' AND current_version > 1",
    )
    .fetch_all(app.gateway().state.db.read_pool())
    .await
    .expect("joined");
    assert_eq!(joined.len(), 1, "{joined:?}");
    let (id, version) = &joined[0];
    assert_eq!(*version, 2, "the portal's copy, then the hospital's");
    let mut sources = provenance_sources_of(&app, &token, id).await;
    sources.sort();
    sources.dedup();
    assert_eq!(sources, vec!["hospital".to_string(), "portal".to_string()]);

    // Pulling again from both changes nothing.
    make_due(&app).await;
    run_jobs(&app).await;
    assert_eq!(dispensings(&app).await, from_portal + 1);
    let versions = count(
        &app,
        &format!("SELECT COUNT(*) FROM resource_versions WHERE resource_id = '{id}'"),
    )
    .await;
    assert_eq!(versions, 2);

    // A correction from the portal updates the same resource in place.
    portal
        .handle
        .correct_record(&person.subject, record["id"].as_str().expect("id"))
        .expect("corrected");
    make_due(&app).await;
    run_jobs(&app).await;
    assert_eq!(dispensings(&app).await, from_portal + 1);
    let current = count(
        &app,
        &format!("SELECT current_version FROM resources WHERE id = '{id}'"),
    )
    .await;
    assert_eq!(current, 3, "the portal's correction is the newest version");

    // The patient withdraws the portal instruction and deletes what it delivered: the
    // dispensings only the portal reported go; the one the hospital also reported stays.
    let withdrawn = app
        .client
        .post(app.url(&format!(
            "/patient/pull-instructions/{portal_instruction}/withdraw"
        )))
        .bearer_auth(&token)
        .json(&json!({"delete_received": true}))
        .send()
        .await
        .expect("withdraw");
    assert_eq!(withdrawn.status(), StatusCode::OK);
    assert_eq!(dispensings(&app).await, 2);
    let kept = count(
        &app,
        &format!("SELECT COUNT(*) FROM resources WHERE id = '{id}'"),
    )
    .await;
    assert_eq!(kept, 1);
}
