//! A CycloneDX 1.5 SBOM of the gateway, made from `Cargo.lock` (parsed with RustSec's
//! `cargo-lock`): every locked package with its purl and the registry's SHA-256, the
//! workspace crates as the described application, and the dependency graph. Deterministic
//! (no timestamp, a serial number derived from the lock file), so the committed copy can be
//! compared with a fresh one and CI fails when a dependency changes without regenerating it.

use std::collections::BTreeMap;

use cargo_lock::{Lockfile, Package};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The lock file this binary was built from.
pub const CARGO_LOCK: &str = include_str!("../../../Cargo.lock");

/// The SBOM for a lock file. `application` names the root (the `phr-gateway` package).
pub fn from_lockfile(lock: &str, application: &str) -> Result<Value> {
    let lockfile: Lockfile = lock
        .parse()
        .map_err(|e| Error::Invalid(format!("Cargo.lock does not parse: {e}")))?;
    // Names alone are ambiguous when two versions are locked; references carry both.
    let mut versions: BTreeMap<&str, Vec<&Package>> = BTreeMap::new();
    for package in &lockfile.packages {
        versions
            .entry(package.name.as_str())
            .or_default()
            .push(package);
    }
    let mut components = Vec::new();
    let mut dependencies = Vec::new();
    let mut root = None;
    for package in &lockfile.packages {
        let reference = purl(package);
        let local = package.source.is_none();
        let mut component = json!({
            "type": if local { "application" } else { "library" },
            "bom-ref": reference,
            "name": package.name.as_str(),
            "version": package.version.to_string(),
            "purl": reference,
        });
        if let Some(checksum) = &package.checksum {
            component["hashes"] = json!([{"alg": "SHA-256", "content": checksum.to_string()}]);
        }
        if let Some(source) = &package.source {
            component["externalReferences"] =
                json!([{"type": "distribution", "url": source.url().to_string()}]);
        }
        let depends: Vec<String> = package
            .dependencies
            .iter()
            .filter_map(|dep| {
                let candidates = versions.get(dep.name.as_str())?;
                candidates
                    .iter()
                    .find(|p| p.version == dep.version)
                    .or(candidates.first())
                    .map(|p| purl(p))
            })
            .collect();
        dependencies.push(json!({"ref": reference, "dependsOn": depends}));
        if package.name.as_str() == application {
            root = Some(component);
        } else {
            components.push(component);
        }
    }
    let root = root.ok_or_else(|| Error::Invalid(format!("{application} is not in Cargo.lock")))?;
    Ok(json!({
        "bomFormat": "CycloneDX",
        "specVersion": "1.5",
        "serialNumber": serial_number(lock),
        "version": 1,
        "metadata": {
            "component": root,
            "tools": {"components": [{"type": "application", "name": "phr-gateway sbom"}]}
        },
        "components": components,
        "dependencies": dependencies,
    }))
}

/// The SBOM of this build, as pretty JSON with a final newline.
pub fn document() -> Result<String> {
    let sbom = from_lockfile(CARGO_LOCK, "phr-gateway")?;
    let mut text =
        serde_json::to_string_pretty(&sbom).map_err(|e| Error::Invalid(format!("SBOM: {e}")))?;
    text.push('\n');
    Ok(text)
}

fn purl(package: &Package) -> String {
    format!("pkg:cargo/{}@{}", package.name.as_str(), package.version)
}

/// `urn:uuid:` of a version-4-shaped UUID taken from the lock file's SHA-256: the same lock
/// gives the same serial number.
fn serial_number(lock: &str) -> String {
    let digest = Sha256::digest(lock.as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    format!("urn:uuid:{}", uuid::Uuid::from_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCK: &str = r#"
version = 4

[[package]]
name = "app"
version = "0.1.0"
dependencies = ["serde", "rand 0.8.5"]

[[package]]
name = "rand"
version = "0.8.5"
source = "registry+https://github.com/rust-lang/crates.io-index"
checksum = "34af8d1a0e25924bc5b7c43c079c942339d8f0a8b57c39049bef581b46327404"

[[package]]
name = "rand"
version = "0.9.0"
source = "registry+https://github.com/rust-lang/crates.io-index"
checksum = "3779b94aeb87e8bd4e834cee3650289ee9e0d5677f976ecdb6d219e5f4f6cd94"

[[package]]
name = "serde"
version = "1.0.200"
source = "registry+https://github.com/rust-lang/crates.io-index"
checksum = "ddc6f9cc94d67c0e21aaf7eda3a010fd3af78ebf6e096aa6e2e13c79749cce4f"
"#;

    #[test]
    fn components_purls_hashes_and_the_graph() {
        let sbom = from_lockfile(LOCK, "app").unwrap();
        assert_eq!(sbom["metadata"]["component"]["name"], "app");
        assert_eq!(sbom["metadata"]["component"]["type"], "application");
        let components = sbom["components"].as_array().unwrap();
        assert_eq!(components.len(), 3);
        let rand = components
            .iter()
            .find(|c| c["purl"] == "pkg:cargo/rand@0.8.5")
            .unwrap();
        assert_eq!(rand["hashes"][0]["alg"], "SHA-256");
        assert_eq!(
            rand["hashes"][0]["content"],
            "34af8d1a0e25924bc5b7c43c079c942339d8f0a8b57c39049bef581b46327404"
        );
        let app = sbom["dependencies"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["ref"] == "pkg:cargo/app@0.1.0")
            .unwrap();
        assert_eq!(
            app["dependsOn"],
            json!(["pkg:cargo/serde@1.0.200", "pkg:cargo/rand@0.8.5"])
        );
    }

    #[test]
    fn the_same_lock_gives_the_same_document_and_a_change_another() {
        let a = from_lockfile(LOCK, "app").unwrap();
        assert_eq!(a, from_lockfile(LOCK, "app").unwrap());
        let changed = LOCK.replace("1.0.200", "1.0.201");
        let b = from_lockfile(&changed, "app").unwrap();
        assert_ne!(a["serialNumber"], b["serialNumber"]);
        assert!(a["serialNumber"].as_str().unwrap().starts_with("urn:uuid:"));
    }

    #[test]
    fn bad_input_is_an_error() {
        assert!(from_lockfile("not toml [[", "app").is_err());
        assert!(from_lockfile(LOCK, "missing").is_err());
    }
}
