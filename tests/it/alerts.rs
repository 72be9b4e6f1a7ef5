//! Alerts and audit analysis end to end on both engines: ten failed sign-ins within a
//! minute raise one alert (nine raise none), listed for operators and delivered once to an
//! operator's webhook as a Security Event Token signed with the gateway's key; a client
//! reading many patients raises one; operators search and export audit events by patient,
//! actor, action and time, every search audited, bad input refused. In Chromium: the alerts
//! page shows the alert and the event-rate chart and acknowledges it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode as AxumStatus;
use axum::routing::post;
use fantoccini::Locator;
use phr_gateway::audit::{AccountRole, Actor, Agent, AuditEvent, EventKind};
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::both_engines;
use crate::browser::Browser;
use crate::helpers::{
    get_json, jwks, leaves_containing, spawn_app, spawn_app_with, Engine, TestApp, TestEnv,
};

both_engines!(
    a_new_advisory_is_notified_once_and_end_of_life_is_warned,
    ten_failed_logins_in_a_minute_raise_one_signed_alert,
    a_client_reading_many_patients_raises_an_alert,
    audit_search_and_export_find_exactly_what_was_asked,
);

const ALERT_EVENT: &str = "urn:phr-gateway:event:alert";

/// An operator's alert endpoint: keeps every token that arrives; fails the first
/// `failures` requests.
#[derive(Clone, Default)]
struct Receiver {
    tokens: Arc<Mutex<Vec<String>>>,
    failures: Arc<Mutex<u32>>,
}

async fn receive(State(receiver): State<Receiver>, body: String) -> AxumStatus {
    receiver.tokens.lock().expect("lock").push(body);
    let mut failures = receiver.failures.lock().expect("lock");
    if *failures > 0 {
        *failures -= 1;
        AxumStatus::SERVICE_UNAVAILABLE
    } else {
        AxumStatus::ACCEPTED
    }
}

async fn start_receiver() -> (Receiver, String) {
    let receiver = Receiver::default();
    let app = axum::Router::new()
        .route("/alerts", post(receive))
        .with_state(receiver.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/alerts", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (receiver, url)
}

/// The alert events that arrived, each checked against the gateway's JWKS and addressed to
/// `audience` (an operator endpoint's URL, or an institution's client id).
async fn delivered_alerts(app: &TestApp, receiver: &Receiver, audience: &str) -> Vec<Value> {
    let tokens = receiver.tokens.lock().expect("lock").clone();
    let jwks = jwks(app).await;
    let mut alerts = Vec::new();
    for token in tokens {
        let header = jsonwebtoken::decode_header(&token).expect("jws header");
        let jwk = jwks
            .find(header.kid.as_deref().expect("kid"))
            .expect("key in jwks");
        let key = jsonwebtoken::DecodingKey::from_jwk(jwk).expect("key");
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::EdDSA);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.set_audience(&[audience]);
        let claims = jsonwebtoken::decode::<Value>(&token, &key, &validation)
            .expect("a SET signed by the gateway for this endpoint")
            .claims;
        alerts.push(claims["events"][ALERT_EVENT].clone());
    }
    alerts
}

/// Registers a client (an institution) with its webhook endpoint; its id.
async fn register_institution(app: &TestApp, operator: &str, webhook: &str) -> String {
    let response = app
        .client
        .post(app.url("/operator/clients"))
        .bearer_auth(operator)
        .json(&json!({
            "display_name": "地域医療連携ネットワーク",
            "redirect_uris": ["https://network.example.jp/cb"],
            "token_endpoint_auth_method": "client_secret_basic",
            "recipient": {"name": "地域医療連携ネットワーク協議会", "identifier": "9876543210987"},
            "compliance": {
                "declared": true,
                "statement": "PHRサービス事業者に関する基本的指針を遵守します",
                "declared_on": "2026-04-01"
            }
        }))
        .send()
        .await
        .expect("register");
    assert_eq!(response.status(), StatusCode::CREATED);
    let body: Value = response.json().await.expect("json");
    let client_id = body["client_id"].as_str().expect("client_id").to_string();
    let status = app
        .client
        .put(app.url(&format!("/operator/clients/{client_id}/webhook")))
        .bearer_auth(operator)
        .json(&json!({"url": webhook}))
        .send()
        .await
        .expect("webhook")
        .status();
    assert_eq!(status, StatusCode::NO_CONTENT);
    client_id
}

/// Sequences what is pending and runs the rules once, as the background loop does (the
/// harness leaves the loop off; the page test turns it on).
async fn evaluate(app: &TestApp) -> phr_gateway::alerts::engine::Pass {
    let state = &app.gateway().state;
    state.audit.sequence(false).await.expect("sequence");
    state.alerts.evaluate_once().await.expect("evaluate")
}

async fn alerts_of_rule(app: &TestApp, operator: &str, rule: &str) -> Vec<Value> {
    let listed = get_json(app, "/operator/alerts", operator).await;
    listed["alerts"]
        .as_array()
        .expect("alerts")
        .iter()
        .filter(|a| a["rule"] == rule)
        .cloned()
        .collect()
}

async fn fail_login(app: &TestApp, username: &str) -> StatusCode {
    app.client
        .post(app.url("/auth/login"))
        .json(&json!({"username": username, "password": "not the password"}))
        .send()
        .await
        .expect("login")
        .status()
}

async fn ten_failed_logins_in_a_minute_raise_one_signed_alert(engine: Engine) {
    let (receiver, url) = start_receiver().await;
    let hook = url.clone();
    let app = spawn_app_with(TestEnv::new(engine).await, move |c| {
        c.alerts.webhook_urls = vec![hook];
    })
    .await;
    let operator = app.sign_in(AccountRole::Operator, "op", None).await;
    let account = app
        .gateway()
        .state
        .accounts
        .create(
            AccountRole::Patient,
            "hanako",
            "correct horse battery staple",
            Some("p-1"),
        )
        .await
        .expect("account");

    // Nine failures (the account locks after five: the rest are refused as locked, and
    // are failed sign-ins all the same): no alert.
    for attempt in 0..9 {
        let status = fail_login(&app, "hanako").await;
        assert!(
            status == StatusCode::UNAUTHORIZED || status == StatusCode::TOO_MANY_REQUESTS,
            "attempt {attempt}: {status}"
        );
    }
    evaluate(&app).await;
    assert!(alerts_of_rule(&app, &operator, "failed-logins")
        .await
        .is_empty());
    assert!(receiver.tokens.lock().expect("lock").is_empty());

    // The tenth within the minute: one alert for the account (and one over all accounts).
    fail_login(&app, "hanako").await;
    let pass = evaluate(&app).await;
    assert_eq!(pass.raised.len(), 2, "{pass:?}");
    assert_eq!(pass.delivered, 2, "{pass:?}");
    let raised = alerts_of_rule(&app, &operator, "failed-logins").await;
    assert_eq!(raised.len(), 2, "{raised:?}");
    let for_account: Vec<&Value> = raised
        .iter()
        .filter(|a| a["summary"].as_str().unwrap_or("").contains(&account.id))
        .collect();
    assert_eq!(for_account.len(), 1, "{raised:?}");
    assert_eq!(for_account[0]["severity"], "warning");
    assert!(for_account[0]["summary"]
        .as_str()
        .unwrap_or("")
        .starts_with("10 failed sign-ins within a minute"));

    let delivered = delivered_alerts(&app, &receiver, &url).await;
    assert_eq!(delivered.len(), 2);
    let delivered_ids: Vec<&Value> = delivered.iter().map(|a| &a["alert"]).collect();
    assert!(delivered_ids.contains(&&for_account[0]["id"]));
    assert!(delivered
        .iter()
        .all(|a| a["rule"] == "failed-logins" && a["page"].as_str().is_some()));

    // Evaluated again, and with more failures of the same burst: still one alert each,
    // delivered once.
    evaluate(&app).await;
    fail_login(&app, "hanako").await;
    let pass = evaluate(&app).await;
    assert!(pass.raised.is_empty(), "{pass:?}");
    assert_eq!(
        alerts_of_rule(&app, &operator, "failed-logins").await.len(),
        2
    );
    assert_eq!(receiver.tokens.lock().expect("lock").len(), 2);
    assert!(leaves_containing(&app, "alert-raised").await >= 2);

    // Acknowledged (audited), it leaves the open list; acknowledging again changes nothing.
    let id = for_account[0]["id"].as_str().expect("id").to_string();
    let acknowledge = || {
        app.client
            .post(app.url(&format!("/operator/alerts/{id}/acknowledge")))
            .bearer_auth(&operator)
            .send()
    };
    let first: Value = acknowledge()
        .await
        .expect("ack")
        .json()
        .await
        .expect("json");
    let again: Value = acknowledge()
        .await
        .expect("ack")
        .json()
        .await
        .expect("json");
    assert_eq!(first["acknowledged_at"], again["acknowledged_at"]);
    assert!(first["acknowledged_by"].is_string());
    assert_eq!(
        alerts_of_rule(&app, &operator, "failed-logins").await.len(),
        1
    );
    assert_eq!(leaves_containing(&app, "alert-acknowledged").await, 1);
    let unknown = app
        .client
        .post(app.url("/operator/alerts/no-such-alert/acknowledge"))
        .bearer_auth(&operator)
        .send()
        .await
        .expect("ack");
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);

    // Patients see no alerts.
    let patient = app.sign_in(AccountRole::Patient, "taro", Some("p-2")).await;
    let refused = app
        .client
        .get(app.url("/operator/alerts"))
        .bearer_auth(&patient)
        .send()
        .await
        .expect("list");
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    app.stop().await;
}

async fn record(app: &TestApp, event: AuditEvent) {
    app.gateway()
        .state
        .audit
        .record_now(&event)
        .await
        .expect("record");
}

async fn a_client_reading_many_patients_raises_an_alert(engine: Engine) {
    let (receiver, url) = start_receiver().await;
    let hook = url.clone();
    let app = spawn_app_with(TestEnv::new(engine).await, move |c| {
        c.alerts.webhook_urls = vec![hook];
        // Any time of day is usual here: only the rule under test fires.
        c.alerts.business_hours_start = "00:00".into();
        c.alerts.business_hours_end = "00:00".into();
    })
    .await;
    *receiver.failures.lock().expect("lock") = 1;
    let operator = app.sign_in(AccountRole::Operator, "op", None).await;
    // The reads a recipient's app makes, as the FHIR API records them: 21 patients by one
    // app, 20 by another (the default allows 20 within ten minutes).
    for i in 0..21 {
        record(
            &app,
            AuditEvent::new(EventKind::Read, Agent::client("app-greedy"))
                .patient(format!("p-{i}"))
                .resource(format!("Observation/o-{i}")),
        )
        .await;
    }
    for i in 0..20 {
        record(
            &app,
            AuditEvent::new(EventKind::Search, Agent::client("app-modest"))
                .patient(format!("p-{i}")),
        )
        .await;
    }
    evaluate(&app).await;
    let raised = alerts_of_rule(&app, &operator, "many-patients-read").await;
    assert_eq!(raised.len(), 1, "{raised:?}");
    let summary = raised[0]["summary"].as_str().expect("summary");
    assert!(
        summary.contains("client app-greedy read 21 distinct patients"),
        "{summary}"
    );
    assert!(
        !(0..21).any(|i| summary.contains(&format!("p-{i}"))),
        "no patient named: {summary}"
    );

    // The endpoint failed the first delivery: retried after its backoff, the same event.
    let round = app
        .gateway()
        .state
        .alerts
        .deliver_due()
        .await
        .expect("deliver");
    assert_eq!(round.delivered, 0, "not due before its backoff");
    sqlx::query("UPDATE alert_deliveries SET next_attempt_at = 0 WHERE status = 'pending'")
        .execute(app.gateway().state.db.write_pool())
        .await
        .expect("due now");
    let round = app
        .gateway()
        .state
        .alerts
        .deliver_due()
        .await
        .expect("deliver");
    assert_eq!(round.delivered, 1);
    let tokens = receiver.tokens.lock().expect("lock").clone();
    assert_eq!(tokens.len(), 2);
    let claims = |token: &str| -> Value {
        let payload = token.split('.').nth(1).expect("payload");
        use base64::Engine as _;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .expect("base64url");
        serde_json::from_slice(&bytes).expect("claims")
    };
    assert_eq!(claims(&tokens[0])["jti"], claims(&tokens[1])["jti"]);
    let delivered = delivered_alerts(&app, &receiver, &url).await;
    assert_eq!(delivered[1]["rule"], "many-patients-read");
    evaluate(&app).await;
    assert_eq!(
        alerts_of_rule(&app, &operator, "many-patients-read")
            .await
            .len(),
        1
    );

    // Facts other parts report: a failed verification and shipping lag, each once.
    let alerts = &app.gateway().state.alerts;
    alerts.report_verify_failure(Some(phr_gateway::alerts::VerifyFailure {
        detected_millis: phr_gateway::store::now_millis(),
        reason: "leaf 3 was changed".into(),
    }));
    alerts.report_shipping_lag(Some(phr_gateway::alerts::ShippingLag {
        leaves_behind: 50_000,
        seconds_since_success: Some(7_200),
    }));
    evaluate(&app).await;
    evaluate(&app).await;
    let verify = alerts_of_rule(&app, &operator, "verify-failure").await;
    assert_eq!(verify.len(), 1);
    assert_eq!(verify[0]["severity"], "critical");
    assert_eq!(
        alerts_of_rule(&app, &operator, "shipping-lag").await.len(),
        1
    );
    app.stop().await;
}

fn operator_agent(id: &str) -> Agent {
    Agent {
        actor: Actor::Account {
            id: id.into(),
            role: AccountRole::Operator,
        },
        address: None,
        token_jti: None,
    }
}

fn rfc3339_now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .expect("format")
}

async fn search(app: &TestApp, operator: &str, query: &[(&str, &str)]) -> reqwest::Response {
    app.client
        .get(app.url("/operator/audit/events"))
        .query(query)
        .bearer_auth(operator)
        .send()
        .await
        .expect("search")
}

async fn found(app: &TestApp, operator: &str, query: &[(&str, &str)]) -> Vec<Value> {
    let response = search(app, operator, query).await;
    assert_eq!(response.status(), StatusCode::OK, "{query:?}");
    let body: Value = response.json().await.expect("json");
    body["events"].as_array().expect("events").clone()
}

/// A search's parameters, and the events it must find (`actor@entity`).
type SearchCase<'a> = (Vec<(&'a str, &'a str)>, Vec<&'a str>);

async fn audit_search_and_export_find_exactly_what_was_asked(engine: Engine) {
    let app = spawn_app(engine).await;
    let operator = app.sign_in(AccountRole::Operator, "op", None).await;
    let before = rfc3339_now();
    tokio::time::sleep(Duration::from_millis(5)).await;
    record(
        &app,
        AuditEvent::new(EventKind::Read, Agent::client("app-s")).patient("p-a"),
    )
    .await;
    record(
        &app,
        AuditEvent::new(EventKind::Read, Agent::client("app-s")).patient("p-b"),
    )
    .await;
    record(
        &app,
        AuditEvent::new(EventKind::Export, operator_agent("op-x")).patient("p-a"),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let after = rfc3339_now();

    let actors = |events: &[Value]| -> Vec<String> {
        events
            .iter()
            .map(|e| {
                format!(
                    "{}@{}",
                    e["agent"][0]["who"]["identifier"]["value"]
                        .as_str()
                        .unwrap_or("-"),
                    e["entity"][0]["what"]["reference"].as_str().unwrap_or("-")
                )
            })
            .collect()
    };
    let cases: Vec<SearchCase> = vec![
        (
            vec![("patient", "p-a")],
            vec!["app-s@Patient/p-a", "op-x@Patient/p-a"],
        ),
        (
            vec![("actor", "app-s")],
            vec!["app-s@Patient/p-a", "app-s@Patient/p-b"],
        ),
        (
            vec![("actor", "app-s"), ("action", "read"), ("patient", "p-b")],
            vec!["app-s@Patient/p-b"],
        ),
        (
            vec![("action", "export"), ("patient", "p-a")],
            vec!["op-x@Patient/p-a"],
        ),
        (
            vec![
                ("action", "read"),
                ("since", before.as_str()),
                ("until", after.as_str()),
            ],
            vec!["app-s@Patient/p-a", "app-s@Patient/p-b"],
        ),
        (vec![("actor", "app-s"), ("until", before.as_str())], vec![]),
        (vec![("actor", "app-s"), ("since", after.as_str())], vec![]),
        (vec![("patient", "p-nobody")], vec![]),
    ];
    for (query, expected) in &cases {
        assert_eq!(
            actors(&found(&app, &operator, query).await),
            *expected,
            "{query:?}"
        );
    }

    // Paged.
    let first: Value = search(&app, &operator, &[("actor", "app-s"), ("_count", "1")])
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(first["events"].as_array().map(Vec::len), Some(1));
    assert_eq!(first["next_page"], 2);
    let second: Value = search(
        &app,
        &operator,
        &[("actor", "app-s"), ("_count", "1"), ("page", "2")],
    )
    .await
    .json()
    .await
    .expect("json");
    assert_eq!(
        actors(second["events"].as_array().expect("events")),
        ["app-s@Patient/p-b"]
    );
    assert!(second["next_page"].is_null());

    // Exported as NDJSON: the leaves as stored.
    let export = app
        .client
        .get(app.url("/operator/audit/events.ndjson"))
        .query(&[("patient", "p-a")])
        .bearer_auth(&operator)
        .send()
        .await
        .expect("export");
    assert_eq!(export.status(), StatusCode::OK);
    assert_eq!(
        export.headers()["content-type"].to_str().expect("type"),
        "application/fhir+ndjson"
    );
    let text = export.text().await.expect("ndjson");
    let lines: Vec<Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect();
    assert_eq!(actors(&lines), ["app-s@Patient/p-a", "op-x@Patient/p-a"]);
    assert!(text.ends_with('\n'));

    // Every search and the export were audited, with their query.
    let searches = cases.len() as i64 + 2;
    assert_eq!(
        leaves_containing(&app, "audit-log-searched").await,
        searches
    );
    assert_eq!(leaves_containing(&app, "audit-log-exported").await, 1);
    let searched = found(&app, &operator, &[("action", "audit-log-exported")]).await;
    assert_eq!(searched.len(), 1);
    assert_eq!(searched[0]["entity"][0]["role"]["code"], "24");

    // Bad input.
    for query in [
        vec![("since", "yesterday")],
        vec![("until", "2026-13-01T00:00:00Z")],
        vec![("since", after.as_str()), ("until", before.as_str())],
        vec![("action", "reed")],
        vec![("_count", "0")],
        vec![("_count", "1001")],
        vec![("_count", "many")],
        vec![("page", "0")],
    ] {
        let response = search(&app, &operator, &query).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{query:?}");
        assert_eq!(
            response.headers()["content-type"].to_str().expect("type"),
            "application/problem+json",
            "{query:?}"
        );
    }
    let bad_export = app
        .client
        .get(app.url("/operator/audit/events.ndjson?action=reed"))
        .bearer_auth(&operator)
        .send()
        .await
        .expect("export");
    assert_eq!(bad_export.status(), StatusCode::BAD_REQUEST);
    // Refused searches are not counted as searches.
    assert_eq!(
        leaves_containing(&app, "audit-log-searched").await,
        searches + 1
    );

    let patient = app.sign_in(AccountRole::Patient, "taro", Some("p-a")).await;
    assert_eq!(
        search(&app, &patient, &[("patient", "p-a")]).await.status(),
        StatusCode::FORBIDDEN
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_alerts_page_shows_the_alert_and_the_event_rate_and_acknowledges() {
    let app = spawn_app_with(TestEnv::new(Engine::Sqlite).await, |c| {
        c.alerts.evaluate = true;
        c.alerts.interval_millis = 200;
    })
    .await;
    let operator = app.sign_in(AccountRole::Operator, "op", None).await;
    app.gateway()
        .state
        .accounts
        .create(
            AccountRole::Patient,
            "hanako",
            "correct horse battery staple",
            Some("p-1"),
        )
        .await
        .expect("account");
    for _ in 0..10 {
        fail_login(&app, "hanako").await;
    }
    // The background loop raises it.
    let mut raised = Vec::new();
    for _ in 0..100 {
        raised = alerts_of_rule(&app, &operator, "failed-logins").await;
        if raised.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        raised.len(),
        2,
        "the background evaluation raised the alerts"
    );

    let browser = Browser::start().await;
    let c = &browser.client;
    // The operator's session, as the API gave it, becomes the browser's session cookie
    // (set from the page: WebDriver's cookie command refuses a host-only cookie).
    c.goto(&app.url("/portal")).await.expect("origin");
    c.execute(
        "document.cookie = '__Host-phr_session=' + arguments[0] + '; Path=/; Secure; SameSite=Lax'",
        vec![json!(operator)],
    )
    .await
    .expect("cookie");
    c.goto(&app.url("/operator/alerts-page"))
        .await
        .expect("page");

    let rows = c
        .wait()
        .for_element(Locator::Css("tr[data-rule=failed-logins]"))
        .await
        .expect("an alert row");
    assert!(rows.text().await.expect("text").contains("failed sign-ins"));
    let bars = c
        .find_all(Locator::Css("#event-rate svg rect.bar"))
        .await
        .expect("bars");
    assert!(!bars.is_empty(), "the chart has bars");
    let failed_bars = c
        .find_all(Locator::Css("#event-rate svg rect.failed"))
        .await
        .expect("bars");
    assert!(!failed_bars.is_empty(), "failed sign-ins show as failures");

    // Acknowledge the first: the page comes back without it.
    let before = c
        .find_all(Locator::Css("tr[data-rule=failed-logins]"))
        .await
        .expect("rows")
        .len();
    c.find(Locator::Css(
        "tr[data-rule=failed-logins] button[type=submit]",
    ))
    .await
    .expect("button")
    .click()
    .await
    .expect("click");
    let mut after = before;
    for _ in 0..50 {
        // Rows are counted only on a page that has loaded (its chart is there), in one
        // script so both checks see the same document: while the browser is between the
        // old page and the new one, it finds no rows at all.
        let counted = c
            .execute(
                "return document.readyState === 'complete' && document.querySelector('#event-rate svg')
                    ? document.querySelectorAll('tr[data-rule=failed-logins]').length : -1",
                vec![],
            )
            .await
            .ok()
            .and_then(|v| v.as_i64())
            .unwrap_or(-1);
        if counted >= 0 {
            after = counted as usize;
            if after < before {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(after, before - 1);
    assert_eq!(
        alerts_of_rule(&app, &operator, "failed-logins").await.len(),
        1
    );
    assert_eq!(leaves_containing(&app, "alert-acknowledged").await, 1);
    browser.close().await;
    app.stop().await;
}

/// The build checked against a fixture RustSec snapshot: the one advisory that affects a
/// locked crate produces exactly one signed notification with the component, severity,
/// workaround and planned fix date; a second run (rescanning) produces none. End-of-life
/// dates within 90 days, or past, are warned once each.
async fn a_new_advisory_is_notified_once_and_end_of_life_is_warned(engine: Engine) {
    let (receiver, url) = start_receiver().await;
    let hook = url.clone();
    let snapshot =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/advisory-db");
    let env = TestEnv::new(engine).await;
    let inventory = env.data_dir().join("eol.toml");
    std::fs::write(
        &inventory,
        "[[component]]\nname = \"PostgreSQL\"\nversion = \"15\"\neol = \"2000-01-01\"\nsource = \"https://www.postgresql.org/support/versioning/\"\n\n\
         [[component]]\nname = \"SQLite\"\nversion = \"3\"\neol = \"2050-05-29\"\nsource = \"https://www.sqlite.org/lts.html\"\n",
    )
    .expect("inventory");
    let app = spawn_app_with(env, move |c| {
        c.alerts.webhook_urls = vec![hook];
        c.alerts.advisory_db_dir = Some(snapshot);
        c.alerts.advisory_scan_interval_secs = 0;
        c.alerts.check_end_of_life = true;
        c.alerts.eol_inventory_file = Some(inventory);
    })
    .await;
    let operator = app.sign_in(AccountRole::Operator, "op", None).await;
    // An institution (a registered client) with a webhook endpoint is told too.
    let (institution, institution_url) = start_receiver().await;
    let institution_id = register_institution(&app, &operator, &institution_url).await;

    evaluate(&app).await;
    let delivered = delivered_alerts(&app, &receiver, &url).await;
    let vulnerabilities: Vec<&Value> = delivered
        .iter()
        .filter(|a| a["rule"] == "vulnerability")
        .collect();
    assert_eq!(vulnerabilities.len(), 1, "{delivered:?}");
    let summary = vulnerabilities[0]["summary"].as_str().expect("summary");
    for part in [
        "RUSTSEC-2026-9901",
        "hex 0.4.3",
        "severity high",
        "workaround: reject odd-length",
        "fix planned by",
    ] {
        assert!(summary.contains(part), "{part}: {summary}");
    }
    assert!(!summary.contains("zeroize"));
    let eol: Vec<&Value> = delivered
        .iter()
        .filter(|a| a["rule"] == "end-of-life")
        .collect();
    assert_eq!(
        eol.len(),
        1,
        "only the past date, not SQLite's 2050: {delivered:?}"
    );
    assert!(eol[0]["summary"]
        .as_str()
        .unwrap_or("")
        .contains("PostgreSQL 15 is past"));

    // The institution got the same two notices, addressed to it, without the operators'
    // page and with the plain explanation.
    let told = delivered_alerts(&app, &institution, &institution_id).await;
    let mut rules: Vec<&str> = told.iter().filter_map(|a| a["rule"].as_str()).collect();
    rules.sort_unstable();
    assert_eq!(rules, ["end-of-life", "vulnerability"], "{told:?}");
    for notice in &told {
        assert!(notice.get("page").is_none(), "{notice}");
        assert!(notice["message"].as_str().unwrap_or("").contains("脆弱性"));
    }
    assert!(told.iter().any(|a| a["summary"]
        .as_str()
        .unwrap_or("")
        .contains("RUSTSEC-2026-9901")));

    // A second run rescans the snapshot and finds the same: nothing new is sent.
    evaluate(&app).await;
    evaluate(&app).await;
    let again = delivered_alerts(&app, &receiver, &url).await;
    assert_eq!(again.len(), delivered.len(), "{again:?}");
    assert_eq!(
        delivered_alerts(&app, &institution, &institution_id)
            .await
            .len(),
        2
    );
    assert_eq!(
        alerts_of_rule(&app, &operator, "vulnerability").await.len(),
        1
    );
    app.stop().await;
}
