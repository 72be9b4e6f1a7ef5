//! Supply-chain transparency: the committed SBOM is what `Cargo.lock` gives (so a dependency
//! change without regenerating it fails CI), it passes the CycloneDX library's strict schema
//! validation, and operators (only they) read the subcontractor list and the SBOM.

use std::path::Path;
use std::process::Command;

use phr_gateway::audit::AccountRole;
use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::{build_error, spawn_app, Engine, TestEnv};

fn repo(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

#[test]
fn committed_sbom_matches_cargo_lock() {
    let committed = std::fs::read_to_string(repo("sbom/phr-gateway.cdx.json")).unwrap_or_default();
    let generated = phr_gateway::supply_chain::sbom::document().expect("sbom");
    assert!(
        committed == generated,
        "sbom/phr-gateway.cdx.json is out of date; regenerate it with\n  cargo run -p phr-gateway -- sbom --out sbom/phr-gateway.cdx.json"
    );
    // Every locked package is in it, with the lock's checksum.
    let lock = std::fs::read_to_string(repo("Cargo.lock")).expect("lock");
    let sbom: Value = serde_json::from_str(&generated).expect("json");
    let packages = lock.matches("[[package]]").count();
    let components = sbom["components"].as_array().map(Vec::len).unwrap_or(0);
    assert_eq!(
        components + 1,
        packages,
        "all packages but the root are components"
    );
    let sha2 = sbom["components"]
        .as_array()
        .expect("components")
        .iter()
        .find(|c| c["name"] == "rustls")
        .expect("rustls listed");
    let checksum = sha2["hashes"][0]["content"].as_str().expect("hash");
    assert!(lock.contains(checksum));
}

#[test]
fn the_sbom_passes_strict_cyclonedx_validation() {
    let python = repo("tests/python/.venv/bin/python");
    assert!(
        python.is_file(),
        "{} missing: run .ci/run (or python3 -m venv tests/python/.venv && tests/python/.venv/bin/pip install -r tests/python/validation-requirements.txt)",
        python.display()
    );
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("sbom.json");
    std::fs::write(
        &file,
        phr_gateway::supply_chain::sbom::document().expect("sbom"),
    )
    .expect("write");
    let checked = Command::new(&python)
        .arg(repo("tests/python/validate_sbom.py"))
        .arg(&file)
        .output()
        .expect("run the validator");
    let out = String::from_utf8_lossy(&checked.stdout);
    assert!(checked.status.success() && out.starts_with("OK"), "{out}");

    // The validator is not a rubber stamp: an unknown member fails it.
    let mut broken: Value =
        serde_json::from_str(&phr_gateway::supply_chain::sbom::document().expect("sbom"))
            .expect("json");
    broken["components"][0]["maintainer"] = Value::String("someone".into());
    std::fs::write(&file, broken.to_string()).expect("write");
    let refused = Command::new(&python)
        .arg(repo("tests/python/validate_sbom.py"))
        .arg(&file)
        .output()
        .expect("run the validator");
    assert!(!refused.status.success());
}

#[tokio::test]
async fn operators_read_the_supply_chain_and_the_sbom() {
    let app = spawn_app(Engine::Sqlite).await;
    let operator = app.sign_in(AccountRole::Operator, "op", None).await;
    let patient = app
        .sign_in(AccountRole::Patient, "hanako", Some("p-sc"))
        .await;
    let list = app
        .client
        .get(app.url("/operator/supply-chain"))
        .bearer_auth(&operator)
        .send()
        .await
        .expect("list");
    assert_eq!(list.status(), StatusCode::OK);
    let list: Value = list.json().await.expect("json");
    let entries = list.as_array().expect("entries");
    assert!(entries
        .iter()
        .any(|e| e["name"].as_str().is_some_and(|n| n.contains("PostgreSQL"))));
    assert!(entries
        .iter()
        .all(|e| e["data_touched"].is_string() && e["contract"].is_string()));
    let sbom = app
        .client
        .get(app.url("/operator/sbom"))
        .bearer_auth(&operator)
        .send()
        .await
        .expect("sbom");
    assert_eq!(
        sbom.headers()["content-type"],
        "application/vnd.cyclonedx+json"
    );
    let sbom: Value = sbom.json().await.expect("json");
    assert_eq!(sbom["bomFormat"], "CycloneDX");
    let disclosure = app
        .client
        .get(app.url("/operator/disclosure"))
        .bearer_auth(&operator)
        .send()
        .await
        .expect("disclosure")
        .text()
        .await
        .expect("html");
    assert!(disclosure.contains("サービス仕様適合開示書"));
    assert!(
        disclosure.contains("not ransomware-resilient"),
        "the local sink is named as such"
    );
    for path in [
        "/operator/supply-chain",
        "/operator/sbom",
        "/operator/disclosure",
    ] {
        let refused = app
            .client
            .get(app.url(path))
            .bearer_auth(&patient)
            .send()
            .await
            .expect("request");
        assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    }
    app.stop().await;
}

#[tokio::test]
async fn a_bad_supply_chain_file_stops_start_up_with_the_reason() {
    let env = TestEnv::new(Engine::Sqlite).await;
    let file = env.data_dir().join("supply-chain.toml");
    std::fs::write(
        &file,
        "[[component]]\nname = \"Cloud\"\nrole = \"hosting\"\ndata_touched = \"all\"\ncontract = \"c\"\nlast_review = \"last year\"\n",
    )
    .expect("write");
    let mut config = env.config();
    config.supply_chain_file = Some(file);
    let error = build_error(config).await;
    assert!(error.contains("supply_chain_file"), "{error}");
    assert!(error.contains("not YYYY-MM-DD"), "{error}");
}
