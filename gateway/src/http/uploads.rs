//! The patient's upload permissions: which checkup institutions may send their 特定健診
//! results, given and withdrawn through the API and the portal (one action each, nothing
//! pre-chosen). The institution's own upload endpoint is in `checkups`.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Json;
use maud::{html, Markup};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::ApiError;
use super::portal::{form_values, same_origin};
use super::session::PatientSession;
use super::AppState;
use crate::audit::{AuditEvent, EventKind};
use crate::error::Error;
use crate::oauth::clients::{self, Client};
use crate::store::millis_to_rfc3339;
use crate::uploads::{
    status_code, UploadPermission, UploadPermissionEvent, UploadPermissionStatus,
};

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GiveUploadPermission {
    /// The checkup institution's registered client id.
    pub client_id: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UploadPermissionView {
    /// The reference to hand to the institution: it uploads under this id.
    pub id: String,
    pub client_id: String,
    pub institution: String,
    /// `active`, `withdrawn` or `expired`.
    pub status: String,
    /// RFC 3339.
    pub given_at: String,
    pub expires_at: String,
    /// Given, each upload (and refused one), withdrawn.
    pub history: Vec<UploadPermissionEvent>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UploadPermissionReceipt {
    pub permission: UploadPermissionView,
    /// The signed receipt of this step (compact JWS, signed with the gateway's receipt key).
    pub receipt: String,
}

async fn view(
    state: &AppState,
    permission: &UploadPermission,
) -> Result<UploadPermissionView, ApiError> {
    let institution = clients::get(&state.db, &permission.client_id)
        .await?
        .map(|client| client.display_name)
        .unwrap_or_else(|| permission.client_id.clone());
    Ok(UploadPermissionView {
        id: permission.id.clone(),
        client_id: permission.client_id.clone(),
        institution,
        status: status_code(permission.status).into(),
        given_at: millis_to_rfc3339(permission.created_at),
        expires_at: millis_to_rfc3339(permission.expires_at),
        history: state.uploads.events(&permission.id).await?,
    })
}

async fn audit_read(state: &AppState, patient: &PatientSession) -> Result<(), ApiError> {
    let event = AuditEvent::new(EventKind::Read, patient.auth.agent())
        .patient(&patient.patient_id)
        .detail("upload permissions");
    state.audit.record_now(&event).await?;
    Ok(())
}

/// The patient's upload permissions, newest first, with their history.
#[utoipa::path(get, path = "/patient/upload-permissions", tag = "checkups",
    responses((status = 200, description = "The permissions", body = [UploadPermissionView]),
        (status = 401, description = "Not signed in", content_type = "application/problem+json")))]
pub async fn list(
    State(state): State<AppState>,
    patient: PatientSession,
) -> Result<Json<Vec<UploadPermissionView>>, ApiError> {
    let permissions = state.uploads.list(&patient.patient_id).await?;
    audit_read(&state, &patient).await?;
    let mut views = Vec::with_capacity(permissions.len());
    for permission in &permissions {
        views.push(view(&state, permission).await?);
    }
    Ok(Json(views))
}

async fn institution(state: &AppState, client_id: &str) -> Result<Client, ApiError> {
    clients::get(&state.db, client_id).await?.ok_or_else(|| {
        Error::Invalid(format!(
            "no checkup institution is registered as {client_id:?}"
        ))
        .into()
    })
}

async fn give_permission(
    state: &AppState,
    patient: &PatientSession,
    client_id: &str,
) -> Result<UploadPermissionReceipt, ApiError> {
    if client_id.is_empty() {
        return Err(Error::Invalid("choose a checkup institution".into()).into());
    }
    let institution = institution(state, client_id).await?;
    let (permission, receipt) = state
        .uploads
        .give(
            &patient.auth.agent(),
            &patient.auth.session.account.id,
            &patient.patient_id,
            &institution,
        )
        .await?;
    state.audit.notify();
    Ok(UploadPermissionReceipt {
        permission: view(state, &permission).await?,
        receipt,
    })
}

async fn withdraw_permission(
    state: &AppState,
    patient: &PatientSession,
    id: &str,
) -> Result<UploadPermissionReceipt, ApiError> {
    // Someone else's permission is "not found", as an unknown one is.
    let permission = match state.uploads.get(id).await {
        Ok(p) if p.patient_id == patient.patient_id => p,
        Ok(_) => return Err(Error::NotFound(format!("upload permission {id}")).into()),
        Err(e) => return Err(e.into()),
    };
    let institution = institution(state, &permission.client_id).await?;
    let receipt = state
        .uploads
        .withdraw(
            &patient.auth.agent(),
            &patient.auth.session.account.id,
            &permission,
            &institution,
        )
        .await?;
    state.audit.notify();
    let permission = state.uploads.get(id).await?;
    Ok(UploadPermissionReceipt {
        permission: view(state, &permission).await?,
        receipt,
    })
}

/// Lets a checkup institution send the patient's 特定健診 results for a year. Answered
/// with a signed receipt; the permission id is the reference to give the institution.
#[utoipa::path(post, path = "/patient/upload-permissions", tag = "checkups",
    request_body = GiveUploadPermission,
    responses((status = 201, description = "Given", body = UploadPermissionReceipt),
        (status = 400, description = "No such institution", content_type = "application/problem+json"),
        (status = 401, description = "Not signed in", content_type = "application/problem+json")))]
pub async fn give(
    State(state): State<AppState>,
    patient: PatientSession,
    Json(request): Json<GiveUploadPermission>,
) -> Result<(StatusCode, Json<UploadPermissionReceipt>), ApiError> {
    let given = give_permission(&state, &patient, &request.client_id).await?;
    Ok((StatusCode::CREATED, Json(given)))
}

/// Withdraws a permission in one action: the institution's next upload is refused.
#[utoipa::path(post, path = "/patient/upload-permissions/{id}/withdraw", tag = "checkups",
    params(("id" = String, Path)),
    responses((status = 200, description = "Withdrawn", body = UploadPermissionReceipt),
        (status = 400, description = "Already withdrawn", content_type = "application/problem+json"),
        (status = 404, description = "No such permission for this patient", content_type = "application/problem+json")))]
pub async fn withdraw(
    State(state): State<AppState>,
    patient: PatientSession,
    Path(id): Path<String>,
) -> Result<Json<UploadPermissionReceipt>, ApiError> {
    Ok(Json(withdraw_permission(&state, &patient, &id).await?))
}

/// The portal's section: the permissions with a withdraw button each, and a form to give
/// one (no institution pre-chosen).
pub async fn portal_section(
    state: &AppState,
    patient: &PatientSession,
) -> Result<Markup, ApiError> {
    let permissions = state.uploads.list(&patient.patient_id).await?;
    audit_read(state, patient).await?;
    let mut rows = Vec::with_capacity(permissions.len());
    for permission in &permissions {
        rows.push(view(state, permission).await?);
    }
    let institutions = clients::list(&state.db).await?;
    Ok(html! {
        h2 { "健診機関からの結果の受け取り " span.en { "Results sent by checkup institutions" } }
        p { "あなたが許可した健診機関だけが、あなたの特定健診結果をここへ送れます。許可は1年間有効で、いつでもひとつの操作で取り消せます。健診機関には「受付番号」を伝えてください。" }
        p.en { "Only checkup institutions you allow can send your checkup results here. A permission lasts one year and can be withdrawn in one action. Give the institution the reference number." }
        @if !rows.is_empty() {
            table {
                thead { tr {
                    th { "健診機関 " span.en { "Institution" } }
                    th { "受付番号 " span.en { "Reference" } }
                    th { "状態 " span.en { "Status" } }
                    th { "有効期限 " span.en { "Valid until" } }
                    th { "操作 " span.en { "Action" } }
                } }
                tbody {
                    @for row in &rows {
                        tr data-upload-permission=(row.id) {
                            td { (row.institution) }
                            td { code { (row.id) } }
                            td class="status" { (status_label(&row.status)) }
                            td { (row.expires_at.get(..10).unwrap_or(&row.expires_at)) }
                            td {
                                @if row.status == status_code(UploadPermissionStatus::Active) {
                                    form method="post" action={ "/portal/upload-permissions/" (row.id) "/withdraw" } {
                                        button type="submit" class="withdraw" { "取り消す / Withdraw" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        form method="post" action="/portal/upload-permissions" {
            label { "健診機関 " span.en { "Checkup institution" }
                select name="client_id" required {
                    option value="" selected disabled { "選んでください / Choose" }
                    @for institution in &institutions {
                        option value=(institution.id) { (institution.display_name) "（" (institution.recipient.name) "）" }
                    }
                }
            }
            button type="submit" { "送信を許可する / Allow sending" }
        }
    })
}

fn status_label(status: &str) -> &'static str {
    match status {
        "active" => "有効 / Active",
        "withdrawn" => "取り消し済み / Withdrawn",
        _ => "期限切れ / Expired",
    }
}

pub async fn portal_give(
    State(state): State<AppState>,
    headers: HeaderMap,
    patient: PatientSession,
    body: String,
) -> Result<Response, ApiError> {
    same_origin(&headers, &state)?;
    let client_id = form_values(&body, "client_id").pop().unwrap_or_default();
    give_permission(&state, &patient, &client_id).await?;
    Ok(Redirect::to("/portal").into_response())
}

pub async fn portal_withdraw(
    State(state): State<AppState>,
    headers: HeaderMap,
    patient: PatientSession,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    same_origin(&headers, &state)?;
    withdraw_permission(&state, &patient, &id).await?;
    Ok(Redirect::to("/portal").into_response())
}
