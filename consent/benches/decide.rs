//! `decide` throughput on one core: a patient with five consents (active ones with nested
//! denies, a withdrawn one, an expired one) and a mix of permitted and denied requests.
//! Prints figures; asserts only that the timed loop allocated nothing.
//!
//! `cargo bench -p phr-consent --bench decide` (PHR_BENCH_SECONDS to change the ~2 s).

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use phr_consent::{
    decide, AccessRequest, Change, Consent, ConsentStatus, DataCategory, NewConsent, Performer,
    Period, PersonRef, Provision, Purpose, Recipient, Requested,
};
use time::macros::datetime;
use time::OffsetDateTime;

/// Counts allocations, to show the decision path makes none.
struct CountingAllocator;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwards the caller's layout unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

const NOW: OffsetDateTime = datetime!(2026-06-15 12:00 +09:00);
const PATIENT: &str = "patient-00042";

fn consent(
    id: &str,
    recipients: Vec<Recipient>,
    purposes: Vec<Purpose>,
    categories: Vec<DataCategory>,
    period: Period,
) -> Consent {
    let patient = PersonRef::new(PATIENT);
    Consent::create(NewConsent {
        id: id.into(),
        status: ConsentStatus::Active,
        performer: Performer::patient(&patient),
        patient,
        policy_uri: "https://gw.example/policies/disclosure/v1".into(),
        recorded_at: datetime!(2026-01-01 00:00 +09:00),
        provision: Provision::permit(Some(period), recipients, purposes, categories),
    })
    .expect("valid consent")
}

fn consents() -> Vec<Consent> {
    let year = Period::between(
        datetime!(2026-01-01 00:00 +09:00),
        datetime!(2027-01-01 00:00 +09:00),
    );
    let me = Performer::patient(&PersonRef::new(PATIENT));
    let mut diary = consent(
        "consent-0001-health-diary",
        vec![Recipient::client("client-health-diary")],
        vec![Purpose::patient_requested()],
        DataCategory::ALL.to_vec(),
        year,
    );
    diary.provision.nested.push(Provision::deny(
        None,
        vec![],
        vec![],
        vec![DataCategory::MedicalCosts],
    ));
    let mut hospital = consent(
        "consent-0002-city-hospital",
        vec![
            Recipient::organization("org-city-hospital"),
            Recipient::client("client-city-hospital-emr"),
        ],
        vec![Purpose::treatment()],
        vec![
            DataCategory::Observations,
            DataCategory::Conditions,
            DataCategory::Allergies,
            DataCategory::Medications,
            DataCategory::Immunizations,
        ],
        year,
    );
    hospital.provision.nested.push(Provision::deny(
        Some(Period::between(
            datetime!(2026-06-01 00:00 +09:00),
            datetime!(2026-07-01 00:00 +09:00),
        )),
        vec![Recipient::client("client-city-hospital-emr")],
        vec![],
        vec![DataCategory::Conditions],
    ));
    let pharmacy = consent(
        "consent-0003-pharmacy",
        vec![Recipient::organization("org-pharmacy")],
        vec![Purpose::treatment(), Purpose::patient_requested()],
        vec![DataCategory::Medications, DataCategory::Allergies],
        year,
    );
    let research = consent(
        "consent-0004-research",
        vec![Recipient::organization("org-university")],
        vec![Purpose::research()],
        vec![DataCategory::Observations],
        year,
    )
    .apply(Change::Withdraw, me, datetime!(2026-03-01 00:00 +09:00))
    .expect("withdraw");
    let old_app = consent(
        "consent-0005-old-app",
        vec![Recipient::client("client-old-app")],
        vec![Purpose::patient_requested()],
        vec![DataCategory::Observations, DataCategory::Medications],
        Period::between(
            datetime!(2025-01-01 00:00 +09:00),
            datetime!(2026-01-01 00:00 +09:00),
        ),
    );
    vec![diary, hospital, pharmacy, research, old_app]
}

struct Ask {
    recipient: Recipient,
    purpose: Purpose,
    requested: Requested<'static>,
}

fn asks() -> Vec<Ask> {
    let ask = |recipient: Recipient, purpose: Purpose, requested| Ask {
        recipient,
        purpose,
        requested,
    };
    let diary = || Recipient::client("client-health-diary");
    let emr = || Recipient::client("client-city-hospital-emr");
    vec![
        // Permitted.
        ask(
            diary(),
            Purpose::patient_requested(),
            Requested::ResourceType("Observation"),
        ),
        ask(
            emr(),
            Purpose::treatment(),
            Requested::Category(DataCategory::Medications),
        ),
        ask(
            Recipient::organization("org-pharmacy"),
            Purpose::treatment(),
            Requested::ResourceType("AllergyIntolerance"),
        ),
        ask(
            diary(),
            Purpose::patient_requested(),
            Requested::Category(DataCategory::Documents),
        ),
        // Denied: excluded by a nested deny, purpose, category, withdrawn, expired,
        // unknown recipient, unknown type.
        ask(
            diary(),
            Purpose::patient_requested(),
            Requested::ResourceType("ExplanationOfBenefit"),
        ),
        ask(
            emr(),
            Purpose::treatment(),
            Requested::Category(DataCategory::Conditions),
        ),
        ask(
            diary(),
            Purpose::research(),
            Requested::Category(DataCategory::Observations),
        ),
        ask(
            Recipient::organization("org-pharmacy"),
            Purpose::treatment(),
            Requested::Category(DataCategory::Encounters),
        ),
        ask(
            Recipient::organization("org-university"),
            Purpose::research(),
            Requested::Category(DataCategory::Observations),
        ),
        ask(
            Recipient::client("client-old-app"),
            Purpose::patient_requested(),
            Requested::Category(DataCategory::Observations),
        ),
        ask(
            Recipient::client("client-unknown"),
            Purpose::patient_requested(),
            Requested::Category(DataCategory::Observations),
        ),
        ask(
            diary(),
            Purpose::patient_requested(),
            Requested::ResourceType("AuditEvent"),
        ),
    ]
}

/// Decides every ask in turn for about `budget`; returns (decisions, permits, elapsed,
/// allocations during the loop).
fn run(consents: &[Consent], asks: &[Ask], budget: Duration) -> (u64, u64, Duration, u64) {
    let requests: Vec<AccessRequest<'_>> = asks
        .iter()
        .map(|a| AccessRequest {
            patient: PATIENT,
            recipient: &a.recipient,
            purpose: &a.purpose,
            requested: a.requested,
        })
        .collect();
    let (mut decisions, mut permits) = (0u64, 0u64);
    let allocations_before = ALLOCATIONS.load(Ordering::Relaxed);
    let start = Instant::now();
    // Check the clock once per batch so timing costs little next to deciding.
    while start.elapsed() < budget {
        for _ in 0..1_000 {
            for request in &requests {
                let decision = decide(black_box(request), black_box(consents), black_box(NOW));
                permits += u64::from(black_box(decision).is_permit());
            }
            decisions += requests.len() as u64;
        }
    }
    let elapsed = start.elapsed();
    let allocations = ALLOCATIONS.load(Ordering::Relaxed) - allocations_before;
    (decisions, permits, elapsed, allocations)
}

fn report(name: &str, consents: &[Consent], asks: &[Ask], budget: Duration) {
    let (decisions, permits, elapsed, allocations) = run(consents, asks, budget);
    let per_second = decisions as f64 / elapsed.as_secs_f64();
    println!(
        "{name}: {decisions} decisions in {:.2} s = {:.0} decisions/s ({:.0} ns each), \
         {:.0} % permitted, {allocations} allocations in the loop",
        elapsed.as_secs_f64(),
        per_second,
        1e9 / per_second,
        100.0 * permits as f64 / decisions as f64,
    );
    assert_eq!(allocations, 0, "decide must not allocate");
}

fn main() {
    let seconds: f64 = std::env::var("PHR_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0);
    let budget = Duration::from_secs_f64(seconds);
    let consents = consents();
    let asks = asks();
    println!(
        "decide: {} consents for one patient, {} kinds of request, one thread",
        consents.len(),
        asks.len()
    );
    report("5 consents", &consents, &asks, budget);

    // The caller may pass every version it keeps; older ones are skipped but still scanned.
    let mut history = Vec::new();
    for consent in &consents {
        let mut older = consent.clone();
        older.version = 1;
        let mut latest = consent.clone();
        latest.version = 3;
        let mut middle = consent.clone();
        middle.version = 2;
        history.extend([older, middle, latest]);
    }
    report("5 consents x 3 versions", &history, &asks, budget);
}
