//! Patient and operator accounts (Argon2id password hashes) and their sessions, with idle
//! and absolute timeouts. Failed logins (and failed second factors) lock the account with a
//! doubling lockout and are audited; a per-address limit slows guessing across accounts.
//! A session that still owes its second factor is in the `SecondFactor` stage: it lives
//! five minutes and opens nothing but the second-factor endpoints.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use base64::Engine as _;
use rand::RngCore;
use sha2::{Digest, Sha256};
use sqlx::Row;

use super::{insert_patient, now_millis, Database};
use crate::audit::{self, AccountRole, Actor, Agent, AuditEvent, EventKind, Outcome};
use crate::config::SessionConfig;
use crate::error::{Error, Result};

/// Failed logins from one address per minute before it is slowed down.
const ADDRESS_FAILURES_PER_MINUTE: u32 = 20;
const MAX_LOCKOUT_SECS: u64 = 24 * 60 * 60;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub id: String,
    pub role: AccountRole,
    pub username: String,
    pub patient_id: Option<String>,
}

/// A signed-in session, as the HTTP layer sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub account: Account,
    /// Opaque id of the session (a prefix of its token hash), safe to log and audit.
    pub session_id: String,
    pub expires_at: i64,
    pub stage: SessionStage,
    /// How it was established: `password`, `password+totp`, `passkey`, `break-glass`…
    pub method: String,
    /// Set for a break-glass session: the emergency use it belongs to.
    pub emergency_use_id: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionStage {
    /// The password was right; a second factor is still owed.
    SecondFactor,
    Complete,
}

impl SessionStage {
    fn code(self) -> &'static str {
        match self {
            SessionStage::SecondFactor => "second-factor",
            SessionStage::Complete => "complete",
        }
    }
}

/// How long a session may wait for its second factor.
const SECOND_FACTOR_MILLIS: i64 = 5 * 60 * 1000;

/// A live session as operators see it (never its token).
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct LiveSession {
    pub session_id: String,
    pub account_id: String,
    pub username: String,
    pub role: &'static str,
    pub method: String,
    pub stage: &'static str,
    pub created_at: String,
    pub last_seen_at: String,
    pub expires_at: String,
    pub emergency: bool,
}

/// A new session's settings (see `Accounts::open_session`).
pub struct NewSession<'a> {
    pub stage: SessionStage,
    pub method: &'a str,
    /// Shorter than the configured absolute timeout when set (break-glass time box).
    pub lifetime_millis: Option<i64>,
    pub emergency_use_id: Option<&'a str>,
    pub detail: String,
}

#[derive(Clone)]
pub struct Accounts {
    db: Database,
    policy: SessionConfig,
    failures_by_address: Arc<Mutex<HashMap<IpAddr, (i64, u32)>>>,
    /// Verified against when the username is unknown, so timing does not reveal accounts.
    dummy_hash: Arc<String>,
}

impl Accounts {
    pub fn new(db: Database, policy: SessionConfig) -> Result<Self> {
        let dummy_hash = hash_password("not-a-real-password")?;
        Ok(Accounts {
            db,
            policy,
            failures_by_address: Arc::default(),
            dummy_hash: Arc::new(dummy_hash),
        })
    }

    pub async fn create(
        &self,
        role: AccountRole,
        username: &str,
        password: &str,
        patient_id: Option<&str>,
    ) -> Result<Account> {
        if username.trim().is_empty() || username.len() > 128 {
            return Err(Error::Invalid(
                "username must be 1 to 128 characters".into(),
            ));
        }
        if password.chars().count() < 12 {
            return Err(Error::Invalid(
                "password must be at least 12 characters".into(),
            ));
        }
        if (role == AccountRole::Patient) != patient_id.is_some() {
            return Err(Error::Invalid(
                "a patient account needs a patient id; an operator account has none".into(),
            ));
        }
        let password = password.to_string();
        let hash = tokio::task::spawn_blocking(move || hash_password(&password))
            .await
            .map_err(|_| Error::Crypto("password hashing task failed"))??;
        let account = Account {
            id: uuid::Uuid::new_v4().to_string(),
            role,
            username: username.to_string(),
            patient_id: patient_id.map(str::to_string),
        };
        let now = now_millis();
        let mut tx = self.db.begin().await?;
        if let Some(patient_id) = patient_id {
            insert_patient(&mut tx, patient_id, now).await?;
        }
        let inserted = sqlx::query(
            "INSERT INTO accounts (id, kind, username, password_hash, patient_id, created_at)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (username) DO NOTHING",
        )
        .bind(&account.id)
        .bind(role.code())
        .bind(&account.username)
        .bind(hash)
        .bind(account.patient_id.clone())
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            return Err(Error::Invalid(format!("username {username:?} is taken")));
        }
        let event = AuditEvent::new(EventKind::SecurityConfiguration, Agent::system())
            .detail(format!("account created: {} {}", role.code(), account.id));
        audit::record(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(account)
    }

    /// Replaces an account's password and ends its sessions. Audited.
    pub async fn set_password(&self, username: &str, password: &str) -> Result<()> {
        if password.chars().count() < 12 {
            return Err(Error::Invalid(
                "password must be at least 12 characters".into(),
            ));
        }
        let password = password.to_string();
        let hash = tokio::task::spawn_blocking(move || hash_password(&password))
            .await
            .map_err(|_| Error::Crypto("password hashing task failed"))??;
        let mut tx = self.db.begin().await?;
        let row = sqlx::query("UPDATE accounts SET password_hash = $1, failed_logins = 0, lockouts = 0, locked_until = NULL WHERE username = $2 RETURNING id")
            .bind(hash)
            .bind(username)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| Error::NotFound(format!("account {username:?}")))?;
        let id: String = row.try_get(0)?;
        sqlx::query("UPDATE sessions SET ended_at = $1 WHERE account_id = $2 AND ended_at IS NULL")
            .bind(now_millis())
            .bind(&id)
            .execute(&mut *tx)
            .await?;
        let event = AuditEvent::new(EventKind::SecurityConfiguration, Agent::system())
            .detail(format!("password set for account {id}"));
        audit::record(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Checks a password with the sign-in rules (per-address throttling, lockout after
    /// repeated failures, each failure audited); the account on success.
    pub(crate) async fn check_password(
        &self,
        username: &str,
        password: &str,
        address: Option<IpAddr>,
    ) -> Result<Account> {
        let now = now_millis();
        if let Some(address) = address {
            self.check_address(address, now)?;
        }
        let row = sqlx::query(
            "SELECT id, kind, username, patient_id, password_hash, failed_logins, lockouts, locked_until
             FROM accounts WHERE username = $1",
        )
        .bind(username)
        .fetch_optional(self.db.read_pool())
        .await?;
        let Some(row) = row else {
            let dummy = self.dummy_hash.clone();
            let password = password.to_string();
            let _ = tokio::task::spawn_blocking(move || verify_password(&password, &dummy)).await;
            self.note_address_failure(address, now);
            self.audit_failed_login(None, address, "unknown account")
                .await?;
            return Err(Error::Unauthenticated("wrong username or password"));
        };
        let account = Account {
            id: row.try_get(0)?,
            role: parse_role(&row.try_get::<String, _>(1)?)?,
            username: row.try_get(2)?,
            patient_id: row.try_get(3)?,
        };
        let hash: String = row.try_get(4)?;
        let failed: i64 = row.try_get(5)?;
        let lockouts: i64 = row.try_get(6)?;
        let locked_until: Option<i64> = row.try_get(7)?;
        if let Some(until) = locked_until.filter(|until| *until > now) {
            self.audit_failed_login(Some(&account), address, "account locked")
                .await?;
            return Err(Error::RateLimited {
                retry_after_secs: ((until - now) / 1000).max(1) as u64,
            });
        }

        let candidate = password.to_string();
        let ok = tokio::task::spawn_blocking(move || verify_password(&candidate, &hash))
            .await
            .map_err(|_| Error::Crypto("password verification task failed"))?;
        if !ok {
            self.count_failure(&account, failed, lockouts, address, "wrong password")
                .await?;
            return Err(Error::Unauthenticated("wrong username or password"));
        }

        Ok(account)
    }

    /// A failed second factor (or other proof) for a known account: counted towards its
    /// lockout like a wrong password, and audited.
    pub async fn record_failed_attempt(
        &self,
        account: &Account,
        address: Option<IpAddr>,
        reason: &str,
    ) -> Result<()> {
        let row = sqlx::query("SELECT failed_logins, lockouts FROM accounts WHERE id = $1")
            .bind(&account.id)
            .fetch_one(self.db.read_pool())
            .await?;
        self.count_failure(account, row.try_get(0)?, row.try_get(1)?, address, reason)
            .await
    }

    /// Refuses a locked account (audited), before any proof is checked.
    pub async fn check_not_locked(&self, account: &Account, address: Option<IpAddr>) -> Result<()> {
        let now = now_millis();
        if let Some(address) = address {
            self.check_address(address, now)?;
        }
        let locked_until: Option<i64> =
            sqlx::query_scalar("SELECT locked_until FROM accounts WHERE id = $1")
                .bind(&account.id)
                .fetch_optional(self.db.read_pool())
                .await?
                .flatten();
        if let Some(until) = locked_until.filter(|until| *until > now) {
            self.audit_failed_login(Some(account), address, "account locked")
                .await?;
            return Err(Error::RateLimited {
                retry_after_secs: ((until - now) / 1000).max(1) as u64,
            });
        }
        Ok(())
    }

    async fn count_failure(
        &self,
        account: &Account,
        failed: i64,
        lockouts: i64,
        address: Option<IpAddr>,
        reason: &str,
    ) -> Result<()> {
        let now = now_millis();
        self.note_address_failure(address, now);
        let failed = failed + 1;
        let mut tx = self.db.begin().await?;
        if failed >= i64::from(self.policy.max_failed_logins) {
            let lockouts = lockouts + 1;
            let secs = lockout_secs(self.policy.lockout_secs, lockouts as u32);
            sqlx::query("UPDATE accounts SET failed_logins = 0, lockouts = $1, locked_until = $2 WHERE id = $3")
                .bind(lockouts)
                .bind(now + secs as i64 * 1000)
                .bind(&account.id)
                .execute(&mut *tx)
                .await?;
        } else {
            sqlx::query("UPDATE accounts SET failed_logins = $1 WHERE id = $2")
                .bind(failed)
                .bind(&account.id)
                .execute(&mut *tx)
                .await?;
        }
        audit::record(&mut tx, &failed_login(Some(account), address, reason)).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Step-up: the signed-in account proves itself again with its password before an
    /// irreversible action (e.g. erasing the record). Same throttling and lockout as
    /// sign-in; audited either way.
    pub async fn step_up(
        &self,
        account: &Account,
        password: &str,
        address: Option<IpAddr>,
        purpose: &str,
    ) -> Result<()> {
        let checked = self
            .check_password(&account.username, password, address)
            .await?;
        if checked.id != account.id {
            return Err(Error::Unauthenticated("wrong username or password"));
        }
        let mut tx = self.db.begin().await?;
        sqlx::query("UPDATE accounts SET failed_logins = 0 WHERE id = $1")
            .bind(&account.id)
            .execute(&mut *tx)
            .await?;
        let event = AuditEvent::new(EventKind::Login, agent_of(account, address))
            .detail(format!("step-up re-authentication for {purpose}"));
        audit::record(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Checks the password and opens a session. Returns the session and its bearer token
    /// (shown once; only its hash is stored).
    pub async fn login(
        &self,
        username: &str,
        password: &str,
        address: Option<IpAddr>,
    ) -> Result<(Session, String)> {
        let account = self.check_password(username, password, address).await?;
        if self.is_emergency(&account.id).await? {
            self.audit_failed_login(
                Some(&account),
                address,
                "break-glass account used on the normal sign-in path",
            )
            .await?;
            return Err(Error::Forbidden(
                "emergency accounts sign in only through break-glass",
            ));
        }
        let factors = self.second_factors_enrolled(&account.id).await?;
        if account.role == AccountRole::Operator && !factors {
            self.audit_failed_login(Some(&account), address, "operator has no second factor")
                .await?;
            return Err(Error::Forbidden(
                "this operator account has no second factor; enrol one with `phr-gateway operator enrol-totp`",
            ));
        }
        let stage = if factors {
            SessionStage::SecondFactor
        } else {
            SessionStage::Complete
        };
        self.open_session(
            &account,
            address,
            NewSession {
                stage,
                method: "password",
                lifetime_millis: None,
                emergency_use_id: None,
                detail: String::new(),
            },
        )
        .await
    }

    /// Opens a session for an account whose credentials were checked, and resets its
    /// failure count. Returns the session and its bearer token (shown once; only its hash
    /// is stored).
    pub async fn open_session(
        &self,
        account: &Account,
        address: Option<IpAddr>,
        new: NewSession<'_>,
    ) -> Result<(Session, String)> {
        let now = now_millis();
        let token = new_token();
        let token_hash = hash_token(&token);
        let absolute = self.policy.absolute_timeout_secs as i64 * 1000;
        let expires_at = match new.stage {
            SessionStage::SecondFactor => now + SECOND_FACTOR_MILLIS.min(absolute),
            SessionStage::Complete => now + new.lifetime_millis.unwrap_or(absolute).min(absolute),
        };
        let mut tx = self.db.begin().await?;
        if new.stage == SessionStage::Complete {
            sqlx::query("UPDATE accounts SET failed_logins = 0, lockouts = 0, locked_until = NULL WHERE id = $1")
                .bind(&account.id)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query(
            "INSERT INTO sessions (token_hash, account_id, created_at, last_seen_at, expires_at, stage, method, emergency_use_id)
             VALUES ($1, $2, $3, $3, $4, $5, $6, $7)",
        )
        .bind(token_hash.to_vec())
        .bind(&account.id)
        .bind(now)
        .bind(expires_at)
        .bind(new.stage.code())
        .bind(new.method)
        .bind(new.emergency_use_id)
        .execute(&mut *tx)
        .await?;
        let stage_note = match new.stage {
            SessionStage::SecondFactor => "; second factor owed",
            SessionStage::Complete => "",
        };
        let event = AuditEvent::new(EventKind::Login, agent_of(account, address)).detail(format!(
            "session {} by {}{stage_note}{}",
            session_id(&token_hash),
            new.method,
            new.detail
        ));
        audit::record(&mut tx, &event).await?;
        tx.commit().await?;
        Ok((
            Session {
                account: account.clone(),
                session_id: session_id(&token_hash),
                expires_at,
                stage: new.stage,
                method: new.method.to_string(),
                emergency_use_id: new.emergency_use_id.map(str::to_string),
            },
            token,
        ))
    }

    /// The second factor was proven: the session is complete and gets its full lifetime.
    pub async fn complete_second_factor(
        &self,
        session: &Session,
        token: &str,
        factor: &str,
        address: Option<IpAddr>,
    ) -> Result<Session> {
        let now = now_millis();
        let expires_at = now + self.policy.absolute_timeout_secs as i64 * 1000;
        let method = format!("{}+{factor}", session.method);
        let mut tx = self.db.begin().await?;
        let updated = sqlx::query(
            "UPDATE sessions SET stage = 'complete', method = $1, expires_at = $2, last_seen_at = $3
             WHERE token_hash = $4 AND stage = 'second-factor' AND ended_at IS NULL",
        )
        .bind(&method)
        .bind(expires_at)
        .bind(now)
        .bind(hash_token(token).to_vec())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if updated != 1 {
            return Err(Error::Unauthenticated("unknown or expired session"));
        }
        sqlx::query(
            "UPDATE accounts SET failed_logins = 0, lockouts = 0, locked_until = NULL WHERE id = $1",
        )
        .bind(&session.account.id)
        .execute(&mut *tx)
        .await?;
        let event = AuditEvent::new(EventKind::Login, agent_of(&session.account, address)).detail(
            format!("session {} second factor {factor}", session.session_id),
        );
        audit::record(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(Session {
            expires_at,
            stage: SessionStage::Complete,
            method,
            ..session.clone()
        })
    }

    /// Whether the account has a confirmed TOTP secret or a passkey.
    pub async fn second_factors_enrolled(&self, account_id: &str) -> Result<bool> {
        let count: i64 = sqlx::query_scalar(
            "SELECT (SELECT COUNT(*) FROM totp_factors WHERE account_id = $1 AND secret_sealed IS NOT NULL)
                  + (SELECT COUNT(*) FROM passkeys WHERE account_id = $1)",
        )
        .bind(account_id)
        .fetch_one(self.db.read_pool())
        .await?;
        Ok(count > 0)
    }

    pub async fn is_emergency(&self, account_id: &str) -> Result<bool> {
        let flag: Option<i64> = sqlx::query_scalar("SELECT emergency FROM accounts WHERE id = $1")
            .bind(account_id)
            .fetch_optional(self.db.read_pool())
            .await?;
        Ok(flag.unwrap_or(0) != 0)
    }

    /// The account by username (for passkey sign-in, which has no password step).
    pub async fn by_username(&self, username: &str) -> Result<Option<Account>> {
        let row =
            sqlx::query("SELECT id, kind, username, patient_id FROM accounts WHERE username = $1")
                .bind(username)
                .fetch_optional(self.db.read_pool())
                .await?;
        row.map(|row| {
            Ok(Account {
                id: row.try_get(0)?,
                role: parse_role(&row.try_get::<String, _>(1)?)?,
                username: row.try_get(2)?,
                patient_id: row.try_get(3)?,
            })
        })
        .transpose()
    }

    /// Live sessions, newest first (at most 500), for operators.
    pub async fn live_sessions(&self) -> Result<Vec<LiveSession>> {
        let rows = sqlx::query(
            "SELECT s.token_hash, a.id, a.username, a.kind, s.method, s.stage, s.created_at,
                    s.last_seen_at, s.expires_at, s.emergency_use_id
             FROM sessions s JOIN accounts a ON a.id = s.account_id
             WHERE s.ended_at IS NULL AND s.expires_at > $1
             ORDER BY s.created_at DESC LIMIT 500",
        )
        .bind(now_millis())
        .fetch_all(self.db.read_pool())
        .await?;
        rows.iter()
            .map(|row| {
                let hash: Vec<u8> = row.try_get(0)?;
                let stage: String = row.try_get(5)?;
                Ok(LiveSession {
                    session_id: hex::encode(&hash[..hash.len().min(8)]),
                    account_id: row.try_get(1)?,
                    username: row.try_get(2)?,
                    role: parse_role(&row.try_get::<String, _>(3)?)?.code(),
                    method: row.try_get(4)?,
                    stage: if stage == "complete" {
                        "complete"
                    } else {
                        "second-factor"
                    },
                    created_at: super::millis_to_rfc3339(row.try_get(6)?),
                    last_seen_at: super::millis_to_rfc3339(row.try_get(7)?),
                    expires_at: super::millis_to_rfc3339(row.try_get(8)?),
                    emergency: row.try_get::<Option<String>, _>(9)?.is_some(),
                })
            })
            .collect()
    }

    /// Ends another session by its id (an operator action). Audited.
    pub async fn end_session(
        &self,
        target: &str,
        by: &Session,
        address: Option<IpAddr>,
    ) -> Result<()> {
        let rows = sqlx::query(
            "SELECT token_hash, account_id FROM sessions WHERE ended_at IS NULL AND expires_at > $1",
        )
        .bind(now_millis())
        .fetch_all(self.db.read_pool())
        .await?;
        let mut found = None;
        for row in &rows {
            let hash: Vec<u8> = row.try_get(0)?;
            if hash.len() >= 8 && hex::encode(&hash[..8]) == target {
                found = Some((hash, row.try_get::<String, _>(1)?));
            }
        }
        let (hash, account_id) =
            found.ok_or_else(|| Error::NotFound(format!("live session {target}")))?;
        let mut tx = self.db.begin().await?;
        sqlx::query("UPDATE sessions SET ended_at = $1 WHERE token_hash = $2 AND ended_at IS NULL")
            .bind(now_millis())
            .bind(hash)
            .execute(&mut *tx)
            .await?;
        let event = AuditEvent::new(EventKind::Logout, agent_of(&by.account, address)).detail(
            format!("session {target} of account {account_id} ended by an operator"),
        );
        audit::record(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Resolves a bearer token to its live session, enforcing the idle and absolute timeouts.
    pub async fn authenticate(&self, token: &str) -> Result<Session> {
        let token_hash = hash_token(token);
        let row = sqlx::query(
            "SELECT a.id, a.kind, a.username, a.patient_id, s.last_seen_at, s.expires_at, s.ended_at,
                    s.stage, s.method, s.emergency_use_id
             FROM sessions s JOIN accounts a ON a.id = s.account_id WHERE s.token_hash = $1",
        )
        .bind(token_hash.to_vec())
        .fetch_optional(self.db.read_pool())
        .await?
        .ok_or(Error::Unauthenticated("unknown or expired session"))?;
        let now = now_millis();
        let last_seen: i64 = row.try_get(4)?;
        let expires_at: i64 = row.try_get(5)?;
        let ended_at: Option<i64> = row.try_get(6)?;
        if ended_at.is_some() || now >= expires_at {
            return Err(Error::Unauthenticated("unknown or expired session"));
        }
        if now - last_seen >= self.policy.idle_timeout_secs as i64 * 1000 {
            return Err(Error::Unauthenticated("session ended after inactivity"));
        }
        // Refreshing at most every few seconds keeps reads from becoming writes.
        if now - last_seen > 5_000 {
            sqlx::query("UPDATE sessions SET last_seen_at = $1 WHERE token_hash = $2")
                .bind(now)
                .bind(token_hash.to_vec())
                .execute(self.db.write_pool())
                .await?;
        }
        Ok(Session {
            account: Account {
                id: row.try_get(0)?,
                role: parse_role(&row.try_get::<String, _>(1)?)?,
                username: row.try_get(2)?,
                patient_id: row.try_get(3)?,
            },
            session_id: session_id(&token_hash),
            expires_at,
            stage: if row.try_get::<String, _>(7)? == "complete" {
                SessionStage::Complete
            } else {
                SessionStage::SecondFactor
            },
            method: row.try_get(8)?,
            emergency_use_id: row.try_get(9)?,
        })
    }

    pub async fn logout(
        &self,
        session: &Session,
        token: &str,
        address: Option<IpAddr>,
    ) -> Result<()> {
        let mut tx = self.db.begin().await?;
        sqlx::query("UPDATE sessions SET ended_at = $1 WHERE token_hash = $2 AND ended_at IS NULL")
            .bind(now_millis())
            .bind(hash_token(token).to_vec())
            .execute(&mut *tx)
            .await?;
        let event = AuditEvent::new(EventKind::Logout, agent_of(&session.account, address))
            .detail(format!("session {}", session.session_id));
        audit::record(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(())
    }

    fn check_address(&self, address: IpAddr, now: i64) -> Result<()> {
        let Ok(map) = self.failures_by_address.lock() else {
            return Ok(());
        };
        if let Some((window_start, count)) = map.get(&address) {
            if now - window_start < 60_000 && *count >= ADDRESS_FAILURES_PER_MINUTE {
                return Err(Error::RateLimited {
                    retry_after_secs: ((60_000 - (now - window_start)) / 1000).max(1) as u64,
                });
            }
        }
        Ok(())
    }

    fn note_address_failure(&self, address: Option<IpAddr>, now: i64) {
        let (Some(address), Ok(mut map)) = (address, self.failures_by_address.lock()) else {
            return;
        };
        let entry = map.entry(address).or_insert((now, 0));
        if now - entry.0 >= 60_000 {
            *entry = (now, 0);
        }
        entry.1 += 1;
    }

    async fn audit_failed_login(
        &self,
        account: Option<&Account>,
        address: Option<IpAddr>,
        reason: &str,
    ) -> Result<()> {
        let mut tx = self.db.begin().await?;
        audit::record(&mut tx, &failed_login(account, address, reason)).await?;
        tx.commit().await?;
        Ok(())
    }
}

fn failed_login(account: Option<&Account>, address: Option<IpAddr>, reason: &str) -> AuditEvent {
    let agent = match account {
        Some(account) => agent_of(account, address),
        None => Agent {
            actor: Actor::Anonymous,
            address,
            token_jti: None,
        },
    };
    AuditEvent::new(EventKind::Login, agent)
        .outcome(Outcome::MinorFailure)
        .detail(reason)
}

pub fn agent_of(account: &Account, address: Option<IpAddr>) -> Agent {
    Agent {
        actor: Actor::Account {
            id: account.id.clone(),
            role: account.role,
        },
        address,
        token_jti: None,
    }
}

/// The lockout after the n-th lockout: doubling from the configured base, capped at a day.
pub fn lockout_secs(base: u64, lockouts: u32) -> u64 {
    let factor = 1u64
        .checked_shl(lockouts.saturating_sub(1))
        .unwrap_or(u64::MAX);
    base.saturating_mul(factor).min(MAX_LOCKOUT_SECS)
}

fn parse_role(kind: &str) -> Result<AccountRole> {
    match kind {
        "patient" => Ok(AccountRole::Patient),
        "operator" => Ok(AccountRole::Operator),
        other => Err(Error::Invalid(format!("unknown account kind {other:?}"))),
    }
}

fn hash_password(password: &str) -> Result<String> {
    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|_| Error::Crypto("password hashing failed"))
}

fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash)
        .map(|parsed| {
            Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        })
        .unwrap_or(false)
}

fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn hash_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn session_id(token_hash: &[u8; 32]) -> String {
    hex::encode(&token_hash[..8])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lockout_doubles_and_caps_at_a_day() {
        let cases = [
            (300, 1, 300),
            (300, 2, 600),
            (300, 3, 1200),
            (300, 10, 86_400),
            (300, 200, 86_400),
            (0, 5, 0),
        ];
        for (base, n, expected) in cases {
            assert_eq!(lockout_secs(base, n), expected, "base {base} lockout {n}");
        }
    }

    #[test]
    fn password_hashes_are_argon2id_and_verify() {
        let hash = hash_password("correct horse battery").unwrap();
        assert!(hash.starts_with("$argon2id$"));
        assert!(verify_password("correct horse battery", &hash));
        assert!(!verify_password("wrong", &hash));
        assert!(!verify_password("x", "not a hash"));
    }
}
