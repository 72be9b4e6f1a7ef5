//! The patient takes everything out, in one action after step-up: a FHIR R4 `collection`
//! Bundle (JSON, streamed), or a ZIP with one NDJSON file per resource type plus their
//! Consents and the readable summary. The summary is also a portal page. Resources are read
//! one at a time, so memory stays bounded however large the record is; the ZIP is built in a
//! private temporary file (mode 0600, unlinked as soon as it is open for sending).

use std::io::Write;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::{StreamExt, TryStreamExt};
use maud::html;
use serde::Deserialize;
use serde_json::{json, Value};
use utoipa::ToSchema;

use super::error::ApiError;
use super::portal::{
    form_values, html_response, same_origin, second_factor_code_field, signed_in_page,
    step_up_refused,
};
use super::second_factor::{step_up_proof, PasskeyAssertion};
use super::session::PatientSession;
use super::AppState;
use crate::audit::{AuditEvent, EventKind};
use crate::error::Error;
use crate::export::summary::Summary;
use crate::fhir::serve::{serve_all, served_patient};
use crate::mfa::Proof;
use crate::store::resources::StoredResource;
use crate::store::{millis_to_rfc3339, now_millis};

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExportRequest {
    /// The account's password again (step-up).
    pub password: String,
    /// The second factor too, when the account has one: a TOTP or recovery code…
    #[serde(default)]
    pub code: Option<String>,
    /// …or a passkey assertion (challenge from `/auth/step-up/passkey/start`).
    #[serde(default)]
    pub passkey: Option<PasskeyAssertion>,
    /// `bundle` (FHIR JSON) or `ndjson-zip`.
    pub format: String,
}

/// Downloads the whole record (after step-up).
#[utoipa::path(post, path = "/patient/export", tag = "patient",
    request_body = ExportRequest,
    responses((status = 200, description = "The record: application/fhir+json (collection Bundle) or application/zip (NDJSON per type, Consents, summary.html)"),
        (status = 400, description = "Unknown format", content_type = "application/problem+json"),
        (status = 401, description = "Not signed in, or the password is wrong", content_type = "application/problem+json")))]
pub async fn export(
    State(state): State<AppState>,
    patient: PatientSession,
    Json(request): Json<ExportRequest>,
) -> Result<Response, ApiError> {
    let proof = step_up_proof(request.code.as_deref(), request.passkey);
    export_record(
        &state,
        &patient,
        &request.password,
        proof.as_ref(),
        &request.format,
    )
    .await
}

async fn export_record(
    state: &AppState,
    patient: &PatientSession,
    password: &str,
    second_factor: Option<&Proof>,
    format: &str,
) -> Result<Response, ApiError> {
    if !matches!(format, "bundle" | "ndjson-zip") {
        return Err(Error::Invalid("format: choose bundle or ndjson-zip".into()).into());
    }
    let stepped = state
        .second_factors
        .step_up(
            &patient.auth.session.account,
            password,
            second_factor,
            patient.auth.address,
            "exporting the record",
        )
        .await;
    state.audit.notify();
    stepped?;
    let event = AuditEvent::new(EventKind::Export, patient.auth.agent())
        .patient(&patient.patient_id)
        .detail(format!("patient export ({format}) of the whole record"));
    state.audit.record_now(&event).await?;
    let stamp = millis_to_rfc3339(now_millis());
    let name = format!("phr-record-{}", &stamp[..10]);
    if format == "bundle" {
        let body = Body::from_stream(bundle_stream(
            state.clone(),
            patient.patient_id.clone(),
            stamp,
        ));
        let mut response =
            ([(header::CONTENT_TYPE, "application/fhir+json")], body).into_response();
        attach(&mut response, &format!("{name}.json"));
        Ok(response)
    } else {
        let file = write_zip(state, &patient.patient_id, &stamp).await?;
        let file = tokio::fs::File::from_std(file);
        let stream = futures::stream::try_unfold(file, |mut file| async move {
            use tokio::io::AsyncReadExt;
            let mut buffer = vec![0u8; 64 * 1024];
            let read = file.read(&mut buffer).await?;
            if read == 0 {
                return Ok::<_, std::io::Error>(None);
            }
            buffer.truncate(read);
            Ok(Some((Bytes::from(buffer), file)))
        });
        let mut response = (
            [(header::CONTENT_TYPE, "application/zip")],
            Body::from_stream(stream),
        )
            .into_response();
        attach(&mut response, &format!("{name}.zip"));
        Ok(response)
    }
}

fn attach(response: &mut Response, file_name: &str) {
    if let Ok(value) = HeaderValue::from_str(&format!("attachment; filename=\"{file_name}\"")) {
        response
            .headers_mut()
            .insert(header::CONTENT_DISPOSITION, value);
    }
}

/// The patient's current resources as served, one at a time: the Patient once (under the
/// patient's id), then everything else.
fn served_resources(
    state: AppState,
    patient_id: String,
) -> impl futures::Stream<Item = Result<Value, Error>> + Send + 'static {
    async_stream::try_stream! {
        if let Some((patient, _)) = served_patient(&state.resources, &patient_id).await? {
            yield patient;
        }
        let stored = match state.resources.stream_current(&patient_id).await {
            Ok(stream) => Some(stream),
            Err(Error::KeyMissing(_)) => None,
            Err(other) => Err(other)?,
        };
        if let Some(stored) = stored {
            let mut stored = Box::pin(stored);
            while let Some(resource) = stored.try_next().await? {
                let resource: StoredResource = resource;
                if resource.meta.resource_type == "Patient" {
                    continue;
                }
                let mut served = serve_all(&state.resources, &patient_id, std::slice::from_ref(&resource)).await?;
                if let Some(served) = served.pop() {
                    yield served;
                }
            }
        }
        for view in state.consents.list(&patient_id).await? {
            let consent = phr_consent::model::to_fhir_json(&view.consent)
                .map_err(|e| Error::Invalid(format!("consent {}: {e}", view.id)))?;
            yield consent;
        }
    }
}

fn bundle_stream(
    state: AppState,
    patient_id: String,
    stamp: String,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    let base = state.public_url();
    let resources = served_resources(state, patient_id);
    async_stream::try_stream! {
        yield Bytes::from(format!(
            "{{\"resourceType\":\"Bundle\",\"type\":\"collection\",\"timestamp\":\"{stamp}\",\"entry\":["
        ));
        let mut resources = Box::pin(resources);
        let mut first = true;
        while let Some(resource) = resources.next().await {
            let resource = resource.map_err(|e| {
                tracing::error!(error = %e, "patient export broke off");
                std::io::Error::other("export broke off")
            })?;
            let entry = json!({
                "fullUrl": format!(
                    "{base}/fhir/{}/{}",
                    resource["resourceType"].as_str().unwrap_or_default(),
                    resource["id"].as_str().unwrap_or_default()
                ),
                "resource": resource,
            });
            let mut bytes = if first { Vec::new() } else { vec![b','] };
            first = false;
            serde_json::to_writer(&mut bytes, &entry).map_err(std::io::Error::other)?;
            yield Bytes::from(bytes);
        }
        yield Bytes::from_static(b"]}");
    }
}

/// The NDJSON ZIP in a private temporary file, unlinked once open: nothing of it stays on
/// disk after the download.
async fn write_zip(
    state: &AppState,
    patient_id: &str,
    stamp: &str,
) -> Result<std::fs::File, ApiError> {
    let directory = state.config.data_dir.join("tmp");
    std::fs::create_dir_all(&directory).map_err(|e| Error::config("data_dir", e.to_string()))?;
    let path = directory.join(format!("export-{}.zip", uuid::Uuid::new_v4()));
    let file = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| Error::config("data_dir", e.to_string()))?
    };
    // Unlinked now: the open handle is the only way to it.
    let _ = std::fs::remove_file(&path);
    let mut zip = zip::ZipWriter::new(file);
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    let mut summary = Summary::default();
    let mut current: Option<String> = None;
    let mut resources = Box::pin(served_resources(state.clone(), patient_id.to_string()));
    let zip_error = |e: zip::result::ZipError| Error::Invalid(format!("zip: {e}"));
    let io_error = |e: std::io::Error| Error::Invalid(format!("zip: {e}"));
    while let Some(resource) = resources.next().await {
        let resource = resource?;
        let resource_type = resource["resourceType"]
            .as_str()
            .unwrap_or("Unknown")
            .to_string();
        summary.add(
            &resource,
            resource["meta"]["source"].as_str().unwrap_or_default(),
        );
        if current.as_deref() != Some(resource_type.as_str()) {
            zip.start_file(format!("{resource_type}.ndjson"), options)
                .map_err(zip_error)?;
            current = Some(resource_type);
        }
        serde_json::to_writer(&mut zip, &resource).map_err(|e| Error::Invalid(e.to_string()))?;
        zip.write_all(b"\n").map_err(io_error)?;
    }
    summary.finish();
    zip.start_file("summary.html", options).map_err(zip_error)?;
    let page = summary.render(patient_id, stamp).into_string();
    zip.write_all(page.as_bytes()).map_err(io_error)?;
    let mut file = zip.finish().map_err(zip_error)?;
    use std::io::Seek;
    file.seek(std::io::SeekFrom::Start(0)).map_err(io_error)?;
    Ok(file)
}

/// The readable summary as a portal page (printable).
pub async fn portal_summary(
    State(state): State<AppState>,
    patient: PatientSession,
) -> Result<Response, ApiError> {
    let mut summary = Summary::default();
    let mut resources = Box::pin(served_resources(state.clone(), patient.patient_id.clone()));
    while let Some(resource) = resources.next().await {
        let resource = resource?;
        summary.add(
            &resource,
            resource["meta"]["source"].as_str().unwrap_or_default(),
        );
    }
    summary.finish();
    let event = AuditEvent::new(EventKind::Read, patient.auth.agent())
        .patient(&patient.patient_id)
        .detail("readable summary");
    state.audit.record_now(&event).await?;
    let page = summary.render(&patient.patient_id, &millis_to_rfc3339(now_millis()));
    Ok(html_response(StatusCode::OK, page))
}

/// The portal's export page: what is included, the password, a format (none chosen).
pub async fn portal_page(_patient: PatientSession) -> Result<Response, ApiError> {
    let markup = signed_in_page(
        "データの書き出し / Export my data",
        html! {
            h1 { "データの書き出し " span.en { "Export my data" } }
            p { "保管しているあなたのデータをすべて、ほかのサービスでも読める形式（FHIR）で書き出します。同意の記録と、読みやすいまとめ（summary.html）も含みます。" }
            p.en { "Everything held for you, in FHIR (readable by other services), with your consents and a readable summary." }
            p { a id="summary-link" href="/portal/summary" { "まとめを画面で見る " span.en { "View the summary" } } }
            form method="post" action="/portal/export" {
                fieldset {
                    legend { "形式 " span.en { "Format" } }
                    label { input type="radio" name="format" value="ndjson-zip" required; " ZIP（種類ごとのNDJSONとまとめ） " span.en { "ZIP (NDJSON per type, with the summary)" } }
                    label { input type="radio" name="format" value="bundle" required; " FHIR Bundle（JSON） " span.en { "FHIR Bundle (JSON)" } }
                }
                label { "確認のため、パスワードをもう一度入力してください " span.en { "Enter your password again to confirm" }
                    input type="password" name="password" autocomplete="current-password" required;
                }
                (second_factor_code_field())
                button type="submit" id="export" { "書き出す / Export" }
            }
        },
    );
    Ok(html_response(StatusCode::OK, markup))
}

pub async fn portal_export(
    State(state): State<AppState>,
    headers: HeaderMap,
    patient: PatientSession,
    body: String,
) -> Result<Response, ApiError> {
    same_origin(&headers, &state)?;
    let password = form_values(&body, "password").pop().unwrap_or_default();
    let code = form_values(&body, "code").pop();
    let proof = step_up_proof(code.as_deref(), None);
    let format = form_values(&body, "format").pop().unwrap_or_default();
    match export_record(&state, &patient, &password, proof.as_ref(), &format).await {
        Err(error) if error.status == StatusCode::UNAUTHORIZED => Ok(step_up_refused(
            "データの書き出し / Export my data",
            "/portal/export",
        )),
        other => other,
    }
}
