//! Prometheus metrics for operators.

use axum::extract::State;
use axum::http::{header, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::{text::encode, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use sqlx::Row;

use super::error::ApiError;
use super::session::OperatorSession;
use super::AppState;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    status: u16,
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    audit_tree_size: Gauge,
    audit_unsequenced: Gauge,
    audit_shipping_behind: Gauge,
    audit_shipping_since_success: Gauge,
    audit_shipping_failing: Gauge,
    backup_last_drill_success: Gauge,
    backup_last_drill_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    backup_verified_generations: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("phr_gateway");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by method and status",
            requests.clone(),
        );
        let audit_tree_size = Gauge::default();
        registry.register(
            "audit_tree_size",
            "Leaves sequenced into the audit tree",
            audit_tree_size.clone(),
        );
        let audit_unsequenced = Gauge::default();
        registry.register(
            "audit_unsequenced",
            "Audit leaves waiting for the sequencer",
            audit_unsequenced.clone(),
        );
        let audit_shipping_behind = Gauge::default();
        registry.register(
            "audit_shipping_leaves_behind",
            "Sequenced audit leaves not yet in the write-once sink",
            audit_shipping_behind.clone(),
        );
        let audit_shipping_since_success = Gauge::default();
        registry.register(
            "audit_shipping_seconds_since_success",
            "Seconds since audit shipping last succeeded (-1: never)",
            audit_shipping_since_success.clone(),
        );
        let audit_shipping_failing = Gauge::default();
        registry.register(
            "audit_shipping_failing",
            "1 while audit shipping fails",
            audit_shipping_failing.clone(),
        );
        let backup_last_drill_success = Gauge::default();
        registry.register(
            "backup_last_drill_success",
            "1 when the last restore drill verified every generation it restored, 0 when not, -1 before the first",
            backup_last_drill_success.clone(),
        );
        let backup_last_drill_seconds = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "backup_last_drill_seconds",
            "Seconds the last restore drill's restores took",
            backup_last_drill_seconds.clone(),
        );
        let backup_verified_generations = Gauge::default();
        registry.register(
            "backup_verified_generations",
            "Backup generations whose latest verification passed (not deleted since)",
            backup_verified_generations.clone(),
        );
        Metrics {
            registry,
            backup_last_drill_success,
            backup_last_drill_seconds,
            backup_verified_generations,
            audit_shipping_behind,
            audit_shipping_since_success,
            audit_shipping_failing,
            requests,
            audit_tree_size,
            audit_unsequenced,
        }
    }
}

impl Metrics {
    pub fn observe_request(&self, method: &Method, status: StatusCode) {
        self.requests
            .get_or_create(&RequestLabels {
                method: method.as_str().to_string(),
                status: status.as_u16(),
            })
            .inc();
    }
}

/// Prometheus text exposition, for operators.
#[utoipa::path(get, path = "/metrics", tag = "operator",
    responses(
        (status = 200, description = "Prometheus text format", content_type = "text/plain"),
        (status = 401, description = "Not signed in", content_type = "application/problem+json"),
        (status = 403, description = "Not an operator", content_type = "application/problem+json")))]
pub async fn metrics(
    State(state): State<AppState>,
    _operator: OperatorSession,
) -> Result<Response, ApiError> {
    let row = sqlx::query(
        "SELECT (SELECT COUNT(*) FROM audit_leaves WHERE tree_index IS NOT NULL),
                (SELECT COUNT(*) FROM audit_leaves WHERE tree_index IS NULL)",
    )
    .fetch_one(state.db.read_pool())
    .await
    .map_err(crate::error::Error::from)?;
    let sequenced: i64 = row.try_get(0).map_err(crate::error::Error::from)?;
    let unsequenced: i64 = row.try_get(1).map_err(crate::error::Error::from)?;
    state.metrics.audit_tree_size.set(sequenced);
    state.metrics.audit_unsequenced.set(unsequenced);
    let shipping = crate::audit::shipping::status(&state.db).await?;
    let metrics = &state.metrics;
    metrics
        .audit_shipping_behind
        .set(shipping.leaves_behind as i64);
    metrics.audit_shipping_since_success.set(
        shipping
            .seconds_since_success
            .map_or(-1, |s| s.min(i64::MAX as u64) as i64),
    );
    metrics
        .audit_shipping_failing
        .set(i64::from(shipping.failing));
    let drill = crate::backup::generations::last_drill(&state.db).await?;
    metrics
        .backup_last_drill_success
        .set(drill.map_or(-1, |d| i64::from(d.success)));
    metrics
        .backup_last_drill_seconds
        .set(drill.map_or(0.0, |d| d.restore_millis as f64 / 1000.0));
    metrics.backup_verified_generations.set(
        crate::backup::generations::verified_good(&state.db)
            .await?
            .len() as i64,
    );
    let mut text = String::new();
    encode(&mut text, &state.metrics.registry)
        .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "metrics encoding failed"))?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}
