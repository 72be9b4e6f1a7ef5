//! Reading a record exported by another PHR service (or by this gateway) without I/O: a FHIR
//! Bundle (JSON) or a ZIP of NDJSON files. Every resource the gateway keeps is returned with
//! its data category; what it does not keep (Consents, which are this gateway's own records,
//! or types outside every category) is listed as skipped. A file about more than one person
//! is refused as a whole.

use std::io::Read;

use phr_consent::DataCategory;
use serde_json::Value;

use crate::error::{Error, Result};

/// Most resources one import may hold.
pub const MAX_RESOURCES: usize = 100_000;

#[derive(Debug, Clone, PartialEq)]
pub struct ImportedResource {
    pub resource_type: String,
    /// The id in the file (the identity of this import's copy).
    pub id: String,
    pub version: Option<String>,
    pub category: DataCategory,
    pub body: Value,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImportFile {
    pub resources: Vec<ImportedResource>,
    /// `Type` → how many were left out, and why.
    pub skipped: Vec<(String, String)>,
    /// The file's Patient resources (usually one).
    pub patients: Vec<Value>,
}

/// Reads an upload of `content_type`.
pub fn read(content_type: &str, bytes: &[u8]) -> Result<ImportFile> {
    let content_type = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let mut file = ImportFile::default();
    match content_type.as_str() {
        "application/fhir+json" | "application/json" => {
            let bundle: Value = serde_json::from_slice(bytes)
                .map_err(|e| Error::Invalid(format!("the file is not JSON: {e}")))?;
            if bundle["resourceType"] != "Bundle" {
                return Err(Error::Invalid(
                    "the file is not a FHIR Bundle (resourceType Bundle)".into(),
                ));
            }
            let entries = bundle["entry"].as_array().ok_or_else(|| {
                Error::Invalid("the Bundle has no entries".into())
            })?;
            for entry in entries {
                take(&mut file, entry["resource"].clone())?;
            }
        }
        "application/zip" => {
            let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes))
                .map_err(|e| Error::Invalid(format!("the file is not a ZIP: {e}")))?;
            for i in 0..archive.len() {
                let mut entry = archive
                    .by_index(i)
                    .map_err(|e| Error::Invalid(format!("ZIP entry {i}: {e}")))?;
                let name = entry.name().to_string();
                if !name.ends_with(".ndjson") {
                    continue;
                }
                // ZIP bombs: a file may unpack to at most 64 times the upload.
                let mut text = String::new();
                (&mut entry)
                    .take(bytes.len() as u64 * 64 + 1024)
                    .read_to_string(&mut text)
                    .map_err(|e| Error::Invalid(format!("{name}: not UTF-8 NDJSON: {e}")))?;
                for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                    let resource: Value = serde_json::from_str(line)
                        .map_err(|e| Error::Invalid(format!("{name} line {}: {e}", n + 1)))?;
                    take(&mut file, resource)?;
                }
            }
        }
        other => {
            return Err(Error::Invalid(format!(
                "content type {other:?}: send a FHIR Bundle (application/fhir+json) or a ZIP of NDJSON (application/zip)"
            )))
        }
    }
    if file.resources.is_empty() {
        return Err(Error::Invalid(
            "the file holds no resource to import".into(),
        ));
    }
    check_one_person(&file)?;
    Ok(file)
}

fn take(file: &mut ImportFile, resource: Value) -> Result<()> {
    let Some(resource_type) = resource["resourceType"].as_str().map(str::to_string) else {
        return Err(Error::Invalid("a resource has no resourceType".into()));
    };
    if resource_type == "Patient" {
        file.patients.push(resource.clone());
    }
    let Some(category) = DataCategory::of_resource_type(&resource_type) else {
        let reason = if resource_type == "Consent" {
            "consents are recorded by this gateway itself; give them again here"
        } else {
            "not a type this gateway keeps"
        };
        file.skipped.push((resource_type, reason.into()));
        return Ok(());
    };
    let id = resource["id"]
        .as_str()
        .filter(|id| !id.is_empty() && id.len() <= 64)
        .ok_or_else(|| Error::Invalid(format!("a {resource_type} has no usable id")))?
        .to_string();
    if file.resources.len() >= MAX_RESOURCES {
        return Err(Error::Invalid(format!(
            "the file holds more than {MAX_RESOURCES} resources"
        )));
    }
    file.resources.push(ImportedResource {
        resource_type,
        id,
        version: resource["meta"]["versionId"].as_str().map(str::to_string),
        category,
        body: resource,
    });
    Ok(())
}

/// One person per file: the Patient resources agree on birth date, and every patient
/// reference points at one of them.
fn check_one_person(file: &ImportFile) -> Result<()> {
    let birth_dates: Vec<&str> = file
        .patients
        .iter()
        .filter_map(|p| p["birthDate"].as_str())
        .collect();
    if birth_dates.windows(2).any(|w| w[0] != w[1]) {
        return Err(Error::Invalid(
            "the file is about more than one person (different birth dates)".into(),
        ));
    }
    let patient_ids: Vec<&str> = file
        .patients
        .iter()
        .filter_map(|p| p["id"].as_str())
        .collect();
    for resource in &file.resources {
        for field in ["subject", "patient"] {
            if let Some(reference) = resource.body[field]["reference"].as_str() {
                if let Some(id) = reference.strip_prefix("Patient/") {
                    if !patient_ids.is_empty() && !patient_ids.contains(&id) {
                        return Err(Error::Invalid(format!(
                            "{} {} is about someone else ({reference})",
                            resource.resource_type, resource.id
                        )));
                    }
                }
            }
        }
    }
    Ok(())
}

/// The birth date the file gives, if any.
pub fn birth_date(file: &ImportFile) -> Option<&str> {
    file.patients.iter().find_map(|p| p["birthDate"].as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn bundle(entries: Vec<Value>) -> Vec<u8> {
        json!({"resourceType": "Bundle", "type": "collection",
            "entry": entries.into_iter().map(|r| json!({"resource": r})).collect::<Vec<_>>()})
        .to_string()
        .into_bytes()
    }

    #[test]
    fn a_bundle_is_read_and_consents_skipped() {
        let file = read(
            "application/fhir+json",
            &bundle(vec![
                json!({"resourceType": "Patient", "id": "p", "birthDate": "1980-04-01"}),
                json!({"resourceType": "Observation", "id": "o", "meta": {"versionId": "2"}, "subject": {"reference": "Patient/p"}}),
                json!({"resourceType": "Consent", "id": "c"}),
                json!({"resourceType": "Practitioner", "id": "d"}),
            ]),
        )
        .unwrap();
        assert_eq!(file.resources.len(), 2);
        assert_eq!(file.resources[1].version.as_deref(), Some("2"));
        assert_eq!(file.skipped.len(), 2);
        assert_eq!(birth_date(&file), Some("1980-04-01"));
    }

    #[test]
    fn files_that_are_not_fhir_or_are_about_others_are_refused() {
        let two_people = bundle(vec![
            json!({"resourceType": "Patient", "id": "a", "birthDate": "1980-04-01"}),
            json!({"resourceType": "Patient", "id": "b", "birthDate": "1990-01-01"}),
        ]);
        let someone_else = bundle(vec![
            json!({"resourceType": "Patient", "id": "a"}),
            json!({"resourceType": "Observation", "id": "o", "subject": {"reference": "Patient/zz"}}),
        ]);
        for (content_type, bytes, needle) in [
            ("application/pdf", b"%PDF".to_vec(), "content type"),
            ("application/fhir+json", b"not json".to_vec(), "not JSON"),
            (
                "application/fhir+json",
                br#"{"resourceType":"Patient"}"#.to_vec(),
                "not a FHIR Bundle",
            ),
            ("application/fhir+json", bundle(vec![]), "no resource"),
            ("application/fhir+json", two_people, "more than one person"),
            ("application/fhir+json", someone_else, "someone else"),
            (
                "application/fhir+json",
                bundle(vec![json!({"id": "x"})]),
                "resourceType",
            ),
            ("application/zip", b"PK nonsense".to_vec(), "not a ZIP"),
        ] {
            let error = read(content_type, &bytes).unwrap_err().to_string();
            assert!(error.contains(needle), "{needle}: {error}");
        }
    }

    proptest! {
        #[test]
        fn reading_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512), zip in any::<bool>()) {
            let content_type = if zip { "application/zip" } else { "application/fhir+json" };
            let _ = read(content_type, &bytes);
        }
    }
}
