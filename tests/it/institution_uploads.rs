//! A checkup institution uploads a patient's 特定健診 results with its own credentials, on
//! the patient's instruction (an upload permission), on both engines: the patient gives and
//! withdraws the permission with signed receipts; the institution's client-credentials
//! token needs `system/DocumentReference.c` and the permission must be its own, active and
//! unexpired; uploads are reconciled with the patient's own, recorded in the permission's
//! history and the audit log; refusals store nothing.

use phr_adapters::fhir_r4::BackendKey;
use phr_adapters::oauth::{client_assertion, CLIENT_ASSERTION_LIFETIME};
use phr_gateway::audit::AccountRole;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::both_engines;
use crate::helpers::{
    count, leaves_containing, portal_checkup_document, provenance_sources_of, receipt_claims,
    spawn_app_with, Engine, TestApp, TestEnv,
};

both_engines!(a_checkup_institution_uploads_under_the_patients_permission,);

const CDA: &str = "application/hl7-v3+xml";

/// Registers a checkup institution (a `private_key_jwt` client) as the operator.
async fn register_institution(
    app: &TestApp,
    operator: &str,
    name: &str,
    key: &BackendKey,
) -> String {
    let response = app
        .client
        .post(app.url("/operator/clients"))
        .bearer_auth(operator)
        .json(&json!({
            "display_name": name,
            "redirect_uris": [],
            "token_endpoint_auth_method": "private_key_jwt",
            "jwks": {"keys": [key.public_jwk()]},
            "recipient": {"name": format!("{name} 健診センター"), "identifier": "4010001000001"},
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
    body["client_id"].as_str().expect("client_id").to_string()
}

/// A client-credentials access token for `scope`.
async fn institution_token(
    app: &TestApp,
    key: &BackendKey,
    client_id: &str,
    scope: &str,
) -> String {
    let token_url = app.url("/oauth/token");
    let assertion =
        client_assertion(key, client_id, &token_url, CLIENT_ASSERTION_LIFETIME).expect("assertion");
    let response = app
        .client
        .post(&token_url)
        .form(&[
            ("grant_type", "client_credentials"),
            ("scope", scope),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", &assertion),
        ])
        .send()
        .await
        .expect("token");
    let status = response.status();
    let body: Value = response.json().await.expect("json");
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["scope"], scope);
    body["access_token"].as_str().expect("token").to_string()
}

async fn institution_upload(
    app: &TestApp,
    token: &str,
    permission: &str,
    body: &str,
) -> reqwest::Response {
    app.client
        .post(app.url(&format!(
            "/institution/upload-permissions/{permission}/checkups"
        )))
        .bearer_auth(token)
        .header("content-type", CDA)
        .body(body.to_string())
        .send()
        .await
        .expect("upload")
}

async fn permissions_of(app: &TestApp, patient: &str) -> Vec<Value> {
    let response = app
        .client
        .get(app.url("/patient/upload-permissions"))
        .bearer_auth(patient)
        .send()
        .await
        .expect("list");
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.expect("json");
    body.as_array().expect("array").clone()
}

fn events_of(permission: &Value) -> Vec<String> {
    permission["history"]
        .as_array()
        .expect("history")
        .iter()
        .map(|e| e["event"].as_str().expect("event").to_string())
        .collect()
}

async fn bundles(app: &TestApp) -> i64 {
    count(
        app,
        "SELECT COUNT(*) FROM resources WHERE patient_id = 'p-hanako' AND resource_type = 'Bundle'",
    )
    .await
}

async fn a_checkup_institution_uploads_under_the_patients_permission(engine: Engine) {
    let cda = portal_checkup_document();
    let app = spawn_app_with(TestEnv::new(engine).await, |c| c.pull.workers = 0).await;
    let patient = app
        .sign_in(AccountRole::Patient, "hanako", Some("p-hanako"))
        .await;
    let someone_else = app
        .sign_in(AccountRole::Patient, "taro", Some("p-taro"))
        .await;
    let operator = app.sign_in(AccountRole::Operator, "op", None).await;
    let key = BackendKey::generate_es384();
    let institution = register_institution(&app, &operator, "みなと健診", &key).await;
    let other_key = BackendKey::generate_es384();
    let other = register_institution(&app, &operator, "やまて健診", &other_key).await;
    let token = institution_token(&app, &key, &institution, "system/DocumentReference.c").await;
    let other_token =
        institution_token(&app, &other_key, &other, "system/DocumentReference.c").await;
    let read_token = institution_token(&app, &key, &institution, "system/Observation.rs").await;

    // No permission yet: an unknown reference is "not found".
    let unknown = uuid::Uuid::new_v4().to_string();
    let refused = institution_upload(&app, &token, &unknown, &cda).await;
    assert_eq!(refused.status(), StatusCode::NOT_FOUND);

    // The patient allows the institution: a signed receipt names it and the period.
    let given = app
        .client
        .post(app.url("/patient/upload-permissions"))
        .bearer_auth(&patient)
        .json(&json!({"client_id": institution}))
        .send()
        .await
        .expect("give");
    assert_eq!(given.status(), StatusCode::CREATED);
    let given: Value = given.json().await.expect("json");
    let permission = given["permission"]["id"].as_str().expect("id").to_string();
    assert_eq!(given["permission"]["status"], "active");
    assert_eq!(given["permission"]["institution"], "みなと健診");
    let claims = receipt_claims(&app, given["receipt"].as_str().expect("receipt")).await;
    assert_eq!(claims["receipt_type"], "upload-permission");
    assert_eq!(claims["event"], "given");
    assert_eq!(claims["subject"], "p-hanako");
    assert_eq!(
        claims["permission"]["institution"]["client_id"],
        institution.as_str()
    );
    assert!(claims["permission"]["expires_at"].is_string());
    assert!(claims["notice"]["ja"]
        .as_str()
        .is_some_and(|n| n.contains("取り消せます")));
    // An unknown institution is refused with a reason.
    let bad = app
        .client
        .post(app.url("/patient/upload-permissions"))
        .bearer_auth(&patient)
        .json(&json!({"client_id": "no-such-client"}))
        .send()
        .await
        .expect("give");
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);

    // A token without the upload scope, and another institution's token, are refused;
    // the other institution learns nothing about the permission.
    let wrong_scope = institution_upload(&app, &read_token, &permission, &cda).await;
    assert_eq!(wrong_scope.status(), StatusCode::FORBIDDEN);
    let not_theirs = institution_upload(&app, &other_token, &permission, &cda).await;
    assert_eq!(not_theirs.status(), StatusCode::NOT_FOUND);
    let no_token = app
        .client
        .post(app.url(&format!(
            "/institution/upload-permissions/{permission}/checkups"
        )))
        .header("content-type", CDA)
        .body(cda.clone())
        .send()
        .await
        .expect("upload");
    assert_eq!(no_token.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(bundles(&app).await, 0);

    // The institution uploads: stored, its Provenance names the institution.
    let uploaded = institution_upload(&app, &token, &permission, &cda).await;
    assert_eq!(uploaded.status(), StatusCode::CREATED);
    let uploaded: Value = uploaded.json().await.expect("json");
    assert_eq!(uploaded["checkups"][0]["outcome"], "created", "{uploaded}");
    let bundle_id = uploaded["checkups"][0]["id"]
        .as_str()
        .expect("id")
        .to_string();
    assert_eq!(bundles(&app).await, 1);
    let sources = provenance_sources_of(&app, &patient, &bundle_id).await;
    assert!(
        sources.contains(&format!("upload:{institution}")),
        "{sources:?}"
    );
    assert!(
        leaves_containing(&app, &institution).await >= 2,
        "token and upload audited"
    );

    // A document about someone else is refused: nothing stored, the refusal in the history.
    let birth = cda
        .split("birthTime value=\"")
        .nth(1)
        .and_then(|rest| rest.get(..8))
        .expect("birthTime")
        .to_string();
    let wrong_person = cda.replace(
        &format!("birthTime value=\"{birth}\""),
        "birthTime value=\"19010101\"",
    );
    let refused = institution_upload(&app, &token, &permission, &wrong_person).await;
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    assert_eq!(bundles(&app).await, 1);

    // The patient's own copy of the same checkup is recognised: stored once, two sources.
    let own = app
        .client
        .post(app.url("/patient/checkups"))
        .bearer_auth(&patient)
        .header("content-type", CDA)
        .body(cda.clone())
        .send()
        .await
        .expect("own upload");
    assert_eq!(own.status(), StatusCode::CREATED);
    let own: Value = own.json().await.expect("json");
    assert_eq!(own["checkups"][0]["outcome"], "unchanged", "{own}");
    assert_eq!(bundles(&app).await, 1);
    let sources = provenance_sources_of(&app, &patient, &bundle_id).await;
    assert!(sources.contains(&"upload".to_string()), "{sources:?}");

    // Nobody else can withdraw it; the patient withdraws in one action, with a receipt.
    let stranger = app
        .client
        .post(app.url(&format!(
            "/patient/upload-permissions/{permission}/withdraw"
        )))
        .bearer_auth(&someone_else)
        .send()
        .await
        .expect("withdraw");
    assert_eq!(stranger.status(), StatusCode::NOT_FOUND);
    let withdrawn = app
        .client
        .post(app.url(&format!(
            "/patient/upload-permissions/{permission}/withdraw"
        )))
        .bearer_auth(&patient)
        .send()
        .await
        .expect("withdraw");
    assert_eq!(withdrawn.status(), StatusCode::OK);
    let withdrawn: Value = withdrawn.json().await.expect("json");
    assert_eq!(withdrawn["permission"]["status"], "withdrawn");
    let claims = receipt_claims(&app, withdrawn["receipt"].as_str().expect("receipt")).await;
    assert_eq!(claims["event"], "withdrawn");
    let again = app
        .client
        .post(app.url(&format!(
            "/patient/upload-permissions/{permission}/withdraw"
        )))
        .bearer_auth(&patient)
        .send()
        .await
        .expect("withdraw");
    assert_eq!(again.status(), StatusCode::BAD_REQUEST);
    // The very next upload is refused, and says why.
    let after = institution_upload(&app, &token, &permission, &cda).await;
    assert_eq!(after.status(), StatusCode::FORBIDDEN);
    let problem: Value = after.json().await.expect("problem");
    assert!(
        problem["detail"]
            .as_str()
            .is_some_and(|d| d.contains("withdrawn")),
        "{problem}"
    );

    // An expired permission admits nothing either.
    let second: Value = app
        .client
        .post(app.url("/patient/upload-permissions"))
        .bearer_auth(&patient)
        .json(&json!({"client_id": institution}))
        .send()
        .await
        .expect("give")
        .json()
        .await
        .expect("json");
    let second_id = second["permission"]["id"].as_str().expect("id").to_string();
    sqlx::query("UPDATE upload_permissions SET expires_at = 1 WHERE id = $1")
        .bind(&second_id)
        .execute(app.gateway().state.db.write_pool())
        .await
        .expect("expire");
    let expired = institution_upload(&app, &token, &second_id, &cda).await;
    assert_eq!(expired.status(), StatusCode::FORBIDDEN);

    // The patient sees both permissions with their whole history; others see none of it.
    let listed = permissions_of(&app, &patient).await;
    assert_eq!(listed.len(), 2);
    let first = listed
        .iter()
        .find(|p| p["id"] == permission.as_str())
        .expect("first permission");
    assert_eq!(
        events_of(first),
        vec![
            "given",
            "upload",
            "upload-refused",
            "withdrawn",
            "upload-refused"
        ]
    );
    let second = listed
        .iter()
        .find(|p| p["id"] == second_id.as_str())
        .expect("second permission");
    assert_eq!(second["status"], "expired");
    assert!(permissions_of(&app, &someone_else).await.is_empty());
    assert_eq!(bundles(&app).await, 1, "refusals stored nothing");
    assert!(leaves_containing(&app, "upload permission").await >= 3);
    app.stop().await;
}
