//! Passkeys (WebAuthn) through webauthn-rs: registration and authentication ceremonies
//! whose server-side state waits in the database between start and finish (so any gateway
//! process can finish what another started), single use and expiring after five minutes.
//! A signature counter that goes backwards means a cloned authenticator: refused.

use std::net::IpAddr;
use std::sync::{Arc, OnceLock};

use base64::Engine as _;
use sqlx::Row;
use webauthn_rs::prelude::{
    CreationChallengeResponse, Passkey, PasskeyAuthentication, PasskeyRegistration,
    PublicKeyCredential, RegisterPublicKeyCredential, RequestChallengeResponse, Url,
};
use webauthn_rs::{Webauthn, WebauthnBuilder};

use super::PasskeyInfo;
use crate::audit::{self, AuditEvent, EventKind};
use crate::error::{Error, Result};
use crate::store::accounts::{agent_of, Account};
use crate::store::{millis_to_rfc3339, now_millis, Database};

const CEREMONY_MILLIS: i64 = 5 * 60 * 1000;
const MAX_PASSKEYS: usize = 10;

#[derive(Clone)]
pub struct Passkeys {
    db: Database,
    /// Built on first use: the relying party is the gateway's public origin, known only
    /// once the listener is bound.
    webauthn: Arc<OnceLock<Webauthn>>,
    public_url: Arc<OnceLock<String>>,
    configured_url: Option<String>,
    listen_port: u16,
}

impl Passkeys {
    pub fn new(
        db: Database,
        public_url: Arc<OnceLock<String>>,
        configured_url: Option<String>,
        listen_port: u16,
    ) -> Self {
        Passkeys {
            db,
            webauthn: Arc::default(),
            public_url,
            configured_url,
            listen_port,
        }
    }

    fn webauthn(&self) -> Result<&Webauthn> {
        if let Some(webauthn) = self.webauthn.get() {
            return Ok(webauthn);
        }
        let base = self
            .configured_url
            .clone()
            .or_else(|| self.public_url.get().cloned())
            .unwrap_or_else(|| format!("https://localhost:{}", self.listen_port));
        let origin = Url::parse(&base)
            .map_err(|_| Error::config("public_url", "not a URL usable as a WebAuthn origin"))?;
        let rp_id = origin
            .host_str()
            .ok_or_else(|| Error::config("public_url", "has no host for WebAuthn"))?
            .to_string();
        let built = WebauthnBuilder::new(&rp_id, &origin)
            .and_then(|b| b.rp_name("phr-gateway").build())
            .map_err(|_| Error::config("public_url", "not usable as a WebAuthn relying party"))?;
        Ok(self.webauthn.get_or_init(|| built))
    }

    pub async fn list(&self, account_id: &str) -> Result<Vec<PasskeyInfo>> {
        let rows = sqlx::query(
            "SELECT credential_id, name, created_at, last_used_at FROM passkeys
             WHERE account_id = $1 ORDER BY created_at",
        )
        .bind(account_id)
        .fetch_all(self.db.read_pool())
        .await?;
        rows.iter()
            .map(|row| {
                Ok(PasskeyInfo {
                    id: row.try_get(0)?,
                    name: row.try_get(1)?,
                    created_at: millis_to_rfc3339(row.try_get(2)?),
                    last_used_at: row.try_get::<Option<i64>, _>(3)?.map(millis_to_rfc3339),
                })
            })
            .collect()
    }

    async fn stored(&self, account_id: &str) -> Result<Vec<(Passkey, i64)>> {
        let rows = sqlx::query("SELECT passkey, counter FROM passkeys WHERE account_id = $1")
            .bind(account_id)
            .fetch_all(self.db.read_pool())
            .await?;
        rows.iter()
            .map(|row| {
                let json: String = row.try_get(0)?;
                let passkey: Passkey = serde_json::from_str(&json)
                    .map_err(|_| Error::Crypto("a stored passkey does not parse"))?;
                Ok((passkey, row.try_get(1)?))
            })
            .collect()
    }

    async fn save_ceremony(&self, account_id: &str, kind: &str, state: String) -> Result<String> {
        let id = uuid::Uuid::new_v4().to_string();
        let now = now_millis();
        sqlx::query("DELETE FROM webauthn_ceremonies WHERE expires_at < $1")
            .bind(now)
            .execute(self.db.write_pool())
            .await?;
        sqlx::query(
            "INSERT INTO webauthn_ceremonies (id, account_id, kind, state, expires_at)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&id)
        .bind(account_id)
        .bind(kind)
        .bind(state)
        .bind(now + CEREMONY_MILLIS)
        .execute(self.db.write_pool())
        .await?;
        Ok(id)
    }

    /// Takes a ceremony's state: it can be finished once, by the account that started it.
    async fn take_ceremony(&self, id: &str, account_id: &str, kind: &str) -> Result<String> {
        let state: Option<String> = sqlx::query_scalar(
            "DELETE FROM webauthn_ceremonies
             WHERE id = $1 AND account_id = $2 AND kind = $3 AND expires_at >= $4
             RETURNING state",
        )
        .bind(id)
        .bind(account_id)
        .bind(kind)
        .bind(now_millis())
        .fetch_optional(self.db.write_pool())
        .await?;
        state.ok_or_else(|| Error::Invalid("unknown, used or expired passkey ceremony".into()))
    }

    pub async fn start_registration(
        &self,
        account: &Account,
    ) -> Result<(String, CreationChallengeResponse)> {
        let existing = self.stored(&account.id).await?;
        if existing.len() >= MAX_PASSKEYS {
            return Err(Error::Conflict(format!(
                "an account holds at most {MAX_PASSKEYS} passkeys; remove one first"
            )));
        }
        let user_id = uuid::Uuid::parse_str(&account.id)
            .map_err(|_| Error::Invalid("account id is not a UUID".into()))?;
        let exclude = existing
            .iter()
            .map(|(p, _)| p.cred_id().clone())
            .collect::<Vec<_>>();
        let (challenge, state) = self
            .webauthn()?
            .start_passkey_registration(
                user_id,
                &account.username,
                &account.username,
                Some(exclude),
            )
            .map_err(|_| Error::Crypto("cannot start passkey registration"))?;
        let state = serde_json::to_string(&state)
            .map_err(|_| Error::Crypto("cannot keep the ceremony state"))?;
        let id = self.save_ceremony(&account.id, "register", state).await?;
        Ok((id, challenge))
    }

    pub async fn finish_registration(
        &self,
        account: &Account,
        ceremony: &str,
        name: &str,
        credential: &RegisterPublicKeyCredential,
        address: Option<IpAddr>,
    ) -> Result<PasskeyInfo> {
        let name = name.trim();
        if name.is_empty() || name.chars().count() > 64 {
            return Err(Error::Invalid(
                "name the passkey (1 to 64 characters)".into(),
            ));
        }
        let state = self
            .take_ceremony(ceremony, &account.id, "register")
            .await?;
        let state: PasskeyRegistration = serde_json::from_str(&state)
            .map_err(|_| Error::Crypto("ceremony state does not parse"))?;
        let passkey = self
            .webauthn()?
            .finish_passkey_registration(credential, &state)
            .map_err(|e| Error::Invalid(format!("the passkey was not accepted: {e}")))?;
        let id = credential_id(passkey.cred_id());
        let json = serde_json::to_string(&passkey)
            .map_err(|_| Error::Crypto("cannot store the passkey"))?;
        let now = now_millis();
        let mut tx = self.db.begin().await?;
        // A credential id belongs to one account only (WebAuthn §7.1 step 22).
        let inserted = sqlx::query(
            "INSERT INTO passkeys (credential_id, account_id, name, passkey, counter, created_at)
             VALUES ($1, $2, $3, $4, 0, $5) ON CONFLICT (credential_id) DO NOTHING",
        )
        .bind(&id)
        .bind(&account.id)
        .bind(name)
        .bind(json)
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            return Err(Error::Conflict("this passkey is already registered".into()));
        }
        let event = AuditEvent::new(EventKind::SecurityConfiguration, agent_of(account, address))
            .detail(format!("second factor enrolled: passkey {id}"));
        audit::record(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(PasskeyInfo {
            id,
            name: name.to_string(),
            created_at: millis_to_rfc3339(now),
            last_used_at: None,
        })
    }

    pub async fn start_authentication(
        &self,
        account: &Account,
    ) -> Result<(String, RequestChallengeResponse)> {
        let stored = self.stored(&account.id).await?;
        if stored.is_empty() {
            return Err(Error::Conflict("no passkey is registered".into()));
        }
        let passkeys: Vec<Passkey> = stored.into_iter().map(|(p, _)| p).collect();
        let (challenge, state) = self
            .webauthn()?
            .start_passkey_authentication(&passkeys)
            .map_err(|_| Error::Crypto("cannot start passkey authentication"))?;
        let state = serde_json::to_string(&state)
            .map_err(|_| Error::Crypto("cannot keep the ceremony state"))?;
        let id = self
            .save_ceremony(&account.id, "authenticate", state)
            .await?;
        Ok((id, challenge))
    }

    /// Checks an assertion. `Err(reason)` inside `Ok` is a refusal to count and audit.
    pub async fn finish_authentication(
        &self,
        account: &Account,
        ceremony: &str,
        credential: &PublicKeyCredential,
    ) -> Result<Result<(), &'static str>> {
        let state = match self
            .take_ceremony(ceremony, &account.id, "authenticate")
            .await
        {
            Ok(state) => state,
            Err(Error::Invalid(_)) => return Ok(Err("unknown, used or expired passkey ceremony")),
            Err(e) => return Err(e),
        };
        let state: PasskeyAuthentication = serde_json::from_str(&state)
            .map_err(|_| Error::Crypto("ceremony state does not parse"))?;
        let Ok(result) = self
            .webauthn()?
            .finish_passkey_authentication(credential, &state)
        else {
            return Ok(Err("passkey assertion not valid"));
        };
        let id = credential_id(result.cred_id());
        let stored = self.stored(&account.id).await?;
        let Some((mut passkey, counter)) = stored
            .into_iter()
            .find(|(p, _)| credential_id(p.cred_id()) == id)
        else {
            return Ok(Err("passkey not registered to this account"));
        };
        let presented = i64::from(result.counter());
        // WebAuthn §7.2 step 21: a counter that does not grow means two copies of the key.
        if (presented > 0 || counter > 0) && presented <= counter {
            tracing::warn!(account = %account.id, credential = %id, "passkey counter went backwards");
            return Ok(Err(
                "passkey signature counter went backwards: possibly a cloned authenticator",
            ));
        }
        passkey.update_credential(&result);
        let json = serde_json::to_string(&passkey)
            .map_err(|_| Error::Crypto("cannot store the passkey"))?;
        // Conditional on the counter read above, so two racing assertions cannot both pass.
        let updated = sqlx::query(
            "UPDATE passkeys SET passkey = $1, counter = $2, last_used_at = $3
             WHERE credential_id = $4 AND counter = $5",
        )
        .bind(json)
        .bind(presented)
        .bind(now_millis())
        .bind(&id)
        .bind(counter)
        .execute(self.db.write_pool())
        .await?
        .rows_affected();
        if updated != 1 {
            return Ok(Err("passkey used concurrently"));
        }
        Ok(Ok(()))
    }
}

fn credential_id(raw: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
}
