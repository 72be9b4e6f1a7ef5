//! The patient portal: server-rendered pages (maud escapes everything it renders) to sign
//! in, see pull instructions with their progress and source availability, give a new one
//! (nothing pre-chosen) and withdraw one in a single action. Plain Japanese first, English
//! beside it.

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Extension, Form};
use maud::{html, Markup, DOCTYPE};
use phr_consent::DataCategory;
use serde::Deserialize;

use super::error::ApiError;
use super::session::{session_cookie, PatientSession};
use super::{AppState, ClientAddr};
use crate::error::Error;
use crate::pull::registry::{unavailable_since, unavailable_sources};
use crate::pull::InstructionStatus;
use crate::store::accounts::SessionStage;

const STYLE: &str = "body{font-family:system-ui,sans-serif;max-width:56rem;margin:2rem auto;padding:0 1rem;line-height:1.6}
table{border-collapse:collapse;width:100%}th,td{border:1px solid #999;padding:.4rem;text-align:left;vertical-align:top}
.en{color:#444;font-size:.9em}.warn{color:#8a1c00}button,.button{font-size:1rem;padding:.4rem 1rem}
fieldset{margin:1rem 0}label{display:block}nav{display:flex;gap:1.5rem;margin-bottom:1rem}
.choices{display:flex;gap:1rem;flex-wrap:wrap;margin:1rem 0}
.choice{font:inherit;font-size:1rem;line-height:1.4;padding:.6rem 1.2rem;width:14rem;border:2px solid #174ea6;border-radius:4px;background:#fff;color:#174ea6;cursor:pointer}
.notice{border:1px solid #999;padding:.5rem 1rem;margin:1rem 0}";

pub async fn style() -> Response {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLE).into_response()
}

pub(super) fn page(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="ja" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) }
                link rel="stylesheet" href="/portal/style.css";
            }
            body { (body) }
        }
    }
}

/// A page for a signed-in patient: the same navigation on every page, so consent settings
/// are always one step away.
pub(super) fn signed_in_page(title: &str, body: Markup) -> Markup {
    page(
        title,
        html! {
            nav aria-label="メニュー / Menu" {
                a href="/portal" { "データ取得 " span.en { "Pull instructions" } }
                a id="nav-consents" href="/portal/consents" { "同意の管理 " span.en { "Consents" } }
                a id="nav-access-log" href="/portal/access-log" { "アクセス記録 " span.en { "Access log" } }
                a id="nav-security" href="/portal/security" { "サインインの安全 " span.en { "Sign-in security" } }
            }
            (body)
        },
    )
}

/// The answer to a wrong password at a step-up (export, erasure): nothing happened, try
/// again or go back.
pub(super) fn step_up_refused(title: &str, retry: &str) -> Response {
    let markup = signed_in_page(
        title,
        html! {
            p role="alert" { "パスワードが違います。何も行っていません。 / Wrong password. Nothing was done." }
            p { a.button href=(retry) { "もう一度 / Try again" } " " a.button href="/portal" { "戻る / Back" } }
        },
    );
    html_response(StatusCode::UNAUTHORIZED, markup)
}

/// The second factor's code at a step-up (shown to everyone; only accounts that set one up
/// need it, so it is not required).
pub(super) fn second_factor_code_field() -> Markup {
    html! {
        label { "確認コード（2段階認証を設定している場合：認証アプリのコードまたは回復コード） "
            span.en { "Second-factor code, if you set one up (authenticator app or recovery code)" }
            input name="code" autocomplete="one-time-code" inputmode="text";
        }
    }
}

pub(super) fn html_response(status: StatusCode, markup: Markup) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        markup.into_string(),
    )
        .into_response()
}

fn login_page(message: Option<&str>, next: Option<&str>) -> Markup {
    page(
        "サインイン / Sign in",
        html! {
            h1 { "サインイン " span.en { "Sign in" } }
            @if let Some(message) = message { p.warn role="alert" { (message) } }
            form method="post" action="/portal/login" {
                @if let Some(next) = next { input type="hidden" name="next" value=(next); }
                label { "ユーザー名 " span.en { "Username" } input name="username" autocomplete="username" required; }
                label { "パスワード " span.en { "Password" } input name="password" type="password" autocomplete="current-password" required; }
                button type="submit" { "サインイン / Sign in" }
            }
            p { "パスキーを登録済みなら、パスワードは要りません。 " span.en { "With a registered passkey, no password is needed." } }
            p { button type="button" data-passkey="sign-in" id="passkey-sign-in" { "パスキーでサインイン / Sign in with a passkey" } }
            p id="passkey-message" role="status" {}
            script src="/portal/passkey.js" defer {}
        },
    )
}

/// Form posts must come from our own pages (the cookie is SameSite=Lax; this also stops
/// other sites' forms).
pub(super) fn same_origin(headers: &HeaderMap, state: &AppState) -> Result<(), ApiError> {
    let origin = headers
        .get(header::ORIGIN)
        .or_else(|| headers.get(header::REFERER))
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if origin.starts_with(&state.public_url()) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "form posted from another site",
        ))
    }
}

/// The portal home: sign-in form, or the patient's instructions.
pub async fn home(
    State(state): State<AppState>,
    patient: Option<PatientSession>,
) -> Result<Response, ApiError> {
    let Some(patient) = patient else {
        return Ok(super::portal_security::scripted_response(
            StatusCode::OK,
            login_page(None, None),
        ));
    };
    let instructions = state.instructions.list(&patient.patient_id).await?;
    super::pull::audit_instruction_read(&state, &patient, None).await?;
    let down = unavailable_sources(&state.db).await?;
    let mut rows = Vec::new();
    for instruction in &instructions {
        let jobs = state.queue.progress(&instruction.id).await?;
        let source_name = state
            .registry
            .get(&instruction.source_id)
            .map(|(info, _)| info.display_name.clone())
            .unwrap_or_else(|_| instruction.source_id.clone());
        let unavailable = unavailable_since(&down, &instruction.source_id);
        rows.push((instruction.clone(), source_name, jobs, unavailable));
    }
    let sources = state.registry.infos();
    let upload_permissions = super::uploads::portal_section(&state, &patient).await?;
    let transfers = super::transfers::portal_section(&state, &patient).await?;
    let markup = signed_in_page(
        "データ取得の指示 / Pull instructions",
        html! {
            h1 { "データ取得の指示 " span.en { "Your pull instructions" } }
            p { "医療機関などからあなたのデータを取得するのは、あなたが指示したときだけです。指示はいつでも、このページからひとつの操作で取り消せます。" }
            p.en { "We fetch your data from a hospital or the portal only when you tell us to. You can withdraw any instruction here in one action." }
            @if rows.is_empty() {
                p { "まだ指示はありません。 " span.en { "No instructions yet." } }
            } @else {
                table {
                    thead { tr {
                        th { "取得元 " span.en { "Source" } }
                        th { "分類 " span.en { "Categories" } }
                        th { "状態 " span.en { "Status" } }
                        th { "進み具合 " span.en { "Progress" } }
                        th { "操作 " span.en { "Action" } }
                    } }
                    tbody {
                        @for (instruction, source_name, jobs, unavailable) in &rows {
                            tr data-instruction=(instruction.id) {
                                td { (source_name) }
                                td { @for c in &instruction.categories { div { (c.label_ja()) } } }
                                td class="status" { (status_label(instruction.status)) }
                                td class="progress" {
                                    // The latest pull that ran; a scheduled next one has no counts yet.
                                    @if let Some(job) = jobs.iter().find(|j| j.attempts > 0).or(jobs.first()) {
                                        div { "取得 " (job.received) " 件、変更なし " (job.unchanged) " 件、除外 " (job.rejected) " 件" }
                                        div.en { (job.status) ": " (job.received) " received, " (job.unchanged) " unchanged, " (job.rejected) " refused" }
                                    }
                                    @if let Some(since) = unavailable {
                                        div.warn class="unavailable" { "取得元に接続できません（" (since) " から）。取得済みのデータはそのまま見られます。" }
                                        div.en { "Source unavailable since " (since) ". Data already fetched is still here." }
                                    }
                                }
                                td {
                                    @if matches!(instruction.status, InstructionStatus::Active | InstructionStatus::Pending) {
                                        form method="post" action={ "/portal/pull-instructions/" (instruction.id) "/withdraw" } {
                                            label { input type="checkbox" name="delete_received" value="true"; " 取得済みのデータも削除する " span.en { "Also delete data already received" } }
                                            button type="submit" class="withdraw" { "取り消す / Withdraw" }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            h2 { "新しい指示 " span.en { "New instruction" } }
            form method="post" action="/portal/pull-instructions" {
                label { "取得元 " span.en { "Source" }
                    select name="source_id" required {
                        option value="" selected disabled { "選んでください / Choose" }
                        @for source in &sources { option value=(source.id) { (source.display_name) } }
                    }
                }
                fieldset {
                    legend { "取得する分類（必要なものだけ選んでください） " span.en { "Categories to fetch (choose only what you need)" } }
                    @for category in DataCategory::ALL {
                        label { input type="checkbox" name="category" value=(category.code()); " " (category.label_ja()) " " span.en { (category.label_en()) } }
                    }
                }
                label { "連携コード（病院の窓口でコードを受け取った場合のみ） " span.en { "Linking code (only if the hospital gave you one)" }
                    input name="linking_code" autocomplete="off" inputmode="numeric";
                }
                button type="submit" { "指示して認証へ進む / Instruct and continue" }
            }
            h2 { "健診結果ファイルの取り込み " span.en { "Add checkup result files" } }
            p { "健診機関から受け取った特定健診の結果ファイル（XML）または提出用 ZIP を選んでください。同じ健診がすでにあれば重ねて登録しません。" }
            p.en { "Choose a 特定健診 result file (XML) or exchange ZIP from your checkup institution. A checkup already received is not added twice." }
            form method="post" action="/portal/checkups" enctype="multipart/form-data" {
                label { "ファイル " span.en { "File" }
                    input type="file" name="file" accept=".xml,.zip,application/xml,application/zip" required;
                }
                button type="submit" { "取り込む / Add" }
            }
            (upload_permissions)
            h2 { "データの書き出し " span.en { "Export my data" } }
            p { a id="export-link" href="/portal/export" { "すべてのデータを書き出す（FHIR・まとめ付き） " span.en { "Export everything (FHIR, with a summary)" } } }
            (transfers)
            h2 { "データの削除 " span.en { "Delete my data" } }
            p { a id="erasure-link" href="/portal/erasure" { "保管しているデータをすべて削除する " span.en { "Delete all data held here" } } }
            form method="post" action="/portal/logout" { button type="submit" { "サインアウト / Sign out" } }
        },
    );
    Ok(html_response(StatusCode::OK, markup))
}

fn status_label(status: InstructionStatus) -> &'static str {
    match status {
        InstructionStatus::Pending => "認証待ち / Waiting for sign-in at the source",
        InstructionStatus::Active => "取得中 / Active",
        InstructionStatus::Withdrawn => "取り消し済み / Withdrawn",
        InstructionStatus::Failed => "失敗 / Failed",
    }
}

#[derive(Debug, Deserialize)]
pub struct LoginForm {
    pub username: String,
    pub password: String,
    /// Where to go after signing in: only a consent screen of the authorize flow.
    #[serde(default)]
    pub next: Option<String>,
}

/// `next` if it is one of our consent screens (never an arbitrary URL: no open redirect).
pub(super) fn safe_next(next: Option<&str>) -> Option<&str> {
    let next = next?;
    let id = next.strip_prefix("/consent/authorize/")?;
    (!id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')).then_some(next)
}

pub async fn login(
    State(state): State<AppState>,
    Extension(ClientAddr(address)): Extension<ClientAddr>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Result<Response, ApiError> {
    same_origin(&headers, &state)?;
    match state
        .accounts
        .login(&form.username, &form.password, address)
        .await
    {
        Ok((session, token)) => {
            state.audit.notify();
            let target = safe_next(form.next.as_deref()).unwrap_or("/portal");
            let target = match session.stage {
                SessionStage::Complete => target.to_string(),
                SessionStage::SecondFactor => format!(
                    "/portal/second-factor?next={}",
                    form_urlencoded::byte_serialize(target.as_bytes()).collect::<String>()
                ),
            };
            let mut response = Redirect::to(&target).into_response();
            response.headers_mut().insert(
                header::SET_COOKIE,
                session_cookie(&token, state.config.sessions.absolute_timeout_secs),
            );
            Ok(response)
        }
        Err(Error::Unauthenticated(_)) => {
            state.audit.notify();
            Ok(super::portal_security::scripted_response(
                StatusCode::UNAUTHORIZED,
                login_page(
                    Some("ユーザー名またはパスワードが違います。 / Wrong username or password."),
                    safe_next(form.next.as_deref()),
                ),
            ))
        }
        Err(e) => Err(e.into()),
    }
}

pub async fn logout(
    State(state): State<AppState>,
    headers: HeaderMap,
    patient: PatientSession,
) -> Result<Response, ApiError> {
    same_origin(&headers, &state)?;
    state
        .accounts
        .logout(
            &patient.auth.session,
            &patient.auth.token,
            patient.auth.address,
        )
        .await?;
    state.audit.notify();
    let mut response = Redirect::to("/portal").into_response();
    response
        .headers_mut()
        .insert(header::SET_COOKIE, session_cookie("", 0));
    Ok(response)
}

/// Every value of a form field (a ticked box sends its name once per box).
pub(super) fn form_values(body: &str, name: &str) -> Vec<String> {
    form_urlencoded::parse(body.as_bytes())
        .filter(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
        .collect()
}

pub async fn give(
    State(state): State<AppState>,
    headers: HeaderMap,
    patient: PatientSession,
    body: String,
) -> Result<Response, ApiError> {
    same_origin(&headers, &state)?;
    let source_id = form_values(&body, "source_id").pop().unwrap_or_default();
    let codes = form_values(&body, "category");
    let linking_code = form_values(&body, "linking_code").pop();
    let given = super::pull::give_instruction(
        &state,
        &patient,
        &source_id,
        &codes,
        linking_code.as_deref(),
    )
    .await?;
    let info = &given.source;
    let Some(authorize_url) = &given.authorize_url else {
        // Linked at once with the code: the first pull is already queued.
        let markup = signed_in_page(
            "連携しました / Linked",
            html! {
                h1 { "連携しました " span.en { "Linked" } }
                p { (info.display_name) " からの取得を開始します。進み具合は一覧で確認できます。" }
                p.en { "The gateway is fetching from " (info.display_name) ". Follow the progress in the list." }
                p { a.button id="back" href="/portal" { "一覧へ / To the list" } }
            },
        );
        return Ok(html_response(StatusCode::OK, markup));
    };
    // A link, not a redirect: the patient sees where they are going before they leave.
    let markup = signed_in_page(
        "認証へ / Continue at the source",
        html! {
            h1 { "指示を受け付けました " span.en { "Instruction received" } }
            p { (info.display_name) " でサインインして、取得を許可してください。" }
            p.en { "Sign in at " (info.display_name) " and allow the transfer." }
            p { a.button id="continue" href=(authorize_url) { (info.display_name) " へ進む / Continue to " (info.display_name) } }
            p { a href="/portal" { "戻る / Back" } }
        },
    );
    Ok(html_response(StatusCode::OK, markup))
}

#[derive(Debug, Deserialize)]
pub struct WithdrawForm {
    pub delete_received: Option<String>,
}

pub async fn withdraw(
    State(state): State<AppState>,
    headers: HeaderMap,
    patient: PatientSession,
    Path(id): Path<String>,
    Form(form): Form<WithdrawForm>,
) -> Result<Response, ApiError> {
    same_origin(&headers, &state)?;
    let request = super::pull::Withdraw {
        delete_received: form.delete_received.as_deref() == Some("true"),
    };
    super::pull::withdraw_instruction(&state, &patient, &id, request).await?;
    Ok(Redirect::to("/portal").into_response())
}

/// A checkup file chosen in the portal: one CDA (`.xml`) or an exchange ZIP (`.zip`).
pub async fn upload_checkups(
    State(state): State<AppState>,
    headers: HeaderMap,
    patient: PatientSession,
    mut form: axum::extract::Multipart,
) -> Result<Response, ApiError> {
    same_origin(&headers, &state)?;
    let mut file: Option<(String, Vec<u8>)> = None;
    while let Some(field) = form
        .next_field()
        .await
        .map_err(|e| Error::Invalid(format!("upload form: {e}")))?
    {
        if field.name() != Some("file") {
            continue;
        }
        let name = field.file_name().unwrap_or_default().to_ascii_lowercase();
        let bytes = field
            .bytes()
            .await
            .map_err(|e| Error::Invalid(format!("upload form: {e}")))?;
        file = Some((name, bytes.to_vec()));
    }
    let (name, bytes) = file.ok_or_else(|| Error::Invalid("choose a file".into()))?;
    // Browsers label XML and ZIP files inconsistently: go by the extension.
    let content_type = if name.ends_with(".zip") {
        "application/zip"
    } else {
        "application/xml"
    };
    let uploaded = super::checkups::upload_checkups(
        &state,
        &super::checkups::Uploader::patient(&patient),
        content_type,
        &bytes,
    )
    .await?;
    let markup = signed_in_page(
        "取り込みました / Added",
        html! {
            h1 { "取り込みました " span.en { "Added" } }
            table {
                thead { tr { th { "実施日 / Date" } th { "実施機関 / Institution" } th { "結果 / Result" } } }
                tbody {
                    @for checkup in &uploaded.checkups {
                        tr.checkup {
                            td { (checkup.checkup_date) }
                            td { (checkup.institution.clone().unwrap_or_default()) }
                            td { @if checkup.outcome == "unchanged" { "登録済み / Already received" } @else { "追加 / Added" } }
                        }
                    }
                }
            }
            p { a.button id="back" href="/portal" { "一覧へ / To the list" } }
        },
    );
    Ok(html_response(StatusCode::OK, markup))
}
