//! The hospital's side of Backend Services delivery on the patient's instruction: one-time
//! linking codes (handed to the patient at the counter) redeemed by the gateway with
//! `POST Patient/$link-instruction`, and `POST Patient/$unlink-instruction` when the
//! patient withdraws. Only system (client_credentials) tokens may call either.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use rand::Rng;
use serde_json::{json, Value};

use super::fhir::{admit, fhir_response, forbidden, operation_outcome, unauthorized};
use super::{lock, SimulatorState};

#[derive(Debug, Default)]
pub(crate) struct LinkingState {
    /// Unused codes → the patient they stand for.
    codes: BTreeMap<String, String>,
    /// Instruction id → patient, for instructions the gateway linked.
    instructions: BTreeMap<String, String>,
}

impl LinkingState {
    pub(crate) fn issue(&mut self, patient_id: &str) -> String {
        // Ten digits in two groups, as a counter slip would print them.
        let mut rng = rand::thread_rng();
        let code = format!(
            "{:05}-{:05}",
            rng.gen_range(0..100_000),
            rng.gen_range(0..100_000)
        );
        self.codes.insert(code.clone(), patient_id.to_string());
        code
    }

    pub(crate) fn linked(&self) -> Vec<(String, String)> {
        self.instructions
            .iter()
            .map(|(instruction, patient)| (instruction.clone(), patient.clone()))
            .collect()
    }
}

/// `POST /Patient/$link-instruction` and `POST /Patient/$unlink-instruction`.
pub(crate) async fn operation(
    State(server): State<Arc<SimulatorState>>,
    Path((resource_type, operation)): Path<(String, String)>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let line = format!("POST /{resource_type}/{operation}");
    let grant = match admit(&server, line, &headers, true).await {
        Ok(Some(grant)) => grant,
        Ok(None) => return unauthorized(&server),
        Err(response) => return response,
    };
    if resource_type != "Patient" {
        return operation_outcome(StatusCode::NOT_FOUND, "not-supported", "unknown operation");
    }
    if grant.patient_id.is_some() {
        return forbidden(
            &server,
            "only the gateway's system client may link instructions",
        );
    }
    let parameters: Value = match serde_json::from_str(&body) {
        Ok(parameters) => parameters,
        Err(_) => {
            return operation_outcome(StatusCode::BAD_REQUEST, "structure", "not a Parameters")
        }
    };
    let instruction_id = string_parameter(&parameters, "instructionId").unwrap_or_default();
    if instruction_id.is_empty() {
        return operation_outcome(StatusCode::BAD_REQUEST, "required", "instructionId missing");
    }
    match operation.as_str() {
        "$link-instruction" => {
            let code = string_parameter(&parameters, "linkingCode").unwrap_or_default();
            let mut linking = lock(&server.linking);
            // One-time: a code is spent whether or not the rest succeeds.
            let Some(patient_id) = linking.codes.remove(code.trim()) else {
                return operation_outcome(
                    StatusCode::BAD_REQUEST,
                    "invalid",
                    "unknown or already used linking code",
                );
            };
            linking
                .instructions
                .insert(instruction_id.to_string(), patient_id.clone());
            let answer = json!({
                "resourceType": "Parameters",
                "parameter": [{"name": "patient", "valueReference": {"reference": format!("Patient/{patient_id}")}}]
            });
            fhir_response(StatusCode::OK, answer.to_string())
        }
        "$unlink-instruction" => match lock(&server.linking).instructions.remove(instruction_id) {
            Some(_) => fhir_response(
                StatusCode::OK,
                json!({"resourceType": "Parameters", "parameter": []}).to_string(),
            ),
            None => operation_outcome(StatusCode::NOT_FOUND, "not-found", "no such instruction"),
        },
        _ => operation_outcome(StatusCode::NOT_FOUND, "not-supported", "unknown operation"),
    }
}

fn string_parameter<'a>(parameters: &'a Value, name: &str) -> Option<&'a str> {
    parameters
        .get("parameter")?
        .as_array()?
        .iter()
        .find(|parameter| parameter.get("name").and_then(Value::as_str) == Some(name))?
        .get("valueString")?
        .as_str()
}
