//! The demo PHR app: a small OAuth client of the gateway, run beside it by `phr-gateway
//! demo`. It is what a PHR provider's backend does: sends the patient to the gateway's
//! consent screen (PKCE S256, `state`), exchanges the code with `private_key_jwt` (ES384),
//! and reads `/fhir/Patient/{id}` with the token. "Read again" shows what happens after the
//! patient withdraws: the gateway refuses the very next call. "Bulk export" is what the
//! provider's backend does for all its consenting patients at once: a client-credentials
//! token, `Group/[id]/$export`, polling, and the NDJSON files, counted per patient.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;
use maud::{html, DOCTYPE};
use phr_adapters::fhir_r4::BackendKey;
use phr_adapters::oauth::{client_assertion, pkce_s256_pair, CLIENT_ASSERTION_LIFETIME};
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::oneshot;

use crate::audit::Agent;
use crate::error::{Error, Result};
use crate::http::AppState;
use crate::oauth::clients::{self, ComplianceDeclaration, NewClient, Recipient};

/// The scopes the demo app asks for: the patient in context, demographics and results.
pub const DEMO_APP_SCOPE: &str = "launch/patient patient/Patient.rs patient/Observation.rs";
pub const DEMO_APP_NAME: &str = "デモPHRアプリ (Demo PHR app)";

/// The running demo app.
pub struct DemoPhrApp {
    /// `http://127.0.0.1:<port>`
    pub base_url: String,
    pub client_id: String,
    stop: Option<oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<()>,
}

/// One line of a bulk export's tally: patient, resource type, how many.
type BulkRow = (String, String, usize);

#[derive(Default)]
struct Session {
    /// PKCE verifiers of authorisations under way, by `state`.
    pending: HashMap<String, String>,
    /// The access token and the patient it is for.
    token: Option<(String, String)>,
    /// What the last read returned: HTTP status and body.
    last_read: Option<(u16, String)>,
    /// The last bulk export: (patient, resource type, count) rows, or why it failed.
    last_bulk: Option<std::result::Result<Vec<BulkRow>, String>>,
    error: Option<String>,
}

struct AppContext {
    gateway: String,
    client_id: String,
    redirect_uri: String,
    key: BackendKey,
    http: reqwest::Client,
    session: Mutex<Session>,
}

impl DemoPhrApp {
    /// Registers the app as a client of the gateway (as an operator would) and serves it
    /// on a free loopback port. `gateway_cert` is the gateway's certificate (PEM), trusted
    /// for the app's calls.
    pub async fn start(state: &AppState, gateway: &str, gateway_cert: &[u8]) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .map_err(|e| Error::config("demo", format!("demo app: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::config("demo", format!("demo app: {e}")))?;
        let base_url = format!("http://127.0.0.1:{}", addr.port());
        let redirect_uri = format!("{base_url}/callback");
        let key = BackendKey::generate_es384();
        let (client, _) = clients::register(
            &state.db,
            &Agent::system(),
            NewClient {
                display_name: DEMO_APP_NAME.into(),
                redirect_uris: vec![redirect_uri.clone()],
                jwks: Some(serde_json::json!({"keys": [key.public_jwk()]})),
                recipient: Recipient {
                    name: "デモPHR事業者 (Demo PHR provider)".into(),
                    identifier: "0000000000000".into(),
                },
                compliance: ComplianceDeclaration {
                    declared: true,
                    statement: "PHRサービス事業者による健診等情報の取扱いに関する基本的指針を遵守します (demo)"
                        .into(),
                    declared_on: "2026-04-01".into(),
                },
            },
        )
        .await?;
        let certificate = reqwest::Certificate::from_pem(gateway_cert)
            .map_err(|e| Error::config("demo", format!("gateway certificate: {e}")))?;
        let http = reqwest::Client::builder()
            .add_root_certificate(certificate)
            .build()
            .map_err(|e| Error::config("demo", format!("demo app client: {e}")))?;
        let context = Arc::new(AppContext {
            gateway: gateway.trim_end_matches('/').to_string(),
            client_id: client.id.clone(),
            redirect_uri,
            key,
            http,
            session: Mutex::new(Session::default()),
        });
        let router = Router::new()
            .route("/", get(home))
            .route("/connect", get(connect))
            .route("/callback", get(callback))
            .route("/read", get(read_again))
            .route("/bulk", get(bulk_export))
            .with_state(context);
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let serve = axum::serve(listener, router).with_graceful_shutdown(async {
                let _ = stopped.await;
            });
            if let Err(error) = serve.await {
                tracing::warn!(%error, "demo app stopped");
            }
        });
        Ok(DemoPhrApp {
            base_url,
            client_id: client.id,
            stop: Some(stop),
            server,
        })
    }

    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.server).await;
    }
}

fn page(body: maud::Markup) -> Response {
    let markup = html! {
        (DOCTYPE)
        html lang="ja" {
            head { meta charset="utf-8"; title { (DEMO_APP_NAME) } }
            body style="font-family:system-ui,sans-serif;max-width:48rem;margin:2rem auto" {
                h1 { (DEMO_APP_NAME) }
                (body)
            }
        }
    };
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        markup.into_string(),
    )
        .into_response()
}

async fn home(State(app): State<Arc<AppContext>>) -> Response {
    let (connected, last_read, error, last_bulk) = match app.session.lock() {
        Ok(session) => (
            session.token.as_ref().map(|(_, patient)| patient.clone()),
            session.last_read.clone(),
            session.error.clone(),
            session.last_bulk.clone(),
        ),
        Err(_) => (None, None, Some("session unavailable".into()), None),
    };
    page(html! {
        p { "PHRゲートウェイから、あなたが同意した情報だけを受け取るデモアプリです。" }
        @if let Some(error) = &error { p id="app-error" { (error) } }
        @match &connected {
            None => p { a id="connect" href="/connect" { "ゲートウェイにつなぐ / Connect to the gateway" } },
            Some(patient) => {
                p { "患者 " code { (patient) } " の情報を受け取れます。" }
                p { a id="read" href="/read" { "もう一度読む / Read again" } }
            }
        }
        @if let Some((status, body)) = &last_read {
            h2 { "最後の読み取り / Last read" }
            p id="read-status" { "HTTP " (status) }
            pre id="read-body" style="white-space:pre-wrap" { (body) }
        }
        h2 { "一括エクスポート（事業者のサーバー） / Bulk export (the provider's backend)" }
        p { "同意してくれたすべての患者さんのデータを、同意の範囲だけまとめて受け取ります。" }
        p { a id="bulk" href="/bulk" { "一括エクスポートを実行 / Run a bulk export" } }
        @match &last_bulk {
            Some(Ok(rows)) => {
                table id="bulk-result" {
                    thead { tr { th { "患者 / Patient" } th { "種類 / Type" } th { "件数 / Count" } } }
                    tbody { @for (patient, resource_type, count) in rows { tr { td { (patient) } td { (resource_type) } td { (count) } } } }
                }
            }
            Some(Err(error)) => p id="bulk-error" { (error) },
            None => {}
        }
    })
}

/// Sends the browser to the gateway's authorize endpoint (then its consent screen).
async fn connect(State(app): State<Arc<AppContext>>) -> Response {
    let (verifier, challenge) = pkce_s256_pair();
    let (state, _) = pkce_s256_pair();
    if let Ok(mut session) = app.session.lock() {
        session.pending.insert(state.clone(), verifier);
    }
    let query: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("response_type", "code")
        .append_pair("client_id", &app.client_id)
        .append_pair("redirect_uri", &app.redirect_uri)
        .append_pair("scope", DEMO_APP_SCOPE)
        .append_pair("state", &state)
        .append_pair("aud", &format!("{}/fhir", app.gateway))
        .append_pair("code_challenge", &challenge)
        .append_pair("code_challenge_method", "S256")
        .finish();
    Redirect::to(&format!("{}/oauth/authorize?{query}", app.gateway)).into_response()
}

#[derive(Deserialize)]
struct CallbackQuery {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
}

async fn callback(
    State(app): State<Arc<AppContext>>,
    Query(query): Query<CallbackQuery>,
) -> Response {
    let verifier = query.state.as_ref().and_then(|state| {
        app.session
            .lock()
            .ok()
            .and_then(|mut session| session.pending.remove(state))
    });
    let outcome = match (query.code, verifier, query.error) {
        (_, _, Some(error)) => Err(format!("the patient did not agree ({error})")),
        (Some(code), Some(verifier), None) => exchange(&app, &code, &verifier).await,
        _ => Err("unknown or missing state: ignored".into()),
    };
    match outcome {
        Ok((token, patient)) => {
            if let Ok(mut session) = app.session.lock() {
                session.token = Some((token, patient));
                session.error = None;
            }
            read(&app).await;
        }
        Err(error) => {
            if let Ok(mut session) = app.session.lock() {
                session.error = Some(error);
            }
        }
    }
    Redirect::to("/").into_response()
}

async fn read_again(State(app): State<Arc<AppContext>>) -> Response {
    read(&app).await;
    Redirect::to("/").into_response()
}

async fn exchange(
    app: &AppContext,
    code: &str,
    verifier: &str,
) -> std::result::Result<(String, String), String> {
    let body = token_request(
        app,
        &[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", app.redirect_uri.as_str()),
            ("code_verifier", verifier),
        ],
    )
    .await?;
    match (body["access_token"].as_str(), body["patient"].as_str()) {
        (Some(token), Some(patient)) => Ok((token.to_string(), patient.to_string())),
        _ => Err("token response without access_token or patient".into()),
    }
}

/// A request to the gateway's token endpoint, authenticated with a fresh `private_key_jwt`
/// assertion; the JSON answer when it is 200.
async fn token_request(
    app: &AppContext,
    form: &[(&str, &str)],
) -> std::result::Result<Value, String> {
    let token_url = format!("{}/oauth/token", app.gateway);
    let assertion = client_assertion(
        &app.key,
        &app.client_id,
        &token_url,
        CLIENT_ASSERTION_LIFETIME,
    )
    .map_err(|e| e.to_string())?;
    let mut form = form.to_vec();
    form.push((
        "client_assertion_type",
        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
    ));
    form.push(("client_assertion", assertion.as_str()));
    let response = app
        .http
        .post(&token_url)
        .form(&form)
        .send()
        .await
        .map_err(|e| format!("token endpoint: {e}"))?;
    let status = response.status();
    let body: Value = serde_json::from_slice(&response.bytes().await.map_err(|e| e.to_string())?)
        .map_err(|e| format!("token response: {e}"))?;
    if status != StatusCode::OK {
        return Err(format!("token endpoint answered {status}: {body}"));
    }
    Ok(body)
}

async fn read(app: &AppContext) {
    let Some((token, patient)) = app.session.lock().ok().and_then(|s| s.token.clone()) else {
        return;
    };
    let result = app
        .http
        .get(format!("{}/fhir/Patient/{patient}", app.gateway))
        .bearer_auth(token)
        .send()
        .await;
    let last_read = match result {
        Ok(response) => {
            let status = response.status().as_u16();
            let body = response.text().await.unwrap_or_default();
            (status, body)
        }
        Err(error) => (0, error.to_string()),
    };
    if let Ok(mut session) = app.session.lock() {
        session.last_read = Some(last_read);
    }
}

async fn bulk_export(State(app): State<Arc<AppContext>>) -> Response {
    let outcome = run_bulk_export(&app).await;
    if let Ok(mut session) = app.session.lock() {
        session.last_bulk = Some(outcome);
    }
    Redirect::to("/").into_response()
}

/// Client credentials, `Group/[client]/$export`, polling, the files counted per patient.
async fn run_bulk_export(app: &AppContext) -> std::result::Result<Vec<BulkRow>, String> {
    let body = token_request(
        app,
        &[
            ("grant_type", "client_credentials"),
            ("scope", "system/*.rs"),
        ],
    )
    .await?;
    let token = body["access_token"]
        .as_str()
        .ok_or_else(|| format!("no backend token: {body}"))?
        .to_string();
    let kick_off = app
        .http
        .get(format!(
            "{}/fhir/Group/{}/$export",
            app.gateway, app.client_id
        ))
        .bearer_auth(&token)
        .header("prefer", "respond-async")
        .header("accept", "application/fhir+json")
        .send()
        .await
        .map_err(|e| format!("kick-off: {e}"))?;
    let status_url = kick_off
        .headers()
        .get(header::CONTENT_LOCATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| format!("kick-off answered {}", kick_off.status()))?
        .to_string();
    let mut manifest = None;
    for _ in 0..60 {
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        let polled = app
            .http
            .get(&status_url)
            .bearer_auth(&token)
            .send()
            .await
            .map_err(|e| format!("status: {e}"))?;
        match polled.status() {
            StatusCode::OK => {
                let bytes = polled.bytes().await.map_err(|e| e.to_string())?;
                manifest =
                    Some(serde_json::from_slice::<Value>(&bytes).map_err(|e| e.to_string())?);
                break;
            }
            StatusCode::ACCEPTED | StatusCode::TOO_MANY_REQUESTS => continue,
            other => return Err(format!("export status {other}")),
        }
    }
    let manifest = manifest.ok_or("the export did not finish in a minute")?;
    let mut counts: std::collections::BTreeMap<(String, String), usize> = Default::default();
    for output in manifest["output"].as_array().into_iter().flatten() {
        let url = output["url"].as_str().unwrap_or_default();
        let text = app
            .http
            .get(url)
            .bearer_auth(&token)
            .send()
            .await
            .map_err(|e| format!("file: {e}"))?
            .text()
            .await
            .map_err(|e| format!("file: {e}"))?;
        for line in text.lines() {
            let resource: Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
            let resource_type = resource["resourceType"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let patient = if resource_type == "Patient" {
                resource["id"].as_str().unwrap_or_default().to_string()
            } else {
                resource["subject"]["reference"]
                    .as_str()
                    .or(resource["patient"]["reference"].as_str())
                    .unwrap_or_default()
                    .trim_start_matches("Patient/")
                    .to_string()
            };
            *counts.entry((patient, resource_type)).or_default() += 1;
        }
    }
    Ok(counts
        .into_iter()
        .map(|((patient, resource_type), count)| (patient, resource_type, count))
        .collect())
}
