//! "Delete my data": after the patient proves themself again (step-up), every consent,
//! pull instruction and upload permission is withdrawn (tokens revoked, source links
//! revoked), the patient's data key is destroyed and the stored record deleted; the patient
//! gets a signed receipt and a plain explanation of what happens to backups and to what
//! recipients already received. The account stays, so the patient can still sign in and
//! see the receipt.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::Json;
use maud::html;
use phr_consent::ConsentStatus;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;

use super::consents::{receipt_context, withdraw_consent};
use super::error::ApiError;
use super::portal::{
    form_values, html_response, same_origin, second_factor_code_field, signed_in_page,
    step_up_refused,
};
use super::pull::{withdraw_instruction, Withdraw};
use super::second_factor::{step_up_proof, PasskeyAssertion};
use super::session::PatientSession;
use super::AppState;
use crate::mfa::Proof;
use crate::pull::InstructionStatus;
use crate::store::{millis_to_rfc3339, now_millis};
use crate::uploads::UploadPermissionStatus;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EraseRequest {
    /// The signed-in account's password, asked again (step-up).
    pub password: String,
    /// The second factor too, when the account has one: a TOTP or recovery code…
    #[serde(default)]
    pub code: Option<String>,
    /// …or a passkey assertion (challenge from `/auth/step-up/passkey/start`).
    #[serde(default)]
    pub passkey: Option<PasskeyAssertion>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Explanation {
    pub ja: String,
    pub en: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Erased {
    pub deleted_resources: u64,
    pub withdrawn_consents: usize,
    pub withdrawn_pull_instructions: usize,
    pub withdrawn_upload_permissions: usize,
    /// Whether a data key existed and was destroyed.
    pub data_key_destroyed: bool,
    /// RFC 3339.
    pub erased_at: String,
    /// What happens to backups and to data recipients already received.
    pub explanation: Explanation,
    /// The signed receipt (compact JWS, the gateway's receipt key).
    pub receipt: String,
}

fn explanation() -> Explanation {
    Explanation {
        ja: "保管していたあなたのデータを削除し、データを読むための鍵を破棄しました。バックアップにはデータが暗号化されたまま残ることがありますが、鍵はバックアップとは別に保管しており、その鍵も破棄したため、もう誰も読み出せません（バックアップも保存期間が過ぎると消えます）。あなたの同意によってすでにデータを受け取った事業者には同意の撤回を伝え、受け取ったデータの利用をやめ削除するよう求めます。その事業者が保管しているデータは、その事業者の責任で扱われます。いつ誰があなたのデータを読んだかの記録（監査ログ）は、個人を特定する内容を含まない形で法令に従い保管します。アカウントは残るため、この受領書はあとからも確認できます。".into(),
        en: "Your stored data is deleted and the key needed to read it is destroyed. Backups may still hold the data in encrypted form, but the key was kept apart from them and is destroyed too, so nobody can read it any more (backups also expire). Recipients that already received data under your consent are told it is withdrawn and asked to stop using and delete it; what they hold is their responsibility. The record of who accessed your data (the audit log) is kept as the law requires, without personal details. Your account stays, so you can see this receipt later.".into(),
    }
}

/// Erases the signed-in patient's record (or the record of the person they act for).
#[utoipa::path(post, path = "/patient/erasure", tag = "patient",
    request_body = EraseRequest,
    responses((status = 200, description = "Erased", body = Erased),
        (status = 401, description = "Not signed in, or the password is wrong", content_type = "application/problem+json"),
        (status = 429, description = "Too many wrong passwords", content_type = "application/problem+json")))]
pub async fn erase(
    State(state): State<AppState>,
    patient: PatientSession,
    Json(request): Json<EraseRequest>,
) -> Result<Json<Erased>, ApiError> {
    let proof = step_up_proof(request.code.as_deref(), request.passkey);
    Ok(Json(
        erase_record(&state, &patient, &request.password, proof.as_ref()).await?,
    ))
}

async fn erase_record(
    state: &AppState,
    patient: &PatientSession,
    password: &str,
    second_factor: Option<&Proof>,
) -> Result<Erased, ApiError> {
    let stepped = state
        .second_factors
        .step_up(
            &patient.auth.session.account,
            password,
            second_factor,
            patient.auth.address,
            "erasing the record",
        )
        .await;
    state.audit.notify();
    stepped?;
    let context = receipt_context(state, "ja", "erasure");
    let mut withdrawn_consents = 0;
    for consent in state.consents.list(&patient.patient_id).await? {
        if matches!(
            consent.status,
            ConsentStatus::Active | ConsentStatus::Proposed
        ) {
            withdraw_consent(state, patient, &consent.id, &context).await?;
            withdrawn_consents += 1;
        }
    }
    let mut withdrawn_pull_instructions = 0;
    for instruction in state.instructions.list(&patient.patient_id).await? {
        if matches!(
            instruction.status,
            InstructionStatus::Active | InstructionStatus::Pending
        ) {
            withdraw_instruction(state, patient, &instruction.id, Withdraw::default()).await?;
            withdrawn_pull_instructions += 1;
        }
    }
    let mut withdrawn_upload_permissions = 0;
    for permission in state.uploads.list(&patient.patient_id).await? {
        if permission.status != UploadPermissionStatus::Active {
            continue;
        }
        if let Some(institution) =
            crate::oauth::clients::get(&state.db, &permission.client_id).await?
        {
            state
                .uploads
                .withdraw(
                    &patient.auth.agent(),
                    &patient.auth.session.account.id,
                    &permission,
                    &institution,
                )
                .await?;
            withdrawn_upload_permissions += 1;
        }
    }
    let (deleted_resources, data_key_destroyed) = state
        .resources
        .erase_patient(&patient.auth.agent(), &patient.patient_id)
        .await?;
    state.audit.notify();
    let erased_at = millis_to_rfc3339(now_millis());
    let explanation = explanation();
    let receipt = state.receipts.sign(&json!({
        "iss": state.receipts.issuer(),
        "iat": now_millis() / 1000,
        "jti": uuid::Uuid::new_v4().to_string(),
        "receipt_type": "erasure",
        "issued_at": erased_at,
        "subject": patient.patient_id,
        "performer": patient.auth.session.account.id,
        "erasure": {
            "deleted_resources": deleted_resources,
            "data_key_destroyed": data_key_destroyed,
            "withdrawn_consents": withdrawn_consents,
            "withdrawn_pull_instructions": withdrawn_pull_instructions,
            "withdrawn_upload_permissions": withdrawn_upload_permissions,
        },
        "notice": {"ja": explanation.ja, "en": explanation.en},
    }))?;
    Ok(Erased {
        deleted_resources,
        withdrawn_consents,
        withdrawn_pull_instructions,
        withdrawn_upload_permissions,
        data_key_destroyed,
        erased_at,
        explanation,
        receipt,
    })
}

/// The portal's page: what erasing means, then the password and one button.
/// (`_patient`: only a signed-in patient sees it.)
pub async fn portal_page(_patient: PatientSession) -> Result<Response, ApiError> {
    let explanation = explanation();
    let markup = signed_in_page(
        "データの削除 / Delete my data",
        html! {
            h1 { "データの削除 " span.en { "Delete my data" } }
            p { "このゲートウェイが保管しているあなたのデータをすべて削除します。すべての同意とデータ取得の指示も取り消します。元に戻せません。" }
            p.en { "This deletes all your data held by this gateway and withdraws every consent and pull instruction. It cannot be undone." }
            p { (explanation.ja) }
            p.en { (explanation.en) }
            form method="post" action="/portal/erasure" {
                label { "確認のため、パスワードをもう一度入力してください " span.en { "Enter your password again to confirm" }
                    input type="password" name="password" autocomplete="current-password" required;
                }
                (second_factor_code_field())
                button type="submit" id="erase" { "すべて削除する / Delete everything" }
            }
            p { a.button href="/portal" { "削除しないで戻る / Keep my data and go back" } }
        },
    );
    Ok(html_response(StatusCode::OK, markup))
}

pub async fn portal_erase(
    State(state): State<AppState>,
    headers: HeaderMap,
    patient: PatientSession,
    body: String,
) -> Result<Response, ApiError> {
    same_origin(&headers, &state)?;
    let password = form_values(&body, "password").pop().unwrap_or_default();
    let code = form_values(&body, "code").pop();
    let proof = step_up_proof(code.as_deref(), None);
    let erased = match erase_record(&state, &patient, &password, proof.as_ref()).await {
        Ok(erased) => erased,
        Err(error) if error.status == StatusCode::UNAUTHORIZED => {
            return Ok(step_up_refused(
                "データの削除 / Delete my data",
                "/portal/erasure",
            ));
        }
        Err(error) => return Err(error),
    };
    let markup = signed_in_page(
        "削除しました / Deleted",
        html! {
            h1 { "削除しました " span.en { "Your data is deleted" } }
            p id="erased" { (erased.deleted_resources) " 件のデータを削除し、鍵を破棄しました。同意 " (erased.withdrawn_consents) " 件、取得の指示 " (erased.withdrawn_pull_instructions) " 件を取り消しました。" }
            p.en { (erased.deleted_resources) " records deleted and the key destroyed; " (erased.withdrawn_consents) " consents and " (erased.withdrawn_pull_instructions) " pull instructions withdrawn." }
            p { (erased.explanation.ja) }
            p.en { (erased.explanation.en) }
            details { summary { "受領書（署名付き） / Signed receipt" } pre { (erased.receipt) } }
            p { a.button href="/portal" { "ポータルへ / To the portal" } }
        },
    );
    Ok(html_response(StatusCode::OK, markup))
}
