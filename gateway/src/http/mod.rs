//! The HTTP API: one router, one state, one error renderer.

pub mod access_log;
pub mod alerts;
pub mod audit_search;
pub mod auth;
pub mod break_glass;
pub mod bulk;
pub mod checkups;
pub mod client_ip;
pub mod consent_pages;
pub mod consent_screen;
pub mod consents;
pub mod erasure;
pub mod error;
pub mod fhir;
pub mod health;
pub mod maintenance;
pub mod metrics;
pub mod notifications;
pub mod oauth;
pub mod openapi;
pub mod operator;
pub mod operator_pages;
pub mod patient;
pub mod patient_export;
pub mod patient_import;
pub mod portal;
pub mod portal_security;
pub mod pull;
pub mod representations;
pub mod second_factor;
pub mod session;
pub mod transfers;
pub mod uploads;

use std::net::IpAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderName, HeaderValue};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post, put};
use axum::Router;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::audit::AuditLog;
use crate::config::Config;
use crate::keystore::KeyStore;
use crate::pull::{Instructions, JobQueue, SourceRegistry};
use crate::receipts::ReceiptSigner;
use crate::store::accounts::Accounts;
use crate::store::resources::ResourceStore;
use crate::store::Database;
use crate::tls::ConnectionInfo;

/// Everything a handler may use, behind one reference count: axum clones the state for
/// each extractor of each request, and cloning the stores one by one (each with reference
/// counts of its own) was about a quarter of a FHIR read's CPU.
#[derive(Clone)]
pub struct AppState(Arc<AppStateInner>);

impl AppState {
    pub fn new(inner: AppStateInner) -> Self {
        AppState(Arc::new(inner))
    }
}

impl std::ops::Deref for AppState {
    type Target = AppStateInner;

    fn deref(&self) -> &AppStateInner {
        &self.0
    }
}

/// What `AppState` shares.
pub struct AppStateInner {
    pub config: Arc<Config>,
    pub db: Database,
    pub keys: KeyStore,
    pub resources: ResourceStore,
    pub accounts: Accounts,
    pub second_factors: crate::mfa::SecondFactors,
    pub break_glass: crate::break_glass::BreakGlass,
    pub maintenance: crate::maintenance::Maintenance,
    pub audit: AuditLog,
    pub metrics: Arc<metrics::Metrics>,
    pub instructions: Instructions,
    pub consents: crate::consents::Consents,
    pub uploads: crate::uploads::UploadPermissions,
    pub notifications: crate::notifications::delivery::Deliverer,
    pub alerts: crate::alerts::AlertEngine,
    pub exports: crate::export::ExportJobs,
    pub representations: crate::store::representations::Representations,
    pub queue: JobQueue,
    /// Pull pages waiting for the writer, shared by this process's pull workers.
    pub page_commits: Arc<crate::pull::PageCommits>,
    pub registry: Arc<SourceRegistry>,
    pub receipts: Arc<ReceiptSigner>,
    /// Authenticates the gateway to sources (SMART Backend Services `private_key_jwt`).
    pub source_client_key: Arc<phr_adapters::fhir_r4::BackendKey>,
    /// Signs the ID tokens given to apps that ask for `openid`.
    /// Signs ID tokens; keys rotated out stay in the JWKS for their overlap.
    pub id_token_keys: Arc<crate::oauth::jws_keys::JwsKeyring>,
    /// Whether connections are TLS (HSTS is only meaningful then).
    pub tls: bool,
    /// The external base URL, known once the listener is bound (port 0 in tests).
    pub public_url: Arc<OnceLock<String>>,
    /// The subcontractor and component-owner list (checked at start-up).
    pub supply_chain: Arc<String>,
}

impl AppState {
    /// A pull worker sharing this state's stores, with the configured timing.
    pub fn pull_worker(&self) -> crate::pull::PullWorker {
        let pull = &self.config.pull;
        crate::pull::PullWorker {
            id: crate::pull::PullWorker::worker_id(),
            queue: self.queue.clone(),
            instructions: self.instructions.clone(),
            resources: self.resources.clone(),
            registry: self.registry.clone(),
            audit: self.audit.clone(),
            settings: crate::pull::worker::WorkerSettings {
                lease: Duration::from_secs(pull.lease_secs),
                poll: Duration::from_millis(pull.poll_millis),
                refresh_interval: Duration::from_secs(pull.refresh_interval_secs),
                max_backoff: Duration::from_secs(pull.max_backoff_secs),
            },
            claimed_ahead: Default::default(),
            page_commits: self.page_commits.clone(),
        }
    }

    /// The gateway's external base URL, without a trailing slash.
    pub fn public_url(&self) -> String {
        if let Some(url) = &self.config.public_url {
            return url.clone();
        }
        self.public_url
            .get()
            .cloned()
            .unwrap_or_else(|| format!("https://localhost:{}", self.config.listen.port()))
    }
}

/// The client's address as decided by `client_ip`, put into request extensions.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub Option<IpAddr>);

pub const DEFAULT_CSP: &str =
    "default-src 'none'; style-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

pub fn router(state: AppState) -> Router {
    let body_limit = state.config.http.body_limit_bytes;
    let timeout = Duration::from_secs(state.config.http.request_timeout_secs);
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(metrics::metrics))
        .route("/auth/login", post(auth::login))
        .route("/auth/logout", post(auth::logout))
        .route("/auth/session", get(auth::session))
        .route("/auth/second-factor/totp", post(second_factor::prove_totp))
        .route("/auth/second-factor/recovery-code", post(second_factor::prove_recovery_code))
        .route("/auth/second-factor/passkey/start", post(second_factor::passkey_challenge))
        .route("/auth/second-factor/passkey/finish", post(second_factor::prove_passkey))
        .route("/auth/passkey/start", post(second_factor::passkey_sign_in_start))
        .route("/auth/passkey/finish", post(second_factor::passkey_sign_in_finish))
        .route("/auth/step-up/passkey/start", post(second_factor::step_up_passkey_challenge))
        .route("/auth/factors", get(second_factor::factors))
        .route("/auth/factors/totp", post(second_factor::begin_totp))
        .route("/auth/factors/totp/confirm", post(second_factor::confirm_totp))
        .route("/auth/factors/passkeys/start", post(second_factor::passkey_registration_start))
        .route("/auth/factors/passkeys/finish", post(second_factor::passkey_registration_finish))
        .route("/auth/factors/recovery-codes", post(second_factor::recovery_codes))
        .route("/auth/break-glass", post(break_glass::start))
        .route("/operator/break-glass", get(break_glass::list))
        .route("/operator/break-glass/{id}/review", post(break_glass::review))
        .route("/operator/maintenance", get(maintenance::list).post(maintenance::request))
        .route("/operator/maintenance/{id}/approve", post(maintenance::approve))
        .route("/operator/maintenance/{id}/reject", post(maintenance::reject))
        .route("/operator/maintenance/{id}/cancel", post(maintenance::cancel))
        .route("/operator/maintenance/{id}/close", post(maintenance::close))
        .route("/operator/maintenance/{id}/report", get(maintenance::report))
        .route("/operator/maintenance/{id}/diagnostics", get(maintenance::diagnostics))
        .route(
            "/operator/maintenance/{id}/patients/{patient_id}/resource-counts",
            get(maintenance::patient_resource_counts),
        )
        .route("/operator/maintenance/{id}/resource-counts", get(maintenance::all_resource_counts))
        .route("/operator/sessions", get(operator::sessions))
        .route("/operator/supply-chain", get(operator::supply_chain))
        .route("/operator/sbom", get(operator::sbom))
        .route("/operator/disclosure", get(operator::disclosure))
        .route("/operator/sessions/{id}/end", post(operator::end_session))
        .route("/operator", get(operator_pages::home))
        .route("/operator/login", post(operator_pages::login))
        .route("/operator/second-factor", post(operator_pages::second_factor))
        .route("/operator/logout", post(operator_pages::logout))
        .route("/operator/break-glass/{id}/review-form", post(operator_pages::review))
        .route("/patient/access-log", get(access_log::list))
        .route("/portal/access-log", get(access_log::page))
        .route("/patient/resources", get(patient::resources))
        .route("/patient/sources", get(pull::sources))
        .route("/patient/checkups", post(checkups::upload))
        .route("/patient/erasure", post(erasure::erase))
        .route("/patient/export", post(patient_export::export))
        .route("/patient/import", post(patient_import::import))
        .route("/patient/transfers", get(transfers::list).post(transfers::start))
        .route("/patient/transfer-codes", post(transfers::issue_code))
        .route("/operator/clients/{id}/transfer-endpoint", put(transfers::register_endpoint))
        .route("/operator/transfer-peers", put(transfers::register_peer))
        .route("/transfer/inbox", post(transfers::inbox))
        .route("/portal/summary", get(patient_export::portal_summary))
        .route(
            "/portal/export",
            get(patient_export::portal_page).post(patient_export::portal_export),
        )
        .route("/portal/erasure", get(erasure::portal_page).post(erasure::portal_erase))
        .route("/patient/upload-permissions", get(uploads::list).post(uploads::give))
        .route("/patient/upload-permissions/{id}/withdraw", post(uploads::withdraw))
        .route(
            "/institution/upload-permissions/{id}/checkups",
            post(checkups::institution_upload),
        )
        .route("/patient/sources/callback", get(pull::callback))
        .route("/patient/pull-instructions", get(pull::list).post(pull::give))
        .route("/patient/pull-instructions/{id}", get(pull::detail))
        .route("/patient/pull-instructions/{id}/withdraw", post(pull::withdraw))
        .route("/api/consents", get(consents::list))
        .route("/api/consents/{id}", get(consents::detail))
        .route("/api/consents/{id}/withdraw", post(consents::withdraw))
        .route("/api/consents/{id}/change", post(consents::change))
        .route("/api/consents/{id}/confirm", post(consents::confirm))
        .route("/api/representations", get(representations::list))
        .route("/operator/representations", post(representations::register))
        .route("/portal/acting-for", post(representations::choose))
        .route("/.well-known/jwks.json", get(pull::jwks))
        .route("/portal", get(portal::home))
        .route("/portal/style.css", get(portal::style))
        .route("/portal/passkey.js", get(portal_security::passkey_script))
        .route(
            "/portal/second-factor",
            get(portal_security::second_factor_form).post(portal_security::second_factor),
        )
        .route("/portal/security", get(portal_security::page_security))
        .route("/portal/security/totp", post(portal_security::begin_totp))
        .route("/portal/security/totp/confirm", post(portal_security::confirm_totp))
        .route("/portal/login", post(portal::login))
        .route("/portal/logout", post(portal::logout))
        .route("/portal/pull-instructions", post(portal::give))
        .route("/portal/checkups", post(portal::upload_checkups))
        .route("/portal/transfers", post(transfers::portal_start))
        .route("/portal/upload-permissions", post(uploads::portal_give))
        .route("/portal/upload-permissions/{id}/withdraw", post(uploads::portal_withdraw))
        .route("/portal/pull-instructions/{id}/withdraw", post(portal::withdraw))
        .route("/portal/consents", get(consent_pages::list))
        .route("/portal/consents/{id}/withdraw", post(consent_pages::withdraw))
        .route("/portal/consents/{id}/confirm", post(consent_pages::confirm))
        .route(
            "/portal/consents/{id}/change",
            get(consent_pages::change_form).post(consent_pages::change),
        )
        .route("/consent/notice", get(consent_pages::notice))
        .route(
            "/consent/authorize/{id}",
            get(consent_screen::show).post(consent_screen::answer),
        )
        .route("/operator/audit/checkpoint", get(operator::audit_checkpoint))
        .route("/operator/audit/events", get(audit_search::search))
        .route("/operator/audit/events.ndjson", get(audit_search::export))
        .route("/operator/alerts", get(alerts::list))
        .route("/operator/alerts/{id}/acknowledge", post(alerts::acknowledge))
        .route("/operator/alerts-page", get(alerts::page))
        .route("/operator/alerts-page/{id}/acknowledge", post(alerts::page_acknowledge))
        .route("/fhir/metadata", get(fhir::capability_statement))
        .route("/fhir/Patient/$export", get(bulk::export_patients))
        .route("/fhir/Group/{id}/{operation}", get(bulk::export_group))
        .route("/fhir/bulkstatus/{id}", get(bulk::status).delete(bulk::cancel))
        .route("/fhir/bulkfiles/{id}/{file}", get(bulk::file))
        .route("/fhir/{resource_type}", get(fhir::search))
        .route(
            "/fhir/{resource_type}/{id}",
            get(fhir::read).post(fhir::search_by_post),
        )
        .route("/fhir/{resource_type}/{id}/{operation}", get(fhir::instance_operation))
        .route("/fhir/{resource_type}/{id}/_history/{version}", get(fhir::vread))
        .route("/fhir", get(fhir::not_supported))
        .route("/.well-known/smart-configuration", get(oauth::smart_configuration))
        .route("/oauth/authorize", get(oauth::authorize))
        .route("/oauth/token", post(oauth::token))
        .route("/oauth/revoke", post(oauth::revoke))
        .route("/oauth/introspect", post(oauth::introspect))
        .route("/oauth/grant", get(oauth::grant))
        .route("/operator/clients", get(oauth::list_clients).post(oauth::register_client))
        .route("/operator/clients/{id}/webhook", put(notifications::register_webhook))
        .route("/recipient/notifications/{id}/acknowledge", post(notifications::acknowledge))
        .fallback(error::not_found)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(RequestBodyLimitLayer::new(body_limit))
        .layer(middleware::from_fn(error::render_errors))
        .layer(middleware::from_fn_with_state(state.clone(), request_context))
        .layer(TimeoutLayer::with_status_code(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            timeout,
        ))
        .layer(CatchPanicLayer::custom(error::panic_response))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID.clone()))
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
            let id = req
                .headers()
                .get(&REQUEST_ID)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-");
            tracing::info_span!("request", method = %req.method(), path = %req.uri().path(), request_id = %id)
        }))
        .layer(SetRequestIdLayer::new(REQUEST_ID.clone(), MakeRequestUuid))
        .with_state(state)
}

/// Decides the client address, counts the request, and adds the security headers.
async fn request_context(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let peer = request
        .extensions()
        .get::<ConnectionInfo>()
        .map(|c| c.remote_addr.ip());
    let forwarded = request
        .headers()
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok());
    let client =
        peer.map(|peer| client_ip::client_ip(peer, forwarded, &state.config.trusted_proxies));
    request.extensions_mut().insert(ClientAddr(client));
    let method = request.method().clone();
    let mut response = next.run(request).await;
    state.metrics.observe_request(&method, response.status());
    let headers = response.headers_mut();
    let set = |headers: &mut axum::http::HeaderMap, name: HeaderName, value: &'static str| {
        headers.insert(name, HeaderValue::from_static(value));
    };
    set(headers, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(headers, header::X_FRAME_OPTIONS, "DENY");
    // `same-origin`, not `no-referrer`: the latter makes browsers send `Origin: null` on our
    // own form posts, which the portal checks.
    set(headers, header::REFERRER_POLICY, "same-origin");
    // Our stylesheet only; a page whose form ends elsewhere (the consent screen sends the
    // browser back to the app) sets its own policy naming that origin.
    if !headers.contains_key(header::CONTENT_SECURITY_POLICY) {
        set(headers, header::CONTENT_SECURITY_POLICY, DEFAULT_CSP);
    }
    if !headers.contains_key(header::CACHE_CONTROL) {
        set(headers, header::CACHE_CONTROL, "no-store");
    }
    if state.tls {
        set(
            headers,
            header::STRICT_TRANSPORT_SECURITY,
            "max-age=63072000; includeSubDomains",
        );
    }
    response
}
