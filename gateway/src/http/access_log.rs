//! The patient's access log, as an API and a portal page: who (which recipient's app, which
//! operator, which representative) read, searched or exported which categories of their
//! data, when, under which consent, and what their consent refused. Reading it is audited;
//! the patient's own reads are not listed in it.

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Json;
use maud::html;
use serde::Deserialize;
use utoipa::IntoParams;

use super::error::ApiError;
use super::portal::{html_response, signed_in_page};
use super::session::PatientSession;
use super::AppState;
use crate::audit::access_log::{
    access_log, AccessAction, AccessLogEntry, AccessLogPage, AccessOutcome, AccessorKind,
};
use crate::audit::{AuditEvent, EventKind};
use crate::store::JAPAN;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AccessLogQuery {
    /// Entries per page: 50 unless given, at most 200.
    pub limit: Option<u32>,
    /// The `next` of the previous page: entries older than it.
    pub before: Option<String>,
}

/// Others' accesses to the patient's data (recipients' apps, operators, representatives),
/// newest first, paged. Reading it is audited.
#[utoipa::path(get, path = "/patient/access-log", tag = "patient",
    params(AccessLogQuery),
    responses((status = 200, description = "One page of the access log, newest first", body = AccessLogPage),
        (status = 400, description = "A `before` this log did not give, or a bad `limit`", content_type = "application/problem+json"),
        (status = 401, description = "Not signed in", content_type = "application/problem+json"),
        (status = 403, description = "Not a patient, or not registered to act for this person", content_type = "application/problem+json")))]
pub async fn list(
    State(state): State<AppState>,
    patient: PatientSession,
    Query(query): Query<AccessLogQuery>,
) -> Result<Json<AccessLogPage>, ApiError> {
    let page = access_log(
        &state.db,
        &patient.patient_id,
        query.limit,
        query.before.as_deref(),
    )
    .await?;
    audit_access_log_read(&state, &patient).await?;
    Ok(Json(page))
}

/// The portal page: a table of the same entries, with a link to older ones.
pub async fn page(
    State(state): State<AppState>,
    patient: PatientSession,
    Query(query): Query<AccessLogQuery>,
) -> Result<Response, ApiError> {
    let log = access_log(
        &state.db,
        &patient.patient_id,
        query.limit,
        query.before.as_deref(),
    )
    .await?;
    audit_access_log_read(&state, &patient).await?;
    let markup = signed_in_page(
        "アクセス記録 / Access log",
        html! {
            h1 { "アクセス記録 " span.en { "Access log" } }
            @if patient.acting.is_some() {
                p id="acting-for" { (patient.patient_id) " さんのデータへのアクセスです。 " span.en { "Accesses to the data of " (patient.patient_id) "." } }
            }
            p { "あなたのデータを、だれが、いつ、どの同意にもとづいて見たり書き出したりしたかの記録です。同意の範囲外で断った請求も載せています。あなた自身の閲覧は載せていません。" }
            p.en { "Who read or exported your data, when, and under which consent; requests refused because they were outside your consent are listed too. Your own reads are not listed." }
            p { "提供をやめたいときは、" a href="/portal/consents" { "同意の管理" } "から撤回できます。 " span.en { "To stop sharing, withdraw the consent under Consents." } }
            @if log.entries.is_empty() {
                p id="no-accesses" { "記録はありません。 " span.en { "No accesses recorded." } }
            } @else {
                table id="access-log" {
                    thead { tr {
                        th { "日時 " span.en { "When" } }
                        th { "だれが " span.en { "Who" } }
                        th { "何を " span.en { "What" } }
                        th { "情報の種類 " span.en { "Data" } }
                        th { "同意 " span.en { "Consent" } }
                    } }
                    tbody {
                        @for entry in &log.entries {
                            tr data-outcome=(outcome_code(entry.outcome)) {
                                td { time datetime=(entry.at) { (japan_time(&entry.at)) } }
                                td class="accessor" {
                                    div { (entry.accessor.display) }
                                    @if let Some(organisation) = &entry.accessor.organisation {
                                        div { (organisation) }
                                    }
                                    @let (kind_ja, kind_en) = accessor_label(entry.accessor.kind);
                                    div { (kind_ja) " " span.en { (kind_en) } }
                                }
                                td class="action" {
                                    @let (action_ja, action_en) = action_label(entry);
                                    div { (action_ja) " " span.en { (action_en) } }
                                }
                                td class="categories" {
                                    @for category in &entry.categories {
                                        div { (category.label_ja) " " span.en { (category.label_en) } }
                                    }
                                }
                                td class="consent" {
                                    @if let Some(consent_id) = &entry.consent_id {
                                        a href="/portal/consents" { (consent_id) }
                                    } @else {
                                        "—"
                                    }
                                }
                            }
                        }
                    }
                }
            }
            @if let Some(next) = &log.next {
                p { a id="older" href={ "/portal/access-log?before=" (next) } { "さらに前の記録 / Older entries" } }
            }
        },
    );
    Ok(html_response(StatusCode::OK, markup))
}

async fn audit_access_log_read(state: &AppState, patient: &PatientSession) -> Result<(), ApiError> {
    let event = AuditEvent::new(EventKind::Read, patient.auth.agent())
        .patient(&patient.patient_id)
        .detail("access log");
    state.audit.record_now(&event).await?;
    Ok(())
}

fn outcome_code(outcome: AccessOutcome) -> &'static str {
    match outcome {
        AccessOutcome::Success => "success",
        AccessOutcome::Denied => "denied",
    }
}

fn accessor_label(kind: AccessorKind) -> (&'static str, &'static str) {
    match kind {
        AccessorKind::Client => ("アプリ（提供先）", "App (recipient)"),
        AccessorKind::Operator => ("ゲートウェイの運営者", "Gateway operator"),
        AccessorKind::Account => ("代理人など", "Representative or other account"),
        AccessorKind::System => ("ゲートウェイ", "The gateway"),
        AccessorKind::Unauthenticated => ("サインインしていない人", "Someone not signed in"),
    }
}

fn action_label(entry: &AccessLogEntry) -> (&'static str, &'static str) {
    match (entry.outcome, entry.action) {
        (AccessOutcome::Denied, _) => (
            "請求を断りました（同意の範囲外など）",
            "Refused (outside your consent, or failed)",
        ),
        (AccessOutcome::Success, AccessAction::Read) => ("閲覧", "Read"),
        (AccessOutcome::Success, AccessAction::Search) => ("検索して閲覧", "Searched"),
        (AccessOutcome::Success, AccessAction::Export) => ("書き出し", "Exported"),
        (AccessOutcome::Success, AccessAction::Other) => ("その他の提供", "Other disclosure"),
    }
}

/// An RFC 3339 instant as Japan time, `YYYY-MM-DD HH:MM`; as given if it does not parse.
fn japan_time(at: &str) -> String {
    let format = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]");
    match time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339) {
        Ok(instant) => instant
            .to_offset(JAPAN)
            .format(&format)
            .unwrap_or_else(|_| at.to_string()),
        Err(_) => at.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_shown_in_japan_time() {
        assert_eq!(japan_time("2026-11-25T15:30:00Z"), "2026-11-26 00:30");
        assert_eq!(japan_time("not a time"), "not a time");
    }
}
