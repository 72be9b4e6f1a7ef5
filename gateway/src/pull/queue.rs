//! Durable pull jobs. A worker claims a job with a lease and holds no transaction open while
//! it talks to the source; a job whose lease runs out (its worker died) is claimed again.
//! On PostgreSQL several gateway processes share the queue (`FOR UPDATE SKIP LOCKED`).

use std::time::Duration;

use sqlx::Row;

use crate::error::Result;
use crate::store::{now_millis, row_placeholders, Database, Engine};

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
        Ok(self
            .claim_all_in(conn, &[worker], lease)
            .await?
            .pop()
            .flatten())
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
        self.add_progress_all(conn, &[(job_id, worker, counts)])
            .await
    }

    /// `add_progress` for the jobs of a group commit, in one statement; `false` when any of
    /// them is no longer its worker's (the caller must roll back).
    pub async fn add_progress_all(
        &self,
        conn: &mut sqlx::AnyConnection,
        progress: &[(&str, &str, BatchCounts)],
    ) -> Result<bool> {
        if progress.is_empty() {
            return Ok(true);
        }
        let sql = format!(
            "UPDATE pull_jobs SET received = pull_jobs.received + v.column3,
                 unchanged = pull_jobs.unchanged + v.column4,
                 rejected = pull_jobs.rejected + v.column5, updated_at = v.column6
             FROM (VALUES {}) AS v
             WHERE pull_jobs.id = v.column1 AND pull_jobs.lease_owner = v.column2
               AND pull_jobs.status = 'running'",
            row_placeholders(self.db.engine(), progress.len(), 6)
        );
        let now = now_millis();
        let mut query = sqlx::query(&sql);
        for (job_id, worker, counts) in progress {
            query = query
                .bind(job_id.to_string())
                .bind(worker.to_string())
                .bind(counts.received)
                .bind(counts.unchanged)
                .bind(counts.rejected)
                .bind(now);
        }
        let updated = query.execute(&mut *conn).await?.rows_affected();
        Ok(updated == progress.len() as u64)
    }

    /// `finish_in` with `Done` for the jobs of a group commit (job, its worker, when its
    /// next pull is due), in two statements; `false` when any of them is no longer its
    /// worker's (the caller must roll back).
    pub async fn finish_done_all(
        &self,
        tx: &mut sqlx::AnyConnection,
        done: &[(&PullJob, &str, i64)],
    ) -> Result<bool> {
        if done.is_empty() {
            return Ok(true);
        }
        let engine = self.db.engine();
        let now = now_millis();
        let sql = format!(
            "UPDATE pull_jobs SET status = 'done', finished_at = v.column3, lease_owner = NULL,
                 lease_expires_at = NULL, updated_at = v.column3
             FROM (VALUES {}) AS v
             WHERE pull_jobs.id = v.column1 AND pull_jobs.lease_owner = v.column2",
            row_placeholders(engine, done.len(), 3)
        );
        let mut query = sqlx::query(&sql);
        for (job, worker, _) in done {
            query = query
                .bind(job.id.clone())
                .bind(worker.to_string())
                .bind(now);
        }
        if query.execute(&mut *tx).await?.rows_affected() != done.len() as u64 {
            return Ok(false);
        }
        // Each instruction's next (incremental) pull, if it is still active and nothing is
        // queued for it.
        let sql = format!(
            "INSERT INTO pull_jobs (id, instruction_id, patient_id, source_id, status, not_before,
                 created_at, updated_at)
             SELECT v.column1, v.column2, v.column3, v.column4, 'queued', v.column5, v.column6,
                 v.column6
             FROM (VALUES {}) AS v
             WHERE EXISTS (SELECT 1 FROM pull_instructions i
                           WHERE i.id = v.column2 AND i.status = 'active')
               AND NOT EXISTS (SELECT 1 FROM pull_jobs j WHERE j.instruction_id = v.column2
                               AND j.status IN ('queued', 'running'))",
            row_placeholders(engine, done.len(), 6)
        );
        let mut query = sqlx::query(&sql);
        for (job, _, next_at) in done {
            query = query
                .bind(uuid::Uuid::now_v7().to_string())
                .bind(job.instruction_id.clone())
                .bind(job.patient_id.clone())
                .bind(job.source_id.clone())
                .bind(*next_at)
                .bind(now);
        }
        query.execute(&mut *tx).await?;
        Ok(true)
    }

    /// `claim_in` for several workers at once, in one statement: each worker's claimed job,
    /// in the order given (`None` for a worker when fewer jobs are ready than workers).
    pub async fn claim_all_in(
        &self,
        conn: &mut sqlx::AnyConnection,
        workers: &[&str],
        lease: Duration,
    ) -> Result<Vec<Option<PullJob>>> {
        if workers.is_empty() {
            return Ok(Vec::new());
        }
        let now = now_millis();
        let lock = match self.db.engine() {
            Engine::Postgres => "FOR UPDATE SKIP LOCKED",
            Engine::Sqlite => "",
        };
        // The ready jobs, oldest first, numbered to pair them with the workers. The times
        // and the count are our own integers, written into the statement; only the workers'
        // ids are bound.
        let sql = format!(
            "WITH ready AS (SELECT id, not_before FROM pull_jobs
                            WHERE (status = 'queued' AND not_before <= {now})
                               OR (status = 'running' AND lease_expires_at < {now})
                            ORDER BY not_before, id LIMIT {count} {lock}),
                  numbered AS (SELECT id, row_number() OVER (ORDER BY not_before, id) AS n
                               FROM ready),
                  claimants AS (SELECT column1 AS n, column2 AS worker FROM (VALUES {values}) AS w)
             UPDATE pull_jobs SET status = 'running', lease_owner = claimants.worker,
                 lease_expires_at = {expires}, attempts = pull_jobs.attempts + 1,
                 updated_at = {now}
             FROM numbered JOIN claimants ON claimants.n = numbered.n
             WHERE pull_jobs.id = numbered.id
             RETURNING pull_jobs.id, pull_jobs.instruction_id, pull_jobs.patient_id,
                 pull_jobs.source_id, pull_jobs.attempts, pull_jobs.lease_owner",
            count = workers.len(),
            expires = now + lease.as_millis() as i64,
            values = row_placeholders(self.db.engine(), workers.len(), 2),
        );
        let mut query = sqlx::query(&sql);
        for (n, worker) in workers.iter().enumerate() {
            query = query.bind(n as i64 + 1).bind(worker.to_string());
        }
        let mut claimed: Vec<Option<PullJob>> = vec![None; workers.len()];
        for row in query.fetch_all(&mut *conn).await? {
            let owner: String = row.try_get(5)?;
            if let Some(slot) = workers.iter().position(|w| *w == owner) {
                claimed[slot] = Some(PullJob {
                    id: row.try_get(0)?,
                    instruction_id: row.try_get(1)?,
                    patient_id: row.try_get(2)?,
                    source_id: row.try_get(3)?,
                    attempts: row.try_get(4)?,
                });
            }
        }
        Ok(claimed)
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
        if let (JobOutcome::Done, Some(at)) = (outcome, next_at) {
            return self.finish_done_all(tx, &[(job, worker, at)]).await;
        }
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
