//! Break-glass: pre-created emergency operator accounts for when the normal operator sign-in
//! path is down. Each has a strong one-time secret, printed once at creation and kept
//! sealed offline; a use spends it. Break-glass opens only while the normal path's
//! dependency is unreachable (the configured identity provider, or by default the store
//! that holds the second factors), the session is time-boxed, every action in it is audited
//! as an emergency override (DCM 110113 / 110127, purposeOfEvent BTG), and each use must be
//! reviewed afterwards by another operator; unreviewed uses become overdue.

use std::net::IpAddr;
use std::time::Duration;

use base64::Engine as _;
use rand::RngCore;
use serde::Serialize;
use sqlx::Row;
use utoipa::ToSchema;

use crate::audit::{self, AccountRole, Agent, AuditEvent, EventKind, Outcome};
use crate::config::BreakGlassConfig;
use crate::error::{Error, Result};
use crate::keystore::KeyStore;
use crate::store::accounts::{agent_of, Account, Accounts, NewSession, Session, SessionStage};
use crate::store::{millis_to_rfc3339, now_millis, Database};

/// One use of a break-glass account, as operators review it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct EmergencyUse {
    pub id: String,
    pub account_id: String,
    pub username: String,
    pub reason: String,
    /// What was down when it was opened.
    pub outage: String,
    pub started_at: String,
    pub ends_at: String,
    /// Requests made in the emergency session.
    pub actions: i64,
    pub reviewed_by: Option<String>,
    pub reviewed_at: Option<String>,
    pub review_note: Option<String>,
    /// Not reviewed within the configured period.
    pub overdue: bool,
}

#[derive(Clone)]
pub struct BreakGlass {
    db: Database,
    accounts: Accounts,
    keys: KeyStore,
    settings: BreakGlassConfig,
    http: reqwest::Client,
}

impl BreakGlass {
    pub fn new(
        db: Database,
        accounts: Accounts,
        keys: KeyStore,
        settings: BreakGlassConfig,
    ) -> Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(3))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| Error::config("break_glass", format!("HTTP client: {e}")))?;
        Ok(BreakGlass {
            db,
            accounts,
            keys,
            settings,
            http,
        })
    }

    /// Creates an emergency operator account; returns its one-time secret (shown once).
    pub async fn create_account(&self, username: &str) -> Result<(Account, String)> {
        let secret = new_secret();
        let account = self
            .accounts
            .create(AccountRole::Operator, username, &secret, None)
            .await?;
        let mut tx = self.db.begin().await?;
        sqlx::query("UPDATE accounts SET emergency = 1 WHERE id = $1")
            .bind(&account.id)
            .execute(&mut *tx)
            .await?;
        let event = AuditEvent::new(EventKind::SecurityConfiguration, Agent::system())
            .detail(format!("break-glass account created: {}", account.id));
        audit::record(&mut tx, &event).await?;
        tx.commit().await?;
        Ok((account, secret))
    }

    /// Issues a new one-time secret for an emergency account (after a use, or on rotation).
    pub async fn reissue_secret(&self, username: &str) -> Result<String> {
        let account = self
            .accounts
            .by_username(username)
            .await?
            .ok_or_else(|| Error::NotFound(format!("account {username:?}")))?;
        if !self.accounts.is_emergency(&account.id).await? {
            return Err(Error::Invalid(format!(
                "{username:?} is not a break-glass account"
            )));
        }
        let secret = new_secret();
        self.accounts.set_password(username, &secret).await?;
        sqlx::query("UPDATE accounts SET secret_spent_at = NULL WHERE id = $1")
            .bind(&account.id)
            .execute(self.db.write_pool())
            .await?;
        Ok(secret)
    }

    /// Why the normal sign-in path is unavailable, or `None` when it works.
    pub async fn normal_login_outage(&self) -> Option<String> {
        match &self.settings.normal_login_probe_url {
            Some(url) => match self.http.get(url).send().await {
                Ok(response) if response.status().is_success() => None,
                Ok(response) => Some(format!(
                    "identity provider answered {}",
                    response.status().as_u16()
                )),
                Err(_) => Some("identity provider unreachable".to_string()),
            },
            None => {
                let factors = sqlx::query("SELECT 1 FROM totp_factors LIMIT 1")
                    .fetch_optional(self.db.read_pool())
                    .await;
                if factors.is_err() {
                    return Some("second-factor store unreachable".to_string());
                }
                match self.keys.ping().await {
                    Ok(()) => None,
                    Err(_) => Some("key store unreachable".to_string()),
                }
            }
        }
    }

    /// Opens an emergency session: only during an outage of the normal path, with the
    /// account's unspent one-time secret and a stated reason. Refusals are audited.
    pub async fn start(
        &self,
        username: &str,
        secret: &str,
        reason: &str,
        address: Option<IpAddr>,
    ) -> Result<(Session, String)> {
        let reason = reason.trim();
        if reason.chars().count() < 10 || reason.chars().count() > 500 {
            return Err(Error::Invalid(
                "say why break-glass is needed (10 to 500 characters)".into(),
            ));
        }
        let Some(outage) = self.normal_login_outage().await else {
            self.audit_refusal(
                address,
                "break-glass refused: the normal sign-in path works",
            )
            .await?;
            return Err(Error::Forbidden(
                "the normal sign-in path works: sign in with your own account and second factor",
            ));
        };
        let account = self
            .accounts
            .check_password(username, secret, address)
            .await?;
        if !self.accounts.is_emergency(&account.id).await? {
            self.audit_refusal(address, "break-glass refused: not an emergency account")
                .await?;
            return Err(Error::Unauthenticated("wrong username or password"));
        }
        let now = now_millis();
        // Spend the one-time secret first: only one session per secret, even when racing.
        let spent = sqlx::query(
            "UPDATE accounts SET secret_spent_at = $1 WHERE id = $2 AND secret_spent_at IS NULL",
        )
        .bind(now)
        .bind(&account.id)
        .execute(self.db.write_pool())
        .await?
        .rows_affected();
        if spent != 1 {
            self.audit_refusal(address, "break-glass refused: the one-time secret was used")
                .await?;
            return Err(Error::Forbidden(
                "this break-glass secret was already used; a new one must be issued",
            ));
        }
        let lifetime = self.settings.session_minutes as i64 * 60 * 1000;
        let use_id = uuid::Uuid::new_v4().to_string();
        let (session, token) = self
            .accounts
            .open_session(
                &account,
                address,
                NewSession {
                    stage: SessionStage::Complete,
                    method: "break-glass",
                    lifetime_millis: Some(lifetime),
                    emergency_use_id: Some(&use_id),
                    detail: format!("; emergency use {use_id}"),
                },
            )
            .await?;
        let mut tx = self.db.begin().await?;
        sqlx::query(
            "INSERT INTO emergency_uses (id, account_id, session_id, reason, outage, started_at, ends_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&use_id)
        .bind(&account.id)
        .bind(&session.session_id)
        .bind(reason)
        .bind(&outage)
        .bind(now)
        .bind(session.expires_at)
        .execute(&mut *tx)
        .await?;
        let event = AuditEvent::new(EventKind::EmergencyOverride, agent_of(&account, address))
            .detail(format!(
                "break-glass started: use {use_id}; outage: {outage}; reason: {reason}"
            ));
        audit::record(&mut tx, &event).await?;
        tx.commit().await?;
        tracing::warn!(use_id = %use_id, account = %account.id, %outage, "break-glass session started");
        Ok((session, token))
    }

    async fn audit_refusal(&self, address: Option<IpAddr>, detail: &str) -> Result<()> {
        let agent = Agent {
            actor: audit::Actor::Anonymous,
            address,
            token_jti: None,
        };
        let event = AuditEvent::new(EventKind::EmergencyOverride, agent)
            .outcome(Outcome::MinorFailure)
            .detail(detail);
        let mut tx = self.db.begin().await?;
        audit::record(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Records one request of an emergency session (called by the operator extractor).
    pub async fn record_action(&self, use_id: &str, agent: &Agent, action: &str) -> Result<()> {
        let mut tx = self.db.begin().await?;
        sqlx::query("UPDATE emergency_uses SET actions = actions + 1 WHERE id = $1")
            .bind(use_id)
            .execute(&mut *tx)
            .await?;
        let event = AuditEvent::new(EventKind::EmergencyOverride, agent.clone())
            .detail(format!("emergency use {use_id}: {action}"));
        audit::record(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Every use, newest first, with the overdue flag.
    pub async fn uses(&self) -> Result<Vec<EmergencyUse>> {
        let rows = sqlx::query(
            "SELECT e.id, e.account_id, a.username, e.reason, e.outage, e.started_at, e.ends_at,
                    e.actions, e.reviewed_by, e.reviewed_at, e.review_note
             FROM emergency_uses e JOIN accounts a ON a.id = e.account_id
             ORDER BY e.started_at DESC LIMIT 500",
        )
        .fetch_all(self.db.read_pool())
        .await?;
        let now = now_millis();
        let review_millis = self.settings.review_within_hours as i64 * 60 * 60 * 1000;
        rows.iter()
            .map(|row| {
                let started_at: i64 = row.try_get(5)?;
                let reviewed_at: Option<i64> = row.try_get(9)?;
                Ok(EmergencyUse {
                    id: row.try_get(0)?,
                    account_id: row.try_get(1)?,
                    username: row.try_get(2)?,
                    reason: row.try_get(3)?,
                    outage: row.try_get(4)?,
                    started_at: millis_to_rfc3339(started_at),
                    ends_at: millis_to_rfc3339(row.try_get(6)?),
                    actions: row.try_get(7)?,
                    reviewed_by: row.try_get(8)?,
                    reviewed_at: reviewed_at.map(millis_to_rfc3339),
                    review_note: row.try_get(10)?,
                    overdue: reviewed_at.is_none() && now - started_at > review_millis,
                })
            })
            .collect()
    }

    /// The after-the-fact review, by a normal operator other than the one who used it.
    pub async fn review(
        &self,
        use_id: &str,
        reviewer: &Session,
        note: &str,
        address: Option<IpAddr>,
    ) -> Result<()> {
        let note = note.trim();
        if note.is_empty() || note.chars().count() > 2000 {
            return Err(Error::Invalid(
                "write what was checked (1 to 2000 characters)".into(),
            ));
        }
        if reviewer.emergency_use_id.is_some() {
            return Err(Error::Forbidden(
                "a break-glass session cannot review break-glass uses",
            ));
        }
        let account_id: Option<String> =
            sqlx::query_scalar("SELECT account_id FROM emergency_uses WHERE id = $1")
                .bind(use_id)
                .fetch_optional(self.db.read_pool())
                .await?;
        let account_id =
            account_id.ok_or_else(|| Error::NotFound(format!("break-glass use {use_id}")))?;
        if account_id == reviewer.account.id {
            return Err(Error::Forbidden("another operator must review this use"));
        }
        let mut tx = self.db.begin().await?;
        let updated = sqlx::query(
            "UPDATE emergency_uses SET reviewed_by = $1, reviewed_at = $2, review_note = $3
             WHERE id = $4 AND reviewed_at IS NULL",
        )
        .bind(&reviewer.account.id)
        .bind(now_millis())
        .bind(note)
        .bind(use_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if updated != 1 {
            return Err(Error::Conflict("this use was already reviewed".into()));
        }
        let event = AuditEvent::new(
            EventKind::SecurityConfiguration,
            agent_of(&reviewer.account, address),
        )
        .detail(format!("break-glass use {use_id} reviewed"));
        audit::record(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(())
    }
}

/// 256 random bits, base64url: a secret to print, seal in an envelope and keep offline.
pub fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}
