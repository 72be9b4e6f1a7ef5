//! Audit log benchmark: append rate (one leaf per transaction, and batched), sequencing, and
//! verify rate. `cargo bench -p phr-gateway --bench audit` (PHR_BENCH_LEAVES to change size).

#[path = "support.rs"]
mod support;

use phr_gateway::audit::verify::verify;
use phr_gateway::audit::{self, Actor, Agent, AuditEvent, EventKind};
use support::{engines, timed, BenchEnv};

const BATCH: usize = 100;

fn event(i: usize) -> AuditEvent {
    AuditEvent::new(
        EventKind::Read,
        Agent {
            actor: Actor::Client {
                id: format!("client-{}", i % 17),
            },
            address: Some("192.0.2.10".parse().expect("ip")),
            token_jti: Some(format!("jti-{i}")),
        },
    )
    .patient(format!("patient-{}", i % 1000))
    .resource(format!("Observation/{i}"))
}

#[tokio::main]
async fn main() {
    let leaves: usize = std::env::var("PHR_BENCH_LEAVES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    println!(
        "audit benchmark: {leaves} leaves of ~{} bytes",
        event(0).to_leaf().len()
    );
    for engine in engines() {
        let Some(env) = BenchEnv::new(engine).await else {
            println!("{engine}: not reachable, skipped");
            continue;
        };
        let gateway = env.gateway().await;
        let log = &gateway.state.audit;
        let db = &gateway.state.db;

        let singles = 1_000.min(leaves);
        let ((), secs) = timed(async {
            for i in 0..singles {
                log.record_now(&event(i)).await.expect("record");
            }
        })
        .await;
        println!(
            "{engine}: append, one leaf per transaction: {:>9.0} leaves/s",
            singles as f64 / secs
        );

        let ((), secs) = timed(async {
            let mut i = singles;
            while i < leaves {
                let end = (i + BATCH).min(leaves);
                let events: Vec<AuditEvent> = (i..end).map(event).collect();
                let mut tx = db.begin().await.expect("begin");
                audit::record_all(&mut tx, &events).await.expect("record");
                tx.commit().await.expect("commit");
                i = end;
            }
        })
        .await;
        println!(
            "{engine}: append, {BATCH} leaves per transaction: {:>9.0} leaves/s",
            (leaves - singles) as f64 / secs
        );

        let (outcome, secs) = timed(log.sequence(true)).await;
        let outcome = outcome.expect("sequence");
        println!(
            "{engine}: sequence + checkpoints:         {:>9.0} leaves/s ({} leaves)",
            outcome.sequenced as f64 / secs,
            outcome.sequenced
        );

        let mut best = 0f64;
        for _ in 0..3 {
            let (report, secs) = timed(verify(db, &log.verifier(), log.origin(), None)).await;
            let report = report.expect("verify");
            best = best.max(report.tree_size as f64 / secs);
        }
        println!("{engine}: verify:                        {best:>9.0} leaves/s");
        db.close().await;
        env.cleanup().await;
    }
}
