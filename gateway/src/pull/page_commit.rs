//! Group commit of pull pages. SQLite has a single writer and every commit is an fsync, so
//! when several workers have a page ready at once, the pages are written in one transaction
//! with the same few multi-row statements: the first worker to take the writer writes every
//! page waiting, and the others get their page's outcome from it. Each page keeps its own
//! audit leaf, Provenance, progress and cursor. If the shared transaction fails, or a job
//! in it is no longer its worker's, each page is written again on its own, so one page's
//! fault touches only its own job.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use phr_adapters::LinkCredentials;
use tracing::Instrument;

use super::instructions::Instruction;
use super::queue::{BatchCounts, PullJob};
use super::registry::{mark_available_in, SourceInfo};
use super::worker::PullWorker;
use crate::audit::{self, Agent, AuditEvent, EventKind, Outcome};
use crate::checkups;
use crate::crypto::DataKey;
use crate::error::{Error, Result};
use crate::group_commit::GroupCommit;
use crate::medications;
use crate::provenance::{provenance_for, Origin};
use crate::store::reconciliation;
use crate::store::resources::{NewResource, ResourceMeta, SealedBatch, WriteOutcome};

/// An item refused from a page: its type and source id where known, and why.
pub(super) type Refusal = (Option<String>, Option<String>, String);

/// A page prepared and sealed by a worker, ready for the writer.
#[derive(Clone)]
pub(super) struct PendingPage {
    pub job: PullJob,
    pub instruction: Instruction,
    pub source: SourceInfo,
    /// The worker that holds the job's lease.
    pub worker: String,
    pub accepted: SealedBatch,
    pub keys: HashMap<String, DataKey>,
    pub refused: Vec<Refusal>,
    pub cursor: String,
    pub refreshed_credentials: Option<LinkCredentials>,
    /// The job's last page: the job ends as done in the same commit, and the worker's next
    /// job is claimed in it too.
    pub last: Option<LastPage>,
}

/// What the last page of a job also commits.
#[derive(Clone)]
pub(super) struct LastPage {
    /// When the next incremental pull is due.
    pub next_pull_at: i64,
    /// The lease of the next job claimed for the worker.
    pub lease: Duration,
}

/// How a page's write ended for its worker.
#[derive(Debug)]
pub(super) enum PageOutcome {
    /// Stored; with the worker's next job when the page was its job's last.
    Stored { claimed: Option<PullJob> },
    /// The job is no longer this worker's (lease lost or withdrawn): nothing was written.
    LeaseLost,
}

/// The pages waiting for the writer, shared by the workers of one process.
#[derive(Default)]
pub struct PageCommits {
    group: GroupCommit<PendingPage, Result<PageOutcome>>,
    counts: Arc<Counters>,
}

#[derive(Default)]
struct Counters {
    commits: AtomicU64,
    pages: AtomicU64,
}

impl Counters {
    fn add(&self, pages: usize) {
        self.commits.fetch_add(1, Ordering::Relaxed);
        self.pages.fetch_add(pages as u64, Ordering::Relaxed);
    }
}

/// Pages stored and the commits that stored them, since the process started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitCounts {
    pub commits: u64,
    pub pages: u64,
}

impl PageCommits {
    /// Writes the page, in a transaction it may share with other workers' pages.
    pub(super) async fn write(
        &self,
        worker: &PullWorker,
        page: PendingPage,
    ) -> Result<PageOutcome> {
        let (worker, counts) = (worker.clone(), self.counts.clone());
        self.group
            .submit(page, move |pages| async move {
                let db = worker.resources.database().clone();
                let size = pages.len();
                let written = db
                    .run_group_commit(async move { write_group(&worker, &counts, pages).await })
                    .await;
                // Only when the writer thread itself failed: nothing was committed.
                written.unwrap_or_else(|_| {
                    (0..size)
                        .map(|_| Err(Error::Database(sqlx::Error::WorkerCrashed)))
                        .collect()
                })
            })
            .instrument(tracing::debug_span!("pull_wait_writer"))
            .await
            .unwrap_or_else(|| {
                Err(Error::Invalid(
                    "the page's writer stopped before answering".into(),
                ))
            })
    }

    /// Pages stored and commits made so far.
    pub fn counts(&self) -> CommitCounts {
        CommitCounts {
            commits: self.counts.commits.load(Ordering::Relaxed),
            pages: self.counts.pages.load(Ordering::Relaxed),
        }
    }

    /// Pages waiting for the writer now.
    pub fn waiting(&self) -> usize {
        self.group.waiting()
    }

    /// Test hook: holds the writer until the guard is dropped, so pages gather.
    #[doc(hidden)]
    pub async fn hold_writer(&self) -> tokio::sync::OwnedMutexGuard<()> {
        self.group.hold().await
    }
}

/// Writes a group of pages; each page's outcome, in order.
async fn write_group(
    worker: &PullWorker,
    counts: &Counters,
    pages: Vec<PendingPage>,
) -> Vec<Result<PageOutcome>> {
    if pages.len() > 1 {
        // Kept for writing one by one should the shared transaction not commit.
        let shared = pages.clone();
        match write_pages(worker, shared).await {
            Ok(Written::Stored(claimed)) => {
                counts.add(claimed.len());
                return claimed
                    .into_iter()
                    .map(|claimed| Ok(PageOutcome::Stored { claimed }))
                    .collect();
            }
            Ok(Written::LeaseLost) => {}
            Err(e) => tracing::warn!(
                error = %e,
                "a shared pull commit failed; writing its pages one by one"
            ),
        }
    }
    let mut outcomes = Vec::with_capacity(pages.len());
    for page in pages {
        outcomes.push(write_alone(worker, counts, page).await);
    }
    outcomes
}

async fn write_alone(
    worker: &PullWorker,
    counts: &Counters,
    page: PendingPage,
) -> Result<PageOutcome> {
    Ok(match write_pages(worker, vec![page]).await? {
        Written::Stored(mut claimed) => {
            counts.add(1);
            PageOutcome::Stored {
                claimed: claimed.pop().flatten(),
            }
        }
        Written::LeaseLost => PageOutcome::LeaseLost,
    })
}

enum Written {
    /// Committed; each page's next claimed job, in order.
    Stored(Vec<Option<PullJob>>),
    /// A page's job is no longer its worker's; nothing was committed.
    LeaseLost,
}

/// The pages, their Provenances, each job's progress and cursor (and, on a last page, the
/// job's end and the worker's next claim) in one transaction.
async fn write_pages(worker: &PullWorker, mut pages: Vec<PendingPage>) -> Result<Written> {
    let mut tx = worker
        .resources
        .database()
        .begin()
        .instrument(tracing::debug_span!("pull_begin"))
        .await?;
    // Everything from here to the commit holds the database's single writer (SQLite).
    // The span is only timed (created here, closed when this function returns), not
    // entered: a bench can see how long the writer is held.
    let _transaction = tracing::debug_span!("pull_transaction");
    let agent = Agent::system();
    for page in &mut pages {
        // A dispensing another source already delivered is stored onto the same resource.
        medications::reconcile_in(&mut tx, &mut page.accepted.resources).await?;
        for checkup in page
            .accepted
            .resources
            .iter()
            .filter(|new| new.source.source == checkups::CHECKUP_SOURCE)
        {
            reconciliation::record_origin_in(
                &mut tx,
                &checkup.patient_id,
                &checkup.source.resource_type,
                &checkup.source.source_resource_id,
                &page.source.id,
            )
            .await?;
        }
    }
    let mut keys = HashMap::new();
    let mut batches = Vec::with_capacity(pages.len());
    for page in &mut pages {
        keys.extend(page.keys.iter().map(|(k, v)| (k.clone(), v.clone())));
        let detail = format!(
            "pull job {} from source {} (instruction {})",
            page.job.id, page.source.id, page.instruction.id
        );
        batches.push((std::mem::take(&mut page.accepted), Some(detail)));
    }
    // Each page's Provenance goes into the same statements as the page, under its leaf.
    let provenance = |page: usize, written: &[(ResourceMeta, WriteOutcome)]| {
        provenance_of(&pages[page], written)
    };
    let written = worker
        .resources
        .put_sealed_pages_in(&mut tx, &agent, batches, &keys, Some(&provenance))
        .instrument(tracing::debug_span!("pull_tx_page"))
        .await?;

    let announced: Vec<(&str, &[(ResourceMeta, WriteOutcome)])> = pages
        .iter()
        .zip(&written)
        .map(|(page, written)| (page.instruction.patient_id.as_str(), written.as_slice()))
        .collect();
    crate::notifications::announce_written_all(&mut tx, &announced)
        .instrument(tracing::debug_span!("pull_tx_announce"))
        .await?;

    // The jobs' bookkeeping, one statement for all pages where it can be: with small jobs
    // (a page each) it was most of the group's statements.
    let progress: Vec<(&str, &str, BatchCounts)> = pages
        .iter()
        .zip(&written)
        .map(|(page, written)| {
            let mut counts = BatchCounts {
                rejected: page.refused.len() as i64,
                ..BatchCounts::default()
            };
            for (_, outcome) in written {
                match outcome {
                    WriteOutcome::Unchanged => counts.unchanged += 1,
                    _ => counts.received += 1,
                }
            }
            (page.job.id.as_str(), page.worker.as_str(), counts)
        })
        .collect();
    if !worker.queue.add_progress_all(&mut tx, &progress).await? {
        return Ok(Written::LeaseLost);
    }
    for page in &pages {
        record_refusals(worker, &mut tx, page).await?;
    }
    let cursors: Vec<_> = pages
        .iter()
        .map(|page| {
            (
                &page.instruction,
                page.cursor.as_str(),
                page.refreshed_credentials.as_ref(),
            )
        })
        .collect();
    worker.instructions.advance_all(&mut tx, &cursors).await?;

    let last: Vec<(&PendingPage, &LastPage)> = pages
        .iter()
        .filter_map(|page| page.last.as_ref().map(|last| (page, last)))
        .collect();
    // The sources answered to the end: no longer "unavailable since …" (in this commit,
    // rather than waiting for the writer on their own).
    let mut answered: Vec<&str> = last
        .iter()
        .map(|(page, _)| page.source.id.as_str())
        .collect();
    answered.sort_unstable();
    answered.dedup();
    for source_id in answered {
        mark_available_in(&mut tx, source_id).await?;
    }
    let done: Vec<(&PullJob, &str, i64)> = last
        .iter()
        .map(|(page, last)| (&page.job, page.worker.as_str(), last.next_pull_at))
        .collect();
    if !worker.queue.finish_done_all(&mut tx, &done).await? {
        return Ok(Written::LeaseLost);
    }
    // Each finishing worker's next job, claimed in the same commit: one statement per
    // lease length (one, unless workers of different settings share the process).
    let mut claimed: Vec<Option<PullJob>> = vec![None; pages.len()];
    let mut leases: Vec<Duration> = last.iter().map(|(_, last)| last.lease).collect();
    leases.sort_unstable();
    leases.dedup();
    for lease in leases {
        let slots: Vec<usize> = pages
            .iter()
            .enumerate()
            .filter(|(_, page)| page.last.as_ref().is_some_and(|l| l.lease == lease))
            .map(|(slot, _)| slot)
            .collect();
        let claimants: Vec<&str> = slots.iter().map(|&s| pages[s].worker.as_str()).collect();
        let next = worker
            .queue
            .claim_all_in(&mut tx, &claimants, lease)
            .await?;
        for (slot, job) in slots.into_iter().zip(next) {
            claimed[slot] = job;
        }
    }
    tx.commit()
        .instrument(tracing::debug_span!("pull_tx_commit"))
        .await?;
    Ok(Written::Stored(claimed))
}

/// Each refused item as the job's item error, and one audit leaf for the page's refusals.
async fn record_refusals(
    worker: &PullWorker,
    tx: &mut sqlx::AnyConnection,
    page: &PendingPage,
) -> Result<()> {
    if page.refused.is_empty() {
        return Ok(());
    }
    for (resource_type, source_resource_id, reason) in &page.refused {
        worker
            .queue
            .record_item_error(
                &mut *tx,
                &page.job.id,
                resource_type.as_deref(),
                source_resource_id.as_deref(),
                reason,
            )
            .await?;
    }
    let mut event = AuditEvent::new(EventKind::PullItemRejected, Agent::system())
        .outcome(Outcome::MinorFailure)
        .patient(&page.instruction.patient_id)
        .detail(format!(
            "pull job {}: {} item(s) refused: {}",
            page.job.id,
            page.refused.len(),
            summary(&page.refused)
        ));
    for (resource_type, source_resource_id, _) in page.refused.iter().take(50) {
        if let (Some(t), Some(id)) = (resource_type, source_resource_id) {
            event = event.resource(format!("{}/{t}/{id}", page.source.id));
        }
    }
    audit::record(&mut *tx, &event).await
}

/// One FHIR Provenance per stored page: which resources (versions) came from which
/// source, when, under which instruction. Nothing is written for a page of unchanged
/// resources, so a page fetched twice gets one Provenance.
fn provenance_of(
    page: &PendingPage,
    written: &[(ResourceMeta, WriteOutcome)],
) -> Result<Option<NewResource>> {
    // A reconciled checkup that another source already delivered is unchanged but still
    // gets this source in its Provenance (the Provenance id makes a re-fetch idempotent).
    let targets: Vec<&ResourceMeta> = written
        .iter()
        .filter(|(meta, outcome)| {
            *outcome != WriteOutcome::Unchanged || meta.resource_type == "Bundle"
        })
        .map(|(meta, _)| meta)
        .collect();
    provenance_for(
        &Origin {
            patient_id: &page.instruction.patient_id,
            source_id: &page.source.id,
            source_display: &page.source.display_name,
            policy: Some(format!(
                "urn:phr-gateway:pull-instruction:{}",
                page.instruction.id
            )),
            entity: Some(("urn:phr-gateway:pull-job", &page.job.id)),
        },
        &targets,
    )
}

fn summary(refused: &[Refusal]) -> String {
    let mut reasons: Vec<&str> = refused.iter().map(|(_, _, r)| r.as_str()).collect();
    reasons.sort_unstable();
    reasons.dedup();
    reasons.truncate(5);
    reasons.join("; ")
}
