//! The OAuth 2 authorisation server's endpoints (SMART App Launch 2.2 style): discovery,
//! `/oauth/authorize` (hands the patient to the consent page), `/oauth/token`,
//! `/oauth/revoke`, `/oauth/introspect`; client registration by operators; and the
//! `AccessGrant` extractor that resource endpoints take.
//!
//! Token-endpoint errors are RFC 6749 §5.2 JSON (`{error, error_description}`), never
//! problem+json; every refusal is audited with its OAuth error code. `/oauth/authorize`
//! never redirects to a client or redirect URI it cannot vouch for: an unknown client, an
//! unregistered redirect URI and a missing `state` get a 400 problem instead (without
//! `state` the app could not tie an answer to its request, so a redirect would not help it).

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::ToSchema;

use super::error::{ApiError, ProtocolError};
use super::session::OperatorSession;
use super::{AppState, ClientAddr};
use crate::audit::{Actor, Agent, AuditEvent, EventKind, Outcome};
use crate::error::Error;
use crate::oauth::assertion::{self, AuthMethod};
use crate::oauth::authorize::{self, NewAuthorization};
use crate::oauth::clients::{self, Client, ClientAuth, ComplianceDeclaration, Recipient};
use crate::oauth::scopes::{self, format_scopes, parse_scopes, Context};
use crate::oauth::tokens::{self, IssuedTokens};
use crate::oauth::{Lifetimes, OAuthError, OAuthErrorCode};
use crate::store::millis_to_rfc3339;

pub use crate::oauth::tokens::AccessGrant;

/// Where a valid authorisation request sends the patient (the consent pages).
pub const CONSENT_PAGE: &str = "/consent/authorize";

impl AppState {
    /// The token endpoint's URL: the `aud` of client assertions.
    pub fn token_url(&self) -> String {
        format!("{}/oauth/token", self.public_url())
    }

    /// The FHIR base the `aud` of an authorisation request must name.
    pub fn fhir_base_url(&self) -> String {
        format!("{}/fhir", self.public_url())
    }
}

pub(super) fn agent(address: Option<std::net::IpAddr>, client_id: Option<&str>) -> Agent {
    Agent {
        actor: match client_id {
            Some(id) => Actor::Client { id: id.to_string() },
            None => Actor::Anonymous,
        },
        address,
        token_jti: None,
    }
}

/// Records a refusal with its OAuth error code.
pub(super) async fn audit_refusal(
    state: &AppState,
    agent: &Agent,
    endpoint: &str,
    error: &OAuthError,
) {
    let event = AuditEvent::new(EventKind::OAuthRefused, agent.clone())
        .outcome(Outcome::MinorFailure)
        .detail(format!("{endpoint}: {error}"));
    if let Err(e) = state.audit.record_now(&event).await {
        tracing::error!(error = %e, "could not audit an OAuth refusal");
    }
}

/// An RFC 6749 §5.2 error response: JSON, `no-store`, and `WWW-Authenticate` on 401.
fn oauth_error_response(error: &OAuthError) -> Response {
    let status = match error.code {
        OAuthErrorCode::InvalidClient | OAuthErrorCode::InvalidToken => StatusCode::UNAUTHORIZED,
        _ => StatusCode::BAD_REQUEST,
    };
    let mut response = (
        status,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
            (header::PRAGMA, "no-cache"),
        ],
        json!({"error": error.code.code(), "error_description": error.description}).to_string(),
    )
        .into_response();
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"phr-gateway\""),
        );
    }
    response.extensions_mut().insert(ProtocolError);
    response
}

/// A JSON body with the headers RFC 6749 §5.1 requires.
fn no_store_json(body: Value) -> Response {
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
            (header::PRAGMA, "no-cache"),
        ],
        body.to_string(),
    )
        .into_response()
}

// ---------------------------------------------------------------------------------------
// Client registration (operators)

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterClient {
    pub display_name: String,
    /// Exact-match redirect URIs: https, or http on a loopback host for development.
    #[serde(default)]
    pub redirect_uris: Vec<String>,
    /// `private_key_jwt` (give `jwks`) or `client_secret_basic` (a secret is generated and
    /// returned once).
    pub token_endpoint_auth_method: String,
    /// JWK Set of public RS384 (RSA ≥ 2048 bits) or ES384 (P-384) keys.
    #[schema(value_type = Option<Object>)]
    #[serde(default)]
    pub jwks: Option<Value>,
    pub recipient: Recipient,
    pub compliance: ComplianceDeclaration,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ClientView {
    pub client_id: String,
    pub display_name: String,
    pub redirect_uris: Vec<String>,
    pub token_endpoint_auth_method: String,
    #[schema(value_type = Option<Object>)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwks: Option<Value>,
    pub recipient: Recipient,
    pub compliance: ComplianceDeclaration,
    pub created_at: String,
}

impl From<&Client> for ClientView {
    fn from(client: &Client) -> Self {
        ClientView {
            client_id: client.id.clone(),
            display_name: client.display_name.clone(),
            redirect_uris: client.redirect_uris.clone(),
            token_endpoint_auth_method: client.auth.method().to_string(),
            jwks: match &client.auth {
                ClientAuth::PrivateKeyJwt { jwks } => serde_json::to_value(jwks).ok(),
                ClientAuth::ClientSecret { .. } => None,
            },
            recipient: client.recipient.clone(),
            compliance: client.compliance.clone(),
            created_at: millis_to_rfc3339(client.created_at),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RegisteredClient {
    #[serde(flatten)]
    pub client: ClientView,
    /// Only for `client_secret_basic`, and only in this response: it is stored as a hash.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_secret: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ClientList {
    pub clients: Vec<ClientView>,
}

/// Registers an app of a recipient organisation. The recipient must declare compliance
/// with the PHR basic guideline.
#[utoipa::path(post, path = "/operator/clients", tag = "oauth", request_body = RegisterClient,
    responses((status = 201, description = "Registered (the secret, if any, is shown only now)", body = RegisteredClient),
        (status = 400, description = "Invalid registration", content_type = "application/problem+json"),
        (status = 403, description = "Not an operator", content_type = "application/problem+json")))]
pub async fn register_client(
    State(state): State<AppState>,
    operator: OperatorSession,
    body: Result<Json<RegisterClient>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(request) = body.map_err(|e| Error::Invalid(e.body_text()))?;
    let jwks = match (request.token_endpoint_auth_method.as_str(), request.jwks) {
        ("private_key_jwt", Some(jwks)) => Some(jwks),
        ("private_key_jwt", None) => {
            return Err(Error::Invalid("private_key_jwt needs jwks".into()).into())
        }
        ("client_secret_basic", None) => None,
        ("client_secret_basic", Some(_)) => {
            return Err(Error::Invalid("client_secret_basic takes no jwks".into()).into())
        }
        (other, _) => {
            return Err(Error::Invalid(format!(
                "token_endpoint_auth_method {other:?}: use private_key_jwt or client_secret_basic"
            ))
            .into())
        }
    };
    let (client, secret) = clients::register(
        &state.db,
        &operator.0.agent(),
        clients::NewClient {
            display_name: request.display_name,
            redirect_uris: request.redirect_uris,
            jwks,
            recipient: request.recipient,
            compliance: request.compliance,
        },
    )
    .await?;
    state.audit.notify();
    let body = RegisteredClient {
        client: ClientView::from(&client),
        client_secret: secret,
    };
    let mut response = (StatusCode::CREATED, Json(body)).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

/// Every registered client (no secrets).
#[utoipa::path(get, path = "/operator/clients", tag = "oauth",
    responses((status = 200, description = "Registered clients", body = ClientList),
        (status = 403, description = "Not an operator", content_type = "application/problem+json")))]
pub async fn list_clients(
    State(state): State<AppState>,
    _operator: OperatorSession,
) -> Result<Json<ClientList>, ApiError> {
    let clients = clients::list(&state.db).await?;
    Ok(Json(ClientList {
        clients: clients.iter().map(ClientView::from).collect(),
    }))
}

// ---------------------------------------------------------------------------------------
// Discovery

/// SMART App Launch discovery: endpoints, methods and capabilities.
#[utoipa::path(get, path = "/.well-known/smart-configuration", tag = "oauth",
    responses((status = 200, description = "SMART configuration", content_type = "application/json")))]
pub async fn smart_configuration(State(state): State<AppState>) -> Response {
    let base = state.public_url();
    let mut scopes = vec![
        "launch/patient".to_string(),
        "offline_access".to_string(),
        "openid".to_string(),
        "fhirUser".to_string(),
    ];
    scopes.extend(scopes::supported_resource_scopes(Context::Patient));
    scopes.extend(scopes::supported_resource_scopes(Context::System));
    let body = json!({
        "issuer": base,
        "authorization_endpoint": format!("{base}/oauth/authorize"),
        "token_endpoint": state.token_url(),
        "revocation_endpoint": format!("{base}/oauth/revoke"),
        "introspection_endpoint": format!("{base}/oauth/introspect"),
        "jwks_uri": format!("{base}/.well-known/jwks.json"),
        "response_types_supported": ["code"],
        "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials"],
        "code_challenge_methods_supported": ["S256"],
        "authorization_response_iss_parameter_supported": true,
        "token_endpoint_auth_methods_supported": ["private_key_jwt", "client_secret_basic"],
        "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
        "scopes_supported": scopes,
        "id_token_signing_alg_values_supported": ["ES384"],
        "capabilities": [
            "sso-openid-connect",
            "launch-standalone",
            "client-confidential-asymmetric",
            "client-confidential-symmetric",
            "context-standalone-patient",
            "permission-offline",
            "permission-patient",
            "permission-v2",
            "permission-v1"
        ],
    });
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        body.to_string(),
    )
        .into_response()
}

// ---------------------------------------------------------------------------------------
// Authorisation

#[derive(Debug, Deserialize)]
pub struct AuthorizeQuery {
    pub response_type: Option<String>,
    pub client_id: Option<String>,
    pub redirect_uri: Option<String>,
    pub state: Option<String>,
    pub scope: Option<String>,
    pub aud: Option<String>,
    pub code_challenge: Option<String>,
    pub code_challenge_method: Option<String>,
}

/// Longest `state` accepted (it is stored and echoed).
const MAX_STATE: usize = 1024;

/// Starts an authorisation: checks the request and sends the patient to the consent page
/// (303). Errors about the client, the redirect URI or a missing `state` are shown here
/// (400); every other error goes back to the app's redirect URI.
#[utoipa::path(get, path = "/oauth/authorize", tag = "oauth",
    params(("response_type" = String, Query), ("client_id" = String, Query), ("redirect_uri" = String, Query),
        ("state" = String, Query), ("scope" = String, Query), ("aud" = String, Query),
        ("code_challenge" = String, Query), ("code_challenge_method" = String, Query, description = "S256")),
    responses((status = 303, description = "To the consent page, or back to the app with an error"),
        (status = 400, description = "Unknown client, unregistered redirect URI or no state: not redirected", content_type = "application/problem+json")))]
pub async fn authorize(
    State(state): State<AppState>,
    Extension(ClientAddr(address)): Extension<ClientAddr>,
    Query(query): Query<AuthorizeQuery>,
) -> Result<Response, ApiError> {
    // Errors we cannot send back to the app.
    let client = match &query.client_id {
        Some(id) => clients::get(&state.db, id).await?,
        None => None,
    };
    let Some(client) = client else {
        let error = OAuthError::invalid_request("unknown client_id");
        audit_refusal(&state, &agent(address, None), "authorize", &error).await;
        return Err(ApiError::new(StatusCode::BAD_REQUEST, error.to_string()));
    };
    let who = agent(address, Some(&client.id));
    let redirect_uri = match &query.redirect_uri {
        Some(uri) if client.has_redirect_uri(uri) => uri.clone(),
        _ => {
            let error = OAuthError::invalid_request(
                "redirect_uri is missing or not registered for this client",
            );
            audit_refusal(&state, &who, "authorize", &error).await;
            return Err(ApiError::new(StatusCode::BAD_REQUEST, error.to_string()));
        }
    };
    let app_state = match &query.state {
        Some(s) if !s.is_empty() && s.len() <= MAX_STATE => s.clone(),
        _ => {
            let error = OAuthError::invalid_request(format!(
                "state is required (1 to {MAX_STATE} characters)"
            ));
            audit_refusal(&state, &who, "authorize", &error).await;
            return Err(ApiError::new(StatusCode::BAD_REQUEST, error.to_string()));
        }
    };
    // From here errors go back to the app.
    let checked = check_authorization(&state, &query);
    let request = match checked {
        Ok(scopes) => NewAuthorization {
            client_id: client.id.clone(),
            redirect_uri: redirect_uri.clone(),
            state: app_state.clone(),
            code_challenge: query.code_challenge.clone().unwrap_or_default(),
            scopes,
            issuer: state.public_url(),
        },
        Err(error) => {
            audit_refusal(&state, &who, "authorize", &error).await;
            let location = authorize::redirect_with(
                &redirect_uri,
                &[
                    ("error", error.code.code()),
                    ("error_description", &error.description),
                    ("state", &app_state),
                    ("iss", &state.public_url()),
                ],
            )?;
            return Ok(Redirect::to(&location).into_response());
        }
    };
    let lifetimes = Lifetimes::of(&state.config.oauth);
    let id = authorize::create_request(
        &state.db,
        &who,
        &request,
        lifetimes.authorization_request_secs,
    )
    .await?;
    state.audit.notify();
    Ok(Redirect::to(&format!("{CONSENT_PAGE}/{id}")).into_response())
}

/// The checks whose failures are reported to the app; returns the requested scopes.
fn check_authorization(
    state: &AppState,
    query: &AuthorizeQuery,
) -> Result<Vec<scopes::Scope>, OAuthError> {
    match query.response_type.as_deref() {
        Some("code") => {}
        Some(_) => {
            return Err(OAuthError::new(
                OAuthErrorCode::UnsupportedResponseType,
                "only response_type=code is supported",
            ))
        }
        None => return Err(OAuthError::invalid_request("response_type is required")),
    }
    match query.code_challenge_method.as_deref() {
        Some("S256") => {}
        Some(other) => {
            return Err(OAuthError::invalid_request(format!(
                "code_challenge_method {other} is not accepted: use S256"
            )))
        }
        None => {
            return Err(OAuthError::invalid_request(
                "PKCE is required: code_challenge_method=S256",
            ))
        }
    }
    let challenge_ok = query.code_challenge.as_deref().is_some_and(|c| {
        c.len() == 43
            && c.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    });
    if !challenge_ok {
        return Err(OAuthError::invalid_request(
            "code_challenge must be a base64url SHA-256 (43 characters)",
        ));
    }
    let fhir_base = state.fhir_base_url();
    if query.aud.as_deref().map(|a| a.trim_end_matches('/')) != Some(fhir_base.as_str()) {
        return Err(OAuthError::invalid_request(format!(
            "aud must be this gateway's FHIR base, {fhir_base}"
        )));
    }
    let requested = parse_scopes(query.scope.as_deref().unwrap_or(""))
        .map_err(|e| OAuthError::invalid_scope(e.to_string()))?;
    if let Some(system) = requested.iter().find(|s| s.is_system()) {
        return Err(OAuthError::invalid_scope(format!(
            "{system}: system/ scopes are for client_credentials only"
        )));
    }
    if !requested.iter().any(scopes::Scope::is_patient_resource) {
        return Err(OAuthError::invalid_scope(
            "ask for at least one patient/ scope",
        ));
    }
    Ok(requested)
}

// ---------------------------------------------------------------------------------------
// Token, revocation, introspection

/// The token endpoint's form (documentation only; the body is read as a form).
#[derive(Debug, Deserialize, ToSchema)]
pub struct TokenRequest {
    /// `authorization_code`, `refresh_token` or `client_credentials`.
    pub grant_type: String,
    pub code: Option<String>,
    pub redirect_uri: Option<String>,
    pub code_verifier: Option<String>,
    pub refresh_token: Option<String>,
    pub scope: Option<String>,
    pub client_id: Option<String>,
    /// `urn:ietf:params:oauth:client-assertion-type:jwt-bearer`
    pub client_assertion_type: Option<String>,
    pub client_assertion: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TokenResponse {
    pub access_token: String,
    /// Always `Bearer`.
    pub token_type: String,
    /// Seconds; at most 300.
    pub expires_in: u64,
    pub scope: String,
    /// The patient in context (authorisation code grants).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patient: Option<String>,
    /// Only when `offline_access` was granted; rotated on every use.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
    /// OpenID Connect ID token (ES384, keys at the JWKS URL) when `openid` was granted:
    /// `sub` is the patient, and `fhirUser` their Patient URL when that scope was granted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id_token: Option<String>,
}

impl From<IssuedTokens> for TokenResponse {
    fn from(issued: IssuedTokens) -> Self {
        TokenResponse {
            access_token: issued.access_token,
            token_type: "Bearer".into(),
            expires_in: issued.expires_in,
            scope: format_scopes(&issued.scopes),
            patient: issued.patient_id,
            refresh_token: issued.refresh_token,
            id_token: None,
        }
    }
}

/// The ID token for an authorisation-code grant that includes `openid`.
fn id_token(
    state: &AppState,
    client_id: &str,
    issued: &IssuedTokens,
) -> Result<Option<String>, Error> {
    let Some(patient) = issued.patient_id.as_deref() else {
        return Ok(None);
    };
    if !issued.scopes.contains(&scopes::Scope::OpenId) {
        return Ok(None);
    }
    let base = state.public_url();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let mut claims = json!({
        "iss": base,
        "sub": patient,
        "aud": client_id,
        "iat": now,
        "exp": now + issued.expires_in as i64,
    });
    if issued.scopes.contains(&scopes::Scope::FhirUser) {
        claims["fhirUser"] = json!(format!("{base}/fhir/Patient/{patient}"));
    }
    state.id_token_keys.sign(&claims).map(Some)
}

/// A form body, refused when it is not a form or repeats a parameter (RFC 6749 §3.2).
fn parse_form(headers: &HeaderMap, body: &Bytes) -> Result<HashMap<String, String>, OAuthError> {
    let form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if !form {
        return Err(OAuthError::invalid_request(
            "send application/x-www-form-urlencoded",
        ));
    }
    let mut params = HashMap::new();
    for (name, value) in form_urlencoded::parse(body) {
        if params
            .insert(name.to_string(), value.into_owned())
            .is_some()
        {
            return Err(OAuthError::invalid_request(format!(
                "parameter {name} appears more than once"
            )));
        }
    }
    Ok(params)
}

/// Authenticates the client by exactly one method: `client_secret_basic` or
/// `private_key_jwt`.
async fn authenticate_client(
    state: &AppState,
    headers: &HeaderMap,
    params: &HashMap<String, String>,
) -> Result<(Client, AuthMethod), Error> {
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, credentials) = v.split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("basic")
                .then(|| credentials.to_string())
        });
    let assertion = params.get("client_assertion");
    if params.contains_key("client_secret") {
        return Err(OAuthError::invalid_client(
            "client_secret_post is not supported: use client_secret_basic or private_key_jwt",
        )
        .into());
    }
    let authenticated = match (basic, assertion) {
        (Some(_), Some(_)) => {
            return Err(OAuthError::invalid_request(
                "use one client authentication method, not two",
            )
            .into())
        }
        (None, None) => {
            return Err(OAuthError::invalid_client("client authentication is required").into())
        }
        (Some(credentials), None) => (
            assertion::authenticate_basic(&state.db, &credentials).await?,
            AuthMethod::ClientSecretBasic,
        ),
        (None, Some(assertion)) => (
            assertion::authenticate_assertion(
                &state.db,
                &state.token_url(),
                params.get("client_id").map(String::as_str),
                params.get("client_assertion_type").map(String::as_str),
                assertion,
            )
            .await?,
            AuthMethod::PrivateKeyJwt,
        ),
    };
    if params
        .get("client_id")
        .is_some_and(|id| *id != authenticated.0.id)
    {
        return Err(
            OAuthError::invalid_client("client_id differs from the authenticated client").into(),
        );
    }
    Ok(authenticated)
}

/// Runs an OAuth endpoint: an `Error::OAuth` becomes an audited RFC 6749 error response,
/// anything else the usual problem.
async fn oauth_endpoint<F>(
    state: &AppState,
    address: Option<std::net::IpAddr>,
    endpoint: &str,
    headers: &HeaderMap,
    body: &Bytes,
    run: impl FnOnce(HashMap<String, String>, Client, Agent) -> F,
) -> Response
where
    F: std::future::Future<Output = Result<Response, Error>>,
{
    let (claimed, outcome) = match parse_form(headers, body) {
        Err(error) => (None, Err(Error::OAuth(error))),
        Ok(params) => {
            let claimed = params.get("client_id").cloned();
            match authenticate_client(state, headers, &params).await {
                Err(e) => (claimed, Err(e)),
                Ok((client, _)) => {
                    let who = agent(address, Some(&client.id));
                    let id = client.id.clone();
                    (Some(id), run(params, client, who).await)
                }
            }
        }
    };
    match outcome {
        Ok(response) => response,
        Err(Error::OAuth(error)) => {
            let mut who = agent(address, claimed.as_deref());
            let mut place = endpoint.to_string();
            if error.code == OAuthErrorCode::InvalidClient {
                // Not authenticated: name no client as the actor, only as a claim.
                who.actor = Actor::Anonymous;
                if let Some(claimed) = &claimed {
                    place = format!("{endpoint} (claimed client {claimed})");
                }
            }
            audit_refusal(state, &who, &place, &error).await;
            oauth_error_response(&error)
        }
        Err(other) => ApiError::from(other).into_response(),
    }
}

/// The token endpoint: `authorization_code` (PKCE S256), `refresh_token` (rotation) and
/// `client_credentials` (`system/` scopes, `private_key_jwt` only).
#[utoipa::path(post, path = "/oauth/token", tag = "oauth",
    request_body(content = TokenRequest, content_type = "application/x-www-form-urlencoded"),
    responses((status = 200, description = "Tokens", body = TokenResponse),
        (status = 400, description = "RFC 6749 error (`invalid_grant`, `invalid_scope`, …)", content_type = "application/json"),
        (status = 401, description = "`invalid_client`", content_type = "application/json")))]
pub async fn token(
    State(state): State<AppState>,
    Extension(ClientAddr(address)): Extension<ClientAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let lifetimes = Lifetimes::of(&state.config.oauth);
    let db = state.db.clone();
    let state_for_tokens = state.clone();
    let response = oauth_endpoint(
        &state,
        address,
        "token",
        &headers,
        &body,
        |params, client, who| async move {
            let param = |name: &str| params.get(name).map(String::as_str);
            let requested_scopes = |required: bool| -> Result<Option<Vec<scopes::Scope>>, Error> {
                match param("scope") {
                    Some(scope) => Ok(Some(
                        parse_scopes(scope)
                            .map_err(|e| OAuthError::invalid_scope(e.to_string()))?,
                    )),
                    None if required => Err(OAuthError::invalid_scope("scope is required").into()),
                    None => Ok(None),
                }
            };
            let issued = match param("grant_type") {
                Some("authorization_code") => {
                    let code = param("code")
                        .ok_or_else(|| OAuthError::invalid_request("code is required"))?;
                    tokens::exchange_code(
                        &db,
                        &lifetimes,
                        &client,
                        &who,
                        code,
                        param("redirect_uri"),
                        param("code_verifier"),
                    )
                    .await?
                }
                Some("refresh_token") => {
                    let refresh_token = param("refresh_token")
                        .ok_or_else(|| OAuthError::invalid_request("refresh_token is required"))?;
                    tokens::refresh(
                        &db,
                        &lifetimes,
                        &client,
                        &who,
                        refresh_token,
                        requested_scopes(false)?,
                    )
                    .await?
                }
                Some("client_credentials") => {
                    let scopes = requested_scopes(true)?.unwrap_or_default();
                    tokens::client_credentials(&db, &lifetimes, &client, &who, scopes).await?
                }
                Some(other) => {
                    return Err(OAuthError::new(
                        OAuthErrorCode::UnsupportedGrantType,
                        format!("grant_type {other} is not supported"),
                    )
                    .into())
                }
                None => return Err(OAuthError::invalid_request("grant_type is required").into()),
            };
            let id_token = if param("grant_type") == Some("authorization_code") {
                id_token(&state_for_tokens, &client.id, &issued)?
            } else {
                None
            };
            let mut response = TokenResponse::from(issued);
            response.id_token = id_token;
            let body = serde_json::to_value(response).unwrap_or_default();
            Ok(no_store_json(body))
        },
    )
    .await;
    state.audit.notify();
    response
}

/// The revocation form (documentation only).
#[derive(Debug, Deserialize, ToSchema)]
pub struct RevocationRequest {
    pub token: String,
    /// `access_token` or `refresh_token`; optional, the gateway finds the token either way.
    pub token_type_hint: Option<String>,
    pub client_assertion_type: Option<String>,
    pub client_assertion: Option<String>,
}

/// RFC 7009: revokes a token of the authenticated client; a refresh token takes every
/// token of its family with it. Unknown tokens get the same 200.
#[utoipa::path(post, path = "/oauth/revoke", tag = "oauth",
    request_body(content = RevocationRequest, content_type = "application/x-www-form-urlencoded"),
    responses((status = 200, description = "Revoked (or unknown)"),
        (status = 400, description = "RFC 6749 error", content_type = "application/json"),
        (status = 401, description = "`invalid_client`", content_type = "application/json")))]
pub async fn revoke(
    State(state): State<AppState>,
    Extension(ClientAddr(address)): Extension<ClientAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let db = state.db.clone();
    let response = oauth_endpoint(
        &state,
        address,
        "revoke",
        &headers,
        &body,
        |params, client, who| async move {
            let token = params
                .get("token")
                .ok_or_else(|| OAuthError::invalid_request("token is required"))?;
            tokens::revoke(&db, &client, &who, token).await?;
            Ok(no_store_json(json!({})))
        },
    )
    .await;
    state.audit.notify();
    response
}

/// The introspection form (documentation only).
#[derive(Debug, Deserialize, ToSchema)]
pub struct IntrospectionRequest {
    pub token: String,
    pub token_type_hint: Option<String>,
    pub client_assertion_type: Option<String>,
    pub client_assertion: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Introspection {
    pub active: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// Unix seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exp: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iat: Option<i64>,
    /// `access_token` or `refresh_token`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patient: Option<String>,
    /// Extension: the consent the grant rests on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consent_id: Option<String>,
}

/// RFC 7662: whether a token of the authenticated client is active, and its grant.
/// Unknown, expired, revoked, spent and other clients' tokens are `{"active": false}`.
#[utoipa::path(post, path = "/oauth/introspect", tag = "oauth",
    request_body(content = IntrospectionRequest, content_type = "application/x-www-form-urlencoded"),
    responses((status = 200, description = "Introspection", body = Introspection),
        (status = 400, description = "RFC 6749 error", content_type = "application/json"),
        (status = 401, description = "`invalid_client`", content_type = "application/json")))]
pub async fn introspect(
    State(state): State<AppState>,
    Extension(ClientAddr(address)): Extension<ClientAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let db = state.db.clone();
    let response = oauth_endpoint(
        &state,
        address,
        "introspect",
        &headers,
        &body,
        |params, client, _who| async move {
            let token = params
                .get("token")
                .ok_or_else(|| OAuthError::invalid_request("token is required"))?;
            let info = tokens::introspect(&db, &client, token).await?;
            let body = match info {
                None => Introspection {
                    active: false,
                    scope: None,
                    client_id: None,
                    exp: None,
                    iat: None,
                    token_type: None,
                    patient: None,
                    consent_id: None,
                },
                Some(info) => Introspection {
                    active: true,
                    scope: Some(format_scopes(&info.scopes)),
                    client_id: Some(info.client_id),
                    exp: Some(info.exp),
                    iat: Some(info.iat),
                    token_type: Some(info.token_type.to_string()),
                    patient: info.patient_id,
                    consent_id: info.consent_id,
                },
            };
            Ok(no_store_json(
                serde_json::to_value(body).unwrap_or_default(),
            ))
        },
    )
    .await;
    state.audit.notify();
    response
}

// ---------------------------------------------------------------------------------------
// Bearer tokens on resource endpoints

/// A 401 for resource endpoints: problem+json with the RFC 6750 challenge.
pub(super) fn bearer_refusal(error: Option<&OAuthError>) -> Response {
    let detail = error.map_or_else(
        || "an access token is required".to_string(),
        |e| e.to_string(),
    );
    let mut response = ApiError::new(StatusCode::UNAUTHORIZED, detail).into_response();
    let challenge = match error {
        None => "Bearer realm=\"phr-gateway\"".to_string(),
        Some(e) => format!(
            "Bearer realm=\"phr-gateway\", error=\"{}\", error_description=\"{}\"",
            e.code.code(),
            e.description.replace(['"', '\\'], "'")
        ),
    };
    if let Ok(value) = HeaderValue::from_str(&challenge) {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, value);
    }
    response
}

/// The token of an `Authorization: Bearer <token>` header (scheme case-insensitive).
pub(super) fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        })
        .filter(|t| !t.is_empty())
}

/// `Authorization: Bearer <access token>`: the grant behind it, or a 401 with
/// `WWW-Authenticate: Bearer error="invalid_token"` (audited) for unknown, expired and
/// revoked tokens. The consent re-check belongs to the resource endpoints.
impl FromRequestParts<AppState> for AccessGrant {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        let address = parts.extensions.get::<ClientAddr>().and_then(|c| c.0);
        let Some(token) = bearer_token(&parts.headers) else {
            return Err(bearer_refusal(None));
        };
        match tokens::access_grant(&state.db, token).await {
            Ok(grant) => Ok(grant),
            Err(Error::OAuth(error)) => {
                audit_refusal(state, &agent(address, None), "resource", &error).await;
                Err(bearer_refusal(Some(&error)))
            }
            Err(other) => Err(ApiError::from(other).into_response()),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct GrantView {
    pub client_id: String,
    pub patient: Option<String>,
    pub consent_id: Option<String>,
    pub scope: String,
    /// RFC 3339.
    pub expires_at: String,
}

/// The grant behind the caller's own access token (for apps checking what they hold).
#[utoipa::path(get, path = "/oauth/grant", tag = "oauth",
    responses((status = 200, description = "The grant", body = GrantView),
        (status = 401, description = "No, unknown, expired or revoked token", content_type = "application/problem+json")))]
pub async fn grant(grant: AccessGrant) -> Json<GrantView> {
    Json(GrantView {
        client_id: grant.client_id,
        patient: grant.patient_id,
        consent_id: grant.consent_id,
        scope: format_scopes(&grant.scopes),
        expires_at: millis_to_rfc3339(grant.expires_at),
    })
}
