//! The My Number Portal-style source end to end on both engines: the patient links the
//! (simulated) portal with their card, the gateway pulls 薬剤情報, 予防接種, 医療費通知 and
//! 特定健診 (converted into checkup report Bundles), and an uploaded copy of a checkup the
//! portal already delivered is recognised and stored once.

use phr_adapters::fhir_r4::BackendKey;
use phr_adapters::self_info::simulator::patient_agent::{
    read_card_and_decide, read_card_choose_and_decide,
};
use phr_adapters::self_info::simulator::{PortalSimulator, RunningSimulator, SimulatorConfig};
use phr_adapters::self_info::Category;
use phr_gateway::audit::AccountRole;
use phr_gateway::config::{SourceConfig, SourceKind};
use phr_gateway::pull::queue::JobOutcome;
use phr_gateway::pull::worker::RunResult;
use reqwest::StatusCode;
use serde_json::Value;

use crate::both_engines;
use crate::helpers::{
    count, leaves_containing, make_due, provenance_sources_of, spawn_app_with, Engine, TestApp,
    TestEnv,
};

both_engines!(
    portal_checkups_medicines_and_uploads,
    a_parent_links_the_portal_for_their_child,
);

async fn of_type(app: &TestApp, resource_type: &str) -> i64 {
    count(
        app,
        &format!(
            "SELECT COUNT(*) FROM resources WHERE patient_id = 'p-hanako' AND resource_type = '{resource_type}'"
        ),
    )
    .await
}

fn records_of(portal: &RunningSimulator, subject: &str, category: Category) -> Vec<String> {
    portal
        .handle
        .records(subject)
        .into_iter()
        .filter(|(c, ..)| *c == category)
        .map(|(_, id, ..)| id)
        .collect()
}

/// The portal simulator, and a gateway (no background workers) that knows it as source
/// `portal` and holds the client key the portal trusts.
async fn portal_app(engine: Engine, page_size: u32) -> (RunningSimulator, TestApp) {
    portal_app_with(engine, page_size, false).await
}

/// As [`portal_app`]; with `school_checkups` the portal offers 学校健診 and the gateway's
/// source configuration asks for it (it is off unless configured).
async fn portal_app_with(
    engine: Engine,
    page_size: u32,
    school_checkups: bool,
) -> (RunningSimulator, TestApp) {
    let key = BackendKey::generate_es384();
    let mut portal_config = SimulatorConfig::new("phr-gateway", key.public_jwk());
    portal_config.offer_school_checkups = school_checkups;
    let portal = PortalSimulator::start(portal_config).await.expect("portal");
    let portal_categories = school_checkups.then(|| {
        Category::ALL
            .iter()
            .map(|category| category.scope().to_string())
            .collect::<Vec<_>>()
    });
    let base_url = portal.base_url.clone();
    let pem = key.to_pem().expect("pem");
    let app = spawn_app_with(TestEnv::new(engine).await, move |c| {
        c.pull.workers = 0;
        c.sources = vec![SourceConfig {
            id: "portal".into(),
            display_name: "マイナポータル".into(),
            kind: SourceKind::SelfInfo,
            base_url,
            client_id: "phr-gateway".into(),
            page_size: Some(page_size),
            max_concurrent_requests: None,
            auth: Default::default(),
            portal_categories,
        }];
        phr_gateway::crypto::key_file::write_private(&c.source_client_key_path(), pem.as_bytes())
            .expect("key file");
    })
    .await;
    (portal, app)
}

async fn upload(
    app: &TestApp,
    token: &str,
    content_type: &str,
    body: Vec<u8>,
) -> reqwest::Response {
    app.client
        .post(app.url("/patient/checkups"))
        .bearer_auth(token)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .expect("upload")
}

async fn portal_checkups_medicines_and_uploads(engine: Engine) {
    let (portal, app) = portal_app(engine, 5).await;
    let token = app
        .sign_in(AccountRole::Patient, "hanako", Some("p-hanako"))
        .await;

    // Uploading before anything is known: a non-CDA content type and a broken document
    // are refused with a reason, nothing is stored, and the audit log says so.
    let wrong_type = upload(&app, &token, "application/pdf", b"%PDF".to_vec()).await;
    assert_eq!(wrong_type.status(), StatusCode::BAD_REQUEST);
    let broken = upload(
        &app,
        &token,
        "application/hl7-v3+xml",
        b"<ClinicalDocument xmlns=\"urn:hl7-org:v3\"><id/></ClinicalDocument>".to_vec(),
    )
    .await;
    assert_eq!(broken.status(), StatusCode::BAD_REQUEST);
    let problem: Value = broken.json().await.expect("problem");
    assert!(problem["detail"].as_str().is_some_and(|d| !d.is_empty()));
    let not_utf8 = upload(
        &app,
        &token,
        "application/xml",
        vec![0xff, 0xfe, 0x3c, 0x00],
    )
    .await;
    assert_eq!(not_utf8.status(), StatusCode::BAD_REQUEST);
    assert_eq!(of_type(&app, "Bundle").await, 0);
    assert!(leaves_containing(&app, "upload refused").await >= 3);

    // The patient instructs a pull from the portal and reads their card there.
    let given: Value = app
        .client
        .post(app.url("/patient/pull-instructions"))
        .bearer_auth(&token)
        .json(&serde_json::json!({
            "source_id": "portal",
            "categories": ["medications", "immunizations", "documents", "medical-costs"]
        }))
        .send()
        .await
        .expect("give")
        .json()
        .await
        .expect("json");
    let authorize_url = given["authorize_url"].as_str().expect("authorize_url");
    let person = portal.handle.person(1).expect("person 1");
    let visit = read_card_and_decide(authorize_url, &person.card_number, &person.pin, true)
        .await
        .expect("consent at the portal");
    let linked = app
        .client
        .get(&visit.location)
        .send()
        .await
        .expect("callback");
    assert_eq!(linked.status(), StatusCode::OK);
    let linked: Value = linked.json().await.expect("json");
    assert_eq!(linked["instruction"]["status"], "active");

    let worker = app.gateway().state.pull_worker();
    let mut results = Vec::new();
    while let Some((_, result)) = worker.run_once().await.expect("worker") {
        results.push(result);
    }
    assert_eq!(results, vec![RunResult::Finished(JobOutcome::Done)]);

    let subject = &person.subject;
    let checkups = records_of(&portal, subject, Category::SpecificCheckup);
    let immunizations = records_of(&portal, subject, Category::Immunization);
    let costs = records_of(&portal, subject, Category::MedicalCost);
    assert!(!checkups.is_empty() && !immunizations.is_empty() && !costs.is_empty());
    assert_eq!(
        of_type(&app, "Immunization").await,
        immunizations.len() as i64
    );
    assert_eq!(
        of_type(&app, "ExplanationOfBenefit").await,
        costs.len() as i64
    );
    assert!(of_type(&app, "MedicationDispense").await > 0);
    // Each 特定健診 arrives as its original (DocumentReference) and as its report Bundle.
    let documents = of_type(&app, "DocumentReference").await;
    assert_eq!(documents, checkups.len() as i64);
    let bundles = of_type(&app, "Bundle").await;
    let reasons: Vec<String> = sqlx::query_scalar("SELECT reason FROM pull_item_errors")
        .fetch_all(app.gateway().state.db.read_pool())
        .await
        .expect("item errors");
    assert!(
        bundles >= 1 && bundles <= documents,
        "{bundles} of {documents}: {reasons:?}"
    );
    assert_eq!(
        of_type(&app, "Observation").await,
        0,
        "infant checkups were not instructed"
    );

    // The same checkup uploaded by the patient is recognised: stored once, not twice.
    let withdrawn: Vec<String> = portal
        .handle
        .records(subject)
        .into_iter()
        .filter(|(c, _, _, entered_in_error)| *c == Category::SpecificCheckup && !entered_in_error)
        .map(|(_, id, ..)| id)
        .collect();
    let id = withdrawn.first().expect("a live checkup");
    let cda = portal
        .handle
        .checkup_document(subject, id)
        .expect("document");
    let again = upload(
        &app,
        &token,
        "application/hl7-v3+xml",
        cda.clone().into_bytes(),
    )
    .await;
    assert_eq!(again.status(), StatusCode::CREATED);
    let again: Value = again.json().await.expect("json");
    assert_eq!(again["checkups"][0]["outcome"], "unchanged", "{again}");
    assert_eq!(of_type(&app, "Bundle").await, bundles);
    // Both arrivals are in its Provenance records.
    let bundle_id = again["checkups"][0]["id"].as_str().expect("id").to_string();
    let provenance_sources = provenance_sources_of(&app, &token, &bundle_id).await;
    assert!(
        provenance_sources.contains(&"portal".to_string()),
        "{provenance_sources:?}"
    );
    assert!(
        provenance_sources.contains(&"upload".to_string()),
        "{provenance_sources:?}"
    );

    // An MHLW exchange ZIP with that checkup and a new one adds only the new one.
    let compact_date = effective_date_of(&cda);
    let earlier = cda.replace(&compact_date, "20230315");
    let index = exchange_index(2);
    let archive = zip_of(&[
        (&format!("{ZIP_ROOT}/ix08_V08.xml"), index.as_bytes()),
        (
            &format!("{ZIP_ROOT}/DATA/h1311234567_00_1.xml"),
            cda.as_bytes(),
        ),
        (
            &format!("{ZIP_ROOT}/DATA/h1311234567_00_2.xml"),
            earlier.as_bytes(),
        ),
    ]);
    let zipped = upload(&app, &token, "application/zip", archive).await;
    assert_eq!(zipped.status(), StatusCode::CREATED);
    let zipped: Value = zipped.json().await.expect("json");
    let outcomes: Vec<&str> = zipped["checkups"]
        .as_array()
        .expect("checkups")
        .iter()
        .filter_map(|c| c["outcome"].as_str())
        .collect();
    assert_eq!(outcomes, vec!["unchanged", "created"], "{zipped}");
    assert_eq!(of_type(&app, "Bundle").await, bundles + 1);

    // An archive with an entry escaping its folder, or whose index miscounts, stores nothing.
    for entries in [
        vec![
            (
                format!("{ZIP_ROOT}/ix08_V08.xml"),
                exchange_index(1).into_bytes(),
            ),
            (
                "../h1311234567_00_9.xml".to_string(),
                earlier.clone().into_bytes(),
            ),
        ],
        vec![
            (
                format!("{ZIP_ROOT}/ix08_V08.xml"),
                exchange_index(3).into_bytes(),
            ),
            (
                format!("{ZIP_ROOT}/DATA/h1311234567_00_1.xml"),
                earlier.replace("20230315", "20220315").into_bytes(),
            ),
        ],
    ] {
        let entries: Vec<(&str, &[u8])> = entries
            .iter()
            .map(|(name, bytes)| (name.as_str(), bytes.as_slice()))
            .collect();
        let refused = upload(&app, &token, "application/zip", zip_of(&entries)).await;
        assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            of_type(&app, "Bundle").await,
            bundles + 1,
            "nothing half-stored"
        );
    }

    // A checkup of someone else (another birth date) is refused and nothing is stored.
    let birth = birth_date_of(&cda);
    assert_eq!(birth.len(), 8, "the document has a birth date");
    let someone_else = cda.replace(
        &format!("birthTime value=\"{birth}"),
        "birthTime value=\"19010101",
    );
    let refused = upload(
        &app,
        &token,
        "application/hl7-v3+xml",
        someone_else.into_bytes(),
    )
    .await;
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    let problem: Value = refused.json().await.expect("problem");
    assert!(
        problem["detail"]
            .as_str()
            .is_some_and(|d| d.contains("another person")),
        "{problem}"
    );
    assert_eq!(of_type(&app, "Bundle").await, bundles + 1);

    // A result with an unknown item code is left out with its code and reason; the rest of
    // the checkup is stored.
    let unknown_item = cda
        .replace(&compact_date, "20220105")
        .replace("9N006000000000001", "9Z999000000000001");
    let partial = upload(
        &app,
        &token,
        "application/hl7-v3+xml",
        unknown_item.into_bytes(),
    )
    .await;
    assert_eq!(partial.status(), StatusCode::CREATED);
    let partial: Value = partial.json().await.expect("json");
    let item_errors = partial["checkups"][0]["item_errors"].to_string();
    assert!(item_errors.contains("9Z999000000000001"), "{partial}");
    assert_eq!(of_type(&app, "Bundle").await, bundles + 2);

    // A file over the body limit is refused before it is read; nothing is stored. (The
    // server may answer 413 and close while the client is still sending: both are refusals.)
    let huge = app
        .client
        .post(app.url("/patient/checkups"))
        .bearer_auth(&token)
        .header("content-type", "application/xml")
        .body(vec![b' '; 5 * 1024 * 1024])
        .send()
        .await;
    match huge {
        Ok(response) => assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE),
        Err(error) => assert!(error.is_request(), "{error}"),
    }
    assert_eq!(of_type(&app, "Bundle").await, bundles + 2);

    // When the 90-day linkage ends, the next pull stops and says so; nothing stored is lost.
    let before = count(
        &app,
        "SELECT COUNT(*) FROM resources WHERE patient_id = 'p-hanako'",
    )
    .await;
    portal.handle.expire_linkages();
    make_due(&app).await;
    while worker.run_once().await.expect("worker").is_some() {}
    let instruction_id = linked["instruction"]["id"].as_str().expect("id");
    let view: Value = app
        .client
        .get(app.url(&format!("/patient/pull-instructions/{instruction_id}")))
        .bearer_auth(&token)
        .send()
        .await
        .expect("detail")
        .json()
        .await
        .expect("json");
    assert_eq!(view["instruction"]["status"], "failed", "{view}");
    assert!(
        view["history"]
            .as_array()
            .is_some_and(|events| events.iter().any(|e| e["detail"]
                .as_str()
                .is_some_and(|d| d.contains("連携期間が終了しました")))),
        "{view}"
    );
    assert_eq!(
        count(
            &app,
            "SELECT COUNT(*) FROM resources WHERE patient_id = 'p-hanako'"
        )
        .await,
        before
    );

    // Withdrawing with deletion removes the checkups only the portal delivered; the one
    // the patient also uploaded and those only uploaded stay.
    let withdrawn = app
        .client
        .post(app.url(&format!(
            "/patient/pull-instructions/{instruction_id}/withdraw"
        )))
        .bearer_auth(&token)
        .json(&serde_json::json!({"delete_received": true}))
        .send()
        .await
        .expect("withdraw");
    assert_eq!(withdrawn.status(), StatusCode::OK);
    assert_eq!(of_type(&app, "Bundle").await, 3);
    assert_eq!(of_type(&app, "MedicationDispense").await, 0);
    let shared = count(
        &app,
        &format!("SELECT COUNT(*) FROM resources WHERE id = '{bundle_id}'"),
    )
    .await;
    assert_eq!(shared, 1, "still delivered by the upload");
    portal.shutdown().await;
}

/// The `birthTime value="YYYYMMDD"` of a CDA, as text.
fn birth_date_of(cda: &str) -> String {
    cda.split("birthTime value=\"")
        .nth(1)
        .and_then(|rest| rest.get(..8))
        .unwrap_or_default()
        .to_string()
}

/// The document's `effectiveTime value="YYYYMMDD"` (the checkup date in the portal's CDAs).
fn effective_date_of(cda: &str) -> String {
    cda.split("<effectiveTime value=\"")
        .nth(1)
        .and_then(|rest| rest.get(..8))
        .unwrap_or_default()
        .to_string()
}

const ZIP_ROOT: &str = "1311234567_00000000_202404050_1";

/// An ix08 index as the MHLW exchange format writes it.
fn exchange_index(count: usize) -> String {
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<index xmlns="https://www.mhlw.go.jp/stf/seisakunitsuite/bunya/0000161103.html">
 <interactionType code="1"/>
 <creationTime value="20240405"/>
 <sender><id root="1.2.392.200119.6.102" extension="1311234567"/></sender>
 <receiver><id root="1.2.392.200119.6.101" extension="06123456"/></receiver>
 <serviceEventType code="1"/>
 <totalRecordCount value="{count}"/>
</index>"#
    )
}

fn zip_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
    use std::io::Write;
    let mut writer = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    for (name, bytes) in entries {
        writer.start_file(*name, options).expect("start entry");
        writer.write_all(bytes).expect("write entry");
    }
    writer.finish().expect("finish").into_inner()
}

/// A parent, registered to act for their child, instructs a pull from the portal for the
/// child: the gateway asks the portal for proxy access, the parent reads their own card and
/// chooses the child there, and the child's records (infant and, configured here, school
/// checkups too) are stored as the child's.
async fn a_parent_links_the_portal_for_their_child(engine: Engine) {
    let (portal, app) = portal_app_with(engine, 20, true).await;
    let operator = app.sign_in(AccountRole::Operator, "op", None).await;
    let parent = app
        .sign_in(AccountRole::Patient, "hanako", Some("p-hanako"))
        .await;
    let registered = app
        .client
        .post(app.url("/operator/representations"))
        .bearer_auth(&operator)
        .json(&serde_json::json!({
            "representative_patient_id": "p-hanako",
            "represented_patient_id": "p-child",
            "kind": "registered-proxy"
        }))
        .send()
        .await
        .expect("register");
    assert_eq!(registered.status(), StatusCode::CREATED);

    let give = |categories: serde_json::Value| {
        app.client
            .post(app.url("/patient/pull-instructions"))
            .bearer_auth(&parent)
            .header("acting-for", "p-child")
            .json(&serde_json::json!({"source_id": "portal", "categories": categories}))
            .send()
    };
    let given: Value = give(serde_json::json!(["immunizations", "observations"]))
        .await
        .expect("give")
        .json()
        .await
        .expect("json");
    let authorize_url = given["authorize_url"].as_str().expect("authorize_url");
    assert!(
        authorize_url.contains("represented=choose"),
        "{authorize_url}"
    );
    // Person 1 is the registered proxy of person 2, a child.
    let proxy = portal.handle.person(1).expect("person 1");
    let child = portal.handle.person(2).expect("person 2");
    // Choosing someone they do not act for is refused at the portal.
    let stranger =
        read_card_choose_and_decide(authorize_url, &proxy.card_number, &proxy.pin, 3, true).await;
    assert!(stranger.is_err(), "{stranger:?}");
    let given: Value = give(serde_json::json!(["immunizations", "observations"]))
        .await
        .expect("give")
        .json()
        .await
        .expect("json");
    let authorize_url = given["authorize_url"].as_str().expect("authorize_url");
    let visit = read_card_choose_and_decide(authorize_url, &proxy.card_number, &proxy.pin, 2, true)
        .await
        .expect("the proxy chooses the child");
    assert!(visit.consent_page.contains(&child.display_name));
    let linked = app
        .client
        .get(&visit.location)
        .send()
        .await
        .expect("callback");
    assert_eq!(linked.status(), StatusCode::OK);
    let worker = app.gateway().state.pull_worker();
    while let Some((_, result)) = worker.run_once().await.expect("worker") {
        assert_eq!(result, RunResult::Finished(JobOutcome::Done));
    }

    // The child's records, stored as the child's; nothing under the parent.
    let count_of = |patient: &'static str, resource_type: &'static str| {
        let app = &app;
        async move {
            count(
                app,
                &format!(
                    "SELECT COUNT(*) FROM resources WHERE patient_id = '{patient}' AND resource_type = '{resource_type}'"
                ),
            )
            .await
        }
    };
    let immunizations = records_of(&portal, &child.subject, Category::Immunization);
    assert!(!immunizations.is_empty());
    assert_eq!(
        count_of("p-child", "Immunization").await,
        immunizations.len() as i64
    );
    let infant = records_of(&portal, &child.subject, Category::InfantCheckup);
    let school = records_of(&portal, &child.subject, Category::SchoolCheckup);
    assert!(!infant.is_empty() && !school.is_empty());
    let observations = count_of("p-child", "Observation").await;
    assert!(
        observations >= (infant.len() + school.len()) as i64,
        "{observations} observations for {} infant and {} school checkups",
        infant.len(),
        school.len()
    );
    let school_observations = count(
        &app,
        "SELECT COUNT(*) FROM resources WHERE patient_id = 'p-child' \
         AND resource_type = 'Observation' AND source_resource_id LIKE 'sch-%'",
    )
    .await;
    assert!(school_observations > 0, "school checkups stored");
    assert_eq!(
        count(
            &app,
            "SELECT COUNT(*) FROM resources WHERE patient_id = 'p-hanako'"
        )
        .await,
        0
    );
    portal.shutdown().await;
}
