//! The consent pages (server-rendered, escaped by maud, Japanese first with English beside
//! it): the patient's consents in the portal, withdrawal in one click with its receipt, and
//! the privacy notice every consent screen and receipt points to.
//!
//! The rules these pages keep (tested in headless Chromium): withdrawing takes no more
//! clicks than granting; nothing optional is pre-selected; accept, decline and withdraw are
//! the same control (`.choice`) side by side in the same order; a plain decline is always
//! offered; no pressure wording; the notice is on the screen before the action.

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use maud::html;
use serde::Deserialize;

use super::consents::{
    audit_read, categories_of, confirm_consent, end_of_day, purposes_of, receipt_context,
    withdraw_consent,
};
use super::error::ApiError;
use super::portal::{form_values, html_response, page, same_origin, signed_in_page};
use super::session::PatientSession;
use super::AppState;
use crate::consents::ConsentView;
use crate::error::Error;

/// The patient's consents, each withdrawable with one button.
pub async fn list(
    State(state): State<AppState>,
    patient: PatientSession,
) -> Result<Response, ApiError> {
    let consents = state.consents.list(&patient.patient_id).await?;
    let represented = state
        .representations
        .represented_by(patient.own_patient_id())
        .await?;
    audit_read(&state, &patient, None).await?;
    let config = state.consents.config();
    let purpose_label = |code: &str| {
        config
            .purpose(code)
            .map(|p| (p.label_ja.clone(), p.label_en.clone()))
            .unwrap_or_else(|| (code.to_string(), code.to_string()))
    };
    let markup = signed_in_page(
        "同意の管理 / Your consents",
        html! {
            h1 { "同意の管理 " span.en { "Your consents" } }
            @if let Some(acting) = &patient.acting {
                p.warn id="acting-for" { (patient.patient_id) " さんの代わりに手続きしています（" (acting.representation.code()) "）。 " span.en { "You are acting for " (patient.patient_id) "." } }
            }
            @if !represented.is_empty() || patient.acting.is_some() {
                section id="acting-switch" {
                    p { "手続きする人を切り替える " span.en { "Act for someone else" } }
                    @if patient.acting.is_some() {
                        form method="post" action="/portal/acting-for" {
                            input type="hidden" name="patient_id" value="";
                            button type="submit" { "自分の手続きに戻る / Back to myself" }
                        }
                    }
                    @for r in represented.iter().filter(|r| r.represented_patient_id != patient.patient_id) {
                        form method="post" action="/portal/acting-for" {
                            input type="hidden" name="patient_id" value=(r.represented_patient_id);
                            button type="submit" data-acting-for=(r.represented_patient_id) { (r.represented_patient_id) " さんの手続きをする / Act for " (r.represented_patient_id) }
                        }
                    }
                }
            }
            @let ending: Vec<&ConsentView> = consents.iter().filter(|c| c.ends_soon).collect();
            @if !ending.is_empty() {
                section id="ending-soon" role="status" {
                    p { "まもなく期限になる同意があります。期限が来ると提供は自動的に止まります。続けたい場合は、提供先のアプリからもう一度同意してください。" }
                    p.en { "Some consents end soon. Sharing stops by itself then; to continue, agree again from the recipient's app." }
                    ul { @for consent in &ending { li { (consent.recipient_display) " — " (consent.ends_at.as_deref().map(day_of).unwrap_or("")) } } }
                }
            }
            @let waiting: Vec<&ConsentView> = consents.iter().filter(|c| c.needs_confirmation).collect();
            @if !waiting.is_empty() && patient.acting.is_none() {
                section id="to-confirm" {
                    h2 { "確認をお願いします " span.en { "Please decide" } }
                    p { "次の同意は、保護者などがあなたの代わりに行ったものです。続けるか撤回するかを選んでください。どちらを選んでも、このサービスは変わらず使えます。" }
                    p.en { "Someone acted for you when these were given. Keep or withdraw each; the service stays the same either way." }
                    @for consent in &waiting {
                        div data-confirm=(consent.id) {
                            p { (consent.recipient_display) }
                            div.choices {
                                form method="post" action={ "/portal/consents/" (consent.id) "/confirm" } {
                                    button type="submit" class="choice accept" { "続ける / Keep" }
                                }
                                form method="post" action={ "/portal/consents/" (consent.id) "/withdraw" } {
                                    button type="submit" class="choice withdraw" { "撤回する / Withdraw" }
                                }
                            }
                        }
                    }
                }
            }
            p { "あなたが情報の提供に同意した相手と、その目的・情報の種類・期限です。撤回はボタンひとつで、すぐに効力を持ちます。撤回しても、このサービスはこれまでどおり使えます。" }
            p.en { "Who you agreed to share your data with, for what, which data and until when. Withdrawing takes one button and works at once. You can keep using this service as before." }
            @if consents.is_empty() {
                p id="no-consents" { "同意はまだありません。 " span.en { "No consents yet." } }
            } @else {
                table {
                    thead { tr {
                        th { "提供先 " span.en { "Recipient" } }
                        th { "目的 " span.en { "Purposes" } }
                        th { "情報の種類 " span.en { "Data" } }
                        th { "期限 " span.en { "Until" } }
                        th { "状態 " span.en { "Status" } }
                        th { "操作 " span.en { "Action" } }
                    } }
                    tbody {
                        @for consent in &consents {
                            tr data-consent=(consent.id) {
                                td { (consent.recipient_display) }
                                td { @for code in &consent.purposes {
                                    @let (ja, en) = purpose_label(code);
                                    div { (ja) " " span.en { (en) } }
                                } }
                                td { @for category in &consent.categories { div { (category.label_ja()) " " span.en { (category.label_en()) } } } }
                                td { (consent.ends_at.as_deref().map(day_of).unwrap_or("—")) }
                                td class="status" { (status_label(consent)) }
                                td {
                                    @if consent.status == phr_consent::ConsentStatus::Active {
                                        form method="post" action={ "/portal/consents/" (consent.id) "/withdraw" } {
                                            div.choices {
                                                button type="submit" class="choice withdraw" { "撤回する / Withdraw" }
                                            }
                                        }
                                        a.change href={ "/portal/consents/" (consent.id) "/change" } { "範囲を狭める / Narrow" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            p { a href="/consent/notice" { "個人情報の取扱いについて / Privacy notice" } }
        },
    );
    Ok(html_response(StatusCode::OK, markup))
}

fn status_label(consent: &ConsentView) -> &'static str {
    match consent.status {
        phr_consent::ConsentStatus::Active if consent.in_force => "有効 / In force",
        phr_consent::ConsentStatus::Active => "期限切れ / Ended",
        phr_consent::ConsentStatus::Inactive => "撤回済み / Withdrawn",
        phr_consent::ConsentStatus::Proposed => "未回答 / Not answered",
        phr_consent::ConsentStatus::Rejected => "同意しなかった / Declined",
    }
}

/// The last day covered. The exclusive end is midnight Japan time, i.e. 15:00 UTC the day
/// before, so the UTC date of the stored end is that last day.
fn day_of(ends_at: &str) -> &str {
    ends_at.get(..10).unwrap_or(ends_at)
}

/// Withdraws from the portal: one click, then the receipt.
pub async fn withdraw(
    State(state): State<AppState>,
    headers: HeaderMap,
    patient: PatientSession,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    same_origin(&headers, &state)?;
    let context = receipt_context(&state, "ja", "web-form");
    let withdrawn = withdraw_consent(&state, &patient, &id, &context).await?;
    let markup = signed_in_page(
        "撤回しました / Withdrawn",
        html! {
            h1 id="withdrawn" { "撤回しました " span.en { "Withdrawn" } }
            p { (withdrawn.consent.recipient_display) " への情報の提供を止めました。今後、この同意にもとづく提供はありません。" }
            p.en { "Sharing with " (withdrawn.consent.recipient_display) " has stopped. Nothing more is shared under this consent." }
            h2 { "受領証 " span.en { "Receipt" } }
            p { "ゲートウェイの署名付きの記録です。保存しておくと、いつ撤回したかを示せます。" }
            p.en { "A record signed by the gateway; keep it to show when you withdrew." }
            pre id="receipt" style="white-space:pre-wrap;word-break:break-all" { (withdrawn.receipt) }
            p { a href="/consent/notice" { "個人情報の取扱いについて / Privacy notice" } }
            p { a href="/portal/consents" { "同意の管理へ戻る / Back to your consents" } }
        },
    );
    Ok(html_response(StatusCode::OK, markup))
}

/// Keeps a consent a representative gave, from the portal.
pub async fn confirm(
    State(state): State<AppState>,
    headers: HeaderMap,
    patient: PatientSession,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    same_origin(&headers, &state)?;
    let context = receipt_context(&state, "ja", "web-form");
    let kept = confirm_consent(&state, &patient, &id, &context).await?;
    let markup = signed_in_page(
        "続けます / Kept",
        html! {
            h1 id="kept" { "続けます " span.en { "Kept" } }
            p { (kept.consent.recipient_display) " への提供を、あなた自身の同意として続けます。いつでも撤回できます。" }
            p.en { "Sharing with " (kept.consent.recipient_display) " continues as your own consent. You can withdraw it at any time." }
            h2 { "受領証 " span.en { "Receipt" } }
            pre id="receipt" style="white-space:pre-wrap;word-break:break-all" { (kept.receipt) }
            p { a href="/portal/consents" { "同意の管理へ戻る / Back to your consents" } }
        },
    );
    Ok(html_response(StatusCode::OK, markup))
}

/// Narrowing a consent from the portal: its current terms as text, and one unticked box per
/// purpose and category it covers (choose again what to keep); the end date may move
/// earlier or, within the limit, later. Widening is the recipient's to ask for.
pub async fn change_form(
    State(state): State<AppState>,
    patient: PatientSession,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let consent = state.consents.current(&patient.patient_id, &id).await?;
    audit_read(&state, &patient, Some(&id)).await?;
    if consent.status != phr_consent::ConsentStatus::Active {
        return Err(Error::Conflict("only a consent in force can be changed".into()).into());
    }
    Ok(html_response(
        StatusCode::OK,
        change_page(&state, &consent, None),
    ))
}

fn change_page(state: &AppState, consent: &ConsentView, error: Option<&str>) -> maud::Markup {
    let config = state.consents.config();
    let today = crate::store::japan_today();
    let latest = today + time::Duration::days(i64::from(config.max_period_days));
    let current_end = consent.ends_at.as_deref().map(day_of).unwrap_or("");
    let label = |code: &str| {
        config
            .purpose(code)
            .map(|p| (p.label_ja.clone(), p.label_en.clone()))
            .unwrap_or_else(|| (code.to_string(), code.to_string()))
    };
    signed_in_page(
        "同意の範囲を狭める / Narrow a consent",
        html! {
            h1 { "同意の範囲を狭める " span.en { "Narrow a consent" } }
            @if let Some(error) = error { p.warn role="alert" { (error) } }
            p { (consent.recipient_display) " への提供について、続ける目的と情報の種類を選び直してください。選ばなかったものは提供を止めます。すべて止める場合は、同意の管理から撤回してください。" }
            p.en { "Choose again what " (consent.recipient_display) " may keep receiving; what you leave unticked stops. To stop everything, withdraw instead." }
            (notice_text(&config.controller.name))
            form method="post" action={ "/portal/consents/" (consent.id) "/change" } {
                fieldset {
                    legend { "続ける目的 " span.en { "Purposes to keep" } }
                    @for code in &consent.purposes {
                        @let (ja, en) = label(code);
                        div data-purpose=(code) {
                            label { input type="checkbox" name="purpose" value=(code); " " (ja) " " span.en { (en) } }
                        }
                    }
                }
                fieldset {
                    legend { "続ける情報の種類 " span.en { "Data to keep sharing" } }
                    @for category in &consent.categories {
                        label { input type="checkbox" name="category" value=(category.code()); " " (category.label_ja()) " " span.en { (category.label_en()) } }
                    }
                }
                label {
                    "期限（この日まで） " span.en { "Until" }
                    input type="date" name="ends_on" value=(current_end) min=(today) max=(latest) required;
                }
                div.choices {
                    button type="submit" name="action" value="change" class="choice accept" { "この内容に変更する / Change" }
                    button type="submit" name="action" value="keep" class="choice decline" formnovalidate { "変更しない / Do not change" }
                }
            }
        },
    )
}

/// The narrowed terms: a new version with its receipt. Only what the consent already covers
/// can be kept.
pub async fn change(
    State(state): State<AppState>,
    headers: HeaderMap,
    patient: PatientSession,
    Path(id): Path<String>,
    body: String,
) -> Result<Response, ApiError> {
    same_origin(&headers, &state)?;
    let values = |name: &str| form_values(&body, name);
    if values("action").first().map(String::as_str) != Some("change") {
        return Ok(axum::response::Redirect::to("/portal/consents").into_response());
    }
    let current = state.consents.current(&patient.patient_id, &id).await?;
    let purposes = values("purpose");
    let categories = categories_of(&values("category"))?;
    if let Some(extra) = purposes.iter().find(|p| !current.purposes.contains(p)) {
        return Err(Error::Invalid(format!(
            "purpose {extra} is not part of this consent; the recipient must ask for it"
        ))
        .into());
    }
    if let Some(extra) = categories.iter().find(|c| !current.categories.contains(c)) {
        return Err(Error::Invalid(format!(
            "{} is not part of this consent; the recipient must ask for it",
            extra.code()
        ))
        .into());
    }
    if purposes.is_empty() || categories.is_empty() {
        let message = "目的と情報の種類を、それぞれ1つ以上選んでください。すべて止める場合は撤回してください。 / Keep at least one purpose and one kind of data, or withdraw.";
        return Ok(html_response(
            StatusCode::BAD_REQUEST,
            change_page(&state, &current, Some(message)),
        ));
    }
    let purposes = purposes_of(&state, &purposes)?;
    let ends_at = end_of_day(
        &values("ends_on").pop().unwrap_or_default(),
        state.consents.config().max_period_days,
    )?;
    let context = receipt_context(&state, "ja", "web-form");
    let (_, receipt) = state
        .consents
        .amend(
            &patient.auth.agent(),
            &patient.patient_id,
            &id,
            patient.performer(),
            &patient.auth.session.account.id,
            purposes,
            categories,
            ends_at,
            &context,
        )
        .await?;
    let markup = signed_in_page(
        "変更しました / Changed",
        html! {
            h1 id="changed" { "変更しました " span.en { "Changed" } }
            p { (current.recipient_display) " への提供の範囲を変更しました。" }
            p.en { "What " (current.recipient_display) " receives has changed." }
            h2 { "受領証 " span.en { "Receipt" } }
            pre id="receipt" style="white-space:pre-wrap;word-break:break-all" { (receipt) }
            p { a href="/portal/consents" { "同意の管理へ戻る / Back to your consents" } }
        },
    );
    Ok(html_response(StatusCode::OK, markup))
}

#[derive(Debug, Deserialize)]
pub struct NoticeQuery {
    pub version: Option<String>,
}

/// The privacy notice: what the gateway does with data shared under a consent.
pub async fn notice(State(state): State<AppState>, Query(query): Query<NoticeQuery>) -> Response {
    let config = state.consents.config();
    let version = query
        .version
        .unwrap_or_else(|| config.notice_version.clone());
    html_response(
        StatusCode::OK,
        page(
            "個人情報の取扱いについて / Privacy notice",
            html! {
                h1 { "個人情報の取扱いについて " span.en { "Privacy notice" } }
                p { "版 / Version: " (version) }
                (notice_text(&config.controller.name))
            },
        ),
    )
}

/// The notice's words, shown on every consent screen before the choice and on its own page.
pub fn notice_text(controller: &str) -> maud::Markup {
    html! {
        div.notice lang="ja" {
            p { "あなたの健康・医療の情報は、あなたが同意した相手に、同意した目的と種類の範囲でだけ提供します。同意はいつでも撤回でき、撤回はすぐに効力を持ちます。撤回しても、このサービスは変わらず使えます。" }
            p { "提供した記録はすべて残り、あなたはいつでも確認できます。責任者: " (controller) }
        }
        div.notice lang="en" {
            p.en { "Your health data goes only to those you agree to, only for the purposes and data you choose. You can withdraw at any time and it works at once; the service stays the same for you." }
            p.en { "Every disclosure is recorded and you can always see it. Responsible: " (controller) }
        }
    }
}
