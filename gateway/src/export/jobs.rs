//! Bulk Data export jobs: kicked off by a recipient's backend, claimed with a lease by any
//! gateway process, run patient by patient with the patient's consent decided per resource
//! type at that moment, written as sealed NDJSON chunks, served until they expire. A job
//! cancelled (by the client, or because a patient withdrew meanwhile) loses its output.

use std::collections::BTreeMap;
use std::time::Duration;

use phr_consent::{DataCategory, Recipient, Requested};
use serde_json::{json, Value};
use sqlx::Row;
use time::OffsetDateTime;

use super::request::ExportParameters;
use crate::audit::{self, Agent, AuditEvent, EventKind};
use crate::consents::{decide_under_consent, ConsentOutcome, Consents};
use crate::error::{Error, Result};
use crate::fhir::matching::matches;
use crate::fhir::serve::{serve_all, serve_lines, served_patient};
use crate::keystore::KeyStore;
use crate::store::resources::{ResourceStore, StoredResource, UpdatedRange};
use crate::store::{now_millis, Database, Engine};
use crate::tasks::AbortOnDrop;
use phr_consent::Consent;

/// Lines per sealed chunk.
const CHUNK_LINES: usize = 1_000;
/// Resources read per step.
const PAGE: usize = 500;
/// Room for what serving adds to a stored body (id, meta), so a page's buffer is sized once.
const SERVED_EXTRA: usize = 160;
/// Pages served ahead of the writer.
const SERVED_AHEAD: usize = 4;
/// Patients between progress commits (and ownership checks).
const PROGRESS_EVERY: usize = 100;
/// The name of the file listing what was deleted or withdrawn since `_since`.
pub const DELETED_FILE: &str = "deleted";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportStatus {
    Queued,
    Running,
    Done,
    Failed,
    Cancelled,
}

impl ExportStatus {
    fn parse(code: &str) -> Result<Self> {
        Ok(match code {
            "queued" => ExportStatus::Queued,
            "running" => ExportStatus::Running,
            "done" => ExportStatus::Done,
            "failed" => ExportStatus::Failed,
            "cancelled" => ExportStatus::Cancelled,
            other => return Err(Error::Invalid(format!("unknown export status {other:?}"))),
        })
    }
}

#[derive(Debug, Clone)]
pub struct ExportJob {
    pub id: String,
    pub client_id: String,
    pub request_url: String,
    pub parameters: ExportParameters,
    pub status: ExportStatus,
    pub patients_total: Option<i64>,
    pub patients_done: i64,
    pub error: Option<String>,
    pub transaction_time: i64,
    pub expires_at: Option<i64>,
    pub last_polled_at: Option<i64>,
}

/// One output file of a finished job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputFile {
    /// A resource type, or [`DELETED_FILE`].
    pub file: String,
    pub count: i64,
}

#[derive(Clone)]
pub struct ExportJobs {
    db: Database,
    keys: KeyStore,
    resources: ResourceStore,
    consents: Consents,
    /// How long finished files are served.
    pub file_lifetime: Duration,
    pub lease: Duration,
}

const SELECT_JOB: &str = "SELECT id, client_id, request_url, parameters, status, patients_total,
        patients_done, error, transaction_time, expires_at, last_polled_at FROM export_jobs";

impl ExportJobs {
    pub fn new(
        db: Database,
        keys: KeyStore,
        resources: ResourceStore,
        consents: Consents,
        file_lifetime: Duration,
    ) -> Self {
        ExportJobs {
            db,
            keys,
            resources,
            consents,
            file_lifetime,
            lease: Duration::from_secs(60),
        }
    }

    /// Queues an export for `client_id`; audited.
    pub async fn kick_off(
        &self,
        agent: &Agent,
        client_id: &str,
        kind: &str,
        group_id: Option<&str>,
        request_url: &str,
        parameters: &ExportParameters,
    ) -> Result<String> {
        let id = uuid::Uuid::now_v7().to_string();
        let now = now_millis();
        let mut tx = self.db.begin().await?;
        sqlx::query(
            "INSERT INTO export_jobs (id, client_id, kind, group_id, request_url, parameters, status,
                 transaction_time, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, 'queued', $7, $7, $7)",
        )
        .bind(&id)
        .bind(client_id)
        .bind(kind)
        .bind(group_id.map(str::to_string))
        .bind(request_url)
        .bind(serde_json::to_string(parameters).map_err(|e| Error::Invalid(e.to_string()))?)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let event = AuditEvent::new(EventKind::Export, agent.clone()).detail(format!(
            "bulk export {id} requested by {client_id}: {request_url}"
        ));
        audit::record(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(id)
    }

    /// The client's job; another client's (or an unknown) job is "not found".
    pub async fn get(&self, id: &str, client_id: &str) -> Result<ExportJob> {
        let row = sqlx::query(&format!("{SELECT_JOB} WHERE id = $1 AND client_id = $2"))
            .bind(id)
            .bind(client_id)
            .fetch_optional(self.db.read_pool())
            .await?
            .ok_or_else(|| Error::NotFound(format!("export {id}")))?;
        decode_job(&row)
    }

    /// Records a status poll; the previous poll's time.
    pub async fn note_poll(&self, id: &str) -> Result<Option<i64>> {
        let previous: Option<i64> =
            sqlx::query_scalar("SELECT last_polled_at FROM export_jobs WHERE id = $1")
                .bind(id)
                .fetch_optional(self.db.read_pool())
                .await?
                .flatten();
        sqlx::query("UPDATE export_jobs SET last_polled_at = $1 WHERE id = $2")
            .bind(now_millis())
            .bind(id)
            .execute(self.db.write_pool())
            .await?;
        Ok(previous)
    }

    /// Cancels a job and forgets its output (client's DELETE, or a withdrawal).
    pub async fn cancel(&self, agent: &Agent, job: &ExportJob, reason: &str) -> Result<()> {
        let mut tx = self.db.begin().await?;
        sqlx::query(
            "UPDATE export_jobs SET status = 'cancelled', error = $1, lease_owner = NULL, updated_at = $2
             WHERE id = $3",
        )
        .bind(reason)
        .bind(now_millis())
        .bind(&job.id)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM export_chunks WHERE job_id = $1")
            .bind(&job.id)
            .execute(&mut *tx)
            .await?;
        let event = AuditEvent::new(EventKind::Export, agent.clone())
            .detail(format!("bulk export {} cancelled: {reason}", job.id));
        audit::record(&mut tx, &event).await?;
        tx.commit().await?;
        self.keys.shred(&self.db, &job_key_id(&job.id)).await?;
        Ok(())
    }

    /// The files of a finished job.
    pub async fn outputs(&self, job_id: &str) -> Result<Vec<OutputFile>> {
        let rows = sqlx::query(
            "SELECT file, CAST(SUM(lines) AS BIGINT) FROM export_chunks WHERE job_id = $1
             GROUP BY file ORDER BY file",
        )
        .bind(job_id)
        .fetch_all(self.db.read_pool())
        .await?;
        rows.iter()
            .map(|row| {
                Ok(OutputFile {
                    file: row.try_get(0)?,
                    count: row.try_get(1)?,
                })
            })
            .collect()
    }

    /// A file's NDJSON as a stream, one chunk fetched and decrypted at a time (memory stays
    /// bounded by the chunk size).
    pub async fn file_stream(
        &self,
        job_id: &str,
        file: &str,
    ) -> Result<impl futures::Stream<Item = Result<Vec<u8>>> + Send + 'static> {
        let seqs: Vec<i64> = sqlx::query_scalar(
            "SELECT seq FROM export_chunks WHERE job_id = $1 AND file = $2 ORDER BY seq",
        )
        .bind(job_id)
        .bind(file)
        .fetch_all(self.db.read_pool())
        .await?;
        if seqs.is_empty() {
            return Err(Error::NotFound(format!("export file {file}")));
        }
        let key = self.keys.data_key(&job_key_id(job_id)).await?;
        let pool = self.db.read_pool().clone();
        let (job_id, file) = (job_id.to_string(), file.to_string());
        Ok(async_stream::try_stream! {
            for seq in seqs {
                let sealed: Vec<u8> = sqlx::query_scalar(
                    "SELECT sealed FROM export_chunks WHERE job_id = $1 AND file = $2 AND seq = $3",
                )
                .bind(&job_id)
                .bind(&file)
                .bind(seq)
                .fetch_one(&pool)
                .await?;
                yield key.open(&chunk_aad(&job_id, &file, seq), &sealed)?;
            }
        })
    }

    /// Stops every unfinished export of `client_id` and forgets its output: a patient
    /// withdrew or changed a consent, and nothing gathered under the old terms may leave.
    pub async fn stop_for_client_in(
        conn: &mut sqlx::AnyConnection,
        client_id: &str,
    ) -> Result<u64> {
        let stopped = sqlx::query(
            "UPDATE export_jobs SET status = 'failed', lease_owner = NULL, updated_at = $1,
                 error = 'a patient withdrew or changed a consent during the export; start a new export'
             WHERE client_id = $2 AND status IN ('queued', 'running')",
        )
        .bind(now_millis())
        .bind(client_id)
        .execute(&mut *conn)
        .await?
        .rows_affected();
        if stopped > 0 {
            sqlx::query(
                "DELETE FROM export_chunks WHERE job_id IN
                     (SELECT id FROM export_jobs WHERE client_id = $1 AND status = 'failed')",
            )
            .bind(client_id)
            .execute(&mut *conn)
            .await?;
        }
        Ok(stopped)
    }

    /// Claims the oldest ready job (or one whose lease ran out).
    pub async fn claim(&self, worker: &str) -> Result<Option<ExportJob>> {
        let now = now_millis();
        let lock = match self.db.engine() {
            Engine::Postgres => "FOR UPDATE SKIP LOCKED",
            Engine::Sqlite => "",
        };
        let id: Option<String> = sqlx::query_scalar(&format!(
            "UPDATE export_jobs SET status = 'running', lease_owner = $1, lease_expires_at = $2,
                 updated_at = $3
             WHERE id = (SELECT id FROM export_jobs
                         WHERE status = 'queued' OR (status = 'running' AND lease_expires_at < $3)
                         ORDER BY created_at, id LIMIT 1 {lock})
             RETURNING id"
        ))
        .bind(worker)
        .bind(now + self.lease.as_millis() as i64)
        .bind(now)
        .fetch_optional(self.db.write_pool())
        .await?;
        let Some(id) = id else { return Ok(None) };
        let row = sqlx::query(&format!("{SELECT_JOB} WHERE id = $1"))
            .bind(&id)
            .fetch_one(self.db.read_pool())
            .await?;
        Ok(Some(decode_job(&row)?))
    }

    /// Runs one claimed job to its end (or until it is cancelled or the lease is lost).
    pub async fn run(&self, worker: &str, job: &ExportJob) -> Result<ExportStatus> {
        // A job picked up again after a crash starts over.
        sqlx::query("DELETE FROM export_chunks WHERE job_id = $1")
            .bind(&job.id)
            .execute(self.db.write_pool())
            .await?;
        let patients: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT patient_id FROM consents
             WHERE recipient = $1 AND status = 'active' ORDER BY patient_id",
        )
        .bind(&job.client_id)
        .fetch_all(self.db.read_pool())
        .await?;
        sqlx::query("UPDATE export_jobs SET patients_total = $1 WHERE id = $2")
            .bind(patients.len() as i64)
            .bind(&job.id)
            .execute(self.db.write_pool())
            .await?;
        let (key, _) = self.keys.data_key_or_create(&job_key_id(&job.id)).await?;
        let mut output = Output::new(&job.id);
        let total = patients.len();
        // Patients are read and served (decrypted, parsed, references resolved) on one
        // task while their lines are written (serialised, sealed, stored) on this one, so
        // the two halves run on two cores; a few pages ahead at most keeps memory bounded.
        let (sender, mut served) = tokio::sync::mpsc::channel(SERVED_AHEAD);
        let reader = AbortOnDrop(tokio::spawn(self.clone().read_patients(
            job.clone(),
            worker.to_string(),
            patients,
            sender,
        )));
        // Audit leaves and progress go out every PROGRESS_EVERY patients (one commit each
        // time), always before the job is done, i.e. before any file can be fetched.
        let mut pending_events: Vec<AuditEvent> = Vec::new();
        while let Some(item) = served.recv().await {
            match item {
                Served::Lines {
                    resource_type,
                    ndjson,
                    lines,
                } => {
                    self.db.fault_point("export.write_lines")?;
                    output
                        .lines(&resource_type, &ndjson, lines, &key, &self.db)
                        .await?;
                }
                Served::PatientDone { index, event } => {
                    pending_events.extend(event);
                    if (index + 1) % PROGRESS_EVERY == 0 || index + 1 == total {
                        self.record_progress(
                            &job.id,
                            worker,
                            index as i64 + 1,
                            &mut pending_events,
                        )
                        .await?;
                    }
                }
            }
        }
        let read = reader
            .finish()
            .await
            .map_err(|e| Error::Invalid(format!("the export's reader did not finish: {e}")))??;
        if read == Read::NotOurs {
            return Ok(ExportStatus::Cancelled);
        }
        if let Some(since) = job.parameters.since {
            for patient_id in self.ended_since(&job.client_id, since).await? {
                let deletion = json!({
                    "resourceType": "Bundle",
                    "type": "transaction",
                    "entry": [{"request": {"method": "DELETE", "url": format!("Patient/{patient_id}")}}],
                });
                output.line(DELETED_FILE, &deletion, &key, &self.db).await?;
            }
        }
        output.flush_all(&key, &self.db).await?;
        if !self.still_ours(&job.id, worker).await? {
            return Ok(ExportStatus::Cancelled);
        }
        let now = now_millis();
        let finished = sqlx::query(
            "UPDATE export_jobs SET status = 'done', finished_at = $1, expires_at = $2, lease_owner = NULL,
                 updated_at = $1 WHERE id = $3 AND lease_owner = $4 AND status = 'running'",
        )
        .bind(now)
        .bind(now + self.file_lifetime.as_millis() as i64)
        .bind(&job.id)
        .bind(worker)
        .execute(self.db.write_pool())
        .await?
        .rows_affected();
        Ok(if finished == 1 {
            ExportStatus::Done
        } else {
            ExportStatus::Cancelled
        })
    }

    /// Reads and serves each patient's permitted resources, page by page, for `run` to
    /// write; ends early when the job is no longer this worker's, or when `run` stopped.
    async fn read_patients(
        self,
        job: ExportJob,
        worker: String,
        patients: Vec<String>,
        out: tokio::sync::mpsc::Sender<Served>,
    ) -> Result<Read> {
        let agent = Agent::client(&job.client_id);
        let recipient = Recipient::client(&job.client_id);
        let updated = UpdatedRange {
            from: job.parameters.since,
            to: Some(job.transaction_time),
        };
        let mut run_consents = std::collections::HashMap::new();
        let mut next_page: Option<PageAhead> = None;
        for (done, patient_id) in patients.iter().enumerate() {
            if done % PROGRESS_EVERY == 0 {
                if !self.still_ours(&job.id, &worker).await? {
                    return Ok(Read::NotOurs);
                }
                // The consents of the next run of patients in one query. A withdrawal or
                // an amendment after this read stops the whole job and deletes its files
                // (see `stop_for_client_in`), so nothing it withholds can leave.
                let run = &patients[done..(done + PROGRESS_EVERY).min(patients.len())];
                if let (Some(first), Some(last)) = (run.first(), run.last()) {
                    run_consents = self
                        .consents
                        .active_for_recipient_between(&job.client_id, first, last)
                        .await?;
                    // And their data keys, rather than one key store read per patient.
                    let run: Vec<&str> = run.iter().map(String::as_str).collect();
                    self.keys.warm(&run).await?;
                }
            }
            // This patient's first page, if it was read while the previous one was served.
            let mut ready = next_page.take();
            let consents = run_consents.remove(patient_id).unwrap_or_default();
            let now = OffsetDateTime::now_utc();
            let permitted = |resource_type: &str| {
                permitting_consent(&consents, patient_id, &recipient, resource_type, now)
            };
            // The next patient's first page is read (on another task) while this one is
            // served: with many small patients, that query's round trip was a third of the
            // time. Only within a run, whose consents are read already, and only a type
            // the next patient's consent permits.
            if let Some(next) = patients
                .get(done + 1)
                .filter(|_| (done + 1) % PROGRESS_EVERY != 0)
            {
                let first_type = run_consents.get(next).and_then(|next_consents| {
                    job.parameters.types.iter().find(|t| {
                        t.as_str() != "Patient"
                            && permitting_consent(next_consents, next, &recipient, t, now).is_some()
                    })
                });
                if let Some(resource_type) = first_type {
                    next_page = Some(PageAhead::read(
                        &self.resources,
                        next,
                        resource_type,
                        None,
                        updated,
                    ));
                }
            }
            let mut exported = 0usize;
            let mut exported_types: Vec<&str> = Vec::new();
            let mut under = Vec::new();
            for resource_type in &job.parameters.types {
                let Some(consent_id) = permitted(resource_type) else {
                    continue;
                };
                if !under.contains(&consent_id) {
                    under.push(consent_id);
                }
                let filters = job.parameters.filters_of(resource_type);
                let keep = |resource: &Value| {
                    filters.is_empty()
                        || filters.iter().any(|f| matches(resource_type, resource, f))
                };
                // Resources served as trees, as lines: only what the type's filters keep.
                let kept_lines = |resources: Vec<Value>| -> Result<(Vec<u8>, usize)> {
                    let mut ndjson = Vec::new();
                    let mut lines = 0;
                    for resource in resources.iter().filter(|r| keep(r)) {
                        serde_json::to_writer(&mut ndjson, resource)
                            .map_err(|e| Error::Invalid(e.to_string()))?;
                        ndjson.push(b'\n');
                        lines += 1;
                    }
                    Ok((ndjson, lines))
                };
                // A page as the writer gets it, counted for the patient's audit leaf.
                let mut page_of = |(ndjson, lines): (Vec<u8>, usize)| {
                    if lines > 0 {
                        exported += lines;
                        if !exported_types.contains(&resource_type.as_str()) {
                            exported_types.push(resource_type);
                        }
                    }
                    Served::Lines {
                        resource_type: resource_type.clone(),
                        ndjson,
                        lines,
                    }
                };
                if resource_type == "Patient" {
                    if let Some((patient, _)) = served_patient(&self.resources, patient_id).await? {
                        if out.send(page_of(kept_lines(vec![patient])?)).await.is_err() {
                            return Ok(Read::Stopped);
                        }
                    }
                    continue;
                }
                let mut after: Option<String> = None;
                // The patient's next page of the type is read (on another task) while this
                // one is served, so the database and the serving overlap.
                let mut page_ahead: Option<PageAhead> = None;
                loop {
                    let read_ahead = page_ahead.take().or_else(|| {
                        ready.take_if(|first| {
                            after.is_none()
                                && first.patient_id == *patient_id
                                && first.resource_type == *resource_type
                        })
                    });
                    let page = match read_ahead {
                        Some(ahead) => ahead.rows().await,
                        None => {
                            self.resources
                                .page_current(
                                    patient_id,
                                    &[resource_type.as_str()],
                                    &updated,
                                    after.as_deref(),
                                    PAGE,
                                )
                                .await
                        }
                    };
                    let rows = match page {
                        Ok(rows) => rows,
                        Err(Error::KeyMissing(_)) => Vec::new(),
                        Err(other) => return Err(other),
                    };
                    let Some(last) = rows.last() else { break };
                    after = Some(last.meta.id.clone());
                    let full = rows.len() >= PAGE;
                    if full {
                        page_ahead = Some(PageAhead::read(
                            &self.resources,
                            patient_id,
                            resource_type,
                            after.clone(),
                            updated,
                        ));
                    }
                    // Without filters, nothing needs the resources as trees: they are
                    // served straight from their stored bytes.
                    let page = if filters.is_empty() {
                        let room = rows.iter().map(|r| r.body.len() + SERVED_EXTRA).sum();
                        let mut ndjson = Vec::with_capacity(room);
                        serve_lines(&self.resources, patient_id, &rows, &mut ndjson).await?;
                        (ndjson, rows.len())
                    } else {
                        kept_lines(serve_all(&self.resources, patient_id, &rows).await?)?
                    };
                    if out.send(page_of(page)).await.is_err() {
                        return Ok(Read::Stopped);
                    }
                    if !full {
                        break;
                    }
                }
            }
            let event = (exported > 0).then(|| {
                let mut event = AuditEvent::new(EventKind::Export, agent.clone())
                    .patient(patient_id)
                    .detail(format!("bulk export {}: {exported} resources", job.id));
                if let Some(consent_id) = under.first() {
                    event = event.consent(consent_id.clone());
                }
                // The types disclosed (what the patient's access log shows as categories).
                for resource_type in &exported_types {
                    event = event.resource(resource_type.to_string());
                }
                event
            });
            let patient_done = Served::PatientDone { index: done, event };
            if out.send(patient_done).await.is_err() {
                return Ok(Read::Stopped);
            }
        }
        Ok(Read::Finished)
    }

    /// Claims and runs one job; `None` when none was ready.
    pub async fn run_once(&self, worker: &str) -> Result<Option<ExportStatus>> {
        let Some(job) = self.claim(worker).await? else {
            return Ok(None);
        };
        match self.run(worker, &job).await {
            Ok(ExportStatus::Cancelled) => {
                self.keys.shred(&self.db, &job_key_id(&job.id)).await?;
                sqlx::query("DELETE FROM export_chunks WHERE job_id = $1")
                    .bind(&job.id)
                    .execute(self.db.write_pool())
                    .await?;
                Ok(Some(ExportStatus::Cancelled))
            }
            Ok(status) => Ok(Some(status)),
            Err(error) => {
                sqlx::query(
                    "UPDATE export_jobs SET status = 'failed', error = $1, lease_owner = NULL WHERE id = $2",
                )
                .bind(error.to_string())
                .bind(&job.id)
                .execute(self.db.write_pool())
                .await?;
                Ok(Some(ExportStatus::Failed))
            }
        }
    }

    /// Runs jobs until `shutdown`; also forgets expired output.
    pub async fn work(self, worker: String, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        loop {
            match self.run_once(&worker).await {
                Ok(Some(_)) => continue,
                Ok(None) => {}
                Err(error) => tracing::warn!(%error, "export worker pass failed"),
            }
            if let Err(error) = self.forget_expired().await {
                tracing::warn!(%error, "forgetting expired exports failed");
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Deletes the output (and key) of expired jobs and of failed ones.
    pub async fn forget_expired(&self) -> Result<u64> {
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT j.id FROM export_jobs j JOIN export_chunks c ON c.job_id = j.id
             WHERE (j.status = 'done' AND j.expires_at < $1) OR j.status IN ('failed', 'cancelled')",
        )
        .bind(now_millis())
        .fetch_all(self.db.read_pool())
        .await?;
        for id in &ids {
            sqlx::query("DELETE FROM export_chunks WHERE job_id = $1")
                .bind(id)
                .execute(self.db.write_pool())
                .await?;
            self.keys.shred(&self.db, &job_key_id(id)).await?;
        }
        Ok(ids.len() as u64)
    }

    /// Writes the pending audit leaves, the progress and a renewed lease in one commit.
    async fn record_progress(
        &self,
        job_id: &str,
        worker: &str,
        patients_done: i64,
        events: &mut Vec<AuditEvent>,
    ) -> Result<()> {
        let mut tx = self.db.begin().await?;
        audit::record_all(&mut tx, events).await?;
        events.clear();
        sqlx::query(
            "UPDATE export_jobs SET patients_done = $1, lease_expires_at = $2 WHERE id = $3 AND lease_owner = $4",
        )
        .bind(patients_done)
        .bind(now_millis() + self.lease.as_millis() as i64)
        .bind(job_id)
        .bind(worker)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn still_ours(&self, job_id: &str, worker: &str) -> Result<bool> {
        let owner: Option<String> = sqlx::query_scalar(
            "SELECT id FROM export_jobs WHERE id = $1 AND status = 'running' AND lease_owner = $2",
        )
        .bind(job_id)
        .bind(worker)
        .fetch_optional(self.db.read_pool())
        .await?;
        Ok(owner.is_some())
    }

    /// Patients whose consents to `client_id` all ended (withdrawn, or the record erased)
    /// since `since`.
    async fn ended_since(&self, client_id: &str, since: i64) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT DISTINCT patient_id FROM consents c
             WHERE recipient = $1 AND status = 'inactive' AND updated_at >= $2
               AND NOT EXISTS (SELECT 1 FROM consents a WHERE a.patient_id = c.patient_id
                               AND a.recipient = c.recipient AND a.status = 'active')
             ORDER BY patient_id",
        )
        .bind(client_id)
        .bind(since)
        .fetch_all(self.db.read_pool())
        .await?)
    }
}

/// The types a set of system scopes lets a client export (each category's types).
pub fn exportable_types() -> Vec<&'static str> {
    DataCategory::ALL
        .iter()
        .flat_map(|c| c.resource_types().iter().copied())
        .collect()
}

fn job_key_id(job_id: &str) -> String {
    format!("export:{job_id}")
}

fn chunk_aad(job_id: &str, file: &str, seq: i64) -> Vec<u8> {
    format!("phr-gateway/export/v1/{job_id}/{file}/{seq}").into_bytes()
}

/// NDJSON being written: a buffer per file, sealed and stored once it holds [`CHUNK_LINES`]
/// lines (a chunk ends at a page's end).
struct Output {
    job_id: String,
    files: BTreeMap<String, (Vec<u8>, usize, i64)>,
}

impl Output {
    fn new(job_id: &str) -> Self {
        Output {
            job_id: job_id.to_string(),
            files: BTreeMap::new(),
        }
    }

    async fn line(
        &mut self,
        file: &str,
        resource: &Value,
        key: &crate::crypto::DataKey,
        db: &Database,
    ) -> Result<()> {
        let mut line = serde_json::to_vec(resource).map_err(|e| Error::Invalid(e.to_string()))?;
        line.push(b'\n');
        self.lines(file, &line, 1, key, db).await
    }

    /// `lines` whole lines (each ended by a line break); a chunk is sealed once it holds
    /// at least [`CHUNK_LINES`].
    async fn lines(
        &mut self,
        file: &str,
        ndjson: &[u8],
        lines: usize,
        key: &crate::crypto::DataKey,
        db: &Database,
    ) -> Result<()> {
        let entry = self.files.entry(file.to_string()).or_default();
        entry.0.extend_from_slice(ndjson);
        entry.1 += lines;
        if entry.1 >= CHUNK_LINES {
            let (buffer, lines, seq) = std::mem::take(entry);
            entry.2 = seq + 1;
            store_chunk(db, key, &self.job_id, file, seq, lines, &buffer).await?;
        }
        Ok(())
    }

    async fn flush_all(&mut self, key: &crate::crypto::DataKey, db: &Database) -> Result<()> {
        for (file, (buffer, lines, seq)) in std::mem::take(&mut self.files) {
            if lines > 0 {
                store_chunk(db, key, &self.job_id, &file, seq, lines, &buffer).await?;
            }
        }
        Ok(())
    }
}

async fn store_chunk(
    db: &Database,
    key: &crate::crypto::DataKey,
    job_id: &str,
    file: &str,
    seq: i64,
    lines: usize,
    ndjson: &[u8],
) -> Result<()> {
    let sealed = key.seal(&chunk_aad(job_id, file, seq), ndjson)?;
    sqlx::query(
        "INSERT INTO export_chunks (job_id, file, seq, lines, sealed) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(job_id)
    .bind(file)
    .bind(seq)
    .bind(lines as i64)
    .bind(sealed)
    .execute(db.write_pool())
    .await?;
    Ok(())
}

fn decode_job(row: &sqlx::any::AnyRow) -> Result<ExportJob> {
    let parameters: String = row.try_get(3)?;
    Ok(ExportJob {
        id: row.try_get(0)?,
        client_id: row.try_get(1)?,
        request_url: row.try_get(2)?,
        parameters: serde_json::from_str(&parameters)
            .map_err(|e| Error::Invalid(format!("export parameters: {e}")))?,
        status: ExportStatus::parse(&row.try_get::<String, _>(4)?)?,
        patients_total: row.try_get(5)?,
        patients_done: row.try_get(6)?,
        error: row.try_get(7)?,
        transaction_time: row.try_get(8)?,
        expires_at: row.try_get(9)?,
        last_polled_at: row.try_get(10)?,
    })
}

/// The consent among `consents` that permits `resource_type` for the recipient now.
fn permitting_consent(
    consents: &[Consent],
    patient_id: &str,
    recipient: &Recipient,
    resource_type: &str,
    now: OffsetDateTime,
) -> Option<String> {
    consents.iter().find_map(|consent| {
        match decide_under_consent(
            Some(consent),
            patient_id,
            recipient,
            Requested::ResourceType(resource_type),
            now,
        ) {
            ConsentOutcome::Permit { consent_id, .. } => Some(consent_id),
            ConsentOutcome::Deny { .. } => None,
        }
    })
}

/// What an export's reader hands its writer.
enum Served {
    /// Resources of one type, served and filtered, as NDJSON lines.
    Lines {
        resource_type: String,
        ndjson: Vec<u8>,
        lines: usize,
    },
    /// The patient (the `index`th of the job) is complete; the audit leaf of what was
    /// disclosed, if anything was.
    PatientDone {
        index: usize,
        event: Option<AuditEvent>,
    },
}

/// How an export's reader ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Read {
    Finished,
    /// The job is no longer this worker's (cancelled, or its lease lost).
    NotOurs,
    /// The writer stopped (it failed): its error is the job's.
    Stopped,
}

/// A patient's page of one type (after `after`, or the first), being read ahead on a task
/// of its own.
struct PageAhead {
    patient_id: String,
    resource_type: String,
    page: AbortOnDrop<Result<Vec<StoredResource>>>,
}

impl PageAhead {
    /// Starts reading the patient's page of the type.
    fn read(
        resources: &ResourceStore,
        patient_id: &str,
        resource_type: &str,
        after: Option<String>,
        updated: UpdatedRange,
    ) -> PageAhead {
        let (resources, patient, wanted) = (
            resources.clone(),
            patient_id.to_string(),
            resource_type.to_string(),
        );
        let page = tokio::spawn(async move {
            resources
                .page_current(&patient, &[&wanted], &updated, after.as_deref(), PAGE)
                .await
        });
        PageAhead {
            patient_id: patient_id.to_string(),
            resource_type: resource_type.to_string(),
            page: AbortOnDrop(page),
        }
    }

    async fn rows(self) -> Result<Vec<StoredResource>> {
        self.page
            .finish()
            .await
            .map_err(|e| Error::Invalid(format!("a page read ahead did not finish: {e}")))?
    }
}
