//! Consent through the authorize flow, end to end on both engines: a PHR app sends the
//! patient to the consent screen; the patient picks two of three purposes and two data
//! categories; the app exchanges its code and reads `/fhir/Patient/{id}`; every read asks
//! the consent as committed now (a narrowed consent stops what it no longer covers, with
//! the same token); a withdrawal stops the very next request, in this process and in a
//! second one on the same database; a declined request is not asked again.

use phr_adapters::fhir_r4::BackendKey;
use phr_adapters::oauth::pkce_s256_pair;
use phr_gateway::audit::{AccountRole, Agent};
use phr_gateway::store::resources::{NewResource, SourceIdentity};
use phr_gateway::Gateway;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::both_engines;
use crate::helpers::{get_json, jwks, leaves_containing, Engine};
use crate::oauth::{env, location, query_of, Env, REDIRECT};

both_engines!(
    the_app_reads_under_the_consent_until_it_is_withdrawn,
    a_declined_app_is_not_asked_again,
    a_representative_agrees_for_someone_else_only_after_a_step_up,
);

const SCOPE: &str =
    "launch/patient openid fhirUser patient/Patient.rs patient/Observation.rs offline_access";

async fn store_patient(env: &Env) {
    env.app
        .gateway()
        .state
        .resources
        .put(
            &Agent::system(),
            NewResource {
                patient_id: "p-hanako".into(),
                category: "demographics".into(),
                source: SourceIdentity {
                    source: "hospital".into(),
                    resource_type: "Patient".into(),
                    source_resource_id: "pt-1".into(),
                    version_id: Some("1".into()),
                },
                body: json!({"resourceType": "Patient", "id": "pt-1", "name": [{"text": "山田 花子"}]})
                    .to_string()
                    .into_bytes(),
            },
        )
        .await
        .expect("patient");
}

/// The app's authorize request; returns the consent screen path and the PKCE verifier.
async fn ask(env: &Env, client_id: &str) -> (String, String) {
    let (verifier, challenge) = pkce_s256_pair();
    let mut params = env.authorize_params(client_id, &challenge);
    for (name, value) in params.iter_mut() {
        if name == "scope" {
            *value = SCOPE.into();
        }
    }
    let response = env.authorize(&params).await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    (location(&response), verifier)
}

async fn answer(env: &Env, token: &str, screen: &str, form: &[(&str, &str)]) -> reqwest::Response {
    env.browser
        .post(env.url(screen))
        .bearer_auth(token)
        .header("origin", env.app.base.clone())
        .form(form)
        .send()
        .await
        .expect("answer")
}

async fn read(env: &Env, base: &str, access_token: &str, patient: &str) -> reqwest::Response {
    env.app
        .client
        .get(format!("{base}/fhir/Patient/{patient}"))
        .bearer_auth(access_token)
        .send()
        .await
        .expect("read")
}

async fn the_app_reads_under_the_consent_until_it_is_withdrawn(engine: Engine) {
    let env = env(engine).await;
    let key = BackendKey::generate_es384();
    let client_id = env.key_client(&key).await;
    let patient = env
        .app
        .sign_in(AccountRole::Patient, "hanako", Some("p-hanako"))
        .await;
    store_patient(&env).await;

    // The consent screen: who asks, the notice, one box per purpose and category, none ticked.
    let (screen, verifier) = ask(&env, &client_id).await;
    assert!(screen.starts_with("/consent/authorize/"), "{screen}");
    let page = env
        .browser
        .get(env.url(&screen))
        .bearer_auth(&patient)
        .send()
        .await
        .expect("screen");
    assert_eq!(page.status(), StatusCode::OK);
    let html = page.text().await.expect("html");
    assert!(html.contains("けんこう手帳アプリ") && html.contains("株式会社ヘルスケア"));
    assert!(html.contains("class=\"notice\""));
    assert_eq!(html.matches("name=\"purpose\"").count(), 3);
    assert_eq!(
        html.matches("name=\"category\"").count(),
        2,
        "Patient and Observation"
    );
    assert!(!html.contains("checked"), "nothing pre-ticked");

    // Agreeing with nothing chosen is refused on the screen, and nothing is granted.
    let empty = answer(&env, &patient, &screen, &[("action", "grant")]).await;
    assert_eq!(empty.status(), StatusCode::BAD_REQUEST);
    // A category the app did not ask for (a tampered form) is refused.
    let ends_on = (time::OffsetDateTime::now_utc() + time::Duration::days(60))
        .date()
        .to_string();
    let tampered = answer(
        &env,
        &patient,
        &screen,
        &[
            ("action", "grant"),
            ("purpose", "PATRQT"),
            ("category", "medications"),
            ("ends_on", &ends_on),
        ],
    )
    .await;
    assert_eq!(tampered.status(), StatusCode::BAD_REQUEST);
    // From another site (CSRF): refused.
    let forged = env
        .browser
        .post(env.url(&screen))
        .bearer_auth(&patient)
        .header("origin", "https://evil.example")
        .form(&[("action", "grant")])
        .send()
        .await
        .expect("forged");
    assert_eq!(forged.status(), StatusCode::FORBIDDEN);

    // Two of three purposes, both categories, and access while away.
    let agreed = answer(
        &env,
        &patient,
        &screen,
        &[
            ("action", "grant"),
            ("purpose", "PATRQT"),
            ("purpose", "TREAT"),
            ("category", "demographics"),
            ("category", "observations"),
            ("offline", "yes"),
            ("ends_on", &ends_on),
        ],
    )
    .await;
    assert_eq!(agreed.status(), StatusCode::SEE_OTHER);
    let back = location(&agreed);
    assert!(back.starts_with(REDIRECT), "{back}");
    let params = query_of(&back);
    assert_eq!(params["state"], "st-123");
    let (status, tokens) = env
        .exchange(&key, &client_id, &params["code"], &verifier)
        .await;
    assert_eq!(status, StatusCode::OK, "{tokens}");
    assert_eq!(tokens["patient"], "p-hanako");
    let scope = tokens["scope"].as_str().expect("scope");
    assert!(
        scope.contains("patient/Patient.rs") && scope.contains("offline_access"),
        "{scope}"
    );
    let access = tokens["access_token"].as_str().expect("access").to_string();
    // The ID token says who the patient is, signed with a key in the gateway's JWKS.
    let id_token = tokens["id_token"].as_str().expect("id_token");
    let jwks = jwks(&env.app).await;
    let header = jsonwebtoken::decode_header(id_token).expect("header");
    assert_eq!(header.alg, jsonwebtoken::Algorithm::ES384);
    let jwk = jwks
        .find(header.kid.as_deref().expect("kid"))
        .expect("key in jwks");
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES384);
    validation.set_audience(&[client_id.as_str()]);
    validation.set_issuer(&[env.app.base.as_str()]);
    let claims = jsonwebtoken::decode::<Value>(
        id_token,
        &jsonwebtoken::DecodingKey::from_jwk(jwk).expect("key"),
        &validation,
    )
    .expect("a valid ID token")
    .claims;
    assert_eq!(claims["sub"], "p-hanako");
    assert_eq!(
        claims["fhirUser"],
        format!("{}/fhir/Patient/p-hanako", env.app.base)
    );
    assert!(tokens["expires_in"].as_i64().is_some_and(|s| s <= 300));

    // The consent the patient gave: two purposes, recorded with its receipt.
    let consents = get_json(&env.app, "/api/consents", &patient).await;
    assert_eq!(consents[0]["purposes"], json!(["PATRQT", "TREAT"]));
    let consent_id = consents[0]["id"].as_str().expect("id").to_string();

    // The app reads.
    let read_ok = read(&env, &env.app.base, &access, "p-hanako").await;
    assert_eq!(read_ok.status(), StatusCode::OK);
    let body: Value = read_ok.json().await.expect("json");
    assert_eq!(body["resourceType"], "Patient");
    assert_eq!(body["id"], "p-hanako");
    let other = read(&env, &env.app.base, &access, "p-taro").await;
    assert_eq!(other.status(), StatusCode::FORBIDDEN);
    assert_eq!(other.headers()["content-type"], "application/fhir+json");

    // Narrowed to observations: the same token can no longer read the Patient.
    let changed = env
        .app
        .client
        .post(env.url(&format!("/api/consents/{consent_id}/change")))
        .bearer_auth(&patient)
        .json(&json!({"purposes": ["PATRQT"], "categories": ["observations"], "ends_on": ends_on}))
        .send()
        .await
        .expect("change");
    assert_eq!(changed.status(), StatusCode::OK);
    let narrowed = read(&env, &env.app.base, &access, "p-hanako").await;
    assert_eq!(narrowed.status(), StatusCode::FORBIDDEN);
    let outcome: Value = narrowed.json().await.expect("outcome");
    assert_eq!(outcome["resourceType"], "OperationOutcome");

    // Widened again, read again; then withdrawn: the next request fails here and in a
    // second process on the same database, and the refresh token is dead.
    let widened = env
        .app
        .client
        .post(env.url(&format!("/api/consents/{consent_id}/change")))
        .bearer_auth(&patient)
        .json(&json!({"purposes": ["PATRQT"], "categories": ["demographics", "observations"], "ends_on": ends_on}))
        .send()
        .await
        .expect("change");
    assert_eq!(widened.status(), StatusCode::OK);
    assert_eq!(
        read(&env, &env.app.base, &access, "p-hanako")
            .await
            .status(),
        StatusCode::OK
    );
    // PostgreSQL is the scale-out store: a second gateway process shares it. (SQLite is the
    // one-process embedded store.)
    let second = match engine {
        Engine::Postgres => Some(
            Gateway::build(env.app.env().config())
                .await
                .expect("second process")
                .start()
                .await
                .expect("start"),
        ),
        Engine::Sqlite => None,
    };
    let mut bases = vec![env.app.base.clone()];
    if let Some(second) = &second {
        bases.push(format!("https://localhost:{}", second.addr.port()));
    }
    for base in &bases {
        assert_eq!(
            read(&env, base, &access, "p-hanako").await.status(),
            StatusCode::OK
        );
    }

    let withdrawn = env
        .app
        .client
        .post(env.url(&format!("/api/consents/{consent_id}/withdraw")))
        .bearer_auth(&patient)
        .send()
        .await
        .expect("withdraw");
    assert_eq!(withdrawn.status(), StatusCode::OK);
    // No sleep: the very next request fails, on every process.
    for base in bases.iter().rev() {
        assert_eq!(
            read(&env, base, &access, "p-hanako").await.status(),
            StatusCode::UNAUTHORIZED
        );
    }
    let refresh = tokens["refresh_token"].as_str().expect("refresh");
    let (status, body) = env.refresh(&key, &client_id, refresh, None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"], "invalid_grant");
    assert!(leaves_containing(&env.app, "denied").await >= 1);
    if let Some(second) = second {
        second.stop().await;
    }
    env.stop().await;
}

async fn a_declined_app_is_not_asked_again(engine: Engine) {
    let env = env(engine).await;
    let key = BackendKey::generate_es384();
    let client_id = env.key_client(&key).await;
    let patient = env
        .app
        .sign_in(AccountRole::Patient, "hanako", Some("p-hanako"))
        .await;
    let (screen, _) = ask(&env, &client_id).await;
    let declined = answer(&env, &patient, &screen, &[("action", "decline")]).await;
    assert_eq!(declined.status(), StatusCode::SEE_OTHER);
    let back = query_of(&location(&declined));
    assert_eq!(back["error"], "access_denied");

    // The same app asks again for the same: sent straight back, no screen.
    let (screen, _) = ask(&env, &client_id).await;
    let again = env
        .browser
        .get(env.url(&screen))
        .bearer_auth(&patient)
        .send()
        .await
        .expect("screen");
    assert_eq!(again.status(), StatusCode::SEE_OTHER);
    assert_eq!(query_of(&location(&again))["error"], "access_denied");
    assert!(leaves_containing(&env.app, "declined").await >= 2);
    env.stop().await;
}

/// A parent agreeing on the consent screen for their child proves themself again (password,
/// and second factor when they have one); declining needs nothing.
async fn a_representative_agrees_for_someone_else_only_after_a_step_up(engine: Engine) {
    let env = env(engine).await;
    let key = BackendKey::generate_es384();
    let client_id = env.key_client(&key).await;
    let operator = env.operator.clone();
    let parent = env
        .app
        .sign_in(AccountRole::Patient, "hanako", Some("p-hanako"))
        .await;
    let born = (time::OffsetDateTime::now_utc() - time::Duration::days(365 * 8))
        .date()
        .to_string();
    let registered = env
        .app
        .client
        .post(env.url("/operator/representations"))
        .bearer_auth(&operator)
        .json(
            &json!({"representative_patient_id": "p-hanako", "represented_patient_id": "p-child",
               "kind": "parent-of-dependent", "represented_birth_date": born}),
        )
        .send()
        .await
        .expect("register");
    assert_eq!(registered.status(), StatusCode::CREATED);

    let (screen, _) = ask(&env, &client_id).await;
    let as_parent = |form: Vec<(&'static str, String)>| {
        env.browser
            .post(env.url(&screen))
            .bearer_auth(&parent)
            .header("acting-for", "p-child")
            .header("origin", env.app.base.clone())
            .form(&form)
            .send()
    };
    let page = env
        .browser
        .get(env.url(&screen))
        .bearer_auth(&parent)
        .header("acting-for", "p-child")
        .send()
        .await
        .expect("screen")
        .text()
        .await
        .expect("html");
    assert!(
        page.contains("name=\"password\""),
        "the screen asks the representative to confirm"
    );
    let ends_on = (time::OffsetDateTime::now_utc() + time::Duration::days(60))
        .date()
        .to_string();
    let grant = |password: Option<&str>| {
        let mut form = vec![
            ("action", "grant".to_string()),
            ("purpose", "PATRQT".to_string()),
            ("category", "demographics".to_string()),
            ("ends_on", ends_on.clone()),
        ];
        if let Some(password) = password {
            form.push(("password", password.to_string()));
        }
        form
    };
    let refused = as_parent(grant(None)).await.expect("grant");
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    let wrong = as_parent(grant(Some("not my password")))
        .await
        .expect("grant");
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    let consents = env
        .app
        .gateway()
        .state
        .consents
        .list("p-child")
        .await
        .expect("list");
    assert!(consents.is_empty(), "nothing granted without the step-up");
    let agreed = as_parent(grant(Some(crate::helpers::PASSWORD)))
        .await
        .expect("grant");
    assert_eq!(agreed.status(), StatusCode::SEE_OTHER);
    let consents = env
        .app
        .gateway()
        .state
        .consents
        .list("p-child")
        .await
        .expect("list");
    assert_eq!(consents.len(), 1);
    assert!(
        leaves_containing(
            &env.app,
            "step-up re-authentication for agreeing to a disclosure for someone else"
        )
        .await
            >= 1
    );
}
