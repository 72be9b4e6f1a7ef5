//! Durable pull jobs. A worker claims a job with a lease and holds no transaction open while
//! it talks to the source; a job whose lease runs out (its worker died) is claimed again.
//! On PostgreSQL several gateway processes share the queue (`FOR UPDATE SKIP LOCKED`).

use std::time::Duration;

use sqlx::Row;

use crate::error::Result;
use crate::store::{now_millis, Database, Engine};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullJob {
    pub id: String,
    pub instruction_id: String,
    pub patient_id: String,
    pub source_id: String,
    pub attempts: i64,
}

/// A job as the patient sees it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct JobProgress {
    pub id: String,
    pub status: String,
    pub attempts: i64,
    pub received: i64,
    pub unchanged: i64,
    pub rejected: i64,
    pub last_error: Option<String>,
    pub not_before: i64,
    pub created_at: i64,
    pub finished_at: Option<i64>,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobOutcome {
    Done,
    /// Transient failure: queue again, not before `at` (unix ms).
    Retry {
        at: i64,
        error: String,
    },
    Failed {
        error: String,
    },
    /// The instruction was withdrawn meanwhile.
    Cancelled,
}

/// Counts from one stored batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchCounts {
    pub received: i64,
    pub unchanged: i64,
    pub rejected: i64,
}

#[derive(Clone)]
pub struct JobQueue {
    db: Database,
}

impl JobQueue {
    pub fn new(db: Database) -> Self {
        JobQueue { db }
    }

    /// Queues a pull for the instruction unless one is already queued or running.
    pub async fn enqueue(
        &self,
        conn: &mut sqlx::AnyConnection,
        instruction_id: &str,
        patient_id: &str,
        source_id: &str,
        not_before: i64,
    ) -> Result<Option<String>> {
        let pending = sqlx::query(
            "SELECT id FROM pull_jobs WHERE instruction_id = $1 AND status IN ('queued', 'running')",
        )
        .bind(instruction_id)
        .fetch_optional(&mut *conn)
        .await?;
        if pending.is_some() {
            return Ok(None);
        }
        let id = uuid::Uuid::now_v7().to_string();
        let now = now_millis();
        sqlx::query(
            "INSERT INTO pull_jobs (id, instruction_id, patient_id, source_id, status, not_before,
                 created_at, updated_at)
             VALUES ($1, $2, $3, $4, 'queued', $5, $6, $6)",
        )
        .bind(&id)
        .bind(instruction_id)
        .bind(patient_id)
        .bind(source_id)
        .bind(not_before)
        .bind(now)
        .execute(&mut *conn)
        .await?;
        Ok(Some(id))
    }

    /// Claims the next ready job (queued and due, or running with an expired lease).
    pub async fn claim(&self, worker: &str, lease: Duration) -> Result<Option<PullJob>> {
        let mut conn = self.db.write_pool().acquire().await?;
        self.claim_in(&mut conn, worker, lease).await
    }

    /// `claim`, inside the caller's transaction (a worker finishing one job claims its next
    /// in the same commit).
    pub async fn claim_in(
        &self,
        conn: &mut sqlx::AnyConnection,
        worker: &str,
        lease: Duration,
    ) -> Result<Option<PullJob>> {
        let now = now_millis();
        let lock = match self.db.engine() {
            Engine::Postgres => "FOR UPDATE SKIP LOCKED",
            Engine::Sqlite => "",
        };
        let sql = format!(
            "UPDATE pull_jobs SET status = 'running', lease_owner = $1, lease_expires_at = $2,
                 attempts = attempts + 1, updated_at = $3
             WHERE id = (SELECT id FROM pull_jobs
                         WHERE (status = 'queued' AND not_before <= $3)
                            OR (status = 'running' AND lease_expires_at < $3)
                         ORDER BY not_before, id LIMIT 1 {lock})
             RETURNING id, instruction_id, patient_id, source_id, attempts"
        );
        let row = sqlx::query(&sql)
            .bind(worker)
            .bind(now + lease.as_millis() as i64)
            .bind(now)
            .fetch_optional(conn)
            .await?;
        Ok(match row {
            Some(row) => Some(PullJob {
                id: row.try_get(0)?,
                instruction_id: row.try_get(1)?,
                patient_id: row.try_get(2)?,
                source_id: row.try_get(3)?,
                attempts: row.try_get(4)?,
            }),
            None => None,
        })
    }

    /// Extends the lease; `false` when this worker no longer holds the job.
    pub async fn renew(&self, job_id: &str, worker: &str, lease: Duration) -> Result<bool> {
        let now = now_millis();
        let updated = sqlx::query(
            "UPDATE pull_jobs SET lease_expires_at = $1, updated_at = $2
             WHERE id = $3 AND lease_owner = $4 AND status = 'running'",
        )
        .bind(now + lease.as_millis() as i64)
        .bind(now)
        .bind(job_id)
        .bind(worker)
        .execute(self.db.write_pool())
        .await?
        .rows_affected();
        Ok(updated == 1)
    }

    /// Adds a stored batch's counts, inside the caller's transaction; `false` when the lease
    /// was lost (the caller must stop).
    pub async fn add_progress(
        &self,
        conn: &mut sqlx::AnyConnection,
        job_id: &str,
        worker: &str,
        counts: BatchCounts,
    ) -> Result<bool> {
        let updated = sqlx::query(
            "UPDATE pull_jobs SET received = received + $1, unchanged = unchanged + $2,
                 rejected = rejected + $3, updated_at = $4
             WHERE id = $5 AND lease_owner = $6 AND status = 'running'",
        )
        .bind(counts.received)
        .bind(counts.unchanged)
        .bind(counts.rejected)
        .bind(now_millis())
        .bind(job_id)
        .bind(worker)
        .execute(conn)
        .await?
        .rows_affected();
        Ok(updated == 1)
    }

    /// Records an item the pull could not store, with its reason.
    pub async fn record_item_error(
        &self,
        conn: &mut sqlx::AnyConnection,
        job_id: &str,
        resource_type: Option<&str>,
        source_resource_id: Option<&str>,
        reason: &str,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO pull_item_errors (job_id, at, resource_type, source_resource_id, reason)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(job_id)
        .bind(now_millis())
        .bind(resource_type.map(str::to_string))
        .bind(source_resource_id.map(str::to_string))
        .bind(reason)
        .execute(conn)
        .await?;
        Ok(())
    }

    /// Ends this worker's run of the job; when it is done and `next_at` is given, queues the
    /// instruction's next (incremental) pull in the same transaction, if the instruction is
    /// still active. Nothing happens if the job is no longer this worker's.
    pub async fn finish(
        &self,
        job: &PullJob,
        worker: &str,
        outcome: &JobOutcome,
        next_at: Option<i64>,
    ) -> Result<()> {
        let mut tx = self.db.begin().await?;
        self.finish_in(&mut tx, job, worker, outcome, next_at)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// `finish`, inside the caller's transaction (with the job's last page). `false` when
    /// the job is no longer this worker's.
    pub async fn finish_in(
        &self,
        tx: &mut sqlx::AnyConnection,
        job: &PullJob,
        worker: &str,
        outcome: &JobOutcome,
        next_at: Option<i64>,
    ) -> Result<bool> {
        let now = now_millis();
        let (status, not_before, error, finished) = match outcome {
            JobOutcome::Done => ("done", None, None, Some(now)),
            JobOutcome::Retry { at, error } => ("queued", Some(*at), Some(error.clone()), None),
            JobOutcome::Failed { error } => ("failed", None, Some(error.clone()), Some(now)),
            JobOutcome::Cancelled => ("cancelled", None, None, Some(now)),
        };
        let updated = sqlx::query(
            "UPDATE pull_jobs SET status = $1, not_before = COALESCE($2, not_before),
                 last_error = COALESCE($3, last_error), finished_at = $4, lease_owner = NULL,
                 lease_expires_at = NULL, updated_at = $5
             WHERE id = $6 AND lease_owner = $7",
        )
        .bind(status)
        .bind(not_before)
        .bind(error)
        .bind(finished)
        .bind(now)
        .bind(&job.id)
        .bind(worker)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if let (1, JobOutcome::Done, Some(at)) = (updated, outcome, next_at) {
            sqlx::query(
                "INSERT INTO pull_jobs (id, instruction_id, patient_id, source_id, status, not_before,
                     created_at, updated_at)
                 SELECT $1, $2, $3, $4, 'queued', $5, $6, $6
                 WHERE EXISTS (SELECT 1 FROM pull_instructions WHERE id = $2 AND status = 'active')
                   AND NOT EXISTS (SELECT 1 FROM pull_jobs WHERE instruction_id = $2
                                   AND status IN ('queued', 'running'))",
            )
            .bind(uuid::Uuid::now_v7().to_string())
            .bind(&job.instruction_id)
            .bind(&job.patient_id)
            .bind(&job.source_id)
            .bind(at)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        Ok(updated == 1)
    }

    /// Gives a claimed job back untouched (a worker stopping before it began the job).
    pub async fn release(&self, job: &PullJob, worker: &str) -> Result<()> {
        sqlx::query(
            "UPDATE pull_jobs SET status = 'queued', lease_owner = NULL, lease_expires_at = NULL,
                 attempts = attempts - 1, updated_at = $1
             WHERE id = $2 AND lease_owner = $3 AND status = 'running'",
        )
        .bind(now_millis())
        .bind(&job.id)
        .bind(worker)
        .execute(self.db.write_pool())
        .await?;
        Ok(())
    }

    /// Cancels every queued or running job of an instruction (withdrawal), in the caller's
    /// transaction. A running worker notices at its next batch.
    pub async fn cancel_instruction(
        &self,
        conn: &mut sqlx::AnyConnection,
        instruction_id: &str,
    ) -> Result<u64> {
        let now = now_millis();
        Ok(sqlx::query(
            "UPDATE pull_jobs SET status = 'cancelled', lease_owner = NULL, lease_expires_at = NULL,
                 finished_at = $1, updated_at = $1
             WHERE instruction_id = $2 AND status IN ('queued', 'running')",
        )
        .bind(now)
        .bind(instruction_id)
        .execute(conn)
        .await?
        .rows_affected())
    }

    /// The instruction's jobs, newest first.
    pub async fn progress(&self, instruction_id: &str) -> Result<Vec<JobProgress>> {
        let rows = sqlx::query(
            "SELECT id, status, attempts, received, unchanged, rejected, last_error, not_before,
                 created_at, finished_at
             FROM pull_jobs WHERE instruction_id = $1 ORDER BY created_at DESC, id DESC",
        )
        .bind(instruction_id)
        .fetch_all(self.db.read_pool())
        .await?;
        rows.iter()
            .map(|row| {
                Ok(JobProgress {
                    id: row.try_get(0)?,
                    status: row.try_get(1)?,
                    attempts: row.try_get(2)?,
                    received: row.try_get(3)?,
                    unchanged: row.try_get(4)?,
                    rejected: row.try_get(5)?,
                    last_error: row.try_get(6)?,
                    not_before: row.try_get(7)?,
                    created_at: row.try_get(8)?,
                    finished_at: row.try_get(9)?,
                })
            })
            .collect()
    }
}
