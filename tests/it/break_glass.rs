//! Break-glass end to end on both engines: refused while normal sign-in works (audited);
//! during a simulated outage of the configured identity provider the sealed one-time secret
//! opens a time-boxed session whose every action is audited as an emergency override with
//! purposeOfEvent BTG; the secret works once; the emergency account never signs in on the
//! normal path; the use waits for another operator's review and is flagged when overdue.

use axum::routing::get;
use phr_gateway::audit::AccountRole;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::both_engines;
use crate::helpers::{audit_events, leaves_containing, spawn_app_with, Engine, TestApp, TestEnv};

both_engines!(
    break_glass_only_during_an_outage_and_reviewed_afterwards,
    refused_while_the_second_factor_store_works,
);

/// A stand-in for the external identity provider's health endpoint, which the test stops
/// to simulate the outage.
struct IdentityProvider {
    url: String,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

async fn identity_provider() -> IdentityProvider {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/health", listener.local_addr().expect("addr"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let router = axum::Router::new().route("/health", get(|| async { "ok" }));
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, router)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await;
    });
    IdentityProvider { url, stop, task }
}

async fn break_glass(app: &TestApp, username: &str, secret: &str) -> (StatusCode, Value) {
    let response = app
        .client
        .post(app.url("/auth/break-glass"))
        .json(&json!({
            "username": username,
            "secret": secret,
            "reason": "IdP outage; ward needs an urgent account unlock (ticket INC-1234)"
        }))
        .send()
        .await
        .expect("break-glass");
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn emergency_leaves(app: &TestApp) -> Vec<Value> {
    audit_events(app)
        .await
        .into_iter()
        .filter(|event| event["subtype"][0]["code"] == "110127")
        .collect()
}

async fn break_glass_only_during_an_outage_and_reviewed_afterwards(engine: Engine) {
    let idp = identity_provider().await;
    let probe = idp.url.clone();
    let app = spawn_app_with(TestEnv::new(engine).await, |config| {
        config.break_glass.normal_login_probe_url = Some(probe);
        config.break_glass.session_minutes = 30;
    })
    .await;
    let state = &app.gateway().state;
    let (_, secret) = state
        .break_glass
        .create_account("glass")
        .await
        .expect("emergency account");
    let reviewer = app.sign_in(AccountRole::Operator, "reviewer", None).await;

    // Normal sign-in works (the identity provider answers): refused, and on the record.
    let (status, body) = break_glass(&app, "glass", &secret).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let refused = emergency_leaves(&app).await;
    assert!(refused.iter().any(|e| e["outcome"] == "4"
        && e["outcomeDesc"]
            .as_str()
            .is_some_and(|d| d.contains("normal sign-in path works"))));

    // The emergency account never signs in on the normal path.
    let response = app
        .client
        .post(app.url("/auth/login"))
        .json(&json!({"username": "glass", "password": secret}))
        .send()
        .await
        .expect("login");
    assert_eq!(response.status(), StatusCode::FORBIDDEN);

    // The identity provider goes down.
    let _ = idp.stop.send(());
    let _ = idp.task.await;

    // A wrong secret still fails.
    let (status, _) = break_glass(&app, "glass", "not-the-secret-at-all").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let (status, body) = break_glass(&app, "glass", &secret).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["method"], "break-glass");
    let token = body["token"].as_str().expect("token").to_string();
    // Time-boxed: the configured 30 minutes, not the normal 8 hours.
    let expires = time::OffsetDateTime::parse(
        body["expires_at"].as_str().expect("expiry"),
        &time::format_description::well_known::Rfc3339,
    )
    .expect("time");
    let minutes = (expires - time::OffsetDateTime::now_utc()).whole_minutes();
    assert!((28..=30).contains(&minutes), "{minutes} minutes");

    // It works for operator actions, each one audited as an emergency override (BTG).
    for _ in 0..2 {
        let response = app
            .client
            .get(app.url("/operator/sessions"))
            .bearer_auth(&token)
            .send()
            .await
            .expect("sessions");
        assert_eq!(response.status(), StatusCode::OK);
    }
    let leaves = emergency_leaves(&app).await;
    let actions: Vec<_> = leaves
        .iter()
        .filter(|e| {
            e["outcomeDesc"]
                .as_str()
                .is_some_and(|d| d.contains("GET /operator/sessions"))
        })
        .collect();
    assert_eq!(actions.len(), 2);
    for event in leaves.iter().filter(|e| e["outcome"] == "0") {
        assert_eq!(event["type"]["code"], "110113");
        assert_eq!(
            event["subtype"][0]["system"],
            "http://dicom.nema.org/resources/ontology/DCM"
        );
        assert_eq!(event["purposeOfEvent"][0]["coding"][0]["code"], "BTG");
    }
    assert!(leaves
        .iter()
        .any(|e| e["outcomeDesc"]
            .as_str()
            .is_some_and(|d| d.starts_with("break-glass started")
                && d.contains("identity provider unreachable"))));

    // The one-time secret is spent.
    let (status, _) = break_glass(&app, "glass", &secret).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // The use waits for review; the emergency session cannot review it.
    let uses: Value = app
        .client
        .get(app.url("/operator/break-glass"))
        .bearer_auth(&reviewer)
        .send()
        .await
        .expect("uses")
        .json()
        .await
        .expect("json");
    assert!(leaves_containing(&app, "operator read break-glass uses").await >= 1);
    let used = &uses[0];
    assert_eq!(used["username"], "glass");
    assert!(used["reviewed_at"].is_null());
    assert_eq!(used["overdue"], false);
    assert_eq!(used["actions"], 2, "{used}");
    let id = used["id"].as_str().expect("id");
    let review = |token: String, note: &'static str| {
        let request = app
            .client
            .post(app.url(&format!("/operator/break-glass/{id}/review")))
            .bearer_auth(token)
            .json(&json!({"note": note}));
        async move { request.send().await.expect("review").status() }
    };
    assert_eq!(
        review(token.clone(), "all fine").await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        review(reviewer.clone(), "checked the ticket and the two reads").await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        review(reviewer.clone(), "again").await,
        StatusCode::CONFLICT
    );
    app.stop().await;
}

async fn refused_while_the_second_factor_store_works(engine: Engine) {
    // Default probe: the store holding the second factors. It answers, so no break-glass.
    let app = spawn_app_with(TestEnv::new(engine).await, |config| {
        config.break_glass.review_within_hours = 0;
    })
    .await;
    let state = &app.gateway().state;
    let (_, secret) = state
        .break_glass
        .create_account("glass")
        .await
        .expect("account");
    let (status, body) = break_glass(&app, "glass", &secret).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(state.break_glass.normal_login_outage().await, None);

    // With the key store gone, break-glass opens; an unreviewed use is overdue at once
    // with a review period of zero hours.
    state.keys.close().await;
    assert!(state.break_glass.normal_login_outage().await.is_some());
    let (status, body) = break_glass(&app, "glass", &secret).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let uses = state.break_glass.uses().await.expect("uses");
    assert_eq!(uses.len(), 1);
    assert!(uses[0].overdue);
    assert!(uses[0].outage.contains("key store"));
    app.stop().await;
}
