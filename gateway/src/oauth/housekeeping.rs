//! Forgetting what no longer matters: authorisation requests, codes and tokens a day past
//! their expiry (an expired code or token is refused whether or not its row remains; the
//! day keeps recent ones for reuse detection and for the audit trail's context), and client
//! assertion `jti`s past theirs. Run hourly by every gateway process; idempotent.

use std::time::Duration;

use tokio::sync::watch;

use crate::error::Result;
use crate::store::{now_millis, Database};

/// How long past its expiry a row is kept.
const GRACE_MILLIS: i64 = 24 * 60 * 60 * 1000;
const INTERVAL: Duration = Duration::from_secs(60 * 60);

/// Rows removed by one purge.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Purged {
    pub tokens: u64,
    pub codes: u64,
    pub requests: u64,
    pub assertion_jtis: u64,
}

/// Removes what expired more than a day before `now` (Unix milliseconds).
pub async fn purge_expired(db: &Database, now: i64) -> Result<Purged> {
    let before = now - GRACE_MILLIS;
    let mut tx = db.begin().await?;
    let tokens = sqlx::query("DELETE FROM oauth_tokens WHERE expires_at < $1")
        .bind(before)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    let codes = sqlx::query("DELETE FROM oauth_codes WHERE expires_at < $1")
        .bind(before)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    // A request is kept while a code still points at it.
    let requests = sqlx::query(
        "DELETE FROM oauth_authorization_requests WHERE expires_at < $1
           AND id NOT IN (SELECT request_id FROM oauth_codes)",
    )
    .bind(before)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    let assertion_jtis = sqlx::query("DELETE FROM oauth_assertion_jtis WHERE expires_at < $1")
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    tx.commit().await?;
    Ok(Purged {
        tokens,
        codes,
        requests,
        assertion_jtis,
    })
}

/// Purges every hour until shutdown.
pub async fn run(db: Database, mut shutdown: watch::Receiver<bool>) {
    loop {
        match purge_expired(&db, now_millis()).await {
            Ok(purged) if purged != Purged::default() => {
                tracing::info!(?purged, "expired OAuth records purged")
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "purging expired OAuth records failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(INTERVAL) => {}
            _ = shutdown.changed() => return,
        }
    }
}
