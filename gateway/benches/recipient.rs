//! Shared by the bench binaries that act as a recipient's app: a registered
//! `private_key_jwt` client, a patient with an account and a Patient resource, consents,
//! approved authorisation requests and the code exchange over real HTTP.

#![allow(dead_code)]

use phr_adapters::fhir_r4::BackendKey;
use phr_adapters::oauth::{client_assertion, pkce_s256_pair, CLIENT_ASSERTION_LIFETIME};
use phr_consent::{DataCategory, Performer, PersonRef, Purpose, Recipient};
use phr_gateway::audit::{AccountRole, Agent};
use phr_gateway::consents::{GrantRequest, ReceiptContext};
use phr_gateway::oauth::authorize::{self, NewAuthorization};
use phr_gateway::oauth::clients::{self, ComplianceDeclaration, NewClient};
use phr_gateway::oauth::scopes::parse_scopes;
use phr_gateway::store::resources::{NewResource, SourceIdentity};
use phr_gateway::RunningGateway;

pub const REDIRECT: &str = "http://127.0.0.1:9/callback";

pub struct Setup {
    pub base: String,
    pub client_id: String,
    pub key: BackendKey,
    pub http: reqwest::Client,
    pub patient_token: String,
}

pub async fn setup(gateway: &RunningGateway) -> Setup {
    let state = &gateway.state;
    let key = BackendKey::generate_es384();
    let (client, _) = clients::register(
        &state.db,
        &Agent::system(),
        NewClient {
            display_name: "Bench app".into(),
            redirect_uris: vec![REDIRECT.into()],
            jwks: Some(serde_json::json!({"keys": [key.public_jwk()]})),
            recipient: clients::Recipient {
                name: "Bench".into(),
                identifier: "0".into(),
            },
            compliance: ComplianceDeclaration {
                declared: true,
                statement: "bench".into(),
                declared_on: "2026-01-01".into(),
            },
        },
    )
    .await
    .expect("client");
    state
        .accounts
        .create(
            AccountRole::Patient,
            "bench",
            "correct horse battery staple",
            Some("p-bench"),
        )
        .await
        .expect("account");
    state
        .resources
        .put(
            &Agent::system(),
            NewResource {
                patient_id: "p-bench".into(),
                category: "demographics".into(),
                source: SourceIdentity {
                    source: "bench".into(),
                    resource_type: "Patient".into(),
                    source_resource_id: "p".into(),
                    version_id: Some("1".into()),
                },
                body: br#"{"resourceType":"Patient","id":"p"}"#.to_vec(),
            },
        )
        .await
        .expect("patient");
    let base = format!("http://127.0.0.1:{}", gateway.addr.port());
    let http = reqwest::Client::new();
    let login = json_of(
        http.post(format!("{base}/auth/login"))
            .body(r#"{"username":"bench","password":"correct horse battery staple"}"#)
            .header("content-type", "application/json")
            .send()
            .await
            .expect("login"),
    )
    .await;
    Setup {
        base,
        client_id: client.id,
        key,
        http,
        patient_token: login["token"].as_str().expect("token").to_string(),
    }
}

pub async fn grant(
    gateway: &RunningGateway,
    client_id: &str,
    n: usize,
    categories: &[DataCategory],
) -> String {
    let state = &gateway.state;
    let purpose = state
        .consents
        .config()
        .purpose("PATRQT")
        .expect("purpose")
        .clone();
    let (consent, _) = state
        .consents
        .grant(
            &Agent::system(),
            GrantRequest {
                patient_id: "p-bench".into(),
                performer: Performer::patient(&PersonRef::new("p-bench")),
                performer_account_id: format!("bench-{n}"),
                recipient: Recipient::client(client_id),
                recipient_display: "Bench app".into(),
                purposes: vec![Purpose::new(&purpose.system, &purpose.code)],
                categories: categories.to_vec(),
                ends_at: time::OffsetDateTime::now_utc() + time::Duration::days(30),
            },
            &ReceiptContext {
                notice_url: "http://127.0.0.1/consent/notice".into(),
                language: "ja".into(),
                collection_method: "api".into(),
            },
        )
        .await
        .expect("grant");
    consent.id
}

/// A pending request approved under `consent`, as the consent screen does.
pub async fn code_for(
    gateway: &RunningGateway,
    setup: &Setup,
    consent: &str,
    scope: &str,
) -> (String, String) {
    let state = &gateway.state;
    let (verifier, challenge) = pkce_s256_pair();
    let scopes = parse_scopes(scope).expect("scopes");
    let request_id = authorize::create_request(
        &state.db,
        &Agent::system(),
        &NewAuthorization {
            client_id: setup.client_id.clone(),
            redirect_uri: REDIRECT.into(),
            state: "s".into(),
            code_challenge: challenge,
            scopes: scopes.clone(),
            issuer: setup.base.clone(),
        },
        600,
    )
    .await
    .expect("request");
    let back = authorize::approve(&state.db, &request_id, "p-bench", consent, &scopes)
        .await
        .expect("approve");
    let code = url_param(&back, "code");
    (code, verifier)
}

pub async fn exchange(setup: &Setup, code: &str, verifier: &str) -> (u16, serde_json::Value) {
    let token_url = format!("{}/oauth/token", setup.base);
    let assertion = client_assertion(
        &setup.key,
        &setup.client_id,
        &token_url,
        CLIENT_ASSERTION_LIFETIME,
    )
    .expect("assertion");
    let response = setup
        .http
        .post(&token_url)
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", REDIRECT),
            ("code_verifier", verifier),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", assertion.as_str()),
        ])
        .send()
        .await
        .expect("token");
    let status = response.status().as_u16();
    (status, json_of(response).await)
}

pub fn url_param(url: &str, name: &str) -> String {
    url.split(['?', '&'])
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value.to_string())
        .expect("parameter")
}

pub async fn json_of(response: reqwest::Response) -> serde_json::Value {
    let bytes = response.bytes().await.expect("body");
    serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null)
}
