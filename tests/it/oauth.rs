//! The OAuth 2 authorisation server for PHR apps, end to end on both engines: client
//! registration by an operator, authorisation with PKCE handed to the consent page (the
//! test approves through `oauth::authorize::approve`, as the page does), the token endpoint
//! with `private_key_jwt` and `client_secret_basic`, rotation, revocation, introspection,
//! the bearer extractor — and every bad input refused with the right OAuth error, audited.

use std::collections::HashMap;
use std::time::Duration;

use phr_adapters::fhir_r4::BackendKey;
use phr_adapters::oauth::{client_assertion, pkce_s256_pair, CLIENT_ASSERTION_LIFETIME};
use phr_gateway::audit::AccountRole;
use phr_gateway::oauth::{self, Scope};
use reqwest::header;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::both_engines;
use crate::helpers::{count, leaves_containing, spawn_app_with, Engine, TestApp, TestEnv};

both_engines!(
    operators_register_clients_with_a_compliance_declaration,
    code_flow_with_private_key_jwt_refresh_introspect_and_revoke,
    client_secret_basic_and_client_credentials,
    bad_authorization_requests_are_refused_and_bad_redirects_never_followed,
    replayed_codes_and_pkce_mismatches_are_refused,
    refresh_reuse_revokes_the_family_and_scopes_never_widen,
    client_assertions_are_checked,
    rsa_clients_sign_with_rs384_and_rs256_is_refused,
    forged_and_expired_access_tokens_are_refused,
    withdrawing_a_consent_revokes_its_tokens,
    expired_records_are_purged_and_live_ones_kept,
);

pub(crate) const REDIRECT: &str = "https://app.example.jp/callback";
const SCOPE: &str =
    "launch/patient patient/Observation.rs patient/MedicationDispense.rs offline_access";

pub(crate) struct Env {
    pub(crate) app: TestApp,
    pub(crate) operator: String,
    /// Does not follow redirects: the tests read `Location`.
    pub(crate) browser: reqwest::Client,
}

pub(crate) async fn env_with(engine: Engine, adjust: impl FnOnce(&mut phr_gateway::Config)) -> Env {
    let app = spawn_app_with(TestEnv::new(engine).await, |c| {
        c.pull.workers = 0;
        adjust(c);
    })
    .await;
    let operator = app.sign_in(AccountRole::Operator, "op", None).await;
    let cert = app
        .gateway()
        .state
        .config
        .data_dir
        .join("tls")
        .join("dev-cert.pem");
    let browser = no_redirect_client(&cert);
    Env {
        app,
        operator,
        browser,
    }
}

pub(crate) async fn env(engine: Engine) -> Env {
    env_with(engine, |_| {}).await
}

fn no_redirect_client(cert: &std::path::Path) -> reqwest::Client {
    phr_gateway::tls::install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(cert).expect("read dev cert");
    for der in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(der.expect("pem")).expect("add root");
    }
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

fn registration(auth: Value) -> Value {
    let mut body = json!({
        "display_name": "けんこう手帳アプリ",
        "redirect_uris": [REDIRECT, "http://localhost:8080/cb"],
        "recipient": {"name": "株式会社ヘルスケア", "identifier": "1234567890123"},
        "compliance": {
            "declared": true,
            "statement": "PHRサービス事業者に関する基本的指針を遵守します",
            "declared_on": "2026-04-01"
        }
    });
    for (k, v) in auth.as_object().expect("object") {
        body[k] = v.clone();
    }
    body
}

impl Env {
    pub(crate) fn url(&self, path: &str) -> String {
        self.app.url(path)
    }

    pub(crate) fn token_url(&self) -> String {
        self.url("/oauth/token")
    }

    pub(crate) async fn register(&self, body: &Value) -> reqwest::Response {
        self.app
            .client
            .post(self.url("/operator/clients"))
            .bearer_auth(&self.operator)
            .json(body)
            .send()
            .await
            .expect("register")
    }

    pub(crate) async fn key_client(&self, key: &BackendKey) -> String {
        let response = self
            .register(&registration(json!({
                "token_endpoint_auth_method": "private_key_jwt",
                "jwks": {"keys": [key.public_jwk()]}
            })))
            .await;
        assert_eq!(response.status(), StatusCode::CREATED);
        let body: Value = response.json().await.expect("json");
        assert!(body.get("client_secret").is_none());
        body["client_id"].as_str().expect("client_id").to_string()
    }

    pub(crate) async fn secret_client(&self) -> (String, String) {
        let response = self
            .register(&registration(
                json!({"token_endpoint_auth_method": "client_secret_basic"}),
            ))
            .await;
        assert_eq!(response.status(), StatusCode::CREATED);
        let body: Value = response.json().await.expect("json");
        (
            body["client_id"].as_str().expect("client_id").to_string(),
            body["client_secret"].as_str().expect("secret").to_string(),
        )
    }

    pub(crate) fn authorize_params(
        &self,
        client_id: &str,
        challenge: &str,
    ) -> Vec<(String, String)> {
        [
            ("response_type", "code"),
            ("client_id", client_id),
            ("redirect_uri", REDIRECT),
            ("state", "st-123"),
            ("scope", SCOPE),
            ("aud", &self.url("/fhir")),
            ("code_challenge", challenge),
            ("code_challenge_method", "S256"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    pub(crate) async fn authorize(&self, params: &[(String, String)]) -> reqwest::Response {
        self.browser
            .get(self.url("/oauth/authorize"))
            .query(params)
            .send()
            .await
            .expect("authorize")
    }

    /// A valid authorisation request; returns the request id read from the consent page
    /// URL, and the PKCE verifier.
    pub(crate) async fn start(&self, client_id: &str) -> (String, String) {
        let (verifier, challenge) = pkce_s256_pair();
        let response = self
            .authorize(&self.authorize_params(client_id, &challenge))
            .await;
        assert_eq!(response.status(), StatusCode::SEE_OTHER);
        let location = location(&response);
        let request_id = location
            .strip_prefix("/consent/authorize/")
            .unwrap_or_else(|| panic!("to the consent page: {location}"))
            .to_string();
        (request_id, verifier)
    }

    /// Approves as the consent page would; returns the code.
    pub(crate) async fn approve(&self, request_id: &str, consent_id: &str, scope: &str) -> String {
        let granted: Vec<Scope> = oauth::scopes::parse_scopes(scope).expect("scopes");
        let back = oauth::approve(
            &self.app.gateway().state.db,
            request_id,
            "patient-1",
            consent_id,
            &granted,
        )
        .await
        .expect("approve");
        let params = query_of(&back);
        assert!(back.starts_with(REDIRECT), "{back}");
        assert_eq!(params["state"], "st-123");
        assert_eq!(params["iss"], self.app.base, "RFC 9207 issuer");
        params["code"].clone()
    }

    pub(crate) async fn post_form(
        &self,
        path: &str,
        form: &[(&str, &str)],
        basic: Option<(&str, &str)>,
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let mut request = self.app.client.post(self.url(path)).form(form);
        if let Some((id, secret)) = basic {
            request = request.basic_auth(id, Some(secret));
        }
        let response = request.send().await.expect("post");
        let status = response.status();
        let headers = response.headers().clone();
        let text = response.text().await.expect("body");
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("JSON: {text}"))
        };
        (status, headers, body)
    }

    /// A form authenticated with a fresh assertion of `key` for `client_id`.
    pub(crate) async fn with_key(
        &self,
        path: &str,
        key: &BackendKey,
        client_id: &str,
        form: &[(&str, &str)],
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let assertion =
            client_assertion(key, client_id, &self.token_url(), CLIENT_ASSERTION_LIFETIME)
                .expect("assertion");
        let mut full: Vec<(&str, &str)> = form.to_vec();
        full.push((
            "client_assertion_type",
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        ));
        full.push(("client_assertion", &assertion));
        self.post_form(path, &full, None).await
    }

    pub(crate) async fn exchange(
        &self,
        key: &BackendKey,
        client_id: &str,
        code: &str,
        verifier: &str,
    ) -> (StatusCode, Value) {
        let (status, headers, body) = self
            .with_key(
                "/oauth/token",
                key,
                client_id,
                &[
                    ("grant_type", "authorization_code"),
                    ("code", code),
                    ("redirect_uri", REDIRECT),
                    ("code_verifier", verifier),
                ],
            )
            .await;
        assert_eq!(headers[header::CACHE_CONTROL], "no-store");
        (status, body)
    }

    pub(crate) async fn refresh(
        &self,
        key: &BackendKey,
        client_id: &str,
        refresh_token: &str,
        scope: Option<&str>,
    ) -> (StatusCode, Value) {
        let mut form = vec![
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token),
        ];
        if let Some(scope) = scope {
            form.push(("scope", scope));
        }
        let (status, _, body) = self.with_key("/oauth/token", key, client_id, &form).await;
        (status, body)
    }

    /// `GET /oauth/grant` with the token: the bearer extractor's answer.
    pub(crate) async fn use_token(&self, access_token: &str) -> reqwest::Response {
        self.app
            .client
            .get(self.url("/oauth/grant"))
            .bearer_auth(access_token)
            .send()
            .await
            .expect("grant")
    }

    pub(crate) async fn introspect(&self, key: &BackendKey, client_id: &str, token: &str) -> Value {
        let (status, _, body) = self
            .with_key("/oauth/introspect", key, client_id, &[("token", token)])
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    /// A whole authorisation for a key client: returns the token response.
    pub(crate) async fn tokens(
        &self,
        key: &BackendKey,
        client_id: &str,
        consent_id: &str,
    ) -> Value {
        let (request_id, verifier) = self.start(client_id).await;
        let code = self.approve(&request_id, consent_id, SCOPE).await;
        let (status, body) = self.exchange(key, client_id, &code, &verifier).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    pub(crate) async fn stop(self) {
        self.app.stop().await;
    }
}

pub(crate) fn location(response: &reqwest::Response) -> String {
    response
        .headers()
        .get(header::LOCATION)
        .expect("Location")
        .to_str()
        .expect("ascii")
        .to_string()
}

pub(crate) fn query_of(url: &str) -> HashMap<String, String> {
    reqwest::Url::parse(url)
        .expect("url")
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn str_of<'a>(body: &'a Value, name: &str) -> &'a str {
    body[name]
        .as_str()
        .unwrap_or_else(|| panic!("{name} in {body}"))
}

fn assert_oauth_error(status: StatusCode, body: &Value, expected_status: StatusCode, error: &str) {
    assert_eq!(status, expected_status, "{body}");
    assert_eq!(body["error"], error, "{body}");
    assert!(body["error_description"].is_string(), "{body}");
}

async fn operators_register_clients_with_a_compliance_declaration(engine: Engine) {
    let env = env(engine).await;
    let key = BackendKey::generate_es384();
    let key_client = env.key_client(&key).await;
    let (secret_client, secret) = env.secret_client().await;
    assert!(secret.len() >= 43);

    let listed: Value = env
        .app
        .client
        .get(env.url("/operator/clients"))
        .bearer_auth(&env.operator)
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    let clients = listed["clients"].as_array().expect("clients");
    assert_eq!(clients.len(), 2);
    let text = listed.to_string();
    assert!(!text.contains(&secret), "the secret is shown only once");
    let by_id = |id: &str| {
        clients
            .iter()
            .find(|c| c["client_id"] == id)
            .expect("listed")
    };
    assert_eq!(
        by_id(&key_client)["token_endpoint_auth_method"],
        "private_key_jwt"
    );
    assert_eq!(
        by_id(&key_client)["recipient"]["identifier"],
        "1234567890123"
    );
    assert_eq!(by_id(&key_client)["compliance"]["declared"], true);
    assert_eq!(
        by_id(&secret_client)["token_endpoint_auth_method"],
        "client_secret_basic"
    );
    let stored: String = sqlx::Row::get(
        &sqlx::query("SELECT secret_hash FROM oauth_clients WHERE id = $1")
            .bind(&secret_client)
            .fetch_one(env.app.gateway().state.db.read_pool())
            .await
            .expect("row"),
        0,
    );
    assert!(stored.starts_with("$argon2id$") && !stored.contains(&secret));

    // Each bad registration is a 400 problem and stores nothing.
    let key_auth = json!({"token_endpoint_auth_method": "private_key_jwt", "jwks": {"keys": [key.public_jwk()]}});
    let mut undeclared = registration(key_auth.clone());
    undeclared["compliance"]["declared"] = json!(false);
    let mut no_compliance = registration(key_auth.clone());
    no_compliance
        .as_object_mut()
        .expect("obj")
        .remove("compliance");
    let mut plain_http = registration(key_auth.clone());
    plain_http["redirect_uris"] = json!(["http://app.example.jp/cb"]);
    let mut private_key = registration(key_auth.clone());
    private_key["jwks"]["keys"][0]["d"] = json!("AAAA");
    let mut future = registration(key_auth.clone());
    future["compliance"]["declared_on"] = json!("2999-01-01");
    let mut no_recipient = registration(key_auth.clone());
    no_recipient["recipient"]["identifier"] = json!(" ");
    let jwks_for_secret = registration(
        json!({"token_endpoint_auth_method": "client_secret_basic", "jwks": {"keys": [key.public_jwk()]}}),
    );
    let post = registration(json!({"token_endpoint_auth_method": "client_secret_post"}));
    for (bad, why) in [
        (undeclared, "declare compliance"),
        (no_compliance, "compliance"),
        (plain_http, "https"),
        (private_key, "private"),
        (future, "future"),
        (no_recipient, "recipient.identifier"),
        (jwks_for_secret, "no jwks"),
        (post, "client_secret_post"),
    ] {
        let response = env.register(&bad).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{why}");
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
        let problem: Value = response.json().await.expect("problem");
        assert!(
            problem["detail"].as_str().expect("detail").contains(why),
            "{why}: {problem}"
        );
    }
    let patient = env
        .app
        .sign_in(AccountRole::Patient, "pat", Some("patient-1"))
        .await;
    let as_patient = env
        .app
        .client
        .post(env.url("/operator/clients"))
        .bearer_auth(&patient)
        .json(&registration(key_auth))
        .send()
        .await
        .expect("patient");
    assert_eq!(as_patient.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        crate::helpers::count(&env.app, "SELECT COUNT(*) FROM oauth_clients").await,
        2
    );
    assert_eq!(
        leaves_containing(&env.app, "oauth-client-registered").await,
        2
    );
    env.stop().await;
}

async fn code_flow_with_private_key_jwt_refresh_introspect_and_revoke(engine: Engine) {
    let env = env(engine).await;
    let discovery: Value = env
        .app
        .client
        .get(env.url("/.well-known/smart-configuration"))
        .send()
        .await
        .expect("discovery")
        .json()
        .await
        .expect("json");
    assert_eq!(discovery["token_endpoint"], env.token_url());
    assert_eq!(discovery["issuer"], env.app.base);
    assert_eq!(
        discovery["authorization_response_iss_parameter_supported"],
        true
    );
    assert_eq!(
        discovery["authorization_endpoint"],
        env.url("/oauth/authorize")
    );
    assert_eq!(discovery["jwks_uri"], env.url("/.well-known/jwks.json"));
    assert_eq!(
        discovery["code_challenge_methods_supported"],
        json!(["S256"])
    );
    assert_eq!(
        discovery["token_endpoint_auth_signing_alg_values_supported"],
        json!(["RS384", "ES384"])
    );
    let capabilities = discovery["capabilities"].to_string();
    assert!(capabilities.contains("client-confidential-asymmetric"));
    assert!(!capabilities.contains("client-public"));
    assert!(capabilities.contains("sso-openid-connect"));
    assert_eq!(
        discovery["id_token_signing_alg_values_supported"],
        json!(["ES384"])
    );

    let key = BackendKey::generate_es384();
    let client_id = env.key_client(&key).await;
    let (request_id, verifier) = env.start(&client_id).await;

    // What the consent page shows.
    let db = &env.app.gateway().state.db;
    let pending = oauth::pending_request(db, &request_id)
        .await
        .expect("pending")
        .expect("waiting");
    assert_eq!(pending.client_id, client_id);
    assert_eq!(pending.client_name, "けんこう手帳アプリ");
    assert_eq!(pending.recipient.identifier, "1234567890123");
    assert!(pending.compliance.declared);
    assert_eq!(pending.redirect_uri, REDIRECT);
    assert_eq!(pending.state, "st-123");
    assert!(pending.offline_access);
    assert_eq!(
        pending.categories,
        vec![
            phr_consent::DataCategory::Observations,
            phr_consent::DataCategory::Medications
        ]
    );
    assert!(pending.expires_at > phr_gateway::store::now_millis());

    // The patient grants observations only (narrower than asked).
    let code = env
        .approve(
            &request_id,
            "consent-1",
            "launch/patient patient/Observation.rs offline_access",
        )
        .await;
    assert!(oauth::pending_request(db, &request_id)
        .await
        .expect("read")
        .is_none());
    assert!(
        oauth::decline(db, &request_id).await.is_err(),
        "a request is decided once"
    );
    let (status, tokens) = env.exchange(&key, &client_id, &code, &verifier).await;
    assert_eq!(status, StatusCode::OK, "{tokens}");
    assert_eq!(tokens["token_type"], "Bearer");
    assert!(tokens["expires_in"].as_u64().expect("expires_in") <= 300);
    assert_eq!(tokens["patient"], "patient-1");
    assert_eq!(
        tokens["scope"],
        "launch/patient offline_access patient/Observation.rs"
    );
    let access = str_of(&tokens, "access_token").to_string();
    let refresh = str_of(&tokens, "refresh_token").to_string();
    assert_eq!(
        crate::helpers::count(&env.app, "SELECT COUNT(*) FROM oauth_tokens").await,
        2
    );

    let grant = env.use_token(&access).await;
    assert_eq!(grant.status(), StatusCode::OK);
    let grant: Value = grant.json().await.expect("json");
    assert_eq!(grant["client_id"], client_id.as_str());
    assert_eq!(grant["consent_id"], "consent-1");
    assert_eq!(grant["patient"], "patient-1");

    let info = env.introspect(&key, &client_id, &access).await;
    assert_eq!(info["active"], true);
    assert_eq!(info["client_id"], client_id.as_str());
    assert_eq!(info["patient"], "patient-1");
    assert_eq!(info["consent_id"], "consent-1");
    assert!(info["exp"].as_i64().expect("exp") > 0);
    let unknown = env.introspect(&key, &client_id, "no-such-token").await;
    assert_eq!(unknown, json!({"active": false}));

    // Refresh: a new pair; the old refresh token is spent, narrowing is allowed.
    let (status, rotated) = env
        .refresh(&key, &client_id, &refresh, Some("patient/Observation.r"))
        .await;
    assert_eq!(status, StatusCode::OK, "{rotated}");
    assert_eq!(rotated["scope"], "patient/Observation.r");
    assert_eq!(rotated["patient"], "patient-1");
    let refresh2 = str_of(&rotated, "refresh_token").to_string();
    let access2 = str_of(&rotated, "access_token").to_string();
    assert_ne!(refresh2, refresh);
    assert_eq!(
        env.introspect(&key, &client_id, &refresh).await["active"],
        false
    );
    let info2 = env.introspect(&key, &client_id, &refresh2).await;
    assert_eq!(info2["active"], true);
    assert_eq!(info2["token_type"], "refresh_token");
    assert_eq!(
        info2["scope"], "launch/patient offline_access patient/Observation.rs",
        "a rotated refresh token keeps the original grant"
    );

    // Revoking the refresh token revokes the family.
    let (status, _, _) = env
        .with_key(
            "/oauth/revoke",
            &key,
            &client_id,
            &[("token", &refresh2), ("token_type_hint", "refresh_token")],
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    for token in [&access, &access2, &refresh2] {
        assert_eq!(
            env.introspect(&key, &client_id, token).await["active"],
            false
        );
    }
    let refused = env.use_token(&access2).await;
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    // Revoking an unknown token is a 200 too.
    let (status, _, _) = env
        .with_key("/oauth/revoke", &key, &client_id, &[("token", "whatever")])
        .await;
    assert_eq!(status, StatusCode::OK);

    for (needle, n) in [
        ("oauth-authorization-requested", 1),
        ("oauth-code-issued", 1),
        ("oauth-token-issued", 1),
        ("oauth-token-refreshed", 1),
        ("oauth-token-revoked", 1),
    ] {
        assert_eq!(leaves_containing(&env.app, needle).await, n, "{needle}");
    }
    // Codes and tokens are stored only as digests.
    let stored = sqlx::query("SELECT token_hash FROM oauth_tokens")
        .fetch_all(db.read_pool())
        .await
        .expect("rows");
    assert!(stored
        .iter()
        .all(|r| sqlx::Row::get::<Vec<u8>, _>(r, 0).len() == 32));
    env.stop().await;
}

async fn client_secret_basic_and_client_credentials(engine: Engine) {
    let env = env(engine).await;
    let (client_id, secret) = env.secret_client().await;
    let (request_id, verifier) = env.start(&client_id).await;
    let code = env.approve(&request_id, "consent-2", SCOPE).await;
    let form = [
        ("grant_type", "authorization_code"),
        ("code", code.as_str()),
        ("redirect_uri", REDIRECT),
        ("code_verifier", verifier.as_str()),
    ];
    let (status, headers, body) = env
        .post_form("/oauth/token", &form, Some((&client_id, "wrong secret")))
        .await;
    assert_oauth_error(status, &body, StatusCode::UNAUTHORIZED, "invalid_client");
    assert!(headers[header::WWW_AUTHENTICATE]
        .to_str()
        .expect("ascii")
        .starts_with("Basic"));
    let (status, _, body) = env.post_form("/oauth/token", &form, None).await;
    assert_oauth_error(status, &body, StatusCode::UNAUTHORIZED, "invalid_client");
    let mut post = form.to_vec();
    post.push(("client_id", &client_id));
    post.push(("client_secret", &secret));
    let (status, _, body) = env.post_form("/oauth/token", &post, None).await;
    assert_oauth_error(status, &body, StatusCode::UNAUTHORIZED, "invalid_client");
    // The code survived the failed client authentications.
    let (status, _, body) = env
        .post_form("/oauth/token", &form, Some((&client_id, &secret)))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["refresh_token"].is_string());
    let (status, _, body) = env
        .post_form(
            "/oauth/token",
            &[
                ("grant_type", "client_credentials"),
                ("scope", "system/Observation.rs"),
            ],
            Some((&client_id, &secret)),
        )
        .await;
    assert_oauth_error(
        status,
        &body,
        StatusCode::BAD_REQUEST,
        "unauthorized_client",
    );

    // Backend clients: system scopes only, no patient, no refresh token.
    let key = BackendKey::generate_es384();
    let backend = env.key_client(&key).await;
    let (status, _, body) = env
        .with_key(
            "/oauth/token",
            &key,
            &backend,
            &[
                ("grant_type", "client_credentials"),
                ("scope", "system/Observation.rs system/Immunization.read"),
            ],
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["scope"],
        "system/Immunization.rs system/Observation.rs"
    );
    assert!(body.get("patient").is_none() && body.get("refresh_token").is_none());
    let grant: Value = env
        .use_token(str_of(&body, "access_token"))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(grant["patient"], Value::Null);
    assert_eq!(grant["consent_id"], Value::Null);
    for (scope, error) in [
        ("patient/Observation.rs", "invalid_scope"),
        ("system/Observation.write", "invalid_scope"),
        ("", "invalid_scope"),
    ] {
        let (status, _, body) = env
            .with_key(
                "/oauth/token",
                &key,
                &backend,
                &[("grant_type", "client_credentials"), ("scope", scope)],
            )
            .await;
        assert_oauth_error(status, &body, StatusCode::BAD_REQUEST, error);
    }
    let (status, _, body) = env
        .with_key(
            "/oauth/token",
            &key,
            &backend,
            &[("grant_type", "password")],
        )
        .await;
    assert_oauth_error(
        status,
        &body,
        StatusCode::BAD_REQUEST,
        "unsupported_grant_type",
    );
    assert_eq!(leaves_containing(&env.app, "invalid_client").await, 3);
    assert_eq!(leaves_containing(&env.app, "unauthorized_client").await, 1);
    assert_eq!(leaves_containing(&env.app, "invalid_scope").await, 3);
    env.stop().await;
}

async fn bad_authorization_requests_are_refused_and_bad_redirects_never_followed(engine: Engine) {
    let env = env(engine).await;
    let key = BackendKey::generate_es384();
    let client_id = env.key_client(&key).await;
    let (_, challenge) = pkce_s256_pair();
    let good = env.authorize_params(&client_id, &challenge);
    let with = |name: &str, value: Option<&str>| -> Vec<(String, String)> {
        let mut params: Vec<(String, String)> =
            good.iter().filter(|(k, _)| k != name).cloned().collect();
        if let Some(value) = value {
            params.push((name.to_string(), value.to_string()));
        }
        params
    };

    // Never redirected: unknown client, unregistered redirect URI, missing state.
    for (params, why) in [
        (
            with("client_id", Some("no-such-client")),
            "unknown client_id",
        ),
        (with("client_id", None), "unknown client_id"),
        (
            with("redirect_uri", Some("https://evil.example/cb")),
            "redirect_uri",
        ),
        (
            with("redirect_uri", Some("https://app.example.jp/callback/")),
            "redirect_uri",
        ),
        (with("redirect_uri", None), "redirect_uri"),
        (with("state", None), "state is required"),
    ] {
        let response = env.authorize(&params).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{why}");
        assert!(response.headers().get(header::LOCATION).is_none(), "{why}");
        let problem: Value = response.json().await.expect("problem");
        assert!(
            problem["detail"].as_str().expect("detail").contains(why),
            "{why}: {problem}"
        );
    }

    // Back to the app with the error and its state.
    for (params, error) in [
        (
            with("code_challenge_method", Some("plain")),
            "invalid_request",
        ),
        (with("code_challenge_method", None), "invalid_request"),
        (with("code_challenge", None), "invalid_request"),
        (with("code_challenge", Some("short")), "invalid_request"),
        (
            with("response_type", Some("token")),
            "unsupported_response_type",
        ),
        (
            with("aud", Some("https://elsewhere.example/fhir")),
            "invalid_request",
        ),
        (with("aud", None), "invalid_request"),
        (
            with("scope", Some("patient/Observation.write")),
            "invalid_scope",
        ),
        (
            with("scope", Some("patient/Observation.rs profile")),
            "invalid_scope",
        ),
        (
            with("scope", Some("system/Observation.rs")),
            "invalid_scope",
        ),
        (
            with("scope", Some("launch/patient offline_access")),
            "invalid_scope",
        ),
    ] {
        let response = env.authorize(&params).await;
        assert_eq!(response.status(), StatusCode::SEE_OTHER, "{error}");
        let back = location(&response);
        assert!(back.starts_with(REDIRECT), "{back}");
        let query = query_of(&back);
        assert_eq!(query["error"], error, "{back}");
        assert_eq!(query["state"], "st-123");
        assert_eq!(query["iss"], env.app.base);
        assert!(!query.contains_key("code"));
    }
    assert_eq!(
        crate::helpers::count(
            &env.app,
            "SELECT COUNT(*) FROM oauth_authorization_requests"
        )
        .await,
        0
    );
    assert_eq!(leaves_containing(&env.app, "oauth-refused").await, 17);
    assert_eq!(leaves_containing(&env.app, "invalid_scope").await, 4);

    // The patient declines: access_denied goes back with the state.
    let (request_id, _) = env.start(&client_id).await;
    let db = &env.app.gateway().state.db;
    let back = oauth::decline(db, &request_id).await.expect("decline");
    let query = query_of(&back);
    assert_eq!(query["error"], "access_denied");
    assert_eq!(query["state"], "st-123");
    assert_eq!(query["iss"], env.app.base);
    assert!(oauth::pending_request(db, &request_id)
        .await
        .expect("read")
        .is_none());
    let granted = oauth::scopes::parse_scopes(SCOPE).expect("scopes");
    assert!(
        oauth::approve(db, &request_id, "patient-1", "consent-1", &granted)
            .await
            .is_err(),
        "a declined request cannot be approved"
    );
    // An approval can only narrow what was asked.
    let (request_id, _) = env.start(&client_id).await;
    let wider =
        oauth::scopes::parse_scopes("patient/Observation.rs patient/Condition.rs").expect("scopes");
    assert!(
        oauth::approve(db, &request_id, "patient-1", "consent-1", &wider)
            .await
            .is_err()
    );
    assert!(
        oauth::pending_request(db, &request_id)
            .await
            .expect("read")
            .is_some(),
        "a refused approval leaves the request waiting"
    );
    assert!(oauth::pending_request(db, "no-such-request")
        .await
        .expect("read")
        .is_none());
    assert_eq!(
        leaves_containing(&env.app, "oauth-authorization-declined").await,
        1
    );
    env.stop().await;
}

async fn replayed_codes_and_pkce_mismatches_are_refused(engine: Engine) {
    let env = env(engine).await;
    let key = BackendKey::generate_es384();
    let client_id = env.key_client(&key).await;

    // A wrong verifier: invalid_grant, and the code is spent.
    let (request_id, verifier) = env.start(&client_id).await;
    let code = env.approve(&request_id, "consent-1", SCOPE).await;
    let (other_verifier, _) = pkce_s256_pair();
    let (status, body) = env.exchange(&key, &client_id, &code, &other_verifier).await;
    assert_oauth_error(status, &body, StatusCode::BAD_REQUEST, "invalid_grant");
    assert!(str_of(&body, "error_description").contains("PKCE"));
    let (status, body) = env.exchange(&key, &client_id, &code, &verifier).await;
    assert_oauth_error(status, &body, StatusCode::BAD_REQUEST, "invalid_grant");

    // A wrong redirect_uri: invalid_grant.
    let (request_id, verifier) = env.start(&client_id).await;
    let code = env.approve(&request_id, "consent-1", SCOPE).await;
    let (status, _, body) = env
        .with_key(
            "/oauth/token",
            &key,
            &client_id,
            &[
                ("grant_type", "authorization_code"),
                ("code", &code),
                ("redirect_uri", "http://localhost:8080/cb"),
                ("code_verifier", &verifier),
            ],
        )
        .await;
    assert_oauth_error(status, &body, StatusCode::BAD_REQUEST, "invalid_grant");

    // Another client cannot use the code.
    let other_key = BackendKey::generate_es384();
    let other_client = env.key_client(&other_key).await;
    let (request_id, verifier) = env.start(&client_id).await;
    let code = env.approve(&request_id, "consent-1", SCOPE).await;
    let (status, body) = env
        .exchange(&other_key, &other_client, &code, &verifier)
        .await;
    assert_oauth_error(status, &body, StatusCode::BAD_REQUEST, "invalid_grant");

    // A replayed code: refused, and the tokens issued from it are revoked.
    let (status, tokens) = env.exchange(&key, &client_id, &code, &verifier).await;
    assert_eq!(status, StatusCode::OK, "{tokens}");
    let access = str_of(&tokens, "access_token");
    assert_eq!(env.use_token(access).await.status(), StatusCode::OK);
    let (status, body) = env.exchange(&key, &client_id, &code, &verifier).await;
    assert_oauth_error(status, &body, StatusCode::BAD_REQUEST, "invalid_grant");
    assert_eq!(
        env.use_token(access).await.status(),
        StatusCode::UNAUTHORIZED
    );
    let (status, body) = env
        .refresh(&key, &client_id, str_of(&tokens, "refresh_token"), None)
        .await;
    assert_oauth_error(status, &body, StatusCode::BAD_REQUEST, "invalid_grant");

    let (status, body) = env
        .exchange(&key, &client_id, "made-up-code", &verifier)
        .await;
    assert_oauth_error(status, &body, StatusCode::BAD_REQUEST, "invalid_grant");

    // The spent (PKCE-failed) code and the replayed one.
    assert_eq!(leaves_containing(&env.app, "oauth-token-reuse").await, 2);
    assert!(leaves_containing(&env.app, "invalid_grant").await >= 7);
    env.stop().await;
}

async fn refresh_reuse_revokes_the_family_and_scopes_never_widen(engine: Engine) {
    let env = env(engine).await;
    let key = BackendKey::generate_es384();
    let client_id = env.key_client(&key).await;
    let tokens = env.tokens(&key, &client_id, "consent-1").await;
    let first = str_of(&tokens, "refresh_token").to_string();

    // Escalation is refused and leaves the refresh token usable.
    for scope in [
        "patient/Condition.rs",
        "patient/*.rs",
        "system/Observation.rs",
    ] {
        let (status, body) = env.refresh(&key, &client_id, &first, Some(scope)).await;
        assert_oauth_error(status, &body, StatusCode::BAD_REQUEST, "invalid_scope");
    }
    let (status, second) = env.refresh(&key, &client_id, &first, None).await;
    assert_eq!(status, StatusCode::OK, "{second}");
    assert_eq!(second["scope"], tokens["scope"]);
    let (status, third) = env
        .refresh(&key, &client_id, str_of(&second, "refresh_token"), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{third}");
    let newest_access = str_of(&third, "access_token");
    let newest_refresh = str_of(&third, "refresh_token");
    assert_eq!(env.use_token(newest_access).await.status(), StatusCode::OK);

    // The first refresh token comes back (stolen): the whole family goes.
    let (status, body) = env.refresh(&key, &client_id, &first, None).await;
    assert_oauth_error(status, &body, StatusCode::BAD_REQUEST, "invalid_grant");
    let refused = env.use_token(newest_access).await;
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    assert!(refused.headers()[header::WWW_AUTHENTICATE]
        .to_str()
        .expect("ascii")
        .contains("error=\"invalid_token\""));
    let (status, body) = env.refresh(&key, &client_id, newest_refresh, None).await;
    assert_oauth_error(status, &body, StatusCode::BAD_REQUEST, "invalid_grant");
    assert_eq!(
        crate::helpers::count(
            &env.app,
            "SELECT COUNT(*) FROM oauth_tokens WHERE revoked_at IS NULL"
        )
        .await,
        0
    );
    assert_eq!(leaves_containing(&env.app, "oauth-token-reuse").await, 1);
    assert_eq!(leaves_containing(&env.app, "invalid_scope").await, 3);
    assert_eq!(
        leaves_containing(&env.app, "oauth-token-refreshed").await,
        2
    );
    env.stop().await;
}

/// `{"alg":"RS256","typ":"JWT"}`, base64url.
const RS256_HEADER: &str = "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9";

/// An ES384 JWT of `claims` signed by `key`, its header naming `kid`.
fn signed(key: &BackendKey, kid: &str, claims: &Value) -> String {
    let pem = key.to_pem().expect("pem");
    let der = match rustls_pemfile::private_key(&mut pem.as_bytes())
        .expect("pem")
        .expect("key")
    {
        rustls::pki_types::PrivateKeyDer::Pkcs8(der) => der.secret_pkcs8_der().to_vec(),
        _ => panic!("PKCS#8 expected"),
    };
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES384);
    header.kid = Some(kid.to_string());
    jsonwebtoken::encode(
        &header,
        claims,
        &jsonwebtoken::EncodingKey::from_ec_der(&der),
    )
    .expect("sign")
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("time")
        .as_secs() as i64
}

async fn client_assertions_are_checked(engine: Engine) {
    let env = env(engine).await;
    let key = BackendKey::generate_es384();
    let client_id = env.key_client(&key).await;
    let token_url = env.token_url();
    let claims = |jti: &str| json!({"iss": client_id, "sub": client_id, "aud": token_url, "exp": now_secs() + 120, "jti": jti});
    let send = |assertion: String| {
        let env = &env;
        async move {
            env.post_form(
                "/oauth/token",
                &[
                    ("grant_type", "client_credentials"),
                    ("scope", "system/Observation.rs"),
                    (
                        "client_assertion_type",
                        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                    ),
                    ("client_assertion", &assertion),
                ],
                None,
            )
            .await
        }
    };
    let good = signed(&key, key.kid(), &claims("jti-1"));
    let (status, _, body) = send(good.clone()).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // RS256 in the header over a valid ES384 signature: refused before any key is tried.
    let es384 = signed(&key, key.kid(), &claims("jti-rs256"));
    let (_, rest) = es384.split_once('.').expect("jwt");
    let rs256 = format!("{RS256_HEADER}.{rest}");

    let stranger = BackendKey::generate_es384();
    let mut wrong_aud = claims("jti-3");
    wrong_aud["aud"] = json!(env.url("/oauth/introspect"));
    let mut far_exp = claims("jti-4");
    far_exp["exp"] = json!(now_secs() + 3600);
    let mut expired = claims("jti-5");
    expired["exp"] = json!(now_secs() - 60);
    let mut wrong_sub = claims("jti-6");
    wrong_sub["sub"] = json!("someone-else");
    let mut no_jti = claims("x");
    no_jti.as_object_mut().expect("obj").remove("jti");
    let mut unknown_client = claims("jti-7");
    unknown_client["iss"] = json!("no-such-client");
    unknown_client["sub"] = json!("no-such-client");
    for (assertion, why) in [
        (good, "replayed jti"),
        (rs256, "RS256"),
        (
            signed(&stranger, key.kid(), &claims("jti-2")),
            "another key",
        ),
        (signed(&key, key.kid(), &wrong_aud), "aud"),
        (signed(&key, key.kid(), &far_exp), "exp far ahead"),
        (signed(&key, key.kid(), &expired), "expired"),
        (signed(&key, key.kid(), &wrong_sub), "sub"),
        (signed(&key, key.kid(), &no_jti), "no jti"),
        (signed(&key, key.kid(), &unknown_client), "unknown client"),
    ] {
        let (status, headers, body) = send(assertion).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{why}: {body}");
        assert_eq!(body["error"], "invalid_client", "{why}");
        assert!(headers.contains_key(header::WWW_AUTHENTICATE), "{why}");
    }
    let (status, _, body) = env
        .post_form(
            "/oauth/token",
            &[
                ("grant_type", "client_credentials"),
                (
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:saml2-bearer",
                ),
                (
                    "client_assertion",
                    &signed(&key, key.kid(), &claims("jti-8")),
                ),
            ],
            None,
        )
        .await;
    assert_oauth_error(status, &body, StatusCode::UNAUTHORIZED, "invalid_client");
    // A repeated parameter is refused outright.
    let (status, _, body) = env
        .post_form(
            "/oauth/token",
            &[
                ("grant_type", "client_credentials"),
                ("grant_type", "refresh_token"),
            ],
            None,
        )
        .await;
    assert_oauth_error(status, &body, StatusCode::BAD_REQUEST, "invalid_request");
    assert_eq!(leaves_containing(&env.app, "invalid_client").await, 10);
    assert_eq!(
        crate::helpers::count(&env.app, "SELECT COUNT(*) FROM oauth_assertion_jtis").await,
        1,
        "only the accepted assertion's jti is kept"
    );
    env.stop().await;
}

async fn forged_and_expired_access_tokens_are_refused(engine: Engine) {
    let env = env_with(engine, |c| c.oauth.access_token_secs = 1).await;
    let key = BackendKey::generate_es384();
    let client_id = env.key_client(&key).await;
    let tokens = env.tokens(&key, &client_id, "consent-1").await;
    assert_eq!(tokens["expires_in"], 1);
    let access = str_of(&tokens, "access_token");

    let missing = env
        .app
        .client
        .get(env.url("/oauth/grant"))
        .send()
        .await
        .expect("no token");
    assert_eq!(missing.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        missing.headers()[header::WWW_AUTHENTICATE],
        "Bearer realm=\"phr-gateway\""
    );

    let forged = env
        .use_token("Zm9yZ2VkLXRva2VuLWZvcmdlZC10b2tlbi1mb3JnZWQtdG9rZW4")
        .await;
    assert_eq!(forged.status(), StatusCode::UNAUTHORIZED);
    assert!(forged.headers()[header::WWW_AUTHENTICATE]
        .to_str()
        .expect("ascii")
        .contains("error=\"invalid_token\""));
    assert_eq!(
        forged.headers()[header::CONTENT_TYPE],
        "application/problem+json"
    );
    // A refresh token is not an access token.
    let wrong_kind = env.use_token(str_of(&tokens, "refresh_token")).await;
    assert_eq!(wrong_kind.status(), StatusCode::UNAUTHORIZED);

    tokio::time::sleep(Duration::from_millis(1200)).await;
    let expired = env.use_token(access).await;
    assert_eq!(expired.status(), StatusCode::UNAUTHORIZED);
    let problem: Value = expired.json().await.expect("problem");
    assert!(problem["detail"]
        .as_str()
        .expect("detail")
        .contains("expired"));
    assert_eq!(
        env.introspect(&key, &client_id, access).await["active"],
        false
    );
    // The refresh token outlives the access token.
    let (status, body) = env
        .refresh(&key, &client_id, str_of(&tokens, "refresh_token"), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(leaves_containing(&env.app, "invalid_token").await, 3);
    env.stop().await;
}

async fn withdrawing_a_consent_revokes_its_tokens(engine: Engine) {
    let env = env(engine).await;
    let key = BackendKey::generate_es384();
    let client_id = env.key_client(&key).await;
    let first = env.tokens(&key, &client_id, "consent-w").await;
    let second = env.tokens(&key, &client_id, "consent-w").await;
    let other = env.tokens(&key, &client_id, "consent-other").await;
    // A code approved under the consent but not yet exchanged dies too.
    let (request_id, verifier) = env.start(&client_id).await;
    let code = env.approve(&request_id, "consent-w", SCOPE).await;

    let db = &env.app.gateway().state.db;
    let revoked = oauth::revoke_by_consent(db, "consent-w")
        .await
        .expect("revoke");
    assert_eq!(revoked, 4, "two access and two refresh tokens");
    for tokens in [&first, &second] {
        assert_eq!(
            env.use_token(str_of(tokens, "access_token")).await.status(),
            StatusCode::UNAUTHORIZED
        );
        let (status, body) = env
            .refresh(&key, &client_id, str_of(tokens, "refresh_token"), None)
            .await;
        assert_oauth_error(status, &body, StatusCode::BAD_REQUEST, "invalid_grant");
    }
    let (status, body) = env.exchange(&key, &client_id, &code, &verifier).await;
    assert_oauth_error(status, &body, StatusCode::BAD_REQUEST, "invalid_grant");
    assert_eq!(
        env.use_token(str_of(&other, "access_token")).await.status(),
        StatusCode::OK,
        "other consents are untouched"
    );
    assert!(leaves_containing(&env.app, "Consent/consent-w").await >= 1);
    assert_eq!(leaves_containing(&env.app, "oauth-token-revoked").await, 1);
    env.stop().await;
}

async fn rsa_clients_sign_with_rs384_and_rs256_is_refused(engine: Engine) {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;
    use rsa::pkcs1::EncodeRsaPrivateKey;
    use rsa::traits::PublicKeyParts;

    let env = env(engine).await;
    let jwk_of = |key: &rsa::RsaPrivateKey, kid: &str| {
        json!({
            "kty": "RSA",
            "kid": kid,
            "alg": "RS384",
            "n": URL_SAFE_NO_PAD.encode(key.n().to_bytes_be()),
            "e": URL_SAFE_NO_PAD.encode(key.e().to_bytes_be()),
        })
    };
    let weak = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 1024).expect("rsa 1024");
    let response = env
        .register(&registration(json!({
            "token_endpoint_auth_method": "private_key_jwt",
            "jwks": {"keys": [jwk_of(&weak, "weak")]}
        })))
        .await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let problem: Value = response.json().await.expect("problem");
    assert!(problem["detail"].as_str().expect("detail").contains("2048"));

    let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).expect("rsa 2048");
    let response = env
        .register(&registration(json!({
            "token_endpoint_auth_method": "private_key_jwt",
            "jwks": {"keys": [jwk_of(&key, "rsa-1")]}
        })))
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let client_id = response.json::<Value>().await.expect("json")["client_id"]
        .as_str()
        .expect("client_id")
        .to_string();
    let der = key.to_pkcs1_der().expect("der");
    let encoding = jsonwebtoken::EncodingKey::from_rsa_der(der.as_bytes());
    let sign = |alg: jsonwebtoken::Algorithm, jti: &str| {
        let mut header = jsonwebtoken::Header::new(alg);
        header.kid = Some("rsa-1".into());
        let claims = json!({"iss": client_id, "sub": client_id, "aud": env.token_url(),
            "exp": now_secs() + 120, "jti": jti});
        jsonwebtoken::encode(&header, &claims, &encoding).expect("sign")
    };
    let send = |assertion: String| {
        let env = &env;
        async move {
            env.post_form(
                "/oauth/token",
                &[
                    ("grant_type", "client_credentials"),
                    ("scope", "system/Immunization.rs"),
                    (
                        "client_assertion_type",
                        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                    ),
                    ("client_assertion", &assertion),
                ],
                None,
            )
            .await
        }
    };
    let (status, _, body) = send(sign(jsonwebtoken::Algorithm::RS384, "rs384")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for alg in [
        jsonwebtoken::Algorithm::RS256,
        jsonwebtoken::Algorithm::RS512,
        jsonwebtoken::Algorithm::PS384,
    ] {
        let (status, _, body) = send(sign(alg, &format!("{alg:?}"))).await;
        assert_oauth_error(status, &body, StatusCode::UNAUTHORIZED, "invalid_client");
        assert!(
            str_of(&body, "error_description").contains("not accepted"),
            "{body}"
        );
    }
    assert_eq!(leaves_containing(&env.app, "is not accepted").await, 3);
    env.stop().await;
}

async fn expired_records_are_purged_and_live_ones_kept(engine: Engine) {
    let env = env(engine).await;
    let key = BackendKey::generate_es384();
    let client_id = env.key_client(&key).await;
    let old = env.tokens(&key, &client_id, "consent-old").await;
    let live = env.tokens(&key, &client_id, "consent-live").await;
    let db = &env.app.gateway().state.db;
    // The first grant's request, code and tokens expired long ago.
    for sql in [
        "UPDATE oauth_authorization_requests SET expires_at = 0 WHERE id IN
             (SELECT request_id FROM oauth_codes WHERE consent_id = 'consent-old')",
        "UPDATE oauth_codes SET expires_at = 0 WHERE consent_id = 'consent-old'",
        "UPDATE oauth_tokens SET expires_at = 0 WHERE consent_id = 'consent-old'",
    ] {
        sqlx::query(sql)
            .execute(db.write_pool())
            .await
            .expect("age");
    }
    let purged = oauth::housekeeping::purge_expired(db, phr_gateway::store::now_millis())
        .await
        .expect("purge");
    assert_eq!(purged.tokens, 2, "access and refresh token: {purged:?}");
    assert_eq!(purged.codes, 1);
    assert_eq!(purged.requests, 1);
    assert_eq!(
        count(
            &env.app,
            "SELECT COUNT(*) FROM oauth_tokens WHERE consent_id = 'consent-old'"
        )
        .await,
        0
    );
    // Nothing live is touched, and a second purge finds nothing.
    let access = live["access_token"].as_str().expect("access");
    assert_eq!(env.use_token(access).await.status(), StatusCode::OK);
    let old_access = old["access_token"].as_str().expect("access");
    assert_eq!(
        env.use_token(old_access).await.status(),
        StatusCode::UNAUTHORIZED
    );
    let again = oauth::housekeeping::purge_expired(db, phr_gateway::store::now_millis())
        .await
        .expect("purge");
    assert_eq!(again.tokens + again.codes + again.requests, 0);
    env.stop().await;
}
