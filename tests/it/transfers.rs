//! PHR-to-PHR transfer between two gateway instances on both engines: the receiving
//! patient gets a one-time code; the sending patient starts the transfer with it; the
//! sender checks the recipient (registered, compliance declared, endpoint) first, pushes a
//! transaction Bundle with a signed JWT, and receipts it; the receiver checks the JWT
//! (registered peer, signature, audience, expiry), spends the code once, and the data lands
//! in the right account; a repeated push changes nothing; an unreachable recipient is
//! retried and then shown as failed.

use phr_adapters::fhir_r4::BackendKey;
use phr_gateway::audit::AccountRole;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::both_engines;
use crate::fhir_api::{seed, PATIENT};
use crate::helpers::{
    count, leaves_containing, receipt_claims, spawn_app_with, Engine, TestApp, TestEnv,
};
use crate::oauth::{env_with, Env};

both_engines!(a_transfer_lands_in_the_right_account_once,);

async fn start(
    sender: &Env,
    session: &str,
    client_id: &str,
    code: &str,
    categories: &[&str],
) -> reqwest::Response {
    sender
        .app
        .client
        .post(sender.url("/patient/transfers"))
        .bearer_auth(session)
        .json(
            &json!({"client_id": client_id, "transfer_code": code, "categories": categories,
            "password": crate::helpers::PASSWORD}),
        )
        .send()
        .await
        .expect("start")
}

async fn new_code(receiver: &TestApp, session: &str) -> String {
    let response = receiver
        .client
        .post(receiver.url("/patient/transfer-codes"))
        .bearer_auth(session)
        .send()
        .await
        .expect("code");
    assert_eq!(response.status(), StatusCode::CREATED);
    let body: Value = response.json().await.expect("json");
    body["code"].as_str().expect("code").to_string()
}

async fn push(receiver: &TestApp, token: &str, bundle: &Value) -> reqwest::Response {
    receiver
        .client
        .post(receiver.url("/transfer/inbox"))
        .bearer_auth(token)
        .header("content-type", "application/fhir+json")
        .body(bundle.to_string())
        .send()
        .await
        .expect("push")
}

async fn a_transfer_lands_in_the_right_account_once(engine: Engine) {
    // The test drives the retries itself (`deliver_due`): the background deliverer would
    // race it for the same transfer.
    let sender = env_with(engine, |c| c.notifications.deliver = false).await;
    seed(&sender).await;
    // The receiving service: plain HTTP on loopback, so the sender's client reaches it.
    let receiver = spawn_app_with(TestEnv::new(engine).await, |c| {
        c.insecure_http = true;
        c.pull.workers = 0;
    })
    .await;
    let newcomer = receiver
        .sign_in(AccountRole::Patient, "newcomer", Some("p-new"))
        .await;
    let receiver_operator = receiver.sign_in(AccountRole::Operator, "op2", None).await;
    // The receiver trusts the sender's transfer key (its EC key from the JWKS).
    let sender_jwks: Value = sender
        .app
        .client
        .get(sender.url("/.well-known/jwks.json"))
        .send()
        .await
        .expect("jwks")
        .json()
        .await
        .expect("json");
    let transfer_key = sender.app.gateway().state.source_client_key.public_jwk();
    assert!(sender_jwks["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .any(|k| k["kid"] == transfer_key["kid"]));
    let registered = receiver
        .client
        .put(receiver.url("/operator/transfer-peers"))
        .bearer_auth(&receiver_operator)
        .json(&json!({"issuer": sender.app.base, "display_name": "送り元PHR", "jwks": {"keys": [transfer_key]}}))
        .send()
        .await
        .expect("peer");
    assert_eq!(registered.status(), StatusCode::NO_CONTENT);
    // The sender knows the receiver as a registered recipient with an endpoint.
    let recipient = sender.key_client(&BackendKey::generate_es384()).await;
    let session = sender
        .app
        .sign_in(AccountRole::Patient, "patient1", Some(PATIENT))
        .await;
    let code = new_code(&receiver, &newcomer).await;
    let no_endpoint = start(&sender, &session, &recipient, &code, &["observations"]).await;
    assert_eq!(
        no_endpoint.status(),
        StatusCode::BAD_REQUEST,
        "checked before anything leaves"
    );
    let unknown = start(
        &sender,
        &session,
        "no-such-client",
        &code,
        &["observations"],
    )
    .await;
    assert_eq!(unknown.status(), StatusCode::BAD_REQUEST);
    let endpoint = sender
        .app
        .client
        .put(sender.url(&format!("/operator/clients/{recipient}/transfer-endpoint")))
        .bearer_auth(&sender.operator)
        .json(&json!({"url": receiver.url("/transfer/inbox")}))
        .send()
        .await
        .expect("endpoint");
    assert_eq!(endpoint.status(), StatusCode::NO_CONTENT);
    let nothing = start(&sender, &session, &recipient, &code, &[]).await;
    assert_eq!(nothing.status(), StatusCode::BAD_REQUEST);

    // The transfer: delivered at once, receipted, in the newcomer's record.
    let started = start(
        &sender,
        &session,
        &recipient,
        &code,
        &["observations", "demographics"],
    )
    .await;
    assert_eq!(started.status(), StatusCode::CREATED);
    let transfer: Value = started.json().await.expect("json");
    assert_eq!(transfer["status"], "delivered", "{transfer}");
    assert_eq!(transfer["resources"], 9);
    let claims = receipt_claims(&sender.app, transfer["receipt"].as_str().expect("receipt")).await;
    assert_eq!(claims["receipt_type"], "transfer");
    assert_eq!(
        receiver
            .gateway()
            .state
            .resources
            .count("p-new")
            .await
            .expect("count"),
        10,
        "9 and their Provenance"
    );
    let observations: Value = receiver
        .client
        .get(receiver.url("/fhir/Observation"))
        .bearer_auth(&newcomer)
        .send()
        .await
        .expect("read")
        .json()
        .await
        .expect("json");
    assert_eq!(observations["total"], 8);
    assert_eq!(
        observations["entry"][0]["resource"]["subject"]["reference"],
        "Patient/p-new"
    );
    assert!(leaves_containing(&sender.app, "privacy disclosure: transfer").await >= 1);

    // The same through the portal's form: nothing chosen in advance, the transfer listed.
    let portal_code = new_code(&receiver, &newcomer).await;
    let home = sender
        .app
        .client
        .get(sender.url("/portal"))
        .bearer_auth(&session)
        .send()
        .await
        .expect("portal")
        .text()
        .await
        .expect("html");
    assert!(home.contains("action=\"/portal/transfers\""));
    assert!(!home.contains("checked"), "no category ticked in advance");
    let form =
        format!("client_id={recipient}&transfer_code={portal_code}&send_category=immunizations&password=correct+horse+battery+staple");
    let posted = sender
        .app
        .client
        .post(sender.url("/portal/transfers"))
        .bearer_auth(&session)
        .header("origin", sender.app.base.clone())
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form)
        .send()
        .await
        .expect("portal transfer");
    assert!(
        posted.status().is_redirection() || posted.status().is_success(),
        "{}",
        posted.status()
    );
    let listed = sender
        .app
        .client
        .get(sender.url("/portal"))
        .bearer_auth(&session)
        .send()
        .await
        .expect("portal")
        .text()
        .await
        .expect("html");
    assert!(
        listed.contains("送信済み"),
        "the delivered transfer is listed"
    );

    // The same push again (same transfer id): the same answer, nothing twice. A spent code,
    // an unknown signer or another audience are refused.
    let transfer_id = transfer["id"].as_str().expect("id").to_string();
    let key = &sender.app.gateway().state.source_client_key;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let token = |id: &str, code: &str, aud: String, signer: &BackendKey| {
        signer
            .sign(
                &json!({"iss": sender.app.base, "aud": aud, "iat": now, "exp": now + 120,
                "jti": uuid::Uuid::new_v4().to_string(), "transfer_id": id, "transfer_code": code}),
            )
            .expect("sign")
    };
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Observation", "id": "extra", "status": "final", "code": {"text": "x"}},
         "request": {"method": "POST", "url": "Observation"}}]});
    let inbox = receiver.url("/transfer/inbox");
    let again = push(
        &receiver,
        &token(&transfer_id, &code, inbox.clone(), key),
        &bundle,
    )
    .await;
    assert_eq!(again.status(), StatusCode::OK);
    let again: Value = again.json().await.expect("json");
    assert_eq!(again["repeated"], true);
    let spent = push(
        &receiver,
        &token("another-transfer", &code, inbox.clone(), key),
        &bundle,
    )
    .await;
    assert_eq!(spent.status(), StatusCode::UNAUTHORIZED);
    let fresh = new_code(&receiver, &newcomer).await;
    let stranger = BackendKey::generate_es384();
    let refusals_before = leaves_containing(&receiver, "transfer refused").await;
    let forged = push(
        &receiver,
        &token("t-2", &fresh, inbox.clone(), &stranger),
        &bundle,
    )
    .await;
    assert_eq!(forged.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        leaves_containing(&receiver, "transfer refused").await,
        refusals_before + 1,
        "a forged push is audited"
    );
    let elsewhere = push(
        &receiver,
        &token(
            "t-3",
            &fresh,
            "https://elsewhere.example/transfer/inbox".into(),
            key,
        ),
        &bundle,
    )
    .await;
    assert_eq!(elsewhere.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        receiver
            .gateway()
            .state
            .resources
            .count("p-new")
            .await
            .expect("count"),
        10
    );
    assert!(leaves_containing(&receiver, "transfer refused").await >= 1);

    // An unreachable recipient: retried with backoff, then failed, and the patient sees it.
    let down = sender.key_client(&BackendKey::generate_es384()).await;
    sender
        .app
        .client
        .put(sender.url(&format!("/operator/clients/{down}/transfer-endpoint")))
        .bearer_auth(&sender.operator)
        .json(&json!({"url": "http://127.0.0.1:9/transfer/inbox"}))
        .send()
        .await
        .expect("endpoint");
    let pending: Value = start(&sender, &session, &down, "some-code", &["observations"])
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(pending["status"], "pending");
    assert_eq!(pending["attempts"], 1);
    assert!(pending["last_error"].as_str().is_some());
    sqlx::query("UPDATE transfers SET attempts = 5, next_attempt_at = 0 WHERE status = 'pending'")
        .execute(sender.app.gateway().state.db.write_pool())
        .await
        .expect("last attempt");
    let state = &sender.app.gateway().state;
    assert_eq!(
        phr_gateway::http::transfers::deliver_due(state)
            .await
            .expect("deliver"),
        0
    );
    let listed: Value = sender
        .app
        .client
        .get(sender.url("/patient/transfers"))
        .bearer_auth(&session)
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    let failed = listed
        .as_array()
        .expect("list")
        .iter()
        .find(|t| t["id"] == pending["id"])
        .expect("listed");
    assert_eq!(failed["status"], "failed");
    assert!(
        leaves_containing(&sender.app, "\"transfers\"").await >= 1,
        "reading the transfers is audited"
    );
    assert_eq!(
        count(
            &sender.app,
            "SELECT COUNT(*) FROM transfers WHERE code_sealed IS NOT NULL"
        )
        .await,
        0,
        "no code kept after the end"
    );
    sender.stop().await;
    receiver.stop().await;
}
