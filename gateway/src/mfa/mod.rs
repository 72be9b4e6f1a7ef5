//! Second factors: TOTP (RFC 6238), passkeys (WebAuthn) and single-use recovery codes.
//! Operators prove one at every sign-in; patients once they have enrolled one, and a
//! passkey alone signs a patient in (it is possession plus the device's user verification).
//! Secrets are sealed with the account's own key; every enrolment, use and failure is
//! audited, and failures count towards the account's lockout like wrong passwords.

pub mod passkeys;
pub mod recovery;
pub mod totp;

use std::net::IpAddr;
use std::sync::{Arc, OnceLock};

use serde::Serialize;
use sqlx::Row;
use utoipa::ToSchema;

use crate::audit::{self, AccountRole, AuditEvent, EventKind};
use crate::crypto::envelope::DataKey;
use crate::error::{Error, Result};
use crate::keystore::KeyStore;
use crate::store::accounts::{agent_of, Account, Accounts, Session};
use crate::store::{now_millis, Database};

pub use passkeys::Passkeys;

/// What an account has enrolled (never the secrets themselves).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, ToSchema)]
pub struct EnrolledFactors {
    pub totp: bool,
    pub passkeys: Vec<PasskeyInfo>,
    pub recovery_codes_left: u32,
}

impl EnrolledFactors {
    /// Whether anything but a recovery code can be proven.
    pub fn any(&self) -> bool {
        self.totp || !self.passkeys.is_empty()
    }

    /// The proofs this account can offer, for the sign-in answer.
    pub fn methods(&self) -> Vec<&'static str> {
        let mut methods = Vec::new();
        if self.totp {
            methods.push("totp");
        }
        if !self.passkeys.is_empty() {
            methods.push("passkey");
        }
        if self.recovery_codes_left > 0 {
            methods.push("recovery-code");
        }
        methods
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct PasskeyInfo {
    pub id: String,
    pub name: String,
    pub created_at: String,
    pub last_used_at: Option<String>,
}

/// A new TOTP secret waiting for its first code. Shown once.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TotpEnrolment {
    /// The secret in base32, to type into an authenticator app.
    pub secret: String,
    /// The same as an `otpauth://` URI (what a QR code carries).
    pub otpauth_uri: String,
}

/// The second factors of every account.
#[derive(Clone)]
pub struct SecondFactors {
    db: Database,
    keys: KeyStore,
    accounts: Accounts,
    pub passkeys: Passkeys,
}

impl SecondFactors {
    pub fn new(
        db: Database,
        keys: KeyStore,
        accounts: Accounts,
        public_url: Arc<OnceLock<String>>,
        configured_url: Option<String>,
        listen_port: u16,
    ) -> Self {
        SecondFactors {
            passkeys: Passkeys::new(db.clone(), public_url, configured_url, listen_port),
            db,
            keys,
            accounts,
        }
    }

    pub async fn enrolled(&self, account_id: &str) -> Result<EnrolledFactors> {
        let totp: Option<i64> = sqlx::query_scalar(
            "SELECT confirmed_at FROM totp_factors WHERE account_id = $1 AND secret_sealed IS NOT NULL",
        )
        .bind(account_id)
        .fetch_optional(self.db.read_pool())
        .await?
        .flatten();
        let left: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM recovery_codes WHERE account_id = $1 AND used_at IS NULL",
        )
        .bind(account_id)
        .fetch_one(self.db.read_pool())
        .await?;
        Ok(EnrolledFactors {
            totp: totp.is_some(),
            passkeys: self.passkeys.list(account_id).await?,
            recovery_codes_left: left as u32,
        })
    }

    async fn account_key(&self, account_id: &str) -> Result<DataKey> {
        Ok(self
            .keys
            .data_key_or_create(&account_key_id(account_id))
            .await?
            .0)
    }

    /// Starts (or restarts) TOTP enrolment with a fresh secret. A confirmed secret stays in
    /// force until the new one is confirmed with a code.
    pub async fn begin_totp(&self, account: &Account) -> Result<TotpEnrolment> {
        let mut secret = [0u8; totp::SECRET_LEN];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut secret);
        let key = self.account_key(&account.id).await?;
        let sealed = key.seal(&totp_aad(&account.id), &secret)?;
        sqlx::query(
            "INSERT INTO totp_factors (account_id, pending_sealed, created_at) VALUES ($1, $2, $3)
             ON CONFLICT (account_id) DO UPDATE SET pending_sealed = excluded.pending_sealed",
        )
        .bind(&account.id)
        .bind(sealed)
        .bind(now_millis())
        .execute(self.db.write_pool())
        .await?;
        Ok(TotpEnrolment {
            secret: totp::base32(&secret),
            otpauth_uri: totp::otpauth_uri(&secret, &account.username)?,
        })
    }

    /// Gives an account a TOTP secret in force at once, replacing any earlier one (the
    /// administrator's path: `phr-gateway operator add`, or a lost device). Audited.
    pub async fn provision_totp(&self, account: &Account) -> Result<TotpEnrolment> {
        let mut secret = zeroize::Zeroizing::new([0u8; totp::SECRET_LEN]);
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, secret.as_mut());
        let key = self.account_key(&account.id).await?;
        let sealed = key.seal(&totp_aad(&account.id), secret.as_ref())?;
        let now = now_millis();
        let mut tx = self.db.begin().await?;
        sqlx::query(
            "INSERT INTO totp_factors (account_id, secret_sealed, confirmed_at, last_step, created_at)
             VALUES ($1, $2, $3, 0, $3)
             ON CONFLICT (account_id) DO UPDATE SET secret_sealed = excluded.secret_sealed,
                 pending_sealed = NULL, confirmed_at = excluded.confirmed_at, last_step = 0",
        )
        .bind(&account.id)
        .bind(sealed)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let event = AuditEvent::new(
            EventKind::SecurityConfiguration,
            crate::audit::Agent::system(),
        )
        .detail(format!(
            "second factor provisioned: totp for account {}",
            account.id
        ));
        audit::record(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(TotpEnrolment {
            secret: totp::base32(secret.as_ref()),
            otpauth_uri: totp::otpauth_uri(secret.as_ref(), &account.username)?,
        })
    }

    /// Confirms the pending secret with a code from it; it replaces any earlier secret.
    pub async fn confirm_totp(
        &self,
        account: &Account,
        code: &str,
        address: Option<IpAddr>,
    ) -> Result<()> {
        let pending: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT pending_sealed FROM totp_factors WHERE account_id = $1")
                .bind(&account.id)
                .fetch_optional(self.db.read_pool())
                .await?
                .flatten();
        let pending = pending.ok_or_else(|| {
            Error::Conflict("no TOTP enrolment is waiting; start one first".into())
        })?;
        let key = self.account_key(&account.id).await?;
        let secret = zeroize::Zeroizing::new(key.open(&totp_aad(&account.id), &pending)?);
        let step = match totp::check(&secret, code, now_secs(), 0)? {
            Ok(step) => step,
            Err(rejection) => {
                self.accounts
                    .record_failed_attempt(account, address, rejection.reason())
                    .await?;
                return Err(Error::Unauthenticated("wrong TOTP code"));
            }
        };
        let mut tx = self.db.begin().await?;
        sqlx::query(
            "UPDATE totp_factors SET secret_sealed = pending_sealed, pending_sealed = NULL,
             confirmed_at = $1, last_step = $2 WHERE account_id = $3",
        )
        .bind(now_millis())
        .bind(step as i64)
        .bind(&account.id)
        .execute(&mut *tx)
        .await?;
        let event = AuditEvent::new(EventKind::SecurityConfiguration, agent_of(account, address))
            .detail("second factor enrolled: totp");
        audit::record(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Checks a TOTP code; a step is accepted once, across every gateway process.
    async fn check_totp(&self, account: &Account, code: &str) -> Result<Result<(), &'static str>> {
        let row = sqlx::query(
            "SELECT secret_sealed, last_step FROM totp_factors
             WHERE account_id = $1 AND secret_sealed IS NOT NULL",
        )
        .bind(&account.id)
        .fetch_optional(self.db.read_pool())
        .await?;
        let Some(row) = row else {
            return Ok(Err("no TOTP enrolled"));
        };
        let sealed: Vec<u8> = row.try_get(0)?;
        let last_step: i64 = row.try_get(1)?;
        let key = self.account_key(&account.id).await?;
        let secret = zeroize::Zeroizing::new(key.open(&totp_aad(&account.id), &sealed)?);
        let step = match totp::check(&secret, code, now_secs(), last_step.max(0) as u64)? {
            Ok(step) => step,
            Err(rejection) => return Ok(Err(rejection.reason())),
        };
        // The conditional update is the replay guard: two requests with one code cannot both
        // move `last_step` to the same step.
        let moved = sqlx::query(
            "UPDATE totp_factors SET last_step = $1 WHERE account_id = $2 AND last_step < $1",
        )
        .bind(step as i64)
        .bind(&account.id)
        .execute(self.db.write_pool())
        .await?
        .rows_affected();
        Ok(if moved == 1 {
            Ok(())
        } else {
            Err(totp::TotpRejection::Reused.reason())
        })
    }

    /// A fresh set of recovery codes, replacing any earlier set. Shown once.
    pub async fn issue_recovery_codes(
        &self,
        account: &Account,
        address: Option<IpAddr>,
    ) -> Result<Vec<String>> {
        let codes = recovery::new_codes();
        let now = now_millis();
        let mut tx = self.db.begin().await?;
        sqlx::query("DELETE FROM recovery_codes WHERE account_id = $1")
            .bind(&account.id)
            .execute(&mut *tx)
            .await?;
        for code in &codes {
            sqlx::query(
                "INSERT INTO recovery_codes (account_id, code_hash, created_at) VALUES ($1, $2, $3)",
            )
            .bind(&account.id)
            .bind(recovery::hash(code))
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        let event = AuditEvent::new(EventKind::SecurityConfiguration, agent_of(account, address))
            .detail("recovery codes issued");
        audit::record(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(codes)
    }

    async fn spend_recovery_code(&self, account: &Account, code: &str) -> Result<bool> {
        let spent = sqlx::query(
            "UPDATE recovery_codes SET used_at = $1
             WHERE account_id = $2 AND code_hash = $3 AND used_at IS NULL",
        )
        .bind(now_millis())
        .bind(&account.id)
        .bind(recovery::hash(code))
        .execute(self.db.write_pool())
        .await?
        .rows_affected();
        Ok(spent == 1)
    }

    /// Checks a second factor for an account: a failure counts towards its lockout and is
    /// audited. Returns the method proven.
    pub async fn verify(
        &self,
        account: &Account,
        proof: &Proof,
        address: Option<IpAddr>,
    ) -> Result<&'static str> {
        self.accounts.check_not_locked(account, address).await?;
        let outcome = match proof {
            Proof::Totp(code) => self.check_totp(account, code).await?.map(|()| "totp"),
            Proof::RecoveryCode(code) => {
                if self.spend_recovery_code(account, code).await? {
                    Ok("recovery-code")
                } else {
                    Err("wrong or used recovery code")
                }
            }
            Proof::Passkey {
                ceremony,
                credential,
            } => self
                .passkeys
                .finish_authentication(account, ceremony, credential)
                .await?
                .map(|()| "passkey"),
        };
        match outcome {
            Ok(method) => Ok(method),
            Err(reason) => {
                self.accounts
                    .record_failed_attempt(account, address, reason)
                    .await?;
                Err(Error::Unauthenticated("the second factor was not accepted"))
            }
        }
    }

    /// Proves the second factor of a session waiting for one: the session becomes complete.
    pub async fn complete_sign_in(
        &self,
        session: &Session,
        token: &str,
        proof: &Proof,
        address: Option<IpAddr>,
    ) -> Result<Session> {
        let method = self.verify(&session.account, proof, address).await?;
        let session = self
            .accounts
            .complete_second_factor(session, token, method, address)
            .await?;
        if method == "recovery-code" {
            let left = self
                .enrolled(&session.account.id)
                .await?
                .recovery_codes_left;
            tracing::warn!(account = %session.account.id, left, "signed in with a recovery code");
        }
        Ok(session)
    }

    /// Step-up before a far-reaching action (export, transfer, erasure): the password
    /// again and, when the account has a second factor, that too. Both are audited and
    /// count towards the lockout when wrong.
    pub async fn step_up(
        &self,
        account: &Account,
        password: &str,
        second_factor: Option<&Proof>,
        address: Option<IpAddr>,
        purpose: &str,
    ) -> Result<()> {
        self.accounts
            .step_up(account, password, address, purpose)
            .await?;
        if !self.enrolled(&account.id).await?.any() {
            return Ok(());
        }
        let Some(proof) = second_factor else {
            self.accounts
                .record_failed_attempt(account, address, "step-up without the second factor")
                .await?;
            return Err(Error::Unauthenticated(
                "this account has a second factor: send its code too",
            ));
        };
        let method = self.verify(account, proof, address).await?;
        let mut tx = self.db.begin().await?;
        let event = AuditEvent::new(EventKind::Login, agent_of(account, address))
            .detail(format!("step-up second factor {method} for {purpose}"));
        audit::record(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Whether this account must prove a second factor after its password: operators
    /// always, patients once they have enrolled one.
    pub async fn required(&self, account: &Account) -> Result<bool> {
        Ok(account.role == AccountRole::Operator || self.enrolled(&account.id).await?.any())
    }
}

/// A second-factor proof as sent by the client.
#[derive(Debug, Clone)]
pub enum Proof {
    Totp(String),
    RecoveryCode(String),
    Passkey {
        ceremony: String,
        credential: Box<webauthn_rs::prelude::PublicKeyCredential>,
    },
}

impl Proof {
    /// A typed code: a recovery code (sixteen characters in groups) or a six-digit TOTP code.
    pub fn from_code(code: &str) -> Proof {
        let code = code.trim();
        if code.chars().filter(|c| c.is_ascii_alphanumeric()).count() > 8 {
            Proof::RecoveryCode(code.to_string())
        } else {
            Proof::Totp(code.to_string())
        }
    }
}

/// The key-store id of an account's own key (distinct from every patient id).
pub fn account_key_id(account_id: &str) -> String {
    format!("account:{account_id}")
}

fn totp_aad(account_id: &str) -> Vec<u8> {
    format!("phr-gateway/totp/v1/{account_id}").into_bytes()
}

fn now_secs() -> u64 {
    (now_millis() / 1000).max(0) as u64
}
