//! The tamper-evident audit log on both engines: every stored byte is covered, and each way
//! of tampering is detected with its own error.

use phr_gateway::audit::checkpoint::Checkpoint;
use phr_gateway::audit::merkle;
use phr_gateway::audit::verify::{verify, Tamper, VerifyError, VerifyReport};
use phr_gateway::audit::{Agent, AuditEvent, EventKind};
use phr_gateway::Gateway;
use sqlx::Row;

use crate::both_engines;
use crate::helpers::{Engine, TestEnv};

both_engines!(
    verify_passes_on_an_untouched_log,
    flipped_byte_names_the_leaf,
    deleted_leaf_is_detected,
    reordered_leaves_are_detected,
    bad_checkpoint_signature_is_detected,
    rewrite_resigned_with_local_key_is_caught_by_trusted_checkpoint,
    proofs_verify_against_signed_checkpoints,
    concurrent_writers_get_one_consistent_sequence,
    export_writes_leaves_since_a_time,
    concurrent_reads_share_commits_and_every_leaf_lands_once,
);

async fn gateway_with_leaves(env: &TestEnv, n: usize) -> Gateway {
    let gateway = Gateway::build(env.config()).await.expect("build");
    for i in 0..n {
        let event = AuditEvent::new(EventKind::Read, Agent::system())
            .patient(format!("p{i}"))
            .resource(format!("Observation/o{i}"));
        gateway
            .state
            .audit
            .record_now(&event)
            .await
            .expect("record");
    }
    gateway.state.audit.sequence(true).await.expect("sequence");
    gateway
}

async fn run_verify(gateway: &Gateway, trusted: Option<&str>) -> Result<VerifyReport, VerifyError> {
    let audit = &gateway.state.audit;
    verify(audit.database(), &audit.verifier(), audit.origin(), trusted).await
}

fn tamper(result: Result<VerifyReport, VerifyError>) -> Tamper {
    match result {
        Err(VerifyError::Tamper(t)) => t,
        other => panic!("expected tampering to be detected, got {other:?}"),
    }
}

async fn exec(gateway: &Gateway, sql: &str) {
    sqlx::query(sql)
        .execute(gateway.state.db.write_pool())
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

async fn leaf_body(gateway: &Gateway, index: i64) -> Vec<u8> {
    sqlx::query("SELECT body FROM audit_leaves WHERE tree_index = $1")
        .bind(index)
        .fetch_one(gateway.state.db.read_pool())
        .await
        .expect("leaf")
        .get(0)
}

async fn verify_passes_on_an_untouched_log(engine: Engine) {
    let env = TestEnv::new(engine).await;
    let gateway = gateway_with_leaves(&env, 25).await;
    let report = run_verify(&gateway, None).await.expect("verify");
    let leaves: i64 = sqlx::query("SELECT COUNT(*) FROM audit_leaves")
        .fetch_one(gateway.state.db.read_pool())
        .await
        .expect("count")
        .get(0);
    assert_eq!(report.tree_size, leaves as u64);
    assert!(report.tree_size >= 25);
    assert!(report.checkpoints_checked >= 2, "{report:?}");
    assert_eq!(report.latest_checkpoint, Some(report.tree_size));
    assert_eq!(report.unsequenced, 0);
    // Leaves carry no PHI: opaque ids only.
    let body = String::from_utf8(leaf_body(&gateway, 5).await).expect("utf8");
    assert!(body.contains("\"resourceType\":\"AuditEvent\""));
}

async fn flipped_byte_names_the_leaf(engine: Engine) {
    let env = TestEnv::new(engine).await;
    let gateway = gateway_with_leaves(&env, 12).await;
    let mut body = leaf_body(&gateway, 7).await;
    body[20] ^= 0x01;
    sqlx::query("UPDATE audit_leaves SET body = $1 WHERE tree_index = 7")
        .bind(body)
        .execute(gateway.state.db.write_pool())
        .await
        .expect("tamper");
    assert_eq!(
        tamper(run_verify(&gateway, None).await),
        Tamper::LeafChanged { index: 7 }
    );

    // The stored leaf hash is covered too.
    let env2 = TestEnv::new(engine).await;
    let gateway2 = gateway_with_leaves(&env2, 12).await;
    let hash: Vec<u8> = sqlx::query("SELECT leaf_hash FROM audit_leaves WHERE tree_index = 3")
        .fetch_one(gateway2.state.db.read_pool())
        .await
        .expect("hash")
        .get(0);
    let mut flipped = hash.clone();
    flipped[0] ^= 0x80;
    sqlx::query("UPDATE audit_leaves SET leaf_hash = $1 WHERE tree_index = 3")
        .bind(flipped)
        .execute(gateway2.state.db.write_pool())
        .await
        .expect("tamper");
    assert_eq!(
        tamper(run_verify(&gateway2, None).await),
        Tamper::LeafChanged { index: 3 }
    );
}

async fn deleted_leaf_is_detected(engine: Engine) {
    let env = TestEnv::new(engine).await;
    let gateway = gateway_with_leaves(&env, 12).await;
    exec(&gateway, "DELETE FROM audit_leaves WHERE tree_index = 4").await;
    assert_eq!(
        tamper(run_verify(&gateway, None).await),
        Tamper::LeafMissing { index: 4, found: 5 }
    );

    // Deleting the newest leaves is caught by the checkpoint that covers them.
    let env2 = TestEnv::new(engine).await;
    let gateway2 = gateway_with_leaves(&env2, 12).await;
    let size = run_verify(&gateway2, None).await.expect("clean").tree_size;
    exec(
        &gateway2,
        &format!("DELETE FROM audit_leaves WHERE tree_index = {}", size - 1),
    )
    .await;
    assert_eq!(
        tamper(run_verify(&gateway2, None).await),
        Tamper::Truncated {
            size,
            log_size: size - 1
        }
    );
}

async fn reordered_leaves_are_detected(engine: Engine) {
    let env = TestEnv::new(engine).await;
    let gateway = gateway_with_leaves(&env, 12).await;
    // Swap two whole rows' positions (body and hash move together, so each row is
    // self-consistent): only the signed checkpoint can tell.
    exec(
        &gateway,
        "UPDATE audit_leaves SET tree_index = -1 WHERE tree_index = 2",
    )
    .await;
    exec(
        &gateway,
        "UPDATE audit_leaves SET tree_index = 2 WHERE tree_index = 9",
    )
    .await;
    exec(
        &gateway,
        "UPDATE audit_leaves SET tree_index = 9 WHERE tree_index = -1",
    )
    .await;
    match tamper(run_verify(&gateway, None).await) {
        Tamper::CheckpointRoot { size, from } => assert!(from <= 2 && size > 9, "{from}..{size}"),
        other => panic!("expected a checkpoint mismatch, got {other}"),
    }
}

async fn bad_checkpoint_signature_is_detected(engine: Engine) {
    let env = TestEnv::new(engine).await;
    let gateway = gateway_with_leaves(&env, 12).await;
    let row =
        sqlx::query("SELECT tree_size, note FROM audit_checkpoints ORDER BY tree_size LIMIT 1")
            .fetch_one(gateway.state.db.read_pool())
            .await
            .expect("checkpoint");
    let size: i64 = row.get(0);
    let note: String = row.get(1);
    // Change one character of the base64 signature.
    let sig_start = note.rfind(' ').expect("signature") + 5;
    let mut bytes = note.into_bytes();
    bytes[sig_start] = if bytes[sig_start] == b'A' { b'B' } else { b'A' };
    sqlx::query("UPDATE audit_checkpoints SET note = $1 WHERE tree_size = $2")
        .bind(String::from_utf8(bytes).expect("utf8"))
        .bind(size)
        .execute(gateway.state.db.write_pool())
        .await
        .expect("tamper");
    match tamper(run_verify(&gateway, None).await) {
        Tamper::CheckpointSignature { size: s, .. } => assert_eq!(s as i64, size),
        other => panic!("expected a signature failure, got {other}"),
    }
}

async fn rewrite_resigned_with_local_key_is_caught_by_trusted_checkpoint(engine: Engine) {
    let env = TestEnv::new(engine).await;
    let gateway = gateway_with_leaves(&env, 12).await;
    let trusted = gateway
        .state
        .audit
        .latest_checkpoint()
        .await
        .expect("cp")
        .expect("some");

    // Legitimate growth stays consistent with the trusted checkpoint.
    for _ in 0..5 {
        gateway
            .state
            .audit
            .record_now(&AuditEvent::new(EventKind::Login, Agent::system()))
            .await
            .expect("record");
    }
    gateway.state.audit.sequence(true).await.expect("sequence");
    let report = run_verify(&gateway, Some(&trusted))
        .await
        .expect("consistent");
    let trusted_size = Checkpoint::parse_body(
        &gateway
            .state
            .audit
            .verifier()
            .verify(&trusted)
            .expect("sig"),
    )
    .expect("body")
    .size;
    assert_eq!(report.trusted_size, Some(trusted_size));

    // An attacker with the database and the local signing key rewrites leaf 3 and re-signs
    // the whole log with the gateway's own sequencer.
    let mut body = leaf_body(&gateway, 3).await;
    let text = String::from_utf8(body.clone())
        .expect("utf8")
        .replace("\"outcome\":\"0\"", "\"outcome\":\"8\"");
    assert_ne!(text.as_bytes(), body.as_slice());
    body = text.into_bytes();
    sqlx::query("UPDATE audit_leaves SET body = $1, leaf_hash = $2 WHERE tree_index = 3")
        .bind(body.clone())
        .bind(merkle::leaf_hash(&body).to_vec())
        .execute(gateway.state.db.write_pool())
        .await
        .expect("rewrite");
    exec(&gateway, "DELETE FROM audit_checkpoints").await;
    exec(&gateway, "DELETE FROM audit_sequencer").await;
    exec(&gateway, "UPDATE audit_leaves SET tree_index = NULL").await;
    gateway.state.audit.sequence(true).await.expect("re-sign");

    // Locally the forged log is self-consistent…
    run_verify(&gateway, None)
        .await
        .expect("re-signed log verifies on its own");
    // …but not against the checkpoint saved earlier.
    assert_eq!(
        tamper(run_verify(&gateway, Some(&trusted)).await),
        Tamper::Fork { size: trusted_size }
    );
    // A trusted checkpoint that is itself forged is refused.
    let forged = trusted.replace(&trusted_size.to_string(), &(trusted_size + 1).to_string());
    assert!(matches!(
        tamper(run_verify(&gateway, Some(&forged)).await),
        Tamper::TrustedUnreadable(_)
    ));
}

async fn proofs_verify_against_signed_checkpoints(engine: Engine) {
    let env = TestEnv::new(engine).await;
    let gateway = gateway_with_leaves(&env, 9).await;
    let audit = &gateway.state.audit;
    let note = audit.latest_checkpoint().await.expect("cp").expect("some");
    let cp = Checkpoint::parse_body(&audit.verifier().verify(&note).expect("sig")).expect("body");
    for index in [0u64, 4, cp.size - 1] {
        let proof = audit.inclusion_proof(index, cp.size).await.expect("proof");
        let leaf = merkle::leaf_hash(&leaf_body(&gateway, index as i64).await);
        merkle::verify_inclusion(index, cp.size, &leaf, &proof, &cp.root).expect("inclusion");
        let wrong = merkle::leaf_hash(b"not in the log");
        assert!(merkle::verify_inclusion(index, cp.size, &wrong, &proof, &cp.root).is_err());
    }
    let older =
        sqlx::query("SELECT tree_size, root FROM audit_checkpoints ORDER BY tree_size LIMIT 1")
            .fetch_one(gateway.state.db.read_pool())
            .await
            .expect("older");
    let old_size = older.get::<i64, _>(0) as u64;
    let old_root: [u8; 32] = older.get::<Vec<u8>, _>(1).try_into().expect("32");
    let proof = audit
        .consistency_proof(old_size, cp.size)
        .await
        .expect("consistency");
    merkle::verify_consistency(old_size, cp.size, &old_root, &cp.root, &proof).expect("consistent");
    assert!(audit.inclusion_proof(0, cp.size + 100).await.is_err());
}

async fn concurrent_writers_get_one_consistent_sequence(engine: Engine) {
    let env = TestEnv::new(engine).await;
    let gateway = Gateway::build(env.config()).await.expect("build");
    let mut tasks = Vec::new();
    for w in 0..8 {
        let audit = gateway.state.audit.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..25 {
                let event =
                    AuditEvent::new(EventKind::Read, Agent::system()).patient(format!("w{w}-{i}"));
                audit.record_now(&event).await.expect("record");
                if i % 10 == 0 {
                    audit.sequence(false).await.expect("sequence while writing");
                }
            }
        }));
    }
    for task in tasks {
        task.await.expect("writer");
    }
    gateway.state.audit.sequence(true).await.expect("sequence");
    let report = run_verify(&gateway, None).await.expect("verify");
    assert!(report.tree_size >= 200);
    assert_eq!(report.unsequenced, 0);
}

async fn export_writes_leaves_since_a_time(engine: Engine) {
    let env = TestEnv::new(engine).await;
    let gateway = gateway_with_leaves(&env, 5).await;
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let since = phr_gateway::store::now_millis();
    for i in 0..3 {
        let event = AuditEvent::new(EventKind::Export, Agent::system()).patient(format!("late{i}"));
        gateway
            .state
            .audit
            .record_now(&event)
            .await
            .expect("record");
    }
    let mut out = Vec::new();
    let count = phr_gateway::audit::export::export_since(&gateway.state.db, since, &mut out)
        .await
        .expect("export");
    assert_eq!(count, 3);
    let lines: Vec<serde_json::Value> = out
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).expect("json line"))
        .collect();
    assert_eq!(lines.len(), 3);
    assert!(lines
        .iter()
        .all(|l| l["resourceType"] == "AuditEvent" && l["type"]["code"] == "110106"));
}

/// Many stand-alone leaves at once (as under a load of FHIR reads): each caller returns
/// only when its leaf is committed, every leaf is there exactly once, and the log verifies.
async fn concurrent_reads_share_commits_and_every_leaf_lands_once(engine: Engine) {
    let env = TestEnv::new(engine).await;
    let gateway = Gateway::build(env.config()).await.expect("build");
    let before: i64 = sqlx::query("SELECT COUNT(*) FROM audit_leaves")
        .fetch_one(gateway.state.db.read_pool())
        .await
        .expect("count")
        .get(0);
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let audit = gateway.state.audit.clone();
            tokio::spawn(async move {
                let event = AuditEvent::new(EventKind::Read, Agent::system())
                    .patient("p-load")
                    .resource(format!("Observation/load-{i}"));
                audit.record_now(&event).await.expect("record");
                // Committed before the call returned: visible to a fresh read now.
                let marker = format!("Observation/load-{i}\"");
                let bodies: Vec<Vec<u8>> =
                    sqlx::query_scalar("SELECT body FROM audit_leaves WHERE patient_id = 'p-load'")
                        .fetch_all(audit.database().read_pool())
                        .await
                        .expect("bodies");
                assert!(
                    bodies
                        .iter()
                        .any(|b| String::from_utf8_lossy(b).contains(&marker)),
                    "{marker} committed before record_now returned"
                );
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("task");
    }
    let after: i64 = sqlx::query("SELECT COUNT(*) FROM audit_leaves")
        .fetch_one(gateway.state.db.read_pool())
        .await
        .expect("count")
        .get(0);
    assert_eq!(after - before, 200);
    let bodies: Vec<Vec<u8>> =
        sqlx::query_scalar("SELECT body FROM audit_leaves WHERE patient_id = 'p-load'")
            .fetch_all(gateway.state.db.read_pool())
            .await
            .expect("bodies");
    let mut seen: Vec<String> = bodies
        .iter()
        .map(|b| String::from_utf8_lossy(b).to_string())
        .collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 200, "each leaf once");
    gateway.state.audit.sequence(true).await.expect("sequence");
    let report = run_verify(&gateway, None).await.expect("verify");
    assert_eq!(report.unsequenced, 0);
    assert_eq!(report.tree_size, after as u64);
}
