//! Alerts for operators: a JSON list and acknowledgement, and a server-rendered page with
//! the open alerts, an acknowledge button each, and the recent event rate as an inline SVG
//! bar chart (no script). Acknowledging is audited.

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Json;
use maud::{html, Markup};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::error::ApiError;
use super::portal::{html_response, page as html_page, same_origin};
use super::session::OperatorSession;
use super::AppState;
use crate::alerts::rate::{event_rate, MinuteRate};
use crate::alerts::{self, Alert};
use crate::store::{now_millis, JAPAN};

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AlertListParams {
    /// Include acknowledged alerts too.
    pub all: Option<bool>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AlertList {
    /// Newest first (at most 500).
    pub alerts: Vec<Alert>,
}

/// Open alerts (or, with `all=true`, every recent one), newest first.
#[utoipa::path(get, path = "/operator/alerts", tag = "operator",
    params(AlertListParams),
    responses(
        (status = 200, description = "Alerts, newest first", body = AlertList),
        (status = 401, description = "Not signed in", content_type = "application/problem+json"),
        (status = 403, description = "Not an operator", content_type = "application/problem+json")))]
pub async fn list(
    State(state): State<AppState>,
    _operator: OperatorSession,
    Query(params): Query<AlertListParams>,
) -> Result<Json<AlertList>, ApiError> {
    let alerts = alerts::list(&state.db, params.all.unwrap_or(false)).await?;
    Ok(Json(AlertList { alerts }))
}

/// Acknowledges an alert (once; again changes nothing). Audited.
#[utoipa::path(post, path = "/operator/alerts/{id}/acknowledge", tag = "operator",
    params(("id" = String, Path, description = "The alert")),
    responses(
        (status = 200, description = "The acknowledged alert", body = Alert),
        (status = 404, description = "No such alert", content_type = "application/problem+json"),
        (status = 401, description = "Not signed in", content_type = "application/problem+json"),
        (status = 403, description = "Not an operator", content_type = "application/problem+json")))]
pub async fn acknowledge(
    State(state): State<AppState>,
    operator: OperatorSession,
    Path(id): Path<String>,
) -> Result<Json<Alert>, ApiError> {
    let alert = alerts::acknowledge(
        &state.db,
        &operator.0.agent(),
        &operator.0.session.account.id,
        &id,
    )
    .await?;
    state.audit.notify();
    Ok(Json(alert))
}

/// The operators' alerts page.
pub async fn page(
    State(state): State<AppState>,
    _operator: OperatorSession,
) -> Result<Response, ApiError> {
    let open = alerts::list(&state.db, false).await?;
    let rate = event_rate(&state.db, now_millis()).await?;
    let markup = html_page(
        "アラート / Alerts",
        html! {
            h1 { "アラート " span.en { "Alerts" } }
            h2 { "直近1時間のイベント数 " span.en { "Audit events per minute, last hour" } }
            (rate_chart(&rate))
            h2 { "未対応のアラート " span.en { "Open alerts" } }
            @if open.is_empty() {
                p id="no-alerts" { "未対応のアラートはありません。 " span.en { "No open alerts." } }
            } @else {
                table id="alerts" {
                    thead { tr {
                        th { "重要度 " span.en { "Severity" } }
                        th { "ルール " span.en { "Rule" } }
                        th { "内容 " span.en { "Summary" } }
                        th { "最初 / 最後 " span.en { "First / last seen" } }
                        th {}
                    } }
                    tbody {
                        @for alert in &open {
                            tr data-alert=(alert.id) data-rule=(alert.rule) {
                                td class=(alert.severity) { (alert.severity) }
                                td { (alert.rule) }
                                td { (alert.summary) }
                                td { (alert.first_seen) br; (alert.last_seen) }
                                td {
                                    form method="post" action={ "/operator/alerts-page/" (alert.id) "/acknowledge" } {
                                        button type="submit" { "確認済みにする / Acknowledge" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        },
    );
    Ok(html_response(StatusCode::OK, markup))
}

/// The page's acknowledge button: acknowledges, then back to the page.
pub async fn page_acknowledge(
    State(state): State<AppState>,
    headers: HeaderMap,
    operator: OperatorSession,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    same_origin(&headers, &state)?;
    alerts::acknowledge(
        &state.db,
        &operator.0.agent(),
        &operator.0.session.account.id,
        &id,
    )
    .await?;
    state.audit.notify();
    Ok(Redirect::to("/operator/alerts-page").into_response())
}

const CHART_WIDTH: i64 = 600;
const CHART_HEIGHT: i64 = 120;
const AXIS_HEIGHT: i64 = 16;

/// Stacked bars, one per minute: succeeded below, failed above. Presentation attributes
/// only (the pages' CSP allows no inline style).
fn rate_chart(minutes: &[MinuteRate]) -> Markup {
    let most = minutes
        .iter()
        .map(|m| i64::from(m.succeeded + m.failed))
        .max()
        .unwrap_or(0)
        .max(1);
    let slot = CHART_WIDTH / (minutes.len().max(1) as i64);
    let height_of = |count: u32| (i64::from(count) * CHART_HEIGHT + most - 1) / most;
    let clock = |millis: i64| {
        time::OffsetDateTime::from_unix_timestamp(millis / 1000)
            .map(|t| {
                let t = t.to_offset(JAPAN);
                format!("{:02}:{:02}", t.hour(), t.minute())
            })
            .unwrap_or_default()
    };
    let total_failed: u32 = minutes.iter().map(|m| m.failed).sum();
    let total: u32 = minutes.iter().map(|m| m.succeeded + m.failed).sum::<u32>();
    html! {
        figure id="event-rate" {
            svg xmlns="http://www.w3.org/2000/svg" width=(CHART_WIDTH) height=(CHART_HEIGHT + AXIS_HEIGHT)
                viewBox={ "0 0 " (CHART_WIDTH) " " (CHART_HEIGHT + AXIS_HEIGHT) } role="img"
                aria-label={ "Audit events per minute over the last hour: " (total) " in all, " (total_failed) " failed" } {
                line x1="0" y1=(CHART_HEIGHT) x2=(CHART_WIDTH) y2=(CHART_HEIGHT) stroke="#999" {}
                @for (i, minute) in minutes.iter().enumerate() {
                    @let x = i as i64 * slot;
                    @let ok = height_of(minute.succeeded);
                    @let failed = height_of(minute.failed);
                    @if minute.succeeded + minute.failed > 0 {
                        g {
                            title { (clock(minute.minute_start)) ": " (minute.succeeded) " succeeded, " (minute.failed) " failed" }
                            @if minute.succeeded > 0 {
                                rect class="bar succeeded" x=(x) y=(CHART_HEIGHT - ok) width=(slot - 2) height=(ok) fill="#2b6cb0" {}
                            }
                            @if minute.failed > 0 {
                                rect class="bar failed" x=(x) y=(CHART_HEIGHT - ok - failed) width=(slot - 2) height=(failed) fill="#c53030" {}
                            }
                        }
                    }
                }
                @if let (Some(first), Some(last)) = (minutes.first(), minutes.last()) {
                    text x="0" y=(CHART_HEIGHT + AXIS_HEIGHT - 3) font-size="11" { (clock(first.minute_start)) }
                    text x=(CHART_WIDTH) y=(CHART_HEIGHT + AXIS_HEIGHT - 3) font-size="11" text-anchor="end" { (clock(last.minute_start)) }
                }
            }
            figcaption {
                "青: 成功 / 赤: 失敗(最大 " (most) " 件/分) "
                span.en { "Blue: succeeded, red: failed (peak " (most) " per minute)" }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chart_draws_a_bar_per_busy_minute_with_closed_elements() {
        let mut minutes: Vec<MinuteRate> = (0..60)
            .map(|i| MinuteRate {
                minute_start: 1_764_039_600_000 + i * 60_000,
                ..MinuteRate::default()
            })
            .collect();
        minutes[10].succeeded = 4;
        minutes[59].succeeded = 2;
        minutes[59].failed = 2;
        let svg = rate_chart(&minutes).into_string();
        assert_eq!(svg.matches("<rect").count(), 3);
        assert_eq!(
            svg.matches("</rect>").count(),
            3,
            "SVG elements closed: {svg}"
        );
        assert!(
            svg.contains("height=\"120\""),
            "the busiest minute is full height"
        );
        assert!(svg.contains("12:59: 2 succeeded, 2 failed"), "{svg}");
    }
}
