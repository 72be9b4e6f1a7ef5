//! `phr-gateway disclosure`: what an institution reads before it signs, in the spirit of the
//! サービス仕様適合開示書 and the MDS/SDS checklist — which 2省GL measures are on in *this*
//! configuration (nothing is claimed that the configuration does not do), answers to a
//! procurement checklist with their evidence, and who is responsible for what. Facts are
//! gathered from the live configuration (`gather`); turning them into the document is pure.

use maud::{html, Markup, DOCTYPE};
use serde::Serialize;

use crate::config::Config;
use crate::error::Result;
use crate::supply_chain::SupplyChainEntry;

/// What the configuration actually does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    /// HTTPS served (not the loopback-only plain HTTP flag).
    pub tls: bool,
    pub tls_min_version: String,
    /// The certificate is the generated development one.
    pub dev_certificate: bool,
    pub mutual_tls: bool,
    /// Where the audit log is shipped, and whether that copy is write-once.
    pub audit_sink: Option<(String, bool)>,
    /// Where the key-encryption key is kept (a 0600 file, or a PKCS#11 token), and where
    /// the data keys are kept.
    pub kek_custody: String,
    /// Offline recipients the KEK is escrowed to (0: no escrow configured).
    pub kek_escrow_recipients: usize,
    pub key_store: String,
    pub advisory_check: bool,
    pub end_of_life_check: bool,
    pub break_glass_probe: String,
    pub break_glass_session_minutes: u64,
    pub break_glass_review_hours: u64,
    pub alert_webhooks: usize,
    pub data_location: Option<String>,
    pub supply_chain: Vec<SupplyChainEntry>,
    /// Backups, when configured (`backup.recipient`).
    pub backups: Option<BackupFacts>,
}

/// Where backup generations go, the policy, and the last verified restore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupFacts {
    pub store: String,
    /// The store is write-once (S3 Object Lock in compliance mode).
    pub write_once: bool,
    pub policy: String,
    /// The last verified restore: generation, when (RFC 3339), restore milliseconds.
    pub last_verified: Option<(String, String, i64)>,
}

/// The backups' facts: the store is asked about itself (S3: its Object Lock setting) and
/// the database for the last verified restore (both may be unreachable: then not claimed).
async fn backup_facts(config: &Config) -> Option<BackupFacts> {
    config.backup.recipient.as_ref()?;
    let store = crate::backup::storage::from_config(&config.backup, &config.data_dir).await;
    let (store, write_once) = match store {
        Ok(store) => (store.describe(), store.is_write_once()),
        Err(error) => (format!("unavailable ({error})"), false),
    };
    let last_verified = match crate::store::Database::connect(
        &config.database_url(),
        1,
        std::time::Duration::from_secs(5),
    )
    .await
    {
        Ok(db) => {
            let last = crate::backup::generations::last_verified(&db).await;
            db.close().await;
            last.ok().flatten().map(|last| {
                (
                    last.generation,
                    crate::store::millis_to_rfc3339(last.verified_at_millis),
                    last.restore_millis,
                )
            })
        }
        Err(_) => None,
    };
    Some(BackupFacts {
        store,
        write_once,
        policy: crate::backup::retention::Policy::of(&config.backup).describe(),
        last_verified,
    })
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Measure {
    pub id: &'static str,
    pub title: &'static str,
    /// Whether the measure is in force as configured.
    pub on: bool,
    pub state: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChecklistAnswer {
    pub question: &'static str,
    /// `yes` or `no`.
    pub answer: &'static str,
    pub evidence: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Responsibility {
    pub task: &'static str,
    pub gateway_operator: &'static str,
    pub institution: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Disclosure {
    pub measures: Vec<Measure>,
    pub checklist: Vec<ChecklistAnswer>,
    pub responsibilities: Vec<Responsibility>,
    pub subprocessors: Vec<SupplyChainEntry>,
}

/// The facts of a configuration. The audit sink is asked about itself (an S3 bucket's
/// Object Lock setting), so this may reach the network.
pub async fn gather(config: &Config) -> Result<Facts> {
    let audit_sink = if config.audit_shipping.enabled {
        let sink = crate::audit::shipping::sink_from_config(config)?;
        if let Err(error) = sink.refresh().await {
            tracing::warn!(%error, "the audit sink could not describe itself");
        }
        Some((sink.describe(), sink.is_write_once()))
    } else {
        None
    };
    let supply_chain_text = crate::supply_chain::list_text(config)?;
    let break_glass = &config.break_glass;
    Ok(Facts {
        tls: !config.insecure_http,
        tls_min_version: match config.tls.min_version {
            crate::tls::TlsVersion::V1_2 => "1.2".into(),
            crate::tls::TlsVersion::V1_3 => "1.3".into(),
        },
        dev_certificate: config.tls.cert_file.is_none(),
        mutual_tls: config.tls.client_ca_file.is_some(),
        audit_sink,
        kek_custody: match &config.keys.pkcs11 {
            Some(token) => format!(
                "PKCS#11トークン {}（取り出し不可の鍵） / on PKCS#11 token {}, non-extractable",
                token.token_label, token.token_label
            ),
            None => format!(
                "{}、権限0600 / file {}, mode 0600",
                config.kek_path().display(),
                config.kek_path().display()
            ),
        },
        kek_escrow_recipients: if config.keys.pkcs11.is_some() {
            0
        } else {
            config.keys.escrow_recipients.len()
        },
        key_store: match (&config.database.key_store_url, &config.database.url) {
            (Some(_), _) => "別のデータベース / a separate database".into(),
            (None, None) => "別のSQLiteファイル keys.db / a separate SQLite file".into(),
            (None, Some(_)) => format!(
                "同じPostgreSQLの別スキーマ {} / a separate schema of the same PostgreSQL",
                config.database.key_store_schema
            ),
        },
        advisory_check: config.alerts.advisory_db_dir.is_some(),
        end_of_life_check: config.alerts.check_end_of_life,
        break_glass_probe: match &break_glass.normal_login_probe_url {
            Some(url) => format!("外部IdP {url} に到達できない間 / while the identity provider at {url} is unreachable"),
            None => "2要素認証の格納先（DBと鍵ストア）に到達できない間 / while the second-factor store is unreachable".into(),
        },
        break_glass_session_minutes: break_glass.session_minutes,
        break_glass_review_hours: break_glass.review_within_hours,
        alert_webhooks: config.alerts.webhook_urls.len(),
        data_location: config.disclosure.data_location.clone(),
        supply_chain: crate::supply_chain::parse(&supply_chain_text, crate::store::japan_today())?,
        backups: backup_facts(config).await,
    })
}

fn yes_no(on: bool) -> &'static str {
    if on {
        "yes"
    } else {
        "no"
    }
}

fn last_verified_text(backups: &BackupFacts) -> String {
    match &backups.last_verified {
        Some((generation, at, millis)) => {
            format!("{generation} at {at} ({:.1} s)", *millis as f64 / 1000.0)
        }
        None => "none / なし".into(),
    }
}

/// The document for a set of facts.
pub fn disclosure(facts: &Facts) -> Disclosure {
    let shipped_write_once = matches!(facts.audit_sink, Some((_, true)));
    let sink_state = match &facts.audit_sink {
        Some((describe, true)) => format!("{describe}（書き換え・削除不可 / write-once）"),
        Some((describe, false)) => format!(
            "{describe}（ランサムウェア耐性なし：このホストの権限で削除できる / not ransomware-resilient: deletable with this host's credentials）"
        ),
        None => "送出していない / not shipped".into(),
    };
    let tls_state = if facts.tls {
        format!(
            "TLS {}以上（1.3優先、ECDHE+AEADのみ）{}{}",
            facts.tls_min_version,
            if facts.dev_certificate {
                "、開発用の自己署名証明書 / development self-signed certificate"
            } else {
                ""
            },
            if facts.mutual_tls {
                "、クライアント証明書あり / mutual TLS"
            } else {
                ""
            }
        )
    } else {
        "平文HTTP（ループバックのみ、監査記録あり） / plain HTTP on loopback only (audited)".into()
    };
    // On only when generations go to write-once storage and a restore was verified.
    let backups_on = facts
        .backups
        .as_ref()
        .is_some_and(|b| b.write_once && b.last_verified.is_some());
    let backups_state = match &facts.backups {
        None => "未設定（backup.recipient）：運用者がDBと鍵ストアをバックアップする / not configured (backup.recipient): the operator must back up the databases and key store".into(),
        Some(b) => format!(
            "SQLite・PostgreSQL：オフライン鍵で暗号化した世代（署名付き目録）を{}に保管（{}）、保持方針 {}、最後の検証済み復元：{}。鍵ストアは別の世代として短い保存期間で保管し、復元時は削除済みの鍵を再び破棄 / SQLite and PostgreSQL generations encrypted to an offline key with a signed manifest, kept in {} ({}), policy {}, last verified restore: {}; the key store in generations of its own with a shorter retention, erased keys shredded again on restore",
            b.store,
            if b.write_once { "書き換え・削除不可" } else { "ランサムウェア耐性なし" },
            b.policy,
            last_verified_text(b),
            b.store,
            if b.write_once {
                "write-once"
            } else {
                "not ransomware-resilient: deletable with this host's credentials"
            },
            b.policy,
            last_verified_text(b),
        ),
    };
    let measures = vec![
        Measure {
            id: "tls",
            title: "通信の暗号化 / Encryption in transit",
            on: facts.tls,
            state: tls_state,
        },
        Measure {
            id: "mfa",
            title: "多要素認証 / Multi-factor authentication",
            on: true,
            state: "運営者は常に必須（TOTP・パスキー・回復コード）、患者はパスキー推奨・設定後は必須 / always for operators; offered to patients, required once set up".into(),
        },
        Measure {
            id: "encryption-at-rest",
            title: "保存データの暗号化と鍵管理 / Encryption at rest and key custody",
            on: true,
            state: format!(
                "患者ごとのデータ鍵でAES-256-GCM、鍵はKEK（{}）で包んで保管：{}。{} 署名鍵（監査・IDトークン）とTLS証明書は旧鍵の検証を保ったまま更新可能 / per-patient AES-256-GCM keys wrapped by the KEK; {}; the audit and ID-token signing keys and the TLS certificate rotate with the old keys still verifying",
                facts.kek_custody,
                facts.key_store,
                match facts.kek_escrow_recipients {
                    0 => "KEKのエスクローは未設定（運用者の対応が必要）。".to_string(),
                    n => format!("KEKは{n}名のオフライン保管者に暗号化してエスクロー（phr-gateway keys escrow）。"),
                },
                match facts.kek_escrow_recipients {
                    0 => "no KEK escrow is configured (the operator must cover it)".to_string(),
                    n => format!("the KEK is escrowed, encrypted, to {n} offline holders (phr-gateway keys escrow)"),
                }
            ),
        },
        Measure {
            id: "audit-log",
            title: "改ざん検知可能な監査ログ / Tamper-evident audit log",
            on: true,
            state: "Merkle木と署名付きチェックポイント（BALP形式、PHIなし） / Merkle tree with signed checkpoints".into(),
        },
        Measure {
            id: "audit-shipping",
            title: "監査ログの外部保管 / Audit log shipped to write-once storage",
            on: shipped_write_once,
            state: sink_state,
        },
        Measure {
            id: "backups",
            title: "バックアップと復元検証 / Backups and verified restores",
            on: backups_on,
            state: backups_state,
        },
        Measure {
            id: "break-glass",
            title: "非常時アカウント / Break-glass accounts",
            on: true,
            state: format!(
                "{}のみ、{}分で失効、全操作を記録、{}時間以内に事後確認 / one-time secret, time-boxed, every action audited, reviewed afterwards",
                facts.break_glass_probe, facts.break_glass_session_minutes, facts.break_glass_review_hours
            ),
        },
        Measure {
            id: "vulnerability-notices",
            title: "脆弱性とサポート終了の通知 / Vulnerability and end-of-life notices",
            on: facts.advisory_check && facts.alert_webhooks > 0,
            state: format!(
                "脆弱性照合: {} / advisory check: {}; サポート終了の警告: {} / EOL warnings: {}; 通知先 {} 件 / {} webhook(s)",
                if facts.advisory_check { "有効" } else { "無効" },
                if facts.advisory_check { "on" } else { "off (set alerts.advisory_db_dir)" },
                if facts.end_of_life_check { "有効" } else { "無効" },
                if facts.end_of_life_check { "on" } else { "off" },
                facts.alert_webhooks,
                facts.alert_webhooks
            ),
        },
        Measure {
            id: "data-location",
            title: "データの所在 / Data location",
            on: facts.data_location.is_some(),
            state: facts.data_location.clone().unwrap_or_else(|| {
                "未申告（disclosure.data_location を設定） / not declared (set disclosure.data_location)".into()
            }),
        },
    ];
    let measure = |id: &str| measures.iter().find(|m| m.id == id);
    let evidence = |id: &str| measure(id).map(|m| m.state.clone()).unwrap_or_default();
    let on = |id: &str| measure(id).is_some_and(|m| m.on);
    let checklist = vec![
        ChecklistAnswer {
            question: "通信はTLS 1.2以上で暗号化されているか / Is all traffic encrypted with TLS 1.2 or later?",
            answer: yes_no(on("tls")),
            evidence: evidence("tls"),
        },
        ChecklistAnswer {
            question: "管理者の認証は多要素か / Do administrators sign in with multiple factors?",
            answer: yes_no(on("mfa")),
            evidence: evidence("mfa"),
        },
        ChecklistAnswer {
            question: "保存される医療情報は暗号化されているか / Is stored medical information encrypted?",
            answer: yes_no(on("encryption-at-rest")),
            evidence: evidence("encryption-at-rest"),
        },
        ChecklistAnswer {
            question: "アクセスログは改ざんを検知でき、外部の書き換え不可の保管先に送られるか / Is the access log tamper-evident and kept on write-once storage?",
            answer: yes_no(on("audit-log") && on("audit-shipping")),
            evidence: evidence("audit-shipping"),
        },
        ChecklistAnswer {
            question: "ランサムウェアに耐えるバックアップがあり、復元を検証しているか / Are there ransomware-resilient backups with verified restores?",
            answer: yes_no(on("backups")),
            evidence: evidence("backups"),
        },
        ChecklistAnswer {
            question: "非常時の利用は記録され、事後に確認されるか / Is emergency access recorded and reviewed afterwards?",
            answer: yes_no(on("break-glass")),
            evidence: evidence("break-glass"),
        },
        ChecklistAnswer {
            question: "脆弱性情報は医療機関に能動的に通知されるか / Are vulnerabilities pushed to institutions?",
            answer: yes_no(on("vulnerability-notices")),
            evidence: evidence("vulnerability-notices"),
        },
        ChecklistAnswer {
            question: "データは国内に保管されるか / Is the data kept in Japan?",
            answer: yes_no(facts.data_location.as_deref().is_some_and(|l| l.contains("日本") || l.contains("国内") || l.contains("Japan"))),
            evidence: evidence("data-location"),
        },
        ChecklistAnswer {
            question: "委託先・構成要素の一覧があり、見直されているか / Are subprocessors listed and reviewed?",
            answer: yes_no(!facts.supply_chain.is_empty() && facts.supply_chain.iter().all(|e| !e.review_overdue)),
            evidence: format!("{} 件 / entries (GET /operator/supply-chain); SBOM: GET /operator/sbom", facts.supply_chain.len()),
        },
    ];
    let responsibilities = vec![
        Responsibility {
            task: "ソフトウェアの修正適用 / Patching the gateway and its dependencies",
            gateway_operator: "通知から計画日までに適用 / applies fixes by the planned date",
            institution: "通知を受け取り、影響を確認 / receives the notices, checks its exposure",
        },
        Responsibility {
            task: "バックアップ / Backups",
            gateway_operator: "DBと鍵ストアのバックアップ（この版では運用者が実施） / backs up the databases and key store",
            institution: "保管期間の要件を示す / states retention requirements",
        },
        Responsibility {
            task: "監視と警報 / Monitoring and alerts",
            gateway_operator: "警報を受けて対応、監査ログの検証 / acts on alerts, verifies the audit log",
            institution: "自院の利用者の不審な利用を報告 / reports suspicious use by its staff",
        },
        Responsibility {
            task: "復元 / Restoring service",
            gateway_operator: "復元し、監査ルートの一致を確認 / restores and checks the audit root",
            institution: "復元後のデータを確認 / checks its data after a restore",
        },
        Responsibility {
            task: "事故時の通知 / Incident notification",
            gateway_operator: "医療機関と患者、当局へ通知 / notifies institutions, patients and authorities",
            institution: "自院の報告義務を果たす / meets its own reporting duties",
        },
    ];
    Disclosure {
        measures,
        checklist,
        responsibilities,
        subprocessors: facts.supply_chain.clone(),
    }
}

/// The printable HTML (Japanese first, English beside it; maud escapes everything).
pub fn render_html(document: &Disclosure) -> String {
    let markup: Markup = html! {
        (DOCTYPE)
        html lang="ja" {
            head { meta charset="utf-8"; title { "サービス仕様適合開示書 / Service disclosure" } }
            body {
                h1 { "サービス仕様適合開示書（phr-gateway） " small { "Service disclosure" } }
                p { "この文書は稼働中の設定から生成されています。 / Generated from the live configuration." }
                h2 { "対策の状況 / Measures" }
                table {
                    tr { th { "対策 / Measure" } th { "有効 / On" } th { "状態 / State" } }
                    @for m in &document.measures {
                        tr id=(m.id) { td { (m.title) } td { @if m.on { "はい / yes" } @else { "いいえ / no" } } td { (m.state) } }
                    }
                }
                h2 { "確認項目 / Checklist" }
                table {
                    tr { th { "質問 / Question" } th { "回答 / Answer" } th { "根拠 / Evidence" } }
                    @for c in &document.checklist {
                        tr { td { (c.question) } td { (c.answer) } td { (c.evidence) } }
                    }
                }
                h2 { "責任分界 / Responsibilities" }
                table {
                    tr { th { "作業 / Task" } th { "ゲートウェイ運用者 / Gateway operator" } th { "医療機関 / Institution" } }
                    @for r in &document.responsibilities {
                        tr { td { (r.task) } td { (r.gateway_operator) } td { (r.institution) } }
                    }
                }
                h2 { "委託先・構成要素 / Subprocessors and components" }
                table {
                    tr { th { "名称 / Name" } th { "役割 / Role" } th { "扱うデータ / Data touched" } th { "契約 / Contract" } th { "最終確認 / Last review" } }
                    @for s in &document.subprocessors {
                        tr { td { (s.name) } td { (s.role) } td { (s.data_touched) } td { (s.contract) } td { (s.last_review) } }
                    }
                }
            }
        }
    };
    markup.into_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> Facts {
        Facts {
            tls: true,
            tls_min_version: "1.2".into(),
            dev_certificate: false,
            mutual_tls: false,
            audit_sink: Some(("local directory /srv/audit".into(), false)),
            kek_custody: "/srv/keys/kek".into(),
            kek_escrow_recipients: 2,
            key_store: "keys.db".into(),
            advisory_check: false,
            end_of_life_check: true,
            break_glass_probe: "probe".into(),
            break_glass_session_minutes: 60,
            break_glass_review_hours: 24,
            alert_webhooks: 0,
            data_location: None,
            supply_chain: Vec::new(),
            backups: None,
        }
    }

    fn backups(write_once: bool, verified: bool) -> Option<BackupFacts> {
        Some(BackupFacts {
            store: "s3 http://127.0.0.1:9000/phr-backups/".into(),
            write_once,
            policy: "7 daily, 4 weekly, 3 monthly".into(),
            last_verified: verified.then(|| {
                (
                    "20261126T052512Z".into(),
                    "2026-11-26T06:00:00Z".into(),
                    1500,
                )
            }),
        })
    }

    fn on(document: &Disclosure, id: &str) -> bool {
        document.measures.iter().find(|m| m.id == id).unwrap().on
    }

    #[test]
    fn measures_follow_the_configuration() {
        type Case = (&'static str, fn(&mut Facts), &'static str, bool);
        let cases: [Case; 7] = [
            ("local sink", |_| {}, "audit-shipping", false),
            (
                "write-once sink",
                |f| f.audit_sink = Some(("s3".into(), true)),
                "audit-shipping",
                true,
            ),
            (
                "no shipping",
                |f| f.audit_sink = None,
                "audit-shipping",
                false,
            ),
            ("plain http", |f| f.tls = false, "tls", false),
            (
                "advisories without a webhook",
                |f| f.advisory_check = true,
                "vulnerability-notices",
                false,
            ),
            (
                "advisories pushed",
                |f| {
                    f.advisory_check = true;
                    f.alert_webhooks = 1;
                },
                "vulnerability-notices",
                true,
            ),
            (
                "location declared",
                |f| f.data_location = Some("日本国内（東京）".into()),
                "data-location",
                true,
            ),
        ];
        for (name, change, id, expected) in cases {
            let mut f = facts();
            change(&mut f);
            assert_eq!(on(&disclosure(&f), id), expected, "{name}");
        }
        // Backups are claimed only on write-once storage with a verified restore.
        for (backups, expected) in [
            (None, false),
            (backups(false, true), false),
            (backups(true, false), false),
            (backups(true, true), true),
        ] {
            let mut f = facts();
            f.backups = backups;
            assert_eq!(on(&disclosure(&f), "backups"), expected, "{:?}", f.backups);
        }
        let mut f = facts();
        f.backups = backups(true, true);
        let state = disclosure(&f)
            .measures
            .into_iter()
            .find(|m| m.id == "backups")
            .unwrap()
            .state;
        assert!(state.contains("7 daily, 4 weekly, 3 monthly"), "{state}");
        assert!(state.contains("20261126T052512Z"), "{state}");
        assert!(state.contains("write-once"), "{state}");
    }

    #[test]
    fn the_checklist_answers_from_the_measures_and_the_html_escapes() {
        let mut f = facts();
        f.data_location = Some("<script>日本</script>".into());
        let document = disclosure(&f);
        let answer = |start: &str| {
            document
                .checklist
                .iter()
                .find(|c| c.question.starts_with(start))
                .unwrap()
                .answer
        };
        assert_eq!(answer("アクセスログ"), "no");
        assert_eq!(answer("ランサムウェア"), "no");
        assert_eq!(answer("管理者"), "yes");
        assert_eq!(answer("データは国内"), "yes");
        let html = render_html(&document);
        assert!(html.contains("&lt;script&gt;"));
        assert!(!html.contains("<script>"));
        assert!(html.contains("サービス仕様適合開示書"));
    }
}
