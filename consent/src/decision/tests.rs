use super::*;
use crate::model::{Change, NewConsent, Performer, Period, PersonRef};
use time::macros::datetime;
use time::Duration;

const START: OffsetDateTime = datetime!(2026-04-01 00:00 +09:00);
const END: OffsetDateTime = datetime!(2027-04-01 00:00 +09:00);
const NOW: OffsetDateTime = datetime!(2026-06-15 12:00 +09:00);

fn app() -> Recipient {
    Recipient::client("app-1")
}

fn consent(id: &str, status: ConsentStatus) -> Consent {
    let patient = PersonRef::new("patient-1");
    let mut consent = Consent::create(NewConsent {
        id: id.into(),
        status: ConsentStatus::Active,
        performer: Performer::patient(&patient),
        patient,
        policy_uri: "https://gw.example/policies/disclosure/v1".into(),
        recorded_at: START,
        provision: Provision::permit(
            Some(Period::between(START, END)),
            vec![app(), Recipient::organization("hospital-9")],
            vec![Purpose::patient_requested(), Purpose::treatment()],
            vec![DataCategory::Observations, DataCategory::Medications],
        ),
    })
    .expect("valid consent");
    consent.status = status;
    consent
}

fn active() -> Consent {
    consent("consent-1", ConsentStatus::Active)
}

struct Case {
    name: &'static str,
    consents: Vec<Consent>,
    patient: &'static str,
    recipient: Recipient,
    purpose: Purpose,
    requested: Requested<'static>,
    now: OffsetDateTime,
    expected: Result<(&'static str, u32), DenyReason>,
}

fn case(name: &'static str, consents: Vec<Consent>) -> Case {
    Case {
        name,
        consents,
        patient: "patient-1",
        recipient: app(),
        purpose: Purpose::patient_requested(),
        requested: Requested::Category(DataCategory::Observations),
        now: NOW,
        expected: Ok(("consent-1", 1)),
    }
}

impl Case {
    fn denied(self, reason: DenyReason) -> Case {
        Case {
            expected: Err(reason),
            ..self
        }
    }

    fn at(self, now: OffsetDateTime) -> Case {
        Case { now, ..self }
    }

    fn asking(self, requested: Requested<'static>) -> Case {
        Case { requested, ..self }
    }

    fn run(&self) {
        let request = AccessRequest {
            patient: self.patient,
            recipient: &self.recipient,
            purpose: &self.purpose,
            requested: self.requested,
        };
        let decision = decide(&request, &self.consents, self.now);
        match self.expected {
            Ok((id, version)) => assert_eq!(
                decision,
                Decision::Permit {
                    consent: ConsentRef { id, version }
                },
                "{}",
                self.name
            ),
            Err(reason) => {
                assert_eq!(decision.effect(), Effect::Deny, "{}", self.name);
                assert_eq!(decision.reason(), Some(reason), "{}", self.name);
            }
        }
    }
}

fn with(mut consent: Consent, change: impl FnOnce(&mut Consent)) -> Consent {
    change(&mut consent);
    consent
}

fn deny_medications_to_hospital() -> Provision {
    Provision::deny(
        None,
        vec![Recipient::organization("hospital-9")],
        vec![],
        vec![DataCategory::Medications],
    )
}

#[test]
fn decide_table() {
    let nanosecond = Duration::nanoseconds(1);
    let cases = vec![
        case("permit", vec![active()]),
        case("permit by resource type", vec![active()])
            .asking(Requested::ResourceType("DiagnosticReport")),
        case("permit at the first instant", vec![active()]).at(START),
        case("permit at the last instant", vec![active()]).at(END - nanosecond),
        case(
            "permit with an open period",
            vec![with(active(), |c| c.provision.period = None)],
        ),
        case("no consents", vec![]).denied(DenyReason::NoConsent),
        case(
            "another patient's consent",
            vec![with(active(), |c| {
                c.patient.id = "patient-2".into();
                c.performer.person.id = "patient-2".into();
            })],
        )
        .denied(DenyReason::NoConsent),
        Case {
            patient: "patient-2",
            ..case("asking for another patient", vec![active()])
        }
        .denied(DenyReason::NoConsent),
        Case {
            recipient: Recipient::client("app-2"),
            ..case("another recipient", vec![active()])
        }
        .denied(DenyReason::RecipientNotCovered),
        Case {
            recipient: Recipient::organization("app-1"),
            ..case("same id, other kind of recipient", vec![active()])
        }
        .denied(DenyReason::RecipientNotCovered),
        Case {
            purpose: Purpose::research(),
            ..case("another purpose", vec![active()])
        }
        .denied(DenyReason::PurposeNotCovered),
        Case {
            purpose: Purpose::new("urn:other-system", "PATRQT"),
            ..case("same code, other purpose system", vec![active()])
        }
        .denied(DenyReason::PurposeNotCovered),
        case("another category", vec![active()])
            .asking(Requested::Category(DataCategory::Conditions))
            .denied(DenyReason::CategoryNotCovered),
        case("a resource type of another category", vec![active()])
            .asking(Requested::ResourceType("Condition"))
            .denied(DenyReason::CategoryNotCovered),
        case("a resource type no category covers", vec![active()])
            .asking(Requested::ResourceType("AuditEvent"))
            .denied(DenyReason::UnknownResourceType),
        case(
            "proposed",
            vec![consent("consent-1", ConsentStatus::Proposed)],
        )
        .denied(DenyReason::Proposed),
        case(
            "rejected",
            vec![consent("consent-1", ConsentStatus::Rejected)],
        )
        .denied(DenyReason::Rejected),
        case(
            "withdrawn",
            vec![consent("consent-1", ConsentStatus::Inactive)],
        )
        .denied(DenyReason::Withdrawn),
        case("before the start", vec![active()])
            .at(START - nanosecond)
            .denied(DenyReason::NotYetValid),
        case("at the end", vec![active()])
            .at(END)
            .denied(DenyReason::Expired),
        case("after the end", vec![active()])
            .at(END + Duration::days(400))
            .denied(DenyReason::Expired),
        Case {
            recipient: Recipient::organization("hospital-9"),
            ..case(
                "excluded by a nested deny",
                vec![with(active(), |c| {
                    c.provision.nested.push(deny_medications_to_hospital())
                })],
            )
        }
        .asking(Requested::Category(DataCategory::Medications))
        .denied(DenyReason::Excluded),
        Case {
            recipient: Recipient::organization("hospital-9"),
            expected: Ok(("consent-1", 1)),
            ..case(
                "a nested deny leaves the rest",
                vec![with(active(), |c| {
                    c.provision.nested.push(deny_medications_to_hospital())
                })],
            )
        },
        case(
            "a nested deny for another recipient",
            vec![with(active(), |c| {
                c.provision.nested.push(deny_medications_to_hospital())
            })],
        )
        .asking(Requested::Category(DataCategory::Medications)),
        case(
            "a nested deny with every list empty excludes all",
            vec![with(active(), |c| {
                c.provision
                    .nested
                    .push(Provision::deny(None, vec![], vec![], vec![]))
            })],
        )
        .denied(DenyReason::Excluded),
        case(
            "a nested deny during its period",
            vec![with(active(), |c| {
                c.provision.nested.push(Provision::deny(
                    Some(Period::between(NOW, NOW + Duration::days(1))),
                    vec![],
                    vec![],
                    vec![],
                ))
            })],
        )
        .denied(DenyReason::Excluded),
        case(
            "a nested deny after its period",
            vec![with(active(), |c| {
                c.provision.nested.push(Provision::deny(
                    Some(Period::between(NOW - Duration::days(1), NOW)),
                    vec![],
                    vec![],
                    vec![],
                ))
            })],
        ),
        case(
            "malformed: no recipients",
            vec![with(active(), |c| c.provision.actors.clear())],
        )
        .denied(DenyReason::MalformedConsent),
        case(
            "malformed: no policy",
            vec![with(active(), |c| c.policy_uri.clear())],
        )
        .denied(DenyReason::MalformedConsent),
        case(
            "malformed: root deny",
            vec![with(active(), |c| {
                c.provision.kind = crate::model::ProvisionKind::Deny
            })],
        )
        .denied(DenyReason::MalformedConsent),
        case(
            "malformed: nested permit",
            vec![with(active(), |c| {
                let widen = c.provision.clone();
                c.provision.nested.push(widen)
            })],
        )
        .denied(DenyReason::MalformedConsent),
        case(
            "malformed: version 0",
            vec![with(active(), |c| c.version = 0)],
        )
        .denied(DenyReason::MalformedConsent),
        Case {
            patient: "",
            ..case(
                "malformed request: no patient",
                vec![with(active(), |c| {
                    c.patient.id.clear();
                    c.performer.person.id.clear();
                })],
            )
        }
        .denied(DenyReason::MalformedRequest),
        Case {
            recipient: Recipient::client(""),
            ..case("malformed request: no recipient", vec![active()])
        }
        .denied(DenyReason::MalformedRequest),
        case(
            "two records of one version conflict",
            vec![
                active(),
                with(active(), |c| {
                    c.provision.categories.push(DataCategory::Conditions)
                }),
            ],
        )
        .denied(DenyReason::AmbiguousConsent),
        case(
            "the same record twice is harmless",
            vec![active(), active()],
        ),
        case(
            "a withdrawn later version supersedes",
            vec![
                active(),
                with(consent("consent-1", ConsentStatus::Inactive), |c| {
                    c.version = 2
                }),
            ],
        )
        .denied(DenyReason::Withdrawn),
        case(
            "a granted later version supersedes",
            vec![
                with(active(), |c| c.version = 2),
                consent("consent-1", ConsentStatus::Proposed),
            ],
        )
        .permitted_by("consent-1", 2),
        case(
            "another consent permits despite a withdrawn one",
            vec![consent("consent-0", ConsentStatus::Inactive), active()],
        ),
        case(
            "a malformed consent does not stop a good one",
            vec![
                with(consent("consent-0", ConsentStatus::Active), |c| {
                    c.provision.purposes.clear()
                }),
                active(),
            ],
        ),
        case(
            "two permits: the smaller id is named",
            vec![
                consent("consent-2", ConsentStatus::Active),
                consent("consent-1", ConsentStatus::Active),
            ],
        ),
    ];
    for case in &cases {
        case.run();
    }
}

impl Case {
    fn permitted_by(self, id: &'static str, version: u32) -> Case {
        Case {
            expected: Ok((id, version)),
            ..self
        }
    }
}

#[test]
fn the_reason_comes_from_the_consent_closest_to_permitting() {
    let for_other_app = with(consent("a", ConsentStatus::Active), |c| {
        c.provision.actors = vec![Recipient::client("app-2")]
    });
    let withdrawn = consent("b", ConsentStatus::Inactive);
    let expired = with(consent("c", ConsentStatus::Active), |c| {
        c.provision.period = Some(Period::between(START - Duration::days(10), START))
    });
    let request_recipient = app();
    let purpose = Purpose::patient_requested();
    let request = AccessRequest {
        patient: "patient-1",
        recipient: &request_recipient,
        purpose: &purpose,
        requested: Requested::Category(DataCategory::Observations),
    };

    let consents = [for_other_app.clone(), withdrawn.clone()];
    assert_eq!(
        decide(&request, &consents, NOW),
        Decision::Deny {
            reason: DenyReason::Withdrawn,
            consent: Some(ConsentRef {
                id: "b",
                version: 1
            }),
        }
    );
    let consents = [withdrawn, expired, for_other_app];
    assert_eq!(
        decide(&request, &consents, NOW),
        Decision::Deny {
            reason: DenyReason::Expired,
            consent: Some(ConsentRef {
                id: "c",
                version: 1
            }),
        }
    );
    assert_eq!(
        decide(&request, &[], NOW),
        Decision::Deny {
            reason: DenyReason::NoConsent,
            consent: None
        }
    );
}

#[test]
fn a_consents_lifecycle_as_seen_by_decide() {
    let me = Performer::patient(&PersonRef::new("patient-1"));
    let proposed = consent("consent-1", ConsentStatus::Proposed);
    let granted = proposed
        .apply(Change::Grant, me.clone(), START)
        .expect("grant");
    let mut narrower = granted.provision.clone();
    narrower.categories = vec![DataCategory::Medications];
    let narrowed = granted
        .apply(Change::Amend(narrower), me.clone(), NOW)
        .expect("narrow");
    let withdrawn = narrowed
        .apply(Change::Withdraw, me, NOW + Duration::days(1))
        .expect("withdraw");

    let recipient = app();
    let purpose = Purpose::patient_requested();
    let observations = AccessRequest {
        patient: "patient-1",
        recipient: &recipient,
        purpose: &purpose,
        requested: Requested::Category(DataCategory::Observations),
    };
    let medications = AccessRequest {
        requested: Requested::Category(DataCategory::Medications),
        ..observations
    };
    // The caller keeps every version; decide counts only the latest it is given.
    let mut history = vec![proposed];
    assert_eq!(
        decide(&observations, &history, NOW).reason(),
        Some(DenyReason::Proposed)
    );
    history.push(granted);
    assert!(decide(&observations, &history, NOW).is_permit());
    history.push(narrowed);
    assert_eq!(
        decide(&observations, &history, NOW).reason(),
        Some(DenyReason::CategoryNotCovered)
    );
    assert_eq!(
        decide(&medications, &history, NOW).consent(),
        Some(ConsentRef {
            id: "consent-1",
            version: 3
        })
    );
    history.push(withdrawn);
    assert_eq!(
        decide(&medications, &history, NOW).reason(),
        Some(DenyReason::Withdrawn)
    );
}

#[test]
fn every_reason_has_a_distinct_code_and_messages() {
    let reasons = [
        DenyReason::MalformedRequest,
        DenyReason::UnknownResourceType,
        DenyReason::NoConsent,
        DenyReason::MalformedConsent,
        DenyReason::AmbiguousConsent,
        DenyReason::RecipientNotCovered,
        DenyReason::PurposeNotCovered,
        DenyReason::CategoryNotCovered,
        DenyReason::Proposed,
        DenyReason::Rejected,
        DenyReason::Withdrawn,
        DenyReason::NotYetValid,
        DenyReason::Expired,
        DenyReason::Excluded,
    ];
    let codes: std::collections::HashSet<_> = reasons.iter().map(|r| r.code()).collect();
    assert_eq!(codes.len(), reasons.len());
    for reason in reasons {
        assert!(!reason.message_ja().is_empty() && !reason.message_en().is_empty());
    }
}
