//! Second factors over the API: proving one to finish signing in (TOTP, recovery code or
//! passkey), signing in with a passkey alone, and enrolling factors. Enrolment changes ask
//! for the password again, so a borrowed session cannot add an attacker's factor.

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use webauthn_rs::prelude::{PublicKeyCredential, RegisterPublicKeyCredential};

use super::auth::SessionInfo;
use super::error::ApiError;
use super::session::{session_cookie, AuthSession, SecondFactorSession};
use super::{AppState, ClientAddr};
use crate::error::Error;
use crate::mfa::{EnrolledFactors, PasskeyInfo, Proof, TotpEnrolment};
use crate::store::accounts::{NewSession, Session, SessionStage};

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CodeRequest {
    /// The six-digit TOTP code, or a recovery code.
    pub code: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PasswordRequest {
    /// The account's password again (step-up before changing factors).
    pub password: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UsernameRequest {
    pub username: String,
}

/// A WebAuthn challenge: pass `options` to `navigator.credentials.get()` or `.create()`,
/// then send the result back with `ceremony`.
#[derive(Debug, Serialize, ToSchema)]
pub struct PasskeyChallenge {
    pub ceremony: String,
    #[schema(value_type = Object)]
    pub options: serde_json::Value,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PasskeyAssertion {
    pub ceremony: String,
    /// The `PublicKeyCredential` from `navigator.credentials.get()`, as JSON.
    #[schema(value_type = Object)]
    pub credential: Box<PublicKeyCredential>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PasskeySignIn {
    pub username: String,
    pub ceremony: String,
    #[schema(value_type = Object)]
    pub credential: Box<PublicKeyCredential>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PasskeyRegistration {
    pub ceremony: String,
    /// A name for the passkey (e.g. "work laptop").
    pub name: String,
    /// The `PublicKeyCredential` from `navigator.credentials.create()`, as JSON.
    #[schema(value_type = Object)]
    pub credential: Box<RegisterPublicKeyCredential>,
}

/// What enrolling a first factor gives: recovery codes, shown once.
#[derive(Debug, Serialize, ToSchema)]
pub struct Enrolled {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub passkey: Option<PasskeyInfo>,
    /// Present when this was the account's first factor: write them down; each works once.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub recovery_codes: Vec<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RecoveryCodes {
    pub recovery_codes: Vec<String>,
}

fn signed_in(session: &Session, token: String, max_age: u64) -> Response {
    let mut headers = HeaderMap::new();
    headers.insert(header::SET_COOKIE, session_cookie(&token, max_age));
    let info = SessionInfo::of(session, token, Vec::new());
    (headers, Json(info)).into_response()
}

async fn finish(
    state: &AppState,
    pending: &SecondFactorSession,
    proof: Proof,
) -> Result<Response, ApiError> {
    let auth = &pending.0;
    let result = state
        .second_factors
        .complete_sign_in(&auth.session, &auth.token, &proof, auth.address)
        .await;
    state.audit.notify();
    let session = result?;
    let mut response = Json(SessionInfo::of(&session, String::new(), Vec::new())).into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        session_cookie(&auth.token, state.config.sessions.absolute_timeout_secs),
    );
    Ok(response)
}

/// Finishes signing in with a TOTP code (a code is accepted once).
#[utoipa::path(post, path = "/auth/second-factor/totp", tag = "auth", request_body = CodeRequest,
    responses(
        (status = 200, description = "Signed in", body = SessionInfo),
        (status = 401, description = "Wrong or reused code", content_type = "application/problem+json"),
        (status = 429, description = "Locked after repeated failures", content_type = "application/problem+json")))]
pub async fn prove_totp(
    State(state): State<AppState>,
    pending: SecondFactorSession,
    Json(request): Json<CodeRequest>,
) -> Result<Response, ApiError> {
    finish(&state, &pending, Proof::Totp(request.code)).await
}

/// Finishes signing in with a single-use recovery code.
#[utoipa::path(post, path = "/auth/second-factor/recovery-code", tag = "auth", request_body = CodeRequest,
    responses(
        (status = 200, description = "Signed in", body = SessionInfo),
        (status = 401, description = "Wrong or used code", content_type = "application/problem+json")))]
pub async fn prove_recovery_code(
    State(state): State<AppState>,
    pending: SecondFactorSession,
    Json(request): Json<CodeRequest>,
) -> Result<Response, ApiError> {
    finish(&state, &pending, Proof::RecoveryCode(request.code)).await
}

/// A passkey challenge for the session's second factor.
#[utoipa::path(post, path = "/auth/second-factor/passkey/start", tag = "auth",
    responses(
        (status = 200, description = "Challenge", body = PasskeyChallenge),
        (status = 409, description = "No passkey registered", content_type = "application/problem+json")))]
pub async fn passkey_challenge(
    State(state): State<AppState>,
    pending: SecondFactorSession,
) -> Result<Json<PasskeyChallenge>, ApiError> {
    let (ceremony, options) = state
        .second_factors
        .passkeys
        .start_authentication(&pending.0.session.account)
        .await?;
    challenge(ceremony, &options)
}

/// Finishes signing in with a passkey assertion.
#[utoipa::path(post, path = "/auth/second-factor/passkey/finish", tag = "auth", request_body = PasskeyAssertion,
    responses(
        (status = 200, description = "Signed in", body = SessionInfo),
        (status = 401, description = "Assertion not accepted", content_type = "application/problem+json")))]
pub async fn prove_passkey(
    State(state): State<AppState>,
    pending: SecondFactorSession,
    Json(request): Json<PasskeyAssertion>,
) -> Result<Response, ApiError> {
    let proof = Proof::Passkey {
        ceremony: request.ceremony,
        credential: request.credential,
    };
    finish(&state, &pending, proof).await
}

/// Starts signing in with a passkey alone (it proves possession and, by the device's user
/// verification, the person).
#[utoipa::path(post, path = "/auth/passkey/start", tag = "auth", request_body = UsernameRequest,
    responses(
        (status = 200, description = "Challenge", body = PasskeyChallenge),
        (status = 401, description = "No passkey sign-in for this account", content_type = "application/problem+json")))]
pub async fn passkey_sign_in_start(
    State(state): State<AppState>,
    Json(request): Json<UsernameRequest>,
) -> Result<Json<PasskeyChallenge>, ApiError> {
    let refused = || {
        ApiError::from(Error::Unauthenticated(
            "no passkey sign-in for this account",
        ))
    };
    let account = state
        .accounts
        .by_username(&request.username)
        .await?
        .ok_or_else(refused)?;
    if state.accounts.is_emergency(&account.id).await? {
        return Err(refused());
    }
    let (ceremony, options) = match state
        .second_factors
        .passkeys
        .start_authentication(&account)
        .await
    {
        Ok(started) => started,
        Err(Error::Conflict(_)) => return Err(refused()),
        Err(e) => return Err(e.into()),
    };
    challenge(ceremony, &options)
}

/// Finishes signing in with a passkey alone.
#[utoipa::path(post, path = "/auth/passkey/finish", tag = "auth", request_body = PasskeySignIn,
    responses(
        (status = 200, description = "Signed in", body = SessionInfo),
        (status = 401, description = "Assertion not accepted", content_type = "application/problem+json")))]
pub async fn passkey_sign_in_finish(
    State(state): State<AppState>,
    Extension(ClientAddr(address)): Extension<ClientAddr>,
    Json(request): Json<PasskeySignIn>,
) -> Result<Response, ApiError> {
    let account = state
        .accounts
        .by_username(&request.username)
        .await?
        .ok_or(Error::Unauthenticated("the passkey was not accepted"))?;
    let proof = Proof::Passkey {
        ceremony: request.ceremony,
        credential: request.credential,
    };
    let verified = state.second_factors.verify(&account, &proof, address).await;
    if verified.is_err() {
        state.audit.notify();
    }
    verified?;
    let (session, token) = state
        .accounts
        .open_session(
            &account,
            address,
            NewSession {
                stage: SessionStage::Complete,
                method: "passkey",
                lifetime_millis: None,
                emergency_use_id: None,
                detail: String::new(),
            },
        )
        .await?;
    state.audit.notify();
    Ok(signed_in(
        &session,
        token,
        state.config.sessions.absolute_timeout_secs,
    ))
}

/// The signed-in account's factors (never the secrets).
#[utoipa::path(get, path = "/auth/factors", tag = "auth",
    responses((status = 200, description = "Enrolled factors", body = EnrolledFactors)))]
pub async fn factors(
    State(state): State<AppState>,
    auth: AuthSession,
) -> Result<Json<EnrolledFactors>, ApiError> {
    Ok(Json(
        state
            .second_factors
            .enrolled(&auth.session.account.id)
            .await?,
    ))
}

/// Starts TOTP enrolment: a new secret, in force once confirmed with a code.
#[utoipa::path(post, path = "/auth/factors/totp", tag = "auth", request_body = PasswordRequest,
    responses(
        (status = 200, description = "The new secret (shown once)", body = TotpEnrolment),
        (status = 401, description = "Wrong password", content_type = "application/problem+json")))]
pub async fn begin_totp(
    State(state): State<AppState>,
    auth: AuthSession,
    Json(request): Json<PasswordRequest>,
) -> Result<Json<TotpEnrolment>, ApiError> {
    step_up(&state, &auth, &request.password, "TOTP enrolment").await?;
    Ok(Json(
        state
            .second_factors
            .begin_totp(&auth.session.account)
            .await?,
    ))
}

/// Confirms the new TOTP secret with a code from it.
#[utoipa::path(post, path = "/auth/factors/totp/confirm", tag = "auth", request_body = CodeRequest,
    responses(
        (status = 200, description = "Enrolled", body = Enrolled),
        (status = 401, description = "Wrong code", content_type = "application/problem+json"),
        (status = 409, description = "No enrolment waiting", content_type = "application/problem+json")))]
pub async fn confirm_totp(
    State(state): State<AppState>,
    auth: AuthSession,
    Json(request): Json<CodeRequest>,
) -> Result<Json<Enrolled>, ApiError> {
    let account = &auth.session.account;
    let first = !state.second_factors.enrolled(&account.id).await?.any();
    let confirmed = state
        .second_factors
        .confirm_totp(account, &request.code, auth.address)
        .await;
    state.audit.notify();
    confirmed?;
    Ok(Json(Enrolled {
        passkey: None,
        recovery_codes: first_codes(&state, &auth, first).await?,
    }))
}

/// Starts registering a passkey.
#[utoipa::path(post, path = "/auth/factors/passkeys/start", tag = "auth", request_body = PasswordRequest,
    responses(
        (status = 200, description = "Challenge", body = PasskeyChallenge),
        (status = 401, description = "Wrong password", content_type = "application/problem+json")))]
pub async fn passkey_registration_start(
    State(state): State<AppState>,
    auth: AuthSession,
    Json(request): Json<PasswordRequest>,
) -> Result<Json<PasskeyChallenge>, ApiError> {
    step_up(&state, &auth, &request.password, "passkey registration").await?;
    let (ceremony, options) = state
        .second_factors
        .passkeys
        .start_registration(&auth.session.account)
        .await?;
    challenge(ceremony, &options)
}

/// Finishes registering a passkey.
#[utoipa::path(post, path = "/auth/factors/passkeys/finish", tag = "auth", request_body = PasskeyRegistration,
    responses(
        (status = 200, description = "Registered", body = Enrolled),
        (status = 400, description = "Not accepted", content_type = "application/problem+json")))]
pub async fn passkey_registration_finish(
    State(state): State<AppState>,
    auth: AuthSession,
    Json(request): Json<PasskeyRegistration>,
) -> Result<Json<Enrolled>, ApiError> {
    let account = &auth.session.account;
    let first = !state.second_factors.enrolled(&account.id).await?.any();
    let passkey = state
        .second_factors
        .passkeys
        .finish_registration(
            account,
            &request.ceremony,
            &request.name,
            &request.credential,
            auth.address,
        )
        .await?;
    state.audit.notify();
    Ok(Json(Enrolled {
        passkey: Some(passkey),
        recovery_codes: first_codes(&state, &auth, first).await?,
    }))
}

/// A new set of recovery codes; the old set stops working.
#[utoipa::path(post, path = "/auth/factors/recovery-codes", tag = "auth", request_body = PasswordRequest,
    responses(
        (status = 200, description = "The codes (shown once)", body = RecoveryCodes),
        (status = 401, description = "Wrong password", content_type = "application/problem+json")))]
pub async fn recovery_codes(
    State(state): State<AppState>,
    auth: AuthSession,
    Json(request): Json<PasswordRequest>,
) -> Result<(StatusCode, Json<RecoveryCodes>), ApiError> {
    step_up(&state, &auth, &request.password, "new recovery codes").await?;
    let codes = state
        .second_factors
        .issue_recovery_codes(&auth.session.account, auth.address)
        .await?;
    state.audit.notify();
    Ok((
        StatusCode::OK,
        Json(RecoveryCodes {
            recovery_codes: codes,
        }),
    ))
}

async fn step_up(
    state: &AppState,
    auth: &AuthSession,
    password: &str,
    purpose: &str,
) -> Result<(), ApiError> {
    let result = state
        .accounts
        .step_up(&auth.session.account, password, auth.address, purpose)
        .await;
    state.audit.notify();
    Ok(result?)
}

async fn first_codes(
    state: &AppState,
    auth: &AuthSession,
    first: bool,
) -> Result<Vec<String>, ApiError> {
    if !first {
        return Ok(Vec::new());
    }
    let codes = state
        .second_factors
        .issue_recovery_codes(&auth.session.account, auth.address)
        .await?;
    state.audit.notify();
    Ok(codes)
}

/// A step-up's second factor as a request carries it: a typed code (TOTP or recovery
/// code) or a passkey assertion from `/auth/step-up/passkey/start`. Blank codes are none.
pub fn step_up_proof(code: Option<&str>, passkey: Option<PasskeyAssertion>) -> Option<Proof> {
    if let Some(assertion) = passkey {
        return Some(Proof::Passkey {
            ceremony: assertion.ceremony,
            credential: assertion.credential,
        });
    }
    code.map(str::trim)
        .filter(|c| !c.is_empty())
        .map(Proof::from_code)
}

/// Step-up for a consent decision made on someone else's behalf (a representative): a
/// disclosure of another person's data needs the representative to prove themself again.
/// Withdrawals need none: stopping a disclosure reveals nothing, and withdrawing must stay
/// as easy as granting.
pub async fn step_up_acting_for(
    state: &AppState,
    patient: &super::session::PatientSession,
    password: Option<&str>,
    second_factor: Option<&Proof>,
    purpose: &str,
) -> Result<(), ApiError> {
    if patient.acting.is_none() {
        return Ok(());
    }
    let Some(password) = password.filter(|p| !p.is_empty()) else {
        return Err(Error::Unauthenticated(
            "acting for someone else: confirm with your password (and second factor)",
        )
        .into());
    };
    let stepped = state
        .second_factors
        .step_up(
            &patient.auth.session.account,
            password,
            second_factor,
            patient.auth.address,
            purpose,
        )
        .await;
    state.audit.notify();
    Ok(stepped?)
}

/// A passkey challenge for a step-up (a signed-in account proving itself again).
#[utoipa::path(post, path = "/auth/step-up/passkey/start", tag = "auth",
    responses(
        (status = 200, description = "Challenge", body = PasskeyChallenge),
        (status = 409, description = "No passkey registered", content_type = "application/problem+json")))]
pub async fn step_up_passkey_challenge(
    State(state): State<AppState>,
    auth: AuthSession,
) -> Result<Json<PasskeyChallenge>, ApiError> {
    let (ceremony, options) = state
        .second_factors
        .passkeys
        .start_authentication(&auth.session.account)
        .await?;
    challenge(ceremony, &options)
}

/// A ceremony's answer: its id and the WebAuthn options as the browser takes them.
fn challenge<T: Serialize>(
    ceremony: String,
    options: &T,
) -> Result<Json<PasskeyChallenge>, ApiError> {
    let options = serde_json::to_value(options)
        .map_err(|_| ApiError::from(Error::Crypto("cannot encode the WebAuthn options")))?;
    Ok(Json(PasskeyChallenge { ceremony, options }))
}
