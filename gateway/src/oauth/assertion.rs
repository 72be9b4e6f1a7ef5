//! Client authentication at the token, revocation and introspection endpoints:
//! `private_key_jwt` (RFC 7523; RS384 or ES384 against the client's registered JWK Set,
//! `iss` = `sub` = client id, `aud` = the token endpoint, `exp` at most five minutes ahead,
//! a `jti` never seen before) and `client_secret_basic`.
//!
//! Seen `jti`s live in `oauth_assertion_jtis`, whose primary key makes a replay fail in every
//! gateway process sharing the database; rows are pruned once their assertion has expired.

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;

use super::clients::{self, Client, ClientAuth};
use super::OAuthError;
use crate::error::Result;
use crate::store::{now_millis, Database};

pub use phr_adapters::oauth::JWT_BEARER_ASSERTION_TYPE;

/// An assertion may not claim to live longer than this (SMART Backend Services).
pub const MAX_ASSERTION_LIFETIME_SECS: i64 = 300;

/// Clock skew tolerated on `exp`, in seconds.
const LEEWAY_SECS: u64 = 5;

/// How the client authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    PrivateKeyJwt,
    ClientSecretBasic,
}

/// Verifies a `private_key_jwt` assertion; returns the authenticated client.
pub async fn authenticate_assertion(
    db: &Database,
    token_url: &str,
    client_id: Option<&str>,
    assertion_type: Option<&str>,
    assertion: &str,
) -> Result<Client> {
    if assertion_type != Some(JWT_BEARER_ASSERTION_TYPE) {
        return Err(OAuthError::invalid_client(format!(
            "client_assertion_type must be {JWT_BEARER_ASSERTION_TYPE}"
        ))
        .into());
    }
    let header = jsonwebtoken::decode_header(assertion)
        .map_err(|_| OAuthError::invalid_client("client_assertion is not a JWT"))?;
    if !matches!(header.alg, Algorithm::RS384 | Algorithm::ES384) {
        return Err(OAuthError::invalid_client(format!(
            "client_assertion alg {:?} is not accepted (RS384, ES384)",
            header.alg
        ))
        .into());
    }
    // The issuer names the client whose keys verify the signature; nothing else of the
    // unverified claims is believed.
    let issuer = unverified_issuer(assertion)
        .ok_or_else(|| OAuthError::invalid_client("client_assertion has no iss"))?;
    if client_id.is_some_and(|id| id != issuer) {
        return Err(
            OAuthError::invalid_client("client_id differs from the assertion's iss").into(),
        );
    }
    let client = clients::get(db, &issuer)
        .await?
        .ok_or_else(|| OAuthError::invalid_client("unknown client"))?;
    let ClientAuth::PrivateKeyJwt { jwks } = &client.auth else {
        return Err(OAuthError::invalid_client(
            "this client authenticates with client_secret_basic",
        )
        .into());
    };
    let candidates: Vec<&Jwk> = jwks
        .keys
        .iter()
        .filter(|jwk| fits(jwk, header.alg))
        .filter(|jwk| match (&header.kid, &jwk.common.key_id) {
            (Some(sent), Some(registered)) => sent == registered,
            _ => true,
        })
        .collect();
    if candidates.is_empty() {
        return Err(OAuthError::invalid_client(
            "no registered key fits the assertion's alg and kid",
        )
        .into());
    }
    let mut validation = Validation::new(header.alg);
    validation.set_audience(&[token_url]);
    validation.set_issuer(&[client.id.as_str()]);
    validation.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
    validation.leeway = LEEWAY_SECS;
    let claims = candidates
        .iter()
        .filter_map(|jwk| DecodingKey::from_jwk(jwk).ok())
        .find_map(|key| jsonwebtoken::decode::<Value>(assertion, &key, &validation).ok())
        .ok_or_else(|| {
            OAuthError::invalid_client(
                "client_assertion is not signed by a registered key, or its aud, iss or exp is wrong",
            )
        })?
        .claims;
    if claims.get("sub").and_then(Value::as_str) != Some(client.id.as_str()) {
        return Err(
            OAuthError::invalid_client("client_assertion sub must be the client id").into(),
        );
    }
    let exp = claims.get("exp").and_then(Value::as_i64).unwrap_or(0);
    let now_secs = now_millis() / 1000;
    if exp > now_secs + MAX_ASSERTION_LIFETIME_SECS + LEEWAY_SECS as i64 {
        return Err(OAuthError::invalid_client(
            "client_assertion exp is more than five minutes ahead",
        )
        .into());
    }
    let jti = claims
        .get("jti")
        .and_then(Value::as_str)
        .filter(|jti| !jti.is_empty() && jti.len() <= 256)
        .ok_or_else(|| OAuthError::invalid_client("client_assertion needs a jti"))?;
    remember_jti(db, &client.id, jti, (exp + LEEWAY_SECS as i64) * 1000).await?;
    Ok(client)
}

/// Records a `jti` once; a second time is a replay, from this process or another.
async fn remember_jti(db: &Database, client_id: &str, jti: &str, expires_at: i64) -> Result<()> {
    let now = now_millis();
    sqlx::query("DELETE FROM oauth_assertion_jtis WHERE expires_at < $1")
        .bind(now)
        .execute(db.write_pool())
        .await?;
    let inserted = sqlx::query(
        "INSERT INTO oauth_assertion_jtis (client_id, jti, expires_at) VALUES ($1, $2, $3)
         ON CONFLICT (client_id, jti) DO NOTHING",
    )
    .bind(client_id)
    .bind(jti)
    .bind(expires_at)
    .execute(db.write_pool())
    .await?
    .rows_affected();
    if inserted != 1 {
        return Err(OAuthError::invalid_client("client_assertion jti was already used").into());
    }
    Ok(())
}

/// `client_secret_basic`: the `Authorization: Basic` value (without the scheme), whose
/// parts are form-encoded (RFC 6749 §2.3.1).
pub async fn authenticate_basic(db: &Database, credentials: &str) -> Result<Client> {
    let refused = || OAuthError::invalid_client("client authentication failed");
    let decoded = STANDARD
        .decode(credentials.trim())
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .ok_or_else(refused)?;
    let (id, secret) = decoded.split_once(':').ok_or_else(refused)?;
    let decode = |part: &str| -> String {
        form_urlencoded::parse(format!("v={part}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default()
    };
    let (id, secret) = (decode(id), decode(secret));
    let client = clients::get(db, &id).await?.ok_or_else(refused)?;
    // Argon2 is slow on purpose: run it off the async workers.
    let checked = client.clone();
    let matches = tokio::task::spawn_blocking(move || checked.verify_secret(&secret))
        .await
        .unwrap_or(false);
    if !matches {
        return Err(refused().into());
    }
    Ok(client)
}

/// Whether a registered key can verify `alg`.
fn fits(jwk: &Jwk, alg: Algorithm) -> bool {
    matches!(
        (&jwk.algorithm, alg),
        (AlgorithmParameters::EllipticCurve(_), Algorithm::ES384)
            | (AlgorithmParameters::RSA(_), Algorithm::RS384)
    )
}

fn unverified_issuer(jwt: &str) -> Option<String> {
    let payload = jwt.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload).ok()?;
    let claims: Value = serde_json::from_slice(&bytes).ok()?;
    claims.get("iss")?.as_str().map(str::to_string)
}
