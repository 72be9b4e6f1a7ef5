//! Backup benchmark — the recovery time objective an institution would sign: for N stored
//! resources, how long a backup generation takes, how large its encrypted archive is, and
//! how long a verified restore (decrypt, restore into scratch, row counts, the whole audit
//! tree recomputed) takes; and the same for the key store, which is backed up apart.
//!
//! `cargo bench -p phr-gateway --bench backup` (PHR_BENCH_BACKUP_RESOURCES to change N,
//! default 1,000,000; PHR_BENCH_ENGINES=sqlite|postgres for one engine).

#[path = "support.rs"]
mod support;

use age::secrecy::ExposeSecret;
use futures::{StreamExt, TryStreamExt};
use phr_gateway::audit::Agent;
use phr_gateway::backup;
use phr_gateway::store::resources::{NewResource, SourceIdentity};
use support::{engines, timed, BenchEnv};

const BATCH: usize = 500;
/// Resources per patient (each patient has a data key of their own).
const PER_PATIENT: usize = 1_000;

fn resource(i: usize) -> NewResource {
    // About 1 KB, like a typical lab Observation (as in the store benchmark).
    let padding = "検査結果の所見。".repeat(40);
    let body = format!(
        r#"{{"resourceType":"Observation","id":"o{i}","status":"final","code":{{"coding":[{{"system":"urn:oid:1.2.392.200119.6.1005","code":"3D045000001906202","display":"HbA1c"}}]}},"valueQuantity":{{"value":{v},"unit":"%","system":"http://unitsofmeasure.org","code":"%"}},"note":[{{"text":"{padding}"}}]}}"#,
        v = 5.0 + (i % 30) as f64 / 10.0
    );
    NewResource {
        patient_id: format!("bench-patient-{}", i / PER_PATIENT),
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

/// Patients seeded at once.
const SEEDING_CONCURRENCY: usize = 8;

/// Resources `first..end` (one patient's), in batches of `BATCH`.
async fn seed_patient(
    state: &phr_gateway::http::AppState,
    agent: &Agent,
    first: usize,
    end: usize,
) -> phr_gateway::Result<()> {
    let mut i = first;
    while i < end {
        let stop = (i + BATCH).min(end);
        state
            .resources
            .put_batch(agent, (i..stop).map(resource).collect())
            .await?;
        i = stop;
    }
    Ok(())
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

#[tokio::main]
async fn main() {
    let resources: usize = std::env::var("PHR_BENCH_BACKUP_RESOURCES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    println!(
        "backup benchmark: {resources} resources of ~{} bytes, {PER_PATIENT} per patient",
        resource(0).body.len()
    );
    for engine in engines() {
        let Some(env) = BenchEnv::new(engine).await else {
            println!("{engine}: not reachable, skipped");
            continue;
        };
        let gateway = env.gateway().await;
        let state = &gateway.state;
        let agent = Agent::system();
        // Patients are seeded a few at a time so the database's round trips overlap
        // (seeding is not part of the figure).
        let (seeded, secs) = timed(
            futures::stream::iter((0..resources).step_by(PER_PATIENT))
                .map(|first| {
                    seed_patient(state, &agent, first, (first + PER_PATIENT).min(resources))
                })
                .buffer_unordered(SEEDING_CONCURRENCY)
                .try_collect::<Vec<()>>(),
        )
        .await;
        seeded.expect("seed");
        println!("{engine}: seeded in {secs:.0} s");

        let identity = age::x25519::Identity::generate();
        let recipient = identity.to_public().to_string();
        let secret = identity.to_string().expose_secret().to_string();
        let mut options = backup::Options::from_config(&env.config);
        options.scratch_dir = env.config.data_dir.join("restore-scratch");
        let directory = env.config.data_dir.join("backups");

        let (manifest, secs) = timed(backup::create_with(
            &state.db,
            &state.audit,
            &directory,
            &recipient,
            &options,
        ))
        .await;
        let manifest = manifest.expect("backup");
        println!(
            "{engine}: backup:            {secs:>8.1} s, archive {:>8.1} MiB ({} rows in {} tables)",
            mib(manifest.archive_bytes),
            manifest.row_counts.values().sum::<i64>(),
            manifest.row_counts.len()
        );
        let (verified, secs) = timed(backup::verify_with(
            &directory.join(&manifest.generation),
            &secret,
            &state.audit.verifiers(),
            state.audit.origin(),
            &options,
        ))
        .await;
        verified.expect("no I/O error").expect("verifies");
        println!(
            "{engine}: verified restore:  {secs:>8.1} s (decrypt, restore into scratch, row counts, audit tree of {} leaves recomputed)",
            manifest.audit_tree_size
        );
        let _ = std::fs::remove_dir_all(&options.scratch_dir);

        let keys_dir = env.config.data_dir.join("key-store-backups");
        let (keys, secs) = timed(backup::create_key_store(
            &state.keys,
            &state.db,
            &state.audit,
            &keys_dir,
            &recipient,
            &options,
        ))
        .await;
        let keys = keys.expect("key-store backup");
        println!(
            "{engine}: key-store backup:  {secs:>8.2} s, archive {:>8.2} MiB ({} keys)",
            mib(keys.archive_bytes),
            keys.row_counts.values().sum::<i64>()
        );
        let (verified, secs) = timed(backup::verify_key_store(
            &keys_dir.join(&keys.generation),
            &secret,
            &state.audit.verifiers(),
            &options,
        ))
        .await;
        verified.expect("no I/O error").expect("verifies");
        println!("{engine}: key-store verify:  {secs:>8.2} s");
        gateway.state.db.close().await;
        env.cleanup().await;
    }
}
