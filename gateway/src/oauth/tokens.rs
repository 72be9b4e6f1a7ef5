//! Access and refresh tokens: issued from a code, rotated on refresh, issued to backend
//! clients for `system/` scopes, revoked, introspected, and looked up for resource
//! requests.
//!
//! Every token descended from one authorisation code shares a family id. A code presented
//! twice, or a refresh token used twice, revokes its whole family (RFC 6749 §4.1.2, OAuth
//! 2.0 Security BCP §4.14): whoever holds the newest tokens loses them too.

use sqlx::{AnyConnection, Row};

use super::clients::{Client, ClientAuth};
use super::scopes::{format_scopes, parse_scopes, Scope};
use super::{digest, random_token, Lifetimes, OAuthError, OAuthErrorCode};
use crate::audit::{self, Agent, AuditEvent, EventKind, Outcome};
use crate::error::{Error, Result};
use crate::store::point_reads::{Param, RowValues};
use crate::store::{now_millis, Database};

/// What a token endpoint answers with.
#[derive(Debug, Clone, PartialEq)]
pub struct IssuedTokens {
    pub access_token: String,
    pub expires_in: u64,
    pub scopes: Vec<Scope>,
    pub patient_id: Option<String>,
    pub consent_id: Option<String>,
    pub refresh_token: Option<String>,
    pub family_id: String,
}

/// The grant behind a valid access token, for resource endpoints.
#[derive(Debug, Clone, PartialEq)]
pub struct AccessGrant {
    pub client_id: String,
    /// The patient in context; `None` for client-credentials (`system/`) tokens.
    pub patient_id: Option<String>,
    /// The consent the grant rests on; `None` for client-credentials tokens.
    pub consent_id: Option<String>,
    pub scopes: Vec<Scope>,
    /// Every token descended from one authorisation shares it.
    pub token_family: String,
    /// Unix milliseconds.
    pub expires_at: i64,
}

impl AccessGrant {
    /// The client acting with this token, from `address`, for audit records.
    pub fn agent(&self, address: Option<std::net::IpAddr>) -> Agent {
        Agent {
            token_jti: Some(self.token_family.clone()),
            address,
            ..Agent::client(&self.client_id)
        }
    }
}

/// A token as stored (either kind).
struct StoredToken {
    kind: String,
    client_id: String,
    patient_id: Option<String>,
    consent_id: Option<String>,
    scopes: Vec<Scope>,
    family_id: String,
    created_at: i64,
    expires_at: i64,
    used: bool,
    revoked: bool,
}

async fn load_token(conn: &mut AnyConnection, token: &str) -> Result<Option<StoredToken>> {
    let row = sqlx::query(
        "SELECT kind, client_id, patient_id, consent_id, scopes, family_id, created_at,
             expires_at, used_at, revoked_at
         FROM oauth_tokens WHERE token_hash = $1",
    )
    .bind(digest(token))
    .fetch_optional(conn)
    .await?;
    row.as_ref().map(|row| stored_of(row)).transpose()
}

/// A token row's first ten columns (as `load_token` selects them).
fn stored_of(row: &dyn RowValues) -> Result<StoredToken> {
    let scopes = row.text(4)?;
    Ok(StoredToken {
        kind: row.text(0)?,
        client_id: row.text(1)?,
        patient_id: row.opt_text(2)?,
        consent_id: row.opt_text(3)?,
        scopes: parse_scopes(&scopes)
            .map_err(|e| Error::Invalid(format!("stored token has a bad scope: {e}")))?,
        family_id: row.text(5)?,
        created_at: row.int(6)?,
        expires_at: row.int(7)?,
        used: row.opt_int(8)?.is_some(),
        revoked: row.opt_int(9)?.is_some(),
    })
}

/// What a new token carries.
struct TokenClaims<'a> {
    client_id: &'a str,
    patient_id: Option<&'a str>,
    consent_id: Option<&'a str>,
    family_id: &'a str,
}

async fn insert_token(
    conn: &mut AnyConnection,
    kind: &str,
    claims: &TokenClaims<'_>,
    scopes: &[Scope],
    lifetime_secs: u64,
) -> Result<String> {
    let token = random_token();
    let now = now_millis();
    sqlx::query(
        "INSERT INTO oauth_tokens (token_hash, kind, client_id, patient_id, consent_id, scopes,
             family_id, created_at, expires_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(digest(&token))
    .bind(kind)
    .bind(claims.client_id)
    .bind(claims.patient_id)
    .bind(claims.consent_id)
    .bind(format_scopes(scopes))
    .bind(claims.family_id)
    .bind(now)
    .bind(now + lifetime_secs as i64 * 1000)
    .execute(conn)
    .await?;
    Ok(token)
}

/// Issues an access token (and a refresh token when `refresh_scopes` is given).
async fn issue(
    conn: &mut AnyConnection,
    lifetimes: &Lifetimes,
    claims: &TokenClaims<'_>,
    access_scopes: &[Scope],
    refresh_scopes: Option<&[Scope]>,
) -> Result<IssuedTokens> {
    let expires_in = lifetimes
        .access_token_secs
        .min(super::MAX_ACCESS_TOKEN_SECS);
    let access_token = insert_token(conn, "access", claims, access_scopes, expires_in).await?;
    let refresh_token = match refresh_scopes {
        Some(scopes) => Some(
            insert_token(
                conn,
                "refresh",
                claims,
                scopes,
                lifetimes.refresh_token_secs,
            )
            .await?,
        ),
        None => None,
    };
    Ok(IssuedTokens {
        access_token,
        expires_in,
        scopes: access_scopes.to_vec(),
        patient_id: claims.patient_id.map(str::to_string),
        consent_id: claims.consent_id.map(str::to_string),
        refresh_token,
        family_id: claims.family_id.to_string(),
    })
}

/// Revokes every token of a family and the code it came from; returns the tokens revoked.
async fn revoke_family(conn: &mut AnyConnection, family_id: &str) -> Result<u64> {
    revoke_where(conn, Grouping::Family, family_id).await
}

/// What ties tokens and codes together for revocation: one grant, or one consent.
#[derive(Clone, Copy)]
enum Grouping {
    Family,
    Consent,
}

impl Grouping {
    fn column(self) -> &'static str {
        match self {
            Grouping::Family => "family_id",
            Grouping::Consent => "consent_id",
        }
    }
}

/// Revokes the tokens and codes of one family or consent; returns the tokens revoked.
async fn revoke_where(conn: &mut AnyConnection, grouping: Grouping, value: &str) -> Result<u64> {
    let now = now_millis();
    let column = grouping.column();
    let revoked = sqlx::query(&format!(
        "UPDATE oauth_tokens SET revoked_at = $1 WHERE {column} = $2 AND revoked_at IS NULL"
    ))
    .bind(now)
    .bind(value)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    sqlx::query(&format!(
        "UPDATE oauth_codes SET revoked_at = $1 WHERE {column} = $2 AND revoked_at IS NULL"
    ))
    .bind(now)
    .bind(value)
    .execute(&mut *conn)
    .await?;
    Ok(revoked)
}

/// A code or refresh token presented a second time: the family goes, the reuse is recorded
/// (committed even though the request fails).
async fn reuse_detected(
    mut tx: sqlx::Transaction<'static, sqlx::Any>,
    agent: &Agent,
    patient_id: Option<&str>,
    family_id: &str,
    what: &str,
) -> Result<OAuthError> {
    let revoked = revoke_family(&mut tx, family_id).await?;
    let mut event = AuditEvent::new(EventKind::TokenReuseDetected, agent.clone())
        .outcome(Outcome::SeriousFailure)
        .detail(format!(
            "invalid_grant: {what} used twice; family {family_id} revoked ({revoked} tokens)"
        ));
    if let Some(patient) = patient_id {
        event = event.patient(patient);
    }
    audit::record(&mut tx, &event).await?;
    tx.commit().await?;
    Ok(OAuthError::invalid_grant(format!(
        "{what} was already used; every token issued from it is revoked"
    )))
}

fn token_event(kind: EventKind, agent: &Agent, issued: &IssuedTokens) -> AuditEvent {
    let mut event = AuditEvent::new(kind, agent.clone()).detail(format!(
        "family {}: {}{}",
        issued.family_id,
        format_scopes(&issued.scopes),
        if issued.refresh_token.is_some() {
            " (with refresh token)"
        } else {
            ""
        }
    ));
    if let Some(patient) = &issued.patient_id {
        event = event.patient(patient);
    }
    if let Some(consent) = &issued.consent_id {
        event = event.resource(format!("Consent/{consent}"));
    }
    event
}

/// `grant_type=authorization_code`: the code must be unused, unexpired, issued to this
/// client for this redirect URI, and answered by the PKCE verifier. A code presented again
/// revokes what was issued from it.
pub async fn exchange_code(
    db: &Database,
    lifetimes: &Lifetimes,
    client: &Client,
    agent: &Agent,
    code: &str,
    redirect_uri: Option<&str>,
    code_verifier: Option<&str>,
) -> Result<IssuedTokens> {
    let mut tx = db.begin().await?;
    let row = sqlx::query(
        "SELECT client_id, redirect_uri, code_challenge, patient_id, consent_id, scopes,
             family_id, expires_at, used_at, revoked_at
         FROM oauth_codes WHERE code_hash = $1",
    )
    .bind(digest(code))
    .fetch_optional(&mut *tx)
    .await?
    .ok_or_else(|| OAuthError::invalid_grant("unknown authorization code"))?;
    let code_client: String = row.try_get(0)?;
    let code_redirect: String = row.try_get(1)?;
    let challenge: String = row.try_get(2)?;
    let patient_id: String = row.try_get(3)?;
    let consent_id: String = row.try_get(4)?;
    let scopes = parse_scopes(&row.try_get::<String, _>(5)?)
        .map_err(|e| Error::Invalid(format!("stored code has a bad scope: {e}")))?;
    let family_id: String = row.try_get(6)?;
    let expires_at: i64 = row.try_get(7)?;
    let used = row.try_get::<Option<i64>, _>(8)?.is_some();
    let revoked = row.try_get::<Option<i64>, _>(9)?.is_some();
    if code_client != client.id {
        return Err(OAuthError::invalid_grant("the code was issued to another client").into());
    }
    if used {
        let error = reuse_detected(tx, agent, Some(&patient_id), &family_id, "the code").await?;
        return Err(error.into());
    }
    if revoked {
        return Err(OAuthError::invalid_grant("the code was revoked").into());
    }
    let claimed =
        sqlx::query("UPDATE oauth_codes SET used_at = $1 WHERE code_hash = $2 AND used_at IS NULL")
            .bind(now_millis())
            .bind(digest(code))
            .execute(&mut *tx)
            .await?
            .rows_affected();
    if claimed != 1 {
        let error = reuse_detected(tx, agent, Some(&patient_id), &family_id, "the code").await?;
        return Err(error.into());
    }
    // From here the code is spent whatever happens: a failed check burns it.
    let refusal = if now_millis() >= expires_at {
        Some("the authorization code has expired")
    } else if redirect_uri != Some(code_redirect.as_str()) {
        Some("redirect_uri differs from the authorization request")
    } else if !code_verifier
        .is_some_and(|verifier| phr_adapters::oauth::pkce_matches("S256", &challenge, verifier))
    {
        Some("code_verifier does not match the code_challenge (PKCE S256)")
    } else {
        None
    };
    if let Some(reason) = refusal {
        tx.commit().await?;
        return Err(OAuthError::invalid_grant(reason).into());
    }
    let refresh_scopes = scopes
        .contains(&Scope::OfflineAccess)
        .then_some(&scopes[..]);
    let claims = TokenClaims {
        client_id: &client.id,
        patient_id: Some(&patient_id),
        consent_id: Some(&consent_id),
        family_id: &family_id,
    };
    let issued = issue(&mut tx, lifetimes, &claims, &scopes, refresh_scopes).await?;
    audit::record(
        &mut tx,
        &token_event(EventKind::TokenIssued, agent, &issued),
    )
    .await?;
    tx.commit().await?;
    Ok(issued)
}

/// `grant_type=refresh_token`: rotation. The presented token is spent and a new one issued
/// with the original grant; `requested` may narrow the access token's scopes, never widen
/// them. A spent token presented again revokes the family.
pub async fn refresh(
    db: &Database,
    lifetimes: &Lifetimes,
    client: &Client,
    agent: &Agent,
    refresh_token: &str,
    requested: Option<Vec<Scope>>,
) -> Result<IssuedTokens> {
    let mut tx = db.begin().await?;
    let stored = load_token(&mut tx, refresh_token)
        .await?
        .filter(|t| t.kind == "refresh")
        .ok_or_else(|| OAuthError::invalid_grant("unknown refresh token"))?;
    if stored.client_id != client.id {
        return Err(
            OAuthError::invalid_grant("the refresh token was issued to another client").into(),
        );
    }
    if stored.revoked {
        return Err(OAuthError::invalid_grant("the refresh token was revoked").into());
    }
    if stored.used {
        let error = reuse_detected(
            tx,
            agent,
            stored.patient_id.as_deref(),
            &stored.family_id,
            "the refresh token",
        )
        .await?;
        return Err(error.into());
    }
    if now_millis() >= stored.expires_at {
        return Err(OAuthError::invalid_grant("the refresh token has expired").into());
    }
    let access_scopes = match requested {
        Some(requested) => {
            if let Some(extra) = requested.iter().find(|s| !s.covered_by_any(&stored.scopes)) {
                return Err(OAuthError::invalid_scope(format!(
                    "{extra} was not part of the original grant"
                ))
                .into());
            }
            requested
        }
        None => stored.scopes.clone(),
    };
    let claimed = sqlx::query(
        "UPDATE oauth_tokens SET used_at = $1
         WHERE token_hash = $2 AND used_at IS NULL AND revoked_at IS NULL",
    )
    .bind(now_millis())
    .bind(digest(refresh_token))
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if claimed != 1 {
        let error = reuse_detected(
            tx,
            agent,
            stored.patient_id.as_deref(),
            &stored.family_id,
            "the refresh token",
        )
        .await?;
        return Err(error.into());
    }
    let claims = TokenClaims {
        client_id: &client.id,
        patient_id: stored.patient_id.as_deref(),
        consent_id: stored.consent_id.as_deref(),
        family_id: &stored.family_id,
    };
    let issued = issue(
        &mut tx,
        lifetimes,
        &claims,
        &access_scopes,
        Some(&stored.scopes),
    )
    .await?;
    audit::record(
        &mut tx,
        &token_event(EventKind::TokenRefreshed, agent, &issued),
    )
    .await?;
    tx.commit().await?;
    Ok(issued)
}

/// `grant_type=client_credentials`: `system/` scopes only, for clients that authenticate
/// with a key. No patient, no consent, no refresh token.
pub async fn client_credentials(
    db: &Database,
    lifetimes: &Lifetimes,
    client: &Client,
    agent: &Agent,
    scopes: Vec<Scope>,
) -> Result<IssuedTokens> {
    if !matches!(client.auth, ClientAuth::PrivateKeyJwt { .. }) {
        return Err(OAuthError::new(
            OAuthErrorCode::UnauthorizedClient,
            "client_credentials needs private_key_jwt client authentication",
        )
        .into());
    }
    if scopes.is_empty() {
        return Err(OAuthError::invalid_scope("ask for at least one system/ scope").into());
    }
    if let Some(other) = scopes.iter().find(|s| !s.is_system()) {
        return Err(OAuthError::invalid_scope(format!(
            "{other}: client_credentials grants system/ scopes only"
        ))
        .into());
    }
    let family_id = uuid::Uuid::new_v4().to_string();
    let claims = TokenClaims {
        client_id: &client.id,
        patient_id: None,
        consent_id: None,
        family_id: &family_id,
    };
    let mut tx = db.begin().await?;
    let issued = issue(&mut tx, lifetimes, &claims, &scopes, None).await?;
    audit::record(
        &mut tx,
        &token_event(EventKind::TokenIssued, agent, &issued),
    )
    .await?;
    tx.commit().await?;
    Ok(issued)
}

/// RFC 7009: revokes a token of this client. A refresh token takes its whole family with
/// it; an access token goes alone. Unknown tokens and other clients' tokens change nothing
/// (the answer is the same, so it reveals nothing).
pub async fn revoke(db: &Database, client: &Client, agent: &Agent, token: &str) -> Result<()> {
    let mut tx = db.begin().await?;
    let Some(stored) = load_token(&mut tx, token).await? else {
        return Ok(());
    };
    if stored.client_id != client.id {
        let event = AuditEvent::new(EventKind::OAuthRefused, agent.clone())
            .outcome(Outcome::MinorFailure)
            .detail("unauthorized_client: revocation of another client's token ignored");
        audit::record(&mut tx, &event).await?;
        tx.commit().await?;
        return Ok(());
    }
    let revoked = if stored.kind == "refresh" {
        revoke_family(&mut tx, &stored.family_id).await?
    } else {
        sqlx::query(
            "UPDATE oauth_tokens SET revoked_at = $1 WHERE token_hash = $2 AND revoked_at IS NULL",
        )
        .bind(now_millis())
        .bind(digest(token))
        .execute(&mut *tx)
        .await?
        .rows_affected()
    };
    let mut event = AuditEvent::new(EventKind::TokenRevoked, agent.clone()).detail(format!(
        "{} token of family {} revoked by the client ({revoked} tokens)",
        stored.kind, stored.family_id
    ));
    if let Some(patient) = &stored.patient_id {
        event = event.patient(patient);
    }
    audit::record(&mut tx, &event).await?;
    tx.commit().await?;
    Ok(())
}

/// RFC 7662 answer for an active token.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenInfo {
    pub scopes: Vec<Scope>,
    pub client_id: String,
    /// Unix seconds.
    pub exp: i64,
    pub iat: i64,
    /// `access_token` or `refresh_token`.
    pub token_type: &'static str,
    pub patient_id: Option<String>,
    pub consent_id: Option<String>,
}

/// RFC 7662: `None` (inactive) for unknown, expired, revoked, spent or other clients' tokens.
pub async fn introspect(db: &Database, client: &Client, token: &str) -> Result<Option<TokenInfo>> {
    let mut conn = db.read_pool().acquire().await?;
    let Some(stored) = load_token(&mut conn, token).await? else {
        return Ok(None);
    };
    if stored.client_id != client.id
        || stored.revoked
        || stored.used
        || now_millis() >= stored.expires_at
    {
        return Ok(None);
    }
    Ok(Some(TokenInfo {
        scopes: stored.scopes,
        client_id: stored.client_id,
        exp: stored.expires_at / 1000,
        iat: stored.created_at / 1000,
        token_type: if stored.kind == "refresh" {
            "refresh_token"
        } else {
            "access_token"
        },
        patient_id: stored.patient_id,
        consent_id: stored.consent_id,
    }))
}

/// The grant behind a bearer access token, or `invalid_token` saying why not.
pub async fn access_grant(db: &Database, token: &str) -> Result<AccessGrant> {
    let mut conn = db.read_pool().acquire().await?;
    let stored = load_token(&mut conn, token).await?;
    grant_of(stored)
}

/// `access_grant`, and in the same query the current version of the consent the token
/// rests on (its stored JSON; `None` when the token has none or the consent is gone): one
/// round trip for what every FHIR request needs.
pub async fn access_grant_and_consent(
    db: &Database,
    token: &str,
) -> Result<(AccessGrant, Option<String>)> {
    let token_hash = digest(token);
    // Every FHIR request makes this read: a point read (see `store::point_reads`).
    let row = db
        .fetch_point(
            "SELECT t.kind, t.client_id, t.patient_id, t.consent_id, t.scopes, t.family_id,
                 t.created_at, t.expires_at, t.used_at, t.revoked_at, v.body
             FROM oauth_tokens t
             LEFT JOIN consents c ON c.id = t.consent_id AND c.patient_id = t.patient_id
             LEFT JOIN consent_versions v ON v.consent_id = c.id AND v.version = c.current_version
             WHERE t.token_hash = $1",
            &[Param::Blob(&token_hash)],
            |row| Ok((stored_of(row)?, row.opt_text(10)?)),
        )
        .await?;
    let (stored, consent) = match row {
        Some((stored, consent)) => (Some(stored), consent),
        None => (None, None),
    };
    Ok((grant_of(stored)?, consent))
}

/// The grant behind a stored token, if it is a live access token.
fn grant_of(stored: Option<StoredToken>) -> Result<AccessGrant> {
    let stored = stored
        .filter(|t| t.kind == "access")
        .ok_or_else(|| OAuthError::invalid_token("unknown access token"))?;
    if stored.revoked {
        return Err(OAuthError::invalid_token("the access token was revoked").into());
    }
    if now_millis() >= stored.expires_at {
        return Err(OAuthError::invalid_token("the access token has expired").into());
    }
    Ok(AccessGrant {
        client_id: stored.client_id,
        patient_id: stored.patient_id,
        consent_id: stored.consent_id,
        scopes: stored.scopes,
        token_family: stored.family_id,
        expires_at: stored.expires_at,
    })
}

/// Revokes every access and refresh token (and unexchanged code) issued under a consent;
/// called when the patient withdraws it. Audited; returns the number of tokens revoked.
pub async fn revoke_by_consent(db: &Database, consent_id: &str) -> Result<u64> {
    let mut tx = db.begin().await?;
    let revoked = revoke_where(&mut tx, Grouping::Consent, consent_id).await?;
    let event = AuditEvent::new(EventKind::TokenRevoked, Agent::system())
        .resource(format!("Consent/{consent_id}"))
        .detail(format!(
            "tokens under consent {consent_id} revoked ({revoked} tokens)"
        ));
    audit::record(&mut tx, &event).await?;
    tx.commit().await?;
    Ok(revoked)
}
