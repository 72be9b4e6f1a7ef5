use super::*;
use crate::category::DataCategory;
use crate::model::{Change, NewConsent, Performer, PersonRef, Representation};
use serde_json::Value;
use time::macros::datetime;

fn input(receipt_id: &str) -> ReceiptInput {
    ReceiptInput {
        receipt_id: receipt_id.into(),
        issued_at: datetime!(2026-05-01 10:00:01 +09:00),
        language: "ja".into(),
        collection_method: "web-form".into(),
        controllers: vec![PiiController {
            name: "PHR Gateway Operator K.K.".into(),
            on_behalf: false,
            contact: "Privacy Office".into(),
            address: "Tokyo, Japan".into(),
            email: "privacy@gw.example".into(),
            phone: "+81-3-0000-0000".into(),
            url: Some("https://gw.example".into()),
        }],
        policy_url: "https://gw.example/privacy".into(),
        notice: Notice {
            url: "https://gw.example/notices/disclosure".into(),
            version: "2026-04".into(),
        },
        recipient_names: vec![(Recipient::client("app-1"), "Health Diary".into())],
    }
}

fn granted() -> Consent {
    let patient = PersonRef::new("patient-1");
    Consent::create(NewConsent {
        id: "consent-1".into(),
        status: ConsentStatus::Active,
        performer: Performer::patient(&patient),
        patient,
        policy_uri: "https://gw.example/policies/disclosure/v1".into(),
        recorded_at: datetime!(2026-05-01 10:00 +09:00),
        provision: Provision::permit(
            Some(Period::between(
                datetime!(2026-05-01 00:00 +09:00),
                datetime!(2027-05-01 00:00 +09:00),
            )),
            vec![
                Recipient::client("app-1"),
                Recipient::organization("hospital-9"),
            ],
            vec![Purpose::patient_requested(), Purpose::treatment()],
            vec![DataCategory::Observations, DataCategory::Medications],
        ),
    })
    .expect("valid consent")
}

fn json(event: ReceiptEvent, consent: &Consent, receipt_id: &str) -> Value {
    let receipt = build_receipt(event, consent, &input(receipt_id)).expect("receipt");
    serde_json::to_value(&receipt).expect("json")
}

const KANTARA_REQUIRED: [&str; 12] = [
    "version",
    "jurisdiction",
    "consentTimestamp",
    "collectionMethod",
    "consentReceiptID",
    "language",
    "piiPrincipalId",
    "piiControllers",
    "policyUrl",
    "services",
    "sensitive",
    "spiCat",
];

fn assert_complete(receipt: &Value, event: &str, id: &str, version: u32) {
    for field in KANTARA_REQUIRED {
        assert!(receipt.get(field).is_some(), "{event}: {field} missing");
    }
    assert_eq!(receipt["version"], KANTARA_VERSION);
    assert_eq!(receipt["jurisdiction"], "JP");
    assert_eq!(receipt["event"], event);
    assert_eq!(receipt["consent"]["id"], id);
    assert_eq!(receipt["consent"]["version"], version);
    assert_eq!(receipt["piiPrincipalId"], "patient-1");
    assert_eq!(receipt["subject"]["id"], "patient-1");
    assert!(receipt["performer"]["id"].is_string());
    assert!(receipt["performer"]["representation"].is_string());
    assert_eq!(
        receipt["notice"]["url"],
        "https://gw.example/notices/disclosure"
    );
    assert_eq!(receipt["notice"]["version"], "2026-04");
    let controller = &receipt["piiControllers"][0];
    for field in [
        "piiController",
        "onBehalf",
        "contact",
        "address",
        "email",
        "phone",
    ] {
        assert!(
            controller.get(field).is_some(),
            "{event}: controller {field}"
        );
    }
    let services = receipt["services"].as_array().expect("services");
    assert!(!services.is_empty());
    for service in services {
        assert!(service["service"].is_string());
        for purpose in service["purposes"].as_array().expect("purposes") {
            for field in [
                "purpose",
                "purposeCategory",
                "consentType",
                "piiCategory",
                "primaryPurpose",
                "termination",
                "thirdPartyDisclosure",
                "thirdPartyName",
            ] {
                assert!(purpose.get(field).is_some(), "{event}: purpose {field}");
            }
        }
    }
}

#[test]
fn a_grant_receipt_has_every_field() {
    let receipt = json(ReceiptEvent::Granted, &granted(), "receipt-1");
    assert_complete(&receipt, "granted", "consent-1", 1);
    assert_eq!(receipt["consentReceiptID"], "receipt-1");
    assert_eq!(receipt["consentTimestamp"], 1_777_597_200);
    assert_eq!(receipt["issuedAt"], "2026-05-01T10:00:01+09:00");
    assert_eq!(receipt["sensitive"], true);
    assert_eq!(receipt["performer"]["representation"], "self");
    assert_eq!(receipt["consent"]["status"], "active");

    let services = receipt["services"].as_array().expect("services");
    assert_eq!(services.len(), 2);
    assert_eq!(services[0]["service"], "Health Diary");
    assert_eq!(services[1]["service"], "hospital-9", "unnamed: shown by id");
    let purpose = &services[0]["purposes"][0];
    assert_eq!(purpose["purpose"], "at the patient's request");
    assert_eq!(purpose["purposeCategory"][0], "PATRQT");
    assert_eq!(purpose["consentType"], "EXPLICIT");
    assert_eq!(
        purpose["piiCategory"],
        serde_json::json!(["observations", "medications"])
    );
    assert_eq!(purpose["thirdPartyDisclosure"], true);
    assert_eq!(purpose["thirdPartyName"], "Health Diary");
    assert_eq!(
        purpose["termination"],
        "ends at 2027-05-01T00:00:00+09:00 or on withdrawal"
    );
    assert_eq!(
        receipt["consent"]["period"]["end"],
        "2027-05-01T00:00:00+09:00"
    );
}

#[test]
fn a_change_receipt_names_the_new_version_and_its_exclusions() {
    let mut narrower = granted().provision;
    narrower.nested.push(Provision::deny(
        None,
        vec![Recipient::organization("hospital-9")],
        vec![],
        vec![DataCategory::Medications],
    ));
    let proxy = Performer {
        person: PersonRef::new("proxy-7"),
        representation: Representation::RegisteredProxy,
    };
    let changed = granted()
        .apply(
            Change::Amend(narrower),
            proxy,
            datetime!(2026-06-01 00:00 UTC),
        )
        .expect("amend");
    let receipt = json(ReceiptEvent::Changed, &changed, "receipt-2");
    assert_complete(&receipt, "changed", "consent-1", 2);
    assert_eq!(receipt["performer"]["id"], "proxy-7");
    assert_eq!(receipt["performer"]["representation"], "registered-proxy");
    let exclusion = &receipt["consent"]["exclusions"][0];
    assert_eq!(exclusion["recipients"][0], "hospital-9");
    assert_eq!(exclusion["categories"][0], "medications");
    assert_eq!(exclusion["purposes"], serde_json::json!([]));
}

#[test]
fn a_withdrawal_receipt_names_the_consent_and_version() {
    let withdrawn = granted()
        .apply(
            Change::Withdraw,
            Performer::patient(&PersonRef::new("patient-1")),
            datetime!(2026-07-01 09:30 +09:00),
        )
        .expect("withdraw");
    let receipt = json(ReceiptEvent::Withdrawn, &withdrawn, "receipt-3");
    assert_complete(&receipt, "withdrawn", "consent-1", 2);
    assert_eq!(receipt["consent"]["status"], "inactive");
    assert_eq!(
        receipt["services"][0]["purposes"][0]["termination"],
        "withdrawn at 2026-07-01T09:30:00+09:00"
    );
    assert_eq!(
        receipt["consentTimestamp"],
        datetime!(2026-07-01 09:30 +09:00).unix_timestamp()
    );
}

#[test]
fn a_receipt_must_match_the_versions_status() {
    let active = granted();
    assert_eq!(
        build_receipt(ReceiptEvent::Withdrawn, &active, &input("r")).err(),
        Some(ConsentError::ReceiptEventMismatch {
            event: "withdrawn",
            expected: ConsentStatus::Inactive,
            actual: ConsentStatus::Active,
        })
    );
    let mut proposed = granted();
    proposed.status = ConsentStatus::Proposed;
    assert!(build_receipt(ReceiptEvent::Granted, &proposed, &input("r")).is_err());
    let mut malformed = granted();
    malformed.provision.actors.clear();
    assert_eq!(
        build_receipt(ReceiptEvent::Granted, &malformed, &input("r")).err(),
        Some(ConsentError::NoRecipients)
    );
}

#[test]
fn the_same_inputs_give_the_same_receipt() {
    let consent = granted();
    assert_eq!(
        build_receipt(ReceiptEvent::Granted, &consent, &input("r")),
        build_receipt(ReceiptEvent::Granted, &consent, &input("r"))
    );
}
