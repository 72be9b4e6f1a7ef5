//! The consent screen of the authorize flow: a PHR app sent the patient here
//! (`/oauth/authorize` → `/consent/authorize/{request}`). It says who is asking, shows the
//! notice first, then one control per purpose and per data category (nothing pre-ticked),
//! the end date the patient picks, and "agree" and "do not agree" as the same control side
//! by side. Agreeing records the consent (with its receipt) and sends the app a one-time
//! code for exactly what was chosen; declining sends `access_denied`, and the same app may
//! not ask again for the same thing for `consent.reask_after_decline_days`.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use maud::{html, Markup};
use phr_consent::{DataCategory, Recipient};
use sha2::{Digest, Sha256};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::consent_pages::notice_text;
use super::consents::{categories_of, end_of_day, purposes_of, receipt_context};
use super::error::ApiError;
use super::portal::{form_values, html_response, page, same_origin};
use super::session::PatientSession;
use super::AppState;
use crate::consents::GrantRequest;
use crate::error::Error;
use crate::oauth::authorize::{self, PendingAuthorization};
use crate::oauth::scopes::Scope;
use crate::store::japan_today;

/// Shows the request, or a sign-in form that comes back here.
pub async fn show(
    State(state): State<AppState>,
    patient: Option<PatientSession>,
    Path(request_id): Path<String>,
) -> Result<Response, ApiError> {
    let Some(request) = authorize::pending_request(&state.db, &request_id).await? else {
        return Ok(gone());
    };
    let Some(patient) = patient else {
        return Ok(html_response(StatusCode::OK, sign_in(&request_id)));
    };
    // No re-asking after a plain decline, unless the app now asks for something else.
    let digest = request_digest(&request);
    if state
        .consents
        .declined_recently(&patient.patient_id, &request.client_id, &digest)
        .await?
    {
        let location = authorize::decline(&state.db, &request_id).await?;
        return Ok(Redirect::to(&location).into_response());
    }
    Ok(with_form_target(
        html_response(
            StatusCode::OK,
            screen(
                &state,
                &request,
                &request_id,
                None,
                patient.acting.is_some(),
            ),
        ),
        &request,
    ))
}

/// The screen's form may end at the app (the redirect after agreeing or declining), so the
/// page's policy names the app's origin besides our own.
fn with_form_target(mut response: Response, request: &PendingAuthorization) -> Response {
    let origin = url::Url::parse(&request.redirect_uri)
        .ok()
        .map(|url| url.origin().ascii_serialization())
        .filter(|origin| origin != "null");
    let policy = match origin {
        Some(origin) => format!(
            "default-src 'none'; style-src 'self'; frame-ancestors 'none'; base-uri 'none'; \
             form-action 'self' {origin}"
        ),
        None => super::DEFAULT_CSP.to_string(),
    };
    if let Ok(value) = axum::http::HeaderValue::from_str(&policy) {
        response
            .headers_mut()
            .insert(axum::http::header::CONTENT_SECURITY_POLICY, value);
    }
    response
}

/// The patient's answer.
pub async fn answer(
    State(state): State<AppState>,
    headers: HeaderMap,
    patient: PatientSession,
    Path(request_id): Path<String>,
    body: String,
) -> Result<Response, ApiError> {
    same_origin(&headers, &state)?;
    let Some(request) = authorize::pending_request(&state.db, &request_id).await? else {
        return Ok(gone());
    };
    let values = |name: &str| form_values(&body, name);
    let agent = patient.auth.agent();
    if values("action").first().map(String::as_str) != Some("grant") {
        state
            .consents
            .record_decline(
                &agent,
                &patient.patient_id,
                &request.client_id,
                &request_digest(&request),
            )
            .await?;
        let location = authorize::decline(&state.db, &request_id).await?;
        return Ok(Redirect::to(&location).into_response());
    }

    let password = values("password").pop();
    let code = values("code").pop();
    let proof = super::second_factor::step_up_proof(code.as_deref(), None);
    if let Err(error) = super::second_factor::step_up_acting_for(
        &state,
        &patient,
        password.as_deref(),
        proof.as_ref(),
        "agreeing to a disclosure for someone else",
    )
    .await
    {
        if error.status != StatusCode::UNAUTHORIZED {
            return Err(error);
        }
        let message = "パスワードまたは確認コードが違います。 / Wrong password or code.";
        return Ok(with_form_target(
            html_response(
                StatusCode::UNAUTHORIZED,
                screen(&state, &request, &request_id, Some(message), true),
            ),
            &request,
        ));
    }
    let purposes = purposes_of(&state, &values("purpose"))?;
    let categories = categories_of(&values("category"))?;
    // Only what the app asked for can be granted, whatever the form says.
    if let Some(extra) = categories.iter().find(|c| !request.categories.contains(c)) {
        return Err(
            Error::Invalid(format!("{} was not requested by this app", extra.code())).into(),
        );
    }
    if purposes.is_empty() || categories.is_empty() {
        let message = "目的と情報の種類を、それぞれ1つ以上選んでください。同意しない場合は「同意しない」を押してください。 / Choose at least one purpose and one kind of data, or press \"Do not agree\".";
        return Ok(with_form_target(
            html_response(
                StatusCode::BAD_REQUEST,
                screen(
                    &state,
                    &request,
                    &request_id,
                    Some(message),
                    patient.acting.is_some(),
                ),
            ),
            &request,
        ));
    }
    let ends_on = values("ends_on").pop().unwrap_or_default();
    let ends_at = end_of_day(&ends_on, state.consents.config().max_period_days)?;
    let offline = values("offline").first().map(String::as_str) == Some("yes");
    let language = if values("lang").first().map(String::as_str) == Some("en") {
        "en"
    } else {
        "ja"
    };
    let (consent, _receipt) = state
        .consents
        .grant(
            &agent,
            GrantRequest {
                patient_id: patient.patient_id.clone(),
                performer: patient.performer(),
                performer_account_id: patient.auth.session.account.id.clone(),
                recipient: Recipient::client(&request.client_id),
                recipient_display: request.client_name.clone(),
                purposes,
                categories: categories.clone(),
                ends_at,
            },
            &receipt_context(&state, language, "web-form"),
        )
        .await?;
    let granted = granted_scopes(&request, &categories, offline);
    let location = authorize::approve(
        &state.db,
        &request_id,
        &patient.patient_id,
        &consent.id,
        &granted,
    )
    .await?;
    state.audit.notify();
    Ok(Redirect::to(&location).into_response())
}

/// The scopes for exactly the chosen categories: a wildcard request becomes the chosen
/// categories' types; a typed scope stays only if its category was chosen.
pub fn granted_scopes(
    request: &PendingAuthorization,
    chosen: &[DataCategory],
    offline: bool,
) -> Vec<Scope> {
    let mut granted = Vec::new();
    for scope in &request.requested_scopes {
        match scope {
            // Who the patient is, for the app's sign-in: part of the same consent.
            Scope::LaunchPatient | Scope::OpenId | Scope::FhirUser => granted.push(scope.clone()),
            Scope::OfflineAccess if offline => granted.push(scope.clone()),
            Scope::Resource {
                context,
                resource_type,
                permissions,
            } if resource_type == "*" => {
                for category in chosen {
                    for resource_type in category.resource_types() {
                        granted.push(Scope::Resource {
                            context: *context,
                            resource_type: (*resource_type).to_string(),
                            permissions: *permissions,
                        });
                    }
                }
            }
            Scope::Resource { .. } if scope.categories().iter().any(|c| chosen.contains(c)) => {
                granted.push(scope.clone())
            }
            _ => {}
        }
    }
    granted
}

/// What was asked, as a digest: a decline holds until the app asks for something else.
fn request_digest(request: &PendingAuthorization) -> String {
    let mut scopes: Vec<String> = request
        .requested_scopes
        .iter()
        .map(|s| s.to_string())
        .collect();
    scopes.sort();
    hex::encode(&Sha256::digest(scopes.join(" ").as_bytes())[..16])
}

fn gone() -> Response {
    html_response(
        StatusCode::BAD_REQUEST,
        page(
            "この要求は使えません / Request not available",
            html! {
                h1 { "この要求は使えません " span.en { "This request is not available" } }
                p { "期限が切れたか、すでに回答済みです。アプリからもう一度始めてください。" }
                p.en { "It has expired or was already answered. Start again from the app." }
            },
        ),
    )
}

fn sign_in(request_id: &str) -> Markup {
    page(
        "サインイン / Sign in",
        html! {
            h1 { "サインイン " span.en { "Sign in" } }
            p { "アプリからの情報提供の依頼を確認するには、サインインしてください。" }
            p.en { "Sign in to see the app's request." }
            form method="post" action="/portal/login" {
                input type="hidden" name="next" value={ "/consent/authorize/" (request_id) };
                label { "ユーザー名 " span.en { "Username" } input name="username" autocomplete="username" required; }
                label { "パスワード " span.en { "Password" } input name="password" type="password" autocomplete="current-password" required; }
                button type="submit" { "サインイン / Sign in" }
            }
        },
    )
}

fn screen(
    state: &AppState,
    request: &PendingAuthorization,
    request_id: &str,
    error: Option<&str>,
    acting_for_someone: bool,
) -> Markup {
    let config = state.consents.config();
    let today = japan_today();
    let default_end = today + time::Duration::days(i64::from(config.default_period_days));
    let latest_end = today + time::Duration::days(i64::from(config.max_period_days));
    let declared_on = &request.compliance.declared_on;
    let expires = OffsetDateTime::from_unix_timestamp(request.expires_at / 1000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default();
    page(
        "情報提供への同意 / Consent to share your data",
        html! {
            h1 { "情報提供への同意 " span.en { "Consent to share your data" } }
            @if let Some(error) = error { p.warn role="alert" { (error) } }
            section id="who" {
                h2 { "依頼している相手 " span.en { "Who is asking" } }
                p { strong { (request.client_name) } "（" (request.recipient.name) "）" }
                p { "PHRサービス提供者の基本的指針への準拠を表明しています（" (declared_on) "）: " (request.compliance.statement) }
                p.en { "It has declared compliance with the PHR basic guideline (" (declared_on) ")." }
            }
            (notice_text(&config.controller.name))
            form method="post" action={ "/consent/authorize/" (request_id) } data-expires=(expires) {
                fieldset id="purposes" {
                    legend { "目的（同意するものだけ選んでください） " span.en { "Purposes (choose only those you agree to)" } }
                    @for purpose in &config.purposes {
                        div data-purpose=(purpose.code) {
                            label {
                                input type="checkbox" name="purpose" value=(purpose.code) data-required=(purpose.required);
                                " " (purpose.label_ja)
                                @if purpose.required { "（このアプリの基本機能に必要）" }
                                " " span.en { (purpose.label_en) @if purpose.required { " (needed for the app's basic service)" } }
                            }
                        }
                    }
                }
                fieldset id="categories" {
                    legend { "提供する情報の種類 " span.en { "Data to share" } }
                    @for category in &request.categories {
                        label {
                            input type="checkbox" name="category" value=(category.code());
                            " " (category.label_ja()) " " span.en { (category.label_en()) }
                        }
                    }
                }
                @if request.offline_access {
                    fieldset id="offline" {
                        legend { "あなたがアプリを開いていないときの取得 " span.en { "Access while you are away" } }
                        label {
                            input type="checkbox" name="offline" value="yes";
                            " アプリが、あなたがいないときも情報を取得できるようにする " span.en { "Let the app fetch while you are not using it" }
                        }
                    }
                }
                label {
                    "期限（この日まで提供します） " span.en { "Until (the last day of sharing)" }
                    input type="date" name="ends_on" value=(default_end) min=(today) max=(latest_end) required;
                }
                p { "同意しなくても、このサービスはこれまでどおり使えます。同意はいつでも「同意の管理」から撤回できます。" }
                p.en { "If you do not agree, this service stays the same for you. You can withdraw at any time under \"Consents\"." }
                @if acting_for_someone {
                    p { "ほかの方の代わりに同意するため、ご本人確認をもう一度お願いします（同意しない場合は不要です）。" }
                    p.en { "You are agreeing for someone else: confirm it is you (not needed to decline)." }
                    label { "パスワード " span.en { "Your password" } input type="password" name="password" autocomplete="current-password"; }
                    (super::portal::second_factor_code_field())
                }
                div.choices {
                    button type="submit" name="action" value="grant" class="choice accept" { "同意する / Agree" }
                    button type="submit" name="action" value="decline" class="choice decline" formnovalidate { "同意しない / Do not agree" }
                }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oauth::clients::{ComplianceDeclaration, Recipient as ClientRecipient};
    use crate::oauth::scopes::parse_scopes;

    fn request(scope: &str) -> PendingAuthorization {
        let requested_scopes = parse_scopes(scope).expect("scopes");
        PendingAuthorization {
            request_id: "r".into(),
            client_id: "c".into(),
            client_name: "App".into(),
            recipient: ClientRecipient {
                name: "Org".into(),
                identifier: "1".into(),
            },
            compliance: ComplianceDeclaration {
                declared: true,
                statement: "yes".into(),
                declared_on: "2026-01-01".into(),
            },
            categories: crate::oauth::scopes::categories_of(&requested_scopes),
            requested_scopes,
            offline_access: scope.contains("offline_access"),
            redirect_uri: "https://app.example/cb".into(),
            state: "s".into(),
            expires_at: 0,
        }
    }

    fn granted(scope: &str, chosen: &[DataCategory], offline: bool) -> String {
        let mut scopes: Vec<String> = granted_scopes(&request(scope), chosen, offline)
            .iter()
            .map(|s| s.to_string())
            .collect();
        scopes.sort();
        scopes.join(" ")
    }

    #[test]
    fn only_the_chosen_categories_are_granted() {
        let cases: [(&str, &[DataCategory], bool, &str); 5] = [
            (
                "launch/patient patient/Patient.rs patient/Observation.rs",
                &[DataCategory::Demographics],
                false,
                "launch/patient patient/Patient.rs",
            ),
            (
                "launch/patient patient/Observation.rs offline_access",
                &[DataCategory::Observations],
                false,
                "launch/patient patient/Observation.rs",
            ),
            (
                "launch/patient patient/Observation.rs offline_access",
                &[DataCategory::Observations],
                true,
                "launch/patient offline_access patient/Observation.rs",
            ),
            (
                "launch/patient openid fhirUser patient/Patient.rs",
                &[DataCategory::Demographics],
                false,
                "fhirUser launch/patient openid patient/Patient.rs",
            ),
            (
                "launch/patient patient/*.rs",
                &[DataCategory::Immunizations],
                false,
                "launch/patient patient/Immunization.rs",
            ),
        ];
        for (scope, chosen, offline, expected) in cases {
            assert_eq!(granted(scope, chosen, offline), expected, "{scope}");
        }
    }

    #[test]
    fn nothing_chosen_grants_no_resource_scope() {
        let scopes = granted_scopes(&request("launch/patient patient/Observation.rs"), &[], true);
        assert!(!scopes.iter().any(Scope::is_patient_resource));
    }
}
