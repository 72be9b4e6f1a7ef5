use super::*;
use time::macros::datetime;

const POLICY: &str = "https://gw.example/policies/disclosure/v1";

fn patient() -> PersonRef {
    PersonRef::new("patient-1")
}

fn app() -> Recipient {
    Recipient::client("app-1")
}

fn permit() -> Provision {
    Provision::permit(
        Some(Period::between(
            datetime!(2026-01-01 00:00 UTC),
            datetime!(2027-01-01 00:00 UTC),
        )),
        vec![app(), Recipient::organization("hospital-9")],
        vec![Purpose::patient_requested(), Purpose::treatment()],
        vec![DataCategory::Observations, DataCategory::Medications],
    )
}

fn new_consent(status: ConsentStatus) -> NewConsent {
    NewConsent {
        id: "consent-1".into(),
        status,
        patient: patient(),
        performer: Performer::patient(&patient()),
        policy_uri: POLICY.into(),
        recorded_at: datetime!(2026-01-01 09:00 +09:00),
        provision: permit(),
    }
}

fn granted() -> Consent {
    Consent::create(new_consent(ConsentStatus::Active)).expect("valid consent")
}

#[test]
fn a_new_consent_is_version_one_with_the_loinc_category() {
    let consent = granted();
    assert_eq!(consent.version, 1);
    assert_eq!(consent.status, ConsentStatus::Active);
    assert_eq!(consent.category.code, LOINC_PATIENT_CONSENT);
    assert_eq!(consent.category.system, LOINC_SYSTEM);
}

#[test]
fn create_refuses_what_ppc_1_and_fail_closed_rules_forbid() {
    type Spoil = Box<dyn Fn(&mut NewConsent)>;
    let cases: Vec<(&str, Spoil, ConsentError)> = vec![
        ("no id", Box::new(|n| n.id.clear()), ConsentError::NoId),
        (
            "no policy",
            Box::new(|n| n.policy_uri.clear()),
            ConsentError::NoPolicy,
        ),
        (
            "policy not a URI",
            Box::new(|n| n.policy_uri = "disclosure policy".into()),
            ConsentError::NoPolicy,
        ),
        (
            "policy with no scheme",
            Box::new(|n| n.policy_uri = ":x".into()),
            ConsentError::NoPolicy,
        ),
        (
            "no patient",
            Box::new(|n| n.patient.id.clear()),
            ConsentError::NoPatient,
        ),
        (
            "no recipients",
            Box::new(|n| n.provision.actors.clear()),
            ConsentError::NoRecipients,
        ),
        (
            "no purposes",
            Box::new(|n| n.provision.purposes.clear()),
            ConsentError::NoPurposes,
        ),
        (
            "no categories",
            Box::new(|n| n.provision.categories.clear()),
            ConsentError::NoCategories,
        ),
        (
            "root deny",
            Box::new(|n| n.provision.kind = ProvisionKind::Deny),
            ConsentError::RootNotPermit,
        ),
        (
            "nested permit",
            Box::new(|n| n.provision.nested.push(permit())),
            ConsentError::NestedNotDeny,
        ),
        (
            "deny nesting further",
            Box::new(|n| {
                let mut deny = Provision::deny(None, vec![], vec![], vec![]);
                deny.nested
                    .push(Provision::deny(None, vec![], vec![], vec![]));
                n.provision.nested.push(deny);
            }),
            ConsentError::NestedTooDeep,
        ),
        (
            "empty period",
            Box::new(|n| {
                let at = datetime!(2026-05-01 00:00 UTC);
                n.provision.period = Some(Period::between(at, at));
            }),
            ConsentError::EmptyPeriod,
        ),
        (
            "reversed period in a nested deny",
            Box::new(|n| {
                n.provision.nested.push(Provision::deny(
                    Some(Period::between(
                        datetime!(2026-06-01 00:00 UTC),
                        datetime!(2026-05-01 00:00 UTC),
                    )),
                    vec![],
                    vec![],
                    vec![],
                ))
            }),
            ConsentError::EmptyPeriod,
        ),
        (
            "empty recipient id",
            Box::new(|n| n.provision.actors.push(Recipient::client(""))),
            ConsentError::EmptyRecipientId,
        ),
        (
            "empty purpose code",
            Box::new(|n| n.provision.purposes.push(Purpose::v3(""))),
            ConsentError::EmptyPurpose,
        ),
        (
            "someone else claiming to be the patient",
            Box::new(|n| n.performer.person = PersonRef::new("mother-1")),
            ConsentError::PerformerMismatch,
        ),
        (
            "the patient claiming to be their own proxy",
            Box::new(|n| n.performer.representation = Representation::RegisteredProxy),
            ConsentError::PerformerMismatch,
        ),
        (
            "created rejected",
            Box::new(|n| n.status = ConsentStatus::Rejected),
            ConsentError::BadInitialStatus(ConsentStatus::Rejected),
        ),
    ];
    for (name, spoil, expected) in cases {
        let mut new = new_consent(ConsentStatus::Active);
        spoil(&mut new);
        assert_eq!(Consent::create(new).err(), Some(expected), "{name}");
    }
}

#[test]
fn a_parent_may_consent_for_a_dependent() {
    let mut new = new_consent(ConsentStatus::Active);
    new.performer = Performer {
        person: PersonRef::new("mother-1"),
        representation: Representation::ParentOfDependent,
    };
    let consent = Consent::create(new).expect("a parent's consent is valid");
    assert_eq!(consent.performer.person.id, "mother-1");
}

#[test]
fn changes_give_the_next_version_and_leave_the_old_one_as_it_was() {
    let proposed = Consent::create(new_consent(ConsentStatus::Proposed)).expect("valid");
    let before = proposed.clone();
    let at = datetime!(2026-01-02 10:00 +09:00);
    let active = proposed
        .apply(Change::Grant, Performer::patient(&patient()), at)
        .expect("grant a proposal");
    assert_eq!(proposed, before);
    assert_eq!((active.version, active.status), (2, ConsentStatus::Active));
    assert_eq!(active.recorded_at, at);
    assert_eq!(active.provision, proposed.provision);

    let mut narrower = active.provision.clone();
    narrower.categories = vec![DataCategory::Observations];
    let amended = active
        .apply(
            Change::Amend(narrower.clone()),
            Performer::patient(&patient()),
            at,
        )
        .expect("narrow an active consent");
    assert_eq!(
        (amended.version, amended.status),
        (3, ConsentStatus::Active)
    );
    assert_eq!(amended.provision, narrower);

    let proxy = Performer {
        person: PersonRef::new("proxy-7"),
        representation: Representation::RegisteredProxy,
    };
    let withdrawn = amended
        .apply(Change::Withdraw, proxy.clone(), at)
        .expect("withdraw");
    assert_eq!(
        (withdrawn.version, withdrawn.status),
        (4, ConsentStatus::Inactive)
    );
    assert_eq!(withdrawn.performer, proxy);
    assert_eq!(withdrawn.provision, narrower, "what ended stays on record");
    assert_eq!(withdrawn.id, proposed.id);
}

#[test]
fn refused_changes() {
    let me = Performer::patient(&patient());
    let at = datetime!(2026-02-01 00:00 UTC);
    let active = granted();
    let proposed = Consent::create(new_consent(ConsentStatus::Proposed)).expect("valid");
    let withdrawn = active
        .apply(Change::Withdraw, me.clone(), at)
        .expect("withdraw");
    let rejected = proposed
        .apply(Change::Reject, me.clone(), at)
        .expect("reject");
    assert_eq!(rejected.status, ConsentStatus::Rejected);

    let cases = [
        (&active, Change::Grant, ConsentStatus::Active),
        (&active, Change::Reject, ConsentStatus::Active),
        (&proposed, Change::Withdraw, ConsentStatus::Proposed),
        (&withdrawn, Change::Grant, ConsentStatus::Inactive),
        (&withdrawn, Change::Amend(permit()), ConsentStatus::Inactive),
        (&withdrawn, Change::Withdraw, ConsentStatus::Inactive),
        (&rejected, Change::Grant, ConsentStatus::Rejected),
        (&rejected, Change::Amend(permit()), ConsentStatus::Rejected),
    ];
    for (consent, change, from) in cases {
        let code = change.code();
        assert_eq!(
            consent.apply(change, me.clone(), at).err(),
            Some(ConsentError::BadTransition { from, change: code }),
            "{code} on {from:?}"
        );
    }

    let mut empty = permit();
    empty.purposes.clear();
    assert_eq!(
        active.apply(Change::Amend(empty), me.clone(), at).err(),
        Some(ConsentError::NoPurposes),
        "an amendment must leave a valid consent"
    );
    assert_eq!(
        active
            .apply(Change::Withdraw, me, datetime!(2025-12-31 00:00 UTC))
            .err(),
        Some(ConsentError::ChangeBeforeRecorded)
    );
}

#[test]
fn periods_start_inclusive_end_exclusive() {
    let start = datetime!(2026-01-01 00:00 UTC);
    let end = datetime!(2026-02-01 00:00 UTC);
    let period = Period::between(start, end);
    let nanosecond = time::Duration::nanoseconds(1);
    assert_eq!(period.position(start - nanosecond), PeriodPosition::Before);
    assert_eq!(period.position(start), PeriodPosition::Within);
    assert_eq!(period.position(end - nanosecond), PeriodPosition::Within);
    assert_eq!(period.position(end), PeriodPosition::After);
    let open = Period {
        start: None,
        end: None,
    };
    assert!(open.contains(start));
}

#[test]
fn serde_uses_r4_status_codes_and_round_trips() {
    for (status, code) in [
        (ConsentStatus::Proposed, "proposed"),
        (ConsentStatus::Active, "active"),
        (ConsentStatus::Rejected, "rejected"),
        (ConsentStatus::Inactive, "inactive"),
    ] {
        assert_eq!(serde_json::to_value(status).expect("json"), code);
        assert_eq!(status.code(), code);
    }
    assert_eq!(
        serde_json::to_value(Representation::OneSelf).expect("json"),
        "self"
    );
    let consent = granted();
    let json = serde_json::to_string(&consent).expect("json");
    let back: Consent = serde_json::from_str(&json).expect("parse");
    assert_eq!(back, consent);
}

fn codes(value: &Value) -> Vec<&str> {
    value
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|c| c["code"].as_str())
        .collect()
}

#[test]
fn fhir_json_has_the_required_elements_and_meets_ppc_1() {
    let mut consent = granted();
    consent.provision.nested.push(Provision::deny(
        None,
        vec![Recipient::organization("hospital-9")],
        vec![],
        vec![DataCategory::Medications],
    ));
    let json = to_fhir_json(&consent).expect("fhir");

    assert_eq!(json["resourceType"], "Consent");
    assert_eq!(json["id"], "consent-1");
    assert_eq!(json["meta"]["versionId"], "1");
    assert_eq!(json["status"], "active");
    assert_eq!(json["scope"]["coding"][0]["system"], CONSENT_SCOPE_SYSTEM);
    assert_eq!(json["scope"]["coding"][0]["code"], "patient-privacy");
    assert_eq!(json["category"][0]["coding"][0]["system"], LOINC_SYSTEM);
    assert_eq!(json["category"][0]["coding"][0]["code"], "59284-0");
    assert_eq!(json["patient"]["reference"], "Patient/patient-1");
    assert_eq!(json["performer"][0]["reference"], "Patient/patient-1");
    assert_eq!(json["dateTime"], "2026-01-01T09:00:00+09:00");
    // ppc-1: policy or policyRule.
    assert_eq!(json["policy"][0]["uri"], POLICY);
    assert_eq!(json["policyRule"]["coding"][0]["code"], "OPTIN");

    let provision = &json["provision"];
    assert_eq!(provision["type"], "permit");
    assert_eq!(provision["period"]["start"], "2026-01-01T00:00:00Z");
    assert_eq!(provision["period"]["end"], "2027-01-01T00:00:00Z");
    let actors = provision["actor"].as_array().expect("actors");
    assert_eq!(actors.len(), 2);
    for actor in actors {
        assert_eq!(
            actor["role"]["coding"][0]["system"],
            PARTICIPATION_TYPE_SYSTEM
        );
        assert_eq!(actor["role"]["coding"][0]["code"], "IRCP");
    }
    assert_eq!(actors[0]["reference"]["reference"], "Device/app-1");
    assert_eq!(
        actors[1]["reference"]["reference"],
        "Organization/hospital-9"
    );
    assert_eq!(codes(&provision["purpose"]), ["PATRQT", "TREAT"]);
    assert_eq!(provision["purpose"][0]["system"], PURPOSE_OF_USE_SYSTEM);
    assert_eq!(
        codes(&provision["class"]),
        [
            "Observation",
            "DiagnosticReport",
            "MedicationRequest",
            "MedicationDispense",
            "MedicationStatement",
            "Medication"
        ]
    );
    assert_eq!(provision["class"][0]["system"], RESOURCE_TYPES_SYSTEM);

    let nested = &provision["provision"][0];
    assert_eq!(nested["type"], "deny");
    assert_eq!(
        nested["actor"][0]["reference"]["reference"],
        "Organization/hospital-9"
    );
    assert_eq!(codes(&nested["class"]).len(), 4);
    assert!(nested.get("purpose").is_none(), "empty means any: omitted");
    assert!(nested.get("period").is_none());
}

#[test]
fn fhir_json_names_a_representative_as_related_person() {
    let mut new = new_consent(ConsentStatus::Active);
    new.performer = Performer {
        person: PersonRef::new("proxy-7"),
        representation: Representation::RegisteredProxy,
    };
    let json = to_fhir_json(&Consent::create(new).expect("valid")).expect("fhir");
    let performer = &json["performer"][0];
    assert_eq!(performer["reference"], "RelatedPerson/proxy-7");
    assert_eq!(
        performer["extension"][0]["url"],
        REPRESENTATION_EXTENSION_URL
    );
    assert_eq!(performer["extension"][0]["valueCode"], "registered-proxy");
}

#[test]
fn fhir_json_refuses_an_invalid_consent() {
    let mut consent = granted();
    consent.policy_uri.clear();
    assert_eq!(to_fhir_json(&consent).err(), Some(ConsentError::NoPolicy));
    let mut consent = granted();
    consent.provision.actors.clear();
    assert_eq!(
        to_fhir_json(&consent).err(),
        Some(ConsentError::NoRecipients)
    );
}
