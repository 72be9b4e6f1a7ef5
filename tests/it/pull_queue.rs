//! The durable pull-job queue on both engines: leases, reclaiming a dead worker's job,
//! retries, cancellation, and several workers (and processes) claiming without overlap.

use std::collections::HashSet;
use std::time::Duration;

use phr_gateway::pull::queue::{BatchCounts, JobOutcome};
use phr_gateway::pull::JobQueue;
use phr_gateway::store::now_millis;
use phr_gateway::Gateway;

use crate::both_engines;
use crate::helpers::{Engine, TestEnv};

both_engines!(
    a_claimed_job_is_reclaimed_after_its_lease,
    retries_wait_and_cancelled_jobs_stop,
    concurrent_workers_claim_each_job_once,
    a_group_commit_claims_finishes_and_counts_for_several_workers_at_once,
);

/// Minimal rows a job hangs off (a source and an instruction), written directly.
async fn instruction(gateway: &Gateway, id: &str) {
    let db = &gateway.state.db;
    let now = now_millis();
    for sql in [
        "INSERT INTO patients (id, created_at) VALUES ('p1', $1) ON CONFLICT (id) DO NOTHING",
        "INSERT INTO sources (id, kind, display_name, created_at) VALUES ('src', 'fhir-r4', 'Hospital', $1) ON CONFLICT (id) DO NOTHING",
    ] {
        sqlx::query(sql).bind(now).execute(db.write_pool()).await.expect(sql);
    }
    sqlx::query(
        "INSERT INTO pull_instructions (id, patient_id, source_id, performer_account_id, categories, status, created_at, updated_at)
         VALUES ($1, 'p1', 'src', 'acct', '[\"observations\"]', 'active', $2, $2)",
    )
    .bind(id)
    .bind(now)
    .execute(db.write_pool())
    .await
    .expect("instruction");
}

async fn enqueue(gateway: &Gateway, queue: &JobQueue, instruction_id: &str) -> Option<String> {
    let mut conn = gateway.state.db.write_pool().acquire().await.expect("conn");
    queue
        .enqueue(&mut conn, instruction_id, "p1", "src", now_millis())
        .await
        .expect("enqueue")
}

async fn a_claimed_job_is_reclaimed_after_its_lease(engine: Engine) {
    let env = TestEnv::new(engine).await;
    let gateway = Gateway::build(env.config()).await.expect("build");
    let queue = gateway.state.queue.clone();
    instruction(&gateway, "i1").await;
    let job_id = enqueue(&gateway, &queue, "i1").await.expect("queued");
    assert_eq!(
        enqueue(&gateway, &queue, "i1").await,
        None,
        "one pending job per instruction"
    );

    let lease = Duration::from_millis(300);
    let job = queue
        .claim("worker-a", lease)
        .await
        .expect("claim")
        .expect("a job");
    assert_eq!(job.id, job_id);
    assert_eq!(job.attempts, 1);
    assert!(
        queue
            .claim("worker-b", lease)
            .await
            .expect("claim")
            .is_none(),
        "leased"
    );
    assert!(queue
        .renew(&job.id, "worker-a", lease)
        .await
        .expect("renew"));

    // Worker A dies; after its lease, B gets the job, and A can no longer touch it.
    tokio::time::sleep(lease + Duration::from_millis(100)).await;
    let again = queue
        .claim("worker-b", lease)
        .await
        .expect("claim")
        .expect("reclaimed");
    assert_eq!(again.id, job_id);
    assert_eq!(again.attempts, 2);
    assert!(!queue
        .renew(&job_id, "worker-a", lease)
        .await
        .expect("renew"));
    let mut conn = gateway.state.db.write_pool().acquire().await.expect("conn");
    let counts = BatchCounts {
        received: 1,
        ..Default::default()
    };
    assert!(!queue
        .add_progress(&mut conn, &job_id, "worker-a", counts)
        .await
        .expect("progress"));
    assert!(queue
        .add_progress(&mut conn, &job_id, "worker-b", counts)
        .await
        .expect("progress"));
    drop(conn);
    queue
        .finish(
            &again,
            "worker-a",
            &JobOutcome::Failed {
                error: "stale".into(),
            },
            None,
        )
        .await
        .expect("finish");
    queue
        .finish(
            &again,
            "worker-b",
            &JobOutcome::Done,
            Some(now_millis() + 60_000),
        )
        .await
        .expect("finish");
    let progress = queue.progress("i1").await.expect("progress");
    assert_eq!(progress.len(), 2, "done, and the next pull queued with it");
    assert_eq!(
        progress[1].status, "done",
        "the stale worker's finish was ignored"
    );
    assert_eq!(progress[1].received, 1);
    assert_eq!(progress[0].status, "queued");
    assert!(
        queue
            .claim("worker-c", lease)
            .await
            .expect("claim")
            .is_none(),
        "the next pull is not due yet"
    );
}

async fn retries_wait_and_cancelled_jobs_stop(engine: Engine) {
    let env = TestEnv::new(engine).await;
    let gateway = Gateway::build(env.config()).await.expect("build");
    let queue = gateway.state.queue.clone();
    instruction(&gateway, "i1").await;
    enqueue(&gateway, &queue, "i1").await.expect("queued");
    let lease = Duration::from_secs(30);
    let job = queue.claim("w", lease).await.expect("claim").expect("job");
    let at = now_millis() + 400;
    queue
        .finish(
            &job,
            "w",
            &JobOutcome::Retry {
                at,
                error: "source unavailable".into(),
            },
            None,
        )
        .await
        .expect("retry");
    assert!(
        queue.claim("w", lease).await.expect("claim").is_none(),
        "not before its time"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let retried = queue
        .claim("w", lease)
        .await
        .expect("claim")
        .expect("due now");
    assert_eq!(retried.id, job.id);
    let progress = queue.progress("i1").await.expect("progress");
    assert_eq!(
        progress[0].last_error.as_deref(),
        Some("source unavailable")
    );

    // Withdrawal cancels the running job: the worker's next batch is refused.
    let mut tx = gateway.state.db.begin().await.expect("tx");
    assert_eq!(
        queue
            .cancel_instruction(&mut tx, "i1")
            .await
            .expect("cancel"),
        1
    );
    tx.commit().await.expect("commit");
    let mut conn = gateway.state.db.write_pool().acquire().await.expect("conn");
    assert!(!queue
        .add_progress(&mut conn, &job.id, "w", BatchCounts::default())
        .await
        .expect("progress"));
    drop(conn);
    assert!(!queue.renew(&job.id, "w", lease).await.expect("renew"));
    assert_eq!(
        queue.progress("i1").await.expect("progress")[0].status,
        "cancelled"
    );
}

async fn concurrent_workers_claim_each_job_once(engine: Engine) {
    let env = TestEnv::new(engine).await;
    let first = Gateway::build(env.config()).await.expect("build");
    // On PostgreSQL a second process's pools share the queue; on SQLite one process.
    let second = match engine {
        Engine::Postgres => Some(Gateway::build(env.config()).await.expect("second process")),
        Engine::Sqlite => None,
    };
    let jobs = 40;
    for i in 0..jobs {
        instruction(&first, &format!("i{i}")).await;
        enqueue(&first, &first.state.queue, &format!("i{i}"))
            .await
            .expect("queued");
    }
    let queues: Vec<JobQueue> = match &second {
        Some(second) => vec![first.state.queue.clone(), second.state.queue.clone()],
        None => vec![first.state.queue.clone()],
    };
    let mut tasks = Vec::new();
    for w in 0..6 {
        let queue = queues[w % queues.len()].clone();
        tasks.push(tokio::spawn(async move {
            let mut claimed = Vec::new();
            while let Some(job) = queue
                .claim(&format!("w{w}"), Duration::from_secs(60))
                .await
                .expect("claim")
            {
                claimed.push((w % 2, job.id));
            }
            claimed
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.expect("worker"));
    }
    let ids: HashSet<&String> = all.iter().map(|(_, id)| id).collect();
    assert_eq!(all.len(), jobs, "every job claimed exactly once");
    assert_eq!(ids.len(), jobs);
    if second.is_some() {
        for process in 0..2 {
            assert!(
                all.iter().any(|(p, _)| *p == process),
                "process {process} claimed nothing"
            );
        }
    }
}

/// The set-based statements a group commit of pull pages uses: several workers' next jobs
/// claimed in one statement, their progress and their ends each in one; a job that is no
/// longer its worker's fails the whole statement's check, so the caller rolls back.
async fn a_group_commit_claims_finishes_and_counts_for_several_workers_at_once(engine: Engine) {
    let env = TestEnv::new(engine).await;
    let gateway = Gateway::build(env.config()).await.expect("build");
    let queue = gateway.state.queue.clone();
    for i in ["i1", "i2"] {
        instruction(&gateway, i).await;
        enqueue(&gateway, &queue, i).await.expect("queued");
    }
    let lease = Duration::from_secs(30);
    let mut tx = gateway.state.db.begin().await.expect("tx");
    let claimed = queue
        .claim_all_in(&mut tx, &["w1", "w2", "w3"], lease)
        .await
        .expect("claim");
    tx.commit().await.expect("commit");
    assert_eq!(claimed.len(), 3, "one answer per worker, in order");
    let (a, b) = (
        claimed[0].clone().expect("w1 got a job"),
        claimed[1].clone().expect("w2 got a job"),
    );
    assert!(
        claimed[2].is_none(),
        "two jobs were ready for three workers"
    );
    assert_ne!(a.id, b.id, "no job is claimed twice");
    assert_eq!((a.attempts, b.attempts), (1, 1));
    assert!(
        queue.claim("w4", lease).await.expect("claim").is_none(),
        "both are leased"
    );
    // Each job is leased to the worker it was paired with: the other cannot renew it.
    assert!(queue.renew(&a.id, "w1", lease).await.expect("renew"));
    assert!(!queue.renew(&a.id, "w2", lease).await.expect("renew"));
    assert!(queue.renew(&b.id, "w2", lease).await.expect("renew"));

    let counts = |received| BatchCounts {
        received,
        unchanged: 1,
        rejected: 2,
    };
    let mut tx = gateway.state.db.begin().await.expect("tx");
    assert!(
        !queue
            .add_progress_all(
                &mut tx,
                &[(&a.id, "w1", counts(5)), (&b.id, "w1", counts(7))]
            )
            .await
            .expect("progress"),
        "b is not w1's"
    );
    drop(tx); // rolled back
    let owned_progress = [
        (a.id.as_str(), "w1", counts(5)),
        (b.id.as_str(), "w2", counts(7)),
    ];
    let mut tx = gateway.state.db.begin().await.expect("tx");
    assert!(queue
        .add_progress_all(&mut tx, &owned_progress)
        .await
        .expect("progress"));
    let next_at = now_millis() + 60_000;
    assert!(
        !queue
            .finish_done_all(&mut tx, &[(&a, "w1", next_at), (&b, "w3", next_at)])
            .await
            .expect("finish"),
        "b is not w3's"
    );
    drop(tx);
    let mut tx = gateway.state.db.begin().await.expect("tx");
    assert!(queue
        .add_progress_all(&mut tx, &owned_progress)
        .await
        .expect("progress"));
    assert!(queue
        .finish_done_all(&mut tx, &[(&a, "w1", next_at), (&b, "w2", next_at)])
        .await
        .expect("finish"));
    tx.commit().await.expect("commit");

    for (instruction_id, received) in [("i1", 5), ("i2", 7)] {
        let progress = queue.progress(instruction_id).await.expect("progress");
        assert_eq!(progress.len(), 2, "done, and its next pull queued");
        let done = progress.iter().find(|p| p.status == "done").expect("done");
        assert_eq!(
            (done.received, done.unchanged, done.rejected),
            (received, 1, 2),
            "only the committed progress counts"
        );
        let next = progress
            .iter()
            .find(|p| p.status == "queued")
            .expect("next");
        assert_eq!(next.not_before, next_at);
    }
    // A withdrawn instruction gets no next pull.
    sqlx::query("UPDATE pull_instructions SET status = 'withdrawn' WHERE id = 'i1'")
        .execute(gateway.state.db.write_pool())
        .await
        .expect("withdraw");
    sqlx::query("UPDATE pull_jobs SET not_before = 0 WHERE status = 'queued'")
        .execute(gateway.state.db.write_pool())
        .await
        .expect("due now");
    let mut tx = gateway.state.db.begin().await.expect("tx");
    let claimed = queue
        .claim_all_in(&mut tx, &["w5", "w6"], lease)
        .await
        .expect("claim");
    assert!(
        claimed.iter().all(Option::is_some),
        "both next pulls are due"
    );
    let done: Vec<_> = claimed
        .iter()
        .zip(["w5", "w6"])
        .map(|(job, w)| (job.as_ref().expect("job"), w, next_at))
        .collect();
    assert!(queue.finish_done_all(&mut tx, &done).await.expect("finish"));
    tx.commit().await.expect("commit");
    assert_eq!(queue.progress("i1").await.expect("progress").len(), 2);
    assert_eq!(queue.progress("i2").await.expect("progress").len(), 3);
}
