//! The recent event rate for the operators' page: audit events per minute over the last
//! hour, split by outcome.

use serde::Serialize;
use sqlx::Row;
use utoipa::ToSchema;

use crate::error::Result;
use crate::store::Database;

/// Minutes shown.
pub const MINUTES: usize = 60;

/// Events written in one minute.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, ToSchema)]
pub struct MinuteRate {
    /// The minute's start, Unix milliseconds.
    pub minute_start: i64,
    pub succeeded: u32,
    pub failed: u32,
}

/// The last [`MINUTES`] whole and current minutes up to `now`, oldest first.
pub async fn event_rate(db: &Database, now_millis: i64) -> Result<Vec<MinuteRate>> {
    let current = now_millis.div_euclid(60_000) * 60_000;
    let first = current - (MINUTES as i64 - 1) * 60_000;
    let mut minutes: Vec<MinuteRate> = (0..MINUTES as i64)
        .map(|i| MinuteRate {
            minute_start: first + i * 60_000,
            ..MinuteRate::default()
        })
        .collect();
    let rows = sqlx::query("SELECT recorded_at, body FROM audit_leaves WHERE recorded_at >= $1")
        .bind(first)
        .fetch_all(db.read_pool())
        .await?;
    for row in rows {
        let at: i64 = row.try_get(0)?;
        let body: Vec<u8> = row.try_get(1)?;
        let slot = ((at - first) / 60_000) as usize;
        if let Some(minute) = minutes.get_mut(slot) {
            if outcome_failed(&body) {
                minute.failed += 1;
            } else {
                minute.succeeded += 1;
            }
        }
    }
    Ok(minutes)
}

/// Whether a leaf's outcome is a failure, read without parsing the whole event: leaves are
/// compact JSON with a single top-level `"outcome"` string.
fn outcome_failed(leaf: &[u8]) -> bool {
    const KEY: &[u8] = b"\"outcome\":\"";
    leaf.windows(KEY.len())
        .position(|w| w == KEY)
        .and_then(|at| leaf.get(at + KEY.len()))
        .is_some_and(|&code| code != b'0')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{Agent, AuditEvent, EventKind, Outcome};

    #[test]
    fn outcomes_read_from_the_leaf() {
        let ok = AuditEvent::new(EventKind::Login, Agent::system()).to_leaf();
        let failed = AuditEvent::new(EventKind::Login, Agent::system())
            .outcome(Outcome::MinorFailure)
            .detail("\"outcome\":\"0\" in a note")
            .to_leaf();
        assert!(!outcome_failed(&ok));
        assert!(outcome_failed(&failed));
    }
}
