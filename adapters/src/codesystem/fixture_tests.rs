//! Checks against the public example files in `fixtures/` (read-only; see its README).

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::*;

const FIXTURES_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures");

/// The `.json` files directly in a fixture folder, sorted, so a missing folder fails
/// loudly instead of making the tests pass on nothing.
fn json_files(folder: &str) -> Vec<PathBuf> {
    let dir = Path::new(FIXTURES_DIR).join(folder);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no JSON files in {}", dir.display());
    files
}

fn read_json(path: &Path) -> Value {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn file_name(path: &Path) -> &str {
    path.file_name().and_then(|name| name.to_str()).unwrap()
}

#[test]
fn every_oid_twin_normalises_to_its_url_twin() {
    let oid_files = json_files("jp-core-1.1.2/oid");
    assert_eq!(oid_files.len(), 16);
    let mut total_changes = 0;
    for oid_path in &oid_files {
        let url_path = Path::new(FIXTURES_DIR)
            .join("jp-core-1.1.2/url")
            .join(file_name(oid_path));
        let mut resource = read_json(oid_path);
        let report = normalize_resource(&mut resource);
        assert_eq!(resource, read_json(&url_path), "{}", file_name(oid_path));
        total_changes += report.changed.len();
    }
    // 33 `system` values differ between the two folders.
    assert_eq!(total_changes, 33);
}

#[test]
fn oid_twin_bytes_change_only_in_their_system_strings() {
    for oid_path in json_files("jp-core-1.1.2/oid") {
        let body = std::fs::read(&oid_path).unwrap();
        let (output, report) = normalize_json_bytes(&body).unwrap();
        let url_twin = read_json(
            &Path::new(FIXTURES_DIR)
                .join("jp-core-1.1.2/url")
                .join(file_name(&oid_path)),
        );
        assert_eq!(
            serde_json::from_slice::<Value>(&output).unwrap(),
            url_twin,
            "{}",
            file_name(&oid_path)
        );
        // Replacing each `from` string token by its `to`, in order, reproduces the output
        // exactly: nothing else moved (the fixtures' system strings have no escapes).
        let mut expected = String::from_utf8(body.clone()).unwrap();
        let mut search_from = 0;
        for (_, from, to) in &report.changed {
            let token = format!("\"{from}\"");
            let at = search_from + expected[search_from..].find(&token).unwrap();
            expected.replace_range(at..at + token.len(), &format!("\"{to}\""));
            search_from = at + to.len() + 2;
        }
        assert_eq!(std::str::from_utf8(&output).unwrap(), expected);
    }
}

#[test]
fn url_twins_are_already_canonical() {
    let url_files = json_files("jp-core-1.1.2/url");
    assert_eq!(url_files.len(), 16);
    for path in url_files {
        let body = std::fs::read(&path).unwrap();
        let (output, report) = normalize_json_bytes(&body).unwrap();
        assert!(report.is_unchanged(), "{}: {report:?}", file_name(&path));
        assert!(matches!(output, Cow::Borrowed(bytes) if std::ptr::eq(bytes, &body[..])));
    }
}

/// A NamingSystem's `uniqueId` values, split into OIDs and URLs (`urn:oid:` URIs count
/// as OIDs).
fn naming_system_ids(naming_system: &Value) -> (Vec<String>, Vec<String>) {
    let mut oids = Vec::new();
    let mut urls = Vec::new();
    for unique_id in naming_system["uniqueId"].as_array().unwrap() {
        let value = unique_id["value"].as_str().unwrap().to_owned();
        match (
            unique_id["type"].as_str().unwrap(),
            value.strip_prefix("urn:oid:"),
        ) {
            ("oid", _) => oids.push(value),
            ("uri", Some(oid)) => oids.push(oid.to_owned()),
            ("uri", None) => urls.push(value),
            (other, _) => panic!("unexpected uniqueId type {other}"),
        }
    }
    (oids, urls)
}

#[test]
fn every_naming_system_is_in_the_table() {
    let files = json_files("jp-clins-1.5.2/naming-systems");
    assert_eq!(files.len(), 23);
    let mut with_oid_and_url = 0;
    for path in files {
        let naming_system = read_json(&path);
        let name = file_name(&path);
        let (oids, urls) = naming_system_ids(&naming_system);
        assert!(!urls.is_empty(), "{name} names no URL");
        // All its URLs (canonical or other) name one table entry...
        let entry = find_code_system(&urls[0]).unwrap_or_else(|| panic!("{name}: not in table"));
        for url in &urls {
            assert_eq!(find_code_system(url), Some(entry), "{name}: {url}");
        }
        // ...and each of its OIDs, in both spellings, maps to that entry's URL.
        for oid in &oids {
            assert!(entry.oids.contains(&oid.as_str()), "{name}: {oid} missing");
            assert_eq!(canonical_system(&format!("urn:oid:{oid}")), entry.url);
            assert_eq!(canonical_system(oid), entry.url);
        }
        // The stored URL is one the NamingSystem lists, unless the JP Core twins or the
        // JP-CLINS OID→URL table chose a URL this older NamingSystem does not list yet.
        let chosen_elsewhere = [
            "http://jami.jp/SS-MIX2/CodeSystem/ClinicalDepartment",
            "http://jami.jp/CodeSystem/MedicationUsageAdditional",
            "http://jami.jp/CodeSystem/MedicationBodySiteExternal",
            "http://jami.jp/CodeSystem/MedicationMethodDetailUsage",
            "http://jpfhir.jp/fhir/core/mhlw/CodeSystem/MedicationIngredientStrengthType",
            "http://jpfhir.jp/fhir/core/mhlw/CodeSystem/MedicationSubstitutionProhibittedCategory",
            "http://jpfhir.jp/fhir/core/mhlw/CodeSystem/MedicationUnitMERIT9Code",
            "http://jpfhir.jp/fhir/core/mhlw/CodeSystem/PrefectureNo-2digits",
            "http://jpfhir.jp/fhir/core/mhlw/CodeSystem/MedicationFeeScoreType",
        ];
        assert!(
            urls.iter().any(|url| url == entry.url) || chosen_elsewhere.contains(&entry.url),
            "{name}: table URL {} is not among {urls:?}",
            entry.url
        );
        if !oids.is_empty() {
            with_oid_and_url += 1;
        }
    }
    assert_eq!(with_oid_and_url, 22);
}

/// Every other real example: normalising must work and be idempotent.
fn assert_normalises_idempotently(path: &Path) -> NormalizationReport {
    let body = std::fs::read(path).unwrap();
    let (output, report) =
        normalize_json_bytes(&body).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (again, second) = normalize_json_bytes(&output).unwrap();
    assert!(second.is_unchanged(), "{}: {second:?}", path.display());
    assert!(matches!(again, Cow::Borrowed(_)));

    let mut once = read_json(path);
    assert_eq!(normalize_resource(&mut once), report);
    let mut twice = once.clone();
    assert!(normalize_resource(&mut twice).is_unchanged());
    assert_eq!(twice, once);
    assert_eq!(serde_json::from_slice::<Value>(&output).unwrap(), once);
    report
}

#[test]
fn jp_clins_examples_are_already_canonical() {
    let files = json_files("jp-clins-1.5.2/examples");
    assert_eq!(files.len(), 15);
    for path in files {
        // Their remaining OIDs (処方箋ID, 医師ID, 患者ID with branches) have no URL form.
        let report = assert_normalises_idempotently(&path);
        assert!(report.is_unchanged(), "{}: {report:?}", path.display());
    }
}

#[test]
fn echeckup_report_examples_normalise_idempotently() {
    let mut files = json_files("echeckup-report");
    files.extend(json_files("echeckup-report/choice-codesystems"));
    // 9 resources and package.json, plus 58 answer-value CodeSystems.
    assert_eq!(files.len(), 10 + 58);
    let mut changed_pointers = Vec::new();
    for path in &files {
        let report = assert_normalises_idempotently(path);
        changed_pointers.extend(
            report
                .changed
                .into_iter()
                .map(|(pointer, from, to)| (file_name(path).to_owned(), pointer, from, to)),
        );
    }
    // The 特定健診 OIDs (1.2.392.200119.6.*) have no URL form; only the MHLW insurance
    // tables in the sample Bundle's Coverage and insurer Organization do.
    let froms: Vec<&str> = changed_pointers.iter().map(|c| c.2.as_str()).collect();
    assert_eq!(
        froms,
        [
            "urn:oid:1.2.392.100495.20.2.61",
            "urn:oid:1.2.392.100495.20.2.62",
            "urn:oid:1.2.392.100495.20.3.61",
        ],
        "{changed_pointers:#?}"
    );
    assert!(changed_pointers
        .iter()
        .all(|c| c.0 == "Bundle-Bundle-eCheckupReport-Sample-01.json"));
}

#[test]
fn every_jp_core_file_normalises_idempotently() {
    for folder in ["jp-core-1.1.2/oid", "jp-core-1.1.2/url"] {
        for path in json_files(folder) {
            assert_normalises_idempotently(&path);
        }
    }
    for path in json_files("jp-clins-1.5.2/naming-systems") {
        assert!(assert_normalises_idempotently(&path).is_unchanged());
    }
}
