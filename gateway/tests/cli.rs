//! The `phr-gateway` binary as an operator uses it: audit verify catches a changed byte and
//! a rewrite re-signed with the local key; bad configuration stops it with a clear message.

use std::path::Path;
use std::process::{Command, Output};

use sqlx::Row;

fn gateway(data_dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_phr-gateway"))
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .env("PHR_LOG__FORMAT", "pretty")
        .output()
        .expect("run phr-gateway")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

async fn sqlite(data_dir: &Path) -> sqlx::SqlitePool {
    sqlx::SqlitePool::connect(&format!(
        "sqlite://{}",
        data_dir.join("gateway.db").display()
    ))
    .await
    .expect("open gateway.db")
}

#[tokio::test]
async fn audit_verify_catches_a_changed_byte() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path();
    let first = gateway(data, &["audit", "checkpoint"]);
    assert!(first.status.success(), "{}", text(&first.stderr));
    assert!(text(&first.stdout).starts_with("phr-gateway.localhost/audit\n"));

    let ok = gateway(data, &["audit", "verify"]);
    assert!(ok.status.success(), "{}", text(&ok.stderr));
    assert!(text(&ok.stdout).contains("audit log OK"));

    let pool = sqlite(data).await;
    let body: Vec<u8> = sqlx::query("SELECT body FROM audit_leaves WHERE tree_index = 1")
        .fetch_one(&pool)
        .await
        .expect("leaf")
        .get(0);
    let mut changed = body.clone();
    changed[10] ^= 0x20;
    sqlx::query("UPDATE audit_leaves SET body = ? WHERE tree_index = 1")
        .bind(changed)
        .execute(&pool)
        .await
        .expect("tamper");
    pool.close().await;

    let bad = gateway(data, &["audit", "verify"]);
    assert_eq!(bad.status.code(), Some(3), "{}", text(&bad.stdout));
    assert!(
        text(&bad.stderr).contains("leaf 1 was changed"),
        "{}",
        text(&bad.stderr)
    );
}

#[tokio::test]
async fn audit_verify_catches_a_resigned_rewrite_with_a_trusted_checkpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path();
    let saved = dir.path().join("trusted-checkpoint.txt");
    let checkpoint = gateway(data, &["audit", "checkpoint"]);
    assert!(checkpoint.status.success());
    std::fs::write(&saved, &checkpoint.stdout).expect("save checkpoint");
    // More activity: each CLI start is itself audited.
    assert!(gateway(data, &["audit", "checkpoint"]).status.success());
    let consistent = gateway(
        data,
        &[
            "audit",
            "verify",
            "--trusted-checkpoint",
            saved.to_str().expect("path"),
        ],
    );
    assert!(consistent.status.success(), "{}", text(&consistent.stderr));
    assert!(text(&consistent.stdout).contains("consistent with trusted checkpoint"));

    // Rewrite history with database access, then let the gateway re-sign it with its own key.
    let pool = sqlite(data).await;
    let body: Vec<u8> = sqlx::query("SELECT body FROM audit_leaves WHERE tree_index = 0")
        .fetch_one(&pool)
        .await
        .expect("leaf")
        .get(0);
    let forged = text(&body).replace("\"outcome\":\"0\"", "\"outcome\":\"8\"");
    assert_ne!(forged.as_bytes(), body.as_slice());
    let mut hash_input = vec![0u8];
    hash_input.extend_from_slice(forged.as_bytes());
    let leaf_hash = <sha2::Sha256 as sha2::Digest>::digest(&hash_input).to_vec();
    for sql in [
        "DELETE FROM audit_checkpoints",
        "DELETE FROM audit_sequencer",
        "UPDATE audit_leaves SET tree_index = NULL",
    ] {
        sqlx::query(sql).execute(&pool).await.expect(sql);
    }
    sqlx::query("UPDATE audit_leaves SET body = ?, leaf_hash = ? WHERE id = (SELECT MIN(id) FROM audit_leaves)")
        .bind(forged.into_bytes())
        .bind(leaf_hash)
        .execute(&pool)
        .await
        .expect("forge");
    pool.close().await;
    assert!(
        gateway(data, &["audit", "checkpoint"]).status.success(),
        "re-sign"
    );

    let alone = gateway(data, &["audit", "verify"]);
    assert!(
        alone.status.success(),
        "the forged log is self-consistent: {}",
        text(&alone.stderr)
    );
    let caught = gateway(
        data,
        &[
            "audit",
            "verify",
            "--trusted-checkpoint",
            saved.to_str().expect("path"),
        ],
    );
    assert_eq!(caught.status.code(), Some(3));
    assert!(
        text(&caught.stderr).contains("not an append-only extension"),
        "{}",
        text(&caught.stderr)
    );
}

#[test]
fn audit_export_writes_ndjson_and_checks_its_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path();
    let out = dir.path().join("events.ndjson");
    let export = gateway(
        data,
        &[
            "audit",
            "export",
            "--since",
            "2000-01-01T00:00:00Z",
            "--out",
            out.to_str().expect("path"),
        ],
    );
    assert!(export.status.success(), "{}", text(&export.stderr));
    let lines = std::fs::read_to_string(&out).expect("export file");
    assert!(lines.lines().count() >= 1);
    for line in lines.lines() {
        let event: serde_json::Value = serde_json::from_str(line).expect("JSON line");
        assert_eq!(event["resourceType"], "AuditEvent");
    }
    let bad = gateway(data, &["audit", "export", "--since", "yesterday"]);
    assert!(!bad.status.success());
    assert!(
        text(&bad.stderr).contains("--since"),
        "{}",
        text(&bad.stderr)
    );
}

#[test]
fn bad_configuration_stops_start_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = gateway(dir.path(), &["--config", "/nonexistent.toml", "serve"]);
    assert!(!missing.status.success());
    assert!(text(&missing.stderr).contains("--config"));

    let file = dir.path().join("gateway.toml");
    std::fs::write(&file, "[tls]\nmin_version = \"1.1\"\n").expect("write");
    let bad = gateway(
        dir.path(),
        &["--config", file.to_str().expect("path"), "serve"],
    );
    assert!(!bad.status.success());
    assert!(
        text(&bad.stderr).contains("tls.min_version"),
        "{}",
        text(&bad.stderr)
    );

    let env = Command::new(env!("CARGO_BIN_EXE_phr-gateway"))
        .args(["--data-dir", dir.path().to_str().expect("path"), "serve"])
        .env("PHR_SESSIONS__IDLE_TIMEOUT_SECS", "never")
        .output()
        .expect("run");
    assert!(!env.status.success());
    assert!(
        text(&env.stderr).contains("sessions.idle_timeout_secs"),
        "{}",
        text(&env.stderr)
    );
    assert!(
        !dir.path().join("gateway.db").exists(),
        "nothing was opened"
    );
}

#[test]
fn openapi_command_prints_the_document() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = gateway(dir.path(), &["openapi"]);
    assert!(out.status.success());
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(doc["info"]["title"], "phr-gateway");
}

/// The value after `label` on its line of the command's output.
fn field<'a>(output: &'a str, label: &str) -> &'a str {
    output
        .lines()
        .find_map(|line| line.strip_prefix(label))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {label:?} in {output}"))
}

#[tokio::test]
async fn operator_add_prints_a_second_factor_and_break_glass_a_one_time_secret() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path();
    let added = gateway(data, &["operator", "add", "--username", "ops-1"]);
    assert!(added.status.success(), "{}", text(&added.stderr));
    let out = text(&added.stdout);
    assert!(field(&out, "password:").len() >= 40);
    let secret = field(&out, "TOTP secret:");
    assert!(field(&out, "TOTP URI:").starts_with("otpauth://totp/phr-gateway:ops-1?"));
    assert!(field(&out, "TOTP URI:").contains(secret));
    let codes: Vec<&str> = out
        .lines()
        .skip_while(|l| !l.starts_with("recovery codes"))
        .skip(1)
        .map(str::trim)
        .collect();
    assert_eq!(codes.len(), 10, "{out}");

    // Only hashes and sealed secrets are stored: none of the printed values is in the database.
    let pool = sqlite(data).await;
    let totp: Vec<u8> = sqlx::query("SELECT secret_sealed FROM totp_factors")
        .fetch_one(&pool)
        .await
        .expect("totp row")
        .get(0);
    assert!(!totp.windows(secret.len()).any(|w| w == secret.as_bytes()));
    let stored: i64 = sqlx::query("SELECT COUNT(*) FROM recovery_codes")
        .fetch_one(&pool)
        .await
        .expect("codes")
        .get(0);
    assert_eq!(stored, 10);
    pool.close().await;

    let again = gateway(data, &["operator", "add", "--username", "ops-1"]);
    assert!(!again.status.success());
    assert!(
        text(&again.stderr).contains("taken"),
        "{}",
        text(&again.stderr)
    );

    let glass = gateway(data, &["operator", "add-emergency", "--username", "glass"]);
    assert!(glass.status.success(), "{}", text(&glass.stderr));
    let first_secret = field(&text(&glass.stdout), "one-time secret:").to_string();
    let reissued = gateway(
        data,
        &[
            "operator",
            "reissue-emergency-secret",
            "--username",
            "glass",
        ],
    );
    assert!(reissued.status.success(), "{}", text(&reissued.stderr));
    assert_ne!(
        field(&text(&reissued.stdout), "one-time secret:"),
        first_secret
    );
    let not_glass = gateway(
        data,
        &[
            "operator",
            "reissue-emergency-secret",
            "--username",
            "ops-1",
        ],
    );
    assert!(!not_glass.status.success());
}

#[test]
fn disclosure_states_what_the_configuration_does() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path();
    let json = gateway(data, &["disclosure", "--format", "json"]);
    assert!(json.status.success(), "{}", text(&json.stderr));
    let document: serde_json::Value = serde_json::from_slice(&json.stdout).expect("json");
    let measure = |id: &str| {
        document["measures"]
            .as_array()
            .expect("measures")
            .iter()
            .find(|m| m["id"] == id)
            .cloned()
            .expect("measure")
    };
    // The default local sink is shipped but not write-once, and says so.
    assert_eq!(measure("audit-shipping")["on"], false);
    assert!(measure("audit-shipping")["state"]
        .as_str()
        .is_some_and(|s| s.contains("not ransomware-resilient")));
    assert_eq!(measure("backups")["on"], false);
    assert_eq!(measure("data-location")["on"], false);
    assert_eq!(measure("mfa")["on"], true);
    assert_eq!(measure("tls")["on"], true);

    // Declaring the location and turning the advisory check on changes what it says.
    let config = data.join("gateway.toml");
    std::fs::write(
        &config,
        "[disclosure]\ndata_location = \"日本国内（東京）\"\n\n[alerts]\nadvisory_db_dir = \"/srv/advisory-db\"\nwebhook_urls = [\"https://soc.example.jp/alerts\"]\n",
    )
    .expect("config");
    let html = Command::new(env!("CARGO_BIN_EXE_phr-gateway"))
        .arg("--data-dir")
        .arg(data)
        .arg("--config")
        .arg(&config)
        .args(["disclosure", "--format", "html"])
        .output()
        .expect("run");
    assert!(html.status.success(), "{}", text(&html.stderr));
    let page = text(&html.stdout);
    assert!(page.contains("サービス仕様適合開示書"));
    assert!(page.contains("日本国内（東京）"));
    assert!(page.contains("脆弱性照合: 有効"));

    let bad = gateway(data, &["disclosure", "--format", "pdf"]);
    assert!(!bad.status.success());
    assert!(text(&bad.stderr).contains("choose html or json"));
}

#[tokio::test]
async fn backup_and_restore_verify_from_the_command_line() {
    use age::secrecy::ExposeSecret;
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path();
    let identity = age::x25519::Identity::generate();
    let config = data.join("gateway.toml");
    std::fs::write(
        &config,
        format!("[backup]\nrecipient = \"{}\"\n", identity.to_public()),
    )
    .expect("config");
    let with_config = |args: &[&str]| gateway_with_config(data, &config, args);
    let made = with_config(&["backup"]);
    assert!(made.status.success(), "{}", text(&made.stderr));
    let generation = std::fs::read_dir(data.join("backups"))
        .expect("backups")
        .next()
        .expect("a generation")
        .expect("entry")
        .path();
    let key = data.join("offline.key");
    std::fs::write(&key, identity.to_string().expose_secret()).expect("key");
    let generation_arg = generation.display().to_string();
    let key_arg = key.display().to_string();
    let args = [
        "restore",
        "--verify",
        "--generation",
        generation_arg.as_str(),
        "--identity",
        key_arg.as_str(),
    ];
    let checked = with_config(&args);
    assert!(checked.status.success(), "{}", text(&checked.stderr));
    assert!(text(&checked.stdout).contains("verified"));

    let archive = generation.join("database.sqlite.age");
    let mut bytes = std::fs::read(&archive).expect("archive");
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&archive, bytes).expect("flip");
    let damaged = with_config(&args);
    assert_eq!(damaged.status.code(), Some(3));
    assert!(
        text(&damaged.stderr).contains("SHA-256"),
        "{}",
        text(&damaged.stderr)
    );

    // The backup and both verifications are in the audit log.
    let pool = sqlite(data).await;
    let leaves: Vec<String> = sqlx::query("SELECT body FROM audit_leaves")
        .fetch_all(&pool)
        .await
        .expect("leaves")
        .iter()
        .map(|row| String::from_utf8_lossy(&row.get::<Vec<u8>, _>(0)).into_owned())
        .collect();
    pool.close().await;
    let with = |needle: &str| leaves.iter().filter(|l| l.contains(needle)).count();
    assert_eq!(with("written ("), 1);
    assert_eq!(with("restored into scratch and verified"), 1);
    assert_eq!(with("failed verification"), 1);
}

#[test]
fn backup_drill_and_prune_from_the_command_line() {
    use age::secrecy::ExposeSecret;
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path();
    let identity = age::x25519::Identity::generate();
    let config = data.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[backup]\nrecipient = \"{}\"\nkeep_daily = 1\nkeep_weekly = 0\nkeep_monthly = 0\n",
            identity.to_public()
        ),
    )
    .expect("config");
    let with_config = |args: &[&str]| gateway_with_config(data, &config, args);
    let generations = || -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(data.join("backups"))
            .expect("backups")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    // Two generations on the same day: the policy of one daily keeps only the newest.
    let first = with_config(&["backup"]);
    assert!(first.status.success(), "{}", text(&first.stderr));
    std::thread::sleep(std::time::Duration::from_millis(1100));
    // Before the second one's prune, drill both.
    let key = data.join("offline.key");
    std::fs::write(&key, identity.to_string().expose_secret()).expect("key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let key_arg = key.display().to_string();
    let loose = with_config(&["backup", "drill", "--identity", &key_arg]);
    assert!(!loose.status.success());
    assert!(
        text(&loose.stderr).contains("chmod 600"),
        "{}",
        text(&loose.stderr)
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let drilled = with_config(&["backup", "drill", "--identity", &key_arg]);
    assert!(drilled.status.success(), "{}", text(&drilled.stderr));
    assert!(text(&drilled.stdout).contains("restored and verified"));

    let second = with_config(&["backup"]);
    assert!(second.status.success(), "{}", text(&second.stderr));
    let out = text(&second.stdout);
    assert!(out.contains("deleted "), "{out}");
    assert_eq!(generations().len(), 1, "the older one of the day went");

    // A database overwritten with other bytes: prune refuses and keeps everything.
    let third_day = with_config(&["backup", "prune"]);
    assert!(third_day.status.success(), "{}", text(&third_day.stderr));
    let db = data.join("gateway.db");
    let len = std::fs::metadata(&db).expect("db").len() as usize;
    std::fs::write(&db, vec![0x5a; len]).expect("overwrite");
    let refused = with_config(&["backup", "prune"]);
    assert_eq!(refused.status.code(), Some(4), "{}", text(&refused.stderr));
    assert!(text(&refused.stderr).contains("REFUSED"));
    assert_eq!(generations().len(), 1);
    // The drill fails clearly on a database it cannot open (it records its results there).
    let drill_broken = with_config(&["backup", "drill", "--identity", &key_arg]);
    assert!(!drill_broken.status.success());
}

fn gateway_with_config(data_dir: &Path, config: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_phr-gateway"))
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--config")
        .arg(config)
        .args(args)
        .env("PHR_LOG__FORMAT", "pretty")
        .output()
        .expect("run phr-gateway")
}

#[tokio::test]
async fn a_lost_kek_is_recovered_from_its_escrow_with_an_offline_identity() {
    use age::secrecy::ExposeSecret;
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let (holder, stranger) = (
        age::x25519::Identity::generate(),
        age::x25519::Identity::generate(),
    );
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!("[keys]\nescrow_recipients = [\"{}\"]\n", holder.to_public()),
    )
    .expect("config");
    let (identity, wrong) = (
        dir.path().join("holder.key"),
        dir.path().join("stranger.key"),
    );
    std::fs::write(&identity, holder.to_string().expose_secret()).expect("identity");
    std::fs::write(&wrong, stranger.to_string().expose_secret()).expect("identity");
    let escrow = dir.path().join("offsite.escrow");
    let escrow_arg = escrow.to_str().expect("path");

    let made = gateway_with_config(&data, &config, &["keys", "escrow", "--out", escrow_arg]);
    assert!(made.status.success(), "{}", text(&made.stderr));
    let status = gateway_with_config(&data, &config, &["keys", "status"]);
    let kek_id = text(&status.stdout)
        .lines()
        .next()
        .and_then(|l| l.rsplit(' ').next())
        .expect("kek id")
        .to_string();
    assert!(kek_id.starts_with("file:"), "{}", text(&status.stdout));
    assert!(text(&made.stdout).contains(&kek_id));

    let kek_path = data.join("keys/kek.key");
    let kek = std::fs::read(&kek_path).expect("kek");
    std::fs::remove_file(&kek_path).expect("lose the KEK");
    let recover = |identity: &Path, extra: &[&str]| {
        let mut args = vec![
            "keys",
            "recover-kek",
            "--escrow",
            escrow_arg,
            "--identity",
            identity.to_str().expect("path"),
        ];
        args.extend_from_slice(extra);
        gateway_with_config(&data, &config, &args)
    };
    let refused = recover(&wrong, &[]);
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("not one of the escrow's recipients"),
        "{}",
        text(&refused.stderr)
    );
    assert!(!kek_path.exists(), "nothing written on a wrong identity");

    let recovered = recover(&identity, &[]);
    assert!(recovered.status.success(), "{}", text(&recovered.stderr));
    assert!(
        text(&recovered.stdout).contains("header signature verified"),
        "{}",
        text(&recovered.stdout)
    );
    assert_eq!(std::fs::read(&kek_path).expect("kek"), kek);
    let mode = std::fs::metadata(&kek_path)
        .expect("meta")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);

    // A different KEK in place is not replaced without --force.
    std::fs::remove_file(&kek_path).expect("rm");
    std::fs::write(&kek_path, format!("{}\n", "cd".repeat(32))).expect("other kek");
    std::fs::set_permissions(&kek_path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let kept = recover(&identity, &[]);
    assert!(!kept.status.success());
    assert!(
        text(&kept.stderr).contains("--force"),
        "{}",
        text(&kept.stderr)
    );
    let forced = recover(&identity, &["--force"]);
    assert!(forced.status.success(), "{}", text(&forced.stderr));
    assert_eq!(std::fs::read(&kek_path).expect("kek"), kek);

    let verified = gateway_with_config(&data, &config, &["audit", "verify"]);
    assert!(verified.status.success(), "{}", text(&verified.stderr));
    let pool = sqlite(&data).await;
    let bodies: Vec<String> = sqlx::query("SELECT body FROM audit_leaves")
        .fetch_all(&pool)
        .await
        .expect("leaves")
        .iter()
        .map(|r| text(&r.get::<Vec<u8>, _>(0)))
        .collect();
    pool.close().await;
    assert_eq!(
        bodies
            .iter()
            .filter(|b| b.contains(" escrowed to "))
            .count(),
        1
    );
    assert_eq!(
        bodies
            .iter()
            .filter(|b| b.contains("recovered from escrow"))
            .count(),
        2
    );

    // A rotation escrows the new KEK at once when recipients are configured…
    let rotated = gateway_with_config(&data, &config, &["keys", "rotate-kek"]);
    assert!(rotated.status.success(), "{}", text(&rotated.stderr));
    assert!(
        text(&rotated.stdout).contains("is escrowed to 1 recipient(s)"),
        "{}",
        text(&rotated.stdout)
    );
    let new_kek = std::fs::read_to_string(&kek_path).expect("new kek");
    let escrowed: Vec<_> = std::fs::read_dir(data.join("escrow"))
        .expect("escrow dir")
        .filter_map(|e| e.ok())
        .collect();
    assert_eq!(escrowed.len(), 1);
    let file = phr_gateway::crypto::escrow::EscrowFile::parse(
        &std::fs::read_to_string(escrowed[0].path()).expect("escrow"),
    )
    .expect("parse");
    let opened = file
        .open(holder.to_string().expose_secret())
        .expect("opens");
    assert_eq!(hex::encode(opened.as_slice()), new_kek.trim());
    // …and says it needs one when none are.
    let plain = dir.path().join("plain.toml");
    std::fs::write(&plain, "").expect("config");
    let bare = gateway_with_config(&data, &plain, &["keys", "rotate-kek"]);
    assert!(bare.status.success(), "{}", text(&bare.stderr));
    assert!(text(&bare.stdout).contains("has no escrow yet"));
}

#[test]
fn audit_verify_passes_across_an_audit_key_rotation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path();
    assert!(gateway(data, &["audit", "checkpoint"]).status.success());
    let before = text(&gateway(data, &["audit", "verifier-key"]).stdout);
    let rotated = gateway(data, &["keys", "rotate-audit"]);
    assert!(rotated.status.success(), "{}", text(&rotated.stderr));
    let after = text(&gateway(data, &["audit", "verifier-key"]).stdout);
    assert_ne!(before, after);
    assert!(text(&rotated.stdout).contains(after.trim()));
    assert!(gateway(data, &["audit", "checkpoint"]).status.success());
    let verified = gateway(data, &["audit", "verify"]);
    assert!(verified.status.success(), "{}", text(&verified.stderr));
    assert!(text(&verified.stdout).contains("audit log OK"));

    // Without the history of retired keys the old checkpoints no longer verify.
    std::fs::remove_file(data.join("keys/audit-signing.key.history")).expect("rm");
    let lost = gateway(data, &["audit", "verify"]);
    assert_eq!(lost.status.code(), Some(3), "{}", text(&lost.stdout));
}

#[test]
fn rotate_jws_keeps_the_old_key_for_its_overlap() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path();
    let rotated = gateway(data, &["keys", "rotate-jws"]);
    assert!(rotated.status.success(), "{}", text(&rotated.stderr));
    let previous: Vec<_> = std::fs::read_dir(data.join("keys"))
        .expect("keys")
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("id-token-signing.pem.previous-")
        })
        .collect();
    assert_eq!(previous.len(), 1);
    assert!(text(&rotated.stdout).contains("SIGHUP"));
}

#[tokio::test]
async fn key_store_backup_verify_and_restore_from_the_command_line() {
    use age::secrecy::ExposeSecret;
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path();
    let identity = age::x25519::Identity::generate();
    let keys_identity = age::x25519::Identity::generate();
    let config = data.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[backup]\nrecipient = \"{}\"\nkey_store_recipient = \"{}\"\n",
            identity.to_public(),
            keys_identity.to_public()
        ),
    )
    .expect("config");
    let with_config = |args: &[&str]| gateway_with_config(data, &config, args);
    let made = with_config(&["backup", "--key-store"]);
    assert!(made.status.success(), "{}", text(&made.stderr));
    assert!(text(&made.stdout).contains("key-store backup"));
    assert!(
        !data.join("backups").exists(),
        "apart from the data generations"
    );
    let generation = std::fs::read_dir(data.join("key-store-backups"))
        .expect("key-store backups")
        .next()
        .expect("a generation")
        .expect("entry")
        .path();
    assert!(generation.join("keys.sqlite.age").exists());
    let key = data.join("offline-keys.key");
    std::fs::write(&key, keys_identity.to_string().expose_secret()).expect("key");
    let data_key = data.join("offline.key");
    std::fs::write(&data_key, identity.to_string().expose_secret()).expect("key");
    let generation_arg = generation.display().to_string();
    let key_arg = key.display().to_string();
    let verify = |extra: &[&str], key: &str| {
        let mut args = vec!["restore"];
        args.extend_from_slice(extra);
        args.extend(["--generation", generation_arg.as_str(), "--identity", key]);
        with_config(&args)
    };
    // Its own recipient: the data generations' key does not open it.
    let wrong = verify(
        &["--verify", "--key-store"],
        &data_key.display().to_string(),
    );
    assert_eq!(wrong.status.code(), Some(3), "{}", text(&wrong.stderr));
    assert!(text(&wrong.stderr).contains("wrong key"));
    let checked = verify(&["--verify", "--key-store"], &key_arg);
    assert!(checked.status.success(), "{}", text(&checked.stderr));
    // A key-store generation is refused where a database generation is expected.
    let refused = verify(&["--verify"], &key_arg);
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("is a key-store generation"),
        "{}",
        text(&refused.stderr)
    );
    let restored = verify(&["--key-store"], &key_arg);
    assert!(restored.status.success(), "{}", text(&restored.stderr));
    assert!(
        text(&restored.stdout).contains("shredded again"),
        "{}",
        text(&restored.stdout)
    );
}
