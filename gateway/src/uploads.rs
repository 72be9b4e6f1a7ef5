//! Upload permissions: the patient letting a checkup institution (a registered OAuth client)
//! send their 特定健診 results. Like a pull instruction it is receiving on the patient's
//! instruction, so it is given and withdrawn by the patient (or their representative), kept
//! with its history, audited and answered with a signed receipt; the institution uploads
//! with its own credentials and only while the permission is active and unexpired.

use std::sync::Arc;

use serde::Serialize;
use serde_json::json;
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};
use utoipa::ToSchema;

use crate::audit::{self, Agent, AuditEvent, EventKind};
use crate::error::{Error, Result};
use crate::oauth::clients::Client;
use crate::receipts::ReceiptSigner;
use crate::store::{insert_patient, millis_to_rfc3339, now_millis, Database};

/// How long a permission admits uploads: a year covers one annual checkup and its
/// follow-up; the patient gives it again for the next.
pub const VALIDITY_DAYS: i64 = 365;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum UploadPermissionStatus {
    Active,
    Withdrawn,
    /// Past `expires_at` (derived; stored as active).
    Expired,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UploadPermission {
    pub id: String,
    pub patient_id: String,
    pub client_id: String,
    pub performer_account_id: String,
    pub status: UploadPermissionStatus,
    pub created_at: i64,
    pub updated_at: i64,
    pub expires_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct UploadPermissionEvent {
    /// RFC 3339.
    pub at: String,
    /// `given`, `upload`, `upload-refused` or `withdrawn`.
    pub event: String,
    /// The account (patient, representative) or client that acted.
    pub actor: String,
    pub detail: Option<String>,
    /// The signed receipt of the patient's step (compact JWS), if one was issued.
    pub receipt: Option<String>,
}

#[derive(Clone)]
pub struct UploadPermissions {
    db: Database,
    receipts: Arc<ReceiptSigner>,
}

const SELECT_PERMISSION: &str = "SELECT id, patient_id, client_id, performer_account_id, status,
        created_at, updated_at, expires_at FROM upload_permissions";

impl UploadPermissions {
    pub fn new(db: Database, receipts: Arc<ReceiptSigner>) -> Self {
        UploadPermissions { db, receipts }
    }

    /// Lets `institution` upload the patient's checkup results for [`VALIDITY_DAYS`].
    /// Returns the permission and its signed receipt.
    pub async fn give(
        &self,
        agent: &Agent,
        performer_account_id: &str,
        patient_id: &str,
        institution: &Client,
    ) -> Result<(UploadPermission, String)> {
        let now = now_millis();
        let permission = UploadPermission {
            id: uuid::Uuid::new_v4().to_string(),
            patient_id: patient_id.to_string(),
            client_id: institution.id.clone(),
            performer_account_id: performer_account_id.to_string(),
            status: UploadPermissionStatus::Active,
            created_at: now,
            updated_at: now,
            expires_at: now + VALIDITY_DAYS * 86_400_000,
        };
        let receipt = self.receipt(&permission, institution, "given")?;
        let mut tx = self.db.begin().await?;
        insert_patient(&mut tx, patient_id, now).await?;
        sqlx::query(
            "INSERT INTO upload_permissions (id, patient_id, client_id, performer_account_id,
                 status, created_at, updated_at, expires_at)
             VALUES ($1, $2, $3, $4, 'active', $5, $5, $6)",
        )
        .bind(&permission.id)
        .bind(patient_id)
        .bind(&institution.id)
        .bind(performer_account_id)
        .bind(now)
        .bind(permission.expires_at)
        .execute(&mut *tx)
        .await?;
        record_event(
            &mut tx,
            &permission.id,
            "given",
            performer_account_id,
            None,
            Some(&receipt),
        )
        .await?;
        let event = AuditEvent::new(EventKind::UploadPermissionGiven, agent.clone())
            .patient(patient_id)
            .detail(format!(
                "upload permission {} for client {}",
                permission.id, institution.id
            ));
        audit::record(&mut tx, &event).await?;
        tx.commit().await?;
        Ok((permission, receipt))
    }

    /// Withdraws in one action: the institution's next upload is refused.
    pub async fn withdraw(
        &self,
        agent: &Agent,
        actor_account_id: &str,
        permission: &UploadPermission,
        institution: &Client,
    ) -> Result<String> {
        if permission.status == UploadPermissionStatus::Withdrawn {
            return Err(Error::Invalid("the permission is already withdrawn".into()));
        }
        let mut withdrawn = permission.clone();
        withdrawn.status = UploadPermissionStatus::Withdrawn;
        let receipt = self.receipt(&withdrawn, institution, "withdrawn")?;
        let now = now_millis();
        let mut tx = self.db.begin().await?;
        let updated = sqlx::query(
            "UPDATE upload_permissions SET status = 'withdrawn', updated_at = $1
             WHERE id = $2 AND status = 'active'",
        )
        .bind(now)
        .bind(&permission.id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if updated != 1 {
            return Err(Error::Invalid("the permission is already withdrawn".into()));
        }
        record_event(
            &mut tx,
            &permission.id,
            "withdrawn",
            actor_account_id,
            None,
            Some(&receipt),
        )
        .await?;
        let event = AuditEvent::new(EventKind::UploadPermissionWithdrawn, agent.clone())
            .patient(&permission.patient_id)
            .detail(format!(
                "upload permission {} for client {}",
                permission.id, permission.client_id
            ));
        audit::record(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(receipt)
    }

    /// The permission `client_id` may upload under now. Unknown ids and other clients'
    /// permissions are "not found" alike, so an institution learns nothing of others.
    pub async fn admitting(&self, id: &str, client_id: &str) -> Result<UploadPermission> {
        let permission = match self.get(id).await {
            Ok(p) if p.client_id == client_id => p,
            Ok(_) | Err(Error::NotFound(_)) => {
                return Err(Error::NotFound(format!("upload permission {id}")))
            }
            Err(other) => return Err(other),
        };
        match permission.status {
            UploadPermissionStatus::Active => Ok(permission),
            UploadPermissionStatus::Withdrawn => Err(Error::Forbidden(
                "the patient has withdrawn this upload permission",
            )),
            UploadPermissionStatus::Expired => {
                Err(Error::Forbidden("this upload permission has expired"))
            }
        }
    }

    /// Records an upload (or a refused one) under the permission, in the caller's
    /// transaction or on its own.
    pub async fn record_upload_in(
        conn: &mut AnyConnection,
        permission_id: &str,
        client_id: &str,
        detail: &str,
        refused: bool,
    ) -> Result<()> {
        let event = if refused { "upload-refused" } else { "upload" };
        record_event(conn, permission_id, event, client_id, Some(detail), None).await
    }

    pub async fn record_refused_upload(
        &self,
        permission_id: &str,
        client_id: &str,
        detail: &str,
    ) -> Result<()> {
        let mut tx = self.db.begin().await?;
        Self::record_upload_in(&mut tx, permission_id, client_id, detail, true).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn get(&self, id: &str) -> Result<UploadPermission> {
        let row = sqlx::query(&format!("{SELECT_PERMISSION} WHERE id = $1"))
            .bind(id)
            .fetch_optional(self.db.read_pool())
            .await?
            .ok_or_else(|| Error::NotFound(format!("upload permission {id}")))?;
        decode(&row, now_millis())
    }

    /// The patient's permissions, newest first.
    pub async fn list(&self, patient_id: &str) -> Result<Vec<UploadPermission>> {
        let rows = sqlx::query(&format!(
            "{SELECT_PERMISSION} WHERE patient_id = $1 ORDER BY created_at DESC, id DESC"
        ))
        .bind(patient_id)
        .fetch_all(self.db.read_pool())
        .await?;
        let now = now_millis();
        rows.iter().map(|row| decode(row, now)).collect()
    }

    pub async fn events(&self, permission_id: &str) -> Result<Vec<UploadPermissionEvent>> {
        let rows = sqlx::query(
            "SELECT at, event, actor, detail, receipt FROM upload_permission_events
             WHERE permission_id = $1 ORDER BY id",
        )
        .bind(permission_id)
        .fetch_all(self.db.read_pool())
        .await?;
        rows.iter()
            .map(|row| {
                Ok(UploadPermissionEvent {
                    at: millis_to_rfc3339(row.try_get(0)?),
                    event: row.try_get(1)?,
                    actor: row.try_get(2)?,
                    detail: row.try_get(3)?,
                    receipt: row.try_get(4)?,
                })
            })
            .collect()
    }

    fn receipt(
        &self,
        permission: &UploadPermission,
        institution: &Client,
        event: &str,
    ) -> Result<String> {
        let now = now_millis();
        let (notice_ja, notice_en) = notice(event, &institution.display_name);
        let claims = json!({
            "iss": self.receipts.issuer(),
            "iat": now / 1000,
            "jti": uuid::Uuid::new_v4().to_string(),
            "receipt_type": "upload-permission",
            "event": event,
            "issued_at": millis_to_rfc3339(now),
            "subject": permission.patient_id,
            "performer": permission.performer_account_id,
            "permission": {
                "id": permission.id,
                "status": status_code(permission.status),
                "institution": {
                    "client_id": institution.id,
                    "name": institution.display_name,
                    "organisation": institution.recipient.name,
                    "identifier": institution.recipient.identifier,
                },
                "categories": [{"code": "checkups", "ja": "特定健診結果", "en": "Specific health checkup results"}],
                "given_at": millis_to_rfc3339(permission.created_at),
                "expires_at": millis_to_rfc3339(permission.expires_at),
            },
            "notice": {"ja": notice_ja, "en": notice_en},
        });
        self.receipts.sign(&claims)
    }
}

pub fn status_code(status: UploadPermissionStatus) -> &'static str {
    match status {
        UploadPermissionStatus::Active => "active",
        UploadPermissionStatus::Withdrawn => "withdrawn",
        UploadPermissionStatus::Expired => "expired",
    }
}

fn notice(event: &str, institution: &str) -> (String, String) {
    match event {
        "given" => (
            format!("あなたの指示により、{institution} があなたの特定健診結果をこのゲートウェイへ送ることを認めました。有効期間は1年です。いつでも取り消せます。"),
            format!("At your instruction, {institution} may send your specific health checkup results to this gateway for one year. You can withdraw at any time."),
        ),
        _ => (
            format!("{institution} からの特定健診結果の受け取りを取り消しました。今後の送信は受け付けません。受け取り済みの結果は、あなたが削除を選ばない限り保管されます。"),
            format!("{institution} may no longer send your checkup results; further uploads are refused. Results already received are kept unless you choose to delete them."),
        ),
    }
}

async fn record_event(
    conn: &mut AnyConnection,
    permission_id: &str,
    event: &str,
    actor: &str,
    detail: Option<&str>,
    receipt: Option<&str>,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO upload_permission_events (permission_id, at, event, actor, detail, receipt)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(permission_id)
    .bind(now_millis())
    .bind(event)
    .bind(actor)
    .bind(detail.map(str::to_string))
    .bind(receipt.map(str::to_string))
    .execute(conn)
    .await?;
    Ok(())
}

fn decode(row: &AnyRow, now: i64) -> Result<UploadPermission> {
    let stored: String = row.try_get(4)?;
    let expires_at: i64 = row.try_get(7)?;
    let status = match stored.as_str() {
        "withdrawn" => UploadPermissionStatus::Withdrawn,
        "active" if now >= expires_at => UploadPermissionStatus::Expired,
        "active" => UploadPermissionStatus::Active,
        other => {
            return Err(Error::Invalid(format!(
                "unknown upload permission status {other:?}"
            )))
        }
    };
    Ok(UploadPermission {
        id: row.try_get(0)?,
        patient_id: row.try_get(1)?,
        client_id: row.try_get(2)?,
        performer_account_id: row.try_get(3)?,
        status,
        created_at: row.try_get(5)?,
        updated_at: row.try_get(6)?,
        expires_at,
    })
}
