//! Sign-in and sign-out for patient and operator accounts. Sessions are bearer tokens,
//! also set as a `__Host-` cookie (Secure, HttpOnly, SameSite=Lax) for browsers.

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::ApiError;
use super::session::{session_cookie, AnySession, AuthSession};
use super::{AppState, ClientAddr};
use crate::store::accounts::{Session, SessionStage};
use crate::store::millis_to_rfc3339;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    pub username: String,
    pub password: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SessionInfo {
    /// The bearer token; shown once, only its hash is stored. Empty when echoing a session.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub token: String,
    pub account_id: String,
    /// `patient` or `operator`.
    pub role: &'static str,
    pub expires_at: String,
    /// `complete`, or `second-factor` while a second factor is owed: then prove one of
    /// `second_factor_methods` at `/auth/second-factor/…` within five minutes.
    pub stage: &'static str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub second_factor_methods: Vec<&'static str>,
    /// How the session was established (`password+totp`, `passkey`, `break-glass`…).
    pub method: String,
}

impl SessionInfo {
    pub fn of(session: &Session, token: String, second_factor_methods: Vec<&'static str>) -> Self {
        SessionInfo {
            token,
            account_id: session.account.id.clone(),
            role: session.account.role.code(),
            expires_at: millis_to_rfc3339(session.expires_at),
            stage: match session.stage {
                SessionStage::Complete => "complete",
                SessionStage::SecondFactor => "second-factor",
            },
            second_factor_methods,
            method: session.method.clone(),
        }
    }
}

/// Signs in with username and password.
#[utoipa::path(post, path = "/auth/login", tag = "auth", request_body = LoginRequest,
    responses(
        (status = 200, description = "Signed in", body = SessionInfo),
        (status = 401, description = "Wrong username or password", content_type = "application/problem+json"),
        (status = 429, description = "Too many failures; see Retry-After", content_type = "application/problem+json")))]
pub async fn login(
    State(state): State<AppState>,
    Extension(ClientAddr(address)): Extension<ClientAddr>,
    Json(request): Json<LoginRequest>,
) -> Result<Response, ApiError> {
    let (session, token) = state
        .accounts
        .login(&request.username, &request.password, address)
        .await?;
    state.audit.notify();
    let mut headers = HeaderMap::new();
    headers.insert(
        header::SET_COOKIE,
        session_cookie(&token, state.config.sessions.absolute_timeout_secs),
    );
    let methods = match session.stage {
        SessionStage::SecondFactor => state
            .second_factors
            .enrolled(&session.account.id)
            .await?
            .methods(),
        SessionStage::Complete => Vec::new(),
    };
    Ok((headers, Json(SessionInfo::of(&session, token, methods))).into_response())
}

/// Ends the current session.
#[utoipa::path(post, path = "/auth/logout", tag = "auth",
    responses((status = 204, description = "Signed out"),
        (status = 401, description = "Not signed in", content_type = "application/problem+json")))]
pub async fn logout(
    State(state): State<AppState>,
    AnySession(auth): AnySession,
) -> Result<Response, ApiError> {
    state
        .accounts
        .logout(&auth.session, &auth.token, auth.address)
        .await?;
    state.audit.notify();
    let mut response = StatusCode::NO_CONTENT.into_response();
    response
        .headers_mut()
        .insert(header::SET_COOKIE, session_cookie("", 0));
    Ok(response)
}

/// Who is signed in.
#[utoipa::path(get, path = "/auth/session", tag = "auth",
    responses((status = 200, description = "The current session", body = SessionInfo),
        (status = 401, description = "Not signed in", content_type = "application/problem+json")))]
pub async fn session(auth: AuthSession) -> Json<SessionInfo> {
    Json(SessionInfo::of(&auth.session, String::new(), Vec::new()))
}
