//! End-to-end pull benchmark: the hospital simulator in-process, the real FHIR adapter over
//! loopback HTTP, normalisation, encryption, the store and the audit log.
//! `cargo bench -p phr-gateway --bench pull` (PHR_BENCH_ENGINES=sqlite|postgres,
//! PHR_BENCH_PULLS=hospital|portal). The portal run does the same with the self-information
//! API simulator (its JSON mapped to JP Core, 特定健診 CDAs validated and converted).
//! PHR_BENCH_SPANS=1 also prints the wall time inside each stage of a pull job (setup,
//! start, waiting for a page, prepare, keys, seal, waiting for the writer, transaction).

#[path = "support.rs"]
mod support;

use std::sync::Arc;

use phr_adapters::fhir_r4::simulator::{HospitalSimulator, SimulatorConfig};
use phr_adapters::AuthorizationRequest;
use phr_consent::DataCategory;
use phr_gateway::audit::Agent;
use phr_gateway::config::{SourceConfig, SourceKind};
use phr_gateway::demo::link_simulated_hospital_patient;
use sqlx::Row;
use support::{engines, timed, BenchEnv, SpanTimes};

/// Pull workers (`PHR_BENCH_WORKERS`, default 2: the gateway's default `pull.workers`).
fn workers() -> usize {
    std::env::var("PHR_BENCH_WORKERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(phr_gateway::config::PullConfig::default().workers as usize)
}

#[tokio::main]
async fn main() {
    let pulls = std::env::var("PHR_BENCH_PULLS").unwrap_or_else(|_| "hospital,portal".into());
    let spans = SpanTimes::install();
    if pulls.contains("hospital") {
        for (patients, per_patient) in [(1usize, 50_000usize), (1_000, 50)] {
            for engine in engines() {
                run(engine, patients, per_patient, spans.as_ref()).await;
            }
        }
    }
    if pulls.contains("portal") {
        for engine in engines() {
            run_portal(engine, 200).await;
        }
    }
}

async fn run_portal(engine: phr_gateway::store::Engine, persons: usize) {
    use phr_adapters::fhir_r4::simulator::patient_agent::callback_from_redirect;
    use phr_adapters::self_info::simulator::patient_agent::read_card_and_decide;
    use phr_adapters::self_info::simulator::{PortalSimulator, SimulatorConfig as PortalConfig};
    let Some(mut env) = BenchEnv::new(engine).await else {
        println!("{engine}: not reachable, skipped");
        return;
    };
    let key = phr_adapters::fhir_r4::BackendKey::generate_es384();
    let pem = key.to_pem().expect("pem");
    phr_gateway::crypto::key_file::write_private(
        &env.config.source_client_key_path(),
        pem.as_bytes(),
    )
    .expect("key file");
    let mut portal_config = PortalConfig::new("phr-gateway", key.public_jwk());
    portal_config.persons = persons;
    let portal = PortalSimulator::start(portal_config).await.expect("portal");
    env.config.pull.workers = 0;
    env.config.sources = vec![SourceConfig {
        id: "portal".into(),
        display_name: "Bench portal".into(),
        kind: SourceKind::SelfInfo,
        base_url: portal.base_url.clone(),
        client_id: "phr-gateway".into(),
        page_size: Some(100),
        max_concurrent_requests: Some(8),
        auth: Default::default(),
        portal_categories: None,
    }];
    let gateway = env.gateway().await;
    let state = &gateway.state;
    let (info, source) = state.registry.get("portal").expect("source");
    let categories = DataCategory::ALL.to_vec();
    for n in 1..=persons {
        let instruction_id = format!("bench-{n}");
        let start = source
            .start_authorization(&AuthorizationRequest {
                instruction_id: instruction_id.clone(),
                resource_types: phr_consent::DataCategory::resource_types_of(&categories),
                redirect_uri: "https://localhost/patient/sources/callback".into(),
                on_behalf_of: None,
            })
            .await
            .expect("start");
        let (instruction, _) = state
            .instructions
            .give(
                &Agent::system(),
                &instruction_id,
                "bench",
                &format!("bench-person-{n}"),
                info,
                &categories,
                &start.pending,
            )
            .await
            .expect("give");
        let person = portal.handle.person(n).expect("person");
        let visit =
            read_card_and_decide(&start.authorize_url, &person.card_number, &person.pin, true)
                .await
                .expect("consent at the portal");
        let callback = callback_from_redirect(&visit.location).expect("callback");
        let credentials = source
            .finish_authorization(&start.pending, &callback)
            .await
            .expect("finish");
        state
            .instructions
            .activate(&Agent::system(), &instruction, info, &credentials)
            .await
            .expect("activate");
    }
    let secs = drain_with_workers(state).await;
    let stored = count(
        state,
        "SELECT COUNT(*) FROM resources WHERE category <> 'provenance'",
    )
    .await;
    let bundles = count(
        state,
        "SELECT COUNT(*) FROM resources WHERE resource_type = 'Bundle'",
    )
    .await;
    println!(
        "{engine}: portal pull {persons} person(s): {stored} resources ({bundles} checkup reports) in {secs:.2} s = {:>8.0} resources/s ({} workers)",
        stored as f64 / secs,
        workers()
    );
    portal.shutdown().await;
    state.db.close().await;
    env.cleanup().await;
}

async fn run(
    engine: phr_gateway::store::Engine,
    patients: usize,
    per_patient: usize,
    spans: Option<&SpanTimes>,
) {
    let Some(mut env) = BenchEnv::new(engine).await else {
        println!("{engine}: not reachable, skipped");
        return;
    };
    let hospital = HospitalSimulator::start(SimulatorConfig {
        patients,
        resources_per_patient: per_patient,
        // Like most servers, the simulator offers Patient/$everything: one search per patient.
        offer_everything: true,
        ..SimulatorConfig::default()
    })
    .await
    .expect("simulator");
    env.config.pull.workers = 0;
    env.config.sources = vec![SourceConfig {
        id: "hospital".into(),
        display_name: "Bench hospital".into(),
        kind: SourceKind::FhirR4,
        base_url: hospital.base_url.clone(),
        client_id: "phr-gateway".into(),
        page_size: Some(1000),
        max_concurrent_requests: Some(8),
        auth: Default::default(),
        portal_categories: None,
    }];
    let gateway = env.gateway().await;
    let state = &gateway.state;
    for n in 1..=patients {
        link_simulated_hospital_patient(
            state,
            "hospital",
            n,
            &format!("bench-{n}"),
            &format!("bench-patient-{n}"),
        )
        .await
        .expect("link");
    }

    if let Some(spans) = spans {
        spans.report("linking");
    }
    let secs = drain_with_workers(state).await;
    if let Some(spans) = spans {
        spans.report(&format!("{engine} {patients}×{per_patient}"));
    }
    let stored = count(
        state,
        "SELECT COUNT(*) FROM resources WHERE category <> 'provenance'",
    )
    .await;
    assert_eq!(
        stored as usize,
        patients * per_patient,
        "every resource stored once"
    );
    println!(
        "{engine}: pull {patients} patient(s) × {per_patient}: {stored} resources in {secs:.1} s = {:>8.0} resources/s ({} workers)",
        stored as f64 / secs,
        workers()
    );
    hospital.shutdown().await;
    state.db.close().await;
    env.cleanup().await;
}

/// Runs `workers()` pull workers until no job is ready; the seconds it took.
async fn drain_with_workers(state: &phr_gateway::http::AppState) -> f64 {
    let workers: Vec<_> = (0..workers())
        .map(|_| Arc::new(state.pull_worker()))
        .collect();
    let ((), secs) = timed(async {
        let mut tasks = Vec::new();
        for worker in &workers {
            let worker = worker.clone();
            tasks.push(tokio::spawn(async move {
                while let Ok(Some(_)) = worker.run_once().await {}
            }));
        }
        for task in tasks {
            task.await.expect("worker");
        }
    })
    .await;
    secs
}

async fn count(state: &phr_gateway::http::AppState, sql: &str) -> i64 {
    sqlx::query(sql)
        .fetch_one(state.db.read_pool())
        .await
        .expect(sql)
        .get(0)
}
