//! Extractors for signed-in callers. `AuthSession` (and so `PatientSession` and
//! `OperatorSession`) accepts only sessions that owe nothing: one still waiting for its
//! second factor opens only the second-factor endpoints (`SecondFactorSession`). Every
//! operator endpoint takes `OperatorSession`, which also records each action of a
//! break-glass session.

use axum::extract::{FromRequestParts, OptionalFromRequestParts};
use axum::http::header;
use axum::http::request::Parts;

use super::error::ApiError;
use super::{AppState, ClientAddr};
use phr_consent::{Performer, PersonRef, Representation};

use crate::audit::{AccountRole, Agent};
use crate::error::Error;
use crate::store::accounts::{agent_of, Session, SessionStage};

pub const SESSION_COOKIE: &str = "__Host-phr_session";
/// The person a representative is acting for, chosen in the portal (the API sends the
/// `Acting-For` header instead). Checked against the registered representations on every
/// request.
pub const ACTING_FOR_COOKIE: &str = "__Host-phr_acting_for";
pub const ACTING_FOR_HEADER: &str = "acting-for";

/// The cookie choosing whom to act for (an empty value with age 0 clears it).
pub fn acting_for_cookie(patient_id: &str, max_age_secs: u64) -> axum::http::HeaderValue {
    let cookie = format!(
        "{ACTING_FOR_COOKIE}={patient_id}; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age={max_age_secs}"
    );
    axum::http::HeaderValue::from_str(&cookie).unwrap_or_else(|_| {
        axum::http::HeaderValue::from_static("__Host-phr_acting_for=; Max-Age=0")
    })
}

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

/// A signed-in patient. `patient_id` is whose data the request is about: the account's own
/// patient, or the person it is acting for as a registered representative.
pub struct PatientSession {
    pub auth: AuthSession,
    pub patient_id: String,
    pub acting: Option<Acting>,
}

/// Acting for someone else: the representative's own patient id and on what standing.
#[derive(Debug, Clone)]
pub struct Acting {
    pub representative_patient_id: String,
    pub representation: Representation,
}

impl PatientSession {
    /// The signed-in account's own patient id, whoever it is acting for.
    pub fn own_patient_id(&self) -> &str {
        self.acting
            .as_ref()
            .map(|a| a.representative_patient_id.as_str())
            .unwrap_or(&self.patient_id)
    }

    /// Who is acting, for consent records: the patient, or their representative.
    pub fn performer(&self) -> Performer {
        match &self.acting {
            None => Performer::patient(&PersonRef::new(&self.patient_id)),
            Some(acting) => Performer {
                person: PersonRef::new(&acting.representative_patient_id),
                representation: acting.representation,
            },
        }
    }
}

fn token_from(parts: &Parts) -> Option<String> {
    if let Some(value) = parts.headers.get(header::AUTHORIZATION) {
        let value = value.to_str().ok()?;
        let token = value.strip_prefix("Bearer ")?;
        return Some(token.trim().to_string());
    }
    cookie(parts, SESSION_COOKIE)
}

/// A cookie's value. Over HTTP/2 browsers may send each cookie in its own `cookie` header
/// field (RFC 9113 §8.2.3), so every field is read.
fn cookie(parts: &Parts, wanted: &str) -> Option<String> {
    parts
        .headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|field| field.to_str().ok())
        .flat_map(|field| field.split(';'))
        .find_map(|c| {
            let (name, value) = c.trim().split_once('=')?;
            (name == wanted && !value.is_empty()).then(|| value.to_string())
        })
}

/// Whom the request asks to act for, if anyone: the header first, then the portal's cookie.
fn acting_for(parts: &Parts) -> Option<String> {
    parts
        .headers
        .get(ACTING_FOR_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .or_else(|| cookie(parts, ACTING_FOR_COOKIE))
}

/// Any live session, whatever it still owes.
async fn signed_in(parts: &Parts, state: &AppState) -> Result<AuthSession, ApiError> {
    let token = token_from(parts).ok_or(Error::Unauthenticated("sign in first"))?;
    let session = state.accounts.authenticate(&token).await?;
    let address = parts.extensions.get::<ClientAddr>().and_then(|c| c.0);
    Ok(AuthSession {
        session,
        token,
        address,
    })
}

impl FromRequestParts<AppState> for AuthSession {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let auth = signed_in(parts, state).await?;
        if auth.session.stage != SessionStage::Complete {
            return Err(Error::Unauthenticated("prove your second factor first").into());
        }
        Ok(auth)
    }
}

/// A session that still owes its second factor (the password was right).
pub struct SecondFactorSession(pub AuthSession);

impl FromRequestParts<AppState> for SecondFactorSession {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let auth = signed_in(parts, state).await?;
        if auth.session.stage != SessionStage::SecondFactor {
            return Err(Error::Conflict("this session owes no second factor".into()).into());
        }
        Ok(SecondFactorSession(auth))
    }
}

/// Any live session, for signing out (a session waiting for its second factor too).
pub struct AnySession(pub AuthSession);

impl FromRequestParts<AppState> for AnySession {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        Ok(AnySession(signed_in(parts, state).await?))
    }
}

impl FromRequestParts<AppState> for OperatorSession {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let auth = AuthSession::from_request_parts(parts, state).await?;
        if auth.session.account.role != AccountRole::Operator {
            return Err(Error::Forbidden("operators only").into());
        }
        if let Some(use_id) = &auth.session.emergency_use_id {
            // Every action of a break-glass session is on the record for its review.
            let action = format!("{} {}", parts.method, parts.uri.path());
            state
                .break_glass
                .record_action(use_id, &auth.agent(), &action)
                .await?;
        }
        Ok(OperatorSession(auth))
    }
}

impl OperatorSession {
    /// Whether this is a break-glass session (some actions, like reviewing break-glass
    /// uses, are for normal operators only).
    pub fn is_emergency(&self) -> bool {
        self.0.session.emergency_use_id.is_some()
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
            (AccountRole::Patient, Some(own)) => match acting_for(parts) {
                None => Ok(PatientSession {
                    auth,
                    patient_id: own,
                    acting: None,
                }),
                Some(other) if other == own => Ok(PatientSession {
                    auth,
                    patient_id: own,
                    acting: None,
                }),
                Some(other) => {
                    let Some(record) = state.representations.active(&own, &other).await? else {
                        return Err(Error::Forbidden(
                            "you are not registered to act for this person",
                        )
                        .into());
                    };
                    Ok(PatientSession {
                        auth,
                        patient_id: other,
                        acting: Some(Acting {
                            representative_patient_id: own,
                            representation: record.kind,
                        }),
                    })
                }
            },
            _ => Err(Error::Forbidden("patients only").into()),
        }
    }
}

/// `Option<AnySession>`: the operator pages show a sign-in form to visitors.
impl OptionalFromRequestParts<AppState> for AnySession {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Option<Self>, ApiError> {
        match signed_in(parts, state).await {
            Ok(auth) => Ok(Some(AnySession(auth))),
            Err(e) if e.status == axum::http::StatusCode::UNAUTHORIZED => Ok(None),
            Err(e) => Err(e),
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
