//! FHIR resources per patient, under gateway-assigned ids, with version history. Bodies are
//! kept exactly as received, encrypted with the patient's data key; the source's identity
//! (source, type, source id, versionId or content digest) is the idempotency key.

use std::collections::HashMap;

use futures::{Stream, TryStreamExt};
use sha2::{Digest, Sha256};
use sqlx::{AnyConnection, Row};

use tracing::Instrument;

use super::point_reads::{bind_params, Param, RowValues};
use super::{insert_patient, insert_patients, now_millis, Database};
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

impl ResourceMeta {
    /// `Type/id/_history/version`: this version, as audit records and Provenance name it.
    pub fn history_reference(&self) -> String {
        format!(
            "{}/{}/_history/{}",
            self.resource_type, self.id, self.version
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResource {
    pub meta: ResourceMeta,
    pub body: Vec<u8>,
}

/// A batch sealed before its transaction, as if every resource were new: each gets a fresh
/// time-ordered id and its body is encrypted as version 1. Hashing and encrypting a page is
/// then done outside the database's single writer; inside, only a resource that turns out
/// to exist already is sealed again (as its next version). No I/O.
#[derive(Clone, Default)]
pub struct SealedBatch {
    /// The resources as given (a caller may still reconcile their source identities; the
    /// bodies must stay as they are).
    pub resources: Vec<NewResource>,
    ahead: Vec<SealedAhead>,
}

#[derive(Clone)]
struct SealedAhead {
    digest: [u8; 32],
    id: String,
    sealed: Vec<u8>,
}

impl SealedBatch {
    pub fn seal(resources: Vec<NewResource>, keys: &HashMap<String, DataKey>) -> Result<Self> {
        let ahead = resources
            .iter()
            .map(|new| {
                let key = keys
                    .get(&new.patient_id)
                    .ok_or(Error::Crypto("no data key fetched for the batch's patient"))?;
                // Time-ordered ids keep index inserts at the right edge of the B-trees.
                let id = uuid::Uuid::now_v7().to_string();
                let sealed = key.seal(&body_aad(&new.patient_id, &id, 1), &new.body)?;
                Ok(SealedAhead {
                    digest: Sha256::digest(&new.body).into(),
                    id,
                    sealed,
                })
            })
            .collect::<Result<_>>()?;
        Ok(SealedBatch { resources, ahead })
    }

    pub fn is_empty(&self) -> bool {
        self.resources.is_empty()
    }
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
        let mut conn = self.db.write_pool().acquire().await?;
        insert_patient(&mut conn, patient_id, now_millis()).await
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
    /// (pulls are audited per batch). Nothing of the batch is kept if any part fails. The
    /// work is set-based: a few statements per batch, not per resource.
    pub async fn put_batch(
        &self,
        agent: &Agent,
        batch: Vec<NewResource>,
    ) -> Result<Vec<(ResourceMeta, WriteOutcome)>> {
        self.put_batch_with_detail(agent, batch, None).await
    }

    /// `put_batch` with a PHI-free note for the batch's audit leaf (e.g. the pull job).
    pub async fn put_batch_with_detail(
        &self,
        agent: &Agent,
        batch: Vec<NewResource>,
        detail: Option<String>,
    ) -> Result<Vec<(ResourceMeta, WriteOutcome)>> {
        for new in &batch {
            self.validate(new)?;
        }
        let keys = self.data_keys_for(&batch).await?;
        let mut tx = self.db.begin().await?;
        let results = self
            .put_batch_in(&mut tx, agent, batch, &keys, detail, None)
            .await?;
        if results
            .iter()
            .all(|(_, outcome)| *outcome == WriteOutcome::Unchanged)
        {
            tx.rollback().await?;
            return Ok(results);
        }
        self.db.fault_point("resources.put.before_commit")?;
        tx.commit().await?;
        Ok(results)
    }

    /// Fetches (or creates) each patient's data key, before any transaction: the key store
    /// is a separate database.
    pub async fn data_keys_for(&self, batch: &[NewResource]) -> Result<HashMap<String, DataKey>> {
        let mut keys: HashMap<String, DataKey> = HashMap::new();
        for new in batch {
            if !keys.contains_key(&new.patient_id) {
                let (key, created) = self.keys.data_key_or_create(&new.patient_id).await?;
                if created {
                    self.audit_key_created(&new.patient_id).await?;
                }
                keys.insert(new.patient_id.clone(), key);
            }
        }
        Ok(keys)
    }

    /// The batch's writes and its audit leaf inside the caller's transaction, so a caller
    /// can commit them together with its own bookkeeping (e.g. a pull's progress). The
    /// caller has validated each resource (`validate`) and fetched the keys (`data_keys_for`).
    /// `attach` (see `Attachment`) adds the batch's Provenance to the same statements.
    pub async fn put_batch_in(
        &self,
        tx: &mut AnyConnection,
        agent: &Agent,
        batch: Vec<NewResource>,
        keys: &HashMap<String, DataKey>,
        detail: Option<String>,
        attach: Option<&Attachment<'_>>,
    ) -> Result<Vec<(ResourceMeta, WriteOutcome)>> {
        let sealed = SealedBatch::seal(batch, keys)?;
        let mut written = self
            .put_sealed_pages_in(tx, agent, vec![(sealed, detail)], keys, attach)
            .await?;
        Ok(written.pop().unwrap_or_default())
    }

    /// Several sealed batches (pages) written with the same few statements, each page still
    /// audited by a leaf of its own with its own note. This is how pages of several pull
    /// jobs share one commit. The result holds each page's outcomes, in order (without
    /// what `attach` added).
    pub async fn put_sealed_pages_in(
        &self,
        tx: &mut AnyConnection,
        agent: &Agent,
        pages: Vec<(SealedBatch, Option<String>)>,
        keys: &HashMap<String, DataKey>,
        attach: Option<&Attachment<'_>>,
    ) -> Result<Vec<Vec<(ResourceMeta, WriteOutcome)>>> {
        let now = now_millis();
        let patients: Vec<&str> = keys.keys().map(String::as_str).collect();
        insert_patients(&mut *tx, &patients, now)
            .instrument(tracing::debug_span!("store_patients"))
            .await?;

        let mut all = Vec::new();
        let mut ahead = Vec::new();
        let mut page_ends = Vec::with_capacity(pages.len());
        let mut details = Vec::with_capacity(pages.len());
        for (batch, detail) in pages {
            all.extend(batch.resources);
            ahead.extend(batch.ahead);
            page_ends.push(all.len());
            details.push(detail);
        }
        let digests: Vec<[u8; 32]> = ahead.iter().map(|a| a.digest).collect();
        let mut known = find_existing(&mut *tx, &all)
            .instrument(tracing::debug_span!("store_find_existing"))
            .await?;
        let mut seen = find_seen_versions(&mut *tx, &all, &digests, &known)
            .instrument(tracing::debug_span!("store_find_seen"))
            .await?;
        let mut placing = Placing {
            known: &mut known,
            seen: &mut seen,
            keys,
            now,
            rows: Vec::new(),
            // Each page's rows, by their position in `rows`.
            page_rows: vec![Vec::new(); page_ends.len()],
        };
        let mut results = vec![Vec::new(); page_ends.len()];
        let mut page = 0;
        for (i, (new, ahead)) in all.into_iter().zip(ahead).enumerate() {
            while i >= page_ends[page] {
                page += 1;
            }
            results[page].push(placing.place(page, new, ahead)?);
        }

        // Each page's attachment. One attached to a page that wrote new versions is named
        // after them, so it cannot exist yet and needs no lookup; the others are looked up
        // together (a page of unchanged resources rarely has one).
        let mut unresolved = Vec::new();
        if let Some(attach) = attach {
            for (page, outcomes) in results.iter().enumerate() {
                let Some(new) = attach(page, outcomes)? else {
                    continue;
                };
                if placing.page_rows[page].is_empty() {
                    unresolved.push((page, new));
                } else {
                    let sealed = SealedBatch::seal(vec![new], keys)?;
                    for (new, ahead) in sealed.resources.into_iter().zip(sealed.ahead) {
                        placing.place(page, new, ahead)?;
                    }
                }
            }
        }
        if !unresolved.is_empty() {
            let (of_page, attached): (Vec<usize>, Vec<NewResource>) =
                unresolved.into_iter().unzip();
            let sealed = SealedBatch::seal(attached, keys)?;
            let digests: Vec<[u8; 32]> = sealed.ahead.iter().map(|a| a.digest).collect();
            let found = find_existing(&mut *tx, &sealed.resources).await?;
            placing.known.extend(found);
            let found =
                find_seen_versions(&mut *tx, &sealed.resources, &digests, placing.known).await?;
            placing.seen.extend(found);
            for ((page, new), ahead) in of_page.into_iter().zip(sealed.resources).zip(sealed.ahead)
            {
                placing.place(page, new, ahead)?;
            }
        }

        let Placing {
            rows, page_rows, ..
        } = placing;
        if rows.is_empty() {
            return Ok(results);
        }
        upsert_resources(&mut *tx, &rows)
            .instrument(tracing::debug_span!("store_upsert"))
            .await?;
        self.db.fault_point("resources.put.between_statements")?;
        insert_versions(&mut *tx, rows.iter())
            .instrument(tracing::debug_span!("store_versions"))
            .await?;
        self.db.fault_point("resources.put.before_audit")?;

        let events: Vec<AuditEvent> = page_rows
            .into_iter()
            .zip(&results)
            .zip(details)
            .filter(|((indices, _), _)| !indices.is_empty())
            .map(|((indices, outcomes), detail)| {
                let written: Vec<&VersionRow> = indices.iter().map(|&i| &rows[i]).collect();
                write_event(agent, &written, outcomes, detail)
            })
            .collect();
        audit::record_all(&mut *tx, &events)
            .instrument(tracing::debug_span!("store_audit"))
            .await?;
        Ok(results)
    }

    /// The current version of one resource, decrypted.
    pub async fn read(&self, patient_id: &str, id: &str) -> Result<StoredResource> {
        // Every FHIR read makes this one: a point read (see `store::point_reads`).
        let (meta, sealed) = self
            .db
            .fetch_point(
                &format!("{SELECT_CURRENT} WHERE r.id = $1 AND r.patient_id = $2"),
                &[Param::Text(id), Param::Text(patient_id)],
                sealed_row,
            )
            .await?
            .ok_or_else(|| Error::NotFound(format!("resource {id}")))?;
        let key = self.keys.data_key(patient_id).await?;
        open_sealed(meta, &sealed, &key, self.max_resource_bytes)
    }

    /// The most recently updated current resource of one type, decrypted (the patient's
    /// newest `Patient`, say); `NotFound` when there is none.
    pub async fn latest_of_type(
        &self,
        patient_id: &str,
        resource_type: &str,
    ) -> Result<StoredResource> {
        let row = sqlx::query(&format!(
            "{SELECT_CURRENT} WHERE r.patient_id = $1 AND r.resource_type = $2
             ORDER BY v.last_updated DESC, r.id DESC LIMIT 1"
        ))
        .bind(patient_id)
        .bind(resource_type)
        .fetch_optional(self.db.read_pool())
        .await?
        .ok_or_else(|| Error::NotFound(format!("{resource_type} of patient {patient_id}")))?;
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

    /// One page of the patient's current resources of `types`, in id order (time-ordered
    /// ids, so oldest first) after `after_id`, within `updated` (Unix millis, inclusive
    /// bounds), decrypted; at most `limit`.
    pub async fn page_current(
        &self,
        patient_id: &str,
        types: &[&str],
        updated: &UpdatedRange,
        after_id: Option<&str>,
        limit: usize,
    ) -> Result<Vec<StoredResource>> {
        if types.is_empty() || limit == 0 {
            return Ok(Vec::new());
        }
        let (filter, binds) = current_filter(types, updated, after_id);
        let sql = format!(
            "{SELECT_CURRENT} WHERE r.patient_id = $1 AND {filter} ORDER BY r.id LIMIT {limit}"
        );
        let query = bind_params(sqlx::query(&sql).bind(patient_id), &binds);
        let rows = query.fetch_all(self.db.read_pool()).await?;
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let key = self.keys.data_key(patient_id).await?;
        rows.iter()
            .map(|row| decode_row(row, &key, self.max_resource_bytes))
            .collect()
    }

    /// How many current resources of `types` the patient has within `updated`.
    pub async fn count_current(
        &self,
        patient_id: &str,
        types: &[&str],
        updated: &UpdatedRange,
    ) -> Result<i64> {
        if types.is_empty() {
            return Ok(0);
        }
        let (filter, binds) = current_filter(types, updated, None);
        let sql = format!("SELECT COUNT(*) FROM resources r WHERE r.patient_id = $1 AND {filter}");
        let query = bind_params(sqlx::query(&sql).bind(patient_id), &binds);
        let row = query.fetch_one(self.db.read_pool()).await?;
        Ok(row.try_get(0)?)
    }

    /// One version of one resource, decrypted; `NotFound` when either is unknown.
    pub async fn read_version(
        &self,
        patient_id: &str,
        id: &str,
        version: i64,
    ) -> Result<StoredResource> {
        let row = sqlx::query(
            "SELECT r.id, v.version, r.patient_id, r.resource_type, r.category,
                 r.source, r.source_resource_id, v.source_version, v.last_updated, v.digest, v.body
             FROM resources r JOIN resource_versions v ON v.resource_id = r.id
             WHERE r.id = $1 AND r.patient_id = $2 AND v.version = $3",
        )
        .bind(id)
        .bind(patient_id)
        .bind(version)
        .fetch_optional(self.db.read_pool())
        .await?
        .ok_or_else(|| Error::NotFound(format!("resource {id} version {version}")))?;
        let key = self.keys.data_key(patient_id).await?;
        decode_row(&row, &key, self.max_resource_bytes)
    }

    /// The gateway's ids of the patient's resources known by their sources' ids, as
    /// `(source, type, source id)`, in one query per few hundred (for resolving references).
    pub async fn gateway_ids_of(
        &self,
        patient_id: &str,
        wanted: &[(String, String, String)],
    ) -> Result<HashMap<(String, String, String), String>> {
        let mut found = HashMap::new();
        if wanted.is_empty() {
            return Ok(found);
        }
        let mut conn = self.db.read_pool().acquire().await?;
        for chunk in wanted.chunks(rows_per_statement(4)) {
            let sql = format!(
                // A join on VALUES so SQLite uses the unique index (see `find_existing`).
                "SELECT r.id, r.source, r.resource_type, r.source_resource_id
                 FROM (VALUES {}) AS v
                 JOIN resources r ON r.patient_id = v.column1 AND r.source = v.column2
                     AND r.resource_type = v.column3 AND r.source_resource_id = v.column4",
                placeholders(&conn, chunk.len(), 4)
            );
            let mut query = sqlx::query(&sql);
            for (source, resource_type, id) in chunk {
                query = query
                    .bind(patient_id)
                    .bind(source)
                    .bind(resource_type)
                    .bind(id);
            }
            for row in query.fetch_all(&mut *conn).await? {
                found.insert(
                    (row.try_get(1)?, row.try_get(2)?, row.try_get(3)?),
                    row.try_get(0)?,
                );
            }
        }
        Ok(found)
    }

    /// Erases the patient's record: the data key first (from then on nothing of theirs,
    /// in this database or any backup of it, can be decrypted), then every stored
    /// version, resource and reconciliation key, with the audit leaves, in one transaction.
    /// Returns how many resources were deleted and whether a key was destroyed.
    pub async fn erase_patient(&self, agent: &Agent, patient_id: &str) -> Result<(u64, bool)> {
        let destroyed = self.keys.shred(&self.db, patient_id).await?;
        let mut tx = self.db.begin().await?;
        sqlx::query("DELETE FROM resource_versions WHERE patient_id = $1")
            .bind(patient_id)
            .execute(&mut *tx)
            .await?;
        let deleted = sqlx::query("DELETE FROM resources WHERE patient_id = $1")
            .bind(patient_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        super::reconciliation::forget_patient_in(&mut tx, patient_id).await?;
        let key_event =
            AuditEvent::new(EventKind::DataKeyDestroyed, agent.clone()).patient(patient_id);
        let deleted_event = AuditEvent::new(EventKind::DataDeleted, agent.clone())
            .patient(patient_id)
            .detail(format!(
                "record erased at the patient's request: {deleted} resources"
            ));
        audit::record_all(&mut tx, &[key_event, deleted_event]).await?;
        tx.commit().await?;
        Ok((deleted, destroyed))
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
        let destroyed = self.keys.shred(&self.db, patient_id).await?;
        let event = AuditEvent::new(EventKind::DataKeyDestroyed, agent.clone()).patient(patient_id);
        let mut tx = self.db.begin().await?;
        super::reconciliation::forget_patient_in(&mut tx, patient_id).await?;
        audit::record(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(destroyed)
    }

    /// Deletes everything stored from one source for a patient (all versions), and the
    /// reconciled records only that source delivered; audited. Used when the patient
    /// withdraws a pull instruction and also asks to delete its data.
    pub async fn delete_from_source(
        &self,
        agent: &Agent,
        patient_id: &str,
        source: &str,
    ) -> Result<u64> {
        let mut tx = self.db.begin().await?;
        sqlx::query(
            "DELETE FROM resource_versions WHERE resource_id IN
                 (SELECT id FROM resources WHERE patient_id = $1 AND source = $2)",
        )
        .bind(patient_id)
        .bind(source)
        .execute(&mut *tx)
        .await?;
        let deleted = sqlx::query("DELETE FROM resources WHERE patient_id = $1 AND source = $2")
            .bind(patient_id)
            .bind(source)
            .execute(&mut *tx)
            .await?
            .rows_affected()
            + super::reconciliation::delete_from_source_in(&mut tx, patient_id, source).await?;
        let event = AuditEvent::new(EventKind::DataDeleted, agent.clone())
            .patient(patient_id)
            .detail(format!(
                "{deleted} resource(s) from source {source} deleted at the patient's request"
            ));
        audit::record(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(deleted)
    }

    async fn audit_key_created(&self, patient_id: &str) -> Result<()> {
        let event = AuditEvent::new(EventKind::DataKeyCreated, Agent::system()).patient(patient_id);
        let mut tx = self.db.begin().await?;
        audit::record(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Checks a resource as `put` would, without writing: lets a caller set aside the bad
    /// members of a batch instead of failing it.
    pub fn validate(&self, new: &NewResource) -> Result<()> {
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
        // Parses the whole document (so malformed JSON is refused) but keeps only its type.
        #[derive(serde::Deserialize)]
        struct Head {
            #[serde(rename = "resourceType")]
            resource_type: Option<String>,
        }
        let head: Head = serde_json::from_slice(&new.body)
            .map_err(|e| Error::Invalid(format!("body is not a JSON object: {e}")))?;
        match head.resource_type.as_deref() {
            Some(t) if t == new.source.resource_type => Ok(()),
            Some(t) => Err(Error::Invalid(format!(
                "body is a {t}, expected {}",
                new.source.resource_type
            ))),
            None => Err(Error::Invalid("body has no resourceType".into())),
        }
    }
}

/// Inclusive bounds on a resource's last update (Unix milliseconds).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UpdatedRange {
    pub from: Option<i64>,
    pub to: Option<i64>,
}

/// The `WHERE` conditions (after `r.patient_id = $1`) for current resources of `types`,
/// and their parameters from `$2` on.
fn current_filter<'a>(
    types: &[&'a str],
    updated: &UpdatedRange,
    after_id: Option<&'a str>,
) -> (String, Vec<Param<'a>>) {
    let mut binds = Vec::new();
    let mut placeholders = Vec::with_capacity(types.len());
    for resource_type in types {
        binds.push(Param::Text(resource_type));
        placeholders.push(format!("${}", binds.len() + 1));
    }
    let mut filter = format!("r.resource_type IN ({})", placeholders.join(", "));
    if let Some(from) = updated.from {
        binds.push(Param::Int(from));
        filter.push_str(&format!(" AND r.last_updated >= ${}", binds.len() + 1));
    }
    if let Some(to) = updated.to {
        binds.push(Param::Int(to));
        filter.push_str(&format!(" AND r.last_updated <= ${}", binds.len() + 1));
    }
    if let Some(after) = after_id {
        binds.push(Param::Text(after));
        filter.push_str(&format!(" AND r.id > ${}", binds.len() + 1));
    }
    (filter, binds)
}

/// What names one resource across its versions within a patient's record.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Identity {
    patient_id: String,
    source: String,
    resource_type: String,
    source_resource_id: String,
}

impl Identity {
    fn of(new: &NewResource) -> Self {
        Identity {
            patient_id: new.patient_id.clone(),
            source: new.source.source.clone(),
            resource_type: new.source.resource_type.clone(),
            source_resource_id: new.source.source_resource_id.clone(),
        }
    }
}

struct SeenVersion {
    version: i64,
    last_updated: i64,
    digest: [u8; 32],
}

struct VersionRow {
    meta: ResourceMeta,
    sealed: Vec<u8>,
}

/// A resource stored with each page of a write, in the same statements and under the
/// page's audit leaf: given the page's number and outcomes (before anything is written),
/// what to attach, e.g. the Provenance naming the versions the page wrote. A resource
/// attached to a page that wrote new versions must be named after them (a Provenance's id
/// is derived from its targets): it is then stored as new without being looked up.
pub type Attachment<'a> =
    dyn Fn(usize, &[(ResourceMeta, WriteOutcome)]) -> Result<Option<NewResource>> + Sync + 'a;

/// Decides, resource by resource, what a write stores: nothing (a source version seen
/// before), a new resource or its next version. Remembers what it placed, so a later copy
/// of the same resource in the write is its next version or unchanged.
struct Placing<'a> {
    known: &'a mut HashMap<Identity, (String, i64)>,
    seen: &'a mut HashMap<(String, String), SeenVersion>,
    keys: &'a HashMap<String, DataKey>,
    now: i64,
    rows: Vec<VersionRow>,
    page_rows: Vec<Vec<usize>>,
}

impl Placing<'_> {
    fn place(
        &mut self,
        page: usize,
        new: NewResource,
        ahead: SealedAhead,
    ) -> Result<(ResourceMeta, WriteOutcome)> {
        let digest = ahead.digest;
        let source_version = source_version_of(&new, &digest);
        let identity = Identity::of(&new);
        let (id, version, outcome, sealed) = match self.known.get(&identity) {
            Some((id, current)) => match self.seen.get(&(id.clone(), source_version.clone())) {
                Some(earlier) => {
                    let meta = meta_of(
                        &new,
                        id,
                        earlier.version,
                        &source_version,
                        earlier.last_updated,
                        earlier.digest,
                    );
                    return Ok((meta, WriteOutcome::Unchanged));
                }
                None => {
                    // Sealed ahead as new; a new version is bound to its own id and
                    // version, so it is sealed again here.
                    let (id, version) = (id.clone(), current + 1);
                    let key = self
                        .keys
                        .get(&new.patient_id)
                        .ok_or(Error::Crypto("data key vanished during the batch"))?;
                    let sealed = key.seal(&body_aad(&new.patient_id, &id, version), &new.body)?;
                    (id, version, WriteOutcome::NewVersion, sealed)
                }
            },
            None => (ahead.id, 1, WriteOutcome::Created, ahead.sealed),
        };
        self.known.insert(identity, (id.clone(), version));
        self.seen.insert(
            (id.clone(), source_version.clone()),
            SeenVersion {
                version,
                last_updated: self.now,
                digest,
            },
        );
        let meta = meta_of(&new, &id, version, &source_version, self.now, digest);
        self.page_rows[page].push(self.rows.len());
        self.rows.push(VersionRow {
            meta: meta.clone(),
            sealed,
        });
        Ok((meta, outcome))
    }
}

/// Bind parameters per multi-row statement: a group commit of pull pages (several hundred
/// resources) fits in one statement of each kind, since every statement is a hand-off to
/// the connection's thread. Both limits are far off: SQLite's 32,766 (bundled 3.46, whose
/// anonymous `?` cost nothing to resolve; see `row_placeholders`) and PostgreSQL's 65,535.
const PARAMS_PER_STATEMENT: usize = 8_000;

fn rows_per_statement(columns: usize) -> usize {
    (PARAMS_PER_STATEMENT / columns).max(1)
}

fn source_version_of(new: &NewResource, digest: &[u8; 32]) -> String {
    match &new.source.version_id {
        Some(v) => format!("version:{v}"),
        None => format!("sha256:{}", hex::encode(digest)),
    }
}

fn meta_of(
    new: &NewResource,
    id: &str,
    version: i64,
    source_version: &str,
    last_updated: i64,
    digest: [u8; 32],
) -> ResourceMeta {
    ResourceMeta {
        id: id.to_string(),
        version,
        patient_id: new.patient_id.clone(),
        resource_type: new.source.resource_type.clone(),
        category: new.category.clone(),
        source: new.source.source.clone(),
        source_resource_id: new.source.source_resource_id.clone(),
        source_version: source_version.to_string(),
        last_updated,
        digest,
    }
}

/// `(…), (…)` placeholders for the connection's engine (see `row_placeholders`).
fn placeholders(conn: &AnyConnection, rows: usize, columns: usize) -> String {
    super::row_placeholders(super::Engine::of_connection(conn), rows, columns)
}

/// The stored id and current version of every resource of the batch that exists already.
async fn find_existing(
    tx: &mut AnyConnection,
    batch: &[NewResource],
) -> Result<HashMap<Identity, (String, i64)>> {
    let mut identities: Vec<Identity> = batch.iter().map(Identity::of).collect();
    identities.sort_unstable();
    identities.dedup();
    let mut known = HashMap::new();
    for chunk in identities.chunks(rows_per_statement(4)) {
        let sql = format!(
            // A join on VALUES (not `IN (VALUES …)`) so SQLite uses the unique index.
            "SELECT r.id, r.current_version, r.patient_id, r.source, r.resource_type,
                 r.source_resource_id
             FROM (VALUES {}) AS v
             JOIN resources r ON r.patient_id = v.column1 AND r.source = v.column2
                 AND r.resource_type = v.column3 AND r.source_resource_id = v.column4",
            placeholders(tx, chunk.len(), 4)
        );
        let mut query = sqlx::query(&sql);
        for identity in chunk {
            query = query
                .bind(&identity.patient_id)
                .bind(&identity.source)
                .bind(&identity.resource_type)
                .bind(&identity.source_resource_id);
        }
        for row in query.fetch_all(&mut *tx).await? {
            let identity = Identity {
                patient_id: row.try_get(2)?,
                source: row.try_get(3)?,
                resource_type: row.try_get(4)?,
                source_resource_id: row.try_get(5)?,
            };
            known.insert(identity, (row.try_get(0)?, row.try_get(1)?));
        }
    }
    Ok(known)
}

/// Which of the batch's source versions are stored already, for existing resources.
async fn find_seen_versions(
    tx: &mut AnyConnection,
    batch: &[NewResource],
    digests: &[[u8; 32]],
    known: &HashMap<Identity, (String, i64)>,
) -> Result<HashMap<(String, String), SeenVersion>> {
    let mut wanted: Vec<(String, String)> = batch
        .iter()
        .zip(digests)
        .filter_map(|(new, digest)| {
            let (id, _) = known.get(&Identity::of(new))?;
            Some((id.clone(), source_version_of(new, digest)))
        })
        .collect();
    wanted.sort_unstable();
    wanted.dedup();
    let mut seen = HashMap::new();
    for chunk in wanted.chunks(rows_per_statement(2)) {
        let sql = format!(
            "SELECT rv.resource_id, rv.source_version, rv.version, rv.last_updated, rv.digest
             FROM (VALUES {}) AS v
             JOIN resource_versions rv ON rv.resource_id = v.column1
                 AND rv.source_version = v.column2",
            placeholders(tx, chunk.len(), 2)
        );
        let mut query = sqlx::query(&sql);
        for (id, source_version) in chunk {
            query = query.bind(id).bind(source_version);
        }
        for row in query.fetch_all(&mut *tx).await? {
            let digest: Vec<u8> = row.try_get(4)?;
            seen.insert(
                (row.try_get(0)?, row.try_get(1)?),
                SeenVersion {
                    version: row.try_get(2)?,
                    last_updated: row.try_get(3)?,
                    digest: digest
                        .try_into()
                        .map_err(|_| Error::Crypto("stored digest is not 32 bytes"))?,
                },
            );
        }
    }
    Ok(seen)
}

/// Creates new resources and moves existing ones to the newest version written here.
async fn upsert_resources(tx: &mut AnyConnection, rows: &[VersionRow]) -> Result<()> {
    // Only the last version written per resource decides its current state.
    let mut latest: HashMap<&str, &ResourceMeta> = HashMap::new();
    for row in rows {
        latest.insert(row.meta.id.as_str(), &row.meta);
    }
    let mut metas: Vec<&ResourceMeta> = latest.into_values().collect();
    metas.sort_unstable_by(|a, b| a.id.cmp(&b.id));
    for chunk in metas.chunks(rows_per_statement(8)) {
        let sql = format!(
            "INSERT INTO resources (id, patient_id, resource_type, category, source,
                 source_resource_id, current_version, last_updated)
             VALUES {}
             ON CONFLICT (id) DO UPDATE SET current_version = excluded.current_version,
                 last_updated = excluded.last_updated, category = excluded.category",
            placeholders(tx, chunk.len(), 8)
        );
        let mut query = sqlx::query(&sql);
        for meta in chunk {
            query = query
                .bind(&meta.id)
                .bind(&meta.patient_id)
                .bind(&meta.resource_type)
                .bind(&meta.category)
                .bind(&meta.source)
                .bind(&meta.source_resource_id)
                .bind(meta.version)
                .bind(meta.last_updated);
        }
        query.execute(&mut *tx).await?;
    }
    Ok(())
}

async fn insert_versions(
    tx: &mut AnyConnection,
    rows: impl Iterator<Item = &VersionRow>,
) -> Result<()> {
    let rows: Vec<&VersionRow> = rows.collect();
    for chunk in rows.chunks(rows_per_statement(7)) {
        let sql = format!(
            "INSERT INTO resource_versions (resource_id, version, patient_id, source_version,
                 digest, last_updated, body)
             VALUES {}",
            placeholders(tx, chunk.len(), 7)
        );
        let mut query = sqlx::query(&sql);
        for row in chunk {
            let meta = &row.meta;
            query = query
                .bind(&meta.id)
                .bind(meta.version)
                .bind(&meta.patient_id)
                .bind(&meta.source_version)
                .bind(meta.digest.to_vec())
                .bind(meta.last_updated)
                .bind(row.sealed.as_slice());
        }
        query.execute(&mut *tx).await?;
    }
    Ok(())
}

/// Binds a ciphertext to its row: moving it to another patient, resource or version breaks
/// decryption.
/// The audit leaf of one written page: every resource version it wrote, and the patient
/// when the page holds one patient's data.
fn write_event(
    agent: &Agent,
    rows: &[&VersionRow],
    outcomes: &[(ResourceMeta, WriteOutcome)],
    detail: Option<String>,
) -> AuditEvent {
    let created = outcomes
        .iter()
        .any(|(_, outcome)| *outcome == WriteOutcome::Created);
    let kind = if created {
        EventKind::Create
    } else {
        EventKind::Update
    };
    let mut patients: Vec<&str> = rows.iter().map(|r| r.meta.patient_id.as_str()).collect();
    patients.sort_unstable();
    patients.dedup();
    let mut event = AuditEvent::new(kind, agent.clone());
    if let Some(detail) = detail {
        event = event.detail(detail);
    }
    if let [patient] = patients.as_slice() {
        event = event.patient(*patient);
    }
    for row in rows {
        event = event.resource(row.meta.history_reference());
    }
    event
}

fn body_aad(patient_id: &str, id: &str, version: i64) -> Vec<u8> {
    format!("phr-gateway/resource/v1/{patient_id}/{id}/{version}").into_bytes()
}

fn decode_meta(row: &dyn RowValues) -> Result<ResourceMeta> {
    Ok(ResourceMeta {
        id: row.text(0)?,
        version: row.int(1)?,
        patient_id: row.text(2)?,
        resource_type: row.text(3)?,
        category: row.text(4)?,
        source: row.text(5)?,
        source_resource_id: row.text(6)?,
        source_version: row.text(7)?,
        last_updated: row.int(8)?,
        digest: row
            .blob(9)?
            .try_into()
            .map_err(|_| Error::Crypto("stored digest is not 32 bytes"))?,
    })
}

/// A row's metadata and its still sealed body.
fn sealed_row(row: &dyn RowValues) -> Result<(ResourceMeta, Vec<u8>)> {
    Ok((decode_meta(row)?, row.blob(10)?))
}

fn open_sealed(
    meta: ResourceMeta,
    sealed: &[u8],
    key: &DataKey,
    cap: usize,
) -> Result<StoredResource> {
    if sealed.len() > cap + 64 {
        return Err(Error::TooLarge {
            size: sealed.len(),
            limit: cap,
        });
    }
    let body = key.open(&body_aad(&meta.patient_id, &meta.id, meta.version), sealed)?;
    Ok(StoredResource { meta, body })
}

fn decode_row(row: &dyn RowValues, key: &DataKey, cap: usize) -> Result<StoredResource> {
    let (meta, sealed) = sealed_row(row)?;
    open_sealed(meta, &sealed, key, cap)
}
