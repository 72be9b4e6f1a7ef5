//! Consent and OAuth benchmark, over real HTTP on loopback:
//! - token issuance: the code exchange at `/oauth/token` with a `private_key_jwt` assertion
//!   (ES384 verified, jti stored, code spent, tokens stored as digests, audited);
//! - withdrawal to denial: the time from sending `POST /api/consents/{id}/withdraw` to the
//!   app's next `GET /fhir/Patient/{id}` being refused, on the same process and on a second
//!   gateway process sharing the database.
//!
//! `cargo bench -p phr-gateway --bench consent` (PHR_BENCH_ENGINES=sqlite|postgres).

#[path = "support.rs"]
mod support;

use std::time::Instant;

use phr_adapters::fhir_r4::BackendKey;
use phr_adapters::oauth::{client_assertion, pkce_s256_pair, CLIENT_ASSERTION_LIFETIME};
use phr_consent::{DataCategory, Performer, PersonRef, Purpose, Recipient};
use phr_gateway::audit::{AccountRole, Agent};
use phr_gateway::consents::{GrantRequest, ReceiptContext};
use phr_gateway::oauth::authorize::{self, NewAuthorization};
use phr_gateway::oauth::clients::{self, ComplianceDeclaration, NewClient};
use phr_gateway::oauth::scopes::parse_scopes;
use phr_gateway::store::resources::{NewResource, SourceIdentity};
use phr_gateway::{Gateway, RunningGateway};
use support::{engines, BenchEnv};

const TOKENS: usize = 300;
const WITHDRAWALS: usize = 50;
const REDIRECT: &str = "http://127.0.0.1:9/callback";
const SCOPE: &str = "launch/patient patient/Patient.rs";

#[tokio::main]
async fn main() {
    for engine in engines() {
        run(engine).await;
    }
}

struct Setup {
    base: String,
    client_id: String,
    key: BackendKey,
    http: reqwest::Client,
    patient_token: String,
}

async fn run(engine: phr_gateway::store::Engine) {
    let Some(env) = BenchEnv::new(engine).await else {
        println!("{engine}: not reachable, skipped");
        return;
    };
    let gateway = env.gateway().await.start().await.expect("start");
    let setup = setup(&gateway).await;

    // Token issuance: requests and codes are prepared first; only the exchange is timed.
    let mut codes = Vec::with_capacity(TOKENS);
    for n in 0..TOKENS {
        let consent = grant(&gateway, &setup.client_id, n).await;
        codes.push(code_for(&gateway, &setup, &consent).await);
    }
    let started = Instant::now();
    for (code, verifier) in &codes {
        let (status, _) = exchange(&setup, code, verifier).await;
        assert_eq!(status, 200);
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{engine}: token issuance (code exchange with private_key_jwt, one at a time): {TOKENS} in {seconds:.2} s = {:.0} tokens/s",
        TOKENS as f64 / seconds
    );

    // Withdrawal to denial, here and (PostgreSQL, the scale-out store) in a second process
    // on the same database.
    let second = match engine {
        phr_gateway::store::Engine::Postgres => Some(
            Gateway::build(env.config.clone())
                .await
                .expect("second process")
                .start()
                .await
                .expect("start second"),
        ),
        phr_gateway::store::Engine::Sqlite => None,
    };
    let mut readers = vec![("same process", setup.base.clone())];
    if let Some(second) = &second {
        readers.push((
            "second process",
            format!("http://127.0.0.1:{}", second.addr.port()),
        ));
    }
    for (label, reader) in readers {
        let mut latencies = Vec::with_capacity(WITHDRAWALS);
        for n in 0..WITHDRAWALS {
            let consent = grant(&gateway, &setup.client_id, 10_000 + n).await;
            let (code, verifier) = code_for(&gateway, &setup, &consent).await;
            let (_, tokens) = exchange(&setup, &code, &verifier).await;
            let access = tokens["access_token"]
                .as_str()
                .unwrap_or_else(|| panic!("token: {tokens}"))
                .to_string();
            assert_eq!(read(&setup, &reader, &access).await, 200);
            let started = Instant::now();
            let withdrawn = setup
                .http
                .post(format!("{}/api/consents/{consent}/withdraw", setup.base))
                .bearer_auth(&setup.patient_token)
                .send()
                .await
                .expect("withdraw");
            assert_eq!(withdrawn.status(), 200);
            let status = read(&setup, &reader, &access).await;
            latencies.push(started.elapsed().as_secs_f64() * 1000.0);
            assert!(status == 401 || status == 403, "denied, got {status}");
        }
        latencies.sort_by(f64::total_cmp);
        println!(
            "{engine}: withdrawal → next request denied ({label}): median {:.1} ms, p95 {:.1} ms, max {:.1} ms over {WITHDRAWALS} (every next request was denied)",
            latencies[WITHDRAWALS / 2],
            latencies[WITHDRAWALS * 95 / 100],
            latencies[WITHDRAWALS - 1]
        );
    }
    if let Some(second) = second {
        second.stop().await;
    }
    gateway.stop().await;
    env.cleanup().await;
}

async fn setup(gateway: &RunningGateway) -> Setup {
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

async fn grant(gateway: &RunningGateway, client_id: &str, n: usize) -> String {
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
                categories: vec![DataCategory::Demographics],
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
async fn code_for(gateway: &RunningGateway, setup: &Setup, consent: &str) -> (String, String) {
    let state = &gateway.state;
    let (verifier, challenge) = pkce_s256_pair();
    let scopes = parse_scopes(SCOPE).expect("scopes");
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

async fn exchange(setup: &Setup, code: &str, verifier: &str) -> (u16, serde_json::Value) {
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

async fn read(setup: &Setup, base: &str, access: &str) -> u16 {
    setup
        .http
        .get(format!("{base}/fhir/Patient/p-bench"))
        .bearer_auth(access)
        .send()
        .await
        .expect("read")
        .status()
        .as_u16()
}

fn url_param(url: &str, name: &str) -> String {
    url.split(['?', '&'])
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value.to_string())
        .expect("parameter")
}

async fn json_of(response: reqwest::Response) -> serde_json::Value {
    let bytes = response.bytes().await.expect("body");
    serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null)
}
