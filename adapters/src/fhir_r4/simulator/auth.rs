//! The simulator's SMART authorisation server: discovery, the patient login and consent
//! pages, the token endpoint (authorization_code + PKCE, refresh_token, client_credentials
//! with private_key_jwt) and revocation.

use std::time::{Duration, Instant};

use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use maud::{html, Markup, DOCTYPE};
use serde_json::json;
use std::sync::Arc;

use super::{SimulatorState, Table};
use crate::oauth::{self, pkce_matches, random_url_token};
use crate::simulator_web::{first, form_pairs, json_response, oauth_error, redirect_to};

/// A login ticket (between the login form and the consent buttons) lives this long.
const TICKET_LIFETIME: Duration = Duration::from_secs(600);
const CODE_LIFETIME: Duration = Duration::from_secs(60);
const BACKEND_TOKEN_LIFETIME: Duration = Duration::from_secs(300);

const PAGE_STYLE: &str = "body{font-family:sans-serif;max-width:32rem;margin:2rem auto;padding:0 1rem}\
label{display:block;margin-top:1rem}input[type=text],input[type=password]{width:100%;padding:.4rem}\
.error{color:#a00}.choices{display:flex;gap:1rem;margin-top:1.5rem}\
.choices button,.login{flex:1;font-size:1rem;padding:.6rem;border:1px solid #333;background:#fff;color:#000}";

#[derive(Default)]
pub(crate) struct AuthState {
    tickets: Table<LoginTicket>,
    codes: Table<IssuedCode>,
    access_tokens: Table<AccessGrant>,
    refresh_tokens: Table<RefreshGrant>,
    /// Backend assertion `jti`s already used, with their `exp`, to refuse replays.
    used_jtis: Table<i64>,
}

/// What an access token lets its holder do.
#[derive(Debug, Clone)]
pub(crate) struct AccessGrant {
    /// The patient in context; `None` for a backend (system) token.
    pub(crate) patient_id: Option<String>,
    pub(crate) scopes: Vec<String>,
    pub(crate) expires_at: Instant,
}

struct RefreshGrant {
    patient_id: String,
    scopes: Vec<String>,
    client_id: String,
}

struct IssuedCode {
    patient_id: String,
    client_id: String,
    redirect_uri: String,
    scopes: Vec<String>,
    code_challenge: String,
    code_challenge_method: String,
    expires_at: Instant,
}

struct LoginTicket {
    patient_id: String,
    request: AuthorizeRequest,
    expires_at: Instant,
}

impl AuthState {
    pub(crate) fn expire_access_tokens(&mut self) {
        let past = Instant::now()
            .checked_sub(Duration::from_secs(1))
            .unwrap_or_else(Instant::now);
        for grant in self.access_tokens.values_mut() {
            grant.expires_at = past;
        }
    }

    /// The grant behind a bearer token, if it is known and unexpired.
    pub(crate) fn access_grant(&self, token: &str) -> Option<AccessGrant> {
        self.access_tokens
            .get(token)
            .filter(|grant| grant.expires_at > Instant::now())
            .cloned()
    }
}

/// The parameters of `GET /authorize`, carried through the login and consent forms.
#[derive(Debug, Clone)]
struct AuthorizeRequest {
    client_id: String,
    redirect_uri: String,
    scopes: Vec<String>,
    state: String,
    aud: String,
    code_challenge: String,
    code_challenge_method: String,
}

impl AuthorizeRequest {
    fn from_pairs(pairs: &[(String, String)], server: &SimulatorState) -> Result<Self, String> {
        let field = |name: &str| first(pairs, name).unwrap_or_default().to_string();
        if field("response_type") != "code" {
            return Err("response_type must be code".into());
        }
        let client_id = field("client_id");
        if client_id != server.config.client_id {
            return Err(format!("unknown client_id {client_id:?}"));
        }
        let redirect_uri = field("redirect_uri");
        match url::Url::parse(&redirect_uri) {
            Ok(url) if url.scheme() == "https" || url.scheme() == "http" => {}
            _ => return Err("redirect_uri must be an absolute http(s) URL".into()),
        }
        let state = field("state");
        if state.is_empty() {
            return Err("state is required".into());
        }
        let aud = field("aud");
        if aud.trim_end_matches('/') != server.base_url {
            return Err(format!("aud {aud:?} is not this FHIR server"));
        }
        let code_challenge = field("code_challenge");
        if code_challenge.is_empty() {
            return Err("PKCE code_challenge is required".into());
        }
        // RFC 7636: an absent method means plain.
        let code_challenge_method = first(pairs, "code_challenge_method")
            .unwrap_or("plain")
            .to_string();
        if !server.config.pkce_methods.contains(&code_challenge_method) {
            return Err(format!(
                "code_challenge_method {code_challenge_method} is not supported"
            ));
        }
        let scopes: Vec<String> = field("scope")
            .split_whitespace()
            .map(str::to_string)
            .collect();
        if scopes.is_empty() {
            return Err("scope is required".into());
        }
        Ok(AuthorizeRequest {
            client_id,
            redirect_uri,
            scopes,
            state,
            aud,
            code_challenge,
            code_challenge_method,
        })
    }

    /// The request as hidden form fields, so the login form can post it back.
    fn hidden_fields(&self) -> Vec<(&'static str, String)> {
        vec![
            ("response_type", "code".into()),
            ("client_id", self.client_id.clone()),
            ("redirect_uri", self.redirect_uri.clone()),
            ("scope", self.scopes.join(" ")),
            ("state", self.state.clone()),
            ("aud", self.aud.clone()),
            ("code_challenge", self.code_challenge.clone()),
            ("code_challenge_method", self.code_challenge_method.clone()),
        ]
    }
}

pub(crate) async fn smart_configuration(State(server): State<Arc<SimulatorState>>) -> Response {
    let base = &server.base_url;
    json_response(
        StatusCode::OK,
        &json!({
            "issuer": base,
            "authorization_endpoint": format!("{base}/authorize"),
            "token_endpoint": format!("{base}/token"),
            "revocation_endpoint": format!("{base}/revoke"),
            "token_endpoint_auth_methods_supported": ["none", "private_key_jwt"],
            "token_endpoint_auth_signing_alg_values_supported": ["ES384", "RS384"],
            "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials"],
            "response_types_supported": ["code"],
            "code_challenge_methods_supported": server.config.pkce_methods,
            "scopes_supported": [
                "launch/patient", "openid", "fhirUser", "offline_access",
                "patient/*.rs", "system/*.rs"
            ],
            "capabilities": [
                "launch-standalone", "client-public", "client-confidential-asymmetric",
                "context-standalone-patient", "permission-offline", "permission-patient",
                "permission-v1", "permission-v2"
            ]
        }),
    )
}

fn error_page(status: StatusCode, message: &str) -> Response {
    let page = html! {
        (DOCTYPE)
        html lang="ja" {
            head { meta charset="utf-8"; title { "エラー" } style { (PAGE_STYLE) } }
            body { main { h1 { "認可要求を処理できません" } p.error role="alert" { (message) } } }
        }
    };
    (status, Html(page.into_string())).into_response()
}

fn login_page(server: &SimulatorState, request: &AuthorizeRequest, error: Option<&str>) -> Markup {
    html! {
        (DOCTYPE)
        html lang="ja" {
            head { meta charset="utf-8"; title { "患者ポータル ログイン" } style { (PAGE_STYLE) } }
            body {
                main {
                    h1 { "シミュレーション病院 患者ポータル" }
                    p { "アプリ「" (request.client_id) "」があなたの診療記録へのアクセスを求めています。ログインしてください。" }
                    @if let Some(error) = error { p.error role="alert" { (error) } }
                    form method="post" action={ (server.base_url) "/authorize/login" } {
                        @for (name, value) in request.hidden_fields() {
                            input type="hidden" name=(name) value=(value);
                        }
                        label for="username" { "ユーザー名" }
                        input #username type="text" name="username" autocomplete="username" required;
                        label for="password" { "パスワード" }
                        input #password type="password" name="password" autocomplete="current-password" required;
                        p { button.login type="submit" { "ログイン" } }
                    }
                }
            }
        }
    }
}

fn scope_label(scope: &str) -> String {
    let described = match scope {
        "launch/patient" => "あなたを患者として選択する",
        "openid" | "fhirUser" => "あなたが誰かを確認する",
        "offline_access" => "ログアウト後も継続してアクセスする",
        _ => "",
    };
    if !described.is_empty() {
        return described.to_string();
    }
    match scope
        .strip_prefix("patient/")
        .and_then(|rest| rest.split('.').next())
    {
        Some(resource_type) => format!("{resource_type} の閲覧"),
        None => scope.to_string(),
    }
}

fn consent_page(
    server: &SimulatorState,
    request: &AuthorizeRequest,
    patient_name: &str,
    ticket: &str,
) -> Markup {
    html! {
        (DOCTYPE)
        html lang="ja" {
            head { meta charset="utf-8"; title { "アクセスの許可" } style { (PAGE_STYLE) } }
            body {
                main {
                    h1 { (patient_name) " 様" }
                    p { "アプリ「" (request.client_id) "」に次の情報へのアクセスを許可しますか。許可しない項目のチェックを外してください。" }
                    form method="post" action={ (server.base_url) "/authorize/decision" } {
                        input type="hidden" name="ticket" value=(ticket);
                        @for scope in &request.scopes {
                            label {
                                input type="checkbox" name="scope" value=(scope) checked;
                                " " (scope_label(scope)) " (" code { (scope) } ")"
                            }
                        }
                        // Both answers look the same: the page must not steer the patient.
                        div.choices {
                            button type="submit" name="decision" value="approve" { "許可する" }
                            button type="submit" name="decision" value="deny" { "許可しない" }
                        }
                    }
                }
            }
        }
    }
}

pub(crate) async fn authorize_page(
    State(server): State<Arc<SimulatorState>>,
    RawQuery(query): RawQuery,
) -> Response {
    let pairs = form_pairs(query.as_deref().unwrap_or_default());
    match AuthorizeRequest::from_pairs(&pairs, &server) {
        Ok(request) => Html(login_page(&server, &request, None).into_string()).into_response(),
        Err(message) => error_page(StatusCode::BAD_REQUEST, &message),
    }
}

pub(crate) async fn login(State(server): State<Arc<SimulatorState>>, body: String) -> Response {
    let pairs = form_pairs(&body);
    let request = match AuthorizeRequest::from_pairs(&pairs, &server) {
        Ok(request) => request,
        Err(message) => return error_page(StatusCode::BAD_REQUEST, &message),
    };
    let username = first(&pairs, "username").unwrap_or_default();
    let password = first(&pairs, "password").unwrap_or_default();
    let patient = {
        let store = server.store();
        store
            .by_username
            .get(username)
            .and_then(|patient_id| store.patients.get(patient_id))
            .and_then(|records| records.login.clone())
            .filter(|login| login.password == password)
    };
    let Some(patient) = patient else {
        let page = login_page(
            &server,
            &request,
            Some("ユーザー名またはパスワードが違います。"),
        );
        return (StatusCode::UNAUTHORIZED, Html(page.into_string())).into_response();
    };
    let ticket = random_url_token();
    let page = consent_page(&server, &request, &patient.display_name, &ticket);
    server.auth().tickets.insert(
        ticket,
        LoginTicket {
            patient_id: patient.patient_id,
            request,
            expires_at: Instant::now() + TICKET_LIFETIME,
        },
    );
    Html(page.into_string()).into_response()
}

pub(crate) async fn decision(State(server): State<Arc<SimulatorState>>, body: String) -> Response {
    let pairs = form_pairs(&body);
    let ticket = first(&pairs, "ticket").unwrap_or_default();
    let Some(login) = server.auth().tickets.remove(ticket) else {
        return error_page(StatusCode::BAD_REQUEST, "ログインからやり直してください。");
    };
    if login.expires_at <= Instant::now() {
        return error_page(StatusCode::BAD_REQUEST, "ログインからやり直してください。");
    }
    let request = login.request;
    if first(&pairs, "decision") != Some("approve") {
        return redirect_to(
            &request.redirect_uri,
            &[("error", "access_denied"), ("state", &request.state)],
        );
    }
    // Only what was asked for and left ticked.
    let granted: Vec<String> = request
        .scopes
        .iter()
        .filter(|scope| {
            pairs
                .iter()
                .any(|(key, value)| key == "scope" && value == *scope)
        })
        .cloned()
        .collect();
    let code = random_url_token();
    server.auth().codes.insert(
        code.clone(),
        IssuedCode {
            patient_id: login.patient_id,
            client_id: request.client_id.clone(),
            redirect_uri: request.redirect_uri.clone(),
            scopes: granted,
            code_challenge: request.code_challenge.clone(),
            code_challenge_method: request.code_challenge_method.clone(),
            expires_at: Instant::now() + CODE_LIFETIME,
        },
    );
    redirect_to(
        &request.redirect_uri,
        &[("code", &code), ("state", &request.state)],
    )
}

/// A 503 with `Retry-After` while the simulator is in maintenance.
pub(crate) fn maintenance_response(server: &SimulatorState) -> Option<Response> {
    let faults = server.faults();
    if !faults.maintenance {
        return None;
    }
    server.count(|counters| &counters.maintenance_refusals);
    Some(retry_later(
        StatusCode::SERVICE_UNAVAILABLE,
        &faults,
        "メンテナンス中です",
    ))
}

pub(crate) fn retry_later(
    status: StatusCode,
    faults: &super::SimulatorFaults,
    message: &str,
) -> Response {
    let retry_after = if faults.retry_after_as_http_date {
        crate::http::format_http_date(time::OffsetDateTime::now_utc() + faults.retry_after)
    } else {
        faults.retry_after.as_secs().to_string()
    };
    let mut response = super::fhir::operation_outcome(status, "transient", message);
    if let Ok(value) = HeaderValue::from_str(&retry_after) {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    response
}

pub(crate) async fn token(
    State(server): State<Arc<SimulatorState>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    if let Some(response) = maintenance_response(&server) {
        return response;
    }
    let is_form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/x-www-form-urlencoded"));
    if !is_form {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "form body required",
        );
    }
    let pairs = form_pairs(&body);
    match first(&pairs, "grant_type") {
        Some("authorization_code") => authorization_code_grant(&server, &pairs),
        Some("refresh_token") => refresh_token_grant(&server, &pairs),
        Some("client_credentials") => client_credentials_grant(&server, &pairs),
        _ => oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "grant_type not supported",
        ),
    }
}

fn authorization_code_grant(server: &SimulatorState, pairs: &[(String, String)]) -> Response {
    let code = first(pairs, "code").unwrap_or_default();
    // Single use: taken out whatever happens next.
    let Some(issued) = server.auth().codes.remove(code) else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "unknown or used code",
        );
    };
    if issued.expires_at <= Instant::now() {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", "code expired");
    }
    if first(pairs, "client_id") != Some(issued.client_id.as_str()) {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "code was issued to another client",
        );
    }
    if first(pairs, "redirect_uri") != Some(issued.redirect_uri.as_str()) {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "redirect_uri differs",
        );
    }
    let verifier = first(pairs, "code_verifier").unwrap_or_default();
    if !pkce_matches(
        &issued.code_challenge_method,
        &issued.code_challenge,
        verifier,
    ) {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "PKCE verification failed",
        );
    }
    let refresh_token = issued
        .scopes
        .iter()
        .any(|scope| scope == "offline_access")
        .then(random_url_token);
    if let Some(refresh_token) = &refresh_token {
        server.auth().refresh_tokens.insert(
            refresh_token.clone(),
            RefreshGrant {
                patient_id: issued.patient_id.clone(),
                scopes: issued.scopes.clone(),
                client_id: issued.client_id.clone(),
            },
        );
    }
    issue_access_token(
        server,
        Some(issued.patient_id),
        issued.scopes,
        refresh_token,
        server.config.access_token_lifetime,
    )
}

fn refresh_token_grant(server: &SimulatorState, pairs: &[(String, String)]) -> Response {
    let refresh_token = first(pairs, "refresh_token").unwrap_or_default();
    let grant = {
        let auth = server.auth();
        auth.refresh_tokens.get(refresh_token).map(|grant| {
            (
                grant.patient_id.clone(),
                grant.scopes.clone(),
                grant.client_id.clone(),
            )
        })
    };
    let Some((patient_id, scopes, client_id)) = grant else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "unknown refresh token",
        );
    };
    if first(pairs, "client_id") != Some(client_id.as_str()) {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "refresh token of another client",
        );
    }
    // Not rotated: the response omits refresh_token, so the client keeps its own.
    issue_access_token(
        server,
        Some(patient_id),
        scopes,
        None,
        server.config.access_token_lifetime,
    )
}

fn issue_access_token(
    server: &SimulatorState,
    patient_id: Option<String>,
    scopes: Vec<String>,
    refresh_token: Option<String>,
    lifetime: Duration,
) -> Response {
    let access_token = random_url_token();
    server.auth().access_tokens.insert(
        access_token.clone(),
        AccessGrant {
            patient_id: patient_id.clone(),
            scopes: scopes.clone(),
            expires_at: Instant::now() + lifetime,
        },
    );
    server.count(|counters| &counters.tokens_issued);
    let mut body = json!({
        "access_token": access_token,
        "token_type": "Bearer",
        "expires_in": lifetime.as_secs(),
        "scope": scopes.join(" "),
    });
    if let Some(refresh_token) = refresh_token {
        body["refresh_token"] = json!(refresh_token);
    }
    if let Some(patient_id) = patient_id {
        if !server.faults().omit_patient_in_token_response {
            body["patient"] = json!(patient_id);
        }
    }
    json_response(StatusCode::OK, &body)
}

fn client_credentials_grant(server: &SimulatorState, pairs: &[(String, String)]) -> Response {
    let client_id = match verify_client_assertion(server, pairs) {
        Ok(client_id) => client_id,
        Err(reason) => return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", &reason),
    };
    tracing::debug!(%client_id, "backend client authenticated");
    // System scopes only; a backend token has no patient in context.
    let scopes: Vec<String> = first(pairs, "scope")
        .unwrap_or_default()
        .split_whitespace()
        .filter(|scope| scope.starts_with("system/"))
        .map(str::to_string)
        .collect();
    if scopes.is_empty() {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            "ask for system/ scopes",
        );
    }
    issue_access_token(server, None, scopes, None, BACKEND_TOKEN_LIFETIME)
}

/// Checks a `private_key_jwt` assertion against the registered backend client's key.
fn verify_client_assertion(
    server: &SimulatorState,
    pairs: &[(String, String)],
) -> Result<String, String> {
    let registration = server
        .config
        .backend_client
        .as_ref()
        .ok_or("no backend client is registered")?;
    let token_url = format!("{}/token", server.base_url);
    oauth::verify_client_assertion(
        &oauth::RegisteredClientKey {
            client_id: &registration.client_id,
            public_jwk: &registration.public_jwk,
            token_url: &token_url,
        },
        first(pairs, "client_assertion_type"),
        first(pairs, "client_assertion"),
        &mut server.auth().used_jtis,
    )
}

pub(crate) async fn revoke(State(server): State<Arc<SimulatorState>>, body: String) -> Response {
    let pairs = form_pairs(&body);
    let token = first(&pairs, "token").unwrap_or_default();
    let mut auth = server.auth();
    if let Some(grant) = auth.refresh_tokens.remove(token) {
        // Revoking the refresh token ends the patient's access tokens of that link too.
        let patient = Some(grant.patient_id);
        auth.access_tokens
            .retain(|_, access| access.patient_id != patient);
    }
    auth.access_tokens.remove(token);
    StatusCode::OK.into_response()
}
