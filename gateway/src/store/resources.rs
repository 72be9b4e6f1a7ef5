//! FHIR resources per patient, under gateway-assigned ids, with version history. Bodies are
//! kept exactly as received, encrypted with the patient's data key; the source's identity
//! (source, type, source id, versionId or content digest) is the idempotency key.

use std::collections::HashMap;

use futures::{Stream, TryStreamExt};
use sha2::{Digest, Sha256};
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

use super::{now_millis, Database};
use crate::audit::{self, Agent, AuditEvent, EventKind};
use crate::crypto::DataKey;
use crate::error::{Error, Result};
use crate::keystore::KeyStore;

/// Where a resource came from; `(source, resource_type, source_resource_id)` names one
/// resource across its versions, and `version_id` (or, without one, the content digest) one
/// version of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceIdentity {
    pub source: String,
    pub resource_type: String,
    pub source_resource_id: String,
    pub version_id: Option<String>,
}

#[derive(Debug, Clone)]
pub struct NewResource {
    pub patient_id: String,
    /// Data category (e.g. `checkup`, `medication`), used by consent decisions.
    pub category: String,
    pub source: SourceIdentity,
    /// The JSON body exactly as received.
    pub body: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    Created,
    NewVersion,
    /// The same source version was stored before; nothing was written.
    Unchanged,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceMeta {
    pub id: String,
    pub version: i64,
    pub patient_id: String,
    pub resource_type: String,
    pub category: String,
    pub source: String,
    pub source_resource_id: String,
    pub source_version: String,
    pub last_updated: i64,
    pub digest: [u8; 32],
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResource {
    pub meta: ResourceMeta,
    pub body: Vec<u8>,
}

/// The resource store: the main database for rows, the key store for data keys.
#[derive(Clone)]
pub struct ResourceStore {
    db: Database,
    keys: KeyStore,
    max_resource_bytes: usize,
}

/// The current version of every resource, joined to its body. Public so the benchmark can
/// time the same rows without decryption.
#[doc(hidden)]
pub const SELECT_CURRENT: &str =
    "SELECT r.id, v.version, r.patient_id, r.resource_type, r.category,
        r.source, r.source_resource_id, v.source_version, v.last_updated, v.digest, v.body
     FROM resources r JOIN resource_versions v
       ON v.resource_id = r.id AND v.version = r.current_version";

impl ResourceStore {
    pub fn new(db: Database, keys: KeyStore, max_resource_bytes: usize) -> Self {
        ResourceStore {
            db,
            keys,
            max_resource_bytes,
        }
    }

    pub fn database(&self) -> &Database {
        &self.db
    }

    pub fn key_store(&self) -> &KeyStore {
        &self.keys
    }

    /// Creates the patient record (an opaque id) if it does not exist.
    pub async fn ensure_patient(&self, patient_id: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO patients (id, created_at) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING",
        )
        .bind(patient_id)
        .bind(now_millis())
        .execute(self.db.write_pool())
        .await?;
        Ok(())
    }

    /// Stores a resource idempotently: a source version seen before is `Unchanged`; a new
    /// version of a known source resource becomes its next version. The rows and the audit
    /// leaf commit together or not at all.
    pub async fn put(
        &self,
        agent: &Agent,
        new: NewResource,
    ) -> Result<(ResourceMeta, WriteOutcome)> {
        let mut written = self.put_batch(agent, vec![new]).await?;
        written
            .pop()
            .ok_or_else(|| Error::Invalid("nothing to write".into()))
    }

    /// Stores a batch in one transaction with one audit leaf naming every resource written
    /// (pulls are audited per batch). Nothing of the batch is kept if any part fails.
    pub async fn put_batch(
        &self,
        agent: &Agent,
        batch: Vec<NewResource>,
    ) -> Result<Vec<(ResourceMeta, WriteOutcome)>> {
        for new in &batch {
            self.check_new(new)?;
        }
        let mut keys: HashMap<String, DataKey> = HashMap::new();
        for new in &batch {
            if !keys.contains_key(&new.patient_id) {
                let (key, created) = self.keys.data_key_or_create(&new.patient_id).await?;
                if created {
                    self.audit_key_created(&new.patient_id).await?;
                }
                keys.insert(new.patient_id.clone(), key);
            }
        }
        let now = now_millis();
        let mut tx = self.db.begin().await?;
        for patient_id in keys.keys() {
            sqlx::query(
                "INSERT INTO patients (id, created_at) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING",
            )
            .bind(patient_id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        let mut results = Vec::with_capacity(batch.len());
        for new in batch {
            let key = keys
                .get(&new.patient_id)
                .ok_or(Error::Crypto("data key vanished during the batch"))?;
            results.push(self.put_in(&mut tx, key, new, now).await?);
        }
        let changed: Vec<&ResourceMeta> = results
            .iter()
            .filter(|(_, outcome)| *outcome != WriteOutcome::Unchanged)
            .map(|(meta, _)| meta)
            .collect();
        if changed.is_empty() {
            tx.rollback().await?;
            return Ok(results);
        }
        self.db.fault_point("resources.put.before_audit")?;
        let created = results
            .iter()
            .any(|(_, outcome)| *outcome == WriteOutcome::Created);
        let kind = if created {
            EventKind::Create
        } else {
            EventKind::Update
        };
        let mut patients: Vec<&str> = changed.iter().map(|m| m.patient_id.as_str()).collect();
        patients.dedup();
        let mut event = AuditEvent::new(kind, agent.clone());
        if let [patient] = patients.as_slice() {
            event = event.patient(*patient);
        }
        for meta in &changed {
            event = event.resource(format!(
                "{}/{}/_history/{}",
                meta.resource_type, meta.id, meta.version
            ));
        }
        audit::record(&mut tx, &event).await?;
        self.db.fault_point("resources.put.before_commit")?;
        tx.commit().await?;
        Ok(results)
    }

    async fn put_in(
        &self,
        tx: &mut AnyConnection,
        key: &DataKey,
        new: NewResource,
        now: i64,
    ) -> Result<(ResourceMeta, WriteOutcome)> {
        let digest: [u8; 32] = Sha256::digest(&new.body).into();
        let source_version = match &new.source.version_id {
            Some(v) => format!("version:{v}"),
            None => format!("sha256:{}", hex::encode(digest)),
        };
        let existing = sqlx::query(
            "SELECT id, current_version FROM resources
             WHERE patient_id = $1 AND source = $2 AND resource_type = $3 AND source_resource_id = $4",
        )
        .bind(&new.patient_id)
        .bind(&new.source.source)
        .bind(&new.source.resource_type)
        .bind(&new.source.source_resource_id)
        .fetch_optional(&mut *tx)
        .await?;

        let (id, version, outcome) = match existing {
            Some(row) => {
                let id: String = row.try_get(0)?;
                let current: i64 = row.try_get(1)?;
                let seen = sqlx::query(
                    "SELECT r.id, v.version, r.patient_id, r.resource_type, r.category,
                         r.source, r.source_resource_id, v.source_version, v.last_updated, v.digest
                     FROM resources r JOIN resource_versions v ON v.resource_id = r.id
                     WHERE r.id = $1 AND v.source_version = $2",
                )
                .bind(&id)
                .bind(&source_version)
                .fetch_optional(&mut *tx)
                .await?;
                if let Some(seen) = seen {
                    return Ok((decode_meta(&seen)?, WriteOutcome::Unchanged));
                }
                sqlx::query(
                    "UPDATE resources SET current_version = $1, last_updated = $2, category = $3
                     WHERE id = $4",
                )
                .bind(current + 1)
                .bind(now)
                .bind(&new.category)
                .bind(&id)
                .execute(&mut *tx)
                .await?;
                (id, current + 1, WriteOutcome::NewVersion)
            }
            None => {
                let id = uuid::Uuid::new_v4().to_string();
                sqlx::query(
                    "INSERT INTO resources (id, patient_id, resource_type, category, source,
                         source_resource_id, current_version, last_updated)
                     VALUES ($1, $2, $3, $4, $5, $6, 1, $7)",
                )
                .bind(&id)
                .bind(&new.patient_id)
                .bind(&new.source.resource_type)
                .bind(&new.category)
                .bind(&new.source.source)
                .bind(&new.source.source_resource_id)
                .bind(now)
                .execute(&mut *tx)
                .await?;
                (id, 1, WriteOutcome::Created)
            }
        };
        self.db.fault_point("resources.put.between_statements")?;

        let sealed = key.seal(&body_aad(&new.patient_id, &id, version), &new.body)?;
        sqlx::query(
            "INSERT INTO resource_versions (resource_id, version, patient_id, source_version,
                 digest, last_updated, body)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&id)
        .bind(version)
        .bind(&new.patient_id)
        .bind(&source_version)
        .bind(digest.to_vec())
        .bind(now)
        .bind(sealed)
        .execute(&mut *tx)
        .await?;
        Ok((
            ResourceMeta {
                id,
                version,
                patient_id: new.patient_id,
                resource_type: new.source.resource_type,
                category: new.category,
                source: new.source.source,
                source_resource_id: new.source.source_resource_id,
                source_version,
                last_updated: now,
                digest,
            },
            outcome,
        ))
    }

    /// The current version of one resource, decrypted.
    pub async fn read(&self, patient_id: &str, id: &str) -> Result<StoredResource> {
        let row = sqlx::query(&format!(
            "{SELECT_CURRENT} WHERE r.id = $1 AND r.patient_id = $2"
        ))
        .bind(id)
        .bind(patient_id)
        .fetch_optional(self.db.read_pool())
        .await?
        .ok_or_else(|| Error::NotFound(format!("resource {id}")))?;
        let key = self.keys.data_key(patient_id).await?;
        decode_row(&row, &key, self.max_resource_bytes)
    }

    /// Every version of one resource, oldest first.
    pub async fn history(&self, patient_id: &str, id: &str) -> Result<Vec<StoredResource>> {
        let rows = sqlx::query(
            "SELECT r.id, v.version, r.patient_id, r.resource_type, r.category,
                 r.source, r.source_resource_id, v.source_version, v.last_updated, v.digest, v.body
             FROM resources r JOIN resource_versions v ON v.resource_id = r.id
             WHERE r.id = $1 AND r.patient_id = $2 ORDER BY v.version",
        )
        .bind(id)
        .bind(patient_id)
        .fetch_all(self.db.read_pool())
        .await?;
        if rows.is_empty() {
            return Err(Error::NotFound(format!("resource {id}")));
        }
        let key = self.keys.data_key(patient_id).await?;
        rows.iter()
            .map(|row| decode_row(row, &key, self.max_resource_bytes))
            .collect()
    }

    /// Streams the current version of each of the patient's resources, decrypting one at a
    /// time, so memory stays bounded however large the record.
    pub async fn stream_current(
        &self,
        patient_id: &str,
    ) -> Result<impl Stream<Item = Result<StoredResource>> + Send + 'static> {
        let key = self.keys.data_key(patient_id).await?;
        let pool = self.db.read_pool().clone();
        let patient_id = patient_id.to_string();
        let cap = self.max_resource_bytes;
        Ok(async_stream::try_stream! {
            let sql = format!("{SELECT_CURRENT} WHERE r.patient_id = $1 ORDER BY r.resource_type, r.id");
            let mut rows = sqlx::query(&sql).bind(&patient_id).fetch(&pool);
            while let Some(row) = rows.try_next().await? {
                yield decode_row(&row, &key, cap)?;
            }
        })
    }

    /// How many current resources the patient has (for tests and the demo).
    pub async fn count(&self, patient_id: &str) -> Result<i64> {
        let row = sqlx::query("SELECT COUNT(*) FROM resources WHERE patient_id = $1")
            .bind(patient_id)
            .fetch_one(self.db.read_pool())
            .await?;
        Ok(row.try_get(0)?)
    }

    /// Crypto-shreds the patient's data: their data key is destroyed, so every stored copy
    /// of their resources (backups included) becomes unreadable. Audited.
    pub async fn shred_patient(&self, agent: &Agent, patient_id: &str) -> Result<bool> {
        let destroyed = self.keys.shred(patient_id).await?;
        let event = AuditEvent::new(EventKind::DataKeyDestroyed, agent.clone()).patient(patient_id);
        let mut tx = self.db.begin().await?;
        audit::record(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(destroyed)
    }

    async fn audit_key_created(&self, patient_id: &str) -> Result<()> {
        let event = AuditEvent::new(EventKind::DataKeyCreated, Agent::system()).patient(patient_id);
        let mut tx = self.db.begin().await?;
        audit::record(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(())
    }

    fn check_new(&self, new: &NewResource) -> Result<()> {
        if new.body.len() > self.max_resource_bytes {
            return Err(Error::TooLarge {
                size: new.body.len(),
                limit: self.max_resource_bytes,
            });
        }
        for (name, value) in [
            ("patient id", &new.patient_id),
            ("category", &new.category),
            ("source", &new.source.source),
            ("source resource id", &new.source.source_resource_id),
        ] {
            if value.is_empty() || value.len() > 256 {
                return Err(Error::Invalid(format!(
                    "{name} must be 1 to 256 characters"
                )));
            }
        }
        let json: serde_json::Value = serde_json::from_slice(&new.body)
            .map_err(|e| Error::Invalid(format!("body is not JSON: {e}")))?;
        match json.get("resourceType").and_then(|t| t.as_str()) {
            Some(t) if t == new.source.resource_type => Ok(()),
            Some(t) => Err(Error::Invalid(format!(
                "body is a {t}, expected {}",
                new.source.resource_type
            ))),
            None => Err(Error::Invalid("body has no resourceType".into())),
        }
    }
}

/// Binds a ciphertext to its row: moving it to another patient, resource or version breaks
/// decryption.
fn body_aad(patient_id: &str, id: &str, version: i64) -> Vec<u8> {
    format!("phr-gateway/resource/v1/{patient_id}/{id}/{version}").into_bytes()
}

fn decode_meta(row: &AnyRow) -> Result<ResourceMeta> {
    let digest: Vec<u8> = row.try_get(9)?;
    Ok(ResourceMeta {
        id: row.try_get(0)?,
        version: row.try_get(1)?,
        patient_id: row.try_get(2)?,
        resource_type: row.try_get(3)?,
        category: row.try_get(4)?,
        source: row.try_get(5)?,
        source_resource_id: row.try_get(6)?,
        source_version: row.try_get(7)?,
        last_updated: row.try_get(8)?,
        digest: digest
            .try_into()
            .map_err(|_| Error::Crypto("stored digest is not 32 bytes"))?,
    })
}

fn decode_row(row: &AnyRow, key: &DataKey, cap: usize) -> Result<StoredResource> {
    let meta = decode_meta(row)?;
    let sealed: Vec<u8> = row.try_get(10)?;
    if sealed.len() > cap + 64 {
        return Err(Error::TooLarge {
            size: sealed.len(),
            limit: cap,
        });
    }
    let body = key.open(&body_aad(&meta.patient_id, &meta.id, meta.version), &sealed)?;
    Ok(StoredResource { meta, body })
}
