//! The patient portal in real headless Chromium: sign-in, nothing chosen in advance, and
//! the whole flow — instruct, sign in at the (simulated) hospital, watch data arrive,
//! withdraw in one click — and taking one's record out: the summary read, the ZIP downloaded.

use std::time::Duration;

use fantoccini::{Client, Locator};
use phr_adapters::fhir_r4::simulator::{HospitalSimulator, SimulatorConfig};
use phr_gateway::audit::AccountRole;

use crate::browser::Browser;
use crate::helpers::{hospital_source, spawn_app_with, Engine, TestApp, TestEnv};

pub(crate) async fn fill(c: &Client, css: &str, text: &str) {
    c.wait()
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .send_keys(text)
        .await
        .expect("type");
}

pub(crate) async fn click(c: &Client, css: &str) {
    c.wait()
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .click()
        .await
        .expect("click");
}

pub(crate) async fn text_of(c: &Client, css: &str) -> String {
    c.wait()
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .text()
        .await
        .expect("text")
}

/// Waits until the element's text contains `expected` (pages reload under us, so a found
/// element may go stale: look again).
pub(crate) async fn wait_text(c: &Client, css: &str, expected: &str) -> String {
    let mut last = String::new();
    for _ in 0..100 {
        if let Ok(element) = c.find(Locator::Css(css)).await {
            if let Ok(text) = element.text().await {
                if text.contains(expected) {
                    return text;
                }
                last = text;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{css} never showed {expected:?}; last text: {last:?}");
}

/// The password of the portal's patient in these tests.
const PASSWORD: &str = "correct horse battery staple";

/// The portal's patient in these tests: "hanako", for `patient_id`.
async fn patient_account(app: &TestApp, patient_id: &str) {
    app.gateway()
        .state
        .accounts
        .create(AccountRole::Patient, "hanako", PASSWORD, Some(patient_id))
        .await
        .expect("account");
}

async fn sign_in(c: &Client, app: &TestApp, username: &str, password: &str) {
    c.goto(&app.url("/portal")).await.expect("open portal");
    fill(c, "input[name=username]", username).await;
    fill(c, "input[name=password]", password).await;
    click(c, "button[type=submit]").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_and_nothing_is_chosen_in_advance() {
    let app = spawn_app_with(TestEnv::new(Engine::Sqlite).await, |_| {}).await;
    patient_account(&app, "p-portal").await;
    let browser = Browser::start().await;
    let c = &browser.client;
    sign_in(c, &app, "hanako", "wrong password!!").await;
    let alert = text_of(c, "[role=alert]").await;
    assert!(alert.contains("パスワードが違います"), "{alert}");

    fill(c, "input[name=username]", "hanako").await;
    fill(c, "input[name=password]", PASSWORD).await;
    click(c, "button[type=submit]").await;
    // The signed-in page: wait for its instruction form.
    c.wait()
        .for_element(Locator::Css("select[name=source_id]"))
        .await
        .expect("portal home");
    let heading = text_of(c, "h1").await;
    assert!(heading.contains("データ取得の指示"), "{heading}");
    // Nothing pre-chosen: every category unticked, no source selected.
    let boxes = c
        .find_all(Locator::Css("input[name=category]"))
        .await
        .expect("boxes");
    assert_eq!(boxes.len(), phr_consent::DataCategory::ALL.len());
    for checkbox in boxes {
        assert!(
            !checkbox.is_selected().await.expect("state"),
            "a category is pre-ticked"
        );
    }
    let selected = c
        .execute(
            "return document.querySelector('select[name=source_id]').value",
            vec![],
        )
        .await
        .expect("select");
    assert_eq!(selected, serde_json::json!(""));
    browser.close().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instruct_link_watch_and_withdraw_in_the_browser() {
    let hospital = HospitalSimulator::start(SimulatorConfig {
        patients: 2,
        resources_per_patient: 40,
        ..SimulatorConfig::default()
    })
    .await
    .expect("simulator");
    let base_url = hospital.base_url.clone();
    let app = spawn_app_with(TestEnv::new(Engine::Sqlite).await, move |c| {
        c.pull.workers = 1;
        c.pull.poll_millis = 100;
        c.sources = vec![hospital_source(base_url, 10)];
    })
    .await;
    patient_account(&app, "p-portal").await;
    let browser = Browser::start().await;
    let c = &browser.client;
    sign_in(c, &app, "hanako", PASSWORD).await;

    // Instruct: choose the source and two categories.
    c.wait()
        .for_element(Locator::Css("select[name=source_id]"))
        .await
        .expect("form");
    click(c, "select[name=source_id] option[value=hospital]").await;
    click(c, "input[name=category][value=observations]").await;
    click(c, "input[name=category][value=conditions]").await;
    click(
        c,
        "form[action='/portal/pull-instructions'] button[type=submit]",
    )
    .await;

    // Continue to the hospital, sign in there and allow.
    click(c, "a#continue").await;
    fill(c, "input[name=username]", "patient-0001").await;
    fill(c, "input[name=password]", "phr-sim-0001").await;
    click(c, "button[type=submit]").await;
    click(c, "button[name=decision][value=approve]").await;

    // Back in the portal: the instruction is active and data arrives.
    wait_text(c, "tr[data-instruction] td.status", "取得中").await;
    let mut progress = String::new();
    for _ in 0..50 {
        c.refresh().await.expect("refresh");
        progress = wait_text(c, "tr[data-instruction] td.progress", "received").await;
        if progress.contains("done") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(progress.contains("done"), "{progress}");
    let stored: i64 = sqlx::query_scalar::<_, i64>(
        "SELECT COUNT(*) FROM resources WHERE patient_id = 'p-portal' AND category IN ('observations', 'conditions')",
    )
    .fetch_one(app.gateway().state.db.read_pool())
    .await
    .expect("count");
    assert!(stored > 0);
    assert!(
        progress.contains(&format!("{stored} received")),
        "{progress} vs {stored}"
    );

    // Withdraw in one click; nothing pre-ticked in the deletion choice.
    let delete_box = c
        .find(Locator::Css(
            "tr[data-instruction] input[name=delete_received]",
        ))
        .await
        .expect("delete choice");
    assert!(!delete_box.is_selected().await.expect("state"));
    click(c, "tr[data-instruction] button.withdraw").await;
    wait_text(c, "tr[data-instruction] td.status", "取り消し済み").await;
    assert!(c
        .find(Locator::Css("tr[data-instruction] button.withdraw"))
        .await
        .is_err());
    browser.close().await;
    app.stop().await;
    hospital.shutdown().await;
}

/// A 特定健診 file chosen in the portal is added once; choosing it again adds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkup_file_is_added_from_the_portal_once() {
    use phr_adapters::self_info::simulator::{SimulatorConfig as PortalConfig, SimulatorHandle};
    use phr_adapters::self_info::Category;

    // A checkup document as the portal would hand it out (the simulator's data, not served).
    let jwk = phr_adapters::fhir_r4::BackendKey::generate_es384().public_jwk();
    let portal = SimulatorHandle::new(PortalConfig::new("phr-gateway", jwk), "http://127.0.0.1:1");
    let person = portal.person(1).expect("person");
    let cda = portal
        .records(&person.subject)
        .into_iter()
        .filter(|(category, ..)| *category == Category::SpecificCheckup)
        .find_map(|(_, id, ..)| portal.checkup_document(&person.subject, &id))
        .expect("a checkup document");
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("h1311234567_00_1.xml");
    std::fs::write(&file, cda).expect("write file");

    let app = spawn_app_with(TestEnv::new(Engine::Sqlite).await, |_| {}).await;
    patient_account(&app, "p-portal").await;
    let browser = Browser::start().await;
    let c = &browser.client;
    sign_in(c, &app, "hanako", PASSWORD).await;
    // Signed in (the session cookie is set) before the next navigation.
    c.wait()
        .for_element(Locator::Css("#nav-consents"))
        .await
        .expect("signed in");
    for expected in ["追加", "登録済み"] {
        c.goto(&app.url("/portal")).await.expect("portal");
        fill(c, "input[type=file]", &file.display().to_string()).await;
        click(c, "form[action='/portal/checkups'] button[type=submit]").await;
        wait_text(c, "tr.checkup", expected).await;
    }
    let bundles: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM resources WHERE patient_id = 'p-portal' AND resource_type = 'Bundle'",
    )
    .fetch_one(app.gateway().state.db.read_pool())
    .await
    .expect("count");
    assert_eq!(bundles, 1, "one checkup, stored once");
    browser.close().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkup_institution_is_allowed_and_withdrawn_in_the_portal() {
    use phr_gateway::audit::Agent;
    use phr_gateway::oauth::clients::{self, ComplianceDeclaration, NewClient, Recipient};

    let app = spawn_app_with(TestEnv::new(Engine::Sqlite).await, |_| {}).await;
    patient_account(&app, "p-portal").await;
    let key = phr_adapters::fhir_r4::BackendKey::generate_es384();
    let (institution, _) = clients::register(
        &app.gateway().state.db,
        &Agent::system(),
        NewClient {
            display_name: "みなと健診".into(),
            redirect_uris: Vec::new(),
            jwks: Some(serde_json::json!({"keys": [key.public_jwk()]})),
            recipient: Recipient {
                name: "みなと健診センター".into(),
                identifier: "4010001000001".into(),
            },
            compliance: ComplianceDeclaration {
                declared: true,
                statement: "PHRサービス事業者に関する基本的指針を遵守します".into(),
                declared_on: "2026-04-01".into(),
            },
        },
    )
    .await
    .expect("institution");
    let browser = Browser::start().await;
    let c = &browser.client;
    sign_in(c, &app, "hanako", PASSWORD).await;
    c.wait()
        .for_element(Locator::Css("#nav-consents"))
        .await
        .expect("signed in");
    c.goto(&app.url("/portal")).await.expect("portal");
    // No institution is chosen in advance.
    let selected = c
        .execute(
            "return document.querySelector('select[name=client_id]').value",
            vec![],
        )
        .await
        .expect("select");
    assert_eq!(selected, serde_json::json!(""));
    c.wait()
        .for_element(Locator::Css("select[name=client_id]"))
        .await
        .expect("institution list")
        .select_by_value(&institution.id)
        .await
        .expect("choose");
    click(
        c,
        "form[action='/portal/upload-permissions'] button[type=submit]",
    )
    .await;
    wait_text(c, "tr[data-upload-permission] td.status", "有効").await;
    // Withdrawing is one click on the same page.
    click(c, "tr[data-upload-permission] button.withdraw").await;
    wait_text(c, "tr[data-upload-permission] td.status", "取り消し済み").await;
    let statuses: Vec<String> =
        sqlx::query_scalar("SELECT status FROM upload_permissions WHERE patient_id = 'p-portal'")
            .fetch_all(app.gateway().state.db.read_pool())
            .await
            .expect("permissions");
    assert_eq!(statuses, vec!["withdrawn".to_string()]);
    browser.close().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_my_data_from_the_portal_asks_for_the_password_again() {
    use phr_gateway::store::resources::{NewResource, SourceIdentity};

    let app = spawn_app_with(TestEnv::new(Engine::Sqlite).await, |_| {}).await;
    patient_account(&app, "p-portal").await;
    app.gateway()
        .state
        .resources
        .put(
            &phr_gateway::audit::Agent::system(),
            NewResource {
                patient_id: "p-portal".into(),
                category: "observations".into(),
                source: SourceIdentity {
                    source: "hospital".into(),
                    resource_type: "Observation".into(),
                    source_resource_id: "o-1".into(),
                    version_id: Some("1".into()),
                },
                body: serde_json::json!({"resourceType": "Observation", "id": "o-1", "status": "final", "code": {"text": "BP"}})
                    .to_string()
                    .into_bytes(),
            },
        )
        .await
        .expect("resource");
    let browser = Browser::start().await;
    let c = &browser.client;
    sign_in(c, &app, "hanako", PASSWORD).await;
    click(c, "#erasure-link").await;
    // A wrong password deletes nothing and says so.
    fill(c, "input[name=password]", "not my password").await;
    click(c, "#erase").await;
    wait_text(c, "[role=alert]", "何も行っていません").await;
    assert_eq!(
        app.gateway()
            .state
            .resources
            .count("p-portal")
            .await
            .expect("count"),
        1
    );
    c.goto(&app.url("/portal/erasure"))
        .await
        .expect("erasure page");
    fill(c, "input[name=password]", PASSWORD).await;
    click(c, "#erase").await;
    wait_text(c, "#erased", "1 件").await;
    assert_eq!(
        app.gateway()
            .state
            .resources
            .count("p-portal")
            .await
            .expect("count"),
        0
    );
    browser.close().await;
    app.stop().await;
}

/// The patient's own export in the browser: the readable Japanese summary (its tables and a
/// chart drawn), then the export form (nothing chosen in advance) filled in and sent, and the
/// whole record downloaded as a ZIP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_patient_reads_the_summary_and_takes_everything_out_in_the_browser() {
    let env = crate::oauth::env(Engine::Sqlite).await;
    crate::fhir_api::seed(&env).await;
    let app = &env.app;
    let state = &app.gateway().state;
    // Two more systolic readings, so blood pressure over time has a chart.
    let mut readings = Vec::new();
    for (id, date, value) in [("o-bp-1", "2023-05-01", 131), ("o-bp-2", "2025-05-01", 124)] {
        let mut reading = crate::fhir_api::observation(id, "8480-6", "vital-signs", date);
        let mut body: serde_json::Value = serde_json::from_slice(&reading.body).expect("json");
        body["valueQuantity"]["value"] = serde_json::json!(value);
        reading.body = body.to_string().into_bytes();
        readings.push(reading);
    }
    state
        .resources
        .put_batch(&phr_gateway::audit::Agent::system(), readings)
        .await
        .expect("readings");
    patient_account(app, "patient-1").await;
    let browser = Browser::start().await;
    let c = &browser.client;
    sign_in(c, app, "hanako", PASSWORD).await;
    c.wait()
        .for_element(Locator::Css("select[name=source_id]"))
        .await
        .expect("portal home");

    c.goto(&app.url("/portal/export"))
        .await
        .expect("export page");
    let formats = c
        .find_all(Locator::Css("input[name=format]"))
        .await
        .expect("formats");
    assert_eq!(formats.len(), 2);
    for format in formats {
        assert!(
            !format.is_selected().await.expect("state"),
            "a format is chosen in advance"
        );
    }

    click(c, "a#summary-link").await;
    wait_text(c, "h1", "健康記録のまとめ").await;
    let page = text_of(c, "main").await;
    for expected in ["収縮期血圧", "131", "118", "124", "高血圧症", "病名"] {
        assert!(page.contains(expected), "{expected:?} missing from: {page}");
    }
    // The chart is drawn: three points, laid out at a visible size.
    let drawn = c
        .execute(
            "const chart = document.querySelector('section.measure svg.chart');
             const box = chart.getBoundingClientRect();
             return [chart.querySelectorAll('circle').length, box.width, box.height];",
            vec![],
        )
        .await
        .expect("chart");
    assert_eq!(drawn[0], 3, "{drawn}");
    assert!(
        drawn[1].as_f64() > Some(100.0) && drawn[2].as_f64() > Some(50.0),
        "{drawn}"
    );

    // The form as the patient fills it in; the browser downloads the ZIP.
    c.goto(&app.url("/portal/export"))
        .await
        .expect("export page");
    click(c, "input[name=format][value=ndjson-zip]").await;
    fill(c, "input[name=password]", PASSWORD).await;
    click(c, "button#export").await;
    let downloaded = browser.downloaded("zip").await;
    let bytes = std::fs::read(&downloaded).expect("read the download");
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes)).expect("a ZIP");
    let names: Vec<String> = archive.file_names().map(str::to_string).collect();
    assert!(names.iter().any(|n| n == "summary.html"), "{names:?}");
    let mut observations = String::new();
    std::io::Read::read_to_string(
        &mut archive
            .by_name("Observation.ndjson")
            .unwrap_or_else(|e| panic!("{e}: {names:?}")),
        &mut observations,
    )
    .expect("read");
    // The seeded eight and the two readings, each once.
    assert_eq!(observations.lines().count(), 10, "{observations}");
    browser.close().await;
    env.stop().await;
}
