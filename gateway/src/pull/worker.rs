//! The pull worker: claims a job, pulls from its source page by page, stores each page as
//! one batch (one audit leaf), then moves the instruction's cursor. A crash between storing
//! and moving the cursor only means the page is fetched again, and the idempotent store
//! keeps it exactly once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use phr_adapters::codesystem::normalize_json_bytes;
use phr_adapters::{PullBatch, PullItem, PullRequest, SourceError};
use phr_consent::DataCategory;
use rand::Rng;
use tokio::sync::watch;
use tracing::Instrument;

use super::instructions::{Instruction, InstructionStatus, Instructions};
use super::page_commit::{LastPage, PageCommits, PageOutcome, PendingPage, Refusal};
use super::queue::{JobOutcome, JobQueue, PullJob};
use super::registry::{mark_available, mark_unavailable, SourceInfo, SourceRegistry};
use crate::audit::{Agent, AuditLog};
use crate::checkups;
use crate::error::Result;
use crate::store::now_millis;
use crate::store::resources::{NewResource, ResourceStore, SealedBatch, SourceIdentity};
use crate::tasks::AbortOnDrop;

/// Timing of the worker; defaults suit production, tests shorten them.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub lease: Duration,
    pub poll: Duration,
    /// After a successful pull, the next incremental one is due this much later.
    pub refresh_interval: Duration,
    /// Upper bound of the backoff between retries of an unavailable source.
    pub max_backoff: Duration,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        WorkerSettings {
            lease: Duration::from_secs(60),
            poll: Duration::from_secs(1),
            refresh_interval: Duration::from_secs(24 * 60 * 60),
            max_backoff: Duration::from_secs(60 * 60),
        }
    }
}

#[derive(Clone)]
pub struct PullWorker {
    pub id: String,
    pub queue: JobQueue,
    pub instructions: Instructions,
    pub resources: ResourceStore,
    pub registry: Arc<SourceRegistry>,
    pub audit: AuditLog,
    pub settings: WorkerSettings,
    /// The job claimed in the commit that finished the previous one (saves a commit per
    /// job when the queue is busy); taken by the next `run_once`.
    pub claimed_ahead: Arc<std::sync::Mutex<Option<PullJob>>>,
    /// Where pages wait for the writer, shared by the process's workers (group commit).
    pub page_commits: Arc<PageCommits>,
}

/// How one claimed job ended, as far as this worker knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunResult {
    Finished(JobOutcome),
    /// Another worker holds the job now (our lease ran out) or it was cancelled.
    LeaseLost,
}

impl PullWorker {
    pub fn worker_id() -> String {
        format!(
            "worker-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        )
    }

    /// Claims and runs jobs until `shutdown`.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        loop {
            if *shutdown.borrow() {
                self.release_claimed_ahead().await;
                return;
            }
            match self.run_once().await {
                Ok(Some(_)) => continue,
                Ok(None) => {}
                Err(e) => tracing::error!(error = %e, "pull worker pass failed"),
            }
            tokio::select! {
                _ = tokio::time::sleep(self.settings.poll) => {}
                _ = shutdown.changed() => {
                    self.release_claimed_ahead().await;
                    return;
                }
            }
        }
    }

    /// Hands a job claimed ahead back to the queue, so nobody waits for its lease.
    async fn release_claimed_ahead(&self) {
        let job = self.take_claimed_ahead();
        if let Some(job) = job {
            if let Err(e) = self.queue.release(&job, &self.id).await {
                tracing::warn!(error = %e, job = %job.id, "could not release a claimed job");
            }
        }
    }

    fn take_claimed_ahead(&self) -> Option<PullJob> {
        self.claimed_ahead
            .lock()
            .map(|mut ahead| ahead.take())
            .unwrap_or_default()
    }

    /// Claims one ready job and runs it; `None` when nothing was ready.
    pub async fn run_once(&self) -> Result<Option<(PullJob, RunResult)>> {
        let job = match self.take_claimed_ahead() {
            Some(job) => job,
            None => match self.queue.claim(&self.id, self.settings.lease).await? {
                Some(job) => job,
                None => return Ok(None),
            },
        };
        let lost = Arc::new(AtomicBool::new(false));
        // Aborted when this future ends or is dropped, so a dead run stops renewing.
        let _heartbeat = AbortOnDrop(tokio::spawn(keep_lease(
            self.queue.clone(),
            job.id.clone(),
            self.id.clone(),
            self.settings.lease,
            lost.clone(),
        )));
        let result = self.run_job(&job, &lost).await;
        let (result, finished) = match result {
            Ok(run) => run,
            Err(e) => (
                RunResult::Finished(JobOutcome::Retry {
                    at: now_millis() + self.backoff(job.attempts).as_millis() as i64,
                    error: e.to_string(),
                }),
                false,
            ),
        };
        if let (RunResult::Finished(outcome), false) = (&result, finished) {
            self.queue
                .finish(&job, &self.id, outcome, Some(self.next_pull_at()))
                .await?;
        }
        self.audit.notify();
        Ok(Some((job, result)))
    }

    fn next_pull_at(&self) -> i64 {
        now_millis() + self.settings.refresh_interval.as_millis() as i64
    }

    /// Runs the job; the flag says whether its end was already committed (with its last
    /// page), so the caller need not finish it.
    async fn run_job(&self, job: &PullJob, lost: &AtomicBool) -> Result<(RunResult, bool)> {
        let unfinished = |result| Ok((RunResult::Finished(result), false));
        let instruction = self
            .instructions
            .get(&job.instruction_id)
            .instrument(tracing::debug_span!("pull_setup"))
            .await?;
        if instruction.status != InstructionStatus::Active {
            return unfinished(JobOutcome::Cancelled);
        }
        let (info, source) = match self.registry.get(&job.source_id) {
            Ok((info, source)) => (info.clone(), source),
            Err(_) => {
                return unfinished(JobOutcome::Failed {
                    error: format!("source {} is no longer configured", job.source_id),
                })
            }
        };
        let Some(credentials) = self.instructions.credentials(&instruction).await? else {
            return unfinished(JobOutcome::Failed {
                error: "the source link has no credentials".into(),
            });
        };
        let request = PullRequest {
            instruction_id: instruction.id.clone(),
            credentials,
            cursor: self.instructions.cursor(&instruction.id).await?,
            resource_types: instruction.resource_types(),
        };
        let stream = match source
            .pull(request)
            .instrument(tracing::debug_span!("pull_start"))
            .await
        {
            Ok(stream) => stream,
            Err(e) => {
                let result = self.on_source_error(job, &instruction, &info, e).await?;
                return Ok((result, false));
            }
        };
        // Each page is stored once the next one has arrived, so the last page, the job's
        // end and the claim of the next job commit together.
        let mut held: Option<PullBatch> = None;
        // The source is read ahead on a task of its own (fetching, parsing and checking the
        // next page) while this one stores the current page, so the two use both cores.
        let (pages, mut incoming) = tokio::sync::mpsc::channel(2);
        let _reader = AbortOnDrop(tokio::spawn(async move {
            let mut stream = stream;
            while let Some(batch) = stream.next().await {
                let failed = batch.is_err();
                if pages.send(batch).await.is_err() || failed {
                    break;
                }
            }
        }));
        while let Some(batch) = incoming
            .recv()
            .instrument(tracing::debug_span!("pull_wait_page"))
            .await
        {
            if lost.load(Ordering::SeqCst) {
                return Ok((RunResult::LeaseLost, false));
            }
            match batch {
                Ok(batch) => {
                    if let Some(previous) = held.replace(batch) {
                        if !self
                            .store_batch(job, &instruction, &info, previous, false)
                            .await?
                        {
                            return Ok((RunResult::LeaseLost, false));
                        }
                    }
                }
                Err(e) => {
                    if let Some(previous) = held.take() {
                        if !self
                            .store_batch(job, &instruction, &info, previous, false)
                            .await?
                        {
                            return Ok((RunResult::LeaseLost, false));
                        }
                    }
                    let result = self.on_source_error(job, &instruction, &info, e).await?;
                    return Ok((result, false));
                }
            }
        }
        let Some(last) = held else {
            mark_available(self.queue_db(), &info.id).await?;
            return unfinished(JobOutcome::Done);
        };
        if !self
            .store_batch(job, &instruction, &info, last, true)
            .await?
        {
            return Ok((RunResult::LeaseLost, false));
        }
        Ok((RunResult::Finished(JobOutcome::Done), true))
    }

    /// Stores one page; `false` when the job is no longer ours (lease lost or withdrawn).
    /// With `last`, the job ends as done in the same commit, and the worker's next job is
    /// claimed in it too.
    async fn store_batch(
        &self,
        job: &PullJob,
        instruction: &Instruction,
        source: &SourceInfo,
        batch: PullBatch,
        last: bool,
    ) -> Result<bool> {
        let PreparedPage { accepted, refused } = {
            let (resources, items) = (self.resources.clone(), batch.items);
            let (patient_id, categories) = (
                instruction.patient_id.clone(),
                instruction.categories.clone(),
            );
            let source_id = source.id.clone();
            // Normalising, checking and converting a page is CPU work: on the blocking pool,
            // so the async workers stay free for the transactions waiting on them.
            tokio::task::spawn_blocking(move || {
                prepare_page(items, &patient_id, &categories, &source_id, &resources)
            })
            .instrument(tracing::debug_span!("pull_prepare"))
            .await
            .map_err(|e| {
                crate::error::Error::Invalid(format!("a page could not be prepared: {e}"))
            })?
        };

        let keys = self
            .resources
            .data_keys_for(&accepted)
            .instrument(tracing::debug_span!("pull_keys"))
            .await?;
        // Hashed and encrypted before the transaction, so the single writer is held only
        // for the statements.
        let accepted = {
            let keys = keys.clone();
            tokio::task::spawn_blocking(move || SealedBatch::seal(accepted, &keys))
                .instrument(tracing::debug_span!("pull_seal"))
                .await
                .map_err(|e| {
                    crate::error::Error::Invalid(format!("a page could not be sealed: {e}"))
                })??
        };
        let page = PendingPage {
            job: job.clone(),
            instruction: instruction.clone(),
            source: source.clone(),
            worker: self.id.clone(),
            accepted,
            keys,
            refused,
            cursor: batch.cursor,
            refreshed_credentials: batch.refreshed_credentials,
            last: last.then(|| LastPage {
                next_pull_at: self.next_pull_at(),
                lease: self.settings.lease,
            }),
        };
        match self.page_commits.write(self, page).await? {
            PageOutcome::LeaseLost => Ok(false),
            PageOutcome::Stored { claimed } => {
                if let Some(next) = claimed {
                    if let Ok(mut ahead) = self.claimed_ahead.lock() {
                        *ahead = Some(next);
                    }
                }
                Ok(true)
            }
        }
    }

    async fn on_source_error(
        &self,
        job: &PullJob,
        instruction: &Instruction,
        source: &SourceInfo,
        error: SourceError,
    ) -> Result<RunResult> {
        let outcome = match &error {
            SourceError::Unavailable {
                reason,
                retry_after,
            } => {
                mark_unavailable(self.queue_db(), &source.id, reason).await?;
                let wait = retry_after
                    .unwrap_or_default()
                    .max(self.backoff(job.attempts));
                JobOutcome::Retry {
                    at: now_millis() + wait.as_millis() as i64,
                    error: error.to_string(),
                }
            }
            SourceError::Unauthorized(_) | SourceError::LinkageExpired(_) => {
                // The link stopped working: the patient has to authorise again.
                let reason = match &error {
                    SourceError::LinkageExpired(_) => format!(
                        "連携期間が終了しました。もう一度指示してください / the linkage period \
                         ended; give the instruction again to link anew ({error})"
                    ),
                    _ => format!("link no longer works: {error}"),
                };
                self.instructions
                    .fail(&Agent::system(), instruction, &reason)
                    .await?;
                JobOutcome::Failed {
                    error: error.to_string(),
                }
            }
            _ => JobOutcome::Failed {
                error: error.to_string(),
            },
        };
        Ok(RunResult::Finished(outcome))
    }

    /// Exponential with jitter, from 5 s, capped.
    fn backoff(&self, attempts: i64) -> Duration {
        let exp = attempts.clamp(1, 16) as u32 - 1;
        let base = Duration::from_secs(5).saturating_mul(1u32 << exp.min(12));
        let capped = base.min(self.settings.max_backoff);
        let jitter = rand::thread_rng().gen_range(0.8..1.2);
        capped.mul_f64(jitter)
    }

    fn queue_db(&self) -> &crate::store::Database {
        self.resources.database()
    }
}

/// A page made ready to store: the resources to keep, and the items refused.
struct PreparedPage {
    accepted: Vec<NewResource>,
    refused: Vec<Refusal>,
}

/// Keeps what the patient instructed, in one canonical form of code systems, each checked
/// for the store; a 特定健診 CDA also becomes its checkup report Bundle. No I/O.
fn prepare_page(
    items: Vec<PullItem>,
    patient_id: &str,
    categories: &[DataCategory],
    source_id: &str,
    resources: &ResourceStore,
) -> PreparedPage {
    let mut accepted = Vec::new();
    let mut refused: Vec<Refusal> = Vec::new();
    for item in items {
        match item {
            PullItem::Resource(resource) => {
                let Some(category) = DataCategory::of_resource_type(&resource.resource_type) else {
                    refused.push((
                        Some(resource.resource_type),
                        Some(resource.source_resource_id),
                        "resource type not covered by any category".into(),
                    ));
                    continue;
                };
                // Only what the patient instructed is kept.
                if !categories.contains(&category) {
                    refused.push((
                        Some(resource.resource_type),
                        Some(resource.source_resource_id),
                        format!("category {} was not instructed", category.code()),
                    ));
                    continue;
                }
                // One canonical form for code systems (OID or URL as received).
                let body = match normalize_json_bytes(&resource.body) {
                    Ok((normalized, _)) => normalized.into_owned(),
                    Err(e) => {
                        refused.push((
                            Some(resource.resource_type),
                            Some(resource.source_resource_id),
                            format!("not JSON: {e}"),
                        ));
                        continue;
                    }
                };
                let new = NewResource {
                    patient_id: patient_id.to_string(),
                    category: category.code().into(),
                    source: SourceIdentity {
                        source: source_id.to_string(),
                        resource_type: resource.resource_type.clone(),
                        source_resource_id: resource.source_resource_id.clone(),
                        version_id: resource.version_id.clone(),
                    },
                    body,
                };
                if let Err(e) = resources.validate(&new) {
                    refused.push((
                        Some(resource.resource_type),
                        Some(resource.source_resource_id),
                        e.to_string(),
                    ));
                    continue;
                }
                // A 特定健診 CDA also becomes its checkup report Bundle (stored once per
                // checkup, whoever sends it); the DocumentReference keeps the original.
                if resource.resource_type == "DocumentReference" {
                    if let Some(xml) = checkups::cda_of_document_reference(&new.body) {
                        match checkups::convert(patient_id, &xml) {
                            Ok(checkup) => {
                                for error in checkup.item_errors {
                                    refused.push((
                                        Some("Observation".into()),
                                        Some(resource.source_resource_id.clone()),
                                        format!("特定健診 result left out: {error}"),
                                    ));
                                }
                                accepted.push(checkup.resource);
                            }
                            Err(e) => refused.push((
                                Some("Bundle".into()),
                                Some(resource.source_resource_id.clone()),
                                format!("特定健診 CDA not converted: {e}"),
                            )),
                        }
                    }
                }
                accepted.push(new);
            }
            PullItem::Rejected {
                resource_type,
                source_resource_id,
                reason,
            } => {
                refused.push((resource_type, source_resource_id, reason));
            }
            PullItem::TypeNotGranted { resource_type } => {
                refused.push((
                    Some(resource_type),
                    None,
                    "the source did not grant this type".into(),
                ));
            }
        }
    }
    PreparedPage { accepted, refused }
}

/// Renews the lease every third of its length; flags `lost` if the job is no longer ours.
async fn keep_lease(
    queue: JobQueue,
    job_id: String,
    worker: String,
    lease: Duration,
    lost: Arc<AtomicBool>,
) {
    loop {
        tokio::time::sleep(lease / 3).await;
        match queue.renew(&job_id, &worker, lease).await {
            Ok(true) => {}
            Ok(false) => {
                lost.store(true, Ordering::SeqCst);
                return;
            }
            Err(e) => tracing::warn!(error = %e, job = %job_id, "lease renewal failed"),
        }
    }
}
