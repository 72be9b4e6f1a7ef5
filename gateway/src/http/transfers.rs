//! PHR-to-PHR transfer, both ends.
//!
//! Sending: the patient gives the one-time code the receiving service issued and chooses the
//! categories; before anything leaves, the recipient must be a registered client with a
//! declared compliance with the PHR basic guideline and a transfer endpoint. The record
//! goes as a FHIR `transaction` Bundle, authenticated by a short-lived JWT signed with the
//! gateway's key (`/.well-known/jwks.json`) that carries the code and the transfer id (the
//! idempotency key); failures are retried with backoff, then the transfer fails visibly.
//! Every transfer is a disclosure: audited and receipted.
//!
//! Receiving: the patient asks for a one-time code; an operator registers the sending
//! service (its issuer and keys); `POST /transfer/inbox` checks the JWT, spends the code and
//! imports the Bundle into that patient's record, once.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use jsonwebtoken::jwk::JwkSet;
use phr_consent::DataCategory;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use sqlx::Row;
use utoipa::ToSchema;

use super::error::ApiError;
use super::patient_import::{import_into, ImportTarget};
use super::session::{OperatorSession, PatientSession};
use super::AppState;
use crate::audit::{self, Agent, AuditEvent, EventKind, Outcome};
use crate::error::Error;
use crate::fhir::serve::{serve_all, served_patient};
use crate::store::resources::UpdatedRange;
use crate::store::{insert_patient, millis_to_rfc3339, now_millis};

/// A code is good for this long.
const CODE_LIFETIME_MILLIS: i64 = 30 * 60 * 1000;
/// Attempts before a transfer fails.
const MAX_ATTEMPTS: i64 = 6;

// ---------------------------------------------------------------------------------------
// Sending

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartTransfer {
    /// The receiving service's registered client id.
    pub client_id: String,
    /// The one-time code the receiving service gave the patient.
    pub transfer_code: String,
    /// Data category codes to send (e.g. `observations`); at least one.
    pub categories: Vec<String>,
    /// The account's password again (step-up before data leaves for another service).
    pub password: String,
    /// The second factor too, when the account has one: a TOTP or recovery code…
    #[serde(default)]
    pub code: Option<String>,
    /// …or a passkey assertion (challenge from `/auth/step-up/passkey/start`).
    #[serde(default)]
    pub passkey: Option<super::second_factor::PasskeyAssertion>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TransferView {
    pub id: String,
    pub client_id: String,
    /// `pending`, `delivered` or `failed`.
    pub status: String,
    pub categories: Vec<String>,
    pub attempts: i64,
    pub last_error: Option<String>,
    pub resources: Option<i64>,
    /// The signed receipt, once delivered.
    pub receipt: Option<String>,
    pub created_at: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    pub url: String,
}

/// Registers where a recipient takes pushed transfers (operator).
#[utoipa::path(put, path = "/operator/clients/{id}/transfer-endpoint", tag = "operator",
    params(("id" = String, Path)), request_body = Endpoint,
    responses((status = 204, description = "Registered"),
        (status = 400, description = "Not an https URL", content_type = "application/problem+json"),
        (status = 404, description = "No such client", content_type = "application/problem+json")))]
pub async fn register_endpoint(
    State(state): State<AppState>,
    operator: OperatorSession,
    Path(client_id): Path<String>,
    Json(endpoint): Json<Endpoint>,
) -> Result<StatusCode, ApiError> {
    crate::oauth::clients::validate_redirect_uri(&endpoint.url)
        .map_err(|reason| Error::Invalid(format!("transfer endpoint: {reason}")))?;
    if crate::oauth::clients::get(&state.db, &client_id)
        .await?
        .is_none()
    {
        return Err(Error::NotFound(format!("client {client_id}")).into());
    }
    let mut tx = state.db.begin().await?;
    sqlx::query("DELETE FROM transfer_endpoints WHERE client_id = $1")
        .bind(&client_id)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO transfer_endpoints (client_id, url, registered_by, created_at) VALUES ($1, $2, $3, $4)",
    )
    .bind(&client_id)
    .bind(&endpoint.url)
    .bind(&operator.0.session.account.id)
    .bind(now_millis())
    .execute(&mut *tx)
    .await?;
    let event = AuditEvent::new(EventKind::ClientRegistered, operator.0.agent()).detail(format!(
        "transfer endpoint of client {client_id} registered"
    ));
    audit::record(&mut tx, &event).await?;
    tx.commit().await?;
    state.audit.notify();
    Ok(StatusCode::NO_CONTENT)
}

/// Starts a transfer (and tries it at once).
#[utoipa::path(post, path = "/patient/transfers", tag = "patient",
    request_body = StartTransfer,
    responses((status = 201, description = "Started; delivered or pending a retry", body = TransferView),
        (status = 400, description = "No categories, or the recipient is not registered, has not declared compliance or takes no transfers", content_type = "application/problem+json")))]
pub async fn start(
    State(state): State<AppState>,
    patient: PatientSession,
    Json(request): Json<StartTransfer>,
) -> Result<(StatusCode, Json<TransferView>), ApiError> {
    let id = start_transfer(&state, &patient, &request).await?;
    Ok((StatusCode::CREATED, Json(view(&state, &id).await?)))
}

/// Checks, records and tries a transfer (API and portal); its id.
async fn start_transfer(
    state: &AppState,
    patient: &PatientSession,
    request: &StartTransfer,
) -> Result<String, ApiError> {
    let proof =
        super::second_factor::step_up_proof(request.code.as_deref(), request.passkey.clone());
    let stepped = state
        .second_factors
        .step_up(
            &patient.auth.session.account,
            &request.password,
            proof.as_ref(),
            patient.auth.address,
            "transferring data to another service",
        )
        .await;
    state.audit.notify();
    stepped?;
    let mut categories: Vec<DataCategory> = Vec::new();
    for code in &request.categories {
        let category = DataCategory::from_code(code)
            .ok_or_else(|| Error::Invalid(format!("unknown category {code:?}")))?;
        if !categories.contains(&category) {
            categories.push(category);
        }
    }
    if categories.is_empty() {
        return Err(Error::Invalid("choose at least one category".into()).into());
    }
    let code = request.transfer_code.trim();
    if code.is_empty() || code.len() > 200 {
        return Err(Error::Invalid("the transfer code is missing or too long".into()).into());
    }
    // データ提供先の適切性の確認: registered, compliance declared, an endpoint.
    let client = crate::oauth::clients::get(&state.db, &request.client_id)
        .await?
        .ok_or_else(|| {
            Error::Invalid(format!(
                "{} is not a registered recipient",
                request.client_id
            ))
        })?;
    if !client.compliance.declared {
        return Err(Error::Invalid(
            "the recipient has not declared compliance with the PHR basic guideline".into(),
        )
        .into());
    }
    endpoint_of(state, &client.id).await?.ok_or_else(|| {
        Error::Invalid(format!(
            "{} takes no transfers (no endpoint registered)",
            client.display_name
        ))
    })?;
    let id = uuid::Uuid::now_v7().to_string();
    let key = state.keys.data_key_or_create(&patient.patient_id).await?.0;
    let sealed = key.seal(&code_aad(&id), code.as_bytes())?;
    let now = now_millis();
    let codes: Vec<&str> = categories.iter().map(|c| c.code()).collect();
    let mut tx = state.db.begin().await?;
    insert_patient(&mut tx, &patient.patient_id, now).await?;
    sqlx::query(
        "INSERT INTO transfers (id, patient_id, client_id, performer_account_id, categories, code_sealed,
             status, next_attempt_at, created_at)
         VALUES ($1, $2, $3, $4, $5, $6, 'pending', $7, $7)",
    )
    .bind(&id)
    .bind(&patient.patient_id)
    .bind(&client.id)
    .bind(&patient.auth.session.account.id)
    .bind(serde_json::to_string(&codes).unwrap_or_default())
    .bind(sealed)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    let event = AuditEvent::new(EventKind::Export, patient.auth.agent())
        .patient(&patient.patient_id)
        .detail(format!(
            "transfer {id} to {} started ({})",
            client.id,
            codes.join(", ")
        ));
    audit::record(&mut tx, &event).await?;
    tx.commit().await?;
    state.audit.notify();
    deliver(state, &id).await?;
    Ok(id)
}

/// The portal's section: the patient's transfers and a form to start one (no recipient or
/// category chosen in advance).
pub async fn portal_section(
    state: &AppState,
    patient: &PatientSession,
) -> Result<maud::Markup, ApiError> {
    let ids: Vec<String> = sqlx::query_scalar(
        "SELECT id FROM transfers WHERE patient_id = $1 ORDER BY created_at DESC, id DESC LIMIT 20",
    )
    .bind(&patient.patient_id)
    .fetch_all(state.db.read_pool())
    .await?;
    let mut transfers = Vec::with_capacity(ids.len());
    for id in &ids {
        transfers.push(view(state, id).await?);
    }
    audit_read(state, patient).await?;
    let recipients: Vec<(String, String)> = sqlx::query(
        "SELECT c.id, c.display_name FROM oauth_clients c JOIN transfer_endpoints e ON e.client_id = c.id
         ORDER BY c.display_name",
    )
    .fetch_all(state.db.read_pool())
    .await?
    .iter()
    .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
    .collect::<Result<_, sqlx::Error>>()?;
    Ok(maud::html! {
        h2 { "ほかのPHRサービスへの引っ越し " span.en { "Move your data to another PHR service" } }
        p { "移行先のサービスで受け取った「移行コード」を入力し、送るデータの分類を選んでください。移行先が登録済みで、指針への準拠を表明していることを確認してから送ります。" }
        p.en { "Enter the transfer code the other service gave you and choose what to send. We check the recipient is registered and has declared compliance with the PHR guideline before anything leaves." }
        @if !transfers.is_empty() {
            table {
                thead { tr { th { "移行先 " span.en { "Recipient" } } th { "状態 " span.en { "Status" } } th { "件数 " span.en { "Resources" } } } }
                tbody {
                    @for transfer in &transfers {
                        tr data-transfer=(transfer.id) {
                            td { (transfer.client_id) }
                            td class="status" { (transfer_status_label(&transfer.status)) @if let Some(error) = &transfer.last_error { div.warn { (error) } } }
                            td { @if let Some(n) = transfer.resources { (n) } }
                        }
                    }
                }
            }
        }
        form method="post" action="/portal/transfers" {
            label { "移行先 " span.en { "Recipient" }
                select name="client_id" required {
                    option value="" selected disabled { "選んでください / Choose" }
                    @for (id, name) in &recipients { option value=(id) { (name) } }
                }
            }
            label { "移行コード " span.en { "Transfer code" } input name="transfer_code" autocomplete="off" required; }
            fieldset {
                legend { "送るデータ（必要なものだけ選んでください） " span.en { "Data to send (choose only what is needed)" } }
                @for category in DataCategory::ALL {
                    label { input type="checkbox" name="send_category" value=(category.code()); " " (category.label_ja()) " " span.en { (category.label_en()) } }
                }
            }
            label { "確認のため、パスワードをもう一度入力してください " span.en { "Enter your password again to confirm" }
                input type="password" name="password" autocomplete="current-password" required;
            }
            (super::portal::second_factor_code_field())
            button type="submit" { "送る / Send" }
        }
    })
}

fn transfer_status_label(status: &str) -> &'static str {
    match status {
        "delivered" => "送信済み / Delivered",
        "failed" => "失敗 / Failed",
        _ => "再送待ち / Waiting to retry",
    }
}

/// The portal's form: starts the transfer, then back to the portal home.
pub async fn portal_start(
    State(state): State<AppState>,
    headers: HeaderMap,
    patient: PatientSession,
    body: String,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    super::portal::same_origin(&headers, &state)?;
    let form = |name: &str| super::portal::form_values(&body, name);
    let request = StartTransfer {
        client_id: form("client_id").pop().unwrap_or_default(),
        transfer_code: form("transfer_code").pop().unwrap_or_default(),
        categories: form("send_category"),
        password: form("password").pop().unwrap_or_default(),
        code: form("code").pop(),
        passkey: None,
    };
    match start_transfer(&state, &patient, &request).await {
        Ok(_) => Ok(axum::response::Redirect::to("/portal").into_response()),
        Err(error) if error.status == StatusCode::UNAUTHORIZED => Ok(
            super::portal::step_up_refused("データの引っ越し / Transfer", "/portal"),
        ),
        Err(error) => Err(error),
    }
}

/// The patient's transfers, newest first.
#[utoipa::path(get, path = "/patient/transfers", tag = "patient",
    responses((status = 200, description = "Transfers", body = [TransferView])))]
pub async fn list(
    State(state): State<AppState>,
    patient: PatientSession,
) -> Result<Json<Vec<TransferView>>, ApiError> {
    let ids: Vec<String> = sqlx::query_scalar(
        "SELECT id FROM transfers WHERE patient_id = $1 ORDER BY created_at DESC, id DESC",
    )
    .bind(&patient.patient_id)
    .fetch_all(state.db.read_pool())
    .await?;
    let mut views = Vec::with_capacity(ids.len());
    for id in ids {
        views.push(view(&state, &id).await?);
    }
    audit_read(&state, &patient).await?;
    Ok(Json(views))
}

/// Reading the patient's transfers (API or portal) is audited.
async fn audit_read(state: &AppState, patient: &PatientSession) -> Result<(), ApiError> {
    let event = AuditEvent::new(EventKind::Read, patient.auth.agent())
        .patient(&patient.patient_id)
        .detail("transfers");
    state.audit.record_now(&event).await?;
    Ok(())
}

async fn view(state: &AppState, id: &str) -> Result<TransferView, ApiError> {
    let row = sqlx::query(
        "SELECT client_id, status, categories, attempts, last_error, resources, receipt, created_at
         FROM transfers WHERE id = $1",
    )
    .bind(id)
    .fetch_one(state.db.read_pool())
    .await?;
    Ok(TransferView {
        id: id.to_string(),
        client_id: row.try_get(0)?,
        status: row.try_get(1)?,
        categories: serde_json::from_str(&row.try_get::<String, _>(2)?).unwrap_or_default(),
        attempts: row.try_get(3)?,
        last_error: row.try_get(4)?,
        resources: row.try_get(5)?,
        receipt: row.try_get(6)?,
        created_at: millis_to_rfc3339(row.try_get(7)?),
    })
}

async fn endpoint_of(state: &AppState, client_id: &str) -> Result<Option<String>, ApiError> {
    Ok(
        sqlx::query_scalar("SELECT url FROM transfer_endpoints WHERE client_id = $1")
            .bind(client_id)
            .fetch_optional(state.db.read_pool())
            .await?,
    )
}

fn code_aad(transfer_id: &str) -> Vec<u8> {
    format!("phr-gateway/transfer/v1/{transfer_id}/code").into_bytes()
}

/// Transfers due for an attempt, each tried once; how many were delivered.
pub async fn deliver_due(state: &AppState) -> Result<usize, ApiError> {
    let ids: Vec<String> = sqlx::query_scalar(
        "SELECT id FROM transfers WHERE status = 'pending' AND next_attempt_at <= $1 ORDER BY next_attempt_at LIMIT 20",
    )
    .bind(now_millis())
    .fetch_all(state.db.read_pool())
    .await?;
    let mut delivered = 0;
    for id in ids {
        if deliver(state, &id).await? {
            delivered += 1;
        }
    }
    Ok(delivered)
}

/// One attempt: `true` when the recipient took it.
async fn deliver(state: &AppState, id: &str) -> Result<bool, ApiError> {
    let row = sqlx::query(
        "SELECT patient_id, client_id, categories, code_sealed, attempts FROM transfers
         WHERE id = $1 AND status = 'pending'",
    )
    .bind(id)
    .fetch_optional(state.db.read_pool())
    .await?;
    let Some(row) = row else { return Ok(false) };
    let patient_id: String = row.try_get(0)?;
    let client_id: String = row.try_get(1)?;
    let codes: Vec<String> =
        serde_json::from_str(&row.try_get::<String, _>(2)?).unwrap_or_default();
    let sealed: Option<Vec<u8>> = row.try_get(3)?;
    let attempts: i64 = row.try_get(4)?;
    let attempt = async {
        let url = endpoint_of(state, &client_id)
            .await
            .map_err(|e| e.detail)?
            .ok_or("the recipient no longer takes transfers")?;
        let key = state
            .keys
            .data_key(&patient_id)
            .await
            .map_err(|e| e.to_string())?;
        let code = key
            .open(&code_aad(id), &sealed.ok_or("the transfer code is gone")?)
            .map_err(|e| e.to_string())?;
        let code = String::from_utf8(code).map_err(|e| e.to_string())?;
        let bundle = transfer_bundle(state, id, &patient_id, &codes)
            .await
            .map_err(|e| e.detail)?;
        let count = bundle["entry"].as_array().map_or(0, Vec::len);
        let now_secs = now_millis() / 1000;
        let assertion = state
            .source_client_key
            .sign(&json!({
                "iss": state.public_url(),
                "sub": state.public_url(),
                "aud": url,
                "iat": now_secs,
                "exp": now_secs + 300,
                "jti": uuid::Uuid::new_v4().to_string(),
                "transfer_id": id,
                "transfer_code": code,
            }))
            .map_err(|e| e.to_string())?;
        let response = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(30))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| e.to_string())?
            .post(&url)
            .bearer_auth(assertion)
            .header("content-type", "application/fhir+json")
            .header("idempotency-key", id)
            .body(bundle.to_string())
            .send()
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        let status = response.status();
        if status.is_success() {
            Ok(count)
        } else {
            let text = response.text().await.unwrap_or_default();
            Err(format!(
                "the recipient answered HTTP {}: {}",
                status.as_u16(),
                text.chars().take(300).collect::<String>()
            ))
        }
    };
    let outcome: Result<usize, String> = attempt.await;
    let now = now_millis();
    let agent = Agent::client(&client_id);
    let mut tx = state.db.begin().await?;
    let delivered = match outcome {
        Ok(count) => {
            let receipt = state.receipts.sign(&json!({
                "iss": state.receipts.issuer(),
                "iat": now / 1000,
                "jti": uuid::Uuid::new_v4().to_string(),
                "receipt_type": "transfer",
                "issued_at": millis_to_rfc3339(now),
                "subject": patient_id,
                "transfer": {"id": id, "recipient": client_id, "categories": codes, "resources": count},
                "notice": {
                    "ja": "あなたの指示により、選んだデータを受け取り先に送りました。受け取り先での扱いは、受け取り先の責任となります。",
                    "en": "At your instruction, the data you chose was sent to the recipient; it is now the recipient's responsibility."
                },
            }))?;
            sqlx::query(
                "UPDATE transfers SET status = 'delivered', delivered_at = $1, attempts = attempts + 1,
                     resources = $2, receipt = $3, code_sealed = NULL, last_error = NULL WHERE id = $4",
            )
            .bind(now)
            .bind(count as i64)
            .bind(&receipt)
            .bind(id)
            .execute(&mut *tx)
            .await?;
            // BALP PrivacyDisclosure: the data left to this recipient.
            let event = AuditEvent::new(EventKind::Export, agent)
                .patient(&patient_id)
                .detail(format!(
                    "privacy disclosure: transfer {id} delivered to {client_id}, {count} resources"
                ));
            audit::record(&mut tx, &event).await?;
            true
        }
        Err(reason) => {
            let attempts = attempts + 1;
            let give_up = attempts >= MAX_ATTEMPTS;
            let backoff = 60_000i64.saturating_mul(1 << (attempts - 1).clamp(0, 10));
            sqlx::query(
                "UPDATE transfers SET status = $1, attempts = $2, next_attempt_at = $3, last_error = $4,
                     code_sealed = CASE WHEN $1 = 'failed' THEN NULL ELSE code_sealed END WHERE id = $5",
            )
            .bind(if give_up { "failed" } else { "pending" })
            .bind(attempts)
            .bind(now + backoff)
            .bind(&reason)
            .bind(id)
            .execute(&mut *tx)
            .await?;
            let event = AuditEvent::new(EventKind::Export, agent)
                .outcome(if give_up {
                    Outcome::SeriousFailure
                } else {
                    Outcome::MinorFailure
                })
                .patient(&patient_id)
                .detail(format!("transfer {id} attempt {attempts} failed: {reason}"));
            audit::record(&mut tx, &event).await?;
            false
        }
    };
    tx.commit().await?;
    state.audit.notify();
    Ok(delivered)
}

/// The chosen categories of the record as a `transaction` Bundle.
async fn transfer_bundle(
    state: &AppState,
    id: &str,
    patient_id: &str,
    codes: &[String],
) -> Result<Value, ApiError> {
    let categories: Vec<DataCategory> = codes
        .iter()
        .filter_map(|c| DataCategory::from_code(c))
        .collect();
    let mut resources: Vec<Value> = Vec::new();
    if categories.contains(&DataCategory::Demographics) {
        if let Some((patient, _)) = served_patient(&state.resources, patient_id).await? {
            resources.push(patient);
        }
    }
    let types: Vec<&str> = categories
        .iter()
        .flat_map(|c| c.resource_types().iter().copied())
        .filter(|t| *t != "Patient")
        .collect();
    let mut after: Option<String> = None;
    loop {
        let rows = match state
            .resources
            .page_current(
                patient_id,
                &types,
                &UpdatedRange::default(),
                after.as_deref(),
                500,
            )
            .await
        {
            Ok(rows) => rows,
            Err(Error::KeyMissing(_)) => Vec::new(),
            Err(other) => return Err(other.into()),
        };
        let Some(last) = rows.last() else { break };
        after = Some(last.meta.id.clone());
        resources.extend(serve_all(&state.resources, patient_id, &rows).await?);
        if rows.len() < 500 {
            break;
        }
    }
    let entries: Vec<Value> = resources
        .into_iter()
        .map(|resource| {
            let resource_type = resource["resourceType"].as_str().unwrap_or_default().to_string();
            let full_url = format!(
                "{}/fhir/{resource_type}/{}",
                state.public_url(),
                resource["id"].as_str().unwrap_or_default()
            );
            json!({"fullUrl": full_url, "resource": resource, "request": {"method": "POST", "url": resource_type}})
        })
        .collect();
    Ok(json!({
        "resourceType": "Bundle",
        "type": "transaction",
        "identifier": {"system": "urn:phr-gateway:transfer", "value": id},
        "entry": entries,
    }))
}

// ---------------------------------------------------------------------------------------
// Receiving

#[derive(Debug, Serialize, ToSchema)]
pub struct TransferCode {
    /// Give this to the sending service; it works once, for 30 minutes.
    pub code: String,
    pub expires_at: String,
}

fn code_hash(code: &str) -> Vec<u8> {
    Sha256::digest(code.as_bytes()).to_vec()
}

/// A one-time code for receiving a transfer into the signed-in patient's record.
#[utoipa::path(post, path = "/patient/transfer-codes", tag = "patient",
    responses((status = 201, description = "A code", body = TransferCode)))]
pub async fn issue_code(
    State(state): State<AppState>,
    patient: PatientSession,
) -> Result<(StatusCode, Json<TransferCode>), ApiError> {
    let code = crate::oauth::random_token();
    let now = now_millis();
    let mut tx = state.db.begin().await?;
    insert_patient(&mut tx, &patient.patient_id, now).await?;
    sqlx::query(
        "INSERT INTO transfer_codes (code_hash, patient_id, created_at, expires_at) VALUES ($1, $2, $3, $4)",
    )
    .bind(code_hash(&code))
    .bind(&patient.patient_id)
    .bind(now)
    .bind(now + CODE_LIFETIME_MILLIS)
    .execute(&mut *tx)
    .await?;
    let event = AuditEvent::new(EventKind::Create, patient.auth.agent())
        .patient(&patient.patient_id)
        .detail("transfer code issued");
    audit::record(&mut tx, &event).await?;
    tx.commit().await?;
    state.audit.notify();
    Ok((
        StatusCode::CREATED,
        Json(TransferCode {
            code,
            expires_at: millis_to_rfc3339(now + CODE_LIFETIME_MILLIS),
        }),
    ))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    /// The sending service's issuer (its public URL, the JWT's `iss`).
    pub issuer: String,
    pub display_name: String,
    /// Its public keys (a JWK Set; ES384 or RS384).
    pub jwks: Value,
}

/// Registers a service that may push transfers here (operator).
#[utoipa::path(put, path = "/operator/transfer-peers", tag = "operator",
    request_body = Peer,
    responses((status = 204, description = "Registered"),
        (status = 400, description = "Bad keys", content_type = "application/problem+json")))]
pub async fn register_peer(
    State(state): State<AppState>,
    operator: OperatorSession,
    Json(peer): Json<Peer>,
) -> Result<StatusCode, ApiError> {
    crate::oauth::clients::validate_jwks(&peer.jwks)
        .map_err(|reason| Error::Invalid(format!("jwks: {reason}")))?;
    let mut tx = state.db.begin().await?;
    sqlx::query("DELETE FROM transfer_peers WHERE issuer = $1")
        .bind(&peer.issuer)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO transfer_peers (issuer, display_name, jwks, registered_by, created_at) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(&peer.issuer)
    .bind(&peer.display_name)
    .bind(peer.jwks.to_string())
    .bind(&operator.0.session.account.id)
    .bind(now_millis())
    .execute(&mut *tx)
    .await?;
    let event = AuditEvent::new(EventKind::ClientRegistered, operator.0.agent())
        .detail(format!("transfer peer {} registered", peer.issuer));
    audit::record(&mut tx, &event).await?;
    tx.commit().await?;
    state.audit.notify();
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
struct PushClaims {
    iss: String,
    transfer_id: String,
    transfer_code: String,
}

/// A registered service pushes a transfer (a `transaction` Bundle, JWT in `Authorization`).
#[utoipa::path(post, path = "/transfer/inbox", tag = "patient",
    request_body(content = Vec<u8>, description = "FHIR transaction Bundle", content_type = "application/fhir+json"),
    responses((status = 200, description = "Received (or received before: the same answer)"),
        (status = 400, description = "Not FHIR, or about someone else", content_type = "application/problem+json"),
        (status = 401, description = "Unknown sender, bad signature, audience or expiry, or a spent or unknown code", content_type = "application/problem+json")))]
pub async fn inbox(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let token = super::oauth::bearer_token(&headers).ok_or(Error::Unauthenticated(
        "a signed transfer token is required",
    ))?;
    let claims = match verify_push(&state, token).await {
        Ok(claims) => claims,
        Err(error) => {
            // Who sent it is unproven: the refusal names no peer.
            let event = AuditEvent::new(EventKind::Create, Agent::client("unverified-peer"))
                .outcome(Outcome::MinorFailure)
                .detail(format!("transfer refused: {}", error.detail));
            state.audit.record_now(&event).await?;
            return Err(error);
        }
    };
    let agent = Agent::client(format!("peer:{}", claims.iss));
    // The same push again: the same answer, nothing stored twice.
    if let Some(row) = sqlx::query(
        "SELECT resources, receipt FROM received_transfers WHERE issuer = $1 AND transfer_id = $2",
    )
    .bind(&claims.iss)
    .bind(&claims.transfer_id)
    .fetch_optional(state.db.read_pool())
    .await?
    {
        let resources: i64 = row.try_get(0)?;
        let receipt: String = row.try_get(1)?;
        return Ok(Json(
            json!({"received": resources, "receipt": receipt, "repeated": true}),
        ));
    }
    let now = now_millis();
    let row = sqlx::query(
        "SELECT patient_id, expires_at, used_at FROM transfer_codes WHERE code_hash = $1",
    )
    .bind(code_hash(&claims.transfer_code))
    .fetch_optional(state.db.read_pool())
    .await?;
    let Some(row) = row else {
        return Err(refused(&state, &agent, "unknown transfer code").await);
    };
    let patient_id: String = row.try_get(0)?;
    let expires_at: i64 = row.try_get(1)?;
    let used_at: Option<i64> = row.try_get(2)?;
    if used_at.is_some() || expires_at < now {
        return Err(refused(&state, &agent, "the transfer code is spent or expired").await);
    }
    let spent = sqlx::query(
        "UPDATE transfer_codes SET used_at = $1, used_by = $2 WHERE code_hash = $3 AND used_at IS NULL",
    )
    .bind(now)
    .bind(format!("{}#{}", claims.iss, claims.transfer_id))
    .bind(code_hash(&claims.transfer_code))
    .execute(state.db.write_pool())
    .await?
    .rows_affected();
    if spent != 1 {
        return Err(refused(&state, &agent, "the transfer code is spent").await);
    }
    let source_id = format!("transfer:{}", claims.iss);
    let target = ImportTarget {
        patient_id: &patient_id,
        agent: agent.clone(),
        source_id: &source_id,
        source_display: "Transfer from another PHR service",
    };
    let imported = match import_into(&state, &target, "application/fhir+json", &body).await {
        Ok(imported) => imported,
        Err(error) => {
            // The code stays usable for a corrected push.
            sqlx::query(
                "UPDATE transfer_codes SET used_at = NULL, used_by = NULL WHERE code_hash = $1",
            )
            .bind(code_hash(&claims.transfer_code))
            .execute(state.db.write_pool())
            .await?;
            return Err(error);
        }
    };
    let received = imported.created + imported.updated + imported.unchanged;
    let receipt = state.receipts.sign(&json!({
        "iss": state.receipts.issuer(),
        "iat": now / 1000,
        "jti": uuid::Uuid::new_v4().to_string(),
        "receipt_type": "transfer-received",
        "transfer": {"id": claims.transfer_id, "from": claims.iss, "resources": received},
    }))?;
    sqlx::query(
        "INSERT INTO received_transfers (issuer, transfer_id, patient_id, resources, receipt, received_at)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&claims.iss)
    .bind(&claims.transfer_id)
    .bind(&patient_id)
    .bind(received as i64)
    .bind(&receipt)
    .bind(now)
    .execute(state.db.write_pool())
    .await?;
    Ok(Json(json!({"received": received, "receipt": receipt})))
}

async fn refused(state: &AppState, agent: &Agent, reason: &'static str) -> ApiError {
    let event = AuditEvent::new(EventKind::Create, agent.clone())
        .outcome(Outcome::MinorFailure)
        .detail(format!("transfer refused: {reason}"));
    let _ = state.audit.record_now(&event).await;
    Error::Unauthenticated(reason).into()
}

async fn verify_push(state: &AppState, token: &str) -> Result<PushClaims, ApiError> {
    let unverified: Value = {
        use base64::Engine as _;
        let payload = token
            .split('.')
            .nth(1)
            .ok_or(Error::Unauthenticated("not a JWT"))?;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| Error::Unauthenticated("not a JWT"))?;
        serde_json::from_slice(&bytes).map_err(|_| Error::Unauthenticated("not a JWT"))?
    };
    let issuer = unverified["iss"].as_str().unwrap_or_default().to_string();
    let jwks: Option<String> =
        sqlx::query_scalar("SELECT jwks FROM transfer_peers WHERE issuer = $1")
            .bind(&issuer)
            .fetch_optional(state.db.read_pool())
            .await?;
    let jwks: JwkSet =
        jwks.and_then(|j| serde_json::from_str(&j).ok())
            .ok_or(Error::Unauthenticated(
                "the sender is not a registered transfer peer",
            ))?;
    let header =
        jsonwebtoken::decode_header(token).map_err(|_| Error::Unauthenticated("not a JWT"))?;
    let jwk = header
        .kid
        .as_deref()
        .and_then(|kid| jwks.find(kid))
        .ok_or(Error::Unauthenticated("the signing key is not the peer's"))?;
    if !matches!(
        header.alg,
        jsonwebtoken::Algorithm::ES384 | jsonwebtoken::Algorithm::RS384
    ) {
        return Err(Error::Unauthenticated("transfer tokens are ES384 or RS384").into());
    }
    let key = jsonwebtoken::DecodingKey::from_jwk(jwk)
        .map_err(|_| Error::Unauthenticated("bad peer key"))?;
    let mut validation = jsonwebtoken::Validation::new(header.alg);
    validation.set_audience(&[format!("{}/transfer/inbox", state.public_url())]);
    validation.set_issuer(&[issuer.as_str()]);
    validation.set_required_spec_claims(&["exp", "aud", "iss"]);
    let data = jsonwebtoken::decode::<PushClaims>(token, &key, &validation).map_err(|_| {
        Error::Unauthenticated("the transfer token is invalid, expired or not for this service")
    })?;
    Ok(data.claims)
}
