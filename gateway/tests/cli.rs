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
    let with_config = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_phr-gateway"))
            .arg("--data-dir")
            .arg(data)
            .arg("--config")
            .arg(&config)
            .args(args)
            .env("PHR_LOG__FORMAT", "pretty")
            .output()
            .expect("run phr-gateway")
    };
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
    let with_config = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_phr-gateway"))
            .arg("--data-dir")
            .arg(data)
            .arg("--config")
            .arg(&config)
            .args(args)
            .env("PHR_LOG__FORMAT", "pretty")
            .output()
            .expect("run phr-gateway")
    };
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
