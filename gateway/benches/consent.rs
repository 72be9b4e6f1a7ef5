//! Consent and OAuth benchmark, over real HTTP on loopback:
//! - token issuance: the code exchange at `/oauth/token` with a `private_key_jwt` assertion
//!   (ES384 verified, jti stored, code spent, tokens stored as digests, audited);
//! - withdrawal to denial: the time from sending `POST /api/consents/{id}/withdraw` to the
//!   app's next `GET /fhir/Patient/{id}` being refused, on the same process and on a second
//!   gateway process sharing the database.
//!
//! `cargo bench -p phr-gateway --bench consent` (PHR_BENCH_ENGINES=sqlite|postgres).

#[path = "recipient.rs"]
mod recipient;
#[path = "support.rs"]
mod support;

use std::time::Instant;

use phr_consent::DataCategory;
use phr_gateway::Gateway;
use recipient::{code_for, exchange, grant, setup, Setup};
use support::{engines, BenchEnv};

const TOKENS: usize = 300;
const WITHDRAWALS: usize = 50;
const SCOPE: &str = "launch/patient patient/Patient.rs";

#[tokio::main]
async fn main() {
    for engine in engines() {
        run(engine).await;
    }
}

async fn run(engine: phr_gateway::store::Engine) {
    let Some(env) = BenchEnv::new(engine).await else {
        println!("{engine}: not reachable, skipped");
        return;
    };
    let gateway = env.gateway().await.start().await.expect("start");
    let setup = setup(&gateway).await;

    // Token issuance: requests and codes are prepared first; only the exchange is timed.
    let mut codes = Vec::with_capacity(TOKENS);
    for n in 0..TOKENS {
        let consent = grant(&gateway, &setup.client_id, n, &[DataCategory::Demographics]).await;
        codes.push(code_for(&gateway, &setup, &consent, SCOPE).await);
    }
    let started = Instant::now();
    for (code, verifier) in &codes {
        let (status, _) = exchange(&setup, code, verifier).await;
        assert_eq!(status, 200);
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{engine}: token issuance (code exchange with private_key_jwt, one at a time): {TOKENS} in {seconds:.2} s = {:.0} tokens/s",
        TOKENS as f64 / seconds
    );

    // Withdrawal to denial, here and (PostgreSQL, the scale-out store) in a second process
    // on the same database.
    let second = match engine {
        phr_gateway::store::Engine::Postgres => Some(
            Gateway::build(env.config.clone())
                .await
                .expect("second process")
                .start()
                .await
                .expect("start second"),
        ),
        phr_gateway::store::Engine::Sqlite => None,
    };
    let mut readers = vec![("same process", setup.base.clone())];
    if let Some(second) = &second {
        readers.push((
            "second process",
            format!("http://127.0.0.1:{}", second.addr.port()),
        ));
    }
    for (label, reader) in readers {
        let mut latencies = Vec::with_capacity(WITHDRAWALS);
        for n in 0..WITHDRAWALS {
            let consent = grant(
                &gateway,
                &setup.client_id,
                10_000 + n,
                &[DataCategory::Demographics],
            )
            .await;
            let (code, verifier) = code_for(&gateway, &setup, &consent, SCOPE).await;
            let (_, tokens) = exchange(&setup, &code, &verifier).await;
            let access = tokens["access_token"]
                .as_str()
                .unwrap_or_else(|| panic!("token: {tokens}"))
                .to_string();
            assert_eq!(read(&setup, &reader, &access).await, 200);
            let started = Instant::now();
            let withdrawn = setup
                .http
                .post(format!("{}/api/consents/{consent}/withdraw", setup.base))
                .bearer_auth(&setup.patient_token)
                .send()
                .await
                .expect("withdraw");
            assert_eq!(withdrawn.status(), 200);
            let status = read(&setup, &reader, &access).await;
            latencies.push(started.elapsed().as_secs_f64() * 1000.0);
            assert!(status == 401 || status == 403, "denied, got {status}");
        }
        latencies.sort_by(f64::total_cmp);
        println!(
            "{engine}: withdrawal → next request denied ({label}): median {:.1} ms, p95 {:.1} ms, max {:.1} ms over {WITHDRAWALS} (every next request was denied)",
            latencies[WITHDRAWALS / 2],
            latencies[WITHDRAWALS * 95 / 100],
            latencies[WITHDRAWALS - 1]
        );
    }
    if let Some(second) = second {
        second.stop().await;
    }
    gateway.stop().await;
    env.cleanup().await;
}

async fn read(setup: &Setup, base: &str, access: &str) -> u16 {
    setup
        .http
        .get(format!("{base}/fhir/Patient/p-bench"))
        .bearer_auth(access)
        .send()
        .await
        .expect("read")
        .status()
        .as_u16()
}
