//! The source against the real simulator, in-process, over loopback HTTP.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use futures::StreamExt;

use super::simulator::patient_agent::{
    browser_client, callback_from_redirect, post_form, read_form, sign_in_and_decide,
};
use super::simulator::{
    BackendClientRegistration, HospitalSimulator, RunningSimulator, SimulatorConfig,
    SimulatorFaults,
};
use super::smart::{client_assertion, JWT_BEARER_ASSERTION_TYPE};
use super::*;
use crate::source::{PullBatch, PullItem, PulledResource};

const REDIRECT_URI: &str = "https://gateway.example/callback/hospital-sim";
const INSTRUCTION_ID: &str = "instr-0001";

fn all_types() -> Vec<String> {
    SUPPORTED_RESOURCE_TYPES
        .iter()
        .map(|t| t.to_string())
        .collect()
}

fn simulator_config(patients: usize, resources_per_patient: usize) -> SimulatorConfig {
    SimulatorConfig {
        seed: 7,
        patients,
        resources_per_patient,
        ..SimulatorConfig::default()
    }
}

async fn start(config: SimulatorConfig) -> RunningSimulator {
    HospitalSimulator::start(config)
        .await
        .expect("simulator starts")
}

/// Short timeouts and backoff so the fault tests run in seconds.
fn source_config(simulator: &RunningSimulator) -> FhirR4Config {
    let mut config = FhirR4Config::new("hospital-sim", &simulator.base_url, "phr-gateway");
    config.page_size = 25;
    config.prefer_everything = false;
    config.request_timeout = Duration::from_secs(5);
    config.retry = RetryPolicy {
        max_attempts: 4,
        base_delay: Duration::from_millis(20),
        max_delay: Duration::from_millis(200),
        max_retry_after: Duration::from_secs(5),
    };
    config
}

fn source(config: FhirR4Config) -> FhirR4Source {
    FhirR4Source::new(config).expect("source config is valid")
}

/// Drives the simulator's login and consent pages; returns the callback the gateway gets.
async fn patient_in_browser(
    start: &AuthorizationStart,
    username: &str,
    password: &str,
    keep_scope: impl Fn(&str) -> bool,
    approve: bool,
) -> Callback {
    let location = sign_in_and_decide(
        &start.authorize_url,
        username,
        password,
        keep_scope,
        approve,
    )
    .await
    .expect("the patient gets through the hospital's pages");
    assert!(location.starts_with(REDIRECT_URI), "{location}");
    callback_from_redirect(&location).expect("callback URL")
}

fn authorization_request(resource_types: Vec<String>) -> AuthorizationRequest {
    AuthorizationRequest {
        instruction_id: INSTRUCTION_ID.into(),
        resource_types,
        redirect_uri: REDIRECT_URI.into(),
        on_behalf_of: None,
    }
}

/// A full standalone launch by patient-0001, keeping the scopes `keep_scope` accepts.
async fn link_patient_one(
    source: &FhirR4Source,
    keep_scope: impl Fn(&str) -> bool,
) -> LinkCredentials {
    let start = source
        .start_authorization(&authorization_request(all_types()))
        .await
        .expect("start authorisation");
    let callback =
        patient_in_browser(&start, "patient-0001", "phr-sim-0001", keep_scope, true).await;
    source
        .finish_authorization(&start.pending, &callback)
        .await
        .expect("finish authorisation")
}

fn pull_request(credentials: &LinkCredentials, cursor: Option<String>) -> PullRequest {
    PullRequest {
        instruction_id: INSTRUCTION_ID.into(),
        credentials: credentials.clone(),
        cursor,
        resource_types: all_types(),
    }
}

async fn pull_all(
    source: &FhirR4Source,
    request: PullRequest,
) -> (Vec<PullBatch>, Option<SourceError>) {
    let mut stream = source.pull(request).await.expect("pull starts");
    let mut batches = Vec::new();
    while let Some(next) = stream.next().await {
        match next {
            Ok(batch) => batches.push(batch),
            Err(error) => return (batches, Some(error)),
        }
    }
    (batches, None)
}

fn resources(batches: &[PullBatch]) -> Vec<&PulledResource> {
    batches
        .iter()
        .flat_map(|batch| &batch.items)
        .filter_map(|item| match item {
            PullItem::Resource(resource) => Some(resource),
            _ => None,
        })
        .collect()
}

fn resource_keys(batches: &[PullBatch]) -> BTreeSet<(String, String)> {
    resources(batches)
        .into_iter()
        .map(|r| (r.resource_type.clone(), r.source_resource_id.clone()))
        .collect()
}

fn rejections(batches: &[PullBatch]) -> Vec<String> {
    batches
        .iter()
        .flat_map(|batch| &batch.items)
        .filter_map(|item| match item {
            PullItem::Rejected { reason, .. } => Some(reason.clone()),
            _ => None,
        })
        .collect()
}

fn not_granted(batches: &[PullBatch]) -> BTreeSet<String> {
    batches
        .iter()
        .flat_map(|batch| &batch.items)
        .filter_map(|item| match item {
            PullItem::TypeNotGranted { resource_type } => Some(resource_type.clone()),
            _ => None,
        })
        .collect()
}

fn expected_keys(simulator: &RunningSimulator, patient_id: &str) -> BTreeSet<(String, String)> {
    simulator
        .handle
        .resource_keys(patient_id)
        .into_iter()
        .collect()
}

fn keep_all(_: &str) -> bool {
    true
}

#[tokio::test]
async fn standalone_launch_then_paged_pull_yields_every_resource() {
    let simulator = start(simulator_config(2, 120)).await;
    let source = source(source_config(&simulator));
    let patient = simulator.handle.patient(1).expect("patient 1");
    let credentials = link_patient_one(&source, keep_all).await;
    assert_eq!(credentials.source_patient_id, patient.patient_id);
    assert!(
        credentials.refresh_token.is_some(),
        "offline_access granted"
    );
    assert!(credentials
        .granted_scopes
        .contains(&"patient/Observation.rs".to_string()));
    assert!(credentials.expires_at.is_some());

    let (batches, error) = pull_all(&source, pull_request(&credentials, None)).await;
    assert!(error.is_none(), "{error:?}");
    let pulled = resources(&batches);
    assert_eq!(pulled.len(), 120, "each resource exactly once");
    assert_eq!(
        resource_keys(&batches),
        expected_keys(&simulator, &patient.patient_id)
    );
    assert!(rejections(&batches).is_empty());
    assert!(not_granted(&batches).is_empty());
    let observation_pages = batches
        .iter()
        .filter(|batch| {
            batch.items.iter().any(
                |item| matches!(item, PullItem::Resource(r) if r.resource_type == "Observation"),
            )
        })
        .count();
    assert!(observation_pages >= 3, "60 Observations in pages of 25");
    for resource in &pulled {
        let served = simulator
            .handle
            .resource_json(&resource.resource_type, &resource.source_resource_id)
            .expect("served");
        assert_eq!(resource.body, served.as_bytes(), "kept as received");
        assert_eq!(resource.provenance.source, "hospital-sim");
        assert_eq!(resource.provenance.instruction_id, INSTRUCTION_ID);
        assert!(resource.provenance.retrieved_at > 1_700_000_000_000);
        assert_eq!(resource.version_id.as_deref(), Some("1"));
    }
    let log = simulator.handle.request_log();
    assert!(log
        .iter()
        .any(|line| line.starts_with("GET /Observation?patient=pt000001&_count=25")));
    assert!(!log.iter().any(|line| line.contains("$everything")));
    let cursor = PullCursor::parse(batches.last().map(|b| b.cursor.as_str())).expect("cursor");
    assert!(cursor.in_progress.is_none());
    assert!(cursor.high_water.contains_key("Observation"));
    assert!(batches.iter().all(|b| b.refreshed_credentials.is_none()));
    simulator.shutdown().await;
}

#[tokio::test]
async fn everything_operation_is_used_when_offered() {
    let simulator = start(simulator_config(1, 80)).await;
    let mut config = source_config(&simulator);
    config.prefer_everything = true;
    let source = source(config);
    let capabilities = source.capabilities().await.expect("capabilities");
    assert!(capabilities.supports_everything);
    assert!(capabilities
        .resource_types
        .contains(&"Observation".to_string()));
    let credentials = link_patient_one(&source, keep_all).await;
    simulator
        .handle
        .update_faults(|faults| faults.wrong_patient_entries_per_page = 1);
    let (batches, error) = pull_all(&source, pull_request(&credentials, None)).await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(resources(&batches).len(), 80);
    assert_eq!(
        resource_keys(&batches),
        expected_keys(&simulator, &credentials.source_patient_id)
    );
    assert!(batches.len() >= 4, "80 resources in pages of 25");
    assert!(rejections(&batches)
        .iter()
        .all(|r| r.contains("another patient")));
    let log = simulator.handle.request_log();
    assert!(log
        .iter()
        .any(|line| line.contains("/Patient/pt000001/$everything")));
    assert!(!log.iter().any(|line| line.starts_with("GET /Observation")));
    simulator.shutdown().await;
}

#[tokio::test]
async fn server_without_s256_is_refused_at_discovery() {
    let simulator = start(SimulatorConfig {
        pkce_methods: vec!["plain".into()],
        ..simulator_config(1, 5)
    })
    .await;
    let source = source(source_config(&simulator));
    let result = source
        .start_authorization(&authorization_request(all_types()))
        .await;
    assert!(
        matches!(result, Err(SourceError::Unsupported(_))),
        "{result:?}"
    );
    simulator.shutdown().await;
}

#[tokio::test]
async fn proxy_access_is_refused() {
    let simulator = start(simulator_config(1, 5)).await;
    let source = source(source_config(&simulator));
    let mut request = authorization_request(all_types());
    request.on_behalf_of = Some("someone-else".into());
    let result = source.start_authorization(&request).await;
    assert!(
        matches!(result, Err(SourceError::Unsupported(_))),
        "{result:?}"
    );
    simulator.shutdown().await;
}

#[tokio::test]
async fn state_mismatch_and_denial_are_refused() {
    let simulator = start(simulator_config(1, 5)).await;
    let source = source(source_config(&simulator));
    let start = source
        .start_authorization(&authorization_request(all_types()))
        .await
        .expect("start");
    let authorize_url = url::Url::parse(&start.authorize_url).expect("url");
    let query: Vec<(String, String)> = authorize_url.query_pairs().into_owned().collect();
    let has = |name: &str, value: &str| query.iter().any(|(k, v)| k == name && v == value);
    assert!(has("code_challenge_method", "S256"));
    assert!(has("aud", &simulator.base_url));
    assert!(has("state", &start.pending.state));
    let callback = patient_in_browser(&start, "patient-0001", "phr-sim-0001", keep_all, true).await;
    let forged = Callback {
        state: Some(format!("{}x", start.pending.state)),
        ..callback.clone()
    };
    let result = source.finish_authorization(&start.pending, &forged).await;
    assert!(
        matches!(result, Err(SourceError::Authorization(_))),
        "{result:?}"
    );
    let no_state = Callback {
        state: None,
        ..callback.clone()
    };
    assert!(source
        .finish_authorization(&start.pending, &no_state)
        .await
        .is_err());
    // The genuine callback still completes: the forged one never reached the server.
    let credentials = source
        .finish_authorization(&start.pending, &callback)
        .await
        .expect("genuine callback");
    assert_eq!(credentials.source_patient_id, "pt000001");

    let start = source
        .start_authorization(&authorization_request(all_types()))
        .await
        .expect("start");
    let denied = patient_in_browser(&start, "patient-0001", "phr-sim-0001", keep_all, false).await;
    assert_eq!(denied.error.as_deref(), Some("access_denied"));
    let result = source.finish_authorization(&start.pending, &denied).await;
    assert!(
        matches!(result, Err(SourceError::Authorization(_))),
        "{result:?}"
    );
    simulator.shutdown().await;
}

#[tokio::test]
async fn wrong_password_is_refused_by_the_login_page() {
    let simulator = start(simulator_config(1, 5)).await;
    let source = source(source_config(&simulator));
    let start = source
        .start_authorization(&authorization_request(all_types()))
        .await
        .expect("start");
    let browser = browser_client().expect("client");
    let html = browser
        .get(&start.authorize_url)
        .send()
        .await
        .expect("page")
        .text()
        .await
        .expect("html");
    let (action, inputs) = read_form(&html).expect("form");
    let mut fields: Vec<(String, String)> = inputs
        .into_iter()
        .filter(|(kind, _, _)| kind == "hidden")
        .map(|(_, name, value)| (name, value))
        .collect();
    fields.push(("username".into(), "patient-0001".into()));
    fields.push(("password".into(), "wrong".into()));
    let response = post_form(&browser, &action, &fields).await.expect("post");
    assert_eq!(response.status(), 401);
    simulator.shutdown().await;
}

#[tokio::test]
async fn token_response_without_patient_is_refused() {
    let simulator = start(SimulatorConfig {
        faults: SimulatorFaults {
            omit_patient_in_token_response: true,
            ..SimulatorFaults::default()
        },
        ..simulator_config(1, 5)
    })
    .await;
    let source = source(source_config(&simulator));
    let start = source
        .start_authorization(&authorization_request(all_types()))
        .await
        .expect("start");
    let callback = patient_in_browser(&start, "patient-0001", "phr-sim-0001", keep_all, true).await;
    let result = source.finish_authorization(&start.pending, &callback).await;
    match result {
        Err(SourceError::Protocol(message)) => assert!(message.contains("patient"), "{message}"),
        other => panic!("expected a protocol error, got {other:?}"),
    }
    simulator.shutdown().await;
}

#[tokio::test]
async fn scope_limited_token_skips_types_it_does_not_grant() {
    let simulator = start(simulator_config(1, 100)).await;
    let source = source(source_config(&simulator));
    let credentials = link_patient_one(&source, |scope| {
        scope != "patient/Condition.rs" && scope != "patient/Immunization.rs"
    })
    .await;
    assert!(!credentials
        .granted_scopes
        .contains(&"patient/Condition.rs".to_string()));
    // A type the scopes grant but the server still refuses (403).
    simulator
        .handle
        .update_faults(|faults| faults.forbidden_types = vec!["AllergyIntolerance".into()]);
    let (batches, error) = pull_all(&source, pull_request(&credentials, None)).await;
    assert!(error.is_none(), "{error:?}");
    let expected_refused: BTreeSet<String> = ["Condition", "Immunization", "AllergyIntolerance"]
        .iter()
        .map(|t| t.to_string())
        .collect();
    assert_eq!(not_granted(&batches), expected_refused);
    let pulled = resource_keys(&batches);
    let expected: BTreeSet<(String, String)> = expected_keys(&simulator, "pt000001")
        .into_iter()
        .filter(|(t, _)| !expected_refused.contains(t))
        .collect();
    assert_eq!(pulled, expected);
    let log = simulator.handle.request_log();
    assert!(!log
        .iter()
        .any(|line| line.starts_with("GET /Condition") || line.starts_with("GET /Immunization")));
    assert!(log
        .iter()
        .any(|line| line.starts_with("GET /AllergyIntolerance")));
    simulator.shutdown().await;
}

#[tokio::test]
async fn an_unreadable_page_of_one_type_does_not_end_the_pull() {
    let simulator = start(simulator_config(1, 100)).await;
    let source = source(source_config(&simulator));
    let credentials = link_patient_one(&source, |_| true).await;
    // A proxy answers Condition searches with an HTML page (wrong content type, not JSON).
    simulator
        .handle
        .update_faults(|faults| faults.broken_types = vec!["Condition".into()]);
    let (batches, error) = pull_all(&source, pull_request(&credentials, None)).await;
    assert!(error.is_none(), "{error:?}");
    let reasons = rejections(&batches);
    assert!(
        reasons.iter().any(|r| r.contains("could not be read")),
        "{reasons:?}"
    );
    let expected: BTreeSet<(String, String)> = expected_keys(&simulator, "pt000001")
        .into_iter()
        .filter(|(t, _)| t != "Condition")
        .collect();
    assert_eq!(
        resource_keys(&batches),
        expected,
        "every other type arrives"
    );

    // Once the proxy is fixed, the next pull from the cursor brings the Conditions.
    simulator
        .handle
        .update_faults(|faults| faults.broken_types.clear());
    let cursor = batches.last().map(|b| b.cursor.clone());
    let (again, error) = pull_all(&source, pull_request(&credentials, cursor)).await;
    assert!(error.is_none(), "{error:?}");
    let conditions = resource_keys(&again)
        .into_iter()
        .filter(|(t, _)| t == "Condition")
        .count();
    let expected_conditions = expected_keys(&simulator, "pt000001")
        .into_iter()
        .filter(|(t, _)| t == "Condition")
        .count();
    assert!(expected_conditions > 0);
    assert_eq!(conditions, expected_conditions);
    simulator.shutdown().await;
}

#[tokio::test]
async fn a_page_that_is_not_utf8_is_refused_and_the_pull_goes_on() {
    let simulator = start(simulator_config(1, 100)).await;
    let source = source(source_config(&simulator));
    let credentials = link_patient_one(&source, |_| true).await;
    // A server that sends its Observations in Shift_JIS under a FHIR JSON label.
    simulator
        .handle
        .update_faults(|faults| faults.non_utf8_types = vec!["Observation".into()]);
    let (batches, error) = pull_all(&source, pull_request(&credentials, None)).await;
    assert!(error.is_none(), "{error:?}");
    let reasons = rejections(&batches);
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("could not be read") && r.contains("UTF-8")),
        "the reason names the encoding: {reasons:?}"
    );
    assert!(
        resources(&batches)
            .iter()
            .all(|r| std::str::from_utf8(&r.body).is_ok()),
        "nothing that is not UTF-8 is handed over"
    );
    let expected: BTreeSet<(String, String)> = expected_keys(&simulator, "pt000001")
        .into_iter()
        .filter(|(t, _)| t != "Observation")
        .collect();
    assert!(!expected.is_empty());
    assert_eq!(
        resource_keys(&batches),
        expected,
        "every other type arrives"
    );
    simulator.shutdown().await;
}

#[tokio::test]
async fn an_unreadable_everything_page_falls_back_to_searches() {
    let simulator = start(simulator_config(1, 80)).await;
    let mut config = source_config(&simulator);
    config.prefer_everything = true;
    let source = source(config);
    let credentials = link_patient_one(&source, keep_all).await;
    simulator
        .handle
        .update_faults(|faults| faults.broken_everything = true);
    let (batches, error) = pull_all(&source, pull_request(&credentials, None)).await;
    assert!(error.is_none(), "{error:?}");
    let reasons = rejections(&batches);
    assert!(
        reasons.iter().any(|r| r.contains("$everything")),
        "the broken page is recorded: {reasons:?}"
    );
    assert_eq!(
        resource_keys(&batches),
        expected_keys(&simulator, &credentials.source_patient_id),
        "per-type searches bring everything"
    );
    let log = simulator.handle.request_log();
    assert!(log.iter().any(|line| line.contains("$everything")));
    assert!(log.iter().any(|line| line.starts_with("GET /Observation")));
    simulator.shutdown().await;
}

#[tokio::test]
async fn rate_limit_with_retry_after_is_honoured() {
    let simulator = start(simulator_config(1, 60)).await;
    let source = source(source_config(&simulator));
    let credentials = link_patient_one(&source, keep_all).await;
    simulator.handle.set_faults(SimulatorFaults {
        throttle_every_nth: Some(2),
        retry_after: Duration::from_secs(1),
        ..SimulatorFaults::default()
    });
    let mut request = pull_request(&credentials, None);
    request.resource_types = vec!["Patient".into(), "Observation".into()];
    let started = Instant::now();
    let (batches, error) = pull_all(&source, request).await;
    assert!(error.is_none(), "{error:?}");
    let throttled = simulator.handle.stats().throttled;
    assert!(throttled >= 1);
    assert!(
        started.elapsed() >= Duration::from_secs(throttled),
        "waited Retry-After each time"
    );
    let expected: BTreeSet<(String, String)> = expected_keys(&simulator, "pt000001")
        .into_iter()
        .filter(|(t, _)| t == "Patient" || t == "Observation")
        .collect();
    assert_eq!(resource_keys(&batches), expected);

    // The same with Retry-After as an HTTP date.
    simulator
        .handle
        .update_faults(|faults| faults.retry_after_as_http_date = true);
    let mut request = pull_request(&credentials, None);
    request.resource_types = vec!["Patient".into(), "Observation".into()];
    let (batches, error) = pull_all(&source, request).await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(resource_keys(&batches), expected);
    simulator.shutdown().await;
}

#[tokio::test]
async fn maintenance_beyond_the_retry_budget_is_unavailable() {
    let simulator = start(simulator_config(1, 10)).await;
    let mut config = source_config(&simulator);
    config.retry.max_attempts = 2;
    let source = source(config);
    let credentials = link_patient_one(&source, keep_all).await;
    simulator.handle.set_faults(SimulatorFaults {
        maintenance: true,
        retry_after: Duration::from_secs(1),
        ..SimulatorFaults::default()
    });
    let started = Instant::now();
    let (batches, error) = pull_all(&source, pull_request(&credentials, None)).await;
    assert!(resources(&batches).is_empty());
    match error {
        Some(SourceError::Unavailable { retry_after, .. }) => {
            assert_eq!(retry_after, Some(Duration::from_secs(1)))
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_eq!(simulator.handle.stats().maintenance_refusals, 2);

    // A Retry-After longer than we wait in-process: handed straight to the scheduler.
    simulator
        .handle
        .update_faults(|faults| faults.retry_after = Duration::from_secs(3600));
    let started = Instant::now();
    let (_, error) = pull_all(&source, pull_request(&credentials, None)).await;
    match error {
        Some(SourceError::Unavailable { retry_after, .. }) => {
            assert_eq!(retry_after, Some(Duration::from_secs(3600)))
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(2));
    simulator.shutdown().await;
}

#[tokio::test]
async fn slow_server_times_out_into_unavailable() {
    let simulator = start(simulator_config(1, 10)).await;
    let mut config = source_config(&simulator);
    config.request_timeout = Duration::from_millis(150);
    config.retry.max_attempts = 2;
    let source = source(config);
    let credentials = link_patient_one(&source, keep_all).await;
    simulator
        .handle
        .update_faults(|faults| faults.response_delay = Some(Duration::from_millis(600)));
    let (_, error) = pull_all(&source, pull_request(&credentials, None)).await;
    assert!(
        matches!(
            error,
            Some(SourceError::Unavailable {
                retry_after: None,
                ..
            })
        ),
        "{error:?}"
    );
    assert_eq!(simulator.handle.stats().fhir_requests, 2, "tried twice");
    simulator.shutdown().await;
}

#[tokio::test]
async fn expired_access_token_is_refreshed_once_and_the_pull_continues() {
    let simulator = start(simulator_config(1, 60)).await;
    let source = source(source_config(&simulator));
    let credentials = link_patient_one(&source, keep_all).await;
    simulator.handle.expire_access_tokens();
    let (batches, error) = pull_all(&source, pull_request(&credentials, None)).await;
    assert!(error.is_none(), "{error:?}");
    let refreshed: Vec<&LinkCredentials> = batches
        .iter()
        .filter_map(|batch| batch.refreshed_credentials.as_ref())
        .collect();
    assert_eq!(refreshed.len(), 1, "reported once");
    assert!(
        batches[0].refreshed_credentials.is_some(),
        "reported at once"
    );
    assert_ne!(refreshed[0].access_token, credentials.access_token);
    assert_eq!(refreshed[0].refresh_token, credentials.refresh_token);
    assert_eq!(
        refreshed[0].source_patient_id,
        credentials.source_patient_id
    );
    assert_eq!(
        resource_keys(&batches),
        expected_keys(&simulator, "pt000001")
    );
    assert_eq!(simulator.handle.stats().unauthorized, 1);

    // A server that refuses even the fresh token: Unauthorized, after reporting the refresh.
    simulator
        .handle
        .update_faults(|faults| faults.reject_all_access_tokens = true);
    let (batches, error) = pull_all(&source, pull_request(refreshed[0], None)).await;
    assert!(
        matches!(error, Some(SourceError::Unauthorized(_))),
        "{error:?}"
    );
    assert_eq!(batches.len(), 1);
    assert!(batches[0].refreshed_credentials.is_some());
    simulator.shutdown().await;
}

#[tokio::test]
async fn revoked_link_cannot_refresh() {
    let simulator = start(simulator_config(1, 10)).await;
    let source = source(source_config(&simulator));
    let credentials = link_patient_one(&source, keep_all).await;
    source.revoke(&credentials).await.expect("revoke");
    let (_, error) = pull_all(&source, pull_request(&credentials, None)).await;
    assert!(
        matches!(error, Some(SourceError::Unauthorized(_))),
        "{error:?}"
    );
    simulator.shutdown().await;
}

#[tokio::test]
async fn malformed_entries_are_rejected_and_the_rest_of_the_page_kept() {
    let simulator = start(simulator_config(1, 60)).await;
    let source = source(source_config(&simulator));
    let credentials = link_patient_one(&source, keep_all).await;
    simulator
        .handle
        .update_faults(|faults| faults.malformed_entries_per_page = 3);
    let (batches, error) = pull_all(&source, pull_request(&credentials, None)).await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(
        resource_keys(&batches),
        expected_keys(&simulator, "pt000001")
    );
    let search_pages = batches.len() - 1; // all but the Patient read
    assert_eq!(rejections(&batches).len(), 3 * search_pages);
    simulator.shutdown().await;
}

#[tokio::test]
async fn other_patients_resources_are_rejected_never_yielded() {
    let simulator = start(simulator_config(3, 60)).await;
    let source = source(source_config(&simulator));
    let credentials = link_patient_one(&source, keep_all).await;
    simulator
        .handle
        .update_faults(|faults| faults.wrong_patient_entries_per_page = 2);
    let (batches, error) = pull_all(&source, pull_request(&credentials, None)).await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(
        resource_keys(&batches),
        expected_keys(&simulator, "pt000001")
    );
    let reasons = rejections(&batches);
    assert!(reasons.len() >= 2 * (batches.len() - 1));
    assert!(reasons
        .iter()
        .all(|reason| reason.contains("another patient")));
    for resource in resources(&batches) {
        let body = std::str::from_utf8(&resource.body).expect("utf8");
        assert!(!body.contains("pt000002"), "{body}");
        assert!(!resource.source_resource_id.starts_with("intruder"));
    }
    simulator.shutdown().await;
}

#[tokio::test]
async fn the_capability_statement_is_read_once_for_several_pulls() {
    let simulator = start(simulator_config(1, 30)).await;
    let mut config = source_config(&simulator);
    config.prefer_everything = true;
    let source = source(config);
    let credentials = link_patient_one(&source, keep_all).await;
    simulator.handle.clear_request_log();
    for _ in 0..3 {
        let (batches, error) = pull_all(&source, pull_request(&credentials, None)).await;
        assert!(error.is_none(), "{error:?}");
        assert_eq!(resources(&batches).len(), 30);
    }
    let log = simulator.handle.request_log();
    let metadata = log
        .iter()
        .filter(|line| line.starts_with("GET /metadata"))
        .count();
    let everything = log
        .iter()
        .filter(|line| line.contains("$everything"))
        .count();
    assert_eq!(metadata, 1, "{log:?}");
    assert!(everything >= 3, "each pull still used $everything: {log:?}");
    simulator.shutdown().await;
}

#[tokio::test]
async fn resuming_from_a_cursor_fetches_only_what_is_new() {
    let simulator = start(simulator_config(1, 90)).await;
    let source = source(source_config(&simulator));
    let credentials = link_patient_one(&source, keep_all).await;
    let (batches, error) = pull_all(&source, pull_request(&credentials, None)).await;
    assert!(error.is_none(), "{error:?}");
    let everything = resource_keys(&batches);
    assert_eq!(everything.len(), 90);

    // Cut after the second batch (Patient, then Observation page 1) and resume.
    let cut = batches[1].cursor.clone();
    let before_cut: BTreeSet<(String, String)> = resource_keys(&batches[..2]);
    let (resumed, error) = pull_all(&source, pull_request(&credentials, Some(cut))).await;
    assert!(error.is_none(), "{error:?}");
    let after_cut = resource_keys(&resumed);
    assert!(before_cut.is_disjoint(&after_cut), "nothing fetched twice");
    assert_eq!(resources(&resumed).len(), after_cut.len());
    let union: BTreeSet<_> = before_cut.union(&after_cut).cloned().collect();
    assert_eq!(union, everything);

    // After a complete pull: only resources updated since.
    let final_cursor = batches.last().map(|b| b.cursor.clone());
    let added = simulator.handle.add_observations("pt000001", 3);
    simulator.handle.clear_request_log();
    let (newer, error) = pull_all(&source, pull_request(&credentials, final_cursor)).await;
    assert!(error.is_none(), "{error:?}");
    let expected: BTreeSet<(String, String)> = added
        .into_iter()
        .map(|id| ("Observation".to_string(), id))
        .collect();
    assert_eq!(resource_keys(&newer), expected);
    assert_eq!(resources(&newer).len(), 3);
    let log = simulator.handle.request_log();
    assert!(log
        .iter()
        .filter(|line| line.starts_with("GET /Observation"))
        .all(|line| line.contains("_lastUpdated=gt")));
    simulator.shutdown().await;
}

#[tokio::test]
async fn backend_services_assertions_are_verified() {
    let key = BackendKey::generate_es384();
    let simulator = start(SimulatorConfig {
        backend_client: Some(BackendClientRegistration {
            client_id: "phr-backend".into(),
            public_jwk: key.public_jwk(),
        }),
        ..simulator_config(1, 10)
    })
    .await;
    let backend_config = FhirR4Config::new("hospital-sim", &simulator.base_url, "phr-backend");
    let client = BackendServicesClient::new(backend_config.clone(), key.clone()).expect("client");
    let token = client
        .request_token(&["system/Patient.rs".into()])
        .await
        .expect("backend token");
    assert_eq!(token.granted_scopes, vec!["system/Patient.rs"]);
    let browser = browser_client().expect("client");
    let patient = browser
        .get(format!("{}/Patient/pt000001", simulator.base_url))
        .header(reqwest::header::ACCEPT, "application/fhir+json")
        .bearer_auth(&token.access_token)
        .send()
        .await
        .expect("read");
    assert_eq!(patient.status(), 200);

    let token_url = format!("{}/token", simulator.base_url);
    let post_assertion = |assertion: String| {
        let browser = browser.clone();
        let token_url = token_url.clone();
        async move {
            let fields = vec![
                ("grant_type".to_string(), "client_credentials".to_string()),
                ("scope".to_string(), "system/Patient.rs".to_string()),
                (
                    "client_assertion_type".to_string(),
                    JWT_BEARER_ASSERTION_TYPE.to_string(),
                ),
                ("client_assertion".to_string(), assertion),
            ];
            let response = post_form(&browser, &token_url, &fields)
                .await
                .expect("post");
            let status = response.status();
            (status, response.text().await.unwrap_or_default())
        }
    };
    let assertion = client_assertion(&key, "phr-backend", &token_url, Duration::from_secs(240))
        .expect("assertion");
    assert_eq!(post_assertion(assertion.clone()).await.0, 200);
    let (status, body) = post_assertion(assertion).await;
    assert_eq!(status, 401, "replayed jti");
    assert!(body.contains("jti"), "{body}");

    let long_lived = client_assertion(&key, "phr-backend", &token_url, Duration::from_secs(600))
        .expect("assertion");
    let (status, body) = post_assertion(long_lived).await;
    assert_eq!(status, 401, "exp beyond five minutes");
    assert!(body.contains("five minutes"), "{body}");

    let stranger = BackendKey::generate_es384();
    let forged = client_assertion(
        &stranger,
        "phr-backend",
        &token_url,
        Duration::from_secs(60),
    )
    .expect("assertion");
    assert_eq!(post_assertion(forged).await.0, 401, "signed by another key");

    let wrong_audience = client_assertion(
        &key,
        "phr-backend",
        "https://elsewhere.example/token",
        Duration::from_secs(60),
    )
    .expect("assertion");
    assert_eq!(post_assertion(wrong_audience).await.0, 401, "aud elsewhere");
    simulator.shutdown().await;
}

#[tokio::test]
async fn concurrent_pulls_share_the_source_limit() {
    let simulator = start(simulator_config(1, 60)).await;
    let mut config = source_config(&simulator);
    config.max_concurrent_requests = 1;
    let source = std::sync::Arc::new(source(config));
    let credentials = link_patient_one(&source, keep_all).await;
    let pulls = (0..3).map(|_| {
        let source = std::sync::Arc::clone(&source);
        let request = pull_request(&credentials, None);
        async move { pull_all(&source, request).await }
    });
    for (batches, error) in futures::future::join_all(pulls).await {
        assert!(error.is_none(), "{error:?}");
        assert_eq!(resources(&batches).len(), 60);
    }
    simulator.shutdown().await;
}

#[tokio::test]
async fn benchmark_sized_data_generates_quickly_enough() {
    let started = Instant::now();
    let handle = simulator::SimulatorHandle::new(simulator_config(1_000, 50), "http://127.0.0.1:1");
    assert_eq!(handle.resource_keys("pt001000").len(), 50);
    assert_eq!(
        handle.patient(1_000).map(|login| login.password),
        Some("phr-sim-1000".to_string())
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    // Same seed, same data.
    let again = simulator::SimulatorHandle::new(simulator_config(2, 50), "http://127.0.0.1:1");
    assert_eq!(
        again.resource_json("Observation", "obs-000002-000001"),
        handle.resource_json("Observation", "obs-000002-000001")
    );
}

mod bundle_fuzz {
    use proptest::prelude::*;
    use serde_json::{json, Value};

    use crate::fhir_r4::bundle::{parse_bundle_page, EntryRules};

    fn rules() -> EntryRules {
        EntryRules {
            linked_patient_id: "pt000001".into(),
            fhir_base_url: "http://127.0.0.1:1".into(),
            max_entry_bytes: 300,
        }
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            any::<f64>().prop_map(|n| json!(n)),
            "\\PC{0,12}".prop_map(Value::String),
            prop_oneof![
                Just("Patient/pt000001"),
                Just("Patient/other"),
                Just("Observation"),
                Just("Patient"),
                Just("resourceType"),
                Just("pt000001"),
            ]
            .prop_map(|s| Value::String(s.to_string())),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::vec(
                    (
                        prop_oneof![
                            Just("resourceType".to_string()),
                            Just("id".to_string()),
                            Just("subject".to_string()),
                            Just("patient".to_string()),
                            Just("reference".to_string()),
                            Just("resource".to_string()),
                            Just("meta".to_string()),
                            Just("lastUpdated".to_string()),
                            "[a-z]{1,6}",
                        ],
                        inner
                    ),
                    0..6
                )
                .prop_map(|pairs| Value::Object(pairs.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse_bundle_page(&bytes, &rules());
        }

        #[test]
        fn arbitrary_entries_never_panic(entries in prop::collection::vec(json_value(), 0..8), link in json_value()) {
            let page = json!({"resourceType": "Bundle", "type": "searchset", "link": link, "entry": entries});
            let bytes = serde_json::to_vec(&page).unwrap_or_default();
            if let Ok(parsed) = parse_bundle_page(&bytes, &rules()) {
                prop_assert_eq!(parsed.entries.len(), entries.len());
            }
        }

        #[test]
        fn arbitrary_resources_never_panic(resource in json_value()) {
            let page = json!({"resourceType": "Bundle", "entry": [{"resource": resource}]});
            let bytes = serde_json::to_vec(&page).unwrap_or_default();
            let parsed = parse_bundle_page(&bytes, &rules());
            prop_assert!(parsed.is_ok());
        }
    }
}

/// The benchmark's shape: 1 patient × 50,000 resources, by search and by $everything.
#[tokio::test]
async fn fifty_thousand_resources_for_one_patient() {
    let started = Instant::now();
    let simulator = start(SimulatorConfig {
        max_page_size: 1000,
        ..simulator_config(1, 50_000)
    })
    .await;
    let generated = started.elapsed();
    for prefer_everything in [false, true] {
        let mut config = source_config(&simulator);
        config.page_size = 1000;
        config.prefer_everything = prefer_everything;
        let source = source(config);
        let credentials = link_patient_one(&source, keep_all).await;
        let pull_started = Instant::now();
        let (batches, error) = pull_all(&source, pull_request(&credentials, None)).await;
        assert!(error.is_none(), "{error:?}");
        assert_eq!(resources(&batches).len(), 50_000);
        eprintln!(
            "generated in {generated:?}; pulled 50,000 ($everything: {prefer_everything}) in {:?} over {} batches",
            pull_started.elapsed(),
            batches.len()
        );
    }
    simulator.shutdown().await;
}

#[tokio::test]
async fn backend_services_link_by_code_pulls_with_system_tokens_and_unlinks() {
    let key = BackendKey::generate_es384();
    let simulator = start(SimulatorConfig {
        backend_client: Some(BackendClientRegistration {
            client_id: "phr-backend".into(),
            public_jwk: key.public_jwk(),
        }),
        ..simulator_config(2, 60)
    })
    .await;
    let mut config = source_config(&simulator);
    config.client_id = "phr-backend".into();
    config.backend_key = Some(key.clone());
    let source = source(config);
    assert_eq!(source.link_mode(), LinkMode::LinkingCode);

    let start = source
        .start_authorization(&authorization_request(all_types()))
        .await
        .expect("start");
    assert!(
        start.authorize_url.is_empty(),
        "nowhere to send the patient"
    );
    assert!(start
        .pending
        .requested_scopes
        .iter()
        .all(|scope| scope.starts_with("system/")));

    // A wrong code, a missing code and a forged state link nothing.
    for callback in [
        Callback {
            code: Some("00000-00000".into()),
            state: Some(start.pending.state.clone()),
            ..Callback::default()
        },
        Callback {
            code: None,
            state: Some(start.pending.state.clone()),
            ..Callback::default()
        },
        Callback {
            code: Some(simulator.handle.issue_linking_code("pt000002")),
            state: Some("forged".into()),
            ..Callback::default()
        },
    ] {
        let result = source.finish_authorization(&start.pending, &callback).await;
        assert!(
            matches!(result, Err(SourceError::Authorization(_))),
            "{result:?}"
        );
    }
    assert!(simulator.handle.linked_instructions().is_empty());

    // The code the hospital gave patient 2 links patient 2, and only once.
    let code = simulator.handle.issue_linking_code("pt000002");
    let callback = Callback {
        code: Some(code),
        state: Some(start.pending.state.clone()),
        ..Callback::default()
    };
    let credentials = source
        .finish_authorization(&start.pending, &callback)
        .await
        .expect("linked");
    assert_eq!(credentials.source_patient_id, "pt000002");
    assert!(credentials.refresh_token.is_none());
    assert_eq!(
        simulator.handle.linked_instructions(),
        vec![(INSTRUCTION_ID.to_string(), "pt000002".to_string())],
        "the hospital holds the instruction it releases data for"
    );
    let again = source.finish_authorization(&start.pending, &callback).await;
    assert!(
        matches!(again, Err(SourceError::Authorization(_))),
        "{again:?}"
    );

    // An expired system token is renewed with a new assertion, not a refresh token.
    simulator.handle.expire_access_tokens();
    let (batches, error) = pull_all(&source, pull_request(&credentials, None)).await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(
        resource_keys(&batches),
        expected_keys(&simulator, "pt000002"),
        "patient 2's record, all of it"
    );
    assert!(batches.iter().any(|b| b.refreshed_credentials.is_some()));

    source.revoke(&credentials).await.expect("unlink");
    assert!(simulator.handle.linked_instructions().is_empty());
    simulator.shutdown().await;
}
