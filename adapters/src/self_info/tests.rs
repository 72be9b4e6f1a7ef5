//! The source against the portal simulator, in-process, over loopback HTTP.

use std::collections::BTreeSet;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use futures::StreamExt;
use serde_json::Value;

use super::simulator::patient_agent::{read_card_and_decide, PortalVisit};
use super::simulator::{PortalSimulator, RunningSimulator, SimulatorConfig, SimulatorFaults};
use super::*;
use crate::simulator_web::callback_from_redirect;
use crate::source::{PullBatch, PullItem, PulledResource};

const REDIRECT_URI: &str = "https://gateway.example/callback/myna-portal";
const INSTRUCTION_ID: &str = "instr-portal-1";
const CLIENT_ID: &str = "phr-gateway";

/// Every type the portal's categories map to.
fn all_types() -> Vec<String> {
    [
        "MedicationDispense",
        "Immunization",
        "Observation",
        "ExplanationOfBenefit",
        "DocumentReference",
    ]
    .iter()
    .map(|t| t.to_string())
    .collect()
}

struct Portal {
    simulator: RunningSimulator,
    key: BackendKey,
}

async fn start_with(change: impl FnOnce(&mut SimulatorConfig)) -> Portal {
    let key = BackendKey::generate_es384();
    let mut config = SimulatorConfig::new(CLIENT_ID, key.public_jwk());
    config.seed = 11;
    config.persons = 4;
    config.default_page_size = 2;
    change(&mut config);
    let simulator = PortalSimulator::start(config)
        .await
        .expect("simulator starts");
    Portal { simulator, key }
}

async fn start() -> Portal {
    start_with(|_| {}).await
}

/// Short timeouts and backoff so the fault tests run in seconds.
fn source_config(portal: &Portal) -> SelfInfoConfig {
    let mut config = SelfInfoConfig::new(
        "myna-portal",
        &portal.simulator.base_url,
        CLIENT_ID,
        portal.key.clone(),
    );
    config.page_size = 3;
    config.request_timeout = Duration::from_secs(5);
    config.retry = RetryPolicy {
        max_attempts: 2,
        base_delay: Duration::from_millis(20),
        max_delay: Duration::from_millis(100),
        max_retry_after: Duration::from_secs(5),
    };
    config
}

fn source(config: SelfInfoConfig) -> SelfInfoSource {
    SelfInfoSource::new(config).expect("source config is valid")
}

fn authorization_request(on_behalf_of: Option<&str>) -> AuthorizationRequest {
    AuthorizationRequest {
        instruction_id: INSTRUCTION_ID.into(),
        resource_types: all_types(),
        redirect_uri: REDIRECT_URI.into(),
        on_behalf_of: on_behalf_of.map(str::to_string),
    }
}

async fn visit(
    portal: &Portal,
    start: &AuthorizationStart,
    person: usize,
    consent: bool,
) -> PortalVisit {
    let person = portal.simulator.handle.person(person).expect("person");
    read_card_and_decide(
        &start.authorize_url,
        &person.card_number,
        &person.pin,
        consent,
    )
    .await
    .expect("the person gets through the portal's screens")
}

/// Person `person` reads their card and consents; returns the link.
async fn link(
    portal: &Portal,
    source: &SelfInfoSource,
    person: usize,
    on_behalf_of: Option<&str>,
) -> LinkCredentials {
    let start = source
        .start_authorization(&authorization_request(on_behalf_of))
        .await
        .expect("start authorisation");
    let visit = visit(portal, &start, person, true).await;
    assert!(
        visit.location.starts_with(REDIRECT_URI),
        "{}",
        visit.location
    );
    let callback = callback_from_redirect(&visit.location).expect("callback");
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
    source: &SelfInfoSource,
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

fn rejections(batches: &[PullBatch]) -> Vec<(Option<String>, String)> {
    batches
        .iter()
        .flat_map(|batch| &batch.items)
        .filter_map(|item| match item {
            PullItem::Rejected {
                source_resource_id,
                reason,
                ..
            } => Some((source_resource_id.clone(), reason.clone())),
            _ => None,
        })
        .collect()
}

fn body(resource: &PulledResource) -> Value {
    serde_json::from_slice(&resource.body).expect("resource JSON")
}

fn find<'a>(batches: &'a [PullBatch], id: &str) -> &'a PulledResource {
    resources(batches)
        .into_iter()
        .find(|resource| resource.source_resource_id == id)
        .unwrap_or_else(|| panic!("{id} not pulled"))
}

/// The resource ids the simulator's records for `subject` should become (checkups of the
/// categories in `categories`).
fn expected_ids(portal: &Portal, subject: &str, categories: &[Category]) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    for (category, id, _, _) in portal.simulator.handle.records(subject) {
        if !categories.contains(&category) {
            continue;
        }
        match category {
            Category::Medication => {
                ids.insert(format!("med-{id}-1"));
                ids.insert(format!("med-{id}-2"));
            }
            Category::Immunization => {
                ids.insert(format!("imm-{id}"));
            }
            Category::MedicalCost => {
                ids.insert(format!("cost-{id}"));
            }
            Category::SpecificCheckup => {
                ids.insert(format!("chk-{id}"));
            }
            Category::InfantCheckup | Category::SchoolCheckup => {
                let prefix = if category == Category::InfantCheckup {
                    "inf"
                } else {
                    "sch"
                };
                for code in ["9N001000000000001", "9N006000000000001", "HEAD-CIRC"] {
                    ids.insert(format!("{prefix}-{id}-{code}"));
                }
            }
        }
    }
    ids
}

fn pulled_ids(batches: &[PullBatch]) -> BTreeSet<String> {
    resources(batches)
        .into_iter()
        .map(|resource| resource.source_resource_id.clone())
        .collect()
}

#[tokio::test]
async fn full_flow_maps_every_category_then_pulls_only_what_is_new() {
    let portal = start().await;
    let source = source(source_config(&portal));
    let person = portal.simulator.handle.person(1).expect("person 1");
    let credentials = link(&portal, &source, 1, None).await;
    assert_eq!(credentials.source_patient_id, person.subject);
    assert!(
        credentials.refresh_token.is_some(),
        "period linkage refreshes"
    );
    assert!(credentials.extra.contains_key("linkage_expires_at"));
    assert!(credentials.extra.contains_key("token_endpoint"));
    assert!(!credentials
        .granted_scopes
        .contains(&"checkup.school".to_string()));

    let (batches, error) = pull_all(&source, pull_request(&credentials, None)).await;
    assert!(error.is_none(), "{error:?}");
    assert!(
        rejections(&batches).is_empty(),
        "{:?}",
        rejections(&batches)
    );
    let adult_categories = [
        Category::Medication,
        Category::Immunization,
        Category::MedicalCost,
        Category::SpecificCheckup,
    ];
    assert_eq!(
        pulled_ids(&batches),
        expected_ids(&portal, &person.subject, &adult_categories)
    );
    let patient = format!("Patient/{}", person.subject);
    for resource in resources(&batches) {
        let json = body(resource);
        let reference = json
            .get("subject")
            .or_else(|| json.get("patient"))
            .and_then(|reference| reference["reference"].as_str());
        assert_eq!(
            reference,
            Some(patient.as_str()),
            "{}",
            resource.source_resource_id
        );
        assert_eq!(json["id"], resource.source_resource_id.as_str());
        assert_eq!(
            json["meta"]["versionId"].as_str(),
            resource.version_id.as_deref()
        );
        assert_eq!(resource.provenance.source, "myna-portal");
    }
    // All three drug code systems, in the gateway's canonical forms.
    let systems: BTreeSet<String> = resources(&batches)
        .into_iter()
        .filter(|r| r.resource_type == "MedicationDispense")
        .map(|r| {
            body(r)["medicationCodeableConcept"]["coding"][0]["system"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert_eq!(
        systems,
        BTreeSet::from([
            "http://capstandard.jp/iyaku.info/CodeSystem/YJ-code".to_string(),
            "http://medis.or.jp/CodeSystem/master-HOT9".to_string(),
            "http://jpfhir.jp/fhir/core/mhlw/CodeSystem/MedicationGeneralOrderCode".to_string(),
        ])
    );
    // The generated correction and withdrawal arrive as such.
    let records = portal.simulator.handle.records(&person.subject);
    for (category, id, version, withdrawn) in &records {
        let resource_id = match category {
            Category::Medication => format!("med-{id}-1"),
            Category::Immunization => format!("imm-{id}"),
            _ => continue,
        };
        let resource = find(&batches, &resource_id);
        assert_eq!(resource.version_id, Some(version.to_string()));
        let status = body(resource)["status"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert_eq!(status == "entered-in-error", *withdrawn, "{resource_id}");
    }
    assert!(records.iter().any(|(_, _, version, _)| *version == 2));
    assert!(records.iter().any(|(_, _, _, withdrawn)| *withdrawn));
    // The 特定健診 CDA is attached unchanged.
    let (_, checkup_id, _, _) = records
        .iter()
        .find(|(category, ..)| *category == Category::SpecificCheckup)
        .expect("an adult has a checkup");
    let document = find(&batches, &format!("chk-{checkup_id}"));
    let attachment = &body(document)["content"][0]["attachment"];
    assert_eq!(attachment["contentType"], "application/hl7-v3+xml");
    let decoded = STANDARD
        .decode(attachment["data"].as_str().expect("data"))
        .expect("base64");
    assert_eq!(
        Some(String::from_utf8(decoded).expect("utf-8")),
        portal
            .simulator
            .handle
            .checkup_document(&person.subject, checkup_id)
    );

    // Second pull from the stored cursor: only a new record and a corrected one.
    let cursor = batches.last().map(|batch| batch.cursor.clone());
    let new_id = portal.simulator.handle.add_medication(&person.subject);
    let (_, corrected_id, corrected_from, _) = records
        .iter()
        .find(|(category, ..)| *category == Category::Medication)
        .cloned()
        .expect("a medication");
    let corrected_to = portal
        .simulator
        .handle
        .correct_record(&person.subject, &corrected_id)
        .expect("corrected");
    assert_eq!(corrected_to, corrected_from + 1);
    // A withdrawn checkup comes again as entered-in-error, though its document is gone.
    let withdrawn_version = portal
        .simulator
        .handle
        .withdraw_record(&person.subject, checkup_id)
        .expect("withdrawn");
    portal.simulator.handle.clear_request_log();
    let (again, error) = pull_all(&source, pull_request(&credentials, cursor)).await;
    assert!(error.is_none(), "{error:?}");
    assert!(rejections(&again).is_empty(), "{:?}", rejections(&again));
    assert_eq!(
        pulled_ids(&again),
        BTreeSet::from([
            format!("med-{new_id}-1"),
            format!("med-{new_id}-2"),
            format!("med-{corrected_id}-1"),
            format!("med-{corrected_id}-2"),
            format!("chk-{checkup_id}"),
        ])
    );
    let withdrawn = find(&again, &format!("chk-{checkup_id}"));
    assert_eq!(withdrawn.version_id, Some(withdrawn_version.to_string()));
    assert_eq!(body(withdrawn)["status"], "entered-in-error");
    let corrected = find(&again, &format!("med-{corrected_id}-1"));
    assert_eq!(corrected.version_id, Some(corrected_to.to_string()));
    let medication_requests: Vec<String> = portal
        .simulator
        .handle
        .request_log()
        .into_iter()
        .filter(|line| line.starts_with("GET /v1/medications"))
        .collect();
    assert!(!medication_requests.is_empty());
    assert!(
        medication_requests
            .iter()
            .all(|line| line.contains("since=")),
        "{medication_requests:?}"
    );
    portal.simulator.shutdown().await;
}

#[tokio::test]
async fn authorise_url_carries_pkce_s256_state_scope_and_linkage() {
    let portal = start().await;
    let source = source(source_config(&portal));
    let start = source
        .start_authorization(&authorization_request(None))
        .await
        .expect("start");
    let url = url::Url::parse(&start.authorize_url).expect("URL");
    let parameter = |name: &str| {
        url.query_pairs()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.into_owned())
    };
    assert_eq!(parameter("code_challenge_method").as_deref(), Some("S256"));
    assert_eq!(
        parameter("code_challenge"),
        Some(s256_challenge(&start.pending.code_verifier))
    );
    assert_eq!(
        parameter("state").as_deref(),
        Some(start.pending.state.as_str())
    );
    assert_eq!(parameter("linkage").as_deref(), Some("period"));
    assert_eq!(
        parameter("scope").as_deref(),
        Some("checkup.specific medication immunization checkup.infant medical_cost")
    );

    // A callback with another state is refused before anything else.
    let visit_result = visit(&portal, &start, 1, true).await;
    let mut callback = callback_from_redirect(&visit_result.location).expect("callback");
    let genuine_state = callback.state.clone();
    callback.state = Some("forged".into());
    assert!(matches!(
        source.finish_authorization(&start.pending, &callback).await,
        Err(SourceError::Authorization(_))
    ));
    // The right state with the wrong verifier: the portal's PKCE check refuses the code.
    callback.state = genuine_state;
    let mut pending = start.pending.clone();
    pending.code_verifier = crate::oauth::random_url_token();
    assert!(matches!(
        source.finish_authorization(&pending, &callback).await,
        Err(SourceError::Authorization(_))
    ));

    // Declining comes back as access_denied.
    let start = source
        .start_authorization(&authorization_request(None))
        .await
        .expect("start");
    let declined = visit(&portal, &start, 1, false).await;
    let callback = callback_from_redirect(&declined.location).expect("callback");
    assert_eq!(callback.error.as_deref(), Some("access_denied"));
    assert!(matches!(
        source.finish_authorization(&start.pending, &callback).await,
        Err(SourceError::Authorization(_))
    ));
    portal.simulator.shutdown().await;
}

/// The PKCE S256 challenge of a verifier, computed independently of the adapter.
fn s256_challenge(verifier: &str) -> String {
    use sha2::{Digest, Sha256};
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

#[tokio::test]
async fn a_client_assertion_signed_with_another_key_is_refused() {
    let portal = start().await;
    let mut config = source_config(&portal);
    config.backend_key = BackendKey::generate_es384();
    let impostor = source(config);
    let start = impostor
        .start_authorization(&authorization_request(None))
        .await
        .expect("start");
    let visit = visit(&portal, &start, 1, true).await;
    let callback = callback_from_redirect(&visit.location).expect("callback");
    let refused = impostor
        .finish_authorization(&start.pending, &callback)
        .await;
    assert!(
        matches!(refused, Err(SourceError::Authorization(ref reason)) if reason.contains("invalid_client")),
        "{refused:?}"
    );
    assert_eq!(portal.simulator.handle.stats().refused_client_assertions, 1);
    assert_eq!(portal.simulator.handle.stats().tokens_issued, 0);
    portal.simulator.shutdown().await;
}

#[tokio::test]
async fn expired_access_token_is_refreshed_and_the_pull_goes_on() {
    let portal = start().await;
    let source = source(source_config(&portal));
    let credentials = link(&portal, &source, 1, None).await;
    portal.simulator.handle.expire_access_tokens();
    let (batches, error) = pull_all(&source, pull_request(&credentials, None)).await;
    assert!(error.is_none(), "{error:?}");
    let refreshed: Vec<&LinkCredentials> = batches
        .iter()
        .filter_map(|batch| batch.refreshed_credentials.as_ref())
        .collect();
    assert_eq!(refreshed.len(), 1);
    assert_ne!(refreshed[0].access_token, credentials.access_token);
    assert_eq!(refreshed[0].refresh_token, credentials.refresh_token);
    assert_eq!(
        refreshed[0].source_patient_id,
        credentials.source_patient_id
    );
    assert!(!resources(&batches).is_empty());
    portal.simulator.shutdown().await;
}

#[tokio::test]
async fn invalid_token_once_refreshes_twice_needs_reauthorisation() {
    let portal = start().await;
    let source = source(source_config(&portal));
    let credentials = link(&portal, &source, 1, None).await;
    let person = portal.simulator.handle.person(1).expect("person");
    let everything = expected_ids(
        &portal,
        &person.subject,
        &[
            Category::Medication,
            Category::Immunization,
            Category::MedicalCost,
            Category::SpecificCheckup,
        ],
    );

    portal
        .simulator
        .handle
        .update_faults(|faults| faults.invalid_token_responses = 1);
    let (batches, error) = pull_all(&source, pull_request(&credentials, None)).await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(pulled_ids(&batches), everything);
    assert!(batches
        .iter()
        .any(|batch| batch.refreshed_credentials.is_some()));

    portal
        .simulator
        .handle
        .update_faults(|faults| faults.invalid_token_responses = 2);
    let (batches, error) = pull_all(&source, pull_request(&credentials, None)).await;
    assert!(
        matches!(error, Some(SourceError::Unauthorized(_))),
        "{error:?}"
    );
    // The refreshed credentials still reach the gateway before the error.
    assert!(batches
        .iter()
        .any(|batch| batch.refreshed_credentials.is_some()));
    portal.simulator.shutdown().await;
}

#[tokio::test]
async fn linkage_expired_at_the_data_endpoint_is_its_own_error() {
    let portal = start().await;
    let source = source(source_config(&portal));
    let credentials = link(&portal, &source, 1, None).await;
    portal.simulator.handle.expire_linkages();
    let (batches, error) = pull_all(&source, pull_request(&credentials, None)).await;
    assert!(resources(&batches).is_empty());
    let error = error.expect("the pull stops");
    assert!(matches!(error, SourceError::LinkageExpired(_)), "{error:?}");
    assert!(error.needs_reauthorization());
    portal.simulator.shutdown().await;
}

#[tokio::test]
async fn refresh_after_the_linkage_period_is_linkage_expired() {
    let portal = start_with(|config| config.linkage_period = Duration::from_secs(1)).await;
    let source = source(source_config(&portal));
    let credentials = link(&portal, &source, 1, None).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // The access token is refused first, so the adapter tries its refresh token.
    portal
        .simulator
        .handle
        .update_faults(|faults| faults.invalid_token_responses = 1);
    let (_, error) = pull_all(&source, pull_request(&credentials, None)).await;
    assert!(
        matches!(error, Some(SourceError::LinkageExpired(_))),
        "{error:?}"
    );
    portal.simulator.shutdown().await;
}

#[tokio::test]
async fn one_off_linkage_has_no_refresh_token() {
    let portal = start().await;
    let mut config = source_config(&portal);
    config.linkage = Linkage::Once;
    let source = source(config);
    let credentials = link(&portal, &source, 1, None).await;
    assert!(credentials.refresh_token.is_none());
    portal.simulator.handle.expire_access_tokens();
    let (_, error) = pull_all(&source, pull_request(&credentials, None)).await;
    assert!(
        matches!(error, Some(SourceError::Unauthorized(_))),
        "{error:?}"
    );
    portal.simulator.shutdown().await;
}

#[tokio::test]
async fn rate_limit_and_maintenance_are_unavailable_with_retry_after() {
    let portal = start().await;
    let source = source(source_config(&portal));
    let credentials = link(&portal, &source, 1, None).await;
    for faults in [
        SimulatorFaults {
            rate_limited: true,
            retry_after: Duration::from_secs(60),
            ..SimulatorFaults::default()
        },
        SimulatorFaults {
            maintenance: true,
            retry_after: Duration::from_secs(120),
            ..SimulatorFaults::default()
        },
    ] {
        let expected = faults.retry_after;
        portal.simulator.handle.set_faults(faults);
        let (_, error) = pull_all(&source, pull_request(&credentials, None)).await;
        match error {
            Some(error @ SourceError::Unavailable { .. }) => {
                assert!(error.is_transient());
                let SourceError::Unavailable { retry_after, .. } = error else {
                    unreachable!()
                };
                assert_eq!(retry_after, Some(expected));
            }
            other => panic!("expected unavailable, got {other:?}"),
        }
    }
    // A scheduled window: wait until it ends.
    let now = time::OffsetDateTime::now_utc();
    portal.simulator.handle.set_faults(SimulatorFaults {
        maintenance_windows: vec![(
            now - time::Duration::minutes(1),
            now + time::Duration::minutes(30),
        )],
        ..SimulatorFaults::default()
    });
    let (_, error) = pull_all(&source, pull_request(&credentials, None)).await;
    match error {
        Some(SourceError::Unavailable {
            retry_after: Some(wait),
            ..
        }) => assert!(
            wait > Duration::from_secs(29 * 60) && wait <= Duration::from_secs(30 * 60 + 1),
            "{wait:?}"
        ),
        other => panic!("expected unavailable, got {other:?}"),
    }
    // Once the portal is back, the same link pulls again.
    portal
        .simulator
        .handle
        .set_faults(SimulatorFaults::default());
    let (batches, error) = pull_all(&source, pull_request(&credentials, None)).await;
    assert!(error.is_none(), "{error:?}");
    assert!(!resources(&batches).is_empty());
    assert!(portal.simulator.handle.stats().throttled >= 1);
    portal.simulator.shutdown().await;
}

#[tokio::test]
async fn malformed_items_are_rejected_and_the_rest_kept() {
    let portal = start_with(|config| {
        config.faults = SimulatorFaults {
            bad_xml_document: true,
            wrong_drug_code: true,
            item_missing_fields: true,
            ..SimulatorFaults::default()
        }
    })
    .await;
    let source = source(source_config(&portal));
    let person = portal.simulator.handle.person(1).expect("person");
    let credentials = link(&portal, &source, 1, None).await;
    let (batches, error) = pull_all(&source, pull_request(&credentials, None)).await;
    assert!(error.is_none(), "{error:?}");
    let rejected = rejections(&batches);
    let ids: BTreeSet<Option<String>> = rejected.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(
        ids,
        BTreeSet::from([
            Some("med-M-BAD-CODE-1".to_string()),
            Some("imm-V-MISSING".to_string()),
            Some("chk-K-BAD-XML".to_string()),
        ]),
        "{rejected:?}"
    );
    assert!(rejected
        .iter()
        .any(|(_, reason)| reason.contains("is not a YJ code")));
    assert!(rejected
        .iter()
        .any(|(_, reason)| reason.contains("date is missing")));
    assert!(rejected
        .iter()
        .any(|(_, reason)| reason.contains("no ClinicalDocument")));
    assert_eq!(
        pulled_ids(&batches),
        expected_ids(
            &portal,
            &person.subject,
            &[
                Category::Medication,
                Category::Immunization,
                Category::MedicalCost,
                Category::SpecificCheckup,
            ]
        )
    );
    portal.simulator.shutdown().await;
}

#[tokio::test]
async fn revoke_ends_the_link() {
    let portal = start().await;
    let source = source(source_config(&portal));
    let credentials = link(&portal, &source, 1, None).await;
    source.revoke(&credentials).await.expect("revoked");
    let (batches, error) = pull_all(&source, pull_request(&credentials, None)).await;
    assert!(resources(&batches).is_empty());
    let error = error.expect("a revoked link cannot pull");
    assert!(matches!(error, SourceError::Unauthorized(_)), "{error:?}");
    // Revoking twice is fine: the portal no longer knows the token.
    source.revoke(&credentials).await.expect("idempotent");
    portal.simulator.shutdown().await;
}

#[tokio::test]
async fn a_proxy_links_the_represented_persons_record() {
    let portal = start().await;
    let source = source(source_config(&portal));
    let child = portal.simulator.handle.person(2).expect("person 2");
    let start = source
        .start_authorization(&authorization_request(Some(&child.card_number)))
        .await
        .expect("start");
    let visit_result = visit(&portal, &start, 1, true).await;
    assert!(visit_result.consent_page.contains("代理人"));
    assert!(visit_result.consent_page.contains(&child.display_name));
    let callback = callback_from_redirect(&visit_result.location).expect("callback");
    let credentials = source
        .finish_authorization(&start.pending, &callback)
        .await
        .expect("finish");
    assert_eq!(credentials.source_patient_id, child.subject);
    assert_eq!(
        credentials.extra.get("on_behalf_of"),
        Some(&child.card_number)
    );
    let (batches, error) = pull_all(&source, pull_request(&credentials, None)).await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(
        pulled_ids(&batches),
        expected_ids(
            &portal,
            &child.subject,
            &[
                Category::Medication,
                Category::Immunization,
                Category::MedicalCost,
                Category::InfantCheckup,
            ]
        )
    );
    let observation = resources(&batches)
        .into_iter()
        .find(|resource| resource.resource_type == "Observation")
        .expect("infant checkup observations");
    assert_eq!(
        body(observation)["subject"]["reference"],
        format!("Patient/{}", child.subject)
    );

    // Person 3 is nobody's proxy for person 2: the portal refuses at the card step.
    let start = source
        .start_authorization(&authorization_request(Some(&child.card_number)))
        .await
        .expect("start");
    let stranger = portal.simulator.handle.person(3).expect("person 3");
    let refused = read_card_and_decide(
        &start.authorize_url,
        &stranger.card_number,
        &stranger.pin,
        true,
    )
    .await;
    assert!(
        matches!(refused, Err(ref message) if message.contains("403")),
        "{refused:?}"
    );
    portal.simulator.shutdown().await;
}

#[tokio::test]
async fn school_checkups_only_when_configured() {
    // Off by default on both sides.
    let portal = start().await;
    let source_default = source(source_config(&portal));
    let child = portal.simulator.handle.person(2).expect("person 2");
    let credentials = link(&portal, &source_default, 1, Some(&child.card_number)).await;
    assert!(!credentials
        .granted_scopes
        .contains(&"checkup.school".to_string()));
    let (batches, _) = pull_all(&source_default, pull_request(&credentials, None)).await;
    assert!(!pulled_ids(&batches).iter().any(|id| id.starts_with("sch-")));
    portal.simulator.shutdown().await;

    // Turned on in the configuration (and offered by the portal): no code change needed.
    let portal = start_with(|config| config.offer_school_checkups = true).await;
    let mut config = source_config(&portal);
    config.enabled_categories.push(Category::SchoolCheckup);
    let source_with_school = source(config);
    let child = portal.simulator.handle.person(2).expect("person 2");
    let credentials = link(&portal, &source_with_school, 1, Some(&child.card_number)).await;
    assert!(credentials
        .granted_scopes
        .contains(&"checkup.school".to_string()));
    let (batches, error) = pull_all(&source_with_school, pull_request(&credentials, None)).await;
    assert!(error.is_none(), "{error:?}");
    let school: Vec<String> = pulled_ids(&batches)
        .into_iter()
        .filter(|id| id.starts_with("sch-"))
        .collect();
    assert_eq!(school.len(), 3, "{school:?}");
    portal.simulator.shutdown().await;
}

#[tokio::test]
async fn a_cursor_cut_short_resumes_on_its_page() {
    let portal = start().await;
    let mut config = source_config(&portal);
    // Three dispensing records on pages of two: the second batch leaves a page token.
    config.page_size = 2;
    let source = source(config);
    let person = portal.simulator.handle.person(1).expect("person");
    let credentials = link(&portal, &source, 1, None).await;
    let (all, _) = pull_all(&source, pull_request(&credentials, None)).await;
    // Stop after the second batch, then resume from its cursor.
    let mut stream = source
        .pull(pull_request(&credentials, None))
        .await
        .expect("pull");
    let mut first_part = Vec::new();
    for _ in 0..2 {
        first_part.push(stream.next().await.expect("batch").expect("ok"));
    }
    drop(stream);
    let cursor = first_part.last().map(|batch| batch.cursor.clone());
    assert!(
        cursor
            .as_deref()
            .is_some_and(|cursor| cursor.contains("page_token")),
        "{cursor:?}"
    );
    let (rest, error) = pull_all(&source, pull_request(&credentials, cursor)).await;
    assert!(error.is_none(), "{error:?}");
    let mut resumed = pulled_ids(&first_part);
    resumed.extend(pulled_ids(&rest));
    assert_eq!(resumed, pulled_ids(&all));

    // A stored page token the portal no longer knows: that category starts over.
    let mut stale: SelfInfoCursor =
        SelfInfoCursor::parse(first_part.last().map(|batch| batch.cursor.as_str()))
            .expect("cursor");
    if let Some(progress) = stale.in_progress.as_mut() {
        progress.page_token = "no-longer-valid".into();
    }
    let (restarted, error) =
        pull_all(&source, pull_request(&credentials, Some(stale.encode()))).await;
    assert!(error.is_none(), "{error:?}");
    let restarted_ids = pulled_ids(&restarted);
    assert!(pulled_ids(&all)
        .iter()
        .filter(|id| id.starts_with("med-"))
        .all(|id| restarted_ids.contains(id)));
    assert_eq!(
        resumed,
        expected_ids(
            &portal,
            &person.subject,
            &[
                Category::Medication,
                Category::Immunization,
                Category::MedicalCost,
                Category::SpecificCheckup,
            ]
        )
    );
    portal.simulator.shutdown().await;
}

mod properties {
    use proptest::prelude::*;
    use serde_json::{json, Value};

    use crate::self_info::mapping;
    use crate::self_info::Category;

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(|f| json!(f)),
            "[a-zA-Z0-9 ._/-]{0,20}".prop_map(Value::from),
            Just(json!("2024-04-01")),
            Just(json!("entered-in-error")),
            Just(json!("HOT9")),
            Just(json!("111226401")),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                prop::collection::btree_map(
                    prop_oneof![
                        Just("id".to_string()),
                        Just("version".to_string()),
                        Just("status".to_string()),
                        Just("date".to_string()),
                        Just("dispensed_on".to_string()),
                        Just("items".to_string()),
                        Just("measurements".to_string()),
                        Just("vaccine".to_string()),
                        Just("code".to_string()),
                        Just("code_system".to_string()),
                        Just("drug_code".to_string()),
                        Just("value".to_string()),
                        Just("unit".to_string()),
                        Just("quantity".to_string()),
                        Just("month".to_string()),
                        Just("total_yen".to_string()),
                        Just("patient_paid_yen".to_string()),
                        "[a-z_]{1,8}",
                    ],
                    inner,
                    0..8
                )
                .prop_map(|map| Value::Object(map.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn mapping_never_panics(record in json_value(), document in prop::collection::vec(any::<u8>(), 0..200)) {
            for category in Category::ALL {
                let _ = mapping::map_record(category, &record, "p1");
            }
            if let Ok(listing) = mapping::checkup_listing(&record) {
                let _ = mapping::map_checkup_document(&listing, &document, "p1");
            }
            let _ = mapping::check_cda_document(&document);
        }
    }
}
