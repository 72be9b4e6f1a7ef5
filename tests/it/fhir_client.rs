//! A real SMART on FHIR client library against the real gateway: `tests/python/smart_client.py`
//! runs the Python `fhirclient` package (the version pinned in
//! `tests/python/requirements.txt`, which `.ci/run` installs) as a child process. The library
//! discovers the endpoints, asks with PKCE S256, exchanges the code with
//! `client_secret_basic` and reads; the script plays the patient's browser (sign-in, the
//! consent screen, agreeing to demographics and observations only). The patient's Condition
//! is asked for but not consented: its search is refused and `$everything` leaves it out.
//!
//! SQLite is enough here; a missing `python3` or package fails the test, never skips it.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use phr_gateway::audit::{AccountRole, Agent};
use phr_gateway::store::resources::{NewResource, SourceIdentity};
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{get_json, leaves_containing, Engine};
use crate::oauth::{env, Env};

const PATIENT: &str = "patient-1";
const USERNAME: &str = "hanako";
const PASSWORD: &str = "a long passphrase for the python client";
/// A loopback redirect, as a native app registers; nothing needs to listen there: the
/// script hands the redirect to the library instead of following it.
const REDIRECT: &str = "http://127.0.0.1:8765/callback";
/// The observations seeded for the patient: LOINC code and date.
const OBSERVATIONS: [(&str, &str); 3] = [
    ("8480-6", "2024-05-10"),
    ("8462-4", "2024-05-10"),
    ("2345-7", "2024-06-01"),
];

fn resource(
    patient: &str,
    category: &str,
    resource_type: &str,
    id: &str,
    body: Value,
) -> NewResource {
    let mut body = body;
    body["resourceType"] = json!(resource_type);
    body["id"] = json!(id);
    NewResource {
        patient_id: patient.into(),
        category: category.into(),
        source: SourceIdentity {
            source: "hospital".into(),
            resource_type: resource_type.into(),
            source_resource_id: id.into(),
            version_id: Some("1".into()),
        },
        body: body.to_string().into_bytes(),
    }
}

fn observation(patient: &str, id: &str, loinc: &str, date: &str) -> NewResource {
    resource(
        patient,
        "observations",
        "Observation",
        id,
        json!({
            "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": loinc}]},
            "subject": {"reference": "Patient/hosp-1"},
            "effectiveDateTime": date,
            "valueQuantity": {"value": 120, "unit": "mm[Hg]", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}
        }),
    )
}

/// The hospital's record of the patient: Patient, three Observations, a Condition; and an
/// Observation of another patient.
async fn seed(env: &Env) {
    let mut batch = vec![
        resource(
            PATIENT,
            "demographics",
            "Patient",
            "hosp-1",
            json!({"name": [{"text": "山田 花子"}], "birthDate": "1980-04-01", "gender": "female"}),
        ),
        resource(
            PATIENT,
            "conditions",
            "Condition",
            "c-1",
            json!({"code": {"text": "高血圧症"}, "subject": {"reference": "Patient/hosp-1"}}),
        ),
        observation("patient-2", "x-1", "8480-6", "2024-05-10"),
    ];
    for (n, (loinc, date)) in OBSERVATIONS.iter().enumerate() {
        batch.push(observation(PATIENT, &format!("o-{n}"), loinc, date));
    }
    env.app
        .gateway()
        .state
        .resources
        .put_batch(&Agent::system(), batch)
        .await
        .expect("seed");
}

/// An operator registers the app as a `client_secret_basic` client with a loopback redirect.
async fn register_app(env: &Env) -> (String, String) {
    let response = env
        .register(&json!({
            "display_name": "Python SMART アプリ",
            "redirect_uris": [REDIRECT],
            "token_endpoint_auth_method": "client_secret_basic",
            "recipient": {"name": "株式会社ヘルスケア", "identifier": "1234567890123"},
            "compliance": {
                "declared": true,
                "statement": "PHRサービス事業者に関する基本的指針を遵守します",
                "declared_on": "2026-04-01"
            }
        }))
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let body: Value = response.json().await.expect("json");
    (
        body["client_id"].as_str().expect("client_id").to_string(),
        body["client_secret"].as_str().expect("secret").to_string(),
    )
}

/// The version of `package` pinned in `tests/python/requirements.txt`.
fn pinned(package: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/requirements.txt");
    let text = std::fs::read_to_string(&path).expect("read tests/python/requirements.txt");
    text.lines()
        .find_map(|line| line.trim().strip_prefix(&format!("{package}==")))
        .map(str::to_string)
        .unwrap_or_else(|| panic!("{package} is not pinned in {}", path.display()))
}

/// Runs the script with `python3`; returns its summary, or fails with what it said.
async fn run_script(vars: Vec<(&'static str, String)>) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/smart_client.py");
    let output = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(&script)
            .envs(vars)
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run python3 ({e}): this test needs Python 3 and the packages in \
                     tests/python/requirements.txt (.ci/run installs them)"
                )
            })
    })
    .await
    .expect("the script's thread");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "smart_client.py failed ({}); a missing package means: \
         python3 -m pip install -r tests/python/requirements.txt\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("the script's summary is not JSON ({e}): {stdout}\n{stderr}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_smart_client_reads_only_what_the_patient_consented_to() {
    let env = env(Engine::Sqlite).await;
    seed(&env).await;
    env.app
        .gateway()
        .state
        .accounts
        .create(AccountRole::Patient, USERNAME, PASSWORD, Some(PATIENT))
        .await
        .expect("patient account");
    let (client_id, client_secret) = register_app(&env).await;
    let ca_bundle = env
        .app
        .gateway()
        .state
        .config
        .data_dir
        .join("tls")
        .join("dev-cert.pem");

    let summary = run_script(vec![
        ("SMART_GATEWAY_URL", env.app.base.clone()),
        ("SMART_CLIENT_ID", client_id.clone()),
        ("SMART_CLIENT_SECRET", client_secret),
        ("SMART_REDIRECT_URI", REDIRECT.to_string()),
        ("SMART_USERNAME", USERNAME.to_string()),
        ("SMART_PASSWORD", PASSWORD.to_string()),
        ("SMART_CA_BUNDLE", ca_bundle.display().to_string()),
    ])
    .await;

    println!("smart_client.py: {summary}");
    // The pinned library did the OAuth part: PKCE S256, the gateway's FHIR base as `aud`.
    assert_eq!(
        summary["library"],
        format!("fhirclient {}", pinned("fhirclient")),
        "{summary}"
    );
    assert_eq!(
        summary["authorize_request"]["code_challenge_method"],
        "S256"
    );
    assert_eq!(
        summary["authorize_request"]["aud"],
        format!("{}/fhir", env.app.base)
    );
    // The screen offered the three kinds of data asked for; the patient agreed to two, for
    // the app's basic purpose, and the token carries exactly those.
    assert_eq!(
        summary["consent_screen"]["categories_offered"],
        json!(["conditions", "demographics", "observations"])
    );
    assert_eq!(summary["consent_screen"]["purposes"], json!(["PATRQT"]));
    let granted = summary["granted_scope"].as_str().expect("granted scope");
    let granted: Vec<&str> = granted.split(' ').collect();
    assert!(
        granted.contains(&"patient/Patient.rs") && granted.contains(&"patient/Observation.rs"),
        "{granted:?}"
    );
    assert!(
        !granted.iter().any(|s| s.contains("Condition")),
        "{granted:?}"
    );

    // What the library read: the patient, and their three observations (not the other
    // patient's), through `next` links of two per page.
    assert_eq!(summary["patient_id"], PATIENT);
    assert_eq!(summary["patient_name"], json!(["山田 花子"]));
    assert_eq!(summary["observations"], OBSERVATIONS.len());
    assert_eq!(summary["observation_pages"], 2);
    let mut codes: Vec<&str> = OBSERVATIONS.iter().map(|(code, _)| *code).collect();
    codes.sort_unstable();
    assert_eq!(summary["observation_codes"], json!(codes));
    assert_eq!(
        summary["observation_subjects"],
        json!([format!("Patient/{PATIENT}")])
    );
    // The Condition is refused, and `$everything` has none.
    assert_eq!(
        summary["condition_search"],
        json!({"status": 403, "body": "OperationOutcome"})
    );
    let everything: BTreeMap<String, u64> =
        serde_json::from_value(summary["everything"].clone()).expect("counts by type");
    assert_eq!(
        everything,
        BTreeMap::from([("Observation".to_string(), 3), ("Patient".to_string(), 1)])
    );
    assert!(summary["everything_pages"].as_u64().expect("pages") >= 2);

    // The gateway recorded that consent, and audited the library's reads under it.
    let login: Value = env
        .app
        .client
        .post(env.url("/auth/login"))
        .json(&json!({"username": USERNAME, "password": PASSWORD}))
        .send()
        .await
        .expect("login")
        .json()
        .await
        .expect("json");
    let session = login["token"].as_str().expect("token");
    let consents = get_json(&env.app, "/api/consents", session).await;
    let consents = consents.as_array().expect("consents");
    assert_eq!(consents.len(), 1, "{consents:?}");
    assert_eq!(consents[0]["purposes"], json!(["PATRQT"]));
    let mut categories: Vec<String> = consents[0]["categories"]
        .as_array()
        .expect("categories")
        .iter()
        .map(|c| c.as_str().expect("code").to_string())
        .collect();
    categories.sort();
    assert_eq!(categories, ["demographics", "observations"]);
    let consent_id = consents[0]["id"].as_str().expect("id");
    assert!(
        leaves_containing(
            &env.app,
            &format!("FHIR search Observation under consent {consent_id}")
        )
        .await
            >= 1
    );
    env.stop().await;
}
