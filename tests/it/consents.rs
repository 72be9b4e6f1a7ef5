//! Disclosure consents end to end on both engines: the patient's API lists, reads (with
//! history, FHIR `Consent` and signed receipts), changes and withdraws; the decision on every
//! access reads what is committed, so a withdrawal denies the very next request, also in a
//! second gateway process on the same database.

use phr_consent::{DataCategory, Performer, PersonRef, Purpose, Recipient, Requested};
use phr_gateway::audit::{AccountRole, Agent};
use phr_gateway::consents::ConsentOutcome;
use phr_gateway::http::AppState;
use phr_gateway::Gateway;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::both_engines;
use crate::helpers::{
    get_json, grant_consent, leaves_containing, receipt_claims, spawn_app, Engine, TestApp,
};

both_engines!(
    grant_read_change_and_withdraw,
    a_withdrawal_denies_the_next_request_in_every_process,
    bad_consent_requests_get_clear_errors,
);

const APP: &str = "demo-phr-app";

/// The patient agrees, on the consent screen, to `purposes` and `categories` for a year.
async fn grant(
    app: &TestApp,
    patient: &str,
    purposes: &[&str],
    categories: &[DataCategory],
) -> (String, String) {
    let performer = Performer::patient(&PersonRef::new(patient));
    grant_consent(app, patient, performer, APP, purposes, categories, 365).await
}

async fn decide(
    state: &AppState,
    patient: &str,
    purpose: &str,
    category: DataCategory,
) -> ConsentOutcome {
    let p = state
        .consents
        .config()
        .purpose(purpose)
        .expect("purpose")
        .clone();
    state
        .consents
        .decide(
            &Agent::system(),
            patient,
            &Recipient::client(APP),
            &Purpose::new(&p.system, &p.code),
            Requested::Category(category),
        )
        .await
        .expect("decide")
}

fn permits(outcome: &ConsentOutcome) -> bool {
    matches!(outcome, ConsentOutcome::Permit { .. })
}

async fn grant_read_change_and_withdraw(engine: Engine) {
    let app = spawn_app(engine).await;
    let token = app
        .sign_in(AccountRole::Patient, "hanako", Some("p-hanako"))
        .await;
    let (id, receipt) = grant(
        &app,
        "p-hanako",
        &["PATRQT", "TREAT"],
        &[DataCategory::Observations, DataCategory::Medications],
    )
    .await;
    let claims = receipt_claims(&app, &receipt).await;
    assert_eq!(claims["event"], "granted");
    assert_eq!(claims["consent"]["id"], id);
    assert_eq!(claims["piiPrincipalId"], "p-hanako");
    assert!(claims["notice"]["url"]
        .as_str()
        .is_some_and(|u| u.contains("/consent/notice")));

    let listed = get_json(&app, "/api/consents", &token).await;
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(listed[0]["status"], "active");
    assert_eq!(listed[0]["in_force"], true);
    assert_eq!(listed[0]["recipient_display"], "デモPHRアプリ");

    // Narrowing: medications no longer shared; a new version with its own receipt.
    let ends_on = (time::OffsetDateTime::now_utc() + time::Duration::days(30))
        .date()
        .to_string();
    let changed = app
        .client
        .post(app.url(&format!("/api/consents/{id}/change")))
        .bearer_auth(&token)
        .json(&json!({"purposes": ["PATRQT", "TREAT"], "categories": ["observations"], "ends_on": ends_on}))
        .send()
        .await
        .expect("change");
    assert_eq!(changed.status(), StatusCode::OK);
    let changed: Value = changed.json().await.expect("json");
    assert_eq!(changed["consent"]["version"], 2);
    let claims = receipt_claims(&app, changed["receipt"].as_str().expect("receipt")).await;
    assert_eq!(claims["event"], "changed");
    let gateway = app.gateway();
    assert!(permits(
        &decide(
            &gateway.state,
            "p-hanako",
            "TREAT",
            DataCategory::Observations
        )
        .await
    ));
    assert!(!permits(
        &decide(
            &gateway.state,
            "p-hanako",
            "TREAT",
            DataCategory::Medications
        )
        .await
    ));
    assert!(!permits(
        &decide(
            &gateway.state,
            "p-hanako",
            "HRESCH",
            DataCategory::Observations
        )
        .await
    ));

    // Withdrawal in one call.
    let withdrawn = app
        .client
        .post(app.url(&format!("/api/consents/{id}/withdraw")))
        .bearer_auth(&token)
        .send()
        .await
        .expect("withdraw");
    assert_eq!(withdrawn.status(), StatusCode::OK);
    let withdrawn: Value = withdrawn.json().await.expect("json");
    assert_eq!(withdrawn["consent"]["status"], "inactive");
    assert_eq!(withdrawn["consent"]["in_force"], false);
    let claims = receipt_claims(&app, withdrawn["receipt"].as_str().expect("receipt")).await;
    assert_eq!(claims["event"], "withdrawn");
    assert_eq!(claims["consent"]["version"], 3);
    match decide(
        &gateway.state,
        "p-hanako",
        "PATRQT",
        DataCategory::Observations,
    )
    .await
    {
        ConsentOutcome::Deny { reason, .. } => assert_eq!(reason, "withdrawn"),
        other => panic!("{other:?}"),
    }

    // The full history, each version with its receipt, and the FHIR Consent.
    let detail: Value = app
        .client
        .get(app.url(&format!("/api/consents/{id}")))
        .bearer_auth(&token)
        .send()
        .await
        .expect("detail")
        .json()
        .await
        .expect("json");
    let events: Vec<&str> = detail["history"]
        .as_array()
        .expect("history")
        .iter()
        .filter_map(|v| v["event"].as_str())
        .collect();
    assert_eq!(events, vec!["granted", "changed", "withdrawn"]);
    assert_eq!(detail["fhir"]["resourceType"], "Consent");
    assert_eq!(detail["fhir"]["status"], "inactive");
    assert_eq!(detail["fhir"]["patient"]["reference"], "Patient/p-hanako");

    // Every change and the denial are in the audit log.
    assert!(leaves_containing(&app, &format!("consent {id}")).await >= 3);
    assert!(leaves_containing(&app, "denied: withdrawn").await >= 1);
}

async fn a_withdrawal_denies_the_next_request_in_every_process(engine: Engine) {
    let app = spawn_app(engine).await;
    let token = app
        .sign_in(AccountRole::Patient, "hanako", Some("p-hanako"))
        .await;
    let (id, _) = grant(&app, "p-hanako", &["PATRQT"], &[DataCategory::Observations]).await;
    let listed = get_json(&app, "/api/consents", &token).await;
    assert_eq!(listed[0]["ends_soon"], false, "a year ahead");
    // Moving the end date into the reminder window: the patient is reminded.
    let ends_on = (time::OffsetDateTime::now_utc() + time::Duration::days(7))
        .date()
        .to_string();
    let changed: Value = app
        .client
        .post(app.url(&format!("/api/consents/{id}/change")))
        .bearer_auth(&token)
        .json(&json!({"purposes": ["PATRQT"], "categories": ["observations"], "ends_on": ends_on}))
        .send()
        .await
        .expect("change")
        .json()
        .await
        .expect("json");
    assert_eq!(changed["consent"]["ends_soon"], true, "{changed}");
    // PostgreSQL is the scale-out store: a second gateway process shares it. (SQLite is the
    // one-process embedded store.)
    let second = match engine {
        Engine::Postgres => Some(
            Gateway::build(app.env().config())
                .await
                .expect("second process"),
        ),
        Engine::Sqlite => None,
    };
    let mut states = vec![&app.gateway().state];
    if let Some(second) = &second {
        states.push(&second.state);
    }
    for state in &states {
        assert!(permits(
            &decide(state, "p-hanako", "PATRQT", DataCategory::Observations).await
        ));
    }

    let withdrawn = app
        .client
        .post(app.url(&format!("/api/consents/{id}/withdraw")))
        .bearer_auth(&token)
        .send()
        .await
        .expect("withdraw");
    assert_eq!(withdrawn.status(), StatusCode::OK);
    // No sleep: the very next decision, here and there, is a denial.
    for state in states.iter().rev() {
        assert!(!permits(
            &decide(state, "p-hanako", "PATRQT", DataCategory::Observations).await
        ));
    }
}

async fn bad_consent_requests_get_clear_errors(engine: Engine) {
    let app = spawn_app(engine).await;
    let hanako = app
        .sign_in(AccountRole::Patient, "hanako", Some("p-hanako"))
        .await;
    let taro = app
        .sign_in(AccountRole::Patient, "taro", Some("p-taro"))
        .await;
    let (id, _) = grant(&app, "p-hanako", &["PATRQT"], &[DataCategory::Observations]).await;

    // Another patient's consent is absent to them, and stays as it was.
    for path in [
        format!("/api/consents/{id}"),
        format!("/api/consents/{id}/withdraw"),
    ] {
        let request = if path.ends_with("withdraw") {
            app.client.post(app.url(&path))
        } else {
            app.client.get(app.url(&path))
        };
        let response = request.bearer_auth(&taro).send().await.expect("request");
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
    }
    assert!(permits(
        &decide(
            &app.gateway().state,
            "p-hanako",
            "PATRQT",
            DataCategory::Observations
        )
        .await
    ));

    // Unknown purposes or categories, an end date in the past or too far, nothing chosen.
    let today = time::OffsetDateTime::now_utc().date();
    for body in [
        json!({"purposes": ["MARKETING"], "categories": ["observations"], "ends_on": (today + time::Duration::days(10)).to_string()}),
        json!({"purposes": ["PATRQT"], "categories": ["everything"], "ends_on": (today + time::Duration::days(10)).to_string()}),
        json!({"purposes": ["PATRQT"], "categories": ["observations"], "ends_on": "2001-01-01"}),
        json!({"purposes": ["PATRQT"], "categories": ["observations"], "ends_on": (today + time::Duration::days(4000)).to_string()}),
        json!({"purposes": ["PATRQT"], "categories": ["observations"], "ends_on": "next year"}),
        json!({"purposes": [], "categories": ["observations"], "ends_on": (today + time::Duration::days(10)).to_string()}),
    ] {
        let response = app
            .client
            .post(app.url(&format!("/api/consents/{id}/change")))
            .bearer_auth(&hanako)
            .json(&body)
            .send()
            .await
            .expect("change");
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{body}");
        let problem: Value = response.json().await.expect("problem");
        assert!(
            problem["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "{problem}"
        );
    }

    // The portal's change form: another patient's consent is absent; reading it is audited.
    let foreign = app
        .client
        .get(app.url(&format!("/portal/consents/{id}/change")))
        .bearer_auth(&taro)
        .send()
        .await
        .expect("foreign form");
    assert_eq!(foreign.status(), StatusCode::NOT_FOUND);
    let reads_before = leaves_containing(&app, &format!("consent {id}")).await;
    let form = app
        .client
        .get(app.url(&format!("/portal/consents/{id}/change")))
        .bearer_auth(&hanako)
        .send()
        .await
        .expect("form");
    assert_eq!(form.status(), StatusCode::OK);
    assert_eq!(
        leaves_containing(&app, &format!("consent {id}")).await,
        reads_before + 1
    );

    // Widening from the portal (a category the consent does not cover) is refused.
    let widened = app
        .client
        .post(app.url(&format!("/portal/consents/{id}/change")))
        .bearer_auth(&hanako)
        .header("origin", app.base.clone())
        .form(&[
            ("action", "change"),
            ("purpose", "PATRQT"),
            ("category", "medications"),
            ("ends_on", "2099-01-01"),
        ])
        .send()
        .await
        .expect("widen");
    assert_eq!(widened.status(), StatusCode::BAD_REQUEST);

    // A withdrawal form posted from another site (CSRF) is refused and changes nothing.
    let forged = app
        .client
        .post(app.url(&format!("/portal/consents/{id}/withdraw")))
        .bearer_auth(&hanako)
        .header("origin", "https://evil.example")
        .send()
        .await
        .expect("forged");
    assert_eq!(forged.status(), StatusCode::FORBIDDEN);
    assert!(permits(
        &decide(
            &app.gateway().state,
            "p-hanako",
            "PATRQT",
            DataCategory::Observations
        )
        .await
    ));

    // Withdrawing twice: the second is a conflict, not a second receipt.
    for expected in [StatusCode::OK, StatusCode::CONFLICT] {
        let response = app
            .client
            .post(app.url(&format!("/api/consents/{id}/withdraw")))
            .bearer_auth(&hanako)
            .send()
            .await
            .expect("withdraw");
        assert_eq!(response.status(), expected);
    }
    // Not signed in.
    let anonymous = app
        .client
        .get(app.url("/api/consents"))
        .send()
        .await
        .expect("list");
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
}
