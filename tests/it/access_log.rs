//! The patient's access log, end to end: accesses recorded the way the FHIR API records
//! them (a recipient's app with a token under a consent, one resource reference per
//! resource disclosed), an operator's read, a consent's refusal, the patient's own read and
//! another patient's; the API lists exactly others' accesses of this patient, newest first,
//! paged, with categories and consents; and the portal page shows them in Chromium.

use fantoccini::Locator;
use phr_consent::{DataCategory, Performer, PersonRef, Purpose, Recipient, Requested};
use phr_gateway::audit::{AccountRole, Actor, Agent, AuditEvent, EventKind};
use phr_gateway::consents::ConsentOutcome;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::both_engines;
use crate::browser::Browser;
use crate::consent_rules::{check_portal_page, links_reaching};
use crate::helpers::{
    count, get_json, grant_consent, leaves_containing, spawn_app, Engine, TestApp,
};

both_engines!(
    the_patient_sees_who_accessed_their_data,
    a_cursor_from_elsewhere_is_refused,
);

const PASSWORD: &str = "correct horse battery staple";
const APP_NAME: &str = "けんこう手帳アプリ";
const RECIPIENT: &str = "株式会社ヘルスケア";

/// Registers a recipient's app as an operator does; returns its client id.
async fn register_client(app: &TestApp, operator: &str) -> String {
    let response = app
        .client
        .post(app.url("/operator/clients"))
        .bearer_auth(operator)
        .json(&json!({
            "display_name": APP_NAME,
            "redirect_uris": ["https://app.example.jp/callback"],
            "token_endpoint_auth_method": "client_secret_basic",
            "recipient": {"name": RECIPIENT, "identifier": "1234567890123"},
            "compliance": {
                "declared": true,
                "statement": "PHRサービス事業者に関する基本的指針を遵守します",
                "declared_on": "2026-04-01"
            }
        }))
        .send()
        .await
        .expect("register client");
    assert_eq!(response.status(), StatusCode::CREATED);
    let body: Value = response.json().await.expect("json");
    body["client_id"].as_str().expect("client_id").to_string()
}

async fn account_id(app: &TestApp, username: &str) -> String {
    sqlx::query_scalar("SELECT id FROM accounts WHERE username = $1")
        .bind(username)
        .fetch_one(app.gateway().state.db.read_pool())
        .await
        .expect("account id")
}

fn client_agent(client_id: &str, jti: &str) -> Agent {
    Agent {
        actor: Actor::Client {
            id: client_id.into(),
        },
        address: Some("192.0.2.10".parse().expect("address")),
        token_jti: Some(jti.into()),
    }
}

fn account_agent(id: &str, role: AccountRole) -> Agent {
    Agent {
        actor: Actor::Account {
            id: id.into(),
            role,
        },
        address: None,
        token_jti: None,
    }
}

async fn record(app: &TestApp, event: AuditEvent) {
    app.gateway()
        .state
        .audit
        .record_now(&event)
        .await
        .expect("record");
}

/// What the scenario recorded, to compare the log with.
struct Recorded {
    client_id: String,
    consent_id: String,
    operator_account: String,
}

/// Hanako (`p-hanako`) consented to the app; the app read and searched under that consent,
/// an operator read her record, another app was refused, Hanako read her own data, and the
/// app read Taro's (`p-taro`) data under his consent.
async fn scenario(app: &TestApp) -> Recorded {
    let operator = app.sign_in(AccountRole::Operator, "operator", None).await;
    let client_id = register_client(app, &operator).await;
    app.gateway()
        .state
        .accounts
        .create(AccountRole::Patient, "hanako", PASSWORD, Some("p-hanako"))
        .await
        .expect("hanako");
    app.gateway()
        .state
        .accounts
        .create(AccountRole::Patient, "taro", PASSWORD, Some("p-taro"))
        .await
        .expect("taro");
    let hanako_account = account_id(app, "hanako").await;
    let operator_account = account_id(app, "operator").await;
    let (consent_id, _) = grant_consent(
        app,
        "p-hanako",
        Performer::patient(&PersonRef::new("p-hanako")),
        &client_id,
        &["PATRQT"],
        &[DataCategory::Observations, DataCategory::Medications],
        90,
    )
    .await;
    let (taro_consent, _) = grant_consent(
        app,
        "p-taro",
        Performer::patient(&PersonRef::new("p-taro")),
        &client_id,
        &["PATRQT"],
        &[DataCategory::Immunizations],
        90,
    )
    .await;

    // Oldest first.
    record(
        app,
        AuditEvent::new(EventKind::Read, client_agent(&client_id, "jti-1"))
            .patient("p-hanako")
            .consent(&consent_id)
            .resource("Observation/o1/_history/1"),
    )
    .await;
    record(
        app,
        AuditEvent::new(EventKind::Search, client_agent(&client_id, "jti-2"))
            .patient("p-hanako")
            .consent(&consent_id)
            .resource("Observation/o2/_history/1")
            .resource("MedicationRequest/m1/_history/3")
            .resource("DiagnosticReport/d1/_history/2")
            .resource("MedicationDispense/m2/_history/1"),
    )
    .await;
    record(
        app,
        AuditEvent::new(
            EventKind::Read,
            account_agent(&operator_account, AccountRole::Operator),
        )
        .patient("p-hanako")
        .resource("Patient/p-hanako/_history/1"),
    )
    .await;
    // A refusal, audited by the consent decision itself.
    let state = &app.gateway().state;
    let purpose = state
        .consents
        .config()
        .purpose("PATRQT")
        .expect("purpose")
        .clone();
    let outcome = state
        .consents
        .decide(
            &client_agent("stranger-app", "jti-3"),
            "p-hanako",
            &Recipient::client("stranger-app"),
            &Purpose::new(&purpose.system, &purpose.code),
            Requested::Category(DataCategory::Conditions),
        )
        .await
        .expect("decide");
    assert!(
        matches!(outcome, ConsentOutcome::Deny { .. }),
        "{outcome:?}"
    );
    // Hanako's own read, and the app reading Taro's data: neither is in her log.
    record(
        app,
        AuditEvent::new(
            EventKind::Read,
            account_agent(&hanako_account, AccountRole::Patient),
        )
        .patient("p-hanako")
        .resource("Observation/o1/_history/1"),
    )
    .await;
    record(
        app,
        AuditEvent::new(EventKind::Read, client_agent(&client_id, "jti-4"))
            .patient("p-taro")
            .consent(&taro_consent)
            .resource("Immunization/i1/_history/1"),
    )
    .await;
    Recorded {
        client_id,
        consent_id,
        operator_account,
    }
}

async fn sign_in_as(app: &TestApp, username: &str) -> String {
    let response = app
        .client
        .post(app.url("/auth/login"))
        .json(&json!({"username": username, "password": PASSWORD}))
        .send()
        .await
        .expect("login");
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.expect("json");
    body["token"].as_str().expect("token").to_string()
}

fn category_codes(entry: &Value) -> Vec<&str> {
    entry["categories"]
        .as_array()
        .expect("categories")
        .iter()
        .map(|c| c["code"].as_str().expect("code"))
        .collect()
}

async fn the_patient_sees_who_accessed_their_data(engine: Engine) {
    let app = spawn_app(engine).await;
    let recorded = scenario(&app).await;
    let hanako = sign_in_as(&app, "hanako").await;

    let page = get_json(&app, "/patient/access-log", &hanako).await;
    let entries = page["entries"].as_array().expect("entries");
    assert_eq!(entries.len(), 4, "{page:#}");
    assert!(page["next"].is_null(), "{page:#}");

    // Newest first: the refusal, the operator, the search, the read.
    let refused = &entries[0];
    assert_eq!(refused["outcome"], "denied");
    assert_eq!(refused["action"], "other");
    assert_eq!(refused["accessor"]["kind"], "client");
    assert_eq!(refused["accessor"]["id"], "stranger-app");
    assert_eq!(refused["accessor"]["display"], "stranger-app");
    assert!(refused["consent_id"].is_null());
    assert!(category_codes(refused).is_empty());

    let operator = &entries[1];
    assert_eq!(operator["outcome"], "success");
    assert_eq!(operator["action"], "read");
    assert_eq!(operator["accessor"]["kind"], "operator");
    assert_eq!(
        operator["accessor"]["id"],
        recorded.operator_account.as_str()
    );
    assert_eq!(category_codes(operator), ["demographics"]);
    assert!(operator["consent_id"].is_null());

    let search = &entries[2];
    assert_eq!(search["action"], "search");
    assert_eq!(search["outcome"], "success");
    assert_eq!(search["accessor"]["kind"], "client");
    assert_eq!(search["accessor"]["id"], recorded.client_id.as_str());
    assert_eq!(search["accessor"]["display"], APP_NAME);
    assert_eq!(search["accessor"]["organisation"], RECIPIENT);
    assert_eq!(category_codes(search), ["observations", "medications"]);
    assert_eq!(search["categories"][0]["label_ja"], "検査結果・健診結果");
    assert_eq!(
        search["categories"][0]["label_en"],
        "Test and checkup results"
    );
    assert_eq!(search["consent_id"], recorded.consent_id.as_str());

    let read = &entries[3];
    assert_eq!(read["action"], "read");
    assert_eq!(read["accessor"]["display"], APP_NAME);
    assert_eq!(category_codes(read), ["observations"]);
    assert_eq!(read["consent_id"], recorded.consent_id.as_str());
    assert!(read["at"].as_str().expect("at").ends_with('Z'));

    // No PHI, no token ids, nothing of Taro's.
    let text = page.to_string();
    for absent in ["p-taro", "Immunization", "jti-", "192.0.2.10"] {
        assert!(!text.contains(absent), "{absent} in {text}");
    }

    // Pages of three, then one; and one by one, the same order.
    let first = get_json(&app, "/patient/access-log?limit=3", &hanako).await;
    assert_eq!(first["entries"].as_array().expect("entries").len(), 3);
    assert_eq!(first["entries"][0], entries[0]);
    let next = first["next"].as_str().expect("a next page");
    let second = get_json(
        &app,
        &format!("/patient/access-log?limit=3&before={next}"),
        &hanako,
    )
    .await;
    assert_eq!(
        second["entries"].as_array().expect("entries"),
        &entries[3..]
    );
    assert!(second["next"].is_null(), "{second:#}");
    let mut one_by_one = Vec::new();
    let mut path = "/patient/access-log?limit=1".to_string();
    loop {
        let page = get_json(&app, &path, &hanako).await;
        one_by_one.extend(page["entries"].as_array().expect("entries").iter().cloned());
        match page["next"].as_str() {
            Some(next) => path = format!("/patient/access-log?limit=1&before={next}"),
            None => break,
        }
        assert!(one_by_one.len() <= 4, "paging does not end");
    }
    assert_eq!(&one_by_one, entries);
    // Asking for more than the most gives the most there is.
    let all = get_json(&app, "/patient/access-log?limit=100000", &hanako).await;
    assert_eq!(all["entries"].as_array().expect("entries"), entries);

    // Taro sees only the app's read of his data, none of Hanako's.
    let taro = sign_in_as(&app, "taro").await;
    let his = get_json(&app, "/patient/access-log", &taro).await;
    let his_entries = his["entries"].as_array().expect("entries");
    assert_eq!(his_entries.len(), 1, "{his:#}");
    assert_eq!(category_codes(&his_entries[0]), ["immunizations"]);
    assert_eq!(his_entries[0]["accessor"]["display"], APP_NAME);
    assert_ne!(his_entries[0]["consent_id"], recorded.consent_id.as_str());

    // Reading the log is audited, as a read of the reader's record: Hanako's eight reads so
    // far and Taro's one. The patient column beside the leaf finds them.
    assert_eq!(
        leaves_containing(&app, "\"outcomeDesc\":\"access log\"").await,
        9
    );
    // Every leaf about Taro, and only those, carries his id in the column.
    let taro_leaves = count(
        &app,
        "SELECT COUNT(*) FROM audit_leaves WHERE patient_id = 'p-taro'",
    )
    .await;
    assert!(taro_leaves >= 2, "{taro_leaves}");
    assert_eq!(
        taro_leaves,
        leaves_containing(&app, "\"reference\":\"Patient/p-taro\"").await
    );
    let after = get_json(&app, "/patient/access-log", &hanako).await;
    assert_eq!(after["entries"], page["entries"], "own reads stay out");
    let leaves = sqlx::query_scalar::<_, Vec<u8>>(
        "SELECT body FROM audit_leaves WHERE patient_id = 'p-hanako' ORDER BY id DESC",
    )
    .fetch_all(app.gateway().state.db.read_pool())
    .await
    .expect("leaves");
    let newest: Value = serde_json::from_slice(&leaves[0]).expect("leaf");
    assert_eq!(newest["outcomeDesc"], "access log");
    assert_eq!(newest["subtype"][0]["code"], "read");
    assert_eq!(newest["entity"][0]["what"]["reference"], "Patient/p-hanako");

    // Not signed in: refused as problem+json.
    let response = app
        .client
        .get(app.url("/patient/access-log"))
        .send()
        .await
        .expect("anonymous");
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    app.stop().await;
}

async fn a_cursor_from_elsewhere_is_refused(engine: Engine) {
    let app = spawn_app(engine).await;
    let token = app
        .sign_in(AccountRole::Patient, "hanako", Some("p-hanako"))
        .await;
    for bad in ["yesterday", "1-x", "12"] {
        let response = app
            .client
            .get(app.url(&format!("/patient/access-log?before={bad}")))
            .bearer_auth(&token)
            .send()
            .await
            .expect("get");
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{bad}");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
    }
    let response = app
        .client
        .get(app.url("/patient/access-log?limit=many"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("get");
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let empty = get_json(&app, "/patient/access-log", &token).await;
    assert_eq!(empty, json!({"entries": [], "next": null}));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_portal_shows_who_accessed_in_chromium() {
    let app = spawn_app(Engine::Sqlite).await;
    let recorded = scenario(&app).await;
    let browser = Browser::start().await;
    let c = &browser.client;
    c.goto(&app.url("/portal")).await.expect("portal");
    for (css, text) in [
        ("input[name=username]", "hanako"),
        ("input[name=password]", PASSWORD),
    ] {
        c.wait()
            .for_element(Locator::Css(css))
            .await
            .expect(css)
            .send_keys(text)
            .await
            .expect("type");
    }
    c.find(Locator::Css("button[type=submit]"))
        .await
        .expect("sign in")
        .click()
        .await
        .expect("click");
    c.wait()
        .for_element(Locator::Css("#nav-access-log"))
        .await
        .expect("signed in")
        .click()
        .await
        .expect("to the access log");
    c.wait()
        .for_element(Locator::Css("table#access-log"))
        .await
        .expect("the access log");
    let rows = c
        .find_all(Locator::Css("table#access-log tbody tr"))
        .await
        .expect("rows");
    assert_eq!(rows.len(), 4);
    let mut texts = Vec::new();
    for row in &rows {
        texts.push(row.text().await.expect("text"));
    }
    let search = &texts[2];
    for expected in [
        APP_NAME,
        RECIPIENT,
        "検査結果・健診結果",
        "処方・調剤されたお薬",
        "検索して閲覧",
        recorded.consent_id.as_str(),
    ] {
        assert!(search.contains(expected), "{expected} not in {search}");
    }
    assert!(texts[0].contains("請求を断りました"), "{}", texts[0]);
    assert!(texts.iter().all(|t| !t.contains("p-taro")), "{texts:?}");
    let consent_link = c
        .find(Locator::Css(
            "table#access-log tbody tr:nth-child(3) td.consent a",
        ))
        .await
        .expect("consent link");
    assert_eq!(
        consent_link.attr("href").await.expect("href").as_deref(),
        Some("/portal/consents")
    );
    let violations = check_portal_page(c).await;
    assert!(violations.is_empty(), "access log: {violations:?}");
    assert!(links_reaching(c, "/portal/consents").await);
    browser.close().await;
    app.stop().await;
}
