//! `phr-gateway demo`: a demo patient with simulated hospital data and a demo operator, so a
//! newcomer sees the whole flow. Later issues grow it (simulated portal, pulls, consents).

pub mod phr_app;

use std::net::SocketAddr;

use rand::distributions::{Alphanumeric, DistString};
use serde_json::json;

use phr_adapters::fhir_r4::simulator::{HospitalSimulator, RunningSimulator, SimulatorConfig};
use phr_adapters::self_info::simulator::{
    PortalSimulator, RunningSimulator as RunningPortal, SimulatorConfig as PortalSimulatorConfig,
};

use crate::app::{Gateway, RunningGateway};
use crate::audit::{AccountRole, Agent};
use crate::config::{Config, SourceConfig, SourceKind};
use crate::error::{Error, Result};
use crate::http::AppState;
use crate::store::resources::{NewResource, SourceIdentity};

pub const DEMO_PATIENT_ID: &str = "demo-patient-0001";
/// Records seeded straight into the store (not pulled), so the demo patient has data at once.
const DEMO_SOURCE: &str = "demo-records";

/// The demo: the gateway plus a simulated hospital the demo patient can link.
pub struct Demo {
    pub gateway: RunningGateway,
    pub hospital: RunningSimulator,
    pub portal: RunningPortal,
    /// A PHR app the demo patient can grant consent to.
    pub phr_app: phr_app::DemoPhrApp,
}

impl Demo {
    pub async fn start(mut config: Config) -> Result<Demo> {
        let hospital = HospitalSimulator::start(SimulatorConfig {
            patients: 3,
            resources_per_patient: 60,
            ..SimulatorConfig::default()
        })
        .await
        .map_err(|e| Error::config("demo", format!("cannot start the hospital simulator: {e}")))?;
        config.sources.retain(|s| s.id != DEMO_HOSPITAL);
        config.sources.push(SourceConfig {
            id: DEMO_HOSPITAL.into(),
            display_name: "デモ病院 (Demo Hospital)".into(),
            kind: SourceKind::FhirR4,
            base_url: hospital.base_url.clone(),
            client_id: "phr-gateway".into(),
            page_size: Some(20),
            max_concurrent_requests: None,
            auth: Default::default(),
            portal_categories: None,
        });
        // The portal knows the gateway by its source-client key, as a real portal would
        // after registration.
        let (client_key, _) =
            crate::app::load_or_generate_source_client_key(&config.source_client_key_path())?;
        let portal = PortalSimulator::start(PortalSimulatorConfig::new(
            "phr-gateway",
            client_key.public_jwk(),
        ))
        .await
        .map_err(|e| Error::config("demo", format!("cannot start the portal simulator: {e}")))?;
        config.sources.retain(|s| s.id != DEMO_PORTAL);
        config.sources.push(SourceConfig {
            id: DEMO_PORTAL.into(),
            display_name: "マイナポータル（模擬） (Simulated My Number Portal)".into(),
            kind: SourceKind::SelfInfo,
            base_url: portal.base_url.clone(),
            client_id: "phr-gateway".into(),
            page_size: Some(50),
            max_concurrent_requests: None,
            auth: Default::default(),
            portal_categories: None,
        });
        let gateway = Gateway::build(config).await?;
        let credentials = seed(&gateway.state).await?;
        let gateway = gateway.start().await?;
        let phr_app = start_phr_app(&gateway).await?;
        let card = portal
            .handle
            .person(1)
            .map(|person| (person.card_number, person.pin))
            .unwrap_or_default();
        print_welcome(
            gateway.addr,
            &credentials,
            &hospital.base_url,
            &card,
            &phr_app.base_url,
        );
        Ok(Demo {
            gateway,
            hospital,
            portal,
            phr_app,
        })
    }

    pub async fn run_until_signal(self) -> Result<()> {
        let result = self.gateway.run_until_signal().await;
        self.phr_app.shutdown().await;
        self.hospital.shutdown().await;
        self.portal.shutdown().await;
        result
    }
}

/// Starts the demo PHR app beside a running gateway, trusting the gateway's certificate.
pub async fn start_phr_app(gateway: &RunningGateway) -> Result<phr_app::DemoPhrApp> {
    let config = &gateway.state.config;
    let cert_path = config
        .tls
        .cert_file
        .clone()
        .unwrap_or_else(|| config.data_dir.join("tls").join("dev-cert.pem"));
    let cert = std::fs::read(&cert_path).map_err(|e| Error::io(&cert_path, e))?;
    phr_app::DemoPhrApp::start(&gateway.state, &gateway.state.public_url(), &cert).await
}

pub const DEMO_HOSPITAL: &str = "demo-hospital";
pub const DEMO_PORTAL: &str = "demo-portal";

pub struct DemoCredentials {
    pub patient: (String, String),
    pub operator: (String, String),
    /// The demo operator's TOTP secret (base32), new on every start.
    pub operator_totp: String,
}

/// Seeds (idempotently) the demo accounts and data; passwords are new on every start.
pub async fn seed(state: &AppState) -> Result<DemoCredentials> {
    let patient_password = Alphanumeric.sample_string(&mut rand::thread_rng(), 20);
    let operator_password = Alphanumeric.sample_string(&mut rand::thread_rng(), 20);
    state.resources.ensure_patient(DEMO_PATIENT_ID).await?;
    for (role, username, password, patient) in [
        (
            AccountRole::Patient,
            "demo-patient",
            &patient_password,
            Some(DEMO_PATIENT_ID),
        ),
        (
            AccountRole::Operator,
            "demo-operator",
            &operator_password,
            None,
        ),
    ] {
        match state
            .accounts
            .create(role, username, password, patient)
            .await
        {
            Ok(_) => {}
            Err(Error::Invalid(reason)) if reason.contains("taken") => {
                state.accounts.set_password(username, password).await?;
            }
            Err(e) => return Err(e),
        }
    }
    let operator = state
        .accounts
        .by_username("demo-operator")
        .await?
        .ok_or_else(|| Error::NotFound("demo-operator".into()))?;
    let operator_totp = state.second_factors.provision_totp(&operator).await?.secret;
    for (resource_type, source_id, body) in demo_resources() {
        let new = NewResource {
            patient_id: DEMO_PATIENT_ID.into(),
            category: category_of(resource_type).into(),
            source: SourceIdentity {
                source: DEMO_SOURCE.into(),
                resource_type: resource_type.into(),
                source_resource_id: source_id.into(),
                version_id: Some("1".into()),
            },
            body: serde_json::to_vec(&body).map_err(|e| Error::Invalid(e.to_string()))?,
        };
        state.resources.put(&Agent::system(), new).await?;
    }
    state.audit.notify();
    Ok(DemoCredentials {
        patient: ("demo-patient".into(), patient_password),
        operator: ("demo-operator".into(), operator_password),
        operator_totp,
    })
}

fn category_of(resource_type: &str) -> &'static str {
    match resource_type {
        "Patient" => "demographics",
        _ => "checkup",
    }
}

fn demo_resources() -> Vec<(&'static str, &'static str, serde_json::Value)> {
    let observation = |id: &str, loinc: &str, display: &str, value: f64, unit: &str| {
        json!({
            "resourceType": "Observation",
            "id": id,
            "meta": {"versionId": "1", "profile": ["http://jpfhir.jp/fhir/core/StructureDefinition/JP_Observation_Common"]},
            "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "exam"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": loinc, "display": display}]},
            "subject": {"reference": "Patient/p1"},
            "effectiveDateTime": "2026-04-10",
            "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit}
        })
    };
    vec![
        (
            "Patient",
            "p1",
            json!({
                "resourceType": "Patient",
                "id": "p1",
                "meta": {"versionId": "1", "profile": ["http://jpfhir.jp/fhir/core/StructureDefinition/JP_Patient"]},
                "name": [{"use": "official", "text": "デモ 花子", "family": "デモ", "given": ["花子"]}],
                "gender": "female",
                "birthDate": "1980-05-01"
            }),
        ),
        (
            "Observation",
            "o-height",
            observation("o-height", "8302-2", "Body height", 158.2, "cm"),
        ),
        (
            "Observation",
            "o-weight",
            observation("o-weight", "29463-7", "Body weight", 55.4, "kg"),
        ),
        (
            "Observation",
            "o-sbp",
            observation(
                "o-sbp",
                "8480-6",
                "Systolic blood pressure",
                118.0,
                "mm[Hg]",
            ),
        ),
        (
            "Observation",
            "o-hba1c",
            observation("o-hba1c", "4548-4", "Hemoglobin A1c", 5.4, "%"),
        ),
    ]
}

/// Links simulated hospital patient number `n` (`patient-000n`, signed in at the
/// simulator's login page without a browser) to `patient_id` under a new instruction for
/// every category, as the portal's link flow would; the instruction's id. For benchmarks
/// and tests that need many linked patients.
pub async fn link_simulated_hospital_patient(
    state: &AppState,
    source_id: &str,
    n: usize,
    instruction_id: &str,
    patient_id: &str,
) -> Result<String> {
    use phr_adapters::fhir_r4::simulator::patient_agent::{
        callback_from_redirect, sign_in_and_decide,
    };
    let (info, source) = state.registry.get(source_id)?;
    let categories = phr_consent::DataCategory::ALL.to_vec();
    let start = source
        .start_authorization(&phr_adapters::AuthorizationRequest {
            instruction_id: instruction_id.to_string(),
            resource_types: phr_consent::DataCategory::resource_types_of(&categories),
            redirect_uri: "https://localhost/patient/sources/callback".into(),
            on_behalf_of: None,
        })
        .await?;
    let (instruction, _) = state
        .instructions
        .give(
            &Agent::system(),
            instruction_id,
            "simulated",
            patient_id,
            info,
            &categories,
            &start.pending,
        )
        .await?;
    let location = sign_in_and_decide(
        &start.authorize_url,
        &format!("patient-{n:04}"),
        &format!("phr-sim-{n:04}"),
        |_| true,
        true,
    )
    .await
    .map_err(Error::Invalid)?;
    let callback = callback_from_redirect(&location).map_err(Error::Invalid)?;
    let credentials = source
        .finish_authorization(&start.pending, &callback)
        .await?;
    state
        .instructions
        .activate(&Agent::system(), &instruction, info, &credentials)
        .await?;
    Ok(instruction.id)
}

pub fn print_welcome(
    addr: SocketAddr,
    credentials: &DemoCredentials,
    hospital: &str,
    (card, pin): &(String, String),
    phr_app: &str,
) {
    let base = format!("https://localhost:{}", addr.port());
    println!(
        "\nphr-gateway demo is running at {base} (self-signed dev certificate: use curl -k)\n\n\
         Patient portal: {base}/portal — sign in as the demo patient, choose デモ病院 and some\n\
         categories, continue to the hospital and sign in there as patient-0001 / phr-sim-0001;\n\
         back in the portal, watch the data arrive, then withdraw in one click.\n\
         Or choose マイナポータル（模擬） and \"read\" the simulated My Number Card {card}\n\
         with PIN {pin} to fetch 特定健診, medicines, immunizations and medical costs.\n\
         (Simulated hospital FHIR server: {hospital})\n\n\
         Demo PHR app: {phr_app} — \"connect\" sends you to the gateway's consent screen; agree\n\
         to some purposes and data, see what the app reads, then withdraw under 同意の管理 in\n\
         the portal and press \"read again\" in the app: the gateway refuses. \"Run a bulk\n\
         export\" is the app's backend taking every consenting patient's data at once\n\
         (FHIR Bulk Data): only the categories each patient agreed to arrive.\n\n\
         In the portal: データの書き出し downloads everything (FHIR, with a Japanese summary at\n\
         /portal/summary), アクセス記録 shows who read what, and データの削除 erases the record.\n\n\
         Demo patient:  {} / {}\n\
         Demo operator: {} / {} at {base}/operator, then a TOTP code for the secret\n\
         {} (add it to an authenticator app, or: oathtool --totp -b {})\n\n\
         Try:\n  curl -k {base}/healthz\n  \
         TOKEN=$(curl -sk {base}/auth/login -H 'content-type: application/json' \\\n      \
         -d '{{\"username\":\"{}\",\"password\":\"{}\"}}' | sed -E 's/.*\"token\":\"([^\"]+)\".*/\\1/')\n  \
         curl -k {base}/patient/resources -H \"authorization: Bearer $TOKEN\"\n\n\
         Stop with Ctrl-C, then check the audit log: cargo run -p phr-gateway -- audit verify\n",
        credentials.patient.0,
        credentials.patient.1,
        credentials.operator.0,
        credentials.operator.1,
        credentials.operator_totp,
        credentials.operator_totp,
        credentials.patient.0,
        credentials.patient.1,
    );
}
