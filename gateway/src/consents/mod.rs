//! Disclosure consents, stored: each version as the patient (or their representative)
//! made it, with a signed receipt and an audit leaf, in one transaction. The decision on
//! every access reads the current versions from the database, so a withdrawal committed by
//! any gateway process denies the very next request everywhere.

mod receipts;

use std::collections::HashMap;
use std::sync::Arc;

use phr_consent::{
    decide, AccessRequest, Change, Consent, ConsentStatus, DataCategory, Decision, DenyReason,
    NewConsent, Performer, Period, PersonRef, Provision, Purpose, ReceiptEvent, Recipient,
    Representation, Requested,
};
use serde::Serialize;
use sqlx::{AnyConnection, Row};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::audit::{self, Agent, AuditEvent, EventKind, Outcome};
use crate::config::ConsentConfig;
use crate::error::{Error, Result};
use crate::receipts::ReceiptSigner;
use crate::store::{insert_patient, millis_of, now_millis, Database};

pub use receipts::ReceiptContext;

/// The policy every consent is given under: the PHR basic guideline.
pub const POLICY_URI: &str = "urn:phr-gateway:policy:phr-basic-guideline-2025";

/// What the patient chose on the consent screen.
#[derive(Debug, Clone)]
pub struct GrantRequest {
    pub patient_id: String,
    pub performer: Performer,
    pub performer_account_id: String,
    pub recipient: Recipient,
    pub recipient_display: String,
    pub purposes: Vec<Purpose>,
    pub categories: Vec<DataCategory>,
    /// The first instant the consent no longer covers (the day after the chosen end date).
    pub ends_at: OffsetDateTime,
}

/// A consent as the patient's pages and API show it.
#[derive(Debug, Clone, Serialize)]
pub struct ConsentView {
    pub id: String,
    pub version: u32,
    pub status: ConsentStatus,
    pub recipient: String,
    pub recipient_display: String,
    pub purposes: Vec<String>,
    pub categories: Vec<DataCategory>,
    /// RFC 3339; the consent covers nothing from this instant.
    pub ends_at: Option<String>,
    /// Whether it permits anything now (active and within its period).
    pub in_force: bool,
    /// A representative gave it and no longer acts for the patient: the patient is asked
    /// to keep it or withdraw it.
    pub needs_confirmation: bool,
    /// In force and ending within the reminder window (`consent.remind_before_days`).
    pub ends_soon: bool,
    #[serde(skip)]
    pub consent: Consent,
}

/// One version in a consent's history, with its receipt.
#[derive(Debug, Clone, Serialize)]
pub struct ConsentVersionView {
    pub version: u32,
    pub event: String,
    pub status: ConsentStatus,
    pub recorded_at: String,
    pub performer: String,
    pub receipt: String,
}

#[derive(Clone)]
pub struct Consents {
    db: Database,
    receipts: Arc<ReceiptSigner>,
    config: Arc<ConsentConfig>,
}

impl Consents {
    pub fn new(db: Database, receipts: Arc<ReceiptSigner>, config: ConsentConfig) -> Self {
        Consents {
            db,
            receipts,
            config: Arc::new(config),
        }
    }

    pub fn config(&self) -> &ConsentConfig {
        &self.config
    }

    /// Records a new, active consent (the patient agreed on the consent screen). Returns it
    /// with its signed receipt.
    pub async fn grant(
        &self,
        agent: &Agent,
        request: GrantRequest,
        context: &ReceiptContext,
    ) -> Result<(Consent, String)> {
        let now = OffsetDateTime::now_utc();
        let mut purposes = request.purposes.clone();
        purposes.sort_by(|a, b| (&a.system, &a.code).cmp(&(&b.system, &b.code)));
        purposes.dedup();
        let mut categories = request.categories.clone();
        categories.sort();
        categories.dedup();
        if purposes.is_empty() || categories.is_empty() {
            return Err(Error::Invalid(
                "choose at least one purpose and one category".into(),
            ));
        }
        let latest = now + time::Duration::days(i64::from(self.config.max_period_days) + 1);
        if request.ends_at <= now || request.ends_at > latest {
            return Err(Error::Invalid(format!(
                "the end date must be after today and at most {} days ahead",
                self.config.max_period_days
            )));
        }
        let patient = PersonRef::new(&request.patient_id);
        let consent = Consent::create(NewConsent {
            id: uuid::Uuid::new_v4().to_string(),
            status: ConsentStatus::Active,
            patient,
            performer: request.performer.clone(),
            policy_uri: POLICY_URI.into(),
            recorded_at: now,
            provision: Provision::permit(
                Some(Period::between(now, request.ends_at)),
                vec![request.recipient.clone()],
                purposes,
                categories,
            ),
        })
        .map_err(|e| Error::Invalid(e.to_string()))?;
        let receipt = self.sign_receipt(
            ReceiptEvent::Granted,
            &consent,
            &request.recipient_display,
            context,
        )?;

        let now_ms = now_millis();
        let mut tx = self.db.begin().await?;
        insert_patient(&mut tx, &request.patient_id, now_ms).await?;
        sqlx::query(
            "INSERT INTO consents (id, patient_id, recipient, recipient_display, status,
                 current_version, period_end, updated_at)
             VALUES ($1, $2, $3, $4, 'active', 1, $5, $6)",
        )
        .bind(&consent.id)
        .bind(&request.patient_id)
        .bind(&request.recipient.id)
        .bind(&request.recipient_display)
        .bind(millis_of(request.ends_at))
        .bind(now_ms)
        .execute(&mut *tx)
        .await?;
        insert_version(
            &mut tx,
            &consent,
            "granted",
            &request.performer_account_id,
            &receipt,
        )
        .await?;
        let event = AuditEvent::new(EventKind::ConsentGranted, agent.clone())
            .patient(&request.patient_id)
            .detail(format!(
                "consent {} for {} ({} purpose(s), {} categor(ies))",
                consent.id,
                request.recipient.id,
                consent.provision.purposes.len(),
                consent.provision.categories.len()
            ));
        audit::record(&mut tx, &event).await?;
        tx.commit().await?;
        Ok((consent, receipt))
    }

    /// Replaces what a consent permits (purposes, categories, end date). Returns the new
    /// version with its receipt.
    #[allow(clippy::too_many_arguments)]
    pub async fn amend(
        &self,
        agent: &Agent,
        patient_id: &str,
        consent_id: &str,
        performer: Performer,
        performer_account_id: &str,
        purposes: Vec<Purpose>,
        categories: Vec<DataCategory>,
        ends_at: OffsetDateTime,
        context: &ReceiptContext,
    ) -> Result<(Consent, String)> {
        let current = self.current(patient_id, consent_id).await?;
        let mut provision = current.consent.provision.clone();
        provision.purposes = purposes;
        provision.categories = categories;
        let start = provision
            .period
            .as_ref()
            .and_then(|p| p.start)
            .unwrap_or(current.consent.recorded_at);
        provision.period = Some(Period::between(start, ends_at));
        self.change(
            agent,
            current,
            Change::Amend(provision),
            performer,
            performer_account_id,
            context,
        )
        .await
    }

    /// The patient keeps a consent a representative gave for them: a new version made by the
    /// patient themself, with the same terms and its own receipt.
    pub async fn confirm(
        &self,
        agent: &Agent,
        patient_id: &str,
        consent_id: &str,
        performer_account_id: &str,
        context: &ReceiptContext,
    ) -> Result<(Consent, String)> {
        let current = self.current(patient_id, consent_id).await?;
        if !current.needs_confirmation {
            return Err(Error::Conflict(
                "this consent is not waiting for confirmation".into(),
            ));
        }
        let provision = current.consent.provision.clone();
        let performer = Performer::patient(&PersonRef::new(patient_id));
        self.change(
            agent,
            current,
            Change::Amend(provision),
            performer,
            performer_account_id,
            context,
        )
        .await
    }

    /// Withdraws a consent: from this commit on, nothing is disclosed under it.
    pub async fn withdraw(
        &self,
        agent: &Agent,
        patient_id: &str,
        consent_id: &str,
        performer: Performer,
        performer_account_id: &str,
        context: &ReceiptContext,
    ) -> Result<(Consent, String)> {
        let current = self.current(patient_id, consent_id).await?;
        self.change(
            agent,
            current,
            Change::Withdraw,
            performer,
            performer_account_id,
            context,
        )
        .await
    }

    async fn change(
        &self,
        agent: &Agent,
        current: ConsentView,
        change: Change,
        performer: Performer,
        performer_account_id: &str,
        context: &ReceiptContext,
    ) -> Result<(Consent, String)> {
        let withdrawing = matches!(change, Change::Withdraw);
        // An amendment may narrow what is permitted: an export that read the old terms
        // starts over, as after a withdrawal.
        let amending = matches!(change, Change::Amend(_));
        // Whatever the patient decides themself answers a pending confirmation.
        let by_patient = performer.representation == Representation::OneSelf;
        let now = OffsetDateTime::now_utc().max(current.consent.recorded_at);
        let next = current
            .consent
            .apply(change, performer, now)
            .map_err(|e| Error::Conflict(e.to_string()))?;
        let (event, kind, receipt_event) = if withdrawing {
            (
                "withdrawn",
                EventKind::ConsentWithdrawn,
                ReceiptEvent::Withdrawn,
            )
        } else {
            ("changed", EventKind::ConsentChanged, ReceiptEvent::Changed)
        };
        let receipt =
            self.sign_receipt(receipt_event, &next, &current.recipient_display, context)?;
        let mut tx = self.db.begin().await?;
        // Optimistic: two changes racing on one version cannot both win.
        let moved = sqlx::query(
            "UPDATE consents SET status = $1, current_version = $2, period_end = $3,
                 updated_at = $4,
                 confirmation_requested_at = CASE WHEN $7 = 1 THEN NULL
                     ELSE confirmation_requested_at END
             WHERE id = $5 AND current_version = $6",
        )
        .bind(next.status.code())
        .bind(i64::from(next.version))
        .bind(
            next.provision
                .period
                .as_ref()
                .and_then(|p| p.end)
                .map(millis_of),
        )
        .bind(now_millis())
        .bind(&next.id)
        .bind(i64::from(current.version))
        .bind(i64::from(by_patient))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if moved != 1 {
            return Err(Error::Conflict(
                "the consent changed meanwhile; reload and try again".into(),
            ));
        }
        insert_version(&mut tx, &next, event, performer_account_id, &receipt).await?;
        if withdrawing || amending {
            // Nothing gathered under the old terms may leave: unfinished exports stop.
            crate::export::ExportJobs::stop_for_client_in(&mut tx, &current.recipient).await?;
        }
        if withdrawing {
            // The recipient hears of it with the withdrawal's commit, or not at all.
            crate::notifications::enqueue_in(
                &mut tx,
                &current.recipient,
                &next.patient.id,
                &next.id,
                crate::notifications::NotificationKind::ConsentWithdrawn,
                &[],
            )
            .await?;
        }
        let audit_event = AuditEvent::new(kind, agent.clone())
            .patient(&next.patient.id)
            .detail(format!(
                "consent {} version {} ({event}) for {}",
                next.id, next.version, current.recipient
            ));
        audit::record(&mut tx, &audit_event).await?;
        tx.commit().await?;
        Ok((next, receipt))
    }

    /// The patient's consent, current version. Another patient's consent is `NotFound`.
    pub async fn current(&self, patient_id: &str, consent_id: &str) -> Result<ConsentView> {
        let row = sqlx::query(&format!(
            "{SELECT_CURRENT} WHERE c.id = $1 AND c.patient_id = $2"
        ))
        .bind(consent_id)
        .bind(patient_id)
        .fetch_optional(self.db.read_pool())
        .await?
        .ok_or_else(|| Error::NotFound(format!("consent {consent_id}")))?;
        view_of(&row, self.config.remind_before_days)
    }

    /// The patient's consents, newest first.
    pub async fn list(&self, patient_id: &str) -> Result<Vec<ConsentView>> {
        let rows = sqlx::query(&format!(
            "{SELECT_CURRENT} WHERE c.patient_id = $1 ORDER BY c.updated_at DESC, c.id"
        ))
        .bind(patient_id)
        .fetch_all(self.db.read_pool())
        .await?;
        rows.iter()
            .map(|row| view_of(row, self.config.remind_before_days))
            .collect()
    }

    /// Every version of the patient's consent, oldest first, with receipts.
    pub async fn history(
        &self,
        patient_id: &str,
        consent_id: &str,
    ) -> Result<Vec<ConsentVersionView>> {
        self.current(patient_id, consent_id).await?;
        let rows = sqlx::query(
            "SELECT version, event, body, performer_account_id, receipt, recorded_at
             FROM consent_versions WHERE consent_id = $1 ORDER BY version",
        )
        .bind(consent_id)
        .fetch_all(self.db.read_pool())
        .await?;
        rows.iter()
            .map(|row| {
                let consent = consent_of(&row.try_get::<String, _>(2)?)?;
                Ok(ConsentVersionView {
                    version: consent.version,
                    event: row.try_get(1)?,
                    status: consent.status,
                    recorded_at: crate::store::millis_to_rfc3339(row.try_get(5)?),
                    performer: row.try_get(3)?,
                    receipt: row.try_get(4)?,
                })
            })
            .collect()
    }

    /// Decides one access by `recipient` to `patient_id`'s data, reading the consents as
    /// committed now. A denial is audited with its reason.
    pub async fn decide(
        &self,
        agent: &Agent,
        patient_id: &str,
        recipient: &Recipient,
        purpose: &Purpose,
        requested: Requested<'_>,
    ) -> Result<ConsentOutcome> {
        let consents = self.in_force_candidates(patient_id, &recipient.id).await?;
        let request = AccessRequest {
            patient: patient_id,
            recipient,
            purpose,
            requested,
        };
        let outcome = ConsentOutcome::of(decide(&request, &consents, OffsetDateTime::now_utc()));
        if let ConsentOutcome::Deny { reason, .. } = &outcome {
            self.audit_denial(
                agent,
                patient_id,
                format!("access by {} denied: {reason}", recipient.id),
            )
            .await?;
        }
        Ok(outcome)
    }

    async fn audit_denial(&self, agent: &Agent, patient_id: &str, detail: String) -> Result<()> {
        let event = AuditEvent::new(EventKind::ConsentDenied, agent.clone())
            .patient(patient_id)
            .outcome(Outcome::MinorFailure)
            .detail(detail);
        let mut tx = self.db.begin().await?;
        audit::record(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Decides an access made with a token issued under `consent_id`: only that consent
    /// counts, for any of the purposes the patient agreed to in it. Audited when denied.
    pub async fn decide_under(
        &self,
        agent: &Agent,
        patient_id: &str,
        recipient: &Recipient,
        consent_id: &str,
        requested: Requested<'_>,
    ) -> Result<ConsentOutcome> {
        let consent = self.consent_in_force_for(patient_id, consent_id).await?;
        let outcome = decide_under_consent(
            consent.as_ref(),
            patient_id,
            recipient,
            requested,
            OffsetDateTime::now_utc(),
        );
        if let ConsentOutcome::Deny { reason, .. } = &outcome {
            self.audit_denial(
                agent,
                patient_id,
                format!(
                    "access by {} under consent {consent_id} denied: {reason}",
                    recipient.id
                ),
            )
            .await?;
        }
        Ok(outcome)
    }

    /// The current version of the patient's consent `consent_id` (whatever its status), or
    /// `None` when the patient has no such consent. For deciding many accesses of one
    /// request with [`decide_under_consent`].
    pub async fn consent_in_force_for(
        &self,
        patient_id: &str,
        consent_id: &str,
    ) -> Result<Option<Consent>> {
        match self.current(patient_id, consent_id).await {
            Ok(view) => Ok(Some(view.consent)),
            Err(Error::NotFound(_)) => Ok(None),
            Err(other) => Err(other),
        }
    }

    /// The current version of every active consent to `recipient` of the patients whose
    /// ids lie in `first..=last` (as the database orders them), by patient: one query for a
    /// run of patients, as a Bulk export walks them in that order.
    pub async fn active_for_recipient_between(
        &self,
        recipient: &str,
        first: &str,
        last: &str,
    ) -> Result<HashMap<String, Vec<Consent>>> {
        let rows = sqlx::query(
            "SELECT c.patient_id, v.body FROM consents c JOIN consent_versions v
                 ON v.consent_id = c.id AND v.version = c.current_version
             WHERE c.recipient = $1 AND c.status = 'active'
               AND c.patient_id >= $2 AND c.patient_id <= $3",
        )
        .bind(recipient)
        .bind(first)
        .bind(last)
        .fetch_all(self.db.read_pool())
        .await?;
        let mut by_patient: HashMap<String, Vec<Consent>> = HashMap::new();
        for row in &rows {
            let consent = consent_of(&row.try_get::<String, _>(1)?)?;
            by_patient.entry(row.try_get(0)?).or_default().push(consent);
        }
        Ok(by_patient)
    }

    /// Records a refused access with its reason (PHI-free).
    pub async fn record_denial(
        &self,
        agent: &Agent,
        patient_id: &str,
        detail: String,
    ) -> Result<()> {
        self.audit_denial(agent, patient_id, detail).await
    }

    /// The current version of each of the patient's consents for this recipient.
    async fn in_force_candidates(&self, patient_id: &str, recipient: &str) -> Result<Vec<Consent>> {
        let rows = sqlx::query(&format!(
            "{SELECT_CURRENT} WHERE c.patient_id = $1 AND c.recipient = $2"
        ))
        .bind(patient_id)
        .bind(recipient)
        .fetch_all(self.db.read_pool())
        .await?;
        rows.iter()
            .map(|row| consent_of(&row.try_get::<String, _>(3)?))
            .collect()
    }

    /// Records a plain decline, so the recipient does not ask again too soon for the same.
    pub async fn record_decline(
        &self,
        agent: &Agent,
        patient_id: &str,
        recipient: &str,
        request_digest: &str,
    ) -> Result<()> {
        let mut tx = self.db.begin().await?;
        sqlx::query(
            "DELETE FROM consent_declines
             WHERE patient_id = $1 AND recipient = $2 AND request_digest = $3",
        )
        .bind(patient_id)
        .bind(recipient)
        .bind(request_digest)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO consent_declines (patient_id, recipient, request_digest, declined_at)
             VALUES ($1, $2, $3, $4)",
        )
        .bind(patient_id)
        .bind(recipient)
        .bind(request_digest)
        .bind(now_millis())
        .execute(&mut *tx)
        .await?;
        let event = AuditEvent::new(EventKind::ConsentDeclined, agent.clone())
            .patient(patient_id)
            .detail(format!("request by {recipient} declined"));
        audit::record(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Whether the patient declined this same request from this recipient within the
    /// configured quiet period.
    pub async fn declined_recently(
        &self,
        patient_id: &str,
        recipient: &str,
        request_digest: &str,
    ) -> Result<bool> {
        let since =
            now_millis() - i64::from(self.config.reask_after_decline_days) * 24 * 60 * 60 * 1000;
        let found: Option<i64> = sqlx::query_scalar(
            "SELECT declined_at FROM consent_declines
             WHERE patient_id = $1 AND recipient = $2 AND request_digest = $3
               AND declined_at >= $4",
        )
        .bind(patient_id)
        .bind(recipient)
        .bind(request_digest)
        .bind(since)
        .fetch_optional(self.db.read_pool())
        .await?;
        Ok(found.is_some())
    }

    fn sign_receipt(
        &self,
        event: ReceiptEvent,
        consent: &Consent,
        recipient_display: &str,
        context: &ReceiptContext,
    ) -> Result<String> {
        receipts::sign(
            &self.receipts,
            &self.config,
            event,
            consent,
            recipient_display,
            context,
        )
    }
}

/// Decides one access made under `consent` (the consent a token rests on): only it counts,
/// for any of the purposes the patient agreed to in it; the first permit wins, else the
/// first denial. No consent permits nothing. Pure: a request deciding many resources loads
/// the consent once.
pub fn decide_under_consent(
    consent: Option<&Consent>,
    patient_id: &str,
    recipient: &Recipient,
    requested: Requested<'_>,
    now: OffsetDateTime,
) -> ConsentOutcome {
    let consents = consent.map(std::slice::from_ref).unwrap_or_default();
    let purposes = consent
        .map(|c| c.provision.purposes.as_slice())
        .unwrap_or_default();
    let mut outcome = None;
    for purpose in purposes {
        let request = AccessRequest {
            patient: patient_id,
            recipient,
            purpose,
            requested,
        };
        match ConsentOutcome::of(decide(&request, consents, now)) {
            permit @ ConsentOutcome::Permit { .. } => return permit,
            deny => {
                outcome.get_or_insert(deny);
            }
        }
    }
    outcome.unwrap_or_else(|| ConsentOutcome::denied(DenyReason::NoConsent))
}

/// The decision on one access, in words the gateway can show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsentOutcome {
    Permit {
        consent_id: String,
        version: u32,
    },
    Deny {
        reason: &'static str,
        message_ja: &'static str,
        message_en: &'static str,
    },
}

impl ConsentOutcome {
    fn of(decision: Decision<'_>) -> Self {
        match decision {
            Decision::Permit { consent } => ConsentOutcome::Permit {
                consent_id: consent.id.to_string(),
                version: consent.version,
            },
            Decision::Deny { reason, .. } => ConsentOutcome::denied(reason),
        }
    }

    fn denied(reason: DenyReason) -> Self {
        ConsentOutcome::Deny {
            reason: reason.code(),
            message_ja: reason.message_ja(),
            message_en: reason.message_en(),
        }
    }
}

const SELECT_CURRENT: &str = "SELECT c.id, c.recipient, c.recipient_display, v.body,
         c.confirmation_requested_at
     FROM consents c JOIN consent_versions v
       ON v.consent_id = c.id AND v.version = c.current_version";

fn view_of(row: &sqlx::any::AnyRow, remind_before_days: u32) -> Result<ConsentView> {
    let consent = consent_of(&row.try_get::<String, _>(3)?)?;
    let now = OffsetDateTime::now_utc();
    let provision = &consent.provision;
    Ok(ConsentView {
        id: row.try_get(0)?,
        version: consent.version,
        status: consent.status,
        recipient: row.try_get(1)?,
        recipient_display: row.try_get(2)?,
        purposes: provision.purposes.iter().map(|p| p.code.clone()).collect(),
        categories: provision.categories.clone(),
        ends_at: provision
            .period
            .as_ref()
            .and_then(|p| p.end)
            .and_then(|end| end.format(&Rfc3339).ok()),
        in_force: consent.status == ConsentStatus::Active
            && provision.period.as_ref().is_none_or(|p| p.contains(now)),
        needs_confirmation: consent.status == ConsentStatus::Active
            && row.try_get::<Option<i64>, _>(4)?.is_some(),
        ends_soon: consent.status == ConsentStatus::Active
            && provision
                .period
                .as_ref()
                .and_then(|p| p.end)
                .is_some_and(|end| {
                    end > now && end - now <= time::Duration::days(i64::from(remind_before_days))
                }),
        consent,
    })
}

pub(crate) fn consent_of(body: &str) -> Result<Consent> {
    serde_json::from_str(body).map_err(|e| Error::Invalid(format!("stored consent: {e}")))
}

async fn insert_version(
    tx: &mut AnyConnection,
    consent: &Consent,
    event: &str,
    performer_account_id: &str,
    receipt: &str,
) -> Result<()> {
    let body = serde_json::to_string(consent).map_err(|e| Error::Invalid(e.to_string()))?;
    let representative = (consent.performer.representation != Representation::OneSelf)
        .then_some(consent.performer.person.id.as_str());
    sqlx::query(
        "INSERT INTO consent_versions (consent_id, version, event, body, performer_account_id,
             representative_patient_id, receipt, recorded_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(&consent.id)
    .bind(i64::from(consent.version))
    .bind(event)
    .bind(body)
    .bind(performer_account_id)
    .bind(representative)
    .bind(receipt)
    .bind(now_millis())
    .execute(&mut *tx)
    .await?;
    Ok(())
}
