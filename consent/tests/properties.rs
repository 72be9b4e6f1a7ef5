//! Properties of `decide` over generated consents and requests, drawn from small pools of
//! patients, recipients, purposes and times so that matches and near misses both happen.

use phr_consent::{
    decide, AccessRequest, Change, Consent, ConsentStatus, DataCategory, Decision, Performer,
    Period, PersonRef, Provision, ProvisionKind, Purpose, Recipient, Requested,
};
use proptest::prelude::*;
use proptest::sample::subsequence;
use time::macros::datetime;
use time::{Duration, OffsetDateTime};

const BASE: OffsetDateTime = datetime!(2026-01-01 00:00 UTC);
const HOURS: i64 = 48;

fn at(hour: i64) -> OffsetDateTime {
    BASE + Duration::hours(hour)
}

fn recipients() -> Vec<Recipient> {
    vec![
        Recipient::client("app-1"),
        Recipient::client("app-2"),
        Recipient::organization("hospital-1"),
    ]
}

fn purposes() -> Vec<Purpose> {
    vec![
        Purpose::treatment(),
        Purpose::patient_requested(),
        Purpose::research(),
    ]
}

const PATIENTS: [&str; 2] = ["patient-1", "patient-2"];

fn period() -> impl Strategy<Value = Option<Period>> {
    prop_oneof![
        1 => Just(None),
        4 => (proptest::option::of(0..HOURS), proptest::option::of(1..=HOURS)).prop_map(
            |(start, end)| {
                // Keep most periods well-formed; a generated empty one is a malformed
                // consent, which decide must also handle.
                let end = match (start, end) {
                    (Some(s), Some(e)) if e <= s => Some(s + 1),
                    (_, e) => e,
                };
                Some(Period {
                    start: start.map(at),
                    end: end.map(at),
                })
            }
        ),
    ]
}

fn deny_provision() -> impl Strategy<Value = Provision> {
    (
        period(),
        subsequence(recipients(), 0..=2),
        subsequence(purposes(), 0..=2),
        subsequence(DataCategory::ALL.to_vec(), 0..=3),
    )
        .prop_map(|(period, actors, purposes, categories)| {
            Provision::deny(period, actors, purposes, categories)
        })
}

fn permit_provision() -> impl Strategy<Value = Provision> {
    (
        period(),
        subsequence(recipients(), 1..=3),
        subsequence(purposes(), 1..=3),
        subsequence(DataCategory::ALL.to_vec(), 1..=9),
        proptest::collection::vec(deny_provision(), 0..=2),
    )
        .prop_map(|(period, actors, purposes, categories, nested)| Provision {
            nested,
            ..Provision::permit(period, actors, purposes, categories)
        })
}

fn status() -> impl Strategy<Value = ConsentStatus> {
    prop_oneof![
        4 => Just(ConsentStatus::Active),
        1 => Just(ConsentStatus::Proposed),
        1 => Just(ConsentStatus::Rejected),
        1 => Just(ConsentStatus::Inactive),
    ]
}

fn consent() -> impl Strategy<Value = Consent> {
    (
        prop::sample::select(vec!["c1", "c2", "c3"]),
        1u32..=3,
        prop::sample::select(PATIENTS.to_vec()),
        status(),
        permit_provision(),
    )
        .prop_map(|(id, version, patient, status, provision)| {
            let patient = PersonRef::new(patient);
            Consent {
                id: id.into(),
                version,
                status,
                category: phr_consent::Coding::patient_consent(),
                performer: Performer::patient(&patient),
                patient,
                policy_uri: "https://gw.example/policies/disclosure/v1".into(),
                recorded_at: BASE,
                provision,
            }
        })
}

/// A request with owned parts, borrowed as an `AccessRequest` to decide.
#[derive(Debug, Clone)]
struct Request {
    patient: &'static str,
    recipient: Recipient,
    purpose: Purpose,
    category: DataCategory,
    now: OffsetDateTime,
}

impl Request {
    fn decide<'a>(&self, consents: &'a [Consent]) -> Decision<'a> {
        let request = AccessRequest {
            patient: self.patient,
            recipient: &self.recipient,
            purpose: &self.purpose,
            requested: Requested::Category(self.category),
        };
        decide(&request, consents, self.now)
    }
}

fn request() -> impl Strategy<Value = Request> {
    (
        prop::sample::select(PATIENTS.to_vec()),
        prop::sample::select(recipients()),
        prop::sample::select(purposes()),
        prop::sample::select(DataCategory::ALL.to_vec()),
        -2..HOURS + 2,
    )
        .prop_map(|(patient, recipient, purpose, category, hour)| Request {
            patient,
            recipient,
            purpose,
            category,
            now: at(hour),
        })
}

/// A request aimed at what `consent` names, so that permits and near misses are common.
fn request_for(consent: &Consent) -> BoxedStrategy<Request> {
    let p = &consent.provision;
    let aimed = (
        Just(if consent.patient.id == PATIENTS[0] {
            PATIENTS[0]
        } else {
            PATIENTS[1]
        }),
        prop::sample::select(p.actors.clone()),
        prop::sample::select(p.purposes.clone()),
        prop::sample::select(p.categories.clone()),
        -2..HOURS + 2,
    )
        .prop_map(|(patient, recipient, purpose, category, hour)| Request {
            patient,
            recipient,
            purpose,
            category,
            now: at(hour),
        });
    prop_oneof![1 => request(), 3 => aimed].boxed()
}

/// One way to narrow a permit.
#[derive(Debug, Clone)]
enum Narrowing {
    RemoveActor(usize),
    RemovePurpose(usize),
    RemoveCategory(usize),
    /// Move the start later and the end earlier by these many hours (an open side is
    /// closed at the given hour).
    ShortenPeriod(i64, i64),
    AddDeny(Provision),
}

fn narrowing() -> impl Strategy<Value = Narrowing> {
    prop_oneof![
        any::<usize>().prop_map(Narrowing::RemoveActor),
        any::<usize>().prop_map(Narrowing::RemovePurpose),
        any::<usize>().prop_map(Narrowing::RemoveCategory),
        (0..HOURS, 0..HOURS).prop_map(|(s, e)| Narrowing::ShortenPeriod(s, e)),
        deny_provision().prop_map(Narrowing::AddDeny),
    ]
}

fn remove<T>(items: &mut Vec<T>, index: usize) {
    if !items.is_empty() {
        let len = items.len();
        items.remove(index % len);
    }
}

fn narrow(provision: &Provision, narrowing: &Narrowing) -> Provision {
    let mut p = provision.clone();
    match narrowing {
        Narrowing::RemoveActor(i) => remove(&mut p.actors, *i),
        Narrowing::RemovePurpose(i) => remove(&mut p.purposes, *i),
        Narrowing::RemoveCategory(i) => remove(&mut p.categories, *i),
        Narrowing::ShortenPeriod(later, earlier) => {
            let old = p.period.unwrap_or(Period {
                start: None,
                end: None,
            });
            p.period = Some(Period {
                start: Some(
                    old.start
                        .map_or(at(*later), |s| s + Duration::hours(*later)),
                ),
                end: Some(
                    old.end
                        .map_or(at(HOURS - earlier), |e| e - Duration::hours(*earlier)),
                ),
            });
        }
        Narrowing::AddDeny(deny) => p.nested.push(deny.clone()),
    }
    p
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// (a) Nothing withdrawn or expired permits, whatever else it says.
    #[test]
    fn withdrawn_or_expired_never_permits(
        (consents, request) in proptest::collection::vec((consent(), any::<bool>(), 0..HOURS), 1..=5)
            .prop_flat_map(|c| {
                let aimed = request_for(&c[0].0);
                (Just(c), aimed)
            }),
    ) {
        let consents: Vec<Consent> = consents
            .into_iter()
            .map(|(mut consent, withdraw, ended_hours_ago)| {
                if withdraw {
                    consent.status = ConsentStatus::Inactive;
                } else {
                    let end = request.now - Duration::hours(ended_hours_ago);
                    let start = consent.provision.period.and_then(|p| p.start).filter(|s| *s < end);
                    consent.provision.period = Some(Period { start, end: Some(end) });
                }
                consent
            })
            .collect();
        prop_assert!(!request.decide(&consents).is_permit());
    }

    /// (b) Narrowing a consent never widens what it permits, alone or among others, and
    /// whether the narrowed version replaces the old one or is added as the next version.
    #[test]
    fn narrowing_never_widens(
        (original, request) in consent().prop_flat_map(|c| (Just(c.clone()), request_for(&c))),
        narrowings in proptest::collection::vec(narrowing(), 1..=4),
        others in proptest::collection::vec(consent(), 0..=3),
    ) {
        let mut narrowed = original.clone();
        for n in &narrowings {
            narrowed.provision = narrow(&narrowed.provision, n);
        }
        if request.decide(std::slice::from_ref(&narrowed)).is_permit() {
            prop_assert!(request.decide(std::slice::from_ref(&original)).is_permit());
        }

        let mut before = others.clone();
        before.push(original.clone());
        let mut after = others;
        after.push(narrowed.clone());
        if request.decide(&after).is_permit() {
            prop_assert!(request.decide(&before).is_permit());
        }

        // As a history: the amended version is the latest, the original stays in the list.
        if let Ok(next) = original.apply(
            Change::Amend(narrowed.provision.clone()),
            original.performer.clone(),
            BASE,
        ) {
            let history = [original.clone(), next];
            if request.decide(&history).is_permit() {
                prop_assert!(request.decide(std::slice::from_ref(&original)).is_permit());
            }
        }
    }

    /// (c) Same inputs, same decision; and the order of the consents changes nothing.
    #[test]
    fn deterministic_and_order_independent(
        (consents, shuffled) in proptest::collection::vec(consent(), 0..=6)
            .prop_flat_map(|c| (Just(c.clone()), Just(c).prop_shuffle())),
        request in request(),
    ) {
        let first = request.decide(&consents);
        prop_assert_eq!(first, request.decide(&consents));
        prop_assert_eq!(first, request.decide(&shuffled));
        let mut reversed = consents.clone();
        reversed.reverse();
        prop_assert_eq!(first, request.decide(&reversed));
    }

    /// Every permit names a consent that is active, this patient's, the latest of its id,
    /// well-formed, current, and covering the request.
    #[test]
    fn every_permit_is_justified(
        consents in proptest::collection::vec(consent(), 0..=6),
        request in request(),
    ) {
        if let Decision::Permit { consent } = request.decide(&consents) {
            let named = consents
                .iter()
                .find(|c| c.id == consent.id && c.version == consent.version)
                .expect("the named consent is in the list");
            prop_assert!(consents
                .iter()
                .all(|c| c.id != named.id || c.version <= named.version));
            prop_assert!(named.validate().is_ok());
            prop_assert_eq!(named.status, ConsentStatus::Active);
            prop_assert_eq!(named.patient.id.as_str(), request.patient);
            let p = &named.provision;
            prop_assert_eq!(p.kind, ProvisionKind::Permit);
            prop_assert!(p.period.is_none_or(|period| period.contains(request.now)));
            prop_assert!(p.actors.contains(&request.recipient));
            prop_assert!(p.purposes.contains(&request.purpose));
            prop_assert!(p.categories.contains(&request.category));
        }
    }
}
