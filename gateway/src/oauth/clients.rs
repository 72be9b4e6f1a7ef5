//! The registry of apps (recipients) an operator has registered: redirect URIs matched
//! exactly, a JWK Set for `private_key_jwt` or a generated secret kept only as an Argon2id
//! hash, the recipient organisation, and its declared compliance with the PHR basic
//! guideline (PHRサービス事業者に関する基本的指針) — without which nothing is registered.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::Row;
use utoipa::ToSchema;

use super::random_token;
use crate::audit::{self, Agent, AuditEvent, EventKind};
use crate::error::{Error, Result};
use crate::store::{now_millis, Database};

/// The organisation that receives the data through the app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Recipient {
    pub name: String,
    /// e.g. a corporate number (法人番号) or another registry identifier.
    pub identifier: String,
}

/// The recipient's declaration that it complies with the PHR basic guideline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ComplianceDeclaration {
    /// Must be `true`: a client without declared compliance cannot be registered.
    pub declared: bool,
    /// The declaration as the recipient made it (or where it is published).
    pub statement: String,
    /// When it was declared (`YYYY-MM-DD`).
    pub declared_on: String,
}

/// How a client authenticates at the token endpoint.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientAuth {
    /// `private_key_jwt` with one of these public keys (RS384 or ES384).
    PrivateKeyJwt { jwks: JwkSet },
    /// `client_secret_basic`; only the Argon2id hash of the secret is kept.
    ClientSecret { secret_hash: String },
}

impl ClientAuth {
    pub fn method(&self) -> &'static str {
        match self {
            ClientAuth::PrivateKeyJwt { .. } => "private_key_jwt",
            ClientAuth::ClientSecret { .. } => "client_secret_basic",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Client {
    pub id: String,
    pub display_name: String,
    pub redirect_uris: Vec<String>,
    pub auth: ClientAuth,
    pub recipient: Recipient,
    pub compliance: ComplianceDeclaration,
    pub created_at: i64,
}

impl Client {
    /// Exact string comparison, as OAuth 2.1 and SMART require.
    pub fn has_redirect_uri(&self, uri: &str) -> bool {
        self.redirect_uris
            .iter()
            .any(|registered| registered == uri)
    }

    /// Whether `secret` is this client's secret (always false for key-based clients).
    pub fn verify_secret(&self, secret: &str) -> bool {
        let ClientAuth::ClientSecret { secret_hash } = &self.auth else {
            return false;
        };
        PasswordHash::new(secret_hash)
            .map(|parsed| {
                Argon2::default()
                    .verify_password(secret.as_bytes(), &parsed)
                    .is_ok()
            })
            .unwrap_or(false)
    }
}

/// What an operator submits; `jwks` present means `private_key_jwt`, absent means a secret
/// is generated.
#[derive(Debug, Clone)]
pub struct NewClient {
    pub display_name: String,
    pub redirect_uris: Vec<String>,
    pub jwks: Option<Value>,
    pub recipient: Recipient,
    pub compliance: ComplianceDeclaration,
}

/// Most keys one client may register (room for a rotation or two).
const MAX_KEYS: usize = 8;
const MAX_REDIRECT_URIS: usize = 10;
const MAX_TEXT: usize = 500;

/// Registers a client, audited in the same transaction. Returns it and, for a secret-based
/// client, the secret — shown this once and never again.
pub async fn register(
    db: &Database,
    agent: &Agent,
    new: NewClient,
) -> Result<(Client, Option<String>)> {
    let display_name = required_text("display_name", &new.display_name)?;
    let recipient = Recipient {
        name: required_text("recipient.name", &new.recipient.name)?,
        identifier: required_text("recipient.identifier", &new.recipient.identifier)?,
    };
    let compliance = validate_compliance(&new.compliance)?;
    if new.redirect_uris.len() > MAX_REDIRECT_URIS {
        return Err(Error::Invalid(format!(
            "at most {MAX_REDIRECT_URIS} redirect URIs"
        )));
    }
    for uri in &new.redirect_uris {
        validate_redirect_uri(uri)
            .map_err(|reason| Error::Invalid(format!("{uri:?}: {reason}")))?;
    }
    let (auth, secret) = match &new.jwks {
        Some(jwks) => (
            ClientAuth::PrivateKeyJwt {
                jwks: validate_jwks(jwks)
                    .map_err(|reason| Error::Invalid(format!("jwks: {reason}")))?,
            },
            None,
        ),
        None => {
            let secret = random_token();
            (
                ClientAuth::ClientSecret {
                    secret_hash: hash_secret(&secret)?,
                },
                Some(secret),
            )
        }
    };
    let client = Client {
        id: uuid::Uuid::new_v4().to_string(),
        display_name,
        redirect_uris: new.redirect_uris.clone(),
        auth,
        recipient,
        compliance,
        created_at: now_millis(),
    };
    let (jwks, secret_hash) = match &client.auth {
        ClientAuth::PrivateKeyJwt { jwks } => (
            Some(serde_json::to_string(jwks).map_err(|e| Error::Invalid(e.to_string()))?),
            None,
        ),
        ClientAuth::ClientSecret { secret_hash } => (None, Some(secret_hash.clone())),
    };
    let registered_by = match &agent.actor {
        audit::Actor::Account { id, .. } => id.clone(),
        _ => "system".to_string(),
    };
    let mut tx = db.begin().await?;
    sqlx::query(
        "INSERT INTO oauth_clients (id, display_name, redirect_uris, jwks, secret_hash,
             recipient_name, recipient_identifier, compliance_statement, compliance_declared_on,
             registered_by, created_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
    )
    .bind(&client.id)
    .bind(&client.display_name)
    .bind(serde_json::to_string(&client.redirect_uris).unwrap_or_else(|_| "[]".into()))
    .bind(jwks)
    .bind(secret_hash)
    .bind(&client.recipient.name)
    .bind(&client.recipient.identifier)
    .bind(&client.compliance.statement)
    .bind(&client.compliance.declared_on)
    .bind(registered_by)
    .bind(client.created_at)
    .execute(&mut *tx)
    .await?;
    let event = AuditEvent::new(EventKind::ClientRegistered, agent.clone()).detail(format!(
        "client {} ({}) registered for recipient {}",
        client.id,
        client.auth.method(),
        client.recipient.identifier
    ));
    audit::record(&mut tx, &event).await?;
    tx.commit().await?;
    Ok((client, secret))
}

const COLUMNS: &str = "id, display_name, redirect_uris, jwks, secret_hash, recipient_name,
    recipient_identifier, compliance_statement, compliance_declared_on, created_at";

pub async fn get(db: &Database, client_id: &str) -> Result<Option<Client>> {
    let row = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM oauth_clients WHERE id = $1"
    ))
    .bind(client_id)
    .fetch_optional(db.read_pool())
    .await?;
    row.map(|row| client_of(&row)).transpose()
}

/// Every registered client, oldest first.
pub async fn list(db: &Database) -> Result<Vec<Client>> {
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM oauth_clients ORDER BY created_at, id"
    ))
    .fetch_all(db.read_pool())
    .await?;
    rows.iter().map(client_of).collect()
}

fn client_of(row: &sqlx::any::AnyRow) -> Result<Client> {
    let corrupt = |what: &str| Error::Invalid(format!("stored client has a bad {what}"));
    let redirect_uris: Vec<String> = serde_json::from_str(&row.try_get::<String, _>(2)?)
        .map_err(|_| corrupt("redirect_uris"))?;
    let jwks: Option<String> = row.try_get(3)?;
    let secret_hash: Option<String> = row.try_get(4)?;
    let auth = match (jwks, secret_hash) {
        (Some(jwks), None) => ClientAuth::PrivateKeyJwt {
            jwks: serde_json::from_str(&jwks).map_err(|_| corrupt("jwks"))?,
        },
        (None, Some(secret_hash)) => ClientAuth::ClientSecret { secret_hash },
        _ => return Err(corrupt("authentication method")),
    };
    Ok(Client {
        id: row.try_get(0)?,
        display_name: row.try_get(1)?,
        redirect_uris,
        auth,
        recipient: Recipient {
            name: row.try_get(5)?,
            identifier: row.try_get(6)?,
        },
        compliance: ComplianceDeclaration {
            declared: true,
            statement: row.try_get(7)?,
            declared_on: row.try_get(8)?,
        },
        created_at: row.try_get(9)?,
    })
}

fn required_text(key: &str, value: &str) -> Result<String> {
    let value = value.trim();
    if value.is_empty() {
        return Err(Error::Invalid(format!("{key} is required")));
    }
    if value.chars().count() > MAX_TEXT || value.chars().any(char::is_control) {
        return Err(Error::Invalid(format!(
            "{key} must be one line of at most {MAX_TEXT} characters"
        )));
    }
    Ok(value.to_string())
}

fn validate_compliance(declaration: &ComplianceDeclaration) -> Result<ComplianceDeclaration> {
    if !declaration.declared {
        return Err(Error::Invalid(
            "the recipient must declare compliance with the PHR basic guideline".into(),
        ));
    }
    let statement = declaration.statement.trim();
    if statement.is_empty() || statement.chars().count() > 4 * MAX_TEXT {
        return Err(Error::Invalid(format!(
            "compliance.statement is required (at most {} characters)",
            4 * MAX_TEXT
        )));
    }
    let format = time::macros::format_description!("[year]-[month]-[day]");
    let declared_on = time::Date::parse(declaration.declared_on.trim(), &format)
        .map_err(|_| Error::Invalid("compliance.declared_on must be a date (YYYY-MM-DD)".into()))?;
    // A day of slack for time zones (the declaration is a local date in Japan).
    let tomorrow = time::OffsetDateTime::now_utc().date().next_day();
    if tomorrow.is_some_and(|tomorrow| declared_on > tomorrow) {
        return Err(Error::Invalid(
            "compliance.declared_on must not be in the future".into(),
        ));
    }
    Ok(ComplianceDeclaration {
        declared: true,
        statement: statement.to_string(),
        declared_on: declared_on.to_string(),
    })
}

/// `https` with a host, or `http` on a loopback host (development); no fragment, no
/// credentials.
pub fn validate_redirect_uri(uri: &str) -> std::result::Result<(), String> {
    let url = url::Url::parse(uri).map_err(|e| format!("not an absolute URL ({e})"))?;
    if url.fragment().is_some() {
        return Err("must not have a fragment".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not carry credentials".into());
    }
    let loopback = match url.host() {
        Some(url::Host::Domain(domain)) => domain.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => return Err("must have a host".into()),
    };
    match url.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        "http" => Err("must use https (plain http only on a loopback host)".into()),
        other => Err(format!("scheme {other} is not allowed")),
    }
}

/// A JWK Set of public RS384 (RSA, 2048 bits or more) or ES384 (P-384) signing keys.
pub fn validate_jwks(value: &Value) -> std::result::Result<JwkSet, String> {
    let keys = value
        .get("keys")
        .and_then(Value::as_array)
        .ok_or("must be a JWK Set ({\"keys\": [...]})")?;
    if keys.is_empty() || keys.len() > MAX_KEYS {
        return Err(format!("must hold 1 to {MAX_KEYS} keys"));
    }
    for key in keys {
        for private in ["d", "p", "q", "dp", "dq", "qi", "k", "oth"] {
            if key.get(private).is_some() {
                return Err(format!(
                    "key member {private:?} is private: register public keys only"
                ));
            }
        }
    }
    let set: JwkSet = serde_json::from_value(value.clone()).map_err(|e| e.to_string())?;
    let mut kids = Vec::new();
    for jwk in &set.keys {
        check_jwk(jwk)?;
        if let Some(kid) = &jwk.common.key_id {
            if kids.contains(kid) {
                return Err(format!("kid {kid:?} appears twice"));
            }
            kids.push(kid.clone());
        } else if set.keys.len() > 1 {
            return Err("every key needs a kid when there are several".into());
        }
    }
    Ok(set)
}

fn check_jwk(jwk: &Jwk) -> std::result::Result<(), String> {
    if let Some(usage) = &jwk.common.public_key_use {
        if *usage != jsonwebtoken::jwk::PublicKeyUse::Signature {
            return Err("keys must be for signatures (use \"sig\")".into());
        }
    }
    let expected = match &jwk.algorithm {
        AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P384 => {
            KeyAlgorithm::ES384
        }
        AlgorithmParameters::EllipticCurve(_) => {
            return Err("EC keys must be on P-384 (ES384)".into())
        }
        AlgorithmParameters::RSA(rsa) => {
            use base64::Engine as _;
            let modulus = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(rsa.n.trim_end_matches('='))
                .map_err(|_| "RSA modulus is not base64url")?;
            let bits =
                modulus.len() * 8 - modulus.first().map_or(8, |b| b.leading_zeros() as usize);
            if bits < 2048 {
                return Err("RSA keys must have at least 2048 bits".into());
            }
            KeyAlgorithm::RS384
        }
        _ => return Err("only RSA (RS384) and P-384 EC (ES384) keys are accepted".into()),
    };
    if let Some(alg) = jwk.common.key_algorithm {
        if alg != expected {
            return Err(format!(
                "alg {alg:?} does not fit the key ({expected:?} expected)"
            ));
        }
    }
    jsonwebtoken::DecodingKey::from_jwk(jwk).map_err(|e| format!("unusable key: {e}"))?;
    Ok(())
}

fn hash_secret(secret: &str) -> Result<String> {
    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    Argon2::default()
        .hash_password(secret.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|_| Error::Crypto("secret hashing failed"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirect_uris_are_https_or_loopback_http() {
        assert!(validate_redirect_uri("https://app.example.jp/cb").is_ok());
        assert!(validate_redirect_uri("http://localhost:8080/cb").is_ok());
        assert!(validate_redirect_uri("http://127.0.0.1/cb").is_ok());
        assert!(validate_redirect_uri("http://[::1]:9/cb").is_ok());
        for bad in [
            "http://app.example.jp/cb",
            "https://app.example.jp/cb#frag",
            "https://user:pw@app.example.jp/cb",
            "javascript:alert(1)",
            "/relative",
            "custom-scheme://cb",
        ] {
            assert!(validate_redirect_uri(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn jwks_takes_public_es384_keys_only() {
        let key = phr_adapters::fhir_r4::BackendKey::generate_es384();
        let set = serde_json::json!({"keys": [key.public_jwk()]});
        assert!(validate_jwks(&set).is_ok());
        let mut private = key.public_jwk();
        private["d"] = Value::String("AAAA".into());
        assert!(validate_jwks(&serde_json::json!({"keys": [private]})).is_err());
        let p256 = serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256",
            "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
            "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]});
        assert!(validate_jwks(&p256).is_err());
        let symmetric = serde_json::json!({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]});
        assert!(validate_jwks(&symmetric).is_err());
        assert!(validate_jwks(&serde_json::json!({"keys": []})).is_err());
        let mut wrong_alg = key.public_jwk();
        wrong_alg["alg"] = Value::String("RS384".into());
        assert!(validate_jwks(&serde_json::json!({"keys": [wrong_alg]})).is_err());
    }
}
