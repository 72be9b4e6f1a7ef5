//! OAuth pieces more than one source (and simulator) needs: `private_key_jwt` client
//! assertions (RFC 7523) with the gateway's ES384 key, their verification on the server
//! side, the PKCE S256 check, and a constant-time comparison for `state`.

use std::collections::HashMap;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use p384::elliptic_curve::zeroize::Zeroizing;
use p384::pkcs8::{DecodePrivateKey, EncodePrivateKey, LineEnding};
use rand::RngCore;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::error::SourceError;

/// `client_assertion_type` for `private_key_jwt` (RFC 7523).
pub const JWT_BEARER_ASSERTION_TYPE: &str =
    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// SMART Backend Services caps assertion lifetime at five minutes; we stay under it.
pub const CLIENT_ASSERTION_LIFETIME: Duration = Duration::from_secs(240);

/// The gateway's ES384 key pair for `private_key_jwt` (SMART Backend Services, the portal).
#[derive(Clone)]
pub struct BackendKey {
    secret: p384::SecretKey,
    kid: String,
}

impl std::fmt::Debug for BackendKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl BackendKey {
    pub fn generate_es384() -> Self {
        Self::from_secret(p384::SecretKey::random(&mut rand::rngs::OsRng))
    }

    /// Reads a PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`) P-384 key.
    pub fn from_pem(pem: &str) -> Result<Self, SourceError> {
        let secret = p384::SecretKey::from_pkcs8_pem(pem)
            .map_err(|error| SourceError::Config(format!("backend key PEM: {error}")))?;
        Ok(Self::from_secret(secret))
    }

    /// PKCS#8 PEM of the private key; zeroised when dropped.
    pub fn to_pem(&self) -> Result<Zeroizing<String>, SourceError> {
        self.secret
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|error| SourceError::Config(format!("backend key PEM: {error}")))
    }

    /// RFC 7638 JWK thumbprint: stable for the key, so the JWKS entry and the JWT `kid`
    /// always agree.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public JWK to publish in the gateway's JWKS.
    pub fn public_jwk(&self) -> Value {
        let (x, y) = public_coordinates(&self.secret);
        json!({
            "kty": "EC",
            "crv": "P-384",
            "x": x,
            "y": y,
            "kid": self.kid,
            "alg": "ES384",
            "use": "sig",
            "key_ops": ["verify"],
        })
    }

    fn from_secret(secret: p384::SecretKey) -> Self {
        let (x, y) = public_coordinates(&secret);
        // Members in lexicographic order, no whitespace, as RFC 7638 §3.2 requires.
        let canonical = format!(r#"{{"crv":"P-384","kty":"EC","x":"{x}","y":"{y}"}}"#);
        let kid = URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()));
        BackendKey { secret, kid }
    }

    /// A compact ES384 JWS over `claims`, with this key's `kid` (client assertions, and the
    /// gateway's ID tokens).
    pub fn sign(&self, claims: &Value) -> Result<String, SourceError> {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES384);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding_key()?)
            .map_err(|error| SourceError::Config(format!("signing a JWT: {error}")))
    }

    fn encoding_key(&self) -> Result<jsonwebtoken::EncodingKey, SourceError> {
        let der = self
            .secret
            .to_pkcs8_der()
            .map_err(|error| SourceError::Config(format!("backend key DER: {error}")))?;
        Ok(jsonwebtoken::EncodingKey::from_ec_der(der.as_bytes()))
    }
}

fn public_coordinates(secret: &p384::SecretKey) -> (String, String) {
    let jwk = serde_json::to_value(secret.public_key().to_jwk()).unwrap_or(Value::Null);
    let coordinate = |name: &str| {
        jwk.get(name)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    (coordinate("x"), coordinate("y"))
}

/// A signed client assertion: iss = sub = client_id, aud = token URL, a fresh random `jti`,
/// `exp` = now + `lifetime`. Use `CLIENT_ASSERTION_LIFETIME` unless testing a server.
pub fn client_assertion(
    key: &BackendKey,
    client_id: &str,
    token_url: &str,
    lifetime: Duration,
) -> Result<String, SourceError> {
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let mut jti = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut jti);
    let claims = json!({
        "iss": client_id,
        "sub": client_id,
        "aud": token_url,
        "iat": now,
        "exp": now + lifetime.as_secs() as i64,
        "jti": URL_SAFE_NO_PAD.encode(jti),
    });
    key.sign(&claims)
}

/// An assertion may not claim to live longer than this (SMART Backend Services; the
/// self-information API follows the same rule).
pub const MAX_CLIENT_ASSERTION_LIFETIME: Duration = Duration::from_secs(300);

/// A client registered with an authorisation server for `private_key_jwt`.
#[derive(Debug, Clone, PartialEq)]
pub struct RegisteredClientKey<'a> {
    pub client_id: &'a str,
    /// Its public JWK (ES384 P-384 or RS384 RSA), e.g. `BackendKey::public_jwk()`.
    pub public_jwk: &'a Value,
    /// The token URL the assertion's `aud` must name.
    pub token_url: &'a str,
}

/// Server side of `private_key_jwt`: checks a form's `client_assertion` against the
/// registered key: signature, iss = sub = client_id, aud = the token URL, `exp` at most five
/// minutes ahead, and a `jti` not seen before (`used_jtis` maps jti → exp, pruned here).
/// Returns the client id, or why the assertion is refused.
pub fn verify_client_assertion(
    registration: &RegisteredClientKey<'_>,
    assertion_type: Option<&str>,
    assertion: Option<&str>,
    used_jtis: &mut HashMap<String, i64>,
) -> Result<String, String> {
    if assertion_type != Some(JWT_BEARER_ASSERTION_TYPE) {
        return Err("client_assertion_type must be jwt-bearer".into());
    }
    let assertion = assertion.ok_or("client_assertion missing")?;
    let header = jsonwebtoken::decode_header(assertion)
        .map_err(|error| format!("assertion header: {error}"))?;
    if !matches!(
        header.alg,
        jsonwebtoken::Algorithm::ES384 | jsonwebtoken::Algorithm::RS384
    ) {
        return Err(format!("{:?} is not accepted (ES384, RS384)", header.alg));
    }
    let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(registration.public_jwk.clone())
        .map_err(|error| format!("registered JWK unusable: {error}"))?;
    if let (Some(sent), Some(registered)) = (&header.kid, &jwk.common.key_id) {
        if sent != registered {
            return Err("kid does not match the registered key".into());
        }
    }
    let key = jsonwebtoken::DecodingKey::from_jwk(&jwk)
        .map_err(|error| format!("registered JWK unusable: {error}"))?;
    let mut validation = jsonwebtoken::Validation::new(header.alg);
    validation.set_audience(&[registration.token_url]);
    validation.set_issuer(&[registration.client_id]);
    validation.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
    validation.leeway = 5;
    let claims = jsonwebtoken::decode::<Value>(assertion, &key, &validation)
        .map_err(|error| format!("assertion rejected: {error}"))?
        .claims;
    if claims.get("sub").and_then(Value::as_str) != Some(registration.client_id) {
        return Err("sub must equal the client id".into());
    }
    let expires = claims.get("exp").and_then(Value::as_i64).unwrap_or(0);
    let now = OffsetDateTime::now_utc().unix_timestamp();
    if expires > now + MAX_CLIENT_ASSERTION_LIFETIME.as_secs() as i64 {
        return Err("exp is more than five minutes ahead".into());
    }
    let jti = claims
        .get("jti")
        .and_then(Value::as_str)
        .filter(|jti| !jti.is_empty())
        .ok_or("jti missing")?;
    used_jtis.retain(|_, expiry| *expiry >= now);
    if used_jtis.contains_key(jti) {
        return Err("jti already used".into());
    }
    used_jtis.insert(jti.to_string(), expires);
    Ok(registration.client_id.to_string())
}

/// RFC 7636: whether `verifier` answers `challenge` under `method` (`S256` or `plain`).
pub fn pkce_matches(method: &str, challenge: &str, verifier: &str) -> bool {
    if !(43..=128).contains(&verifier.len()) {
        return false;
    }
    match method {
        "S256" => URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes())) == challenge,
        "plain" => verifier == challenge,
        _ => false,
    }
}

/// A fresh PKCE S256 pair `(verifier, challenge)`: 32 random bytes as the verifier.
pub fn pkce_s256_pair() -> (String, String) {
    let verifier = random_url_token();
    let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
    (verifier, challenge)
}

/// 32 random bytes, base64url: for `state`, codes and tokens.
pub fn random_url_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Compares without an early exit, so the time taken says nothing about the value.
pub(crate) fn constant_time_eq(left: &str, right: &str) -> bool {
    let (left, right) = (left.as_bytes(), right.as_bytes());
    left.len() == right.len()
        && left
            .iter()
            .zip(right)
            .fold(0u8, |acc, (l, r)| acc | (l ^ r))
            == 0
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn backend_key_pem_round_trip_keeps_kid() {
        let key = BackendKey::generate_es384();
        let pem = key.to_pem().expect("pem");
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        let again = BackendKey::from_pem(&pem).expect("from pem");
        assert_eq!(again.kid(), key.kid());
        let jwk = key.public_jwk();
        assert_eq!(jwk["kty"], "EC");
        assert_eq!(jwk["crv"], "P-384");
        assert_eq!(jwk["kid"], key.kid());
        assert!(
            jwk.get("d").is_none(),
            "public JWK must not carry the secret"
        );
        assert!(!format!("{key:?}").contains("secret"));
    }

    #[test]
    fn assertion_round_trip_and_replay() {
        let key = BackendKey::generate_es384();
        let jwk = key.public_jwk();
        let registration = RegisteredClientKey {
            client_id: "client-a",
            public_jwk: &jwk,
            token_url: "https://as.example/token",
        };
        let mut used = HashMap::new();
        let assertion = client_assertion(
            &key,
            "client-a",
            "https://as.example/token",
            CLIENT_ASSERTION_LIFETIME,
        )
        .expect("sign");
        let verify = |assertion: &str, used: &mut HashMap<String, i64>| {
            verify_client_assertion(
                &registration,
                Some(JWT_BEARER_ASSERTION_TYPE),
                Some(assertion),
                used,
            )
        };
        assert_eq!(verify(&assertion, &mut used).as_deref(), Ok("client-a"));
        assert!(verify(&assertion, &mut used).is_err(), "replayed jti");
        let other_audience = client_assertion(
            &key,
            "client-a",
            "https://other.example/token",
            CLIENT_ASSERTION_LIFETIME,
        )
        .expect("sign");
        assert!(verify(&other_audience, &mut used).is_err());
        let too_long = client_assertion(
            &key,
            "client-a",
            "https://as.example/token",
            Duration::from_secs(900),
        )
        .expect("sign");
        assert!(verify(&too_long, &mut used).is_err());
        let stranger = BackendKey::generate_es384();
        let forged = client_assertion(
            &stranger,
            "client-a",
            "https://as.example/token",
            CLIENT_ASSERTION_LIFETIME,
        )
        .expect("sign");
        assert!(verify(&forged, &mut used).is_err());
    }

    #[test]
    fn pkce_and_state_comparison() {
        let (verifier, challenge) = pkce_s256_pair();
        assert!(pkce_matches("S256", &challenge, &verifier));
        assert!(!pkce_matches("S256", &challenge, &random_url_token()));
        assert!(constant_time_eq("abc", "abc"));
        assert!(!constant_time_eq("abc", "abd"));
        assert!(!constant_time_eq("abc", "abcd"));
    }
}
