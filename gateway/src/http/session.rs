//! Extractors for signed-in callers. Every operator endpoint takes `OperatorSession`, so
//! adding MFA and break-glass rules later is one change here.

use axum::extract::{FromRequestParts, OptionalFromRequestParts};
use axum::http::header;
use axum::http::request::Parts;

use super::error::ApiError;
use super::{AppState, ClientAddr};
use crate::audit::{AccountRole, Agent};
use crate::error::Error;
use crate::store::accounts::{agent_of, Session};

pub const SESSION_COOKIE: &str = "__Host-phr_session";

/// The session cookie (an empty token with age 0 clears it). SameSite=Lax, not Strict: the
/// patient comes back from a source's authorisation page by a cross-site redirect.
pub fn session_cookie(token: &str, max_age_secs: u64) -> axum::http::HeaderValue {
    let cookie = format!(
        "{SESSION_COOKIE}={token}; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age={max_age_secs}"
    );
    // Tokens are base64url, so the value is always a valid header.
    axum::http::HeaderValue::from_str(&cookie)
        .unwrap_or_else(|_| axum::http::HeaderValue::from_static("__Host-phr_session=; Max-Age=0"))
}

/// Any signed-in account, from `Authorization: Bearer` or the session cookie.
pub struct AuthSession {
    pub session: Session,
    pub token: String,
    pub address: Option<std::net::IpAddr>,
}

impl AuthSession {
    pub fn agent(&self) -> Agent {
        agent_of(&self.session.account, self.address)
    }
}

/// A signed-in operator.
pub struct OperatorSession(pub AuthSession);

/// A signed-in patient, with the patient id the account belongs to.
pub struct PatientSession {
    pub auth: AuthSession,
    pub patient_id: String,
}

fn token_from(parts: &Parts) -> Option<String> {
    if let Some(value) = parts.headers.get(header::AUTHORIZATION) {
        let value = value.to_str().ok()?;
        let token = value.strip_prefix("Bearer ")?;
        return Some(token.trim().to_string());
    }
    let cookies = parts.headers.get(header::COOKIE)?.to_str().ok()?;
    cookies.split(';').find_map(|c| {
        let (name, value) = c.trim().split_once('=')?;
        (name == SESSION_COOKIE).then(|| value.to_string())
    })
}

impl FromRequestParts<AppState> for AuthSession {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = token_from(parts).ok_or(Error::Unauthenticated("sign in first"))?;
        let session = state.accounts.authenticate(&token).await?;
        let address = parts.extensions.get::<ClientAddr>().and_then(|c| c.0);
        Ok(AuthSession {
            session,
            token,
            address,
        })
    }
}

impl FromRequestParts<AppState> for OperatorSession {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let auth = AuthSession::from_request_parts(parts, state).await?;
        if auth.session.account.role != AccountRole::Operator {
            return Err(Error::Forbidden("operators only").into());
        }
        Ok(OperatorSession(auth))
    }
}

impl FromRequestParts<AppState> for PatientSession {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let auth = AuthSession::from_request_parts(parts, state).await?;
        match (
            auth.session.account.role,
            auth.session.account.patient_id.clone(),
        ) {
            (AccountRole::Patient, Some(patient_id)) => Ok(PatientSession { auth, patient_id }),
            _ => Err(Error::Forbidden("patients only").into()),
        }
    }
}

/// `Option<PatientSession>`: pages that show a sign-in form to visitors.
impl OptionalFromRequestParts<AppState> for PatientSession {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Option<Self>, ApiError> {
        match <PatientSession as FromRequestParts<AppState>>::from_request_parts(parts, state).await
        {
            Ok(session) => Ok(Some(session)),
            Err(e)
                if e.status == axum::http::StatusCode::UNAUTHORIZED
                    || e.status == axum::http::StatusCode::FORBIDDEN =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}
