//! The patient's sign-in security in the portal: the second-factor step after the
//! password (a code, or a passkey), and the security page that offers a passkey first and
//! an authenticator app (TOTP) as the alternative, with recovery codes shown once.

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use maud::{html, Markup};
use serde::Deserialize;

use super::error::ApiError;
use super::portal::{form_values, page, safe_next, same_origin, signed_in_page};
use super::session::{AnySession, PatientSession};
use super::AppState;
use crate::audit::AccountRole;
use crate::error::Error;
use crate::mfa::Proof;
use crate::store::accounts::SessionStage;

/// Pages that run our passkey script: scripts and fetches from our own origin only.
const SCRIPT_CSP: &str = "default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

const PASSKEY_JS: &str = include_str!("assets/passkey.js");

pub async fn passkey_script() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        PASSKEY_JS,
    )
        .into_response()
}

/// An HTML page that may run `/portal/passkey.js`.
pub(super) fn scripted_response(status: StatusCode, markup: Markup) -> Response {
    let mut response = super::portal::html_response(status, markup);
    response.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(SCRIPT_CSP),
    );
    response
}

#[derive(Debug, Deserialize)]
pub struct NextQuery {
    next: Option<String>,
}

fn second_factor_page(message: Option<&str>, next: Option<&str>, passkey: bool) -> Markup {
    page(
        "確認 / Second factor",
        html! {
            h1 { "もう一段階の確認 " span.en { "Second factor" } }
            @if let Some(message) = message { p.warn role="alert" { (message) } }
            @if passkey {
                p { button type="button" data-passkey="second-factor" id="use-passkey" { "パスキーで確認 / Use my passkey" } }
            }
            form method="post" action="/portal/second-factor" {
                @if let Some(next) = next { input type="hidden" name="next" value=(next); }
                label { "認証アプリの6桁のコード、または回復コード "
                    span.en { "The six-digit code from your authenticator app, or a recovery code" }
                    input name="code" autocomplete="one-time-code" required;
                }
                button type="submit" { "確認 / Continue" }
            }
            p id="passkey-message" role="status" {}
            script src="/portal/passkey.js" defer {}
        },
    )
}

/// The second-factor step of a patient's sign-in.
pub async fn second_factor_form(
    State(state): State<AppState>,
    Query(query): Query<NextQuery>,
    session: Option<AnySession>,
) -> Result<Response, ApiError> {
    let Some(AnySession(auth)) = session else {
        return Ok(Redirect::to("/portal").into_response());
    };
    if auth.session.stage != SessionStage::SecondFactor {
        return Ok(Redirect::to("/portal").into_response());
    }
    let factors = state
        .second_factors
        .enrolled(&auth.session.account.id)
        .await?;
    Ok(scripted_response(
        StatusCode::OK,
        second_factor_page(
            None,
            safe_next(query.next.as_deref()),
            !factors.passkeys.is_empty(),
        ),
    ))
}

pub async fn second_factor(
    State(state): State<AppState>,
    headers: HeaderMap,
    AnySession(auth): AnySession,
    body: String,
) -> Result<Response, ApiError> {
    same_origin(&headers, &state)?;
    let next = form_values(&body, "next").pop();
    let next = safe_next(next.as_deref()).map(str::to_string);
    if auth.session.stage != SessionStage::SecondFactor {
        return Ok(Redirect::to(next.as_deref().unwrap_or("/portal")).into_response());
    }
    let code = form_values(&body, "code").pop().unwrap_or_default();
    let result = state
        .second_factors
        .complete_sign_in(
            &auth.session,
            &auth.token,
            &Proof::from_code(&code),
            auth.address,
        )
        .await;
    state.audit.notify();
    match result {
        Ok(_) => Ok(Redirect::to(next.as_deref().unwrap_or("/portal")).into_response()),
        Err(Error::Unauthenticated(_)) => {
            let factors = state
                .second_factors
                .enrolled(&auth.session.account.id)
                .await?;
            Ok(scripted_response(
                StatusCode::UNAUTHORIZED,
                second_factor_page(
                    Some("コードが違うか、使用済みです。 / Wrong or already used code."),
                    next.as_deref(),
                    !factors.passkeys.is_empty(),
                ),
            ))
        }
        Err(e) => Err(e.into()),
    }
}

fn codes_list(codes: &[String]) -> Markup {
    html! {
        p.warn { "回復コードです。今だけ表示します。書き留めて安全な場所に保管してください。各コードは1回だけ使えます。" }
        p.en { "Your recovery codes, shown only now. Write them down and keep them safe; each works once." }
        ol id="recovery-codes" { @for code in codes { li { (code) } } }
    }
}

/// The security page: passkeys offered first, an authenticator app as the alternative.
pub async fn page_security(
    State(state): State<AppState>,
    patient: PatientSession,
) -> Result<Response, ApiError> {
    if patient.auth.session.account.role != AccountRole::Patient {
        return Err(Error::Forbidden("patients only").into());
    }
    let factors = state
        .second_factors
        .enrolled(&patient.auth.session.account.id)
        .await?;
    let markup = signed_in_page(
        "サインインの安全 / Sign-in security",
        html! {
            h1 { "サインインの安全 " span.en { "Sign-in security" } }
            p { "パスキーを登録すると、パスワードなしで安全にサインインできます（おすすめ）。認証アプリ（6桁のコード）も使えます。" }
            p.en { "Register a passkey to sign in safely without your password (recommended). An authenticator app (six-digit codes) works too." }
            section id="passkeys" {
                h2 { "パスキー " span.en { "Passkeys" } }
                @if factors.passkeys.is_empty() {
                    p { "まだありません。 " span.en { "None yet." } }
                } @else {
                    ul { @for p in &factors.passkeys { li.passkey { (p.name) " — " (p.created_at) } } }
                }
                label { "パスキーの名前 " span.en { "Name for the passkey" } input id="passkey-name" value="" required; }
                label { "確認のため、パスワード " span.en { "Your password, to confirm" } input id="passkey-password" type="password" autocomplete="current-password"; }
                button type="button" data-passkey="register" id="register-passkey" { "パスキーを登録 / Register a passkey" }
                p id="passkey-message" role="status" {}
                ol id="recovery-codes" hidden {}
            }
            section id="totp" {
                h2 { "認証アプリ " span.en { "Authenticator app" } }
                p { @if factors.totp { "設定済みです。 " span.en { "Set up." } } @else { "未設定です。 " span.en { "Not set up." } } }
                form method="post" action="/portal/security/totp" {
                    label { "確認のため、パスワード " span.en { "Your password, to confirm" } input name="password" type="password" autocomplete="current-password" required; }
                    button type="submit" { "認証アプリを設定 / Set up an authenticator app" }
                }
            }
            section id="recovery" {
                h2 { "回復コード " span.en { "Recovery codes" } }
                p { "残り " (factors.recovery_codes_left) " 個 " span.en { "left: " (factors.recovery_codes_left) } }
            }
            script src="/portal/passkey.js" defer {}
        },
    );
    Ok(scripted_response(StatusCode::OK, markup))
}

/// Step one of TOTP: the password again, then the new secret and a form for its first code.
pub async fn begin_totp(
    State(state): State<AppState>,
    headers: HeaderMap,
    patient: PatientSession,
    body: String,
) -> Result<Response, ApiError> {
    same_origin(&headers, &state)?;
    let account = &patient.auth.session.account;
    let password = form_values(&body, "password").pop().unwrap_or_default();
    let stepped = state
        .accounts
        .step_up(account, &password, patient.auth.address, "TOTP enrolment")
        .await;
    state.audit.notify();
    if let Err(Error::Unauthenticated(_)) = stepped {
        return Ok(super::portal::step_up_refused(
            "サインインの安全 / Sign-in security",
            "/portal/security",
        ));
    }
    stepped?;
    let enrolment = state.second_factors.begin_totp(account).await?;
    let markup = signed_in_page(
        "認証アプリ / Authenticator app",
        html! {
            h1 { "認証アプリの設定 " span.en { "Set up an authenticator app" } }
            p { "認証アプリにこのキーを追加してください。 " span.en { "Add this key to your authenticator app." } }
            p { code id="totp-secret" { (enrolment.secret) } }
            p.en { code { (enrolment.otpauth_uri) } }
            form method="post" action="/portal/security/totp/confirm" {
                label { "アプリに表示された6桁のコード " span.en { "The six-digit code your app shows" } input name="code" autocomplete="one-time-code" required; }
                button type="submit" { "確認 / Confirm" }
            }
        },
    );
    Ok(super::portal::html_response(StatusCode::OK, markup))
}

pub async fn confirm_totp(
    State(state): State<AppState>,
    headers: HeaderMap,
    patient: PatientSession,
    body: String,
) -> Result<Response, ApiError> {
    same_origin(&headers, &state)?;
    let account = &patient.auth.session.account;
    let code = form_values(&body, "code").pop().unwrap_or_default();
    let first = !state.second_factors.enrolled(&account.id).await?.any();
    let confirmed = state
        .second_factors
        .confirm_totp(account, &code, patient.auth.address)
        .await;
    state.audit.notify();
    match confirmed {
        Ok(()) => {}
        Err(Error::Unauthenticated(_)) => {
            return Ok(super::portal::step_up_refused(
                "認証アプリ / Authenticator app",
                "/portal/security",
            ))
        }
        Err(e) => return Err(e.into()),
    }
    let codes = if first {
        let codes = state
            .second_factors
            .issue_recovery_codes(account, patient.auth.address)
            .await?;
        state.audit.notify();
        codes
    } else {
        Vec::new()
    };
    let markup = signed_in_page(
        "認証アプリ / Authenticator app",
        html! {
            h1 { "設定しました " span.en { "Set up" } }
            p role="status" id="totp-done" { "次回から、パスワードのあとにコードを入力します。 " span.en { "From now on, enter a code after your password." } }
            @if !codes.is_empty() { (codes_list(&codes)) }
            p { a.button href="/portal/security" { "戻る / Back" } }
        },
    );
    Ok(super::portal::html_response(StatusCode::OK, markup))
}
