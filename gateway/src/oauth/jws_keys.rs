//! The keys that sign the gateway's JWS tokens (ID tokens), rotated with an overlap: after
//! `phr-gateway keys rotate-jws` the new key signs from then on, while the old one stays in
//! the JWKS for `keys.jws_overlap_secs` (at least the longest token lifetime) so tokens it
//! signed still verify; then it leaves the JWKS and its file is deleted.
//!
//! Files: the signing key at `keys.id_token_signing_key_file`, and each key still in its
//! overlap beside it as `<file>.previous-<unix seconds when it retires>` (both 0600). A
//! running gateway picks a rotation up on SIGHUP (or `RunningGateway::reload_keys`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use phr_adapters::fhir_r4::BackendKey;
use serde_json::Value;

use crate::crypto::key_file;
use crate::error::{Error, Result};

/// A key rotated out, published until `retires_at`.
struct Previous {
    key: Arc<BackendKey>,
    retires_at: u64,
    path: PathBuf,
}

struct Keys {
    current: Arc<BackendKey>,
    previous: Vec<Previous>,
}

/// The signing key and the keys still in their overlap.
pub struct JwsKeyring {
    path: PathBuf,
    keys: RwLock<Keys>,
}

/// What a rotation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwsRotated {
    pub old_kid: String,
    pub new_kid: String,
    /// Unix seconds when the old key leaves the JWKS.
    pub retires_at: u64,
}

fn previous_prefix(path: &Path) -> Option<String> {
    path.file_name()
        .and_then(|n| n.to_str())
        .map(|n| format!("{n}.previous-"))
}

fn load_key(path: &Path) -> Result<BackendKey> {
    key_file::check_private(path)?;
    let pem =
        zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?);
    BackendKey::from_pem(&pem).map_err(|e| Error::KeyFile {
        path: path.into(),
        reason: e.to_string(),
    })
}

fn write_key(path: &Path, key: &BackendKey) -> Result<()> {
    let pem = key.to_pem().map_err(|e| Error::KeyFile {
        path: path.into(),
        reason: e.to_string(),
    })?;
    key_file::write_private(path, pem.as_bytes())
}

/// Reads the keys at `path` (generating the signing key on first start; `true` then) and
/// deletes the previous keys whose overlap ended by `now`. Returns the kids it retired too.
fn load_keys(path: &Path, now: u64) -> Result<(Keys, bool, Vec<String>)> {
    let (current, created) = if path.exists() {
        (load_key(path)?, false)
    } else {
        let key = BackendKey::generate_es384();
        write_key(path, &key)?;
        (key, true)
    };
    let mut previous = Vec::new();
    let mut retired = Vec::new();
    if let (Some(dir), Some(prefix)) = (path.parent(), previous_prefix(path)) {
        for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
            let entry = entry.map_err(|e| Error::io(dir, e))?;
            let Some(retires_at) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.strip_prefix(&prefix))
                .and_then(|s| s.parse::<u64>().ok())
            else {
                continue;
            };
            let key = load_key(&entry.path())?;
            if retires_at <= now {
                std::fs::remove_file(entry.path()).map_err(|e| Error::io(entry.path(), e))?;
                retired.push(key.kid().to_string());
                continue;
            }
            previous.push(Previous {
                key: Arc::new(key),
                retires_at,
                path: entry.path(),
            });
        }
    }
    previous.sort_by_key(|p| std::cmp::Reverse(p.retires_at));
    Ok((
        Keys {
            current: Arc::new(current),
            previous,
        },
        created,
        retired,
    ))
}

/// Makes a new signing key at `path`; the old one moves to `<path>.previous-<now+overlap>`.
pub fn rotate(path: &Path, overlap_secs: u64, now: u64) -> Result<JwsRotated> {
    let old = load_key(path)?;
    let retires_at = now + overlap_secs;
    let mut previous = path.as_os_str().to_os_string();
    previous.push(format!(".previous-{retires_at}"));
    let previous = PathBuf::from(previous);
    // The new key is written beside first, so a crash leaves either the old key in place
    // or both keys on disk, never neither.
    let mut next = path.as_os_str().to_os_string();
    next.push(".next");
    let next = PathBuf::from(next);
    let _ = std::fs::remove_file(&next);
    let new = BackendKey::generate_es384();
    write_key(&next, &new)?;
    std::fs::rename(path, &previous).map_err(|e| Error::io(path, e))?;
    std::fs::rename(&next, path).map_err(|e| Error::io(&next, e))?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io(dir, e))?;
    }
    Ok(JwsRotated {
        old_kid: old.kid().to_string(),
        new_kid: new.kid().to_string(),
        retires_at,
    })
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl JwsKeyring {
    /// Loads (or on first start generates) the keys; `true` when the signing key was created.
    pub fn open(path: &Path) -> Result<(Self, bool)> {
        let (keys, created, _) = load_keys(path, now_secs())?;
        Ok((
            JwsKeyring {
                path: path.to_path_buf(),
                keys: RwLock::new(keys),
            },
            created,
        ))
    }

    /// Re-reads the key files (after a rotation by the CLI) as of `now`; returns the kids
    /// whose overlap ended and were deleted.
    pub fn reload(&self, now: u64) -> Result<Vec<String>> {
        let (keys, _, retired) = load_keys(&self.path, now)?;
        if let Ok(mut held) = self.keys.write() {
            *held = keys;
        }
        Ok(retired)
    }

    fn current(&self) -> Result<Arc<BackendKey>> {
        self.keys
            .read()
            .map(|k| k.current.clone())
            .map_err(|_| Error::Crypto("JWS keyring poisoned"))
    }

    /// The kid new tokens are signed with.
    pub fn current_kid(&self) -> Result<String> {
        Ok(self.current()?.kid().to_string())
    }

    /// A compact ES384 JWS over `claims` with the current key.
    pub fn sign(&self, claims: &Value) -> Result<String> {
        self.current()?
            .sign(claims)
            .map_err(|e| Error::Invalid(format!("JWS: {e}")))
    }

    /// The public JWKs to publish at `now`: the signing key, then each key still in its
    /// overlap.
    pub fn public_jwks(&self, now: u64) -> Vec<Value> {
        let Ok(keys) = self.keys.read() else {
            return Vec::new();
        };
        std::iter::once(keys.current.public_jwk())
            .chain(
                keys.previous
                    .iter()
                    .filter(|p| p.retires_at > now)
                    .map(|p| p.key.public_jwk()),
            )
            .collect()
    }

    /// Where each key still in its overlap is kept (for the alerts' key-age checks).
    pub fn previous_paths(&self) -> Vec<PathBuf> {
        self.keys
            .read()
            .map(|k| k.previous.iter().map(|p| p.path.clone()).collect())
            .unwrap_or_default()
    }
}

/// Verifies a compact ES384 JWS against a published JWKS, as a relying party does: the
/// header's kid must name a key in the set. Returns the claims. (`aud`/`exp` are the
/// relying party's to check; signature and key only here.)
pub fn verify_with_jwks(token: &str, jwks: &[Value]) -> std::result::Result<Value, String> {
    let header = jsonwebtoken::decode_header(token).map_err(|e| e.to_string())?;
    let kid = header.kid.ok_or("the token names no kid")?;
    let jwk = jwks
        .iter()
        .find(|k| k.get("kid").and_then(Value::as_str) == Some(kid.as_str()))
        .ok_or_else(|| format!("no key {kid} in the JWKS"))?;
    let jwk: Jwk = serde_json::from_value(jwk.clone()).map_err(|e| e.to_string())?;
    let key = DecodingKey::from_jwk(&jwk).map_err(|e| e.to_string())?;
    let mut validation = Validation::new(Algorithm::ES384);
    validation.validate_exp = false;
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    jsonwebtoken::decode::<Value>(token, &key, &validation)
        .map(|data| data.claims)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn old_tokens_verify_during_the_overlap_and_not_after() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/id.pem");
        let (ring, created) = JwsKeyring::open(&path).unwrap();
        assert!(created);
        let before = ring.sign(&json!({"sub": "p1"})).unwrap();
        let old_kid = ring.current_kid().unwrap();

        let rotated = rotate(&path, 600, 1_000).unwrap();
        assert_eq!(rotated.old_kid, old_kid);
        assert_eq!(rotated.retires_at, 1_600);
        assert!(ring.reload(1_000).unwrap().is_empty());
        assert_eq!(ring.current_kid().unwrap(), rotated.new_kid);
        let after = ring.sign(&json!({"sub": "p2"})).unwrap();
        let jwks = ring.public_jwks(1_599);
        assert_eq!(jwks.len(), 2);
        assert_eq!(verify_with_jwks(&before, &jwks).unwrap()["sub"], "p1");
        assert_eq!(verify_with_jwks(&after, &jwks).unwrap()["sub"], "p2");

        // The overlap ends: gone from the JWKS at once, and its file at the next reload.
        let jwks = ring.public_jwks(1_600);
        assert_eq!(jwks.len(), 1);
        assert!(verify_with_jwks(&before, &jwks)
            .unwrap_err()
            .contains(&old_kid));
        assert_eq!(ring.reload(1_600).unwrap(), vec![old_kid]);
        assert!(ring.previous_paths().is_empty());
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1
        );
    }

    #[test]
    fn a_tampered_token_or_unknown_kid_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (ring, _) = JwsKeyring::open(&dir.path().join("id.pem")).unwrap();
        let token = ring.sign(&json!({"sub": "p1"})).unwrap();
        let jwks = ring.public_jwks(0);
        let mut parts: Vec<&str> = token.split('.').collect();
        let other = base64::Engine::encode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            br#"{"sub":"p2"}"#,
        );
        parts[1] = &other;
        assert!(verify_with_jwks(&parts.join("."), &jwks).is_err());
        let (stranger, _) = JwsKeyring::open(&dir.path().join("other.pem")).unwrap();
        assert!(verify_with_jwks(&token, &stranger.public_jwks(0)).is_err());
    }
}
