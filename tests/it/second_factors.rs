//! Second factors end to end on both engines: no operator action works without one; TOTP
//! codes are single use within their window; wrong, replayed and expired codes fail and
//! count towards the lockout; recovery codes work once; passkeys (a software authenticator)
//! register after a password step-up, sign a patient in alone, and a counter that goes
//! backwards (a cloned key) is refused; an operator ends another account's session.

use phr_gateway::audit::AccountRole;
use reqwest::StatusCode;
use serde_json::{json, Value};
use webauthn_authenticator_rs::softpasskey::SoftPasskey;
use webauthn_authenticator_rs::WebauthnAuthenticator;
use webauthn_rs::prelude::Url;

use crate::both_engines;
use crate::helpers::{
    count, leaves_containing, post_json as post, spawn_app, totp_code, Engine, TestApp, PASSWORD,
};

both_engines!(
    operators_need_a_second_factor_and_codes_work_once,
    recovery_codes_and_lockout,
    passkeys_register_sign_in_and_refuse_a_cloned_key,
    operators_end_sessions,
);

async fn login(app: &TestApp, username: &str) -> (StatusCode, Value) {
    post(
        app,
        "/auth/login",
        None,
        json!({"username": username, "password": PASSWORD}),
    )
    .await
}

async fn operator_status(app: &TestApp, token: &str) -> StatusCode {
    app.client
        .get(app.url("/operator/sessions"))
        .bearer_auth(token)
        .send()
        .await
        .expect("operator request")
        .status()
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

async fn operators_need_a_second_factor_and_codes_work_once(engine: Engine) {
    let app = spawn_app(engine).await;
    let state = &app.gateway().state;

    // An operator without any second factor cannot sign in at all.
    state
        .accounts
        .create(AccountRole::Operator, "bare-op", PASSWORD, None)
        .await
        .expect("create");
    let (status, body) = login(&app, "bare-op").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");

    let account = state
        .accounts
        .create(AccountRole::Operator, "op", PASSWORD, None)
        .await
        .expect("create");
    let secret = state
        .second_factors
        .provision_totp(&account)
        .await
        .expect("totp")
        .secret;

    // The password alone gives a session that owes its second factor: no operator action.
    let (status, body) = login(&app, "op").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["stage"], "second-factor");
    assert_eq!(body["second_factor_methods"], json!(["totp"]));
    let pending = body["token"].as_str().expect("token").to_string();
    assert_eq!(
        operator_status(&app, &pending).await,
        StatusCode::UNAUTHORIZED
    );
    let session = app
        .client
        .get(app.url("/auth/session"))
        .bearer_auth(&pending)
        .send()
        .await
        .expect("session");
    assert_eq!(session.status(), StatusCode::UNAUTHORIZED);

    // Wrong, malformed and expired codes fail.
    let expired = phr_gateway::mfa::totp::code_at_base32(&secret, now_secs() - 120).expect("code");
    let current = totp_code(&secret);
    for code in ["000000", "12345", "abcdef", expired.as_str()] {
        if code == current {
            continue;
        }
        let (status, body) = post(
            &app,
            "/auth/second-factor/totp",
            Some(&pending),
            json!({"code": code}),
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "code {code}: {body}");
        assert!(body["detail"].is_string(), "a problem document: {body}");
    }
    assert_eq!(
        operator_status(&app, &pending).await,
        StatusCode::UNAUTHORIZED
    );

    // The right code completes the session.
    let (status, body) = post(
        &app,
        "/auth/second-factor/totp",
        Some(&pending),
        json!({"code": current}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["stage"], "complete");
    assert_eq!(body["method"], "password+totp");
    assert_eq!(operator_status(&app, &pending).await, StatusCode::OK);

    // The same code again (a replay, on a fresh password sign-in) is refused.
    let (_, body) = login(&app, "op").await;
    let second = body["token"].as_str().expect("token").to_string();
    let (status, _) = post(
        &app,
        "/auth/second-factor/totp",
        Some(&second),
        json!({"code": current}),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        operator_status(&app, &second).await,
        StatusCode::UNAUTHORIZED
    );
    assert!(leaves_containing(&app, "TOTP code already used").await >= 1);
    assert!(leaves_containing(&app, "wrong TOTP code").await >= 4);
    assert!(leaves_containing(&app, "second factor totp").await >= 1);

    // A complete session owes nothing: proving again is a conflict, not a second use.
    let (status, _) = post(
        &app,
        "/auth/second-factor/totp",
        Some(&pending),
        json!({"code": "000000"}),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT);
    app.stop().await;
}

async fn recovery_codes_and_lockout(engine: Engine) {
    let app = spawn_app(engine).await;
    let operator = app.sign_in(AccountRole::Operator, "op", None).await;

    // New codes need the password again.
    let (status, _) = post(
        &app,
        "/auth/factors/recovery-codes",
        Some(&operator),
        json!({"password": "not the password"}),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, body) = post(
        &app,
        "/auth/factors/recovery-codes",
        Some(&operator),
        json!({"password": PASSWORD}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let codes: Vec<String> = serde_json::from_value(body["recovery_codes"].clone()).expect("codes");
    assert_eq!(codes.len(), 10);
    assert_eq!(
        count(
            &app,
            "SELECT COUNT(*) FROM recovery_codes WHERE used_at IS NULL"
        )
        .await,
        10
    );
    // Only hashes are stored.
    let stored = count(
        &app,
        &format!(
            "SELECT COUNT(*) FROM recovery_codes WHERE code_hash = '{}'",
            codes[0]
        ),
    )
    .await;
    assert_eq!(stored, 0);

    // A recovery code completes a sign-in once.
    let (_, body) = login(&app, "op").await;
    let pending = body["token"].as_str().expect("token").to_string();
    let (status, body) = post(
        &app,
        "/auth/second-factor/recovery-code",
        Some(&pending),
        json!({"code": codes[3].to_lowercase()}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["method"], "password+recovery-code");
    let (_, body) = login(&app, "op").await;
    let again = body["token"].as_str().expect("token").to_string();
    let (status, _) = post(
        &app,
        "/auth/second-factor/recovery-code",
        Some(&again),
        json!({"code": codes[3]}),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // Failed second factors lock the account like wrong passwords (five by default).
    for _ in 0..4 {
        let (status, _) = post(
            &app,
            "/auth/second-factor/totp",
            Some(&again),
            json!({"code": "000000"}),
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    let (status, body) = post(
        &app,
        "/auth/second-factor/recovery-code",
        Some(&again),
        json!({"code": codes[4]}),
    )
    .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert!(leaves_containing(&app, "account locked").await >= 1);
    app.stop().await;
}

fn origin(app: &TestApp) -> Url {
    Url::parse(&app.base).expect("origin")
}

async fn register_passkey(app: &TestApp, token: &str, authenticator: &mut SoftPasskey) -> Value {
    let (status, challenge) = post(
        app,
        "/auth/factors/passkeys/start",
        Some(token),
        json!({"password": PASSWORD}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{challenge}");
    let options = serde_json::from_value(challenge["options"].clone()).expect("creation options");
    let credential = authenticator
        .do_registration(origin(app), options)
        .expect("software authenticator registers");
    let (status, body) = post(
        app,
        "/auth/factors/passkeys/finish",
        Some(token),
        json!({"ceremony": challenge["ceremony"], "name": "test key", "credential": credential}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

async fn passkey_sign_in(
    app: &TestApp,
    username: &str,
    authenticator: &mut SoftPasskey,
) -> (StatusCode, Value) {
    let (status, challenge) = post(
        app,
        "/auth/passkey/start",
        None,
        json!({"username": username}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{challenge}");
    let options = serde_json::from_value(challenge["options"].clone()).expect("request options");
    let credential = authenticator
        .do_authentication(origin(app), options)
        .expect("software authenticator asserts");
    post(
        app,
        "/auth/passkey/finish",
        None,
        json!({"username": username, "ceremony": challenge["ceremony"], "credential": credential}),
    )
    .await
}

async fn passkeys_register_sign_in_and_refuse_a_cloned_key(engine: Engine) {
    let app = spawn_app(engine).await;
    let patient = app
        .sign_in(AccountRole::Patient, "hanako", Some("patient-hanako"))
        .await;

    // Registering needs the password again; a wrong one registers nothing.
    let (status, _) = post(
        &app,
        "/auth/factors/passkeys/start",
        Some(&patient),
        json!({"password": "wrong password!"}),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let mut authenticator = SoftPasskey::new(true);
    let enrolled = register_passkey(&app, &patient, &mut authenticator).await;
    assert_eq!(enrolled["passkey"]["name"], "test key");
    // The first factor comes with recovery codes.
    assert_eq!(
        enrolled["recovery_codes"].as_array().map(Vec::len),
        Some(10)
    );

    // A patient with a passkey now owes a second factor after the password.
    let (_, body) = login(&app, "hanako").await;
    assert_eq!(body["stage"], "second-factor");
    assert_eq!(
        body["second_factor_methods"],
        json!(["passkey", "recovery-code"])
    );
    let pending = body["token"].as_str().expect("token").to_string();
    let resources = app
        .client
        .get(app.url("/auth/session"))
        .bearer_auth(&pending)
        .send()
        .await
        .expect("resources");
    assert_eq!(resources.status(), StatusCode::UNAUTHORIZED);

    // The passkey alone signs in.
    let (status, body) = passkey_sign_in(&app, "hanako", &mut authenticator).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["method"], "passkey");
    let token = body["token"].as_str().expect("token");
    let resources = app
        .client
        .get(app.url("/auth/session"))
        .bearer_auth(token)
        .send()
        .await
        .expect("resources");
    assert_eq!(resources.status(), StatusCode::OK);

    // A ceremony works once: replaying the same assertion fails.
    let (_, challenge) = post(
        &app,
        "/auth/passkey/start",
        None,
        json!({"username": "hanako"}),
    )
    .await;
    let options = serde_json::from_value(challenge["options"].clone()).expect("options");
    let credential = authenticator
        .do_authentication(origin(&app), options)
        .expect("assert");
    let finish =
        json!({"username": "hanako", "ceremony": challenge["ceremony"], "credential": credential});
    let (status, _) = post(&app, "/auth/passkey/finish", None, finish.clone()).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = post(&app, "/auth/passkey/finish", None, finish).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // A clone of the key has been used elsewhere: the stored counter is ahead of what this
    // authenticator presents next, so its assertion is refused.
    let state = &app.gateway().state;
    sqlx::query("UPDATE passkeys SET counter = counter + 1000")
        .execute(state.db.write_pool())
        .await
        .expect("advance counter");
    let (status, body) = passkey_sign_in(&app, "hanako", &mut authenticator).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(leaves_containing(&app, "possibly a cloned authenticator").await >= 1);

    // A passkey of another authenticator is not this account's.
    let mut other = SoftPasskey::new(true);
    let (_, challenge) = post(
        &app,
        "/auth/passkey/start",
        None,
        json!({"username": "hanako"}),
    )
    .await;
    let options = serde_json::from_value(challenge["options"].clone()).expect("options");
    assert!(other.do_authentication(origin(&app), options).is_err());
    app.stop().await;
}

async fn operators_end_sessions(engine: Engine) {
    let app = spawn_app(engine).await;
    let operator = app.sign_in(AccountRole::Operator, "op", None).await;
    let patient = app
        .sign_in(AccountRole::Patient, "taro", Some("patient-taro"))
        .await;
    let sessions: Value = app
        .client
        .get(app.url("/operator/sessions"))
        .bearer_auth(&operator)
        .send()
        .await
        .expect("sessions")
        .json()
        .await
        .expect("json");
    let list = sessions.as_array().expect("list");
    assert!(list.iter().all(|s| s.get("token").is_none()));
    let taro = list
        .iter()
        .find(|s| s["username"] == "taro")
        .expect("taro's session listed");
    assert_eq!(taro["method"], "password");
    let id = taro["session_id"].as_str().expect("id");

    // A patient cannot end sessions; an operator can, at once.
    let (status, _) = post(
        &app,
        &format!("/operator/sessions/{id}/end"),
        Some(&patient),
        json!({}),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = post(
        &app,
        &format!("/operator/sessions/{id}/end"),
        Some(&operator),
        json!({}),
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let resources = app
        .client
        .get(app.url("/auth/session"))
        .bearer_auth(&patient)
        .send()
        .await
        .expect("resources");
    assert_eq!(resources.status(), StatusCode::UNAUTHORIZED);
    assert!(leaves_containing(&app, "ended by an operator").await >= 1);
    assert!(leaves_containing(&app, "operator read live sessions").await >= 1);
    let (status, _) = post(
        &app,
        "/operator/sessions/0000000000000000/end",
        Some(&operator),
        json!({}),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    app.stop().await;
}
