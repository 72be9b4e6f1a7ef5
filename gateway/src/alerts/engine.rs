//! The alert engine: reads audit leaves in tree order from a stored cursor (tree order is
//! commit order, so no leaf is skipped however transactions interleave), keeps a window of
//! the events the rules look at, evaluates the rules with the current facts, and stores each
//! new alert once — its dedup key is unique, so another process or another evaluation of
//! the same events raises nothing new. A new alert is audited and queued for every
//! operator endpoint in the same transaction; deliveries are signed Security Event Tokens,
//! retried with backoff like recipients' notifications.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::json;
use sqlx::Row;
use tokio::sync::watch;

use super::credentials;
use super::rules::{self, Facts, RaisedAlert, ShippingLag, Thresholds, VerifyFailure};
use crate::audit::search::{parse_leaf, ParsedLeaf};
use crate::audit::verify::VerifyError;
use crate::audit::{self, Agent, AuditEvent, AuditLog, EventKind, Outcome};
use crate::config::{AlertsConfig, Config};
use crate::error::{Error, Result};
use crate::notifications::delivery::{
    push_security_event_token, retry_delay_millis, webhook_client,
};
use crate::notifications::EVENT_PREFIX;
use crate::receipts::ReceiptSigner;
use crate::store::{millis_to_rfc3339, now_millis, Database};
use crate::supply_chain::advisories::AdvisoryFinding;
use crate::supply_chain::eol::EolWarning;

/// Leaves read per statement.
const LEAF_BATCH: i64 = 2000;
/// On first start, the engine looks this far back (later it goes on from its cursor).
const FIRST_LOOKBACK_MILLIS: i64 = 60 * 60_000;
/// A claimed delivery stays ours this long.
const LEASE_MILLIS: i64 = 60_000;
/// Deliveries sent per round.
const DELIVERY_BATCH: i64 = 20;
/// The SET event type of an alert.
pub const ALERT_EVENT: &str = "alert";
/// What an institution is told with a vulnerability or end-of-life notice.
const INSTITUTION_NOTICE: &str = "phr-gateway の運用者からのお知らせ: 本サービスが使用する部品に脆弱性またはサポート終了が見つかりました。影響、回避策と修正予定日は summary のとおりです。対応が済み次第お知らせします。 / A notice from the phr-gateway operator: a component of the service has a vulnerability or reaches its end of support; the summary gives the impact, the workaround and the planned fix date. We will tell you when it is fixed.";

#[derive(Clone)]
pub struct AlertEngine {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    audit: AuditLog,
    receipts: Arc<ReceiptSigner>,
    http: reqwest::Client,
    settings: AlertsConfig,
    thresholds: Thresholds,
    tls_certificate: Option<PathBuf>,
    signing_keys: Vec<(&'static str, PathBuf)>,
    /// Audit shipping runs: its lag is read from the database.
    shipping_enabled: bool,
    /// Backups are configured: their verified generations are read from the database.
    backups_configured: bool,
    /// The configured external URL, else the one known once listening.
    configured_public_url: Option<String>,
    public_url: Arc<OnceLock<String>>,
    /// Facts other parts of the gateway report.
    reported: Mutex<Reported>,
    /// The events in the rules' window; one evaluation at a time.
    window: tokio::sync::Mutex<Window>,
}

#[derive(Default)]
struct Reported {
    verify_failure: Option<VerifyFailure>,
    shipping_lag: Option<ShippingLag>,
    last_verified: Option<Instant>,
    /// The last advisory scan and what it found.
    advisories: Option<(Instant, Vec<AdvisoryFinding>)>,
}

#[derive(Default)]
struct Window {
    events: Vec<ParsedLeaf>,
    seeded: bool,
}

/// What one evaluation did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pass {
    /// Ids of the alerts raised now.
    pub raised: Vec<String>,
    pub delivered: u64,
    pub retried: u64,
    pub failed: u64,
}

/// Whether the rules look at this event at all (the window keeps only these).
fn relevant(event: &ParsedLeaf) -> bool {
    event.emergency_override
        || rules::is_backup_prune_refused(event)
        || (event.kind == Some(EventKind::Login) && event.failed)
        || (matches!(
            event.kind,
            Some(EventKind::Read | EventKind::Search | EventKind::Export)
        ) && event.patient_id.is_some())
}

impl AlertEngine {
    pub fn new(
        db: Database,
        audit: AuditLog,
        receipts: Arc<ReceiptSigner>,
        config: &Config,
        public_url: Arc<OnceLock<String>>,
    ) -> Result<Self> {
        let settings = config.alerts.clone();
        let thresholds = settings
            .thresholds()
            .map_err(|(key, reason)| Error::config(key, reason))?;
        let tls_certificate = if config.insecure_http {
            None
        } else {
            Some(
                config
                    .tls
                    .cert_file
                    .clone()
                    .unwrap_or_else(|| config.data_dir.join("tls").join("dev-cert.pem")),
            )
        };
        let signing_keys = vec![
            ("audit signing key", config.audit_signing_key_path()),
            ("receipt signing key", config.receipt_signing_key_path()),
            ("source client key", config.source_client_key_path()),
            ("ID token signing key", config.id_token_key_path()),
        ];
        Ok(AlertEngine {
            inner: Arc::new(Inner {
                db,
                audit,
                receipts,
                http: webhook_client("alerts")?,
                settings,
                thresholds,
                tls_certificate,
                signing_keys,
                shipping_enabled: config.audit_shipping.enabled,
                backups_configured: config.backup.recipient.is_some(),
                configured_public_url: config.public_url.clone(),
                public_url,
                reported: Mutex::default(),
                window: tokio::sync::Mutex::default(),
            }),
        })
    }

    /// Audit shipping reports how far it lags (`None`: shipping is not running).
    pub fn report_shipping_lag(&self, lag: Option<ShippingLag>) {
        if let Ok(mut reported) = self.inner.reported.lock() {
            reported.shipping_lag = lag;
        }
    }

    /// An audit verification failed (`None`: the last one passed).
    pub fn report_verify_failure(&self, failure: Option<VerifyFailure>) {
        if let Ok(mut reported) = self.inner.reported.lock() {
            reported.verify_failure = failure;
        }
    }

    /// Evaluates until `shutdown`, every `alerts.interval_millis`.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let interval = Duration::from_millis(self.inner.settings.interval_millis);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = shutdown.changed() => return,
            }
            self.verify_when_due().await;
            if let Err(error) = self.evaluate_once().await {
                tracing::warn!(%error, "evaluating alert rules failed");
            }
        }
    }

    /// Verifies the whole audit log when `alerts.verify_interval_secs` have passed since the
    /// last time (the first time one interval after start).
    async fn verify_when_due(&self) {
        let every = self.inner.settings.verify_interval_secs;
        if every == 0 {
            return;
        }
        let due = match self.inner.reported.lock() {
            Ok(mut reported) => match reported.last_verified {
                Some(at) => at.elapsed() >= Duration::from_secs(every),
                None => {
                    reported.last_verified = Some(Instant::now());
                    false
                }
            },
            Err(_) => false,
        };
        if !due {
            return;
        }
        let audit = &self.inner.audit;
        let outcome =
            audit::verify::verify(&self.inner.db, audit.verifiers(), audit.origin(), None).await;
        let failure = match outcome {
            Ok(_) => None,
            Err(VerifyError::Tamper(tamper)) => Some(VerifyFailure {
                detected_millis: now_millis(),
                reason: tamper.to_string(),
            }),
            Err(VerifyError::Store(error)) => {
                tracing::warn!(%error, "audit verification could not run");
                return;
            }
        };
        if let Ok(mut reported) = self.inner.reported.lock() {
            reported.verify_failure = failure;
            reported.last_verified = Some(Instant::now());
        }
    }

    async fn facts(&self, now: i64) -> Facts {
        let (verify_failure, reported_lag) = match self.inner.reported.lock() {
            Ok(reported) => (reported.verify_failure.clone(), reported.shipping_lag),
            Err(_) => (None, None),
        };
        // What any process's shipper recorded, when shipping is on.
        let shipping_lag = match reported_lag {
            Some(lag) => Some(lag),
            None if self.inner.shipping_enabled => {
                match audit::shipping::status(&self.inner.db).await {
                    Ok(status) => Some(ShippingLag {
                        leaves_behind: status.leaves_behind,
                        seconds_since_success: status.seconds_since_success,
                    }),
                    Err(error) => {
                        tracing::warn!(%error, "reading the audit shipping status failed");
                        None
                    }
                }
            }
            None => None,
        };
        let backup_verified = if self.inner.backups_configured {
            let db = &self.inner.db;
            let read = async {
                let good = crate::backup::generations::verified_good(db).await?;
                let last = crate::backup::generations::last_verification_at(db).await?;
                Ok::<_, Error>((good, last))
            };
            match read.await {
                Ok((good, last_verification_millis)) => Some(rules::BackupVerified {
                    good,
                    required: crate::backup::generations::MIN_VERIFIED_GENERATIONS,
                    last_verification_millis,
                }),
                Err(error) => {
                    tracing::warn!(%error, "reading the verified backup generations failed");
                    None
                }
            }
        } else {
            None
        };
        Facts {
            now_millis: now,
            backup_verified,
            verify_failure,
            shipping_lag,
            advisories: self.advisories(),
            end_of_life: self.end_of_life(),
            tls_not_after_millis: self
                .inner
                .tls_certificate
                .as_deref()
                .and_then(credentials::certificate_not_after),
            signing_keys: credentials::signing_key_ages(
                self.inner
                    .signing_keys
                    .iter()
                    .map(|(name, path)| (*name, path.as_path())),
            ),
        }
    }

    /// Advisories affecting the build, from the configured snapshot, rescanned at most every
    /// `advisory_scan_interval_secs`. A snapshot that cannot be read is logged and skipped.
    fn advisories(&self) -> Vec<AdvisoryFinding> {
        let settings = &self.inner.settings;
        let Some(dir) = &settings.advisory_db_dir else {
            return Vec::new();
        };
        let interval = Duration::from_secs(settings.advisory_scan_interval_secs);
        if let Ok(reported) = self.inner.reported.lock() {
            if let Some((at, findings)) = &reported.advisories {
                if !interval.is_zero() && at.elapsed() < interval {
                    return findings.clone();
                }
            }
        }
        let lock = crate::supply_chain::sbom::CARGO_LOCK;
        match crate::supply_chain::advisories::scan(dir, lock, crate::store::japan_today()) {
            Ok(findings) => {
                if let Ok(mut reported) = self.inner.reported.lock() {
                    reported.advisories = Some((Instant::now(), findings.clone()));
                }
                findings
            }
            Err(error) => {
                tracing::warn!(%error, "the advisory check failed");
                Vec::new()
            }
        }
    }

    fn end_of_life(&self) -> Vec<EolWarning> {
        let settings = &self.inner.settings;
        if !settings.check_end_of_life {
            return Vec::new();
        }
        let inventory = match &settings.eol_inventory_file {
            Some(path) => match std::fs::read_to_string(path) {
                Ok(text) => text,
                Err(error) => {
                    tracing::warn!(%error, path = %path.display(), "cannot read the EOL inventory");
                    return Vec::new();
                }
            },
            None => crate::supply_chain::eol::DEFAULT_INVENTORY.to_string(),
        };
        crate::supply_chain::eol::warnings(
            &inventory,
            crate::store::japan_today(),
            i64::from(settings.eol_warning_days),
        )
        .unwrap_or_else(|error| {
            tracing::warn!(%error, "the EOL inventory does not parse");
            Vec::new()
        })
    }

    /// Reads the leaves sequenced since the last pass, evaluates the rules, stores and
    /// queues new alerts, then delivers what is due.
    pub async fn evaluate_once(&self) -> Result<Pass> {
        let mut window = self.inner.window.lock().await;
        let now = now_millis();
        let mut cursor = self.cursor(now).await?;
        let span = self.inner.thresholds.window_millis();
        if !window.seeded {
            // After a restart, the events before the cursor still count towards windows.
            let rows = sqlx::query(
                "SELECT body FROM audit_leaves
                 WHERE tree_index IS NOT NULL AND tree_index < $1 AND recorded_at >= $2
                 ORDER BY tree_index",
            )
            .bind(cursor)
            .bind(now - span)
            .fetch_all(self.inner.db.read_pool())
            .await?;
            for row in rows {
                let body: Vec<u8> = row.try_get(0)?;
                window.events.extend(parse_leaf(&body).filter(relevant));
            }
            window.seeded = true;
        }
        let facts = self.facts(now).await;
        let mut pass = Pass::default();
        loop {
            let rows = sqlx::query(
                "SELECT tree_index, body FROM audit_leaves
                 WHERE tree_index >= $1 ORDER BY tree_index LIMIT $2",
            )
            .bind(cursor)
            .bind(LEAF_BATCH)
            .fetch_all(self.inner.db.read_pool())
            .await?;
            let read = rows.len();
            for row in rows {
                let index: i64 = row.try_get(0)?;
                let body: Vec<u8> = row.try_get(1)?;
                cursor = index + 1;
                window.events.extend(parse_leaf(&body).filter(relevant));
            }
            let raised = rules::evaluate(&window.events, &facts, &self.inner.thresholds);
            pass.raised.extend(self.store(&raised, cursor, now).await?);
            if let Some(newest) = window.events.iter().map(|e| e.recorded_millis).max() {
                window.events.retain(|e| e.recorded_millis >= newest - span);
            }
            if (read as i64) < LEAF_BATCH {
                break;
            }
        }
        drop(window);
        if !pass.raised.is_empty() {
            self.inner.audit.notify();
        }
        let delivered = self.deliver_due().await?;
        Ok(Pass {
            delivered: delivered.delivered,
            retried: delivered.retried,
            failed: delivered.failed,
            ..pass
        })
    }

    /// The next tree index to read. On first start: the first leaf of the last hour.
    async fn cursor(&self, now: i64) -> Result<i64> {
        let stored: Option<i64> =
            sqlx::query_scalar("SELECT next_tree_index FROM alert_cursor WHERE id = 1")
                .fetch_optional(self.inner.db.read_pool())
                .await?;
        if let Some(next) = stored {
            return Ok(next);
        }
        let first: Option<i64> = sqlx::query_scalar(
            "SELECT MIN(tree_index) FROM audit_leaves
             WHERE tree_index IS NOT NULL AND recorded_at >= $1",
        )
        .bind(now - FIRST_LOOKBACK_MILLIS)
        .fetch_one(self.inner.db.read_pool())
        .await?;
        let next = match first {
            Some(first) => first,
            None => sqlx::query_scalar::<_, Option<i64>>(
                "SELECT MAX(tree_index) + 1 FROM audit_leaves WHERE tree_index IS NOT NULL",
            )
            .fetch_one(self.inner.db.read_pool())
            .await?
            .unwrap_or(0),
        };
        sqlx::query(
            "INSERT INTO alert_cursor (id, next_tree_index, updated_at) VALUES (1, $1, $2)
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(next)
        .bind(now)
        .execute(self.inner.db.write_pool())
        .await?;
        Ok(next)
    }

    /// Stores the raised alerts and the cursor in one transaction; returns the ids of the
    /// alerts that are new.
    async fn store(&self, raised: &[RaisedAlert], cursor: i64, now: i64) -> Result<Vec<String>> {
        let mut tx = self.inner.db.begin().await?;
        let mut new = Vec::new();
        for alert in raised {
            let id = uuid::Uuid::now_v7().to_string();
            let inserted = sqlx::query(
                "INSERT INTO alerts (id, rule, severity, dedup_key, summary, first_seen, last_seen,
                     created_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (dedup_key) DO NOTHING",
            )
            .bind(&id)
            .bind(alert.rule.code())
            .bind(alert.severity.code())
            .bind(&alert.dedup_key)
            .bind(&alert.summary)
            .bind(alert.first_seen_millis)
            .bind(alert.last_seen_millis)
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if inserted == 0 {
                // The same occurrence, seen again: only how long it lasts changes.
                sqlx::query(
                    "UPDATE alerts SET last_seen = $1, summary = $2
                     WHERE dedup_key = $3 AND last_seen < $1",
                )
                .bind(alert.last_seen_millis)
                .bind(&alert.summary)
                .bind(&alert.dedup_key)
                .execute(&mut *tx)
                .await?;
                continue;
            }
            let event = AuditEvent::new(EventKind::AlertRaised, Agent::system()).detail(format!(
                "{} alert {id} ({}): {}",
                alert.rule.code(),
                alert.severity.code(),
                alert.summary
            ));
            audit::record(&mut tx, &event).await?;
            let mut audiences: Vec<(String, Option<String>)> = self
                .inner
                .settings
                .webhook_urls
                .iter()
                .map(|url| (url.clone(), None))
                .collect();
            if alert.rule.tells_institutions() {
                let endpoints =
                    sqlx::query("SELECT client_id, url FROM webhook_endpoints ORDER BY client_id")
                        .fetch_all(&mut *tx)
                        .await?;
                for row in endpoints {
                    audiences.push((row.try_get(1)?, Some(row.try_get(0)?)));
                }
            }
            for (url, client_id) in audiences {
                sqlx::query(
                    "INSERT INTO alert_deliveries (id, alert_id, url, client_id, status,
                         next_attempt_at, created_at)
                     VALUES ($1, $2, $3, $4, 'pending', $5, $5)",
                )
                .bind(uuid::Uuid::now_v7().to_string())
                .bind(&id)
                .bind(url)
                .bind(client_id)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
            new.push(id);
        }
        sqlx::query(
            "UPDATE alert_cursor SET next_tree_index = $1, updated_at = $2
             WHERE id = 1 AND next_tree_index <= $1",
        )
        .bind(cursor)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(new)
    }

    /// One round of webhook deliveries: claims what is due and sends each.
    pub async fn deliver_due(&self) -> Result<crate::notifications::delivery::Round> {
        let now = now_millis();
        let rows = sqlx::query(
            "SELECT d.id, d.url, d.attempts, a.id, a.rule, a.severity, a.summary, a.first_seen,
                    a.last_seen, d.client_id
             FROM alert_deliveries d JOIN alerts a ON a.id = d.alert_id
             WHERE d.status = 'pending' AND d.next_attempt_at <= $1
               AND (d.lease_until IS NULL OR d.lease_until < $1)
             ORDER BY d.next_attempt_at, d.id LIMIT $2",
        )
        .bind(now)
        .bind(DELIVERY_BATCH)
        .fetch_all(self.inner.db.read_pool())
        .await?;
        let mut round = crate::notifications::delivery::Round::default();
        for row in rows {
            let delivery_id: String = row.try_get(0)?;
            let url: String = row.try_get(1)?;
            let attempts: i64 = row.try_get(2)?;
            let alert_id: String = row.try_get(3)?;
            let first_seen: i64 = row.try_get(7)?;
            let client_id: Option<String> = row.try_get(9)?;
            let mut body = json!({
                "alert": alert_id,
                "rule": row.try_get::<String, _>(4)?,
                "severity": row.try_get::<String, _>(5)?,
                "summary": row.try_get::<String, _>(6)?,
                "first_seen": millis_to_rfc3339(first_seen),
                "last_seen": millis_to_rfc3339(row.try_get(8)?),
            });
            // Operators get the page to act on; an institution gets what it is told and why.
            match &client_id {
                None => body["page"] = json!(format!("{}/operator/alerts-page", self.base_url())),
                Some(_) => body["message"] = json!(INSTITUTION_NOTICE),
            }
            let claimed = sqlx::query(
                "UPDATE alert_deliveries SET lease_until = $1
                 WHERE id = $2 AND status = 'pending' AND (lease_until IS NULL OR lease_until < $3)",
            )
            .bind(now + LEASE_MILLIS)
            .bind(&delivery_id)
            .bind(now)
            .execute(self.inner.db.write_pool())
            .await?
            .rows_affected();
            if claimed != 1 {
                continue;
            }
            let mut events = serde_json::Map::new();
            events.insert(format!("{EVENT_PREFIX}{ALERT_EVENT}"), body);
            // A retry is the same event: the same jti.
            let sent = match self.inner.receipts.sign(&json!({
                "iss": self.inner.receipts.issuer(),
                "aud": client_id.as_deref().unwrap_or(&url),
                "iat": now / 1000,
                "toe": first_seen / 1000,
                "jti": delivery_id,
                "events": events,
            })) {
                Ok(token) => push_security_event_token(&self.inner.http, &url, token).await,
                Err(error) => Err(error.to_string()),
            };
            let attempts = attempts + 1;
            let mut tx = self.inner.db.begin().await?;
            let (status, outcome) = match &sent {
                Ok(()) => ("delivered", Some(Outcome::Success)),
                Err(_) if attempts >= i64::from(self.inner.settings.max_attempts) => {
                    ("failed", Some(Outcome::SeriousFailure))
                }
                Err(_) => ("pending", None),
            };
            sqlx::query(
                "UPDATE alert_deliveries SET status = $1, attempts = $2, next_attempt_at = $3,
                     lease_until = NULL, last_error = $4, delivered_at = $5 WHERE id = $6",
            )
            .bind(status)
            .bind(attempts)
            .bind(now + retry_delay_millis(attempts, self.inner.settings.max_backoff_secs))
            .bind(sent.as_ref().err().cloned())
            .bind(sent.is_ok().then_some(now))
            .bind(&delivery_id)
            .execute(&mut *tx)
            .await?;
            if let Some(outcome) = outcome {
                let detail = match &sent {
                    Ok(()) => format!("alert {alert_id} delivered to an operator endpoint"),
                    Err(reason) => format!(
                        "alert {alert_id} not delivered after {attempts} attempts: {reason}"
                    ),
                };
                let event = AuditEvent::new(EventKind::NotificationSent, Agent::system())
                    .outcome(outcome)
                    .detail(detail);
                audit::record(&mut tx, &event).await?;
            }
            tx.commit().await?;
            match status {
                "delivered" => round.delivered += 1,
                "failed" => round.failed += 1,
                _ => round.retried += 1,
            }
        }
        Ok(round)
    }

    fn base_url(&self) -> String {
        self.inner
            .configured_public_url
            .clone()
            .or_else(|| self.inner.public_url.get().cloned())
            .unwrap_or_else(|| self.inner.receipts.issuer().to_string())
    }
}
