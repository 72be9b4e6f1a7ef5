//! The operators' pages: sign-in with password, then the second factor (a TOTP code or a
//! recovery code), then the operator home, which puts break-glass uses awaiting review at
//! the top (overdue ones marked) and lists live sessions. Server-rendered with maud.

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Extension, Form};
use maud::{html, Markup};
use serde::Deserialize;

use super::error::ApiError;
use super::portal::{html_response, page, same_origin};
use super::portal_security::scripted_response;
use super::session::{session_cookie, AnySession, OperatorSession};
use super::{AppState, ClientAddr};
use crate::audit::AccountRole;
use crate::error::Error;
use crate::mfa::Proof;
use crate::store::accounts::SessionStage;
use crate::store::millis_to_rfc3339;

#[derive(Debug, Deserialize)]
pub struct LoginForm {
    username: String,
    password: String,
}

#[derive(Debug, Deserialize)]
pub struct CodeForm {
    code: String,
}

#[derive(Debug, Deserialize)]
pub struct ReviewForm {
    note: String,
}

fn sign_in_page(message: Option<&str>) -> Markup {
    page(
        "運営者サインイン / Operator sign-in",
        html! {
            h1 { "運営者サインイン " span.en { "Operator sign-in" } }
            @if let Some(message) = message { p.warn role="alert" { (message) } }
            form method="post" action="/operator/login" {
                label { "ユーザー名 " span.en { "Username" } input name="username" autocomplete="username" required; }
                label { "パスワード " span.en { "Password" } input name="password" type="password" autocomplete="current-password" required; }
                button type="submit" { "次へ / Next" }
            }
            p.en { "Every operator proves a second factor. If the sign-in path is down, emergency (break-glass) access is at POST /auth/break-glass; each use is reviewed afterwards." }
        },
    )
}

fn second_factor_page(message: Option<&str>, methods: &[&str]) -> Markup {
    page(
        "確認コード / Second factor",
        html! {
            h1 { "確認コード " span.en { "Second factor" } }
            @if let Some(message) = message { p.warn role="alert" { (message) } }
            form method="post" action="/operator/second-factor" {
                label {
                    "認証アプリの6桁のコード、または回復コード "
                    span.en { "The six-digit code from your authenticator app, or a recovery code" }
                    input name="code" id="code" autocomplete="one-time-code" inputmode="text" required;
                }
                button type="submit" { "サインイン / Sign in" }
            }
            @if methods.contains(&"passkey") {
                input type="hidden" name="next" value="/operator";
                p { button type="button" data-passkey="second-factor" id="use-passkey" { "パスキーで確認 / Use my passkey" } }
                p id="passkey-message" role="status" {}
                script src="/portal/passkey.js" defer {}
            }
            form method="post" action="/operator/logout" { button type="submit" { "やめる / Cancel" } }
        },
    )
}

/// The operator home: sign-in, the second factor, or the work waiting.
pub async fn home(
    State(state): State<AppState>,
    session: Option<AnySession>,
) -> Result<Response, ApiError> {
    let Some(AnySession(auth)) = session else {
        return Ok(html_response(StatusCode::OK, sign_in_page(None)));
    };
    if auth.session.account.role != AccountRole::Operator {
        return Ok(html_response(
            StatusCode::FORBIDDEN,
            sign_in_page(Some("運営者のみ / Operators only")),
        ));
    }
    if auth.session.stage == SessionStage::SecondFactor {
        let methods = state
            .second_factors
            .enrolled(&auth.session.account.id)
            .await?
            .methods();
        return Ok(scripted_response(
            StatusCode::OK,
            second_factor_page(None, &methods),
        ));
    }
    if let Some(use_id) = &auth.session.emergency_use_id {
        let action = "GET /operator";
        state
            .break_glass
            .record_action(use_id, &auth.agent(), action)
            .await?;
        state.audit.notify();
    }
    let uses = state.break_glass.uses().await?;
    let waiting: Vec<_> = uses.iter().filter(|u| u.reviewed_at.is_none()).collect();
    let sessions = state.accounts.live_sessions().await?;
    let factors = state
        .second_factors
        .enrolled(&auth.session.account.id)
        .await?;
    let markup = page(
        "運営者 / Operator",
        html! {
            h1 { "運営者ホーム " span.en { "Operator home" } }
            p { (auth.session.account.username) " · " (auth.session.method) }
            nav aria-label="運営者メニュー / Operator menu" {
                a id="nav-alerts" href="/operator/alerts-page" { "アラート " span.en { "Alerts" } }
            }
            @if auth.session.emergency_use_id.is_some() {
                p.warn role="alert" id="emergency-banner" {
                    "緊急アクセス中：すべての操作が記録され、後で確認されます。終了 "
                    (millis_to_rfc3339(auth.session.expires_at))
                    br;
                    span.en { "Break-glass session: every action is recorded and will be reviewed." }
                }
            }
            section id="break-glass-reviews" {
                h2 { "確認待ちの緊急アクセス " span.en { "Break-glass uses awaiting review" } }
                @if waiting.is_empty() {
                    p { "ありません。 " span.en { "None." } }
                } @else {
                    table {
                        tr { th { "開始 / Started" } th { "アカウント / Account" } th { "理由 / Reason" } th { "障害 / Outage" } th { "操作数 / Actions" } th { "確認 / Review" } }
                        @for u in &waiting {
                            tr.use-row data-overdue=(u.overdue) {
                                td { (u.started_at) @if u.overdue { br; strong.warn.overdue { "期限超過 / Overdue" } } }
                                td { (u.username) }
                                td { (u.reason) }
                                td { (u.outage) }
                                td { (u.actions) }
                                td {
                                    @if auth.session.emergency_use_id.is_none() {
                                        form method="post" action={ "/operator/break-glass/" (u.id) "/review-form" } {
                                            label { "確認内容 " span.en { "What you checked" } textarea name="note" required {} }
                                            button type="submit" { "確認済みにする / Mark reviewed" }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            section id="sessions" {
                h2 { "サインイン中のセッション " span.en { "Live sessions" } }
                table {
                    tr { th { "ID" } th { "アカウント / Account" } th { "方法 / Method" } th { "最終操作 / Last seen" } th { "期限 / Expires" } }
                    @for s in &sessions {
                        tr { td { (s.session_id) } td { (s.username) " (" (s.role) ")" } td { (s.method) } td { (s.last_seen_at) } td { (s.expires_at) } }
                    }
                }
                p.en { "End any session: POST /operator/sessions/{id}/end." }
            }
            section id="second-factors" {
                h2 { "あなたの2段階認証 " span.en { "Your second factors" } }
                p { "認証アプリ / Authenticator app: " @if factors.totp { "✓" } @else { "—" }
                    " · 回復コード残り / Recovery codes left: " (factors.recovery_codes_left) }
                ul { @for p in &factors.passkeys { li.passkey { (p.name) " — " (p.created_at) } } }
                @if auth.session.emergency_use_id.is_none() {
                    label { "パスキーの名前 " span.en { "Name for a new passkey" } input id="passkey-name" value=""; }
                    label { "確認のため、パスワード " span.en { "Your password, to confirm" } input id="passkey-password" type="password" autocomplete="current-password"; }
                    button type="button" data-passkey="register" id="register-passkey" { "パスキーを登録 / Register a passkey" }
                    p id="passkey-message" role="status" {}
                    ol id="recovery-codes" hidden {}
                    script src="/portal/passkey.js" defer {}
                }
            }
            form method="post" action="/operator/logout" { button type="submit" { "サインアウト / Sign out" } }
        },
    );
    Ok(scripted_response(StatusCode::OK, markup))
}

pub async fn login(
    State(state): State<AppState>,
    Extension(ClientAddr(address)): Extension<ClientAddr>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Result<Response, ApiError> {
    same_origin(&headers, &state)?;
    let result = state
        .accounts
        .login(&form.username, &form.password, address)
        .await;
    state.audit.notify();
    match result {
        Ok((session, token)) if session.account.role == AccountRole::Operator => {
            let mut response = Redirect::to("/operator").into_response();
            response.headers_mut().insert(
                header::SET_COOKIE,
                session_cookie(&token, state.config.sessions.absolute_timeout_secs),
            );
            Ok(response)
        }
        Ok((session, token)) => {
            state.accounts.logout(&session, &token, address).await?;
            Ok(html_response(
                StatusCode::FORBIDDEN,
                sign_in_page(Some("運営者のみ / Operators only")),
            ))
        }
        Err(Error::Unauthenticated(_)) => Ok(html_response(
            StatusCode::UNAUTHORIZED,
            sign_in_page(Some(
                "ユーザー名またはパスワードが違います。 / Wrong username or password.",
            )),
        )),
        Err(e) => Err(e.into()),
    }
}

pub async fn second_factor(
    State(state): State<AppState>,
    headers: HeaderMap,
    AnySession(auth): AnySession,
    Form(form): Form<CodeForm>,
) -> Result<Response, ApiError> {
    same_origin(&headers, &state)?;
    if auth.session.stage != SessionStage::SecondFactor {
        return Ok(Redirect::to("/operator").into_response());
    }
    let proof = Proof::from_code(&form.code);
    let result = state
        .second_factors
        .complete_sign_in(&auth.session, &auth.token, &proof, auth.address)
        .await;
    state.audit.notify();
    match result {
        Ok(_) => Ok(Redirect::to("/operator").into_response()),
        Err(Error::Unauthenticated(_)) => {
            let methods = state
                .second_factors
                .enrolled(&auth.session.account.id)
                .await?
                .methods();
            Ok(html_response(
                StatusCode::UNAUTHORIZED,
                second_factor_page(
                    Some("コードが違うか、使用済みです。 / Wrong or already used code."),
                    &methods,
                ),
            ))
        }
        Err(e) => Err(e.into()),
    }
}

pub async fn logout(
    State(state): State<AppState>,
    headers: HeaderMap,
    AnySession(auth): AnySession,
) -> Result<Response, ApiError> {
    same_origin(&headers, &state)?;
    state
        .accounts
        .logout(&auth.session, &auth.token, auth.address)
        .await?;
    state.audit.notify();
    let mut response = Redirect::to("/operator").into_response();
    response
        .headers_mut()
        .insert(header::SET_COOKIE, session_cookie("", 0));
    Ok(response)
}

pub async fn review(
    State(state): State<AppState>,
    headers: HeaderMap,
    operator: OperatorSession,
    Path(id): Path<String>,
    Form(form): Form<ReviewForm>,
) -> Result<Response, ApiError> {
    same_origin(&headers, &state)?;
    let auth = &operator.0;
    state
        .break_glass
        .review(&id, &auth.session, &form.note, auth.address)
        .await?;
    state.audit.notify();
    Ok(Redirect::to("/operator").into_response())
}
