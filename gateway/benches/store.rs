//! Resource store benchmark: write rate, and streaming read rate next to the raw rate of the
//! same engine reading the same rows without decryption (the limit), in the same run.
//!
//! `cargo bench -p phr-gateway --bench store` (PHR_BENCH_ROWS to change the size).

#[path = "support.rs"]
mod support;

use futures::TryStreamExt;
use phr_gateway::audit::Agent;
use phr_gateway::store::resources::{NewResource, SourceIdentity, SELECT_CURRENT};
use sqlx::Row;
use support::{engines, rss_kib, timed, BenchEnv};

const PATIENT: &str = "bench-patient";
const BATCH: usize = 500;

fn resource(i: usize) -> NewResource {
    // About 1 KB, like a typical lab Observation.
    let padding = "検査結果の所見。".repeat(40);
    let body = format!(
        r#"{{"resourceType":"Observation","id":"o{i}","status":"final","code":{{"coding":[{{"system":"urn:oid:1.2.392.200119.6.1005","code":"3D045000001906202","display":"HbA1c"}}]}},"valueQuantity":{{"value":{v},"unit":"%","system":"http://unitsofmeasure.org","code":"%"}},"note":[{{"text":"{padding}"}}]}}"#,
        v = 5.0 + (i % 30) as f64 / 10.0
    );
    NewResource {
        patient_id: PATIENT.into(),
        category: "checkup".into(),
        source: SourceIdentity {
            source: "bench-hospital".into(),
            resource_type: "Observation".into(),
            source_resource_id: format!("o{i}"),
            version_id: Some("1".into()),
        },
        body: body.into_bytes(),
    }
}

#[tokio::main]
async fn main() {
    let rows: usize = std::env::var("PHR_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    println!(
        "resource store benchmark: {rows} resources of ~{} bytes",
        resource(0).body.len()
    );
    for engine in engines() {
        let Some(env) = BenchEnv::new(engine).await else {
            println!("{engine}: not reachable, skipped");
            continue;
        };
        let gateway = env.gateway().await;
        let store = &gateway.state.resources;
        let agent = Agent::system();

        let singles = 1_000.min(rows);
        let ((), secs) = timed(async {
            for i in 0..singles {
                store.put(&agent, resource(i)).await.expect("put");
            }
        })
        .await;
        println!(
            "{engine}: write, one resource per transaction: {:>9.0} resources/s",
            singles as f64 / secs
        );

        let ((), secs) = timed(async {
            let mut i = singles;
            while i < rows {
                let end = (i + BATCH).min(rows);
                store
                    .put_batch(&agent, (i..end).map(resource).collect())
                    .await
                    .expect("batch");
                i = end;
            }
        })
        .await;
        println!(
            "{engine}: write, batches of {BATCH}:             {:>9.0} resources/s",
            (rows - singles) as f64 / secs
        );

        let rss_before = rss_kib();
        let mut rss_peak = rss_before;
        let mut best_stream = 0f64;
        let mut best_raw = 0f64;
        for _ in 0..3 {
            let (n, secs) = timed(async {
                let stream = store.stream_current(PATIENT).await.expect("stream");
                let mut stream = std::pin::pin!(stream);
                let mut n = 0usize;
                while let Some(r) = stream.try_next().await.expect("read") {
                    n += usize::from(!r.body.is_empty());
                    // Sample resident memory while the stream is open.
                    if n.is_multiple_of(5_000) {
                        rss_peak = rss_peak.max(rss_kib());
                    }
                }
                n
            })
            .await;
            assert_eq!(n, rows);
            best_stream = best_stream.max(n as f64 / secs);

            let (n, secs) = timed(async {
                let sql = format!(
                    "{SELECT_CURRENT} WHERE r.patient_id = $1 ORDER BY r.resource_type, r.id"
                );
                let mut raw = sqlx::query(&sql)
                    .bind(PATIENT)
                    .fetch(gateway.state.db.read_pool());
                let mut n = 0usize;
                while let Some(row) = raw.try_next().await.expect("raw") {
                    let body: Vec<u8> = row.get(10);
                    n += usize::from(!body.is_empty());
                }
                n
            })
            .await;
            assert_eq!(n, rows);
            best_raw = best_raw.max(n as f64 / secs);
        }
        println!("{engine}: streaming read (decrypt):      {best_stream:>9.0} resources/s");
        println!("{engine}: raw scan of the same rows:     {best_raw:>9.0} rows/s");
        println!(
            "{engine}: raw / streaming:               {:>9.2}x",
            best_raw / best_stream
        );
        println!(
            "{engine}: resident memory while streaming grew by at most {} KiB (whole record ≈ {} KiB)",
            rss_peak.saturating_sub(rss_before),
            rows * resource(0).body.len() / 1024
        );
        gateway.state.db.close().await;
        env.cleanup().await;
    }
}
