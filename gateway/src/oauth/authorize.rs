//! Pending authorisation requests and authorisation codes.
//!
//! `GET /oauth/authorize` stores a checked request and sends the browser to the consent page
//! (`/consent/authorize/{request_id}`). That page reads the request with `pending_request`
//! and finishes it once with `approve` (a one-time code bound to the client, redirect URI,
//! PKCE challenge, patient, consent and granted scopes) or `decline`; both return the URL
//! to send the browser back to the app.

use phr_consent::DataCategory;
use sqlx::Row;

use super::clients::{self, ComplianceDeclaration, Recipient};
use super::scopes::{categories_of, format_scopes, parse_scopes, Scope};
use super::{digest, random_token, CODE_LIFETIME_SECS};
use crate::audit::{self, Agent, AuditEvent, EventKind};
use crate::error::{Error, Result};
use crate::store::{now_millis, Database};

/// A checked authorisation request, about to be stored.
#[derive(Debug, Clone)]
pub struct NewAuthorization {
    pub client_id: String,
    pub redirect_uri: String,
    pub state: String,
    pub code_challenge: String,
    pub scopes: Vec<Scope>,
    /// The gateway's issuer identifier, sent back as `iss` (RFC 9207).
    pub issuer: String,
}

/// What the consent page shows the patient and needs to finish the request.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingAuthorization {
    pub request_id: String,
    pub client_id: String,
    /// The app's name as the operator registered it.
    pub client_name: String,
    /// Who receives the data.
    pub recipient: Recipient,
    pub compliance: ComplianceDeclaration,
    /// The scopes the app asked for (canonical SMART v2 form).
    pub requested_scopes: Vec<Scope>,
    /// The data categories the requested resource scopes reach.
    pub categories: Vec<DataCategory>,
    /// Whether the app asked to keep access while the patient is away (`offline_access`).
    pub offline_access: bool,
    pub redirect_uri: String,
    pub state: String,
    /// Unix milliseconds; after this the request can no longer be approved.
    pub expires_at: i64,
}

/// Stores a request for `lifetime_secs`, audited; returns its id.
pub async fn create_request(
    db: &Database,
    agent: &Agent,
    request: &NewAuthorization,
    lifetime_secs: u64,
) -> Result<String> {
    let id = uuid::Uuid::new_v4().to_string();
    let now = now_millis();
    let mut tx = db.begin().await?;
    sqlx::query(
        "INSERT INTO oauth_authorization_requests
             (id, client_id, redirect_uri, state, code_challenge, scopes, issuer, created_at,
              expires_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(&id)
    .bind(&request.client_id)
    .bind(&request.redirect_uri)
    .bind(&request.state)
    .bind(&request.code_challenge)
    .bind(format_scopes(&request.scopes))
    .bind(&request.issuer)
    .bind(now)
    .bind(now + lifetime_secs as i64 * 1000)
    .execute(&mut *tx)
    .await?;
    let event = AuditEvent::new(EventKind::AuthorizationRequested, agent.clone()).detail(format!(
        "authorization request {id} by client {} for {}",
        request.client_id,
        format_scopes(&request.scopes)
    ));
    audit::record(&mut tx, &event).await?;
    tx.commit().await?;
    Ok(id)
}

struct StoredRequest {
    client_id: String,
    redirect_uri: String,
    state: String,
    code_challenge: String,
    scopes: Vec<Scope>,
    issuer: String,
    expires_at: i64,
    decided: bool,
}

async fn load(conn: &mut sqlx::AnyConnection, request_id: &str) -> Result<Option<StoredRequest>> {
    let row = sqlx::query(
        "SELECT client_id, redirect_uri, state, code_challenge, scopes, expires_at, decision,
             issuer
         FROM oauth_authorization_requests WHERE id = $1",
    )
    .bind(request_id)
    .fetch_optional(conn)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let scopes: String = row.try_get(4)?;
    Ok(Some(StoredRequest {
        client_id: row.try_get(0)?,
        redirect_uri: row.try_get(1)?,
        state: row.try_get(2)?,
        code_challenge: row.try_get(3)?,
        scopes: parse_scopes(&scopes)
            .map_err(|e| Error::Invalid(format!("stored request has a bad scope: {e}")))?,
        expires_at: row.try_get(5)?,
        decided: row.try_get::<Option<String>, _>(6)?.is_some(),
        issuer: row.try_get(7)?,
    }))
}

/// The request, while it waits for the patient: `None` when unknown, expired or already
/// approved or declined.
pub async fn pending_request(
    db: &Database,
    request_id: &str,
) -> Result<Option<PendingAuthorization>> {
    let mut conn = db.read_pool().acquire().await?;
    let Some(request) = load(&mut conn, request_id).await? else {
        return Ok(None);
    };
    drop(conn);
    if request.decided || now_millis() >= request.expires_at {
        return Ok(None);
    }
    let Some(client) = clients::get(db, &request.client_id).await? else {
        return Ok(None);
    };
    Ok(Some(PendingAuthorization {
        request_id: request_id.to_string(),
        client_id: client.id,
        client_name: client.display_name,
        recipient: client.recipient,
        compliance: client.compliance,
        categories: categories_of(&request.scopes),
        offline_access: request.scopes.contains(&Scope::OfflineAccess),
        requested_scopes: request.scopes,
        redirect_uri: request.redirect_uri,
        state: request.state,
        expires_at: request.expires_at,
    }))
}

/// Takes the request out of waiting (once); refuses unknown, expired and decided requests.
async fn decide(
    tx: &mut sqlx::AnyConnection,
    request_id: &str,
    decision: &str,
) -> Result<StoredRequest> {
    let request = load(tx, request_id)
        .await?
        .ok_or_else(|| Error::NotFound(format!("authorization request {request_id}")))?;
    let now = now_millis();
    if request.decided {
        return Err(Error::Invalid(
            "this authorization request was already approved or declined".into(),
        ));
    }
    if now >= request.expires_at {
        return Err(Error::Invalid(
            "this authorization request has expired".into(),
        ));
    }
    let updated = sqlx::query(
        "UPDATE oauth_authorization_requests SET decision = $1, decided_at = $2
         WHERE id = $3 AND decision IS NULL",
    )
    .bind(decision)
    .bind(now)
    .bind(request_id)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if updated != 1 {
        return Err(Error::Invalid(
            "this authorization request was already approved or declined".into(),
        ));
    }
    Ok(request)
}

/// The patient approved, under consent `consent_id`, the `granted_scopes` (the requested
/// scopes or fewer). Issues a one-time code (60 s) and returns the app's redirect URL with
/// `code`, `state` and `iss`. `openid` and `fhirUser` are not granted (no id_token is issued).
pub async fn approve(
    db: &Database,
    request_id: &str,
    patient_id: &str,
    consent_id: &str,
    granted_scopes: &[Scope],
) -> Result<String> {
    if patient_id.trim().is_empty() || consent_id.trim().is_empty() {
        return Err(Error::Invalid(
            "approval needs the patient and the consent".into(),
        ));
    }
    let mut granted: Vec<Scope> = granted_scopes.to_vec();
    granted.sort();
    granted.dedup();
    if !granted.iter().any(Scope::is_patient_resource) {
        return Err(Error::Invalid(
            "grant at least one patient/ scope, or decline the request".into(),
        ));
    }
    let mut tx = db.begin().await?;
    let request = decide(&mut tx, request_id, "approved").await?;
    if let Some(extra) = granted.iter().find(|s| !s.covered_by_any(&request.scopes)) {
        return Err(Error::Invalid(format!(
            "{extra} was not requested; a grant can only narrow the request"
        )));
    }
    let code = random_token();
    let now = now_millis();
    let family_id = uuid::Uuid::new_v4().to_string();
    sqlx::query(
        "INSERT INTO oauth_codes (code_hash, request_id, client_id, redirect_uri, code_challenge,
             patient_id, consent_id, scopes, family_id, created_at, expires_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
    )
    .bind(digest(&code))
    .bind(request_id)
    .bind(&request.client_id)
    .bind(&request.redirect_uri)
    .bind(&request.code_challenge)
    .bind(patient_id)
    .bind(consent_id)
    .bind(format_scopes(&granted))
    .bind(&family_id)
    .bind(now)
    .bind(now + CODE_LIFETIME_SECS as i64 * 1000)
    .execute(&mut *tx)
    .await?;
    let event = AuditEvent::new(
        EventKind::AuthorizationCodeIssued,
        Agent::client(&request.client_id),
    )
    .patient(patient_id)
    .resource(format!("Consent/{consent_id}"))
    .detail(format!(
        "authorization code for request {request_id}, family {family_id}: {}",
        format_scopes(&granted)
    ));
    audit::record(&mut tx, &event).await?;
    tx.commit().await?;
    redirect_with(
        &request.redirect_uri,
        &[
            ("code", &code),
            ("state", &request.state),
            ("iss", &request.issuer),
        ],
    )
}

/// The patient declined: returns the app's redirect URL with `error=access_denied`, `state`
/// and `iss`.
pub async fn decline(db: &Database, request_id: &str) -> Result<String> {
    let mut tx = db.begin().await?;
    let request = decide(&mut tx, request_id, "declined").await?;
    let event = AuditEvent::new(
        EventKind::AuthorizationDeclined,
        Agent::client(&request.client_id),
    )
    .outcome(audit::Outcome::MinorFailure)
    .detail(format!(
        "access_denied: the patient declined request {request_id}"
    ));
    audit::record(&mut tx, &event).await?;
    tx.commit().await?;
    redirect_with(
        &request.redirect_uri,
        &[
            ("error", "access_denied"),
            ("error_description", "the patient declined"),
            ("state", &request.state),
            ("iss", &request.issuer),
        ],
    )
}

/// The registered redirect URI with parameters appended to its query.
pub fn redirect_with(redirect_uri: &str, params: &[(&str, &str)]) -> Result<String> {
    let mut url = url::Url::parse(redirect_uri)
        .map_err(|e| Error::Invalid(format!("stored redirect URI is not a URL: {e}")))?;
    {
        let mut query = url.query_pairs_mut();
        for (name, value) in params {
            query.append_pair(name, value);
        }
    }
    Ok(url.to_string())
}
