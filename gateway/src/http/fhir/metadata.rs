//! `GET /fhir/metadata`: the CapabilityStatement (FHIR 4.0.1), open to all, saying what the
//! API serves and that it is protected by SMART on FHIR.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{json, Value};

use super::{fhir_json, served_types};
use crate::fhir::query::{category_path, code_path, date_paths};
use crate::http::AppState;

pub async fn capability_statement(State(state): State<AppState>) -> Response {
    let base = state.public_url();
    let mut resources: Vec<Value> = served_types()
        .into_iter()
        .map(resource_capability)
        .collect();
    resources.push(json!({
        "type": "Group",
        "documentation": "A recipient's group: the patients who consented to it (its id is the client id); Bulk Data export only.",
        "operation": [{
            "name": "export",
            "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/group-export",
        }],
    }));
    resources.push(json!({
        "type": "Consent",
        "documentation": "The patient's own disclosure consents; read with the patient's own token.",
        "interaction": [{"code": "read"}, {"code": "search-type"}],
    }));
    let statement = json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-25",
        "publisher": "phr-gateway",
        "kind": "instance",
        "software": {"name": "phr-gateway", "version": env!("CARGO_PKG_VERSION")},
        "implementation": {
            "description": "PHR data-exchange gateway: the patient's record, disclosed per resource under the patient's consent",
            "url": format!("{base}/fhir"),
        },
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "rest": [{
            "mode": "server",
            "security": {
                "cors": false,
                "service": [{"coding": [{
                    "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                    "code": "SMART-on-FHIR",
                }]}],
                "extension": [{
                    "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                    "extension": [
                        {"url": "authorize", "valueUri": format!("{base}/oauth/authorize")},
                        {"url": "token", "valueUri": format!("{base}/oauth/token")},
                        {"url": "revoke", "valueUri": format!("{base}/oauth/revoke")},
                    ],
                }],
                "description": "SMART App Launch (authorization code with PKCE S256); every disclosure is decided by the patient's consent at the time of the request.",
            },
            "resource": resources,
            "operation": [{
                "name": "export",
                "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/patient-export",
            }],
        }],
        "instantiates": ["http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data"],
    });
    fhir_json(StatusCode::OK, &statement)
}

fn resource_capability(resource_type: &str) -> Value {
    let mut params = vec![
        json!({"name": "_lastUpdated", "type": "date"}),
        json!({"name": "_count", "type": "number"}),
        json!({"name": "_id", "type": "token"}),
    ];
    if resource_type != "Patient" {
        params.push(json!({"name": "patient", "type": "reference"}));
    }
    if code_path(resource_type).is_some() {
        params.push(json!({"name": "code", "type": "token"}));
    }
    if category_path(resource_type).is_some() {
        params.push(json!({"name": "category", "type": "token"}));
    }
    if date_paths(resource_type).is_some() {
        params.push(json!({"name": "date", "type": "date"}));
    }
    let mut interactions = vec![json!({"code": "read"}), json!({"code": "search-type"})];
    if resource_type != "Patient" {
        interactions.push(json!({"code": "vread"}));
        interactions.push(json!({"code": "history-instance"}));
    }
    let mut capability = json!({
        "type": resource_type,
        "versioning": "versioned",
        "readHistory": resource_type != "Patient",
        "interaction": interactions,
        "searchParam": params,
    });
    let mut includes = Vec::new();
    if resource_type != "Patient" {
        includes.push(format!("{resource_type}:patient"));
    }
    if [
        "MedicationRequest",
        "MedicationDispense",
        "MedicationStatement",
    ]
    .contains(&resource_type)
    {
        includes.push(format!("{resource_type}:medication"));
    }
    if !includes.is_empty() {
        capability["searchInclude"] = json!(includes);
    }
    if resource_type == "Patient" {
        capability["operation"] = json!([{
            "name": "everything",
            "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything",
        }]);
    }
    capability
}
