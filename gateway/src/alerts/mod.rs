//! Alerts for operators: rules over the audit stream (many failed sign-ins, an app reading
//! unusually many patients, reads at unusual hours, break-glass use) and over facts (a
//! failed audit verification, audit shipping lag, a certificate or key near expiry). The
//! rules (`rules`) are pure; the engine (`engine`) reads new audit leaves, stores each new
//! alert once (by its dedup key), audits it and delivers it to the operators' webhook
//! endpoints as a signed Security Event Token. Operators list and acknowledge alerts.

pub mod credentials;
pub mod engine;
pub mod rate;
pub mod rules;

pub use engine::AlertEngine;
pub use rules::{ShippingLag, VerifyFailure};

use serde::Serialize;
use sqlx::Row;
use utoipa::ToSchema;

use crate::audit::{self, Agent, AuditEvent, EventKind};
use crate::error::{Error, Result};
use crate::store::{millis_to_rfc3339, now_millis, Database};

/// An alert as operators see it. PHI-free.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Alert {
    pub id: String,
    /// e.g. `failed-logins`, `many-patients-read`, `break-glass`.
    pub rule: String,
    /// `warning` or `critical`.
    pub severity: String,
    pub summary: String,
    /// When the occurrence was first and last seen (RFC 3339).
    pub first_seen: String,
    pub last_seen: String,
    /// When the alert was raised (RFC 3339).
    pub raised_at: String,
    /// The operator account that acknowledged it, and when.
    pub acknowledged_by: Option<String>,
    pub acknowledged_at: Option<String>,
}

const ALERT_COLUMNS: &str = "id, rule, severity, summary, first_seen, last_seen, created_at,
    acknowledged_by, acknowledged_at";

fn alert_of(row: &sqlx::any::AnyRow) -> Result<Alert> {
    Ok(Alert {
        id: row.try_get(0)?,
        rule: row.try_get(1)?,
        severity: row.try_get(2)?,
        summary: row.try_get(3)?,
        first_seen: millis_to_rfc3339(row.try_get(4)?),
        last_seen: millis_to_rfc3339(row.try_get(5)?),
        raised_at: millis_to_rfc3339(row.try_get(6)?),
        acknowledged_by: row.try_get(7)?,
        acknowledged_at: row.try_get::<Option<i64>, _>(8)?.map(millis_to_rfc3339),
    })
}

/// The most alerts one listing holds.
pub const MAX_LISTED: i64 = 500;

/// Alerts, newest first: the open ones, or all.
pub async fn list(db: &Database, include_acknowledged: bool) -> Result<Vec<Alert>> {
    let sql = format!(
        "SELECT {ALERT_COLUMNS} FROM alerts {} ORDER BY created_at DESC, id DESC LIMIT $1",
        if include_acknowledged {
            ""
        } else {
            "WHERE acknowledged_at IS NULL"
        }
    );
    let rows = sqlx::query(&sql)
        .bind(MAX_LISTED)
        .fetch_all(db.read_pool())
        .await?;
    rows.iter().map(alert_of).collect()
}

/// An operator acknowledges an alert: recorded once, audited. Acknowledging it again
/// changes nothing.
pub async fn acknowledge(
    db: &Database,
    agent: &Agent,
    operator_account_id: &str,
    alert_id: &str,
) -> Result<Alert> {
    let mut tx = db.begin().await?;
    let select = format!("SELECT {ALERT_COLUMNS} FROM alerts WHERE id = $1");
    let row = sqlx::query(&select)
        .bind(alert_id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| Error::NotFound(format!("alert {alert_id}")))?;
    let alert = alert_of(&row)?;
    if alert.acknowledged_at.is_some() {
        return Ok(alert);
    }
    let now = now_millis();
    sqlx::query(
        "UPDATE alerts SET acknowledged_by = $1, acknowledged_at = $2
         WHERE id = $3 AND acknowledged_at IS NULL",
    )
    .bind(operator_account_id)
    .bind(now)
    .bind(alert_id)
    .execute(&mut *tx)
    .await?;
    let event = AuditEvent::new(EventKind::AlertAcknowledged, agent.clone())
        .detail(format!("{} alert {alert_id} acknowledged", alert.rule));
    audit::record(&mut tx, &event).await?;
    tx.commit().await?;
    Ok(Alert {
        acknowledged_by: Some(operator_account_id.to_string()),
        acknowledged_at: Some(millis_to_rfc3339(now)),
        ..alert
    })
}
