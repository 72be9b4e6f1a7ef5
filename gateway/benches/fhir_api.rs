//! The FHIR API under load: a recipient's app with a token issued under the patient's
//! consent reads one Observation and searches Observations (`_count=10`), each request
//! checked against the consent and audited, driven by `wrk` in a second process with 64
//! connections. Prints requests/s and the p50/p99 latency wrk measured.
//!
//! `cargo bench -p phr-gateway --bench fhir_api` (needs `wrk` on the PATH;
//! PHR_BENCH_ENGINES=sqlite|postgres, PHR_BENCH_SECONDS (default 10), PHR_BENCH_TLS=1 for
//! HTTPS with the generated development certificate instead of loopback HTTP,
//! PHR_BENCH_DB_CONNECTIONS for the database pool size).

#[path = "recipient.rs"]
mod recipient;
#[path = "support.rs"]
mod support;

use std::process::Command;

use phr_consent::DataCategory;
use phr_gateway::audit::Agent;
use phr_gateway::store::resources::NewResource;
use recipient::{code_for, exchange, grant, setup};
use support::{blood_pressure, engines, BenchEnv};

const OBSERVATIONS: usize = 1_000;
const CONNECTIONS: usize = 64;
const SCOPE: &str = "launch/patient patient/*.rs";

#[tokio::main]
async fn main() {
    if Command::new("wrk").arg("--version").output().is_err() {
        println!("wrk is not installed (apt-get install wrk): skipped");
        return;
    }
    for engine in engines() {
        run(engine).await;
    }
}

async fn run(engine: phr_gateway::store::Engine) {
    let Some(mut env) = BenchEnv::new(engine).await else {
        println!("{engine}: not reachable, skipped");
        return;
    };
    let tls = std::env::var("PHR_BENCH_TLS").as_deref() == Ok("1");
    env.config.insecure_http = !tls;
    // PHR_BENCH_DB_CONNECTIONS: the database pool size (default the gateway's).
    if let Some(connections) = std::env::var("PHR_BENCH_DB_CONNECTIONS")
        .ok()
        .and_then(|n| n.parse().ok())
    {
        env.config.database.max_connections = connections;
    }
    let gateway = env.gateway().await.start().await.expect("start");
    let setup = setup(&gateway).await;
    let state = &gateway.state;
    let batch: Vec<NewResource> = (0..OBSERVATIONS)
        .map(|n| blood_pressure("p-bench", n))
        .collect();
    state
        .resources
        .put_batch(&Agent::system(), batch)
        .await
        .expect("seed");
    let consent = grant(
        &gateway,
        &setup.client_id,
        0,
        &[DataCategory::Demographics, DataCategory::Observations],
    )
    .await;
    let (code, verifier) = code_for(&gateway, &setup, &consent, SCOPE).await;
    let (status, tokens) = exchange(&setup, &code, &verifier).await;
    assert_eq!(status, 200, "{tokens}");
    let access = tokens["access_token"].as_str().expect("token").to_string();
    let observation = state
        .resources
        .latest_of_type("p-bench", "Observation")
        .await
        .expect("an observation");
    let base = if tls {
        format!("https://localhost:{}", gateway.addr.port())
    } else {
        setup.base.clone()
    };
    let seconds: u64 = std::env::var("PHR_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let scheme = if tls { "HTTPS" } else { "HTTP" };
    for (name, path) in [
        ("read", format!("/fhir/Observation/{}", observation.meta.id)),
        (
            "search _count=10",
            "/fhir/Observation?_count=10".to_string(),
        ),
    ] {
        let url = format!("{base}{path}");
        let output = Command::new("wrk")
            .args([
                "-t2",
                &format!("-c{CONNECTIONS}"),
                &format!("-d{seconds}s"),
                "--latency",
                "-H",
                &format!("Authorization: Bearer {access}"),
                &url,
            ])
            .output()
            .expect("run wrk");
        let text = String::from_utf8_lossy(&output.stdout);
        let figure = |label: &str| {
            text.lines()
                .find(|l| l.trim_start().starts_with(label))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
                .unwrap_or_else(|| "?".into())
        };
        let errors = text
            .lines()
            .find(|l| l.contains("Non-2xx"))
            .map(|l| format!(" — {}", l.trim()))
            .unwrap_or_default();
        println!(
            "{engine} {scheme}: {name}: {} requests/s, p50 {}, p99 {} ({CONNECTIONS} connections, {seconds} s){errors}",
            figure("Requests/sec:"),
            figure("50%"),
            figure("99%"),
        );
    }
    gateway.stop().await;
    env.cleanup().await;
}
