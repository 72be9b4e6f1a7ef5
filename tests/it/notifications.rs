//! Notifications to recipients end to end on both engines: an operator registers a
//! client's webhook; new data, a withdrawal and an expiry each reach it as a Security Event
//! Token signed with the gateway's key (checked against the JWKS, audience the client);
//! failed deliveries are retried with the same `jti` and given up after the last attempt;
//! the recipient acknowledges deletion with its own token, recorded once and audited.

use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode as AxumStatus};
use axum::routing::post;
use phr_adapters::fhir_r4::BackendKey;
use phr_consent::{DataCategory, Performer, PersonRef};
use phr_gateway::audit::AccountRole;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::both_engines;
use crate::helpers::{
    count, grant_consent, jwks, leaves_containing, portal_checkup_document, Engine,
};
use crate::oauth::{env_with, Env};

both_engines!(recipients_hear_of_new_data_withdrawals_and_expiries,);

const PATIENT: &str = "patient-1";

/// A recipient's endpoint: records what arrives; fails the first `failures` requests.
#[derive(Clone, Default)]
struct Receiver {
    received: Arc<Mutex<Vec<(String, String)>>>,
    failures: Arc<Mutex<u32>>,
}

async fn receive(State(receiver): State<Receiver>, headers: HeaderMap, body: String) -> AxumStatus {
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    receiver
        .received
        .lock()
        .expect("lock")
        .push((content_type, body));
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
        .route("/hook", post(receive))
        .with_state(receiver.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (receiver, url)
}

/// The claims of a Security Event Token, its signature checked against the gateway's JWKS
/// and its audience against `client_id`.
async fn set_claims(env: &Env, token: &str, client_id: &str) -> Value {
    let jwks = jwks(&env.app).await;
    let header = jsonwebtoken::decode_header(token).expect("jws header");
    let jwk = jwks
        .find(header.kid.as_deref().expect("kid"))
        .expect("key in jwks");
    let key = jsonwebtoken::DecodingKey::from_jwk(jwk).expect("key");
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::EdDSA);
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.set_audience(&[client_id]);
    jsonwebtoken::decode::<Value>(token, &key, &validation)
        .expect("a valid SET for this client")
        .claims
}

async fn register_webhook(env: &Env, client_id: &str, url: &str) -> StatusCode {
    env.app
        .client
        .put(env.url(&format!("/operator/clients/{client_id}/webhook")))
        .bearer_auth(&env.operator)
        .json(&json!({"url": url}))
        .send()
        .await
        .expect("register")
        .status()
}

async fn deliver(env: &Env) -> phr_gateway::notifications::delivery::Round {
    env.app
        .gateway()
        .state
        .notifications
        .deliver_due()
        .await
        .expect("deliver")
}

async fn make_due(env: &Env) {
    sqlx::query("UPDATE notifications SET next_attempt_at = 0 WHERE status = 'pending'")
        .execute(env.app.gateway().state.db.write_pool())
        .await
        .expect("due");
}

fn last_event(receiver: &Receiver) -> (String, String) {
    receiver
        .received
        .lock()
        .expect("lock")
        .last()
        .cloned()
        .expect("something arrived")
}

async fn recipients_hear_of_new_data_withdrawals_and_expiries(engine: Engine) {
    let env = env_with(engine, |c| c.notifications.deliver = false).await;
    let (receiver, url) = start_receiver().await;
    let key = BackendKey::generate_es384();
    let client_id = env.key_client(&key).await;
    assert_eq!(
        register_webhook(&env, &client_id, "http://example.com/hook").await,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        register_webhook(&env, "no-such-client", &url).await,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        register_webhook(&env, &client_id, &url).await,
        StatusCode::NO_CONTENT
    );
    let (consent_id, _) = grant_consent(
        &env.app,
        PATIENT,
        Performer::patient(&PersonRef::new(PATIENT)),
        &client_id,
        &["PATRQT"],
        &[DataCategory::Documents, DataCategory::Observations],
        30,
    )
    .await;
    let session = env
        .app
        .sign_in(AccountRole::Patient, "patient1", Some(PATIENT))
        .await;

    // New data: a checkup arrives; the first delivery fails and is retried with the same jti.
    let cda = portal_checkup_document();
    let upload = |body: String| {
        env.app
            .client
            .post(env.url("/patient/checkups"))
            .bearer_auth(&session)
            .header("content-type", "application/hl7-v3+xml")
            .body(body)
            .send()
    };
    assert_eq!(
        upload(cda.clone()).await.expect("upload").status(),
        StatusCode::CREATED
    );
    *receiver.failures.lock().expect("lock") = 1;
    let round = deliver(&env).await;
    assert_eq!((round.delivered, round.retried), (0, 1));
    assert_eq!(
        deliver(&env).await.delivered,
        0,
        "not due before its backoff"
    );
    make_due(&env).await;
    assert_eq!(deliver(&env).await.delivered, 1);
    let arrived = receiver.received.lock().expect("lock").clone();
    assert_eq!(arrived.len(), 2);
    assert_eq!(arrived[1].0, "application/secevent+jwt");
    let first = set_claims(&env, &arrived[0].1, &client_id).await;
    let second = set_claims(&env, &arrived[1].1, &client_id).await;
    assert_eq!(first["jti"], second["jti"], "a retry is the same event");
    let new_data = &second["events"]["urn:phr-gateway:event:new-data"];
    assert_eq!(new_data["patient"], PATIENT);
    assert_eq!(new_data["consent"], consent_id.as_str());
    assert_eq!(new_data["categories"], json!(["documents"]));
    // The same checkup again is no news.
    assert_eq!(
        upload(cda.clone()).await.expect("upload").status(),
        StatusCode::CREATED
    );
    assert_eq!(deliver(&env).await.delivered, 0);

    // The patient withdraws: the recipient is asked to stop, delete and acknowledge.
    let withdrawn = env
        .app
        .client
        .post(env.url(&format!("/api/consents/{consent_id}/withdraw")))
        .bearer_auth(&session)
        .send()
        .await
        .expect("withdraw");
    assert_eq!(withdrawn.status(), StatusCode::OK);
    assert_eq!(deliver(&env).await.delivered, 1);
    let (_, token) = last_event(&receiver);
    let claims = set_claims(&env, &token, &client_id).await;
    let event = &claims["events"]["urn:phr-gateway:event:consent-withdrawn"];
    assert_eq!(event["action"], "stop-use-and-delete");
    assert!(event["message"]["ja"]
        .as_str()
        .is_some_and(|m| m.contains("削除")));
    let acknowledge = event["acknowledge"].as_str().expect("acknowledge link");
    let notification = claims["jti"].as_str().expect("jti").to_string();
    assert!(acknowledge.ends_with(&format!(
        "/recipient/notifications/{notification}/acknowledge"
    )));

    // Acknowledged with the client's own (client-credentials) token; once.
    let (status, _, body) = env
        .with_key(
            "/oauth/token",
            &key,
            &client_id,
            &[
                ("grant_type", "client_credentials"),
                ("scope", "system/Observation.rs"),
            ],
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let client_token = body["access_token"].as_str().expect("token").to_string();
    let ack = |token: String, id: String| {
        let client = env.app.client.clone();
        let url = env.url(&format!("/recipient/notifications/{id}/acknowledge"));
        async move {
            client
                .post(url)
                .bearer_auth(token)
                .send()
                .await
                .expect("ack")
        }
    };
    let first_ack = ack(client_token.clone(), notification.clone()).await;
    assert_eq!(first_ack.status(), StatusCode::OK);
    let first_at: Value = first_ack.json().await.expect("json");
    let again: Value = ack(client_token.clone(), notification.clone())
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(first_at["acknowledged_at"], again["acknowledged_at"]);
    assert_eq!(
        ack(client_token.clone(), "no-such-notification".into())
            .await
            .status(),
        StatusCode::NOT_FOUND
    );
    let other_key = BackendKey::generate_es384();
    let other_client = env.key_client(&other_key).await;
    let (_, _, body) = env
        .with_key(
            "/oauth/token",
            &other_key,
            &other_client,
            &[
                ("grant_type", "client_credentials"),
                ("scope", "system/Observation.rs"),
            ],
        )
        .await;
    let other_token = body["access_token"].as_str().expect("token").to_string();
    assert_eq!(
        ack(other_token, notification.clone()).await.status(),
        StatusCode::NOT_FOUND,
        "not another client's"
    );
    assert!(
        leaves_containing(
            &env.app,
            &format!("notification {notification} for consent {consent_id} acknowledged")
        )
        .await
            >= 1
    );

    // Expiry: a consent whose period ended is announced once.
    let (expiring, _) = grant_consent(
        &env.app,
        PATIENT,
        Performer::patient(&PersonRef::new(PATIENT)),
        &client_id,
        &["PATRQT"],
        &[DataCategory::Observations],
        30,
    )
    .await;
    let db = &env.app.gateway().state.db;
    sqlx::query("UPDATE consents SET period_end = 1 WHERE id = $1")
        .bind(&expiring)
        .execute(db.write_pool())
        .await
        .expect("expire");
    assert_eq!(
        phr_gateway::notifications::queue_expired(db)
            .await
            .expect("queue"),
        1
    );
    assert_eq!(
        phr_gateway::notifications::queue_expired(db)
            .await
            .expect("queue"),
        0
    );
    assert_eq!(deliver(&env).await.delivered, 1);
    let (_, token) = last_event(&receiver);
    let claims = set_claims(&env, &token, &client_id).await;
    assert_eq!(
        claims["events"]["urn:phr-gateway:event:consent-expired"]["consent"],
        expiring.as_str()
    );

    // An endpoint that never answers: retried, then given up and audited.
    assert_eq!(
        register_webhook(&env, &client_id, "http://127.0.0.1:9/hook").await,
        StatusCode::NO_CONTENT
    );
    let (third, _) = grant_consent(
        &env.app,
        PATIENT,
        Performer::patient(&PersonRef::new(PATIENT)),
        &client_id,
        &["PATRQT"],
        &[DataCategory::Observations],
        30,
    )
    .await;
    let withdrawn = env
        .app
        .client
        .post(env.url(&format!("/api/consents/{third}/withdraw")))
        .bearer_auth(&session)
        .send()
        .await
        .expect("withdraw");
    assert_eq!(withdrawn.status(), StatusCode::OK);
    assert_eq!(deliver(&env).await.retried, 1);
    sqlx::query(
        "UPDATE notifications SET attempts = 11, next_attempt_at = 0 WHERE consent_id = $1",
    )
    .bind(&third)
    .execute(db.write_pool())
    .await
    .expect("last attempt");
    assert_eq!(deliver(&env).await.failed, 1);
    assert_eq!(
        count(
            &env.app,
            "SELECT COUNT(*) FROM notifications WHERE status = 'failed'"
        )
        .await,
        1
    );
    assert!(leaves_containing(&env.app, "failed after 12 attempts").await >= 1);
    env.stop().await;
}
