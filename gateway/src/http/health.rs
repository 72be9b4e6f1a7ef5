//! Liveness and readiness probes for load balancers and orchestrators.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::error::ApiError;
use super::AppState;

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok`, or `degraded` when a source is unavailable (the gateway still serves).
    pub status: &'static str,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    /// `ok`, or `degraded` when a source is down: stored data is still served.
    pub status: &'static str,
    pub unavailable_sources: Vec<UnavailableSource>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UnavailableSource {
    pub source_id: String,
    pub since: String,
    pub reason: String,
}

/// Liveness: the process is up and serving.
#[utoipa::path(get, path = "/healthz", tag = "health",
    responses((status = 200, description = "The process is serving", body = Health)))]
pub async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// Readiness: the database and the key store answer; sources that are down are reported
/// (degraded) without making the gateway unready.
#[utoipa::path(get, path = "/readyz", tag = "health",
    responses(
        (status = 200, description = "Ready to serve traffic (possibly degraded)", body = Readiness),
        (status = 503, description = "A store is unreachable", content_type = "application/problem+json")))]
pub async fn readyz(State(state): State<AppState>) -> Result<Json<Readiness>, ApiError> {
    let unavailable = |_| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "a store is unreachable");
    state.db.ping().await.map_err(unavailable)?;
    state.keys.ping().await.map_err(unavailable)?;
    let down = crate::pull::registry::unavailable_sources(&state.db)
        .await
        .map_err(unavailable)?;
    Ok(Json(Readiness {
        status: if down.is_empty() { "ok" } else { "degraded" },
        unavailable_sources: down
            .into_iter()
            .map(|d| UnavailableSource {
                source_id: d.source_id,
                since: crate::store::millis_to_rfc3339(d.since),
                reason: d.reason,
            })
            .collect(),
    }))
}
