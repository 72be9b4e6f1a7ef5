//! 特定健診 results: an hc08 CDA becomes one stored 健康診断結果報告書 `document` Bundle,
//! whichever way it arrived (the portal, an upload, an exchange ZIP).
//!
//! Reconciliation: the Bundle's identity is the checkup itself — institution, checkup date
//! and the person's insurance card (`ReconciliationKey`) — not the sender, so the same
//! checkup from two sources is stored once; each arrival adds a Provenance naming its
//! source. The original CDA travels inside the Bundle as a DocumentReference.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use phr_adapters::tokutei_cda::{self, CDA_CONTENT_TYPE};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::store::reconciliation::digest;
use crate::store::resources::{NewResource, SourceIdentity};

/// The source identity's `source` for converted checkups (shared by every sender).
pub const CHECKUP_SOURCE: &str = "tokutei-checkup";

/// A converted checkup, ready to store.
#[derive(Debug)]
pub struct ConvertedCheckup {
    pub resource: NewResource,
    /// Results left out of the Bundle, each with its item code and reason.
    pub item_errors: Vec<String>,
    pub checkup_date: String,
    pub institution: Option<String>,
    pub birth_date: Option<String>,
}

/// Validates (XSD), parses and converts one hc08 document for `patient_id`. A document
/// that cannot be used is `Error::Invalid` with the reason (schema errors list the paths).
pub fn convert(patient_id: &str, xml: &[u8]) -> Result<ConvertedCheckup> {
    let invalid = |e: tokutei_cda::CdaError| Error::Invalid(e.to_string());
    tokutei_cda::validate(xml).map_err(invalid)?;
    let document = tokutei_cda::parse(xml).map_err(invalid)?;
    let conversion = tokutei_cda::to_fhir_bundle(&document, xml);
    let key = document.reconciliation_key();
    // The checkup's identity: the same digest whichever source sends it.
    let identity = digest(&[
        key.institution_number.as_deref().unwrap_or_default(),
        &key.checkup_date,
        key.insurance.insurer_number.as_deref().unwrap_or_default(),
        key.insurance.symbol.as_deref().unwrap_or_default(),
        key.insurance.number.as_deref().unwrap_or_default(),
        key.insurance.branch.as_deref().unwrap_or_default(),
    ]);
    let body = serde_json::to_vec(&conversion.bundle).map_err(|e| Error::Invalid(e.to_string()))?;
    Ok(ConvertedCheckup {
        resource: NewResource {
            patient_id: patient_id.to_string(),
            category: phr_consent::DataCategory::Documents.code().into(),
            source: SourceIdentity {
                source: CHECKUP_SOURCE.into(),
                resource_type: "Bundle".into(),
                source_resource_id: identity,
                version_id: None,
            },
            body,
        },
        item_errors: conversion
            .item_errors
            .iter()
            .map(|e| e.to_string())
            .collect(),
        checkup_date: key.checkup_date,
        institution: key.institution_number,
        birth_date: document.patient.birth_date,
    })
}

/// The CDA carried by a DocumentReference (`content.attachment` of the CDA media type with
/// inline `data`), if it carries one.
pub fn cda_of_document_reference(body: &[u8]) -> Option<Vec<u8>> {
    let resource: Value = serde_json::from_slice(body).ok()?;
    resource
        .get("content")?
        .as_array()?
        .iter()
        .filter_map(|content| content.get("attachment"))
        .find(|attachment| {
            attachment.get("contentType").and_then(Value::as_str) == Some(CDA_CONTENT_TYPE)
        })
        .and_then(|attachment| attachment.get("data"))
        .and_then(Value::as_str)
        .and_then(|data| STANDARD.decode(data).ok())
}

/// The birth dates in a stored resource: a Patient's, or those of the Patients inside a
/// checkup Bundle. Used to refuse an upload about someone else.
pub fn birth_dates_in(resource_type: &str, body: &[u8]) -> Vec<String> {
    let Ok(resource) = serde_json::from_slice::<Value>(body) else {
        return Vec::new();
    };
    let birth_date = |patient: &Value| {
        patient
            .get("birthDate")
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    match resource_type {
        "Patient" => birth_date(&resource).into_iter().collect(),
        "Bundle" => resource
            .get("entry")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|entry| entry.get("resource"))
            .filter(|r| r.get("resourceType").and_then(Value::as_str) == Some("Patient"))
            .filter_map(birth_date)
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_document_reference_without_a_cda_has_none() {
        let plain = br#"{"resourceType":"DocumentReference","content":[{"attachment":{"contentType":"application/pdf","data":"JVBERg=="}}]}"#;
        assert_eq!(cda_of_document_reference(plain), None);
        let cda = format!(
            r#"{{"resourceType":"DocumentReference","content":[{{"attachment":{{"contentType":"{CDA_CONTENT_TYPE}","data":"{}"}}}}]}}"#,
            STANDARD.encode("<ClinicalDocument/>")
        );
        assert_eq!(
            cda_of_document_reference(cda.as_bytes()).as_deref(),
            Some(&b"<ClinicalDocument/>"[..])
        );
        assert_eq!(cda_of_document_reference(b"not json"), None);
    }

    #[test]
    fn birth_dates_are_read_from_patients_and_checkup_bundles() {
        assert_eq!(
            birth_dates_in(
                "Patient",
                br#"{"resourceType":"Patient","birthDate":"1970-01-02"}"#
            ),
            vec!["1970-01-02"]
        );
        let bundle = br#"{"resourceType":"Bundle","entry":[{"resource":{"resourceType":"Composition"}},{"resource":{"resourceType":"Patient","birthDate":"1980-05-01"}}]}"#;
        assert_eq!(birth_dates_in("Bundle", bundle), vec!["1980-05-01"]);
        assert!(birth_dates_in("Observation", bundle).is_empty());
    }

    #[test]
    fn a_schema_invalid_document_is_refused_with_a_reason() {
        let error = convert("p1", b"<ClinicalDocument xmlns=\"urn:hl7-org:v3\"/>").unwrap_err();
        assert!(
            matches!(&error, Error::Invalid(reason) if reason.contains("XSD")),
            "{error}"
        );
    }
}
