//! Bulk Data export rate and memory: a recipient's `Group/$export` of Observations for
//! 1 patient × 100,000 resources and 10,000 patients × 100 resources (each patient's consent
//! decided, each resource decrypted, served and sealed into NDJSON chunks), next to a raw
//! scan of the same rows in the same run. Prints resources/s and the resident-memory growth
//! while the export ran.
//!
//! `cargo bench -p phr-gateway --bench export` (PHR_BENCH_ENGINES=sqlite|postgres,
//! PHR_BENCH_EXPORT=small for 1 × 10,000 and 1,000 × 10, =one-patient for 1 × 100,000 only;
//! PHR_BENCH_EXPORT_ROUNDS=n exports n times over one seeding).

#[path = "support.rs"]
mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use futures::{StreamExt, TryStreamExt};
use phr_consent::{DataCategory, Performer, PersonRef, Purpose, Recipient};
use phr_gateway::audit::Agent;
use phr_gateway::consents::{GrantRequest, ReceiptContext};
use phr_gateway::export::{ExportParameters, ExportStatus};
use phr_gateway::oauth::clients::{self, ComplianceDeclaration, NewClient};
use sqlx::Row;
use support::{blood_pressure, engines, rss_kib, BenchEnv};

#[tokio::main]
async fn main() {
    let shapes: &[(usize, usize)] = match std::env::var("PHR_BENCH_EXPORT").as_deref() {
        Ok("small") => &[(1, 10_000), (1_000, 10)],
        // Seeding 10,000 patients takes long on PostgreSQL: the one large patient only.
        Ok("one-patient") => &[(1, 100_000)],
        _ => &[(1, 100_000), (10_000, 100)],
    };
    for engine in engines() {
        for &(patients, per_patient) in shapes {
            run(engine, patients, per_patient).await;
        }
    }
}

async fn run(engine: phr_gateway::store::Engine, patients: usize, per_patient: usize) {
    let Some(mut env) = BenchEnv::new(engine).await else {
        println!("{engine}: not reachable, skipped");
        return;
    };
    env.config.export.workers = 0;
    env.config.notifications.deliver = false;
    let gateway = env.gateway().await;
    let state = &gateway.state;
    let (client, _) = clients::register(
        &state.db,
        &Agent::system(),
        NewClient {
            display_name: "Bench network".into(),
            redirect_uris: Vec::new(),
            jwks: Some(serde_json::json!({"keys": [phr_adapters::fhir_r4::BackendKey::generate_es384().public_jwk()]})),
            recipient: clients::Recipient {
                name: "Bench".into(),
                identifier: "0".into(),
            },
            compliance: ComplianceDeclaration {
                declared: true,
                statement: "bench".into(),
                declared_on: "2026-01-01".into(),
            },
        },
    )
    .await
    .expect("client");
    let purpose = state
        .consents
        .config()
        .purpose("PATRQT")
        .expect("purpose")
        .clone();
    // Patients are seeded a few at a time, so the database's round trips overlap (seeding
    // is not part of the figure; on PostgreSQL one at a time took most of a run).
    let seeded: Vec<()> = futures::stream::iter(0..patients)
        .map(|p| seed_patient(state, &client.id, &purpose, p, per_patient))
        .buffer_unordered(SEEDING_CONCURRENCY)
        .try_collect()
        .await
        .expect("seed");
    assert_eq!(seeded.len(), patients);
    let total = (patients * per_patient) as f64;

    // The raw scan: the same rows, no decryption, no JSON.
    let started = Instant::now();
    let mut rows = sqlx::query("SELECT body FROM resource_versions").fetch(state.db.read_pool());
    let (mut scanned, mut bytes) = (0u64, 0usize);
    while let Some(row) = rows.try_next().await.expect("scan") {
        let body: Vec<u8> = row.get(0);
        bytes += body.len();
        scanned += 1;
    }
    drop(rows);
    assert!(bytes > 0);
    let raw_rate = scanned as f64 / started.elapsed().as_secs_f64();

    let parameters = ExportParameters {
        types: vec!["Observation".into()],
        since: None,
        type_filters: Vec::new(),
    };
    // Each round is a new job over the same rows, so one seeding serves several figures.
    for _ in 0..rounds() {
        let job_id = state
            .exports
            .kick_off(
                &Agent::system(),
                &client.id,
                "group",
                Some(&client.id),
                "bench",
                &parameters,
            )
            .await
            .expect("kick-off");
        let baseline = rss_kib();
        let peak = Arc::new(AtomicU64::new(baseline));
        let running = Arc::new(AtomicBool::new(true));
        let sampler = {
            let (peak, running) = (peak.clone(), running.clone());
            tokio::spawn(async move {
                while running.load(Ordering::Relaxed) {
                    peak.fetch_max(rss_kib(), Ordering::Relaxed);
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
            })
        };
        let started = Instant::now();
        let status = state.exports.run_once("bench").await.expect("run");
        let seconds = started.elapsed().as_secs_f64();
        running.store(false, Ordering::Relaxed);
        let _ = sampler.await;
        assert_eq!(status, Some(ExportStatus::Done));
        let exported: i64 = sqlx::query_scalar(
            "SELECT CAST(SUM(lines) AS BIGINT) FROM export_chunks WHERE job_id = $1",
        )
        .bind(&job_id)
        .fetch_one(state.db.read_pool())
        .await
        .expect("lines");
        assert_eq!(exported as f64, total, "every resource exported once");
        println!(
            "{engine}: export {patients} patient(s) × {per_patient}: {exported} resources in {seconds:.1} s = {:>8.0} resources/s; raw scan {:>8.0} rows/s; RSS {} MiB before, peak +{} MiB",
            total / seconds,
            raw_rate,
            baseline / 1024,
            (peak.load(Ordering::Relaxed).saturating_sub(baseline)) / 1024,
        );
    }
    state.db.close().await;
    env.cleanup().await;
}

/// Exports run over one seeding (PHR_BENCH_EXPORT_ROUNDS, default 1).
fn rounds() -> usize {
    std::env::var("PHR_BENCH_EXPORT_ROUNDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(1)
}

/// Patients seeded at once.
const SEEDING_CONCURRENCY: usize = 8;

/// One patient's Observations (batches of 5,000) and their consent for the bench client.
async fn seed_patient(
    state: &phr_gateway::http::AppState,
    client_id: &str,
    purpose: &phr_gateway::config::PurposeConfig,
    p: usize,
    per_patient: usize,
) -> phr_gateway::Result<()> {
    let patient_id = format!("p-{p:05}");
    let mut batch = Vec::with_capacity(per_patient.min(5_000));
    for n in 0..per_patient {
        batch.push(blood_pressure(&patient_id, n));
        if batch.len() == 5_000 {
            state
                .resources
                .put_batch(&Agent::system(), std::mem::take(&mut batch))
                .await?;
        }
    }
    if !batch.is_empty() {
        state.resources.put_batch(&Agent::system(), batch).await?;
    }
    state
        .consents
        .grant(
            &Agent::system(),
            GrantRequest {
                patient_id: patient_id.clone(),
                performer: Performer::patient(&PersonRef::new(&patient_id)),
                performer_account_id: format!("a-{p}"),
                recipient: Recipient::client(client_id),
                recipient_display: "Bench network".into(),
                purposes: vec![Purpose::new(&purpose.system, &purpose.code)],
                categories: vec![DataCategory::Observations],
                ends_at: time::OffsetDateTime::now_utc() + time::Duration::days(30),
            },
            &ReceiptContext {
                notice_url: "http://127.0.0.1/consent/notice".into(),
                language: "ja".into(),
                collection_method: "api".into(),
            },
        )
        .await?;
    Ok(())
}
