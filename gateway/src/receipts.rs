//! Signed receipts: every pull instruction (and, later, every consent) change gives the
//! patient a JWS they can keep and anyone can check against the gateway's JWKS.
//! EdDSA (Ed25519) via jsonwebtoken; the key is generated at first start with mode 0600.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ed25519_dalek::pkcs8::EncodePrivateKey;
use ed25519_dalek::SigningKey;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

pub struct ReceiptSigner {
    key: EncodingKey,
    kid: String,
    public_x: String,
    issuer: String,
}

impl ReceiptSigner {
    pub fn new(signing_key: &SigningKey, issuer: &str) -> Result<Self> {
        let der = signing_key
            .to_pkcs8_der()
            .map_err(|_| Error::Crypto("cannot encode the receipt signing key"))?;
        let public_x = URL_SAFE_NO_PAD.encode(signing_key.verifying_key().as_bytes());
        Ok(ReceiptSigner {
            key: EncodingKey::from_ed_der(der.as_bytes()),
            kid: jwk_thumbprint(&public_x),
            public_x,
            issuer: issuer.to_string(),
        })
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// Compact JWS over `claims`, with `kid` naming the key in the JWKS.
    pub fn sign<T: Serialize>(&self, claims: &T) -> Result<String> {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        header.typ = Some("JWT".into());
        jsonwebtoken::encode(&header, claims, &self.key)
            .map_err(|_| Error::Crypto("receipt signing failed"))
    }

    /// The public key as a JWK, for the gateway's JWKS.
    pub fn public_jwk(&self) -> Value {
        json!({
            "kty": "OKP",
            "crv": "Ed25519",
            "x": self.public_x,
            "kid": self.kid,
            "alg": "EdDSA",
            "use": "sig"
        })
    }
}

/// RFC 7638 thumbprint of an Ed25519 public key: a stable `kid`.
fn jwk_thumbprint(x: &str) -> String {
    let canonical = format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}"#);
    URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation};

    #[test]
    fn receipts_verify_with_the_published_jwk_only() {
        let signer =
            ReceiptSigner::new(&SigningKey::from_bytes(&[3u8; 32]), "https://gw.example").unwrap();
        let token = signer
            .sign(&json!({"iss": "https://gw.example", "event": "given"}))
            .unwrap();
        let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(signer.public_jwk()).unwrap();
        let key = DecodingKey::from_jwk(&jwk).unwrap();
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        let data = jsonwebtoken::decode::<Value>(&token, &key, &validation).unwrap();
        assert_eq!(data.claims["event"], "given");
        assert_eq!(
            data.header.kid.as_deref(),
            Some(signer.public_jwk()["kid"].as_str().unwrap())
        );

        let other = ReceiptSigner::new(&SigningKey::from_bytes(&[4u8; 32]), "x").unwrap();
        let other_jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(other.public_jwk()).unwrap();
        let other_key = DecodingKey::from_jwk(&other_jwk).unwrap();
        assert!(jsonwebtoken::decode::<Value>(&token, &other_key, &validation).is_err());
    }

    #[test]
    fn thumbprint_matches_rfc_8037_example() {
        // RFC 8037 appendix A.3: the thumbprint of the example Ed25519 key.
        assert_eq!(
            jwk_thumbprint("11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"),
            "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
        );
    }
}
