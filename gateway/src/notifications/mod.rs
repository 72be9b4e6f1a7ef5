//! Notifications to recipients: a consent was withdrawn or expired (stop using and delete
//! what you received, then acknowledge), new data is available, data was corrected or
//! marked entered-in-error. Each is written to an outbox in the transaction of the change
//! it announces and delivered by `delivery` as a Security Event Token (RFC 8417) signed with
//! the gateway's receipt key, pushed per RFC 8935, retried with backoff. Bodies are PHI-free:
//! opaque ids and category codes only.

pub mod delivery;

use phr_consent::{ConsentStatus, DataCategory};
use serde_json::{json, Value};
use sqlx::{AnyConnection, Row};
use time::OffsetDateTime;

use crate::audit::{self, Agent, AuditEvent, EventKind};
use crate::error::{Error, Result};
use crate::store::resources::{ResourceMeta, WriteOutcome};
use crate::store::{now_millis, Database};

/// The SET event type URIs.
pub const EVENT_PREFIX: &str = "urn:phr-gateway:event:";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotificationKind {
    ConsentWithdrawn,
    ConsentExpired,
    NewData,
    DataCorrected,
}

impl NotificationKind {
    pub fn code(self) -> &'static str {
        match self {
            NotificationKind::ConsentWithdrawn => "consent-withdrawn",
            NotificationKind::ConsentExpired => "consent-expired",
            NotificationKind::NewData => "new-data",
            NotificationKind::DataCorrected => "data-corrected",
        }
    }

    /// Whether the recipient must stop using the data, delete it and acknowledge.
    pub fn asks_for_deletion(self) -> bool {
        matches!(
            self,
            NotificationKind::ConsentWithdrawn | NotificationKind::ConsentExpired
        )
    }
}

/// The event body for `kind` (PHI-free).
pub fn event_body(
    kind: NotificationKind,
    patient_id: &str,
    consent_id: &str,
    categories: &[DataCategory],
) -> Value {
    let mut body = json!({
        "patient": patient_id,
        "consent": consent_id,
    });
    if !categories.is_empty() {
        body["categories"] = json!(categories.iter().map(|c| c.code()).collect::<Vec<_>>());
    }
    if kind.asks_for_deletion() {
        body["action"] = json!("stop-use-and-delete");
        body["message"] = json!({
            "ja": "患者さんの同意が終了しました。この患者さんのデータの利用をやめ、受け取ったデータを削除し、削除したことを確認応答してください。",
            "en": "The patient's consent has ended. Stop using this patient's data, delete what you received, and acknowledge that you did."
        });
    }
    body
}

/// Queues a notification for `client_id` in the caller's transaction, if the client has a
/// webhook endpoint. An undelivered notification of the same kind for the same consent
/// already covers a new one (bursts of pulled pages make one notification).
pub async fn enqueue_in(
    conn: &mut AnyConnection,
    client_id: &str,
    patient_id: &str,
    consent_id: &str,
    kind: NotificationKind,
    categories: &[DataCategory],
) -> Result<bool> {
    let has_endpoint: Option<String> =
        sqlx::query_scalar("SELECT client_id FROM webhook_endpoints WHERE client_id = $1")
            .bind(client_id)
            .fetch_optional(&mut *conn)
            .await?;
    if has_endpoint.is_none() {
        return Ok(false);
    }
    let pending: Option<String> = sqlx::query_scalar(
        "SELECT id FROM notifications WHERE consent_id = $1 AND event = $2 AND status = 'pending'
             AND attempts = 0",
    )
    .bind(consent_id)
    .bind(kind.code())
    .fetch_optional(&mut *conn)
    .await?;
    if pending.is_some() && !kind.asks_for_deletion() {
        return Ok(false);
    }
    let now = now_millis();
    sqlx::query(
        "INSERT INTO notifications (id, client_id, patient_id, consent_id, event, body, status,
             next_attempt_at, created_at)
         VALUES ($1, $2, $3, $4, $5, $6, 'pending', $7, $7)",
    )
    .bind(uuid::Uuid::now_v7().to_string())
    .bind(client_id)
    .bind(patient_id)
    .bind(consent_id)
    .bind(kind.code())
    .bind(event_body(kind, patient_id, consent_id, categories).to_string())
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(true)
}

/// A recipient's live consent to a patient's data, whose recipient takes webhooks.
struct Watching {
    patient_id: String,
    consent_id: String,
    recipient: String,
    consent: phr_consent::Consent,
}

/// The active consents of these patients whose recipients take webhooks, in one query.
async fn watching(conn: &mut AnyConnection, patient_ids: &[&str]) -> Result<Vec<Watching>> {
    let mut watching = Vec::new();
    for chunk in patient_ids.chunks(500) {
        let sql = format!(
            "SELECT c.patient_id, c.id, c.recipient, v.body FROM consents c JOIN consent_versions v
                 ON v.consent_id = c.id AND v.version = c.current_version
             WHERE c.patient_id IN ({}) AND c.status = 'active'
               AND c.recipient IN (SELECT client_id FROM webhook_endpoints)",
            crate::store::list_placeholders(crate::store::Engine::of_connection(conn), chunk.len())
        );
        let mut query = sqlx::query(&sql);
        for patient_id in chunk {
            query = query.bind(patient_id.to_string());
        }
        for row in query.fetch_all(&mut *conn).await? {
            watching.push(Watching {
                patient_id: row.try_get(0)?,
                consent_id: row.try_get(1)?,
                recipient: row.try_get(2)?,
                consent: crate::consents::consent_of(&row.try_get::<String, _>(3)?)?,
            });
        }
    }
    Ok(watching)
}

/// Queues `kind` for these categories of the patient's data to each recipient whose consent
/// is in force and covers any of them.
async fn queue_changed(
    conn: &mut AnyConnection,
    watching: &[Watching],
    patient_id: &str,
    categories: &[DataCategory],
    kind: NotificationKind,
) -> Result<()> {
    if categories.is_empty() {
        return Ok(());
    }
    let now = OffsetDateTime::now_utc();
    for watch in watching.iter().filter(|w| w.patient_id == patient_id) {
        let consent = &watch.consent;
        let in_force = consent.status == ConsentStatus::Active
            && consent
                .provision
                .period
                .as_ref()
                .is_none_or(|p| p.contains(now));
        let shared: Vec<DataCategory> = categories
            .iter()
            .copied()
            .filter(|c| consent.provision.categories.contains(c))
            .collect();
        if in_force && !shared.is_empty() {
            enqueue_in(
                conn,
                &watch.recipient,
                patient_id,
                &watch.consent_id,
                kind,
                &shared,
            )
            .await?;
        }
    }
    Ok(())
}

/// After a batch was stored (in its transaction): new resources announce `new-data`, new
/// versions of known ones (corrections, entered-in-error) `data-corrected`, each to the
/// recipients whose consent covers their categories.
pub async fn announce_written_in(
    conn: &mut AnyConnection,
    patient_id: &str,
    written: &[(ResourceMeta, WriteOutcome)],
) -> Result<()> {
    announce_written_all(conn, &[(patient_id, written)]).await
}

/// `announce_written_in` for the batches of a group commit, with one query for the
/// consents of all their patients.
pub async fn announce_written_all(
    conn: &mut AnyConnection,
    batches: &[(&str, &[(ResourceMeta, WriteOutcome)])],
) -> Result<()> {
    let categories_of = |written: &[(ResourceMeta, WriteOutcome)], wanted: WriteOutcome| {
        let mut categories: Vec<DataCategory> = written
            .iter()
            .filter(|(_, outcome)| *outcome == wanted)
            .filter_map(|(meta, _)| DataCategory::of_resource_type(&meta.resource_type))
            .collect();
        categories.sort();
        categories.dedup();
        categories
    };
    let changed: Vec<(&str, Vec<DataCategory>, Vec<DataCategory>)> = batches
        .iter()
        .map(|(patient_id, written)| {
            (
                *patient_id,
                categories_of(written, WriteOutcome::Created),
                categories_of(written, WriteOutcome::NewVersion),
            )
        })
        .filter(|(_, created, corrected)| !created.is_empty() || !corrected.is_empty())
        .collect();
    if changed.is_empty() {
        return Ok(());
    }
    let mut patient_ids: Vec<&str> = changed.iter().map(|(p, _, _)| *p).collect();
    patient_ids.sort_unstable();
    patient_ids.dedup();
    let watching = watching(conn, &patient_ids).await?;
    if watching.is_empty() {
        return Ok(());
    }
    for (patient_id, created, corrected) in &changed {
        queue_changed(
            conn,
            &watching,
            patient_id,
            created,
            NotificationKind::NewData,
        )
        .await?;
        queue_changed(
            conn,
            &watching,
            patient_id,
            corrected,
            NotificationKind::DataCorrected,
        )
        .await?;
    }
    Ok(())
}

/// Consents whose period ended without a withdrawal: queues `consent-expired` once each.
pub async fn queue_expired(db: &Database) -> Result<u64> {
    let now = now_millis();
    let rows = sqlx::query(
        "SELECT c.id, c.patient_id, c.recipient FROM consents c
         WHERE c.status = 'active' AND c.period_end IS NOT NULL AND c.period_end <= $1
           AND c.recipient IN (SELECT client_id FROM webhook_endpoints)
           AND NOT EXISTS (SELECT 1 FROM notifications n
                           WHERE n.consent_id = c.id AND n.event = 'consent-expired')",
    )
    .bind(now)
    .fetch_all(db.read_pool())
    .await?;
    let mut queued = 0;
    for row in rows {
        let (consent_id, patient_id, recipient): (String, String, String) =
            (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
        let mut tx = db.begin().await?;
        if enqueue_in(
            &mut tx,
            &recipient,
            &patient_id,
            &consent_id,
            NotificationKind::ConsentExpired,
            &[],
        )
        .await?
        {
            queued += 1;
        }
        tx.commit().await?;
    }
    Ok(queued)
}

/// Registers (or replaces) a client's webhook endpoint; audited.
pub async fn register_endpoint(
    db: &Database,
    agent: &Agent,
    operator_account_id: &str,
    client_id: &str,
    url: &str,
) -> Result<()> {
    crate::oauth::clients::validate_redirect_uri(url)
        .map_err(|reason| Error::Invalid(format!("webhook URL {url:?}: {reason}")))?;
    let mut tx = db.begin().await?;
    let known: Option<String> = sqlx::query_scalar("SELECT id FROM oauth_clients WHERE id = $1")
        .bind(client_id)
        .fetch_optional(&mut *tx)
        .await?;
    if known.is_none() {
        return Err(Error::NotFound(format!("client {client_id}")));
    }
    sqlx::query("DELETE FROM webhook_endpoints WHERE client_id = $1")
        .bind(client_id)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO webhook_endpoints (client_id, url, registered_by, created_at)
         VALUES ($1, $2, $3, $4)",
    )
    .bind(client_id)
    .bind(url)
    .bind(operator_account_id)
    .bind(now_millis())
    .execute(&mut *tx)
    .await?;
    let event = AuditEvent::new(EventKind::ClientRegistered, agent.clone())
        .detail(format!("webhook endpoint of client {client_id} registered"));
    audit::record(&mut tx, &event).await?;
    tx.commit().await?;
    Ok(())
}

/// The recipient confirms it stopped using and deleted the data a notification asked it
/// to; recorded once, audited. Another client's notification is "not found".
pub async fn acknowledge(
    db: &Database,
    agent: &Agent,
    client_id: &str,
    notification_id: &str,
) -> Result<i64> {
    let mut tx = db.begin().await?;
    let row = sqlx::query(
        "SELECT patient_id, consent_id, event, acknowledged_at FROM notifications
         WHERE id = $1 AND client_id = $2",
    )
    .bind(notification_id)
    .bind(client_id)
    .fetch_optional(&mut *tx)
    .await?
    .ok_or_else(|| Error::NotFound(format!("notification {notification_id}")))?;
    let (patient_id, consent_id, event): (String, String, String) =
        (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
    if let Some(at) = row.try_get::<Option<i64>, _>(3)? {
        return Ok(at);
    }
    let now = now_millis();
    sqlx::query("UPDATE notifications SET acknowledged_at = $1 WHERE id = $2")
        .bind(now)
        .bind(notification_id)
        .execute(&mut *tx)
        .await?;
    let audit_event = AuditEvent::new(EventKind::NotificationAcknowledged, agent.clone())
        .patient(&patient_id)
        .detail(format!(
            "{event} notification {notification_id} for consent {consent_id} acknowledged by {client_id}"
        ));
    audit::record(&mut tx, &audit_event).await?;
    tx.commit().await?;
    Ok(now)
}
