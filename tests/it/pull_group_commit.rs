//! Group commit of pull pages, on both engines: pages that several workers have ready at once
//! share one transaction, yet each job keeps its own audit leaf, Provenance, progress and
//! end; a fault in the shared transaction, or a job withdrawn while its page waited, fails
//! only that job. The writer is held by the test so the pages gather deterministically.

use std::time::Duration;

use phr_adapters::fhir_r4::simulator::{HospitalSimulator, RunningSimulator, SimulatorConfig};
use phr_gateway::demo::link_simulated_hospital_patient;
use phr_gateway::pull::queue::JobOutcome;
use phr_gateway::pull::worker::RunResult;
use phr_gateway::pull::CommitCounts;

use crate::both_engines;
use crate::helpers::{
    count, hospital_source, leaves_containing, make_due, spawn_app_with, Engine, TestApp, TestEnv,
};

both_engines!(
    pages_ready_together_share_one_commit_and_keep_their_own_records,
    a_fault_in_a_shared_commit_writes_each_page_on_its_own,
    a_job_withdrawn_while_its_page_waits_fails_alone,
);

const PATIENTS: usize = 3;
const PER_PATIENT: usize = 12;

struct GroupEnv {
    app: TestApp,
    _hospital: RunningSimulator,
    /// Instruction ids, by patient number (1-based) minus one.
    instructions: Vec<String>,
}

/// Links one instruction per simulated patient (`gc-patient-N` ↔ hospital `patient-000N`).
async fn group_env(engine: Engine) -> GroupEnv {
    let hospital = HospitalSimulator::start(SimulatorConfig {
        patients: PATIENTS,
        resources_per_patient: PER_PATIENT,
        offer_everything: true,
        ..SimulatorConfig::default()
    })
    .await
    .expect("simulator");
    let base_url = hospital.base_url.clone();
    let app = spawn_app_with(TestEnv::new(engine).await, move |c| {
        c.pull.workers = 0;
        c.sources = vec![hospital_source(base_url, 100)];
    })
    .await;
    let mut instructions = Vec::new();
    for n in 1..=PATIENTS {
        instructions.push(
            link_simulated_hospital_patient(
                &app.gateway().state,
                "hospital",
                n,
                &format!("gc-{n}"),
                &format!("gc-patient-{n}"),
            )
            .await
            .expect("link"),
        );
    }
    GroupEnv {
        app,
        _hospital: hospital,
        instructions,
    }
}

/// Runs one job on each of `PATIENTS` workers while the test holds the writer; once every
/// page waits, lets the writer go (after `meanwhile`). Each worker's result, and the commit
/// counts before the release.
async fn run_gathered<F>(env: &GroupEnv, meanwhile: F) -> (Vec<RunResult>, CommitCounts)
where
    F: std::future::Future<Output = ()>,
{
    let state = &env.app.gateway().state;
    let commits = state.page_commits.clone();
    let held = commits.hold_writer().await;
    let before = commits.counts();
    let mut tasks = Vec::new();
    for _ in 0..PATIENTS {
        let worker = state.pull_worker();
        tasks.push(tokio::spawn(async move {
            worker.run_once().await.expect("worker pass")
        }));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while commits.waiting() < PATIENTS {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} page(s) reached the writer",
            commits.waiting()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    meanwhile.await;
    drop(held);
    let mut results = Vec::new();
    for task in tasks {
        let (_, result) = task.await.expect("worker").expect("a job was claimed");
        results.push(result);
    }
    (results, before)
}

async fn clinical(app: &TestApp, n: usize) -> i64 {
    count(
        app,
        &format!(
            "SELECT COUNT(*) FROM resources WHERE patient_id = 'gc-patient-{n}' \
             AND category <> 'provenance'"
        ),
    )
    .await
}

async fn provenances(app: &TestApp, n: usize) -> i64 {
    count(
        app,
        &format!(
            "SELECT COUNT(*) FROM resources WHERE patient_id = 'gc-patient-{n}' \
             AND resource_type = 'Provenance'"
        ),
    )
    .await
}

/// Audit leaves written for the patient's pulled pages (one per page, naming the job).
async fn page_leaves(app: &TestApp, n: usize) -> i64 {
    leaves_containing(app, &format!("from source hospital (instruction gc-{n})")).await
}

async fn job_status(app: &TestApp, instruction: &str) -> String {
    let progress = app
        .gateway()
        .state
        .queue
        .progress(instruction)
        .await
        .expect("progress");
    // Newest first: after a pull the next one is already queued.
    progress
        .last()
        .map(|job| job.status.clone())
        .unwrap_or_default()
}

async fn pages_ready_together_share_one_commit_and_keep_their_own_records(engine: Engine) {
    let env = group_env(engine).await;
    let (results, before) = run_gathered(&env, async {}).await;
    assert!(
        results
            .iter()
            .all(|r| *r == RunResult::Finished(JobOutcome::Done)),
        "{results:?}"
    );
    let after = env.app.gateway().state.page_commits.counts();
    assert_eq!(
        after.pages - before.pages,
        PATIENTS as u64,
        "every page stored"
    );
    assert_eq!(
        after.commits - before.commits,
        1,
        "the pages gathered while the writer was held share one commit"
    );
    for n in 1..=PATIENTS {
        assert_eq!(
            clinical(&env.app, n).await,
            PER_PATIENT as i64,
            "patient {n}"
        );
        assert_eq!(
            provenances(&env.app, n).await,
            1,
            "one Provenance for patient {n}"
        );
        assert_eq!(
            page_leaves(&env.app, n).await,
            1,
            "one leaf for patient {n}'s page"
        );
        // The Provenance is written with its page, so the page's leaf names it too.
        let provenance: String = sqlx::query_scalar(&format!(
            "SELECT id FROM resources WHERE patient_id = 'gc-patient-{n}' \
             AND resource_type = 'Provenance'"
        ))
        .fetch_one(env.app.gateway().state.db.read_pool())
        .await
        .expect("the Provenance");
        let named = format!("Provenance/{provenance}/_history/1");
        let page = format!("from source hospital (instruction gc-{n})");
        assert_eq!(
            leaves_containing(&env.app, &named).await,
            1,
            "patient {n}'s Provenance is listed once"
        );
        let bodies: Vec<Vec<u8>> = sqlx::query_scalar("SELECT body FROM audit_leaves")
            .fetch_all(env.app.gateway().state.db.read_pool())
            .await
            .expect("leaves");
        assert!(
            bodies.iter().any(|body| {
                let body = String::from_utf8_lossy(body);
                body.contains(&named) && body.contains(&page)
            }),
            "patient {n}'s Provenance is listed in its page's leaf"
        );
        assert_eq!(
            job_status(&env.app, &env.instructions[n - 1]).await,
            "done",
            "patient {n}'s job ended in the shared commit"
        );
    }
    // Nothing of one patient's page went into another's record.
    assert_eq!(
        count(
            &env.app,
            "SELECT COUNT(*) FROM resources WHERE patient_id NOT LIKE 'gc-patient-%'"
        )
        .await,
        0
    );
    // A second round finds nothing new: nothing duplicated by sharing the commit.
    make_due(&env.app).await;
    let (again, _) = run_gathered(&env, async {}).await;
    assert!(again
        .iter()
        .all(|r| *r == RunResult::Finished(JobOutcome::Done)));
    for n in 1..=PATIENTS {
        assert_eq!(clinical(&env.app, n).await, PER_PATIENT as i64);
        assert_eq!(
            provenances(&env.app, n).await,
            1,
            "no Provenance for an unchanged page"
        );
    }
}

async fn a_fault_in_a_shared_commit_writes_each_page_on_its_own(engine: Engine) {
    let env = group_env(engine).await;
    env.app
        .gateway()
        .state
        .db
        .inject_fault("resources.put.between_statements");
    let (results, before) = run_gathered(&env, async {}).await;
    assert!(
        results
            .iter()
            .all(|r| *r == RunResult::Finished(JobOutcome::Done)),
        "the shared transaction failed, each page alone succeeded: {results:?}"
    );
    let after = env.app.gateway().state.page_commits.counts();
    assert_eq!(after.pages - before.pages, PATIENTS as u64);
    assert_eq!(
        after.commits - before.commits,
        PATIENTS as u64,
        "one commit per page after the shared one failed"
    );
    for n in 1..=PATIENTS {
        assert_eq!(
            clinical(&env.app, n).await,
            PER_PATIENT as i64,
            "patient {n}"
        );
        assert_eq!(provenances(&env.app, n).await, 1, "patient {n}");
        assert_eq!(
            page_leaves(&env.app, n).await,
            1,
            "patient {n}: the failed attempt left no leaf"
        );
    }
}

async fn a_job_withdrawn_while_its_page_waits_fails_alone(engine: Engine) {
    let env = group_env(engine).await;
    let state = &env.app.gateway().state;
    let withdrawn = env.instructions[1].clone();
    let (results, _) = run_gathered(&env, async {
        let mut tx = state.db.begin().await.expect("begin");
        let cancelled = state
            .queue
            .cancel_instruction(&mut tx, &withdrawn)
            .await
            .expect("cancel");
        assert_eq!(cancelled, 1, "the running job is cancelled");
        tx.commit().await.expect("commit");
    })
    .await;
    assert_eq!(
        results
            .iter()
            .filter(|r| **r == RunResult::LeaseLost)
            .count(),
        1,
        "{results:?}"
    );
    assert_eq!(
        results
            .iter()
            .filter(|r| **r == RunResult::Finished(JobOutcome::Done))
            .count(),
        2,
        "{results:?}"
    );
    assert_eq!(
        clinical(&env.app, 2).await,
        0,
        "nothing of the withdrawn job's page"
    );
    assert_eq!(provenances(&env.app, 2).await, 0);
    assert_eq!(page_leaves(&env.app, 2).await, 0);
    for n in [1, 3] {
        assert_eq!(
            clinical(&env.app, n).await,
            PER_PATIENT as i64,
            "patient {n}"
        );
        assert_eq!(provenances(&env.app, n).await, 1, "patient {n}");
    }
}
