//! Pull instructions: the patient telling the gateway to fetch from a source, for chosen
//! categories. Each step (given, authorised at the source, withdrawn) is kept in the
//! instruction's history with a signed receipt and an audit leaf, in one transaction.
//! Secrets (the PKCE verifier while authorising, then the tokens) are sealed with the
//! patient's data key.

use std::sync::Arc;

use phr_adapters::{LinkCredentials, PendingAuthorization};
use phr_consent::DataCategory;
use serde::Serialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

use super::queue::JobQueue;
use super::registry::SourceInfo;
use crate::audit::{self, Agent, AuditEvent, EventKind};
use crate::error::{Error, Result};
use crate::keystore::KeyStore;
use crate::receipts::ReceiptSigner;
use crate::store::{insert_patient, millis_to_rfc3339, now_millis, Database};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InstructionStatus {
    /// Given; waiting for the patient to authorise at the source.
    Pending,
    /// Linked; pulls run.
    Active,
    Withdrawn,
    /// Authorisation failed or the link stopped working; the patient may give it again.
    Failed,
}

impl InstructionStatus {
    fn code(self) -> &'static str {
        match self {
            InstructionStatus::Pending => "pending",
            InstructionStatus::Active => "active",
            InstructionStatus::Withdrawn => "withdrawn",
            InstructionStatus::Failed => "failed",
        }
    }

    fn parse(code: &str) -> Result<Self> {
        Ok(match code {
            "pending" => InstructionStatus::Pending,
            "active" => InstructionStatus::Active,
            "withdrawn" => InstructionStatus::Withdrawn,
            "failed" => InstructionStatus::Failed,
            other => {
                return Err(Error::Invalid(format!(
                    "unknown instruction status {other:?}"
                )))
            }
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Instruction {
    pub id: String,
    pub patient_id: String,
    pub source_id: String,
    pub performer_account_id: String,
    pub categories: Vec<DataCategory>,
    pub status: InstructionStatus,
    pub created_at: i64,
    pub updated_at: i64,
}

impl Instruction {
    /// The FHIR types the patient's categories cover.
    pub fn resource_types(&self) -> Vec<String> {
        DataCategory::resource_types_of(&self.categories)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InstructionEvent {
    pub at: i64,
    pub event: String,
    pub actor: String,
    pub detail: Option<String>,
    pub receipt: Option<String>,
}

#[derive(Clone)]
pub struct Instructions {
    db: Database,
    keys: KeyStore,
    receipts: Arc<ReceiptSigner>,
    queue: JobQueue,
}

const SELECT_INSTRUCTION: &str =
    "SELECT id, patient_id, source_id, performer_account_id, categories, status,
        created_at, updated_at FROM pull_instructions";

impl Instructions {
    pub fn new(
        db: Database,
        keys: KeyStore,
        receipts: Arc<ReceiptSigner>,
        queue: JobQueue,
    ) -> Self {
        Instructions {
            db,
            keys,
            receipts,
            queue,
        }
    }

    /// Records a new instruction, waiting for the patient to authorise at the source.
    /// Returns it with its signed receipt.
    #[allow(clippy::too_many_arguments)]
    pub async fn give(
        &self,
        agent: &Agent,
        instruction_id: &str,
        performer_account_id: &str,
        patient_id: &str,
        source: &SourceInfo,
        categories: &[DataCategory],
        pending: &PendingAuthorization,
    ) -> Result<(Instruction, String)> {
        if categories.is_empty() {
            return Err(Error::Invalid("choose at least one category".into()));
        }
        let mut categories = categories.to_vec();
        categories.sort();
        categories.dedup();
        let now = now_millis();
        let instruction = Instruction {
            id: instruction_id.to_string(),
            patient_id: patient_id.to_string(),
            source_id: source.id.clone(),
            performer_account_id: performer_account_id.to_string(),
            categories,
            status: InstructionStatus::Pending,
            created_at: now,
            updated_at: now,
        };
        let (key, _) = self.keys.data_key_or_create(patient_id).await?;
        let pending_json =
            serde_json::to_vec(pending).map_err(|e| Error::Invalid(e.to_string()))?;
        let sealed = key.seal(&seal_aad(&instruction.id, "pending"), &pending_json)?;
        let receipt = self.receipt(&instruction, source, "given")?;

        let mut tx = self.db.begin().await?;
        insert_patient(&mut tx, patient_id, now).await?;
        sqlx::query(
            "INSERT INTO pull_instructions (id, patient_id, source_id, performer_account_id,
                 categories, status, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, 'pending', $6, $6)",
        )
        .bind(&instruction.id)
        .bind(patient_id)
        .bind(&source.id)
        .bind(performer_account_id)
        .bind(categories_json(&instruction.categories))
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO source_links (instruction_id, patient_id, state_digest, pending_sealed)
             VALUES ($1, $2, $3, $4)",
        )
        .bind(&instruction.id)
        .bind(patient_id)
        .bind(state_digest(&pending.state))
        .bind(sealed)
        .execute(&mut *tx)
        .await?;
        record_event(
            &mut tx,
            &instruction.id,
            "given",
            performer_account_id,
            None,
            Some(&receipt),
        )
        .await?;
        let event = AuditEvent::new(EventKind::PullInstructionGiven, agent.clone())
            .patient(patient_id)
            .detail(format!(
                "instruction {} for source {}",
                instruction.id, source.id
            ));
        audit::record(&mut tx, &event).await?;
        tx.commit().await?;
        Ok((instruction, receipt))
    }

    /// The pending instruction an authorisation callback belongs to, by its `state`.
    pub async fn pending_by_state(
        &self,
        state: &str,
    ) -> Result<(Instruction, PendingAuthorization)> {
        let row = sqlx::query(&format!(
            "{SELECT_INSTRUCTION} WHERE id = (SELECT instruction_id FROM source_links WHERE state_digest = $1)"
        ))
        .bind(state_digest(state))
        .fetch_optional(self.db.read_pool())
        .await?
        .ok_or(Error::NotFound("no authorisation is waiting for this state".into()))?;
        let instruction = decode_instruction(&row)?;
        if instruction.status != InstructionStatus::Pending {
            return Err(Error::Invalid(
                "this authorisation was already completed or withdrawn".into(),
            ));
        }
        let sealed: Option<Vec<u8>> =
            sqlx::query("SELECT pending_sealed FROM source_links WHERE instruction_id = $1")
                .bind(&instruction.id)
                .fetch_one(self.db.read_pool())
                .await?
                .try_get(0)?;
        let sealed = sealed.ok_or(Error::NotFound("authorisation already used".into()))?;
        let key = self.keys.data_key(&instruction.patient_id).await?;
        let bytes = key.open(&seal_aad(&instruction.id, "pending"), &sealed)?;
        let pending = serde_json::from_slice(&bytes).map_err(|e| Error::Invalid(e.to_string()))?;
        Ok((instruction, pending))
    }

    /// The source authorised the link: keep the credentials sealed, activate, queue a pull.
    pub async fn activate(
        &self,
        agent: &Agent,
        instruction: &Instruction,
        source: &SourceInfo,
        credentials: &LinkCredentials,
    ) -> Result<String> {
        let key = self.keys.data_key(&instruction.patient_id).await?;
        let sealed = seal_credentials(&key, &instruction.id, credentials)?;
        let mut active = instruction.clone();
        active.status = InstructionStatus::Active;
        let receipt = self.receipt(&active, source, "authorised")?;
        let now = now_millis();
        let mut tx = self.db.begin().await?;
        let updated = sqlx::query(
            "UPDATE pull_instructions SET status = 'active', updated_at = $1
             WHERE id = $2 AND status = 'pending'",
        )
        .bind(now)
        .bind(&instruction.id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if updated != 1 {
            return Err(Error::Invalid(
                "the instruction is no longer waiting for authorisation".into(),
            ));
        }
        sqlx::query(
            "UPDATE source_links SET credentials_sealed = $1, pending_sealed = NULL,
                 state_digest = NULL, linked_at = $2 WHERE instruction_id = $3",
        )
        .bind(sealed)
        .bind(now)
        .bind(&instruction.id)
        .execute(&mut *tx)
        .await?;
        record_event(
            &mut tx,
            &instruction.id,
            "authorised",
            "source",
            None,
            Some(&receipt),
        )
        .await?;
        self.queue
            .enqueue(
                &mut tx,
                &instruction.id,
                &instruction.patient_id,
                &instruction.source_id,
                now,
            )
            .await?;
        let event = AuditEvent::new(EventKind::PullInstructionAuthorised, agent.clone())
            .patient(&instruction.patient_id)
            .detail(format!(
                "instruction {} linked to source {}",
                instruction.id, source.id
            ));
        audit::record(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(receipt)
    }

    /// Authorisation failed (declined, state mismatch, source error): record why.
    pub async fn fail(&self, agent: &Agent, instruction: &Instruction, reason: &str) -> Result<()> {
        let mut tx = self.db.begin().await?;
        sqlx::query(
            "UPDATE pull_instructions SET status = 'failed', updated_at = $1
             WHERE id = $2 AND status IN ('pending', 'active')",
        )
        .bind(now_millis())
        .bind(&instruction.id)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE source_links SET pending_sealed = NULL, state_digest = NULL WHERE instruction_id = $1",
        )
        .bind(&instruction.id)
        .execute(&mut *tx)
        .await?;
        record_event(
            &mut tx,
            &instruction.id,
            "failed",
            "gateway",
            Some(reason),
            None,
        )
        .await?;
        let event = AuditEvent::new(EventKind::PullInstructionAuthorised, agent.clone())
            .outcome(crate::audit::Outcome::MinorFailure)
            .patient(&instruction.patient_id)
            .detail(format!("instruction {}: {reason}", instruction.id));
        audit::record(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Withdraws in one action: stops its pulls at once and forgets the link's secrets. The
    /// credentials are returned so the caller can revoke them at the source.
    pub async fn withdraw(
        &self,
        agent: &Agent,
        actor_account_id: &str,
        instruction: &Instruction,
        source: &SourceInfo,
    ) -> Result<(String, Option<LinkCredentials>)> {
        if instruction.status == InstructionStatus::Withdrawn {
            return Err(Error::Invalid(
                "the instruction is already withdrawn".into(),
            ));
        }
        let credentials = self.credentials(instruction).await.ok().flatten();
        let mut withdrawn = instruction.clone();
        withdrawn.status = InstructionStatus::Withdrawn;
        let receipt = self.receipt(&withdrawn, source, "withdrawn")?;
        let now = now_millis();
        let mut tx = self.db.begin().await?;
        sqlx::query(
            "UPDATE pull_instructions SET status = 'withdrawn', updated_at = $1 WHERE id = $2",
        )
        .bind(now)
        .bind(&instruction.id)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE source_links SET credentials_sealed = NULL, pending_sealed = NULL,
                 state_digest = NULL, revoked_at = $1 WHERE instruction_id = $2",
        )
        .bind(now)
        .bind(&instruction.id)
        .execute(&mut *tx)
        .await?;
        self.queue
            .cancel_instruction(&mut tx, &instruction.id)
            .await?;
        record_event(
            &mut tx,
            &instruction.id,
            "withdrawn",
            actor_account_id,
            None,
            Some(&receipt),
        )
        .await?;
        let event = AuditEvent::new(EventKind::PullInstructionWithdrawn, agent.clone())
            .patient(&instruction.patient_id)
            .detail(format!(
                "instruction {} for source {}",
                instruction.id, source.id
            ));
        audit::record(&mut tx, &event).await?;
        tx.commit().await?;
        Ok((receipt, credentials))
    }

    pub async fn get(&self, id: &str) -> Result<Instruction> {
        let row = sqlx::query(&format!("{SELECT_INSTRUCTION} WHERE id = $1"))
            .bind(id)
            .fetch_optional(self.db.read_pool())
            .await?
            .ok_or_else(|| Error::NotFound(format!("pull instruction {id}")))?;
        decode_instruction(&row)
    }

    /// The patient's instructions, newest first.
    pub async fn list(&self, patient_id: &str) -> Result<Vec<Instruction>> {
        let rows = sqlx::query(&format!(
            "{SELECT_INSTRUCTION} WHERE patient_id = $1 ORDER BY created_at DESC, id DESC"
        ))
        .bind(patient_id)
        .fetch_all(self.db.read_pool())
        .await?;
        rows.iter().map(decode_instruction).collect()
    }

    pub async fn events(&self, instruction_id: &str) -> Result<Vec<InstructionEvent>> {
        let rows = sqlx::query(
            "SELECT at, event, actor, detail, receipt FROM pull_instruction_events
             WHERE instruction_id = $1 ORDER BY id",
        )
        .bind(instruction_id)
        .fetch_all(self.db.read_pool())
        .await?;
        rows.iter()
            .map(|row| {
                Ok(InstructionEvent {
                    at: row.try_get(0)?,
                    event: row.try_get(1)?,
                    actor: row.try_get(2)?,
                    detail: row.try_get(3)?,
                    receipt: row.try_get(4)?,
                })
            })
            .collect()
    }

    /// The link's credentials, unsealed; `None` when there are none (pending, withdrawn).
    pub async fn credentials(&self, instruction: &Instruction) -> Result<Option<LinkCredentials>> {
        let sealed: Option<Vec<u8>> =
            sqlx::query("SELECT credentials_sealed FROM source_links WHERE instruction_id = $1")
                .bind(&instruction.id)
                .fetch_optional(self.db.read_pool())
                .await?
                .map(|row| row.try_get(0))
                .transpose()?
                .flatten();
        let Some(sealed) = sealed else {
            return Ok(None);
        };
        let key = self.keys.data_key(&instruction.patient_id).await?;
        let bytes = key.open(&seal_aad(&instruction.id, "credentials"), &sealed)?;
        Ok(Some(
            serde_json::from_slice(&bytes).map_err(|e| Error::Invalid(e.to_string()))?,
        ))
    }

    /// Where the last stored batch left off.
    pub async fn cursor(&self, instruction_id: &str) -> Result<Option<String>> {
        Ok(
            sqlx::query("SELECT cursor FROM source_links WHERE instruction_id = $1")
                .bind(instruction_id)
                .fetch_optional(self.db.read_pool())
                .await?
                .map(|row| row.try_get(0))
                .transpose()?
                .flatten(),
        )
    }

    /// After stored pages, in the caller's transaction: each instruction's new cursor (all in
    /// one statement) and, where the source refreshed them, its new credentials.
    pub async fn advance_all(
        &self,
        conn: &mut AnyConnection,
        pages: &[(&Instruction, &str, Option<&LinkCredentials>)],
    ) -> Result<()> {
        if pages.is_empty() {
            return Ok(());
        }
        let sql = format!(
            "UPDATE source_links SET cursor = v.column2
             FROM (VALUES {}) AS v
             WHERE source_links.instruction_id = v.column1 AND source_links.revoked_at IS NULL",
            crate::store::row_placeholders(self.db.engine(), pages.len(), 2)
        );
        let mut query = sqlx::query(&sql);
        for (instruction, cursor, _) in pages {
            query = query.bind(instruction.id.clone()).bind(cursor.to_string());
        }
        query.execute(&mut *conn).await?;
        for (instruction, _, refreshed) in pages {
            if let Some(credentials) = refreshed {
                self.store_credentials(conn, instruction, credentials)
                    .await?;
            }
        }
        Ok(())
    }

    /// Credentials the source refreshed, sealed with the patient's key.
    async fn store_credentials(
        &self,
        conn: &mut AnyConnection,
        instruction: &Instruction,
        credentials: &LinkCredentials,
    ) -> Result<()> {
        let key = self.keys.data_key(&instruction.patient_id).await?;
        let sealed = seal_credentials(&key, &instruction.id, credentials)?;
        sqlx::query(
            "UPDATE source_links SET credentials_sealed = $1 WHERE instruction_id = $2 AND revoked_at IS NULL",
        )
        .bind(sealed)
        .bind(&instruction.id)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    fn receipt(
        &self,
        instruction: &Instruction,
        source: &SourceInfo,
        event: &str,
    ) -> Result<String> {
        let now = now_millis();
        let categories: Vec<_> = instruction
            .categories
            .iter()
            .map(|c| json!({"code": c.code(), "ja": c.label_ja(), "en": c.label_en()}))
            .collect();
        let (notice_ja, notice_en) = notice(event, &source.display_name);
        let claims = json!({
            "iss": self.receipts.issuer(),
            "iat": now / 1000,
            "jti": uuid::Uuid::new_v4().to_string(),
            "receipt_type": "pull-instruction",
            "event": event,
            "issued_at": millis_to_rfc3339(now),
            "subject": instruction.patient_id,
            "performer": instruction.performer_account_id,
            "instruction": {
                "id": instruction.id,
                "status": instruction.status.code(),
                "source": {"id": source.id, "name": source.display_name},
                "categories": categories,
                "given_at": millis_to_rfc3339(instruction.created_at),
            },
            "notice": {"ja": notice_ja, "en": notice_en},
        });
        self.receipts.sign(&claims)
    }
}

fn notice(event: &str, source: &str) -> (String, String) {
    match event {
        "given" => (
            format!("あなたの指示により、{source} からのデータ取得を受け付けました。{source} での認証が終わると取得を始めます。いつでも取り消せます。"),
            format!("At your instruction we will fetch your data from {source} once you have signed in there. You can withdraw at any time."),
        ),
        "authorised" => (
            format!("{source} との連携が完了し、データの取得を始めました。"),
            format!("{source} is linked; fetching your data has started."),
        ),
        _ => (
            format!("{source} からのデータ取得を取り消しました。今後の取得は行いません。取得済みのデータは、あなたが削除を選ばない限り保管されます。"),
            format!("Fetching from {source} is withdrawn; nothing more will be fetched. Data already received is kept unless you choose to delete it."),
        ),
    }
}

async fn record_event(
    conn: &mut AnyConnection,
    instruction_id: &str,
    event: &str,
    actor: &str,
    detail: Option<&str>,
    receipt: Option<&str>,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO pull_instruction_events (instruction_id, at, event, actor, detail, receipt)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(instruction_id)
    .bind(now_millis())
    .bind(event)
    .bind(actor)
    .bind(detail.map(str::to_string))
    .bind(receipt.map(str::to_string))
    .execute(conn)
    .await?;
    Ok(())
}

fn seal_aad(instruction_id: &str, what: &str) -> Vec<u8> {
    format!("phr-gateway/link/v1/{instruction_id}/{what}").into_bytes()
}

fn seal_credentials(
    key: &crate::crypto::DataKey,
    instruction_id: &str,
    credentials: &LinkCredentials,
) -> Result<Vec<u8>> {
    let json = serde_json::to_vec(credentials).map_err(|e| Error::Invalid(e.to_string()))?;
    key.seal(&seal_aad(instruction_id, "credentials"), &json)
}

/// Only a digest of `state` is stored: enough to find the instruction, useless to forge.
fn state_digest(state: &str) -> Vec<u8> {
    Sha256::digest(state.as_bytes()).to_vec()
}

fn categories_json(categories: &[DataCategory]) -> String {
    let codes: Vec<&str> = categories.iter().map(|c| c.code()).collect();
    serde_json::to_string(&codes).unwrap_or_else(|_| "[]".into())
}

fn decode_instruction(row: &AnyRow) -> Result<Instruction> {
    let categories: String = row.try_get(4)?;
    let codes: Vec<String> =
        serde_json::from_str(&categories).map_err(|e| Error::Invalid(e.to_string()))?;
    Ok(Instruction {
        id: row.try_get(0)?,
        patient_id: row.try_get(1)?,
        source_id: row.try_get(2)?,
        performer_account_id: row.try_get(3)?,
        categories: codes
            .iter()
            .filter_map(|c| DataCategory::from_code(c))
            .collect(),
        status: InstructionStatus::parse(&row.try_get::<String, _>(5)?)?,
        created_at: row.try_get(6)?,
        updated_at: row.try_get(7)?,
    })
}
