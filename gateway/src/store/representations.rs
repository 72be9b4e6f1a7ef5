//! Who may act for whom: a parent for a dependent child, or a registered proxy (代理人).
//! Operators register them after checking the papers. A dependent's representation ends
//! by itself at the age of majority: from then on the parent can no longer act, and each
//! consent the parent gave for the person is marked for the person to confirm or withdraw.

use phr_consent::{representation_ended, Representation};
use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::Row;
use time::Date;

use super::{insert_patient, japan_today, now_millis, parse_day, Database};
use crate::audit::{self, Agent, AuditEvent, EventKind};
use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RepresentationRecord {
    pub id: String,
    pub representative_patient_id: String,
    pub represented_patient_id: String,
    #[serde(serialize_with = "serialize_kind")]
    pub kind: Representation,
    pub represented_birth_date: Option<String>,
    pub active: bool,
    pub end_reason: Option<String>,
}

fn serialize_kind<S: serde::Serializer>(
    kind: &Representation,
    serializer: S,
) -> std::result::Result<S::Ok, S::Error> {
    serializer.serialize_str(kind.code())
}

#[derive(Clone)]
pub struct Representations {
    db: Database,
    age_of_majority: u8,
}

const SELECT: &str = "SELECT id, representative_patient_id, represented_patient_id, kind,
    represented_birth_date, status, end_reason FROM representations";

impl Representations {
    pub fn new(db: Database, age_of_majority: u32) -> Self {
        Representations {
            db,
            age_of_majority: u8::try_from(age_of_majority).unwrap_or(u8::MAX),
        }
    }

    /// Registers that `representative` may act for `represented`. A dependent needs a birth
    /// date (`YYYY-MM-DD`), and must not have reached majority already.
    pub async fn register(
        &self,
        agent: &Agent,
        representative_patient_id: &str,
        represented_patient_id: &str,
        kind: Representation,
        represented_birth_date: Option<&str>,
    ) -> Result<RepresentationRecord> {
        if representative_patient_id == represented_patient_id {
            return Err(Error::Invalid(
                "a person does not represent themself".into(),
            ));
        }
        let birth_date = represented_birth_date.map(parse_birth_date).transpose()?;
        match kind {
            Representation::OneSelf => {
                return Err(Error::Invalid(
                    "kind must be parent-of-dependent or registered-proxy".into(),
                ))
            }
            Representation::ParentOfDependent if birth_date.is_none() => {
                return Err(Error::Invalid(
                    "a dependent's birth date is needed (representation ends at majority)".into(),
                ))
            }
            _ => {}
        }
        if representation_ended(kind, birth_date, japan_today(), self.age_of_majority) {
            return Err(Error::Invalid(
                "the person has reached the age of majority and acts for themself".into(),
            ));
        }
        let record = RepresentationRecord {
            id: uuid::Uuid::new_v4().to_string(),
            representative_patient_id: representative_patient_id.into(),
            represented_patient_id: represented_patient_id.into(),
            kind,
            represented_birth_date: represented_birth_date.map(str::to_string),
            active: true,
            end_reason: None,
        };
        let now = now_millis();
        let mut tx = self.db.begin().await?;
        insert_patient(&mut tx, represented_patient_id, now).await?;
        sqlx::query(
            "INSERT INTO representations (id, representative_patient_id, represented_patient_id,
                 kind, represented_birth_date, status, created_at)
             VALUES ($1, $2, $3, $4, $5, 'active', $6)",
        )
        .bind(&record.id)
        .bind(representative_patient_id)
        .bind(represented_patient_id)
        .bind(kind.code())
        .bind(&record.represented_birth_date)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let event = AuditEvent::new(EventKind::RepresentationRegistered, agent.clone())
            .patient(represented_patient_id)
            .detail(format!(
                "{} may act for this patient as {}",
                representative_patient_id,
                kind.code()
            ));
        audit::record(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(record)
    }

    /// The active representation letting `representative` act for `represented`, ending it
    /// first if the dependent has come of age.
    pub async fn active(
        &self,
        representative_patient_id: &str,
        represented_patient_id: &str,
    ) -> Result<Option<RepresentationRecord>> {
        let rows = sqlx::query(&format!(
            "{SELECT} WHERE representative_patient_id = $1 AND represented_patient_id = $2
               AND status = 'active'"
        ))
        .bind(representative_patient_id)
        .bind(represented_patient_id)
        .fetch_all(self.db.read_pool())
        .await?;
        for row in &rows {
            let record = record_of(row)?;
            if self.has_ended(&record)? {
                self.end(&record, "reached the age of majority").await?;
                continue;
            }
            return Ok(Some(record));
        }
        Ok(None)
    }

    /// Everyone `representative` may act for now.
    pub async fn represented_by(
        &self,
        representative_patient_id: &str,
    ) -> Result<Vec<RepresentationRecord>> {
        let rows = sqlx::query(&format!(
            "{SELECT} WHERE representative_patient_id = $1 AND status = 'active'
             ORDER BY created_at"
        ))
        .bind(representative_patient_id)
        .fetch_all(self.db.read_pool())
        .await?;
        let mut active = Vec::new();
        for row in &rows {
            let record = record_of(row)?;
            if self.has_ended(&record)? {
                self.end(&record, "reached the age of majority").await?;
            } else {
                active.push(record);
            }
        }
        Ok(active)
    }

    /// Ends every dependent's representation whose person has come of age (run daily).
    pub async fn end_at_majority(&self) -> Result<usize> {
        let rows = sqlx::query(&format!(
            "{SELECT} WHERE status = 'active' AND kind = 'parent-of-dependent'"
        ))
        .fetch_all(self.db.read_pool())
        .await?;
        let mut ended = 0;
        for row in &rows {
            let record = record_of(row)?;
            if self.has_ended(&record)? {
                self.end(&record, "reached the age of majority").await?;
                ended += 1;
            }
        }
        Ok(ended)
    }

    fn has_ended(&self, record: &RepresentationRecord) -> Result<bool> {
        let birth_date = record
            .represented_birth_date
            .as_deref()
            .map(parse_birth_date)
            .transpose()?;
        Ok(representation_ended(
            record.kind,
            birth_date,
            japan_today(),
            self.age_of_majority,
        ))
    }

    /// Ends a representation; the consents the representative gave for the person now wait
    /// for the person's own confirmation. Audited.
    async fn end(&self, record: &RepresentationRecord, reason: &str) -> Result<()> {
        let now = now_millis();
        let mut tx = self.db.begin().await?;
        let changed = sqlx::query(
            "UPDATE representations SET status = 'ended', ended_at = $1, end_reason = $2
             WHERE id = $3 AND status = 'active'",
        )
        .bind(now)
        .bind(reason)
        .bind(&record.id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if changed == 0 {
            // Another process ended it first.
            return Ok(());
        }
        sqlx::query(
            "UPDATE consents SET confirmation_requested_at = $1
             WHERE patient_id = $2 AND status = 'active' AND confirmation_requested_at IS NULL
               AND id IN (SELECT v.consent_id FROM consent_versions v
                          WHERE v.representative_patient_id = $3)",
        )
        .bind(now)
        .bind(&record.represented_patient_id)
        .bind(&record.representative_patient_id)
        .execute(&mut *tx)
        .await?;
        let event = AuditEvent::new(EventKind::RepresentationEnded, Agent::system())
            .patient(&record.represented_patient_id)
            .detail(format!(
                "{} no longer acts for this patient: {reason}",
                record.representative_patient_id
            ));
        audit::record(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(())
    }
}

fn record_of(row: &AnyRow) -> Result<RepresentationRecord> {
    let kind: String = row.try_get(3)?;
    let status: String = row.try_get(5)?;
    Ok(RepresentationRecord {
        id: row.try_get(0)?,
        representative_patient_id: row.try_get(1)?,
        represented_patient_id: row.try_get(2)?,
        kind: match kind.as_str() {
            "parent-of-dependent" => Representation::ParentOfDependent,
            "registered-proxy" => Representation::RegisteredProxy,
            other => {
                return Err(Error::Invalid(format!(
                    "stored representation kind {other:?}"
                )))
            }
        },
        represented_birth_date: row.try_get(4)?,
        active: status == "active",
        end_reason: row.try_get(6)?,
    })
}

fn parse_birth_date(text: &str) -> Result<Date> {
    parse_day(text, "birth date")
}
