//! Remote maintenance windows end to end on both engines: one operator requests a window, a
//! second approves it (the requester cannot); maintenance endpoints are refused before
//! approval, to anyone but the requester, and after the window's end, every attempt audited
//! with the window id; reading many patients' data at once is refused unless approved; and
//! closing the window produces the report naming every action and every patient whose data
//! was read.

use phr_gateway::audit::AccountRole;
use phr_gateway::store::resources::{NewResource, SourceIdentity};
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::both_engines;
use crate::helpers::{audit_events, spawn_app, spawn_app_with, Engine, TestApp, TestEnv};

both_engines!(
    a_maintenance_window_is_approved_used_and_reported,
    bulk_phi_reading_needs_its_own_approval,
    a_window_bound_to_a_client_certificate_needs_it,
);

fn in_hours(hours: i64) -> String {
    (time::OffsetDateTime::now_utc() + time::Duration::hours(hours))
        .format(&time::format_description::well_known::Rfc3339)
        .expect("format")
}

async fn post(app: &TestApp, token: &str, path: &str, body: Value) -> (StatusCode, Value) {
    let response = app
        .client
        .post(app.url(path))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .expect("post");
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn get(app: &TestApp, token: &str, path: &str) -> (StatusCode, Value) {
    let response = app
        .client
        .get(app.url(path))
        .bearer_auth(token)
        .send()
        .await
        .expect("get");
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Audit leaves of remote maintenance (window changes and actions), oldest first.
async fn maintenance_leaves(app: &TestApp) -> Vec<Value> {
    audit_events(app)
        .await
        .into_iter()
        .filter(|event| {
            event["outcomeDesc"]
                .as_str()
                .is_some_and(|d| d.contains("maintenance window"))
        })
        .collect()
}

async fn store_observation(app: &TestApp, patient: &str, id: &str) {
    let state = &app.gateway().state;
    state
        .resources
        .ensure_patient(patient)
        .await
        .expect("patient");
    let body = json!({"resourceType": "Observation", "id": id, "status": "final",
        "code": {"text": "HbA1c"}, "subject": {"reference": format!("Patient/{patient}")}});
    state
        .resources
        .put(
            &phr_gateway::audit::Agent::system(),
            NewResource {
                patient_id: patient.into(),
                category: "checkup".into(),
                source: SourceIdentity {
                    source: "hospital".into(),
                    resource_type: "Observation".into(),
                    source_resource_id: id.into(),
                    version_id: Some("1".into()),
                },
                body: serde_json::to_vec(&body).expect("json"),
            },
        )
        .await
        .expect("store");
}

async fn a_maintenance_window_is_approved_used_and_reported(engine: Engine) {
    let app = spawn_app(engine).await;
    let vendor = app.sign_in(AccountRole::Operator, "vendor", None).await;
    let approver = app.sign_in(AccountRole::Operator, "approver", None).await;
    let bystander = app.sign_in(AccountRole::Operator, "bystander", None).await;
    store_observation(&app, "p-hanako", "obs-1").await;
    store_observation(&app, "p-taro", "obs-2").await;

    // Bad requests: too long a window, no ticket.
    let (status, body) = post(
        &app,
        &vendor,
        "/operator/maintenance",
        json!({"reason": "upgrade the database server", "ticket": "CHG-42",
               "ends_at": in_hours(9)}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, _) = post(
        &app,
        &vendor,
        "/operator/maintenance",
        json!({"reason": "upgrade the database server", "ticket": " ", "ends_at": in_hours(1)}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let (status, window) = post(
        &app,
        &vendor,
        "/operator/maintenance",
        json!({"reason": "upgrade the database server", "ticket": "CHG-42",
               "ends_at": in_hours(2)}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{window}");
    assert_eq!(window["status"], "requested");
    assert_eq!(window["bulk_phi_requested"], false);
    let id = window["id"].as_str().expect("id").to_string();
    let diagnostics = format!("/operator/maintenance/{id}/diagnostics");

    // Before approval: refused, and on the record with the window id.
    let (status, body) = get(&app, &vendor, &diagnostics).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body["detail"]
        .as_str()
        .is_some_and(|d| d.contains("not been approved")));

    // The requester cannot approve their own window (refused, audited).
    let (status, body) = post(
        &app,
        &vendor,
        &format!("/operator/maintenance/{id}/approve"),
        json!({}),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");

    // Bulk PHI cannot be allowed when it was not requested.
    let (status, _) = post(
        &app,
        &approver,
        &format!("/operator/maintenance/{id}/approve"),
        json!({"allow_bulk_phi": true}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let (status, approved) = post(
        &app,
        &approver,
        &format!("/operator/maintenance/{id}/approve"),
        json!({"note": "checked CHG-42 with the ward"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{approved}");
    assert_eq!(approved["status"], "approved");
    assert_eq!(approved["decided_by_username"], "approver");
    assert_eq!(approved["bulk_phi_allowed"], false);
    // Decided once.
    let (status, _) = post(
        &app,
        &bystander,
        &format!("/operator/maintenance/{id}/reject"),
        json!({"note": "too late"}),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT);

    // Inside the window the requester acts; nobody else does.
    let (status, health) = get(&app, &vendor, &diagnostics).await;
    assert_eq!(status, StatusCode::OK, "{health}");
    assert!(health["pull_jobs"].is_object());
    assert!(health["database_round_trip_ms"].is_u64());
    let (status, _) = get(&app, &bystander, &diagnostics).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, counts) = get(
        &app,
        &vendor,
        &format!("/operator/maintenance/{id}/patients/p-hanako/resource-counts"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{counts}");
    assert_eq!(counts["counts"]["Observation"], 1);
    // Reading every patient at once was not approved.
    let (status, body) = get(
        &app,
        &vendor,
        &format!("/operator/maintenance/{id}/resource-counts"),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");

    // The window is still open: no report yet.
    let (status, _) = get(
        &app,
        &approver,
        &format!("/operator/maintenance/{id}/report"),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT);

    // Every action is audited with the window id, refusals as failures, maintenance purpose.
    let leaves = maintenance_leaves(&app).await;
    let actions: Vec<&Value> = leaves
        .iter()
        .filter(|e| e["subtype"][0]["code"] == "maintenance-action")
        .collect();
    let with_id = |needle: &str, outcome: &str| {
        actions
            .iter()
            .filter(|e| {
                e["outcome"] == outcome
                    && e["outcomeDesc"]
                        .as_str()
                        .is_some_and(|d| d.contains(&id) && d.contains(needle))
            })
            .count()
    };
    // Diagnostics, one patient's counts, and the bulk listing let into the window...
    assert_eq!(with_id("GET /operator/maintenance/", "0"), 3);
    // ...before approval, the bystander's attempt, and the bulk read refused inside it.
    assert_eq!(with_id("refused", "4"), 3, "{actions:#?}");
    for action in &actions {
        assert_eq!(action["purposeOfEvent"][0]["coding"][0]["code"], "SYSADMN");
    }
    assert!(leaves.iter().any(|e| e["outcome"] == "4"
        && e["outcomeDesc"]
            .as_str()
            .is_some_and(|d| d.contains("another operator must approve"))));
    assert!(leaves.iter().any(|e| e["outcomeDesc"].as_str().is_some_and(
        |d| d == format!("maintenance window {id} approved; bulk PHI read not allowed")
    )));
    // The patient whose data was read sees it in their access log (an operator's read).
    let touched: Vec<&Value> = leaves
        .iter()
        .filter(|e| e["entity"][0]["what"]["reference"] == "Patient/p-hanako")
        .collect();
    assert_eq!(touched.len(), 1);
    assert_eq!(touched[0]["subtype"][0]["code"], "read");

    // After the window's end: refused, and the window closes itself with its report.
    sqlx::query("UPDATE maintenance_windows SET ends_at = $1 WHERE id = $2")
        .bind(phr_gateway::store::now_millis() - 1000)
        .bind(&id)
        .execute(app.gateway().state.db.write_pool())
        .await
        .expect("end the window");
    let (status, body) = get(&app, &vendor, &diagnostics).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(body["detail"].as_str().is_some_and(|d| d.contains("ended")));
    let (status, windows) = get(&app, &bystander, "/operator/maintenance").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(windows[0]["id"], id.as_str());
    assert_eq!(windows[0]["status"], "closed");
    // Closed: refused even if the clock said otherwise.
    let (status, body) = get(&app, &vendor, &diagnostics).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(body["detail"]
        .as_str()
        .is_some_and(|d| d.contains("closed")));

    let (status, report) = get(
        &app,
        &approver,
        &format!("/operator/maintenance/{id}/report"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(report["ticket"], "CHG-42");
    assert_eq!(report["requested_by"], "vendor");
    assert_eq!(report["approved_by"], "approver");
    assert_eq!(report["bulk_phi_allowed"], false);
    assert_eq!(report["patients_touched"], json!(["p-hanako"]));
    let actions = report["actions"].as_array().expect("actions");
    let summary: Vec<(String, String)> = actions
        .iter()
        .map(|a| {
            (
                a["outcome"].as_str().unwrap_or_default().to_string(),
                a["action"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let path = |tail: &str| format!("GET /operator/maintenance/{id}/{tail}");
    assert_eq!(
        summary,
        vec![
            ("refused".to_string(), path("diagnostics")),
            ("done".to_string(), path("diagnostics")),
            ("refused".to_string(), path("diagnostics")),
            (
                "done".to_string(),
                path("patients/p-hanako/resource-counts")
            ),
            ("refused".to_string(), path("resource-counts")),
            // After the end, before the window was noticed as ended and closed.
            ("refused".to_string(), path("diagnostics")),
        ]
    );
    assert_eq!(actions[1]["operator"], "vendor");
    assert_eq!(actions[2]["operator"], "bystander");
    assert_eq!(actions[3]["patients"], json!(["p-hanako"]));

    // The plain rendering for the institution, in Japanese and English.
    let text = app
        .client
        .get(app.url(&format!("/operator/maintenance/{id}/report?format=text")))
        .bearer_auth(&approver)
        .send()
        .await
        .expect("text report")
        .text()
        .await
        .expect("text");
    assert!(
        text.contains("リモート保守報告 / Remote maintenance report"),
        "{text}"
    );
    assert!(text.contains("CHG-42"));
    assert!(text.contains("p-hanako"));
    assert!(!text.contains("p-taro"));
    assert!(
        text.contains("Bulk PHI read approved: いいえ / no"),
        "{text}"
    );

    // Generating the report is on the record.
    let leaves = maintenance_leaves(&app).await;
    assert!(
        leaves
            .iter()
            .any(|e| e["outcomeDesc"].as_str().is_some_and(|d| d
                == format!(
            "maintenance window {id} closed; report generated: 6 actions, 1 patients' data read"
        ))),
        "{leaves:#?}"
    );
    app.stop().await;
}

async fn bulk_phi_reading_needs_its_own_approval(engine: Engine) {
    let app = spawn_app(engine).await;
    let vendor = app.sign_in(AccountRole::Operator, "vendor", None).await;
    let approver = app.sign_in(AccountRole::Operator, "approver", None).await;
    store_observation(&app, "p-hanako", "obs-1").await;
    store_observation(&app, "p-taro", "obs-2").await;

    let request = json!({
        "reason": "rebuild the resource index after the migration",
        "ticket": "CHG-77",
        "ends_at": in_hours(1),
        "bulk_phi_justification": "compare per-patient counts before and after the rebuild"
    });
    // A request withdrawn by its requester (nobody else can) is never usable.
    let (_, withdrawn) = post(&app, &vendor, "/operator/maintenance", request.clone()).await;
    let withdrawn = withdrawn["id"].as_str().expect("id").to_string();
    let cancel = format!("/operator/maintenance/{withdrawn}/cancel");
    let (status, _) = post(&app, &approver, &cancel, json!(null)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, body) = post(&app, &vendor, &cancel, json!(null)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "cancelled");
    let (status, _) = post(
        &app,
        &approver,
        &format!("/operator/maintenance/{withdrawn}/approve"),
        json!({}),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, body) = get(
        &app,
        &vendor,
        &format!("/operator/maintenance/{withdrawn}/diagnostics"),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(body["detail"]
        .as_str()
        .is_some_and(|d| d.contains("cancelled")));

    // A window whose bulk read the approver declines.
    let (_, declined) = post(&app, &vendor, "/operator/maintenance", request.clone()).await;
    let declined = declined["id"].as_str().expect("id").to_string();
    let (status, body) = post(
        &app,
        &approver,
        &format!("/operator/maintenance/{declined}/approve"),
        json!({"allow_bulk_phi": false}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _) = get(
        &app,
        &vendor,
        &format!("/operator/maintenance/{declined}/resource-counts"),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // A window with bulk reading requested and approved.
    let (_, window) = post(&app, &vendor, "/operator/maintenance", request).await;
    assert_eq!(window["bulk_phi_requested"], true);
    let id = window["id"].as_str().expect("id").to_string();
    let (status, approved) = post(
        &app,
        &approver,
        &format!("/operator/maintenance/{id}/approve"),
        json!({"allow_bulk_phi": true}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{approved}");
    assert_eq!(approved["bulk_phi_allowed"], true);
    // Not in the other window.
    let (status, _) = get(
        &app,
        &vendor,
        &format!("/operator/maintenance/{declined}/resource-counts"),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, counts) = get(
        &app,
        &vendor,
        &format!("/operator/maintenance/{id}/resource-counts"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{counts}");
    let patients: Vec<&str> = counts
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|c| c["patient_id"].as_str())
        .collect();
    assert!(
        patients.contains(&"p-hanako") && patients.contains(&"p-taro"),
        "{counts}"
    );

    // Closing early ends access and freezes the report.
    let (status, report) = post(
        &app,
        &approver,
        &format!("/operator/maintenance/{id}/close"),
        json!(null),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(report["bulk_phi_requested"], true);
    assert_eq!(report["bulk_phi_allowed"], true);
    assert!(report["bulk_phi_justification"]
        .as_str()
        .is_some_and(|j| j.contains("compare per-patient counts")));
    let touched = report["patients_touched"].as_array().expect("patients");
    assert!(touched.contains(&json!("p-hanako")) && touched.contains(&json!("p-taro")));
    let (status, _) = get(
        &app,
        &vendor,
        &format!("/operator/maintenance/{id}/resource-counts"),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = post(
        &app,
        &approver,
        &format!("/operator/maintenance/{id}/close"),
        json!(null),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT);
    app.stop().await;
}

/// A client certificate signed by `ca`, valid from `not_before` to `not_after`.
struct ClientIdentity {
    pem: String,
    der: rustls::pki_types::CertificateDer<'static>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
}

fn client_identity(
    ca: &rcgen::Certificate,
    ca_key: &rcgen::KeyPair,
    not_before: time::OffsetDateTime,
    not_after: time::OffsetDateTime,
) -> ClientIdentity {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "maintenance vendor");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = not_before;
    params.not_after = not_after;
    let cert = params.signed_by(&key, ca, ca_key).expect("sign");
    ClientIdentity {
        pem: cert.pem(),
        der: cert.der().clone(),
        key: rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
    }
}

/// An HTTPS client trusting the gateway's dev certificate and presenting `identity`.
fn client_presenting(app: &TestApp, identity: &ClientIdentity) -> reqwest::Client {
    let dev_cert = app
        .env()
        .data_dir()
        .join("data")
        .join("tls")
        .join("dev-cert.pem");
    let pem = std::fs::read(dev_cert).expect("dev cert");
    let mut roots = rustls::RootCertStore::empty();
    for der in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(der.expect("pem")).expect("root");
    }
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_client_auth_cert(vec![identity.der.clone()], identity.key.clone_key())
    .expect("client certificate");
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .build()
        .expect("client")
}

async fn a_window_bound_to_a_client_certificate_needs_it(engine: Engine) {
    let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "institution maintenance CA");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let ca = ca_params.self_signed(&ca_key).expect("CA");
    let now = time::OffsetDateTime::now_utc();
    let short = client_identity(
        &ca,
        &ca_key,
        now - time::Duration::minutes(5),
        now + time::Duration::hours(3),
    );
    let other = client_identity(
        &ca,
        &ca_key,
        now - time::Duration::minutes(5),
        now + time::Duration::hours(3),
    );
    let long_lived = client_identity(
        &ca,
        &ca_key,
        now - time::Duration::days(1),
        now + time::Duration::days(365),
    );

    let env = TestEnv::new(engine).await;
    let ca_file = env.data_dir().join("maintenance-ca.pem");
    std::fs::write(&ca_file, ca.pem()).expect("write CA");
    let app = spawn_app_with(env, |config| {
        config.tls.client_ca_file = Some(ca_file);
        config.tls.client_auth = phr_gateway::tls::ClientAuth::Optional;
    })
    .await;
    let vendor = app.sign_in(AccountRole::Operator, "vendor", None).await;
    let approver = app.sign_in(AccountRole::Operator, "approver", None).await;

    let request = |pem: &str| {
        json!({"reason": "replace the failed disk of the database server", "ticket": "INC-9",
               "ends_at": in_hours(2), "client_certificate_pem": pem})
    };
    // A certificate valid for a year is no short-lived maintenance credential.
    let (status, body) = post(
        &app,
        &vendor,
        "/operator/maintenance",
        request(&long_lived.pem),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, window) = post(&app, &vendor, "/operator/maintenance", request(&short.pem)).await;
    assert_eq!(status, StatusCode::CREATED, "{window}");
    assert!(window["client_cert_sha256"]
        .as_str()
        .is_some_and(|f| f.len() == 64));
    let id = window["id"].as_str().expect("id").to_string();
    let (status, _) = post(
        &app,
        &approver,
        &format!("/operator/maintenance/{id}/approve"),
        json!({}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);

    let diagnostics = app.url(&format!("/operator/maintenance/{id}/diagnostics"));
    let status_with = |client: reqwest::Client| {
        let request = client.get(&diagnostics).bearer_auth(&vendor);
        async move {
            let response = request.send().await.expect("diagnostics");
            (response.status(), response.text().await.unwrap_or_default())
        }
    };
    // The operator's session alone is not enough, nor another certificate of the same CA.
    let (status, body) = status_with(app.client.clone()).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("requires its client certificate"), "{body}");
    let (status, body) = status_with(client_presenting(&app, &other)).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("not the one bound"), "{body}");
    let (status, body) = status_with(client_presenting(&app, &short)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    app.stop().await;
}
