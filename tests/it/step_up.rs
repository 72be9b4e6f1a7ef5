//! Step-up before far-reaching actions asks for the second factor too, once the account has
//! one: export, transfer and erasure refuse a password alone; a TOTP code, a recovery code
//! or a passkey assertion completes it. Recovering a password does not remove the second
//! factor: the next sign-in still asks for it.

use phr_gateway::audit::AccountRole;
use reqwest::StatusCode;
use serde_json::{json, Value};
use webauthn_authenticator_rs::softpasskey::SoftPasskey;
use webauthn_authenticator_rs::WebauthnAuthenticator;
use webauthn_rs::prelude::Url;

use crate::both_engines;
use crate::helpers::{leaves_containing, post_json, spawn_app, Engine, TestApp, PASSWORD};

both_engines!(
    step_up_needs_the_second_factor_once_enrolled,
    password_recovery_keeps_the_second_factor,
);

async fn post(app: &TestApp, path: &str, token: &str, body: Value) -> (StatusCode, Value) {
    post_json(app, path, Some(token), body).await
}

fn code_in(secret: &str, steps_ahead: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    phr_gateway::mfa::totp::code_at_base32(secret, now + 30 * steps_ahead).expect("code")
}

async fn step_up_needs_the_second_factor_once_enrolled(engine: Engine) {
    let app = spawn_app(engine).await;
    let state = &app.gateway().state;
    let account = state
        .accounts
        .create(AccountRole::Patient, "hanako", PASSWORD, Some("p-step-up"))
        .await
        .expect("account");
    let secret = state
        .second_factors
        .provision_totp(&account)
        .await
        .expect("totp")
        .secret;
    let codes = state
        .second_factors
        .issue_recovery_codes(&account, None)
        .await
        .expect("codes");
    let session = app.sign_in_existing("hanako", Some(&secret)).await;

    // A password alone is not enough any more.
    let (status, body) = post(
        &app,
        "/patient/export",
        &session,
        json!({"password": PASSWORD, "format": "bundle"}),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap_or("")
            .contains("second factor"),
        "{body}"
    );
    let (status, _) = post(
        &app,
        "/patient/export",
        &session,
        json!({"password": PASSWORD, "code": "000000", "format": "bundle"}),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // The next step's code (the current one was spent signing in) completes it.
    let (status, body) = post(
        &app,
        "/patient/export",
        &session,
        json!({"password": PASSWORD, "code": code_in(&secret, 1), "format": "bundle"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["resourceType"], "Bundle");
    assert!(
        leaves_containing(&app, "step-up second factor totp for exporting the record").await >= 1
    );

    // A transfer: refused on the password alone before anything is checked or sent.
    let (status, _) = post(
        &app,
        "/patient/transfers",
        &session,
        json!({"client_id": "nobody", "transfer_code": "x", "categories": ["immunizations"],
               "password": PASSWORD}),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // A passkey assertion works as the step-up's second factor as well.
    let mut authenticator = SoftPasskey::new(true);
    let origin = Url::parse(&app.base).expect("origin");
    let (_, challenge) = post(
        &app,
        "/auth/factors/passkeys/start",
        &session,
        json!({"password": PASSWORD}),
    )
    .await;
    let created = authenticator
        .do_registration(
            origin.clone(),
            serde_json::from_value(challenge["options"].clone()).expect("options"),
        )
        .expect("register");
    let (status, _) = post(
        &app,
        "/auth/factors/passkeys/finish",
        &session,
        json!({"ceremony": challenge["ceremony"], "name": "phone", "credential": created}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (_, challenge) = post(&app, "/auth/step-up/passkey/start", &session, json!({})).await;
    let asserted = authenticator
        .do_authentication(
            origin,
            serde_json::from_value(challenge["options"].clone()).expect("options"),
        )
        .expect("assert");
    let (status, body) = post(
        &app,
        "/patient/export",
        &session,
        json!({"password": PASSWORD, "format": "bundle",
               "passkey": {"ceremony": challenge["ceremony"], "credential": asserted}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // Erasure with a recovery code.
    let (status, body) = post(
        &app,
        "/patient/erasure",
        &session,
        json!({"password": PASSWORD}),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let (status, body) = post(
        &app,
        "/patient/erasure",
        &session,
        json!({"password": PASSWORD, "code": codes[0]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    app.stop().await;
}

async fn password_recovery_keeps_the_second_factor(engine: Engine) {
    let app = spawn_app(engine).await;
    let _ = app.sign_in(AccountRole::Operator, "op", None).await;
    let state = &app.gateway().state;
    // The administrator resets a forgotten password; the second factor stays.
    state
        .accounts
        .set_password("op", "a brand new long password")
        .await
        .expect("reset");
    let response = app
        .client
        .post(app.url("/auth/login"))
        .json(&json!({"username": "op", "password": "a brand new long password"}))
        .send()
        .await
        .expect("login");
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["stage"], "second-factor");
    let token = body["token"].as_str().expect("token");
    let operator = app
        .client
        .get(app.url("/operator/sessions"))
        .bearer_auth(token)
        .send()
        .await
        .expect("request");
    assert_eq!(operator.status(), StatusCode::UNAUTHORIZED);
    app.stop().await;
}
