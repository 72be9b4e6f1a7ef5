//! Delivery by SMART Backend Services, on the patient's instruction.
//!
//! Some hospitals release records system to system instead of through a patient login.
//! The patient's instruction still decides: the hospital gives the patient a one-time
//! linking code (at the counter or in its own app), the patient enters it at the gateway,
//! and the gateway — authenticated with `private_key_jwt` — redeems it:
//!
//! `POST [base]/Patient/$link-instruction` with a `Parameters` body
//! (`linkingCode` valueString, `instructionId` valueString) answers a `Parameters` with
//! `patient` (valueReference `Patient/<id>`): the patient the code stands for.
//! `POST [base]/Patient/$unlink-instruction` (`instructionId`) tells the hospital the
//! patient withdrew.
//!
//! The hospital so holds the id of the instruction it releases data for (its evidence that
//! the patient asked), and the gateway never chooses whose record to read. No national
//! standard defines this step; the operation names are the gateway's own small interface,
//! implemented by the hospital simulator. Tokens are short-lived `client_credentials`
//! tokens: "refresh" means asking for a new one with a new assertion.

use std::collections::BTreeMap;

use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use serde_json::{json, Value};

use super::smart::{self, is_fhir_id, BackendKey};
use super::SourceContext;
use crate::error::SourceError;
use crate::source::{
    AuthorizationRequest, AuthorizationStart, Callback, LinkCredentials, PendingAuthorization,
};

/// `LinkCredentials.extra[EXTRA_LINK_KIND]` for links made this way.
pub const EXTRA_LINK_KIND: &str = "link_kind";
pub const LINK_KIND_BACKEND_SERVICES: &str = "backend-services";

const FHIR_JSON: &str = "application/fhir+json";

/// Whether these credentials came from a Backend Services link.
pub fn is_backend_link(credentials: &LinkCredentials) -> bool {
    credentials.extra.get(EXTRA_LINK_KIND).map(String::as_str) == Some(LINK_KIND_BACKEND_SERVICES)
}

/// The system scopes for these resource types (SMART v2 `.rs`).
pub fn system_scopes(resource_types: &[String]) -> Result<Vec<String>, SourceError> {
    smart::read_scopes("system", resource_types)
}

/// Checks the server can do Backend Services and remembers what to ask for at finish.
pub(crate) async fn start(
    context: &SourceContext,
    request: &AuthorizationRequest,
) -> Result<AuthorizationStart, SourceError> {
    let configuration = smart::discover(context).await?;
    smart::require_private_key_jwt(&configuration)?;
    smart::endpoint_url(&configuration.token_endpoint)?;
    let mut extra = BTreeMap::new();
    extra.insert(
        smart::EXTRA_INSTRUCTION_ID.to_string(),
        request.instruction_id.clone(),
    );
    Ok(AuthorizationStart {
        authorize_url: String::new(),
        pending: PendingAuthorization {
            state: crate::oauth::random_url_token(),
            code_verifier: String::new(),
            redirect_uri: String::new(),
            requested_scopes: system_scopes(&request.resource_types)?,
            extra,
        },
    })
}

/// Redeems the patient's linking code for the patient it stands for.
pub(crate) async fn finish(
    context: &SourceContext,
    key: &BackendKey,
    pending: &PendingAuthorization,
    callback: &Callback,
) -> Result<LinkCredentials, SourceError> {
    if let Some(error) = &callback.error {
        return Err(SourceError::Authorization(error.clone()));
    }
    let state_matches = callback
        .state
        .as_deref()
        .is_some_and(|state| crate::oauth::constant_time_eq(state, &pending.state));
    if !state_matches {
        return Err(SourceError::Authorization(
            "state does not match the linking started".into(),
        ));
    }
    let code = callback
        .code
        .as_deref()
        .map(str::trim)
        .filter(|code| !code.is_empty() && code.len() <= 128)
        .ok_or_else(|| SourceError::Authorization("no linking code given".into()))?;
    let instruction_id = pending
        .extra
        .get(smart::EXTRA_INSTRUCTION_ID)
        .cloned()
        .unwrap_or_default();
    let token = smart::request_system_token(context, key, &pending.requested_scopes).await?;
    let parameters = json!({
        "resourceType": "Parameters",
        "parameter": [
            {"name": "linkingCode", "valueString": code},
            {"name": "instructionId", "valueString": instruction_id},
        ]
    });
    let reply = post_operation(
        context,
        &token.access_token,
        "$link-instruction",
        &parameters,
    )
    .await?;
    if reply.status.is_client_error() {
        return Err(SourceError::Authorization(format!(
            "the hospital refused the linking code: {}",
            outcome_text(&reply.body)
        )));
    }
    if !reply.status.is_success() {
        return Err(SourceError::Protocol(format!(
            "$link-instruction answered HTTP {}",
            reply.status
        )));
    }
    let patient_id = linked_patient(&reply.body)?;
    let mut extra = BTreeMap::new();
    extra.insert(
        EXTRA_LINK_KIND.to_string(),
        LINK_KIND_BACKEND_SERVICES.to_string(),
    );
    extra.insert(smart::EXTRA_INSTRUCTION_ID.to_string(), instruction_id);
    Ok(LinkCredentials {
        access_token: token.access_token,
        refresh_token: None,
        expires_at: token.expires_at,
        source_patient_id: patient_id,
        granted_scopes: token.granted_scopes,
        extra,
    })
}

/// A fresh system token for an existing link (there are no refresh tokens here).
pub(crate) async fn renew(
    context: &SourceContext,
    key: &BackendKey,
    credentials: &LinkCredentials,
) -> Result<LinkCredentials, SourceError> {
    let token = smart::request_system_token(context, key, &credentials.granted_scopes).await?;
    Ok(LinkCredentials {
        access_token: token.access_token,
        expires_at: token.expires_at,
        granted_scopes: token.granted_scopes,
        ..credentials.clone()
    })
}

/// Tells the hospital the patient withdrew the instruction.
pub(crate) async fn unlink(
    context: &SourceContext,
    key: &BackendKey,
    credentials: &LinkCredentials,
) -> Result<(), SourceError> {
    let instruction_id = credentials
        .extra
        .get(smart::EXTRA_INSTRUCTION_ID)
        .cloned()
        .unwrap_or_default();
    let token = smart::request_system_token(context, key, &credentials.granted_scopes).await?;
    let parameters = json!({
        "resourceType": "Parameters",
        "parameter": [{"name": "instructionId", "valueString": instruction_id}]
    });
    let reply = post_operation(
        context,
        &token.access_token,
        "$unlink-instruction",
        &parameters,
    )
    .await?;
    // Unknown to the hospital already: the goal is reached either way.
    if reply.status.is_success() || reply.status == reqwest::StatusCode::NOT_FOUND {
        Ok(())
    } else {
        Err(SourceError::Protocol(format!(
            "$unlink-instruction answered HTTP {}",
            reply.status
        )))
    }
}

async fn post_operation(
    context: &SourceContext,
    access_token: &str,
    operation: &str,
    parameters: &Value,
) -> Result<super::http::HttpReply, SourceError> {
    let request = context
        .transport
        .client
        .post(format!("{}/Patient/{operation}", context.base_url))
        .header(ACCEPT, FHIR_JSON)
        .header(CONTENT_TYPE, FHIR_JSON)
        .header(AUTHORIZATION, format!("Bearer {access_token}"))
        .body(parameters.to_string())
        .build()
        .map_err(|error| SourceError::Config(format!("{operation} request: {error}")))?;
    context.transport.execute(request).await
}

/// The `patient` parameter of the hospital's answer, as a bare id.
fn linked_patient(body: &[u8]) -> Result<String, SourceError> {
    let parameters: Value = serde_json::from_slice(body)
        .map_err(|error| SourceError::Protocol(format!("$link-instruction answer: {error}")))?;
    let reference = parameters
        .get("parameter")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|parameter| parameter.get("name").and_then(Value::as_str) == Some("patient"))
        .and_then(|parameter| parameter.pointer("/valueReference/reference"))
        .and_then(Value::as_str)
        .ok_or_else(|| SourceError::Protocol("$link-instruction answer names no patient".into()))?;
    let id = reference.strip_prefix("Patient/").unwrap_or_default();
    if !is_fhir_id(id) {
        return Err(SourceError::Protocol(format!(
            "$link-instruction answer: {reference:?} is not a Patient reference"
        )));
    }
    Ok(id.to_string())
}

/// The diagnostics of an OperationOutcome, or a short note when there is none.
fn outcome_text(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|outcome| {
            outcome
                .pointer("/issue/0/diagnostics")
                .and_then(Value::as_str)
                .map(|text| text.chars().take(200).collect())
        })
        .unwrap_or_else(|| "no reason given".into())
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn answers_are_read_strictly() {
        let good = br#"{"resourceType":"Parameters","parameter":[{"name":"patient","valueReference":{"reference":"Patient/pt000002"}}]}"#;
        assert_eq!(linked_patient(good).expect("patient"), "pt000002");
        for bad in [
            &br#"{"resourceType":"Parameters","parameter":[]}"#[..],
            br#"{"resourceType":"Parameters","parameter":[{"name":"patient","valueReference":{"reference":"Group/1"}}]}"#,
            br#"{"resourceType":"Parameters","parameter":[{"name":"patient","valueReference":{"reference":"Patient/../x"}}]}"#,
            b"<html/>",
        ] {
            assert!(
                matches!(linked_patient(bad), Err(SourceError::Protocol(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn system_scopes_are_per_type_and_refuse_non_types() {
        assert_eq!(
            system_scopes(&["Patient".into(), "Observation".into(), "Patient".into()])
                .expect("scopes"),
            vec!["system/Patient.rs", "system/Observation.rs"]
        );
        assert!(system_scopes(&["observation".into()]).is_err());
    }
}
