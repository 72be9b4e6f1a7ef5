//! Remote maintenance windows. One operator requests a window (why, which ticket, from when
//! until when, whether many patients' data must be read at once and why); a second operator
//! approves or rejects it. Maintenance access exists only inside an approved window, only for
//! its requester (and, when the window is bound to one, only with its client certificate).
//! Every request in it is recorded and audited with the window id, purposeOfEvent SYSADMN;
//! each patient whose data it read gets an audited read naming the window, so it shows in
//! their access log. Reading many patients' data at once is refused unless that was requested and
//! approved. When the window closes (explicitly, or when noticed after its end) a report for
//! the institution is frozen: who asked, who approved, what was done, whose data was read.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use sqlx::Row;
use utoipa::ToSchema;

use crate::audit::{self, Agent, AuditEvent, EventKind, Outcome};
use crate::config::MaintenanceConfig;
use crate::error::{Error, Result};
use crate::store::accounts::{agent_of, Session};
use crate::store::{millis_of, millis_to_rfc3339, now_millis, Database};

/// Where a window is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum WindowStatus {
    /// Waiting for a second operator.
    Requested,
    Approved,
    Rejected,
    /// Withdrawn by its requester before a decision.
    Cancelled,
    /// Ended (closed early or noticed after its end); its report is frozen.
    Closed,
}

impl WindowStatus {
    fn code(self) -> &'static str {
        match self {
            WindowStatus::Requested => "requested",
            WindowStatus::Approved => "approved",
            WindowStatus::Rejected => "rejected",
            WindowStatus::Cancelled => "cancelled",
            WindowStatus::Closed => "closed",
        }
    }

    fn parse(code: &str) -> Result<Self> {
        match code {
            "requested" => Ok(WindowStatus::Requested),
            "approved" => Ok(WindowStatus::Approved),
            "rejected" => Ok(WindowStatus::Rejected),
            "cancelled" => Ok(WindowStatus::Cancelled),
            "closed" => Ok(WindowStatus::Closed),
            other => Err(Error::Invalid(format!(
                "unknown maintenance window status {other:?}"
            ))),
        }
    }
}

/// A maintenance window as operators see it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct MaintenanceWindow {
    pub id: String,
    /// The requesting operator's account id, and username.
    pub requested_by: String,
    pub requested_by_username: String,
    pub requested_at: String,
    pub reason: String,
    /// The institution's ticket or change reference.
    pub ticket: String,
    pub starts_at: String,
    pub ends_at: String,
    pub bulk_phi_requested: bool,
    pub bulk_phi_justification: Option<String>,
    /// Whether the approver allowed reading many patients' data at once.
    pub bulk_phi_allowed: bool,
    /// SHA-256 (hex) of the client certificate the window is bound to.
    pub client_cert_sha256: Option<String>,
    pub status: WindowStatus,
    /// The approving (or rejecting) operator.
    pub decided_by: Option<String>,
    pub decided_by_username: Option<String>,
    pub decided_at: Option<String>,
    pub decision_note: Option<String>,
    pub closed_at: Option<String>,
    #[serde(skip)]
    #[schema(ignore)]
    pub starts_millis: i64,
    #[serde(skip)]
    #[schema(ignore)]
    pub ends_millis: i64,
}

/// Asking for a window.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WindowRequest {
    /// What will be done and why (10 to 1000 characters).
    pub reason: String,
    /// The institution's ticket or change reference.
    pub ticket: String,
    /// RFC 3339; unset: now.
    pub starts_at: Option<String>,
    /// RFC 3339; at most `maintenance.max_window_minutes` after the start.
    pub ends_at: String,
    /// Set only when many patients' data must be read at once: why.
    pub bulk_phi_justification: Option<String>,
    /// Binds the window to one short-lived client certificate (PEM), signed by the client
    /// CA of `tls.client_ca_file`: maintenance requests must then come over it.
    pub client_certificate_pem: Option<String>,
}

/// Why an action in a window is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    NotYours,
    NotApproved,
    Rejected,
    Cancelled,
    Closed,
    NotYetStarted,
    Ended,
    CertificateRequired,
    CertificateMismatch,
    BulkPhiNotApproved,
}

impl Refusal {
    pub fn message(self) -> &'static str {
        match self {
            Refusal::NotYours => "this maintenance window belongs to another operator",
            Refusal::NotApproved => "this maintenance window has not been approved",
            Refusal::Rejected => "this maintenance window was rejected",
            Refusal::Cancelled => "this maintenance window was cancelled",
            Refusal::Closed => "this maintenance window is closed",
            Refusal::NotYetStarted => "this maintenance window has not started yet",
            Refusal::Ended => "this maintenance window has ended",
            Refusal::CertificateRequired => {
                "this maintenance window requires its client certificate"
            }
            Refusal::CertificateMismatch => {
                "this client certificate is not the one bound to the maintenance window"
            }
            Refusal::BulkPhiNotApproved => {
                "reading many patients' data at once was not approved for this window"
            }
        }
    }
}

/// Who is trying to act in a window, when, and with which client certificate.
#[derive(Debug, Clone, Copy)]
pub struct Attempt<'a> {
    pub account_id: &'a str,
    pub now: i64,
    pub client_cert_sha256: Option<&'a str>,
}

/// Whether an attempt may act in the window.
pub fn may_act(window: &MaintenanceWindow, attempt: Attempt<'_>) -> Result<(), Refusal> {
    if window.requested_by != attempt.account_id {
        return Err(Refusal::NotYours);
    }
    match window.status {
        WindowStatus::Requested => return Err(Refusal::NotApproved),
        WindowStatus::Rejected => return Err(Refusal::Rejected),
        WindowStatus::Cancelled => return Err(Refusal::Cancelled),
        WindowStatus::Closed => return Err(Refusal::Closed),
        WindowStatus::Approved => {}
    }
    if attempt.now < window.starts_millis {
        return Err(Refusal::NotYetStarted);
    }
    if attempt.now >= window.ends_millis {
        return Err(Refusal::Ended);
    }
    if let Some(bound) = &window.client_cert_sha256 {
        match attempt.client_cert_sha256 {
            None => return Err(Refusal::CertificateRequired),
            Some(presented) if !presented.eq_ignore_ascii_case(bound) => {
                return Err(Refusal::CertificateMismatch)
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Whether the window allows reading many patients' data at once.
pub fn may_read_in_bulk(window: &MaintenanceWindow) -> Result<(), Refusal> {
    if window.bulk_phi_requested && window.bulk_phi_allowed {
        Ok(())
    } else {
        Err(Refusal::BulkPhiNotApproved)
    }
}

/// Clock skew allowed for a start "now" sent by the client.
const START_SLACK_MILLIS: i64 = 5 * 60 * 1000;

/// Checks a requested window's times; returns (starts, ends) in Unix ms.
pub fn check_times(
    starts_at: Option<&str>,
    ends_at: &str,
    now: i64,
    settings: &MaintenanceConfig,
) -> Result<(i64, i64)> {
    let starts = match starts_at {
        Some(text) => {
            let starts = parse_instant(text, "starts_at")?;
            if starts < now - START_SLACK_MILLIS {
                return Err(Error::Invalid("starts_at is in the past".into()));
            }
            starts.max(now)
        }
        None => now,
    };
    let ends = parse_instant(ends_at, "ends_at")?;
    if ends <= starts {
        return Err(Error::Invalid("ends_at must be after the start".into()));
    }
    let max = settings.max_window_minutes as i64 * 60 * 1000;
    if ends - starts > max {
        return Err(Error::Invalid(format!(
            "a maintenance window lasts at most {} minutes",
            settings.max_window_minutes
        )));
    }
    let lead = settings.max_lead_days as i64 * 24 * 60 * 60 * 1000;
    if starts - now > lead {
        return Err(Error::Invalid(format!(
            "a maintenance window starts at most {} days ahead",
            settings.max_lead_days
        )));
    }
    Ok((starts, ends))
}

fn parse_instant(text: &str, what: &str) -> Result<i64> {
    time::OffsetDateTime::parse(text.trim(), &time::format_description::well_known::Rfc3339)
        .map(millis_of)
        .map_err(|_| Error::Invalid(format!("{what} must be an RFC 3339 date-time")))
}

fn bounded(text: &str, min: usize, max: usize, what: &str) -> Result<String> {
    let text = text.trim();
    let n = text.chars().count();
    if n < min || n > max || text.chars().any(char::is_control) {
        return Err(Error::Invalid(format!(
            "{what}: {min} to {max} characters on one line"
        )));
    }
    Ok(text.to_string())
}

/// The SHA-256 (hex) of a client certificate to bind a window to, once it is checked to be
/// short-lived (at most `max_hours` of validity) and valid during the window.
pub fn client_certificate_fingerprint(
    pem: &str,
    starts: i64,
    ends: i64,
    max_hours: u64,
) -> Result<String> {
    use sha2::Digest as _;
    let invalid = |why: &str| Error::Invalid(format!("client_certificate_pem: {why}"));
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.trim().as_bytes())
        .map_err(|_| invalid("not a PEM certificate"))?;
    let certificate = pem
        .parse_x509()
        .map_err(|_| invalid("not an X.509 certificate"))?;
    let validity = certificate.validity();
    let not_before = validity.not_before.timestamp().saturating_mul(1000);
    let not_after = validity.not_after.timestamp().saturating_mul(1000);
    let max = (max_hours as i64).saturating_mul(60 * 60 * 1000);
    if not_after.saturating_sub(not_before) > max {
        return Err(Error::Invalid(format!(
            "client_certificate_pem: a window's certificate may be valid for at most {max_hours} hours"
        )));
    }
    if not_after <= starts || not_before >= ends {
        return Err(invalid("the certificate is not valid during the window"));
    }
    Ok(hex::encode(sha2::Sha256::digest(&pem.contents)))
}

/// An admitted request in a window: the window and the recorded action.
#[derive(Debug, Clone)]
pub struct MaintenanceAccess {
    pub window: MaintenanceWindow,
    pub action_id: i64,
    pub session_id: String,
}

/// The report for the institution, frozen when the window closes.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MaintenanceReport {
    pub window_id: String,
    pub ticket: String,
    pub reason: String,
    pub requested_by: String,
    pub requested_at: String,
    pub approved_by: Option<String>,
    pub approved_at: Option<String>,
    pub approval_note: Option<String>,
    pub starts_at: String,
    pub ends_at: String,
    pub closed_at: String,
    pub bulk_phi_requested: bool,
    pub bulk_phi_justification: Option<String>,
    pub bulk_phi_allowed: bool,
    pub client_cert_sha256: Option<String>,
    /// Every request made in the window, in order, refused ones too.
    pub actions: Vec<ReportedAction>,
    /// Opaque ids of every patient whose data was read; empty when none.
    pub patients_touched: Vec<String>,
    pub generated_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ReportedAction {
    pub at: String,
    /// The operator's username.
    pub operator: String,
    pub session_id: String,
    /// `METHOD /path`.
    pub action: String,
    /// `done` or `refused`.
    pub outcome: String,
    pub patients: Vec<String>,
}

impl MaintenanceReport {
    fn of(window: &MaintenanceWindow, actions: Vec<ReportedAction>, closed_at: i64) -> Self {
        let patients_touched: BTreeSet<String> = actions
            .iter()
            .flat_map(|a| a.patients.iter().cloned())
            .collect();
        let approved = window.decided_by.is_some() && window.status != WindowStatus::Rejected;
        MaintenanceReport {
            window_id: window.id.clone(),
            ticket: window.ticket.clone(),
            reason: window.reason.clone(),
            requested_by: window.requested_by_username.clone(),
            requested_at: window.requested_at.clone(),
            approved_by: approved
                .then(|| window.decided_by_username.clone())
                .flatten(),
            approved_at: approved.then(|| window.decided_at.clone()).flatten(),
            approval_note: approved.then(|| window.decision_note.clone()).flatten(),
            starts_at: window.starts_at.clone(),
            ends_at: window.ends_at.clone(),
            closed_at: millis_to_rfc3339(closed_at),
            bulk_phi_requested: window.bulk_phi_requested,
            bulk_phi_justification: window.bulk_phi_justification.clone(),
            bulk_phi_allowed: window.bulk_phi_allowed,
            client_cert_sha256: window.client_cert_sha256.clone(),
            actions,
            patients_touched: patients_touched.into_iter().collect(),
            generated_at: millis_to_rfc3339(now_millis()),
        }
    }

    /// The report as plain text in Japanese and English, for the institution's records.
    pub fn to_text(&self) -> String {
        let yes_no = |b: bool| if b { "はい / yes" } else { "いいえ / no" };
        let none = "なし / none";
        let mut out = String::new();
        let mut line = |label: &str, value: &str| {
            out.push_str(label);
            out.push_str(": ");
            out.push_str(value);
            out.push('\n');
        };
        line(
            "リモート保守報告 / Remote maintenance report",
            &self.window_id,
        );
        line("チケット / Ticket", &self.ticket);
        line("理由 / Reason", &self.reason);
        line(
            "申請者 / Requested by",
            &format!("{} ({})", self.requested_by, self.requested_at),
        );
        match (&self.approved_by, &self.approved_at) {
            (Some(by), Some(at)) => line("承認者 / Approved by", &format!("{by} ({at})")),
            _ => line("承認者 / Approved by", none),
        }
        line(
            "保守時間帯 / Window",
            &format!("{} – {}", self.starts_at, self.ends_at),
        );
        line("終了 / Closed", &self.closed_at);
        line(
            "一括での個人健康情報の閲覧 申請 / Bulk PHI read requested",
            yes_no(self.bulk_phi_requested),
        );
        if let Some(why) = &self.bulk_phi_justification {
            line("  理由 / Justification", why);
        }
        line(
            "一括での個人健康情報の閲覧 承認 / Bulk PHI read approved",
            yes_no(self.bulk_phi_allowed),
        );
        if let Some(fingerprint) = &self.client_cert_sha256 {
            line(
                "クライアント証明書 / Client certificate SHA-256",
                fingerprint,
            );
        }
        out.push_str(&format!("\n操作 / Actions ({}):\n", self.actions.len()));
        if self.actions.is_empty() {
            out.push_str(&format!("  {none}\n"));
        }
        for action in &self.actions {
            out.push_str(&format!(
                "  {} {} [{}] {} — {}\n",
                action.at,
                action.operator,
                action.outcome,
                action.action,
                if action.patients.is_empty() {
                    none.to_string()
                } else {
                    action.patients.join(", ")
                }
            ));
        }
        out.push_str("\n閲覧された患者 / Patients whose data was read:\n");
        if self.patients_touched.is_empty() {
            out.push_str(&format!("  {none}\n"));
        }
        for patient in &self.patients_touched {
            out.push_str(&format!("  {patient}\n"));
        }
        out.push_str(&format!("\n作成 / Generated: {}\n", self.generated_at));
        out
    }
}

/// Non-PHI health of the gateway, for maintenance.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Diagnostics {
    pub database_engine: String,
    pub database_round_trip_ms: u64,
    /// Pull jobs by status.
    pub pull_jobs: BTreeMap<String, i64>,
    /// Bulk export jobs by status.
    pub export_jobs: BTreeMap<String, i64>,
    /// Notifications to recipients by status.
    pub notifications: BTreeMap<String, i64>,
    /// Audit leaves written but not yet in the signed tree.
    pub audit_leaves_unsequenced: i64,
    pub live_sessions: i64,
}

/// One patient's current resources, counted by type.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PatientResourceCounts {
    pub patient_id: String,
    pub counts: BTreeMap<String, i64>,
}

/// Most patients one bulk listing covers.
const BULK_LIMIT: i64 = 1000;

const WINDOW_COLUMNS: &str = "SELECT w.id, w.requested_by, r.username, w.requested_at, w.reason,
        w.ticket, w.starts_at, w.ends_at, w.bulk_phi_requested, w.bulk_phi_justification,
        w.bulk_phi_allowed, w.client_cert_sha256, w.status, w.decided_by, d.username,
        w.decided_at, w.decision_note, w.closed_at
     FROM maintenance_windows w
     JOIN accounts r ON r.id = w.requested_by
     LEFT JOIN accounts d ON d.id = w.decided_by";

fn window_of(row: &sqlx::any::AnyRow) -> Result<MaintenanceWindow> {
    let starts_millis: i64 = row.try_get(6)?;
    let ends_millis: i64 = row.try_get(7)?;
    let decided_at: Option<i64> = row.try_get(15)?;
    let closed_at: Option<i64> = row.try_get(17)?;
    Ok(MaintenanceWindow {
        id: row.try_get(0)?,
        requested_by: row.try_get(1)?,
        requested_by_username: row.try_get(2)?,
        requested_at: millis_to_rfc3339(row.try_get(3)?),
        reason: row.try_get(4)?,
        ticket: row.try_get(5)?,
        starts_at: millis_to_rfc3339(starts_millis),
        ends_at: millis_to_rfc3339(ends_millis),
        bulk_phi_requested: row.try_get::<i64, _>(8)? != 0,
        bulk_phi_justification: row.try_get(9)?,
        bulk_phi_allowed: row.try_get::<i64, _>(10)? != 0,
        client_cert_sha256: row.try_get(11)?,
        status: WindowStatus::parse(&row.try_get::<String, _>(12)?)?,
        decided_by: row.try_get(13)?,
        decided_by_username: row.try_get(14)?,
        decided_at: decided_at.map(millis_to_rfc3339),
        decision_note: row.try_get(16)?,
        closed_at: closed_at.map(millis_to_rfc3339),
        starts_millis,
        ends_millis,
    })
}

#[derive(Clone)]
pub struct Maintenance {
    db: Database,
    settings: MaintenanceConfig,
    /// Whether clients can present certificates at all (`tls.client_ca_file` is set).
    client_certificates: bool,
}

impl Maintenance {
    pub fn new(db: Database, settings: MaintenanceConfig, client_certificates: bool) -> Self {
        Maintenance {
            db,
            settings,
            client_certificates,
        }
    }

    /// One window, or `NotFound`.
    pub async fn window(&self, id: &str) -> Result<MaintenanceWindow> {
        let row = sqlx::query(&format!("{WINDOW_COLUMNS} WHERE w.id = $1"))
            .bind(id)
            .fetch_optional(self.db.read_pool())
            .await?
            .ok_or_else(|| Error::NotFound(format!("maintenance window {id}")))?;
        window_of(&row)
    }

    /// Every window, newest first; approved windows past their end are closed first, so
    /// their reports exist.
    pub async fn windows(&self) -> Result<Vec<MaintenanceWindow>> {
        self.close_ended().await?;
        let rows = sqlx::query(&format!(
            "{WINDOW_COLUMNS} ORDER BY w.requested_at DESC LIMIT 500"
        ))
        .fetch_all(self.db.read_pool())
        .await?;
        rows.iter().map(window_of).collect()
    }

    /// Records a request for a window. Audited.
    pub async fn request(
        &self,
        requester: &Session,
        request: &WindowRequest,
        address: Option<IpAddr>,
    ) -> Result<MaintenanceWindow> {
        if requester.emergency_use_id.is_some() {
            return Err(Error::Forbidden(
                "a break-glass session cannot request maintenance windows",
            ));
        }
        let reason = bounded(&request.reason, 10, 1000, "reason")?;
        let ticket = bounded(&request.ticket, 1, 100, "ticket")?;
        let justification = request
            .bulk_phi_justification
            .as_deref()
            .map(|why| bounded(why, 10, 1000, "bulk_phi_justification"))
            .transpose()?;
        let now = now_millis();
        let (starts, ends) = check_times(
            request.starts_at.as_deref(),
            &request.ends_at,
            now,
            &self.settings,
        )?;
        let fingerprint = match &request.client_certificate_pem {
            None => None,
            Some(_) if !self.client_certificates => {
                return Err(Error::Invalid(
                    "client certificates are not enabled here (tls.client_ca_file)".into(),
                ))
            }
            Some(pem) => Some(client_certificate_fingerprint(
                pem,
                starts,
                ends,
                self.settings.max_client_cert_hours,
            )?),
        };
        let id = uuid::Uuid::new_v4().to_string();
        let mut tx = self.db.begin().await?;
        sqlx::query(
            "INSERT INTO maintenance_windows (id, requested_by, requested_at, reason, ticket,
                 starts_at, ends_at, bulk_phi_requested, bulk_phi_justification,
                 client_cert_sha256, status)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 'requested')",
        )
        .bind(&id)
        .bind(&requester.account.id)
        .bind(now)
        .bind(&reason)
        .bind(&ticket)
        .bind(starts)
        .bind(ends)
        .bind(i64::from(justification.is_some()))
        .bind(&justification)
        .bind(&fingerprint)
        .execute(&mut *tx)
        .await?;
        let event = AuditEvent::new(
            EventKind::MaintenanceWindow,
            agent_of(&requester.account, address),
        )
        .detail(format!(
            "maintenance window {id} requested; ticket {ticket}; {} – {}; bulk PHI read {}",
            millis_to_rfc3339(starts),
            millis_to_rfc3339(ends),
            if justification.is_some() {
                "requested"
            } else {
                "not requested"
            }
        ));
        audit::record(&mut tx, &event).await?;
        tx.commit().await?;
        self.window(&id).await
    }

    /// Approves a window: by an operator other than its requester, in a normal session,
    /// before its end. Bulk PHI reading is allowed only when requested and `allow_bulk_phi`.
    /// Refusals are audited.
    pub async fn approve(
        &self,
        id: &str,
        approver: &Session,
        allow_bulk_phi: bool,
        note: Option<&str>,
        address: Option<IpAddr>,
    ) -> Result<MaintenanceWindow> {
        let note = note.map(|n| bounded(n, 1, 1000, "note")).transpose()?;
        let window = self.decidable(id, approver, address).await?;
        if allow_bulk_phi && !window.bulk_phi_requested {
            return Err(Error::Invalid(
                "bulk PHI reading was not requested for this window".into(),
            ));
        }
        let allowed = allow_bulk_phi && window.bulk_phi_requested;
        self.decide(
            &window,
            approver,
            WindowStatus::Approved,
            allowed,
            note.as_deref(),
            address,
        )
        .await
    }

    /// Rejects a window (same rules as approving).
    pub async fn reject(
        &self,
        id: &str,
        approver: &Session,
        note: &str,
        address: Option<IpAddr>,
    ) -> Result<MaintenanceWindow> {
        let note = bounded(note, 1, 1000, "note")?;
        let window = self.decidable(id, approver, address).await?;
        self.decide(
            &window,
            approver,
            WindowStatus::Rejected,
            false,
            Some(&note),
            address,
        )
        .await
    }

    /// Withdraws a request not yet decided; only its requester may. Audited.
    pub async fn cancel(
        &self,
        id: &str,
        requester: &Session,
        address: Option<IpAddr>,
    ) -> Result<MaintenanceWindow> {
        let window = self.window(id).await?;
        if window.requested_by != requester.account.id {
            return Err(Error::Forbidden(
                "only the requester can cancel a maintenance window",
            ));
        }
        let mut tx = self.db.begin().await?;
        let updated = sqlx::query(
            "UPDATE maintenance_windows SET status = 'cancelled'
             WHERE id = $1 AND status = 'requested'",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if updated != 1 {
            return Err(Error::Conflict(
                "only a window waiting for approval can be cancelled; close an approved one".into(),
            ));
        }
        let event = AuditEvent::new(
            EventKind::MaintenanceWindow,
            agent_of(&requester.account, address),
        )
        .detail(format!("maintenance window {id} cancelled"));
        audit::record(&mut tx, &event).await?;
        tx.commit().await?;
        self.window(id).await
    }

    /// The window, when `approver` may decide on it now.
    async fn decidable(
        &self,
        id: &str,
        approver: &Session,
        address: Option<IpAddr>,
    ) -> Result<MaintenanceWindow> {
        let window = self.window(id).await?;
        let refusal = if approver.emergency_use_id.is_some() {
            Some("a break-glass session cannot decide on maintenance windows")
        } else if window.requested_by == approver.account.id {
            Some("another operator must approve this maintenance window")
        } else {
            None
        };
        if let Some(message) = refusal {
            let event = AuditEvent::new(
                EventKind::MaintenanceWindow,
                agent_of(&approver.account, address),
            )
            .outcome(Outcome::MinorFailure)
            .detail(format!(
                "maintenance window {id}: decision refused: {message}"
            ));
            let mut tx = self.db.begin().await?;
            audit::record(&mut tx, &event).await?;
            tx.commit().await?;
            return Err(Error::Forbidden(message));
        }
        if window.status != WindowStatus::Requested {
            return Err(Error::Conflict(format!(
                "this maintenance window is already {}",
                window.status.code()
            )));
        }
        if window.ends_millis <= now_millis() {
            return Err(Error::Conflict("this maintenance window has ended".into()));
        }
        Ok(window)
    }

    async fn decide(
        &self,
        window: &MaintenanceWindow,
        approver: &Session,
        status: WindowStatus,
        bulk_phi_allowed: bool,
        note: Option<&str>,
        address: Option<IpAddr>,
    ) -> Result<MaintenanceWindow> {
        let mut tx = self.db.begin().await?;
        let updated = sqlx::query(
            "UPDATE maintenance_windows
             SET status = $1, decided_by = $2, decided_at = $3, decision_note = $4,
                 bulk_phi_allowed = $5
             WHERE id = $6 AND status = 'requested' AND requested_by <> $2",
        )
        .bind(status.code())
        .bind(&approver.account.id)
        .bind(now_millis())
        .bind(note)
        .bind(i64::from(bulk_phi_allowed))
        .bind(&window.id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if updated != 1 {
            return Err(Error::Conflict(
                "this maintenance window was decided meanwhile".into(),
            ));
        }
        let event = AuditEvent::new(
            EventKind::MaintenanceWindow,
            agent_of(&approver.account, address),
        )
        .detail(format!(
            "maintenance window {} {}; bulk PHI read {}",
            window.id,
            status.code(),
            if bulk_phi_allowed {
                "allowed"
            } else {
                "not allowed"
            }
        ));
        audit::record(&mut tx, &event).await?;
        tx.commit().await?;
        self.window(&window.id).await
    }

    /// Admits one request into a window, or refuses it. Either way it is recorded as an
    /// action of the window (when the window exists) and audited with the window id.
    pub async fn enter(
        &self,
        id: &str,
        session: &Session,
        agent: &Agent,
        client_cert_sha256: Option<&str>,
        action: &str,
    ) -> Result<MaintenanceAccess> {
        let now = now_millis();
        let window = match self.window(id).await {
            Ok(window) => window,
            Err(Error::NotFound(what)) => {
                self.audit_action(
                    id,
                    &session.session_id,
                    agent,
                    action,
                    Some("no such window"),
                )
                .await?;
                return Err(Error::NotFound(what));
            }
            Err(e) => return Err(e),
        };
        let attempt = Attempt {
            account_id: &session.account.id,
            now,
            client_cert_sha256,
        };
        let mut refusal = may_act(&window, attempt).err();
        let mut tx = self.db.begin().await?;
        if refusal.is_none() && !still_open(&mut tx, &window.id, Some(now)).await? {
            refusal = Some(Refusal::Closed);
        }
        let action_id: i64 = sqlx::query_scalar(
            "INSERT INTO maintenance_actions (window_id, at, account_id, session_id, action, outcome)
             VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
        )
        .bind(&window.id)
        .bind(now)
        .bind(&session.account.id)
        .bind(&session.session_id)
        .bind(action)
        .bind(if refusal.is_some() { "refused" } else { "done" })
        .fetch_one(&mut *tx)
        .await?;
        let event = action_event(
            &window.id,
            &session.session_id,
            agent,
            action,
            refusal.map(Refusal::message),
        );
        audit::record(&mut tx, &event).await?;
        tx.commit().await?;
        if let Some(refusal) = refusal {
            return Err(Error::Forbidden(refusal.message()));
        }
        Ok(MaintenanceAccess {
            window,
            action_id,
            session_id: session.session_id.clone(),
        })
    }

    async fn audit_action(
        &self,
        window_id: &str,
        session_id: &str,
        agent: &Agent,
        action: &str,
        refused: Option<&str>,
    ) -> Result<()> {
        let event = action_event(window_id, session_id, agent, action, refused);
        let mut tx = self.db.begin().await?;
        audit::record(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Refuses an admitted action that reads many patients' data at once unless the window
    /// allows it; the refusal is recorded on the action and audited.
    pub async fn require_bulk(&self, access: &MaintenanceAccess, agent: &Agent) -> Result<()> {
        let Err(refusal) = may_read_in_bulk(&access.window) else {
            return Ok(());
        };
        let mut tx = self.db.begin().await?;
        sqlx::query("UPDATE maintenance_actions SET outcome = 'refused' WHERE id = $1")
            .bind(access.action_id)
            .execute(&mut *tx)
            .await?;
        let event = action_event(
            &access.window.id,
            &access.session_id,
            agent,
            "bulk PHI read",
            Some(refusal.message()),
        );
        audit::record(&mut tx, &event).await?;
        tx.commit().await?;
        Err(Error::Forbidden(refusal.message()))
    }

    /// Records whose data an admitted action read: on the action, and as one audited read
    /// per patient (so it appears in that patient's access log).
    pub async fn touched(
        &self,
        access: &MaintenanceAccess,
        agent: &Agent,
        patients: &[String],
        what: &str,
    ) -> Result<()> {
        if patients.is_empty() {
            return Ok(());
        }
        let mut tx = self.db.begin().await?;
        if !still_open(&mut tx, &access.window.id, None).await? {
            // Closed while this request ran: its report is frozen, so nothing is disclosed.
            sqlx::query("UPDATE maintenance_actions SET outcome = 'refused' WHERE id = $1")
                .bind(access.action_id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            return Err(Error::Forbidden(Refusal::Closed.message()));
        }
        sqlx::query("UPDATE maintenance_actions SET patients = $1 WHERE id = $2")
            .bind(patients.join(" "))
            .bind(access.action_id)
            .execute(&mut *tx)
            .await?;
        let events: Vec<AuditEvent> = patients
            .iter()
            .map(|patient| {
                // A read, so the patient's access log lists it; the detail names the window.
                AuditEvent::new(EventKind::Read, agent.clone())
                    .patient(patient.clone())
                    .detail(format!(
                        "maintenance window {} (session {}): {what}",
                        access.window.id, access.session_id
                    ))
            })
            .collect();
        audit::record_all(&mut tx, &events).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Closes an approved window (early, or after its end) and freezes its report.
    /// `closer` `None`: noticed by the gateway after the window's end.
    pub async fn close(
        &self,
        id: &str,
        closer: Option<(&Session, Option<IpAddr>)>,
    ) -> Result<MaintenanceReport> {
        let window = self.window(id).await?;
        match window.status {
            WindowStatus::Approved => {}
            WindowStatus::Closed => {
                return Err(Error::Conflict(
                    "this maintenance window is already closed".into(),
                ))
            }
            _ => {
                return Err(Error::Conflict(
                    "only an approved maintenance window can be closed".into(),
                ))
            }
        }
        let closed_at = now_millis().min(window.ends_millis);
        let mut tx = self.db.begin().await?;
        // Closed first: this waits for actions being admitted or disclosing data, and
        // later ones see the window closed (see `still_open`).
        let updated = sqlx::query(
            "UPDATE maintenance_windows SET status = 'closed', closed_at = $1
             WHERE id = $2 AND status = 'approved'",
        )
        .bind(closed_at)
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if updated != 1 {
            return Err(Error::Conflict(
                "this maintenance window was closed meanwhile".into(),
            ));
        }
        let rows = sqlx::query(
            "SELECT m.at, a.username, m.session_id, m.action, m.outcome, m.patients
             FROM maintenance_actions m JOIN accounts a ON a.id = m.account_id
             WHERE m.window_id = $1 ORDER BY m.id",
        )
        .bind(id)
        .fetch_all(&mut *tx)
        .await?;
        let actions = rows
            .iter()
            .map(|row| {
                let patients: String = row.try_get(5)?;
                Ok(ReportedAction {
                    at: millis_to_rfc3339(row.try_get(0)?),
                    operator: row.try_get(1)?,
                    session_id: row.try_get(2)?,
                    action: row.try_get(3)?,
                    outcome: row.try_get(4)?,
                    patients: patients.split_whitespace().map(str::to_string).collect(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut closed = window.clone();
        closed.status = WindowStatus::Closed;
        let report = MaintenanceReport::of(&closed, actions, closed_at);
        let body = serde_json::to_string(&report)
            .map_err(|e| Error::Invalid(format!("maintenance report: {e}")))?;
        sqlx::query("UPDATE maintenance_windows SET report = $1 WHERE id = $2")
            .bind(&body)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let agent = match closer {
            Some((session, address)) => agent_of(&session.account, address),
            None => Agent::system(),
        };
        let event = AuditEvent::new(EventKind::MaintenanceWindow, agent).detail(format!(
            "maintenance window {id} closed; report generated: {} actions, {} patients' data read",
            report.actions.len(),
            report.patients_touched.len()
        ));
        audit::record(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(report)
    }

    /// Closes every approved window past its end.
    pub async fn close_ended(&self) -> Result<()> {
        let ended: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM maintenance_windows WHERE status = 'approved' AND ends_at <= $1",
        )
        .bind(now_millis())
        .fetch_all(self.db.read_pool())
        .await?;
        for id in ended {
            match self.close(&id, None).await {
                // Another process closed it first: its report stands.
                Ok(_) | Err(Error::Conflict(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The window's report: closed windows have one; an approved window past its end is
    /// closed now. Reading it is audited (it names patients).
    pub async fn report(
        &self,
        id: &str,
        reader: &Session,
        address: Option<IpAddr>,
    ) -> Result<MaintenanceReport> {
        let window = self.window(id).await?;
        if window.status == WindowStatus::Approved && window.ends_millis <= now_millis() {
            match self.close(id, None).await {
                Ok(_) | Err(Error::Conflict(_)) => {}
                Err(e) => return Err(e),
            }
        }
        let body: Option<String> =
            sqlx::query_scalar("SELECT report FROM maintenance_windows WHERE id = $1")
                .bind(id)
                .fetch_optional(self.db.read_pool())
                .await?
                .flatten();
        let Some(body) = body else {
            return Err(Error::Conflict(
                "this maintenance window has no report yet: it has not been closed".into(),
            ));
        };
        let report: MaintenanceReport = serde_json::from_str(&body)
            .map_err(|e| Error::Invalid(format!("stored maintenance report: {e}")))?;
        let event = AuditEvent::new(
            EventKind::MaintenanceWindow,
            agent_of(&reader.account, address),
        )
        .detail(format!("maintenance window {id}: report read"));
        let mut tx = self.db.begin().await?;
        audit::record(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(report)
    }

    /// Non-PHI health: database round trip, job and delivery counts.
    pub async fn diagnostics(&self) -> Result<Diagnostics> {
        let started = std::time::Instant::now();
        self.db.ping().await?;
        let database_round_trip_ms = started.elapsed().as_millis() as u64;
        let pool = self.db.read_pool();
        let by_status = |table: &'static str| async move {
            let rows = sqlx::query(&format!(
                "SELECT status, COUNT(*) FROM {table} GROUP BY status"
            ))
            .fetch_all(pool)
            .await?;
            rows.iter()
                .map(|row| Ok((row.try_get::<String, _>(0)?, row.try_get::<i64, _>(1)?)))
                .collect::<Result<BTreeMap<_, _>>>()
        };
        let pull_jobs = by_status("pull_jobs").await?;
        let export_jobs = by_status("export_jobs").await?;
        let notifications = by_status("notifications").await?;
        let audit_leaves_unsequenced: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM audit_leaves WHERE tree_index IS NULL")
                .fetch_one(pool)
                .await?;
        let live_sessions: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM sessions WHERE ended_at IS NULL AND expires_at > $1",
        )
        .bind(now_millis())
        .fetch_one(pool)
        .await?;
        Ok(Diagnostics {
            database_engine: format!("{:?}", self.db.engine()).to_lowercase(),
            database_round_trip_ms,
            pull_jobs,
            export_jobs,
            notifications,
            audit_leaves_unsequenced,
            live_sessions,
        })
    }

    /// One patient's current resources counted by type (no content); `NotFound` for an
    /// unknown patient.
    pub async fn patient_resource_counts(&self, patient_id: &str) -> Result<PatientResourceCounts> {
        let pool = self.db.read_pool();
        let known: Option<i64> = sqlx::query_scalar("SELECT 1 FROM patients WHERE id = $1")
            .bind(patient_id)
            .fetch_optional(pool)
            .await?;
        if known.is_none() {
            return Err(Error::NotFound(format!("patient {patient_id}")));
        }
        let rows = sqlx::query(
            "SELECT resource_type, COUNT(*) FROM resources WHERE patient_id = $1
             GROUP BY resource_type",
        )
        .bind(patient_id)
        .fetch_all(pool)
        .await?;
        let counts = rows
            .iter()
            .map(|row| Ok((row.try_get::<String, _>(0)?, row.try_get::<i64, _>(1)?)))
            .collect::<Result<BTreeMap<_, _>>>()?;
        Ok(PatientResourceCounts {
            patient_id: patient_id.to_string(),
            counts,
        })
    }

    /// Every patient's resources counted by type (up to a limit): a bulk read.
    pub async fn all_resource_counts(&self) -> Result<Vec<PatientResourceCounts>> {
        let rows = sqlx::query(
            "SELECT p.id, r.resource_type, COUNT(r.id)
             FROM (SELECT id FROM patients ORDER BY id LIMIT $1) p
             LEFT JOIN resources r ON r.patient_id = p.id
             GROUP BY p.id, r.resource_type ORDER BY p.id",
        )
        .bind(BULK_LIMIT)
        .fetch_all(self.db.read_pool())
        .await?;
        let mut out: Vec<PatientResourceCounts> = Vec::new();
        for row in &rows {
            let patient_id: String = row.try_get(0)?;
            let resource_type: Option<String> = row.try_get(1)?;
            let count: i64 = row.try_get(2)?;
            if out.last().map(|p| &p.patient_id) != Some(&patient_id) {
                out.push(PatientResourceCounts {
                    patient_id,
                    counts: BTreeMap::new(),
                });
            }
            if let (Some(resource_type), Some(last)) = (resource_type, out.last_mut()) {
                last.counts.insert(resource_type, count);
            }
        }
        Ok(out)
    }
}

/// Whether the window is still approved (and, with `now`, not past its end), holding its
/// row until the transaction ends: a close waits for an action being admitted or
/// disclosing data, and an action after a close sees it, so the frozen report misses none.
async fn still_open(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    window_id: &str,
    now: Option<i64>,
) -> Result<bool> {
    let locked = sqlx::query(
        "UPDATE maintenance_windows SET status = status
         WHERE id = $1 AND status = 'approved' AND ends_at > $2",
    )
    .bind(window_id)
    .bind(now.unwrap_or(i64::MIN))
    .execute(&mut **tx)
    .await?
    .rows_affected();
    Ok(locked == 1)
}

fn action_event(
    window_id: &str,
    session_id: &str,
    agent: &Agent,
    action: &str,
    refused: Option<&str>,
) -> AuditEvent {
    let event = AuditEvent::new(EventKind::MaintenanceAction, agent.clone());
    match refused {
        None => event.detail(format!(
            "maintenance window {window_id} (session {session_id}): {action}"
        )),
        Some(why) => event.outcome(Outcome::MinorFailure).detail(format!(
            "maintenance window {window_id} (session {session_id}): {action} refused: {why}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: i64 = 60 * 60 * 1000;

    fn window(status: WindowStatus, cert: Option<&str>) -> MaintenanceWindow {
        MaintenanceWindow {
            id: "w".into(),
            requested_by: "alice".into(),
            requested_by_username: "alice".into(),
            requested_at: String::new(),
            reason: "replace the disk".into(),
            ticket: "CHG-1".into(),
            starts_at: String::new(),
            ends_at: String::new(),
            bulk_phi_requested: false,
            bulk_phi_justification: None,
            bulk_phi_allowed: false,
            client_cert_sha256: cert.map(str::to_string),
            status,
            decided_by: None,
            decided_by_username: None,
            decided_at: None,
            decision_note: None,
            closed_at: None,
            starts_millis: 10 * HOUR,
            ends_millis: 12 * HOUR,
        }
    }

    #[test]
    fn who_may_act_when() {
        use Refusal as R;
        use WindowStatus as S;
        let inside = 11 * HOUR;
        // (window status, bound certificate, who, when, presented certificate) → decision
        type Case<'a> = (S, Option<&'a str>, &'a str, i64, Option<&'a str>);
        let cases: Vec<(Case, Result<(), R>)> = vec![
            ((S::Approved, None, "alice", inside, None), Ok(())),
            ((S::Approved, None, "alice", 10 * HOUR, None), Ok(())),
            ((S::Approved, None, "bob", inside, None), Err(R::NotYours)),
            (
                (S::Requested, None, "alice", inside, None),
                Err(R::NotApproved),
            ),
            ((S::Rejected, None, "alice", inside, None), Err(R::Rejected)),
            ((S::Closed, None, "alice", inside, None), Err(R::Closed)),
            (
                (S::Cancelled, None, "alice", inside, None),
                Err(R::Cancelled),
            ),
            (
                (S::Approved, None, "alice", 10 * HOUR - 1, None),
                Err(R::NotYetStarted),
            ),
            ((S::Approved, None, "alice", 12 * HOUR, None), Err(R::Ended)),
            (
                (S::Approved, Some("ab"), "alice", inside, None),
                Err(R::CertificateRequired),
            ),
            (
                (S::Approved, Some("ab"), "alice", inside, Some("cd")),
                Err(R::CertificateMismatch),
            ),
            (
                (S::Approved, Some("ab"), "alice", inside, Some("AB")),
                Ok(()),
            ),
            // Someone else's window says nothing about its state to them.
            ((S::Requested, None, "bob", 0, None), Err(R::NotYours)),
        ];
        for ((status, bound, who, now, presented), expected) in cases {
            let attempt = Attempt {
                account_id: who,
                now,
                client_cert_sha256: presented,
            };
            assert_eq!(
                may_act(&window(status, bound), attempt),
                expected,
                "{status:?} {bound:?} {who} {now} {presented:?}"
            );
        }
    }

    #[test]
    fn bulk_reading_needs_request_and_approval() {
        for (requested, allowed, expected) in [
            (false, false, false),
            (true, false, false),
            (false, true, false),
            (true, true, true),
        ] {
            let mut w = window(WindowStatus::Approved, None);
            w.bulk_phi_requested = requested;
            w.bulk_phi_allowed = allowed;
            assert_eq!(may_read_in_bulk(&w).is_ok(), expected);
        }
    }

    #[test]
    fn window_times_are_bounded() {
        let settings = MaintenanceConfig::default();
        let now = millis_of(time::macros::datetime!(2026-01-01 00:00 UTC));
        let ok = check_times(None, "2026-01-01T02:00:00Z", now, &settings);
        assert_eq!(ok.ok(), Some((now, now + 2 * HOUR)));
        let later = check_times(
            Some("2026-01-02T00:00:00+09:00"),
            "2026-01-02T08:00:00+09:00",
            now,
            &settings,
        );
        assert!(later.is_ok(), "{later:?}");
        for (starts, ends) in [
            (None, "2026-01-01T09:00:01Z"), // longer than 8 h
            (None, "2025-12-31T23:00:00Z"), // ends before it starts
            (Some("2025-12-31T23:00:00Z"), "2026-01-01T01:00:00Z"), // starts in the past
            (Some("2026-03-01T00:00:00Z"), "2026-03-01T01:00:00Z"), // too far ahead
            (None, "tomorrow"),
        ] {
            assert!(
                check_times(starts, ends, now, &settings).is_err(),
                "{starts:?} {ends}"
            );
        }
    }

    fn certificate(not_before: i64, not_after: i64) -> (String, Vec<u8>) {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        let at = |millis: i64| {
            time::OffsetDateTime::from_unix_timestamp(millis / 1000).expect("instant")
        };
        params.not_before = at(not_before);
        params.not_after = at(not_after);
        let cert = params.self_signed(&key).expect("certificate");
        (cert.pem(), cert.der().to_vec())
    }

    #[test]
    fn only_a_short_lived_certificate_valid_in_the_window_binds_it() {
        use sha2::Digest as _;
        let now = millis_of(time::macros::datetime!(2026-01-01 00:00 UTC));
        let (starts, ends) = (now, now + 2 * HOUR);
        let (pem, der) = certificate(now - HOUR, now + 3 * HOUR);
        assert_eq!(
            client_certificate_fingerprint(&pem, starts, ends, 24).ok(),
            Some(hex::encode(sha2::Sha256::digest(&der)))
        );
        for (not_before, not_after) in [
            (now - HOUR, now + 30 * HOUR), // valid too long
            (now - 3 * HOUR, now - HOUR),  // expired before the window
            (ends, ends + HOUR),           // valid only after it
        ] {
            let (pem, _) = certificate(not_before, not_after);
            assert!(client_certificate_fingerprint(&pem, starts, ends, 24).is_err());
        }
        assert!(client_certificate_fingerprint("not a certificate", starts, ends, 24).is_err());
    }

    #[test]
    fn the_report_lists_patients_once_and_says_none_when_none() {
        let mut w = window(WindowStatus::Closed, None);
        w.decided_by = Some("bob".into());
        w.decided_by_username = Some("bob".into());
        let action = |patients: &[&str]| ReportedAction {
            at: "t".into(),
            operator: "alice".into(),
            session_id: "s".into(),
            action: "GET /x".into(),
            outcome: "done".into(),
            patients: patients.iter().map(|p| p.to_string()).collect(),
        };
        let report = MaintenanceReport::of(&w, vec![action(&["p2", "p1"]), action(&["p1"])], 0);
        assert_eq!(report.patients_touched, ["p1", "p2"]);
        assert_eq!(report.approved_by.as_deref(), Some("bob"));
        let empty = MaintenanceReport::of(&w, vec![action(&[])], 0);
        assert!(empty.patients_touched.is_empty());
        let text = empty.to_text();
        assert!(
            text.contains("Patients whose data was read:\n  なし / none"),
            "{text}"
        );
        assert!(text.contains("CHG-1"));
    }
}
