//! Delivers queued notifications: each is claimed with a short lease (several processes
//! may deliver), signed as a Security Event Token and POSTed to the client's endpoint
//! (`application/secevent+jwt`, RFC 8935). A 2xx answer delivers it; anything else is
//! retried with exponential backoff and jitter until `max_attempts`, then it is failed.
//! Recipients check the signature against the gateway's JWKS, `aud`, and reject a `jti`
//! seen before or an `iat` outside their replay window.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rand::Rng;
use serde_json::{json, Value};
use sqlx::Row;
use tokio::sync::watch;

use super::{queue_expired, EVENT_PREFIX};
use crate::audit::{self, Agent, AuditEvent, EventKind, Outcome};
use crate::config::NotificationsConfig;
use crate::error::{Error, Result};
use crate::receipts::ReceiptSigner;
use crate::store::{now_millis, Database};

/// A claimed notification stays ours this long.
const LEASE_MILLIS: i64 = 60_000;
/// Notifications claimed per round.
const BATCH: i64 = 20;
/// The first retry waits this long; each next one twice as long.
const FIRST_BACKOFF_MILLIS: i64 = 30_000;

#[derive(Clone)]
pub struct Deliverer {
    db: Database,
    receipts: Arc<ReceiptSigner>,
    http: reqwest::Client,
    settings: NotificationsConfig,
    /// The gateway's external base URL once known (for acknowledgement links).
    public_url: Arc<OnceLock<String>>,
}

/// What one round did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Round {
    pub delivered: u64,
    pub retried: u64,
    pub failed: u64,
}

struct Due {
    id: String,
    client_id: String,
    patient_id: String,
    event: String,
    body: String,
    attempts: i64,
    created_at: i64,
    url: String,
}

impl Deliverer {
    pub fn new(
        db: Database,
        receipts: Arc<ReceiptSigner>,
        settings: NotificationsConfig,
        public_url: Arc<OnceLock<String>>,
    ) -> Result<Self> {
        let http = webhook_client("notifications")?;
        Ok(Deliverer {
            db,
            receipts,
            http,
            settings,
            public_url,
        })
    }

    /// Queues expiries, then delivers what is due until a round finds nothing.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        loop {
            if let Err(error) = queue_expired(&self.db).await {
                tracing::warn!(%error, "queueing consent expiries failed");
            }
            loop {
                match self.deliver_due().await {
                    Ok(round) if round != Round::default() => continue,
                    Ok(_) => break,
                    Err(error) => {
                        tracing::warn!(%error, "delivering notifications failed");
                        break;
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(self.settings.poll_millis)) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// One round: claims up to a batch of due notifications and sends each.
    pub async fn deliver_due(&self) -> Result<Round> {
        let now = now_millis();
        let rows = sqlx::query(
            "SELECT n.id, n.client_id, n.patient_id, n.event, n.body, n.attempts, n.created_at, w.url
             FROM notifications n JOIN webhook_endpoints w ON w.client_id = n.client_id
             WHERE n.status = 'pending' AND n.next_attempt_at <= $1
               AND (n.lease_until IS NULL OR n.lease_until < $1)
             ORDER BY n.next_attempt_at, n.id LIMIT $2",
        )
        .bind(now)
        .bind(BATCH)
        .fetch_all(self.db.read_pool())
        .await?;
        let mut round = Round::default();
        for row in rows {
            let due = Due {
                id: row.try_get(0)?,
                client_id: row.try_get(1)?,
                patient_id: row.try_get(2)?,
                event: row.try_get(3)?,
                body: row.try_get(4)?,
                attempts: row.try_get(5)?,
                created_at: row.try_get(6)?,
                url: row.try_get(7)?,
            };
            // Claim: only one deliverer wins a notification.
            let claimed = sqlx::query(
                "UPDATE notifications SET lease_until = $1
                 WHERE id = $2 AND status = 'pending' AND (lease_until IS NULL OR lease_until < $3)",
            )
            .bind(now + LEASE_MILLIS)
            .bind(&due.id)
            .bind(now)
            .execute(self.db.write_pool())
            .await?
            .rows_affected();
            if claimed != 1 {
                continue;
            }
            match self.send(&due).await {
                Ok(()) => {
                    self.delivered(&due).await?;
                    round.delivered += 1;
                }
                Err(reason) => {
                    if self.retry_or_fail(&due, &reason).await? {
                        round.retried += 1;
                    } else {
                        round.failed += 1;
                    }
                }
            }
        }
        Ok(round)
    }

    /// The signed Security Event Token for a notification.
    pub fn security_event_token(
        &self,
        due_id: &str,
        client_id: &str,
        event: &str,
        body: &str,
        created_at: i64,
    ) -> Result<String> {
        let mut body: Value = serde_json::from_str(body)
            .map_err(|e| Error::Invalid(format!("notification body: {e}")))?;
        if body.get("action").is_some() {
            let base = self
                .public_url
                .get()
                .cloned()
                .unwrap_or_else(|| self.receipts.issuer().to_string());
            body["acknowledge"] = json!(format!(
                "{base}/recipient/notifications/{due_id}/acknowledge"
            ));
        }
        let mut events = serde_json::Map::new();
        events.insert(format!("{EVENT_PREFIX}{event}"), body);
        self.receipts.sign(&json!({
            "iss": self.receipts.issuer(),
            "aud": client_id,
            "iat": now_millis() / 1000,
            "toe": created_at / 1000,
            "jti": due_id,
            "events": events,
        }))
    }

    async fn send(&self, due: &Due) -> std::result::Result<(), String> {
        let token = self
            .security_event_token(
                &due.id,
                &due.client_id,
                &due.event,
                &due.body,
                due.created_at,
            )
            .map_err(|e| e.to_string())?;
        push_security_event_token(&self.http, &due.url, token).await
    }

    async fn delivered(&self, due: &Due) -> Result<()> {
        let now = now_millis();
        let mut tx = self.db.begin().await?;
        sqlx::query(
            "UPDATE notifications SET status = 'delivered', delivered_at = $1, attempts = attempts + 1,
                 lease_until = NULL, last_error = NULL WHERE id = $2",
        )
        .bind(now)
        .bind(&due.id)
        .execute(&mut *tx)
        .await?;
        let event = AuditEvent::new(EventKind::NotificationSent, Agent::client(&due.client_id))
            .patient(&due.patient_id)
            .detail(format!("{} notification {} delivered", due.event, due.id));
        audit::record(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Schedules the next attempt (true), or gives up after the last one (false).
    async fn retry_or_fail(&self, due: &Due, reason: &str) -> Result<bool> {
        let now = now_millis();
        let attempts = due.attempts + 1;
        let give_up = attempts >= i64::from(self.settings.max_attempts);
        let delay = retry_delay_millis(attempts, self.settings.max_backoff_secs);
        let mut tx = self.db.begin().await?;
        sqlx::query(
            "UPDATE notifications SET status = $1, attempts = $2, next_attempt_at = $3,
                 lease_until = NULL, last_error = $4 WHERE id = $5",
        )
        .bind(if give_up { "failed" } else { "pending" })
        .bind(attempts)
        .bind(now + delay)
        .bind(reason)
        .bind(&due.id)
        .execute(&mut *tx)
        .await?;
        if give_up {
            let event = AuditEvent::new(EventKind::NotificationSent, Agent::client(&due.client_id))
                .outcome(Outcome::SeriousFailure)
                .patient(&due.patient_id)
                .detail(format!(
                    "{} notification {} failed after {attempts} attempts: {reason}",
                    due.event, due.id
                ));
            audit::record(&mut tx, &event).await?;
        }
        tx.commit().await?;
        Ok(!give_up)
    }
}

/// The HTTP client for webhooks: a short timeout, and no redirects (a signed event goes to
/// the registered URL only). `setting` names the configuration it serves, for errors.
pub fn webhook_client(setting: &str) -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| Error::config(setting, format!("HTTP client: {e}")))
}

/// POSTs a signed Security Event Token (RFC 8935 push); `Err` says why it was not taken.
pub async fn push_security_event_token(
    http: &reqwest::Client,
    url: &str,
    token: String,
) -> std::result::Result<(), String> {
    let response = http
        .post(url)
        .header("content-type", "application/secevent+jwt")
        .header("accept", "application/json")
        .body(token)
        .send()
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    if response.status().is_success() {
        Ok(())
    } else {
        Err(format!(
            "endpoint answered HTTP {}",
            response.status().as_u16()
        ))
    }
}

/// How long to wait before attempt `attempts + 1`: doubling from 30 s, capped, with jitter
/// so failed endpoints are not hit in lockstep.
pub fn retry_delay_millis(attempts: i64, max_backoff_secs: u64) -> i64 {
    let backoff = FIRST_BACKOFF_MILLIS
        .saturating_mul(1i64 << attempts.clamp(0, 20).saturating_sub(1))
        .min(max_backoff_secs as i64 * 1000);
    backoff + rand::thread_rng().gen_range(0..=backoff / 4 + 1)
}
