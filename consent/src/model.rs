//! The consent model, shaped like FHIR R4 `Consent` with scope `patient-privacy`: who the
//! consent is for, who gave it, and one permit provision naming recipients, purposes, data
//! categories and a period, with deny provisions nested inside it as exceptions.
//!
//! A consent is never changed in place: [`Consent::apply`] returns the next version and the
//! caller keeps the list of versions. Expiry is not a status; it is `provision.period.end`
//! passing, so it needs no job that rewrites records.

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::category::DataCategory;
use crate::error::ConsentError;

/// FHIR `Consent.scope` system; the scope is always `patient-privacy`.
pub const CONSENT_SCOPE_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/consentscope";
pub const LOINC_SYSTEM: &str = "http://loinc.org";
/// LOINC 59284-0 "Patient Consent": the default `Consent.category`.
pub const LOINC_PATIENT_CONSENT: &str = "59284-0";
/// HL7 v3 PurposeOfUse codes (`TREAT`, `PATRQT`, `HRESCH`, …) live in v3-ActReason.
pub const PURPOSE_OF_USE_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/v3-ActReason";
/// `provision.actor.role` system; recipients are always `IRCP` (information recipient).
pub const PARTICIPATION_TYPE_SYSTEM: &str =
    "http://terminology.hl7.org/CodeSystem/v3-ParticipationType";
pub const RECIPIENT_ROLE: &str = "IRCP";

/// R4 `Consent.status` codes this gateway uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConsentStatus {
    /// Asked for (e.g. by an app) but not yet agreed: discloses nothing.
    Proposed,
    /// Agreed and in force while the provision period contains the time of access.
    Active,
    /// The patient declined the proposal.
    Rejected,
    /// Withdrawn by the patient or their representative.
    Inactive,
}

impl ConsentStatus {
    pub fn code(self) -> &'static str {
        match self {
            ConsentStatus::Proposed => "proposed",
            ConsentStatus::Active => "active",
            ConsentStatus::Rejected => "rejected",
            ConsentStatus::Inactive => "inactive",
        }
    }
}

/// A code with its system, e.g. the consent category LOINC 59284-0.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Coding {
    pub system: String,
    pub code: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display: Option<String>,
}

impl Coding {
    /// LOINC 59284-0 "Patient Consent".
    pub fn patient_consent() -> Coding {
        Coding {
            system: LOINC_SYSTEM.into(),
            code: LOINC_PATIENT_CONSENT.into(),
            display: Some("Patient Consent".into()),
        }
    }
}

/// A person by the gateway's id for them (a patient or an account acting for one).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PersonRef {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display: Option<String>,
}

impl PersonRef {
    pub fn new(id: impl Into<String>) -> PersonRef {
        PersonRef {
            id: id.into(),
            display: None,
        }
    }
}

/// On what standing the performer acted for the patient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Representation {
    /// The patient themself.
    #[serde(rename = "self")]
    OneSelf,
    /// A parent (親権者) acting for a dependent child.
    ParentOfDependent,
    /// A registered proxy (代理人).
    RegisteredProxy,
}

impl Representation {
    pub fn code(self) -> &'static str {
        match self {
            Representation::OneSelf => "self",
            Representation::ParentOfDependent => "parent-of-dependent",
            Representation::RegisteredProxy => "registered-proxy",
        }
    }
}

/// Who gave, changed or withdrew the consent.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Performer {
    pub person: PersonRef,
    pub representation: Representation,
}

impl Performer {
    /// The patient acting for themself.
    pub fn patient(patient: &PersonRef) -> Performer {
        Performer {
            person: patient.clone(),
            representation: Representation::OneSelf,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RecipientKind {
    /// A registered client application (FHIR `Device`).
    Client,
    /// An organisation, e.g. a hospital (FHIR `Organization`).
    Organization,
}

/// Who data may be disclosed to: `provision.actor` with role `IRCP`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Recipient {
    pub kind: RecipientKind,
    pub id: String,
}

impl Recipient {
    pub fn client(id: impl Into<String>) -> Recipient {
        Recipient {
            kind: RecipientKind::Client,
            id: id.into(),
        }
    }

    pub fn organization(id: impl Into<String>) -> Recipient {
        Recipient {
            kind: RecipientKind::Organization,
            id: id.into(),
        }
    }

    /// The FHIR reference, e.g. `Device/app-1`.
    pub fn fhir_reference(&self) -> String {
        let resource_type = match self.kind {
            RecipientKind::Client => "Device",
            RecipientKind::Organization => "Organization",
        };
        format!("{resource_type}/{}", self.id)
    }
}

/// A purpose of use: a code and its system (HL7 v3 PurposeOfUse or the gateway's own).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Purpose {
    pub system: String,
    pub code: String,
}

impl Purpose {
    pub fn new(system: impl Into<String>, code: impl Into<String>) -> Purpose {
        Purpose {
            system: system.into(),
            code: code.into(),
        }
    }

    /// An HL7 v3 PurposeOfUse code.
    pub fn v3(code: impl Into<String>) -> Purpose {
        Purpose::new(PURPOSE_OF_USE_SYSTEM, code)
    }

    /// `TREAT`: treatment.
    pub fn treatment() -> Purpose {
        Purpose::v3("TREAT")
    }

    /// `PATRQT`: at the patient's request (e.g. the patient's own app).
    pub fn patient_requested() -> Purpose {
        Purpose::v3("PATRQT")
    }

    /// `HRESCH`: healthcare research.
    pub fn research() -> Purpose {
        Purpose::v3("HRESCH")
    }
}

/// A time range: start inclusive, end exclusive; either side may be open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Period {
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub start: Option<OffsetDateTime>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub end: Option<OffsetDateTime>,
}

/// Where `now` falls relative to a period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeriodPosition {
    Before,
    Within,
    After,
}

impl Period {
    pub fn between(start: OffsetDateTime, end: OffsetDateTime) -> Period {
        Period {
            start: Some(start),
            end: Some(end),
        }
    }

    pub fn position(&self, now: OffsetDateTime) -> PeriodPosition {
        if self.start.is_some_and(|start| now < start) {
            PeriodPosition::Before
        } else if self.end.is_some_and(|end| now >= end) {
            PeriodPosition::After
        } else {
            PeriodPosition::Within
        }
    }

    pub fn contains(&self, now: OffsetDateTime) -> bool {
        self.position(now) == PeriodPosition::Within
    }

    /// A period that can contain no instant is a mistake, not a way to say "never".
    fn check(&self) -> Result<(), ConsentError> {
        match (self.start, self.end) {
            (Some(start), Some(end)) if start >= end => Err(ConsentError::EmptyPeriod),
            _ => Ok(()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProvisionKind {
    Permit,
    Deny,
}

impl ProvisionKind {
    pub fn code(self) -> &'static str {
        match self {
            ProvisionKind::Permit => "permit",
            ProvisionKind::Deny => "deny",
        }
    }
}

/// `Consent.provision`. The root is a permit that must name its recipients, purposes and
/// categories; nested provisions are denies (exceptions), where an empty list means "any".
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Provision {
    pub kind: ProvisionKind,
    #[serde(default)]
    pub period: Option<Period>,
    #[serde(default)]
    pub actors: Vec<Recipient>,
    #[serde(default)]
    pub purposes: Vec<Purpose>,
    #[serde(default)]
    pub categories: Vec<DataCategory>,
    #[serde(default)]
    pub nested: Vec<Provision>,
}

impl Provision {
    /// A permit with no exceptions.
    pub fn permit(
        period: Option<Period>,
        actors: Vec<Recipient>,
        purposes: Vec<Purpose>,
        categories: Vec<DataCategory>,
    ) -> Provision {
        Provision {
            kind: ProvisionKind::Permit,
            period,
            actors,
            purposes,
            categories,
            nested: Vec::new(),
        }
    }

    /// An exception to nest in a permit; an empty list matches anything.
    pub fn deny(
        period: Option<Period>,
        actors: Vec<Recipient>,
        purposes: Vec<Purpose>,
        categories: Vec<DataCategory>,
    ) -> Provision {
        Provision {
            kind: ProvisionKind::Deny,
            ..Provision::permit(period, actors, purposes, categories)
        }
    }

    fn check_root(&self) -> Result<(), ConsentError> {
        if self.kind != ProvisionKind::Permit {
            return Err(ConsentError::RootNotPermit);
        }
        // Fail closed: a permit that names no recipient, purpose or category is never read
        // as "all of them".
        if self.actors.is_empty() {
            return Err(ConsentError::NoRecipients);
        }
        if self.purposes.is_empty() {
            return Err(ConsentError::NoPurposes);
        }
        if self.categories.is_empty() {
            return Err(ConsentError::NoCategories);
        }
        self.check_terms()?;
        for nested in &self.nested {
            if nested.kind != ProvisionKind::Deny {
                return Err(ConsentError::NestedNotDeny);
            }
            if !nested.nested.is_empty() {
                return Err(ConsentError::NestedTooDeep);
            }
            nested.check_terms()?;
        }
        Ok(())
    }

    fn check_terms(&self) -> Result<(), ConsentError> {
        if let Some(period) = &self.period {
            period.check()?;
        }
        if self.actors.iter().any(|a| a.id.is_empty()) {
            return Err(ConsentError::EmptyRecipientId);
        }
        if self
            .purposes
            .iter()
            .any(|p| p.system.is_empty() || p.code.is_empty())
        {
            return Err(ConsentError::EmptyPurpose);
        }
        Ok(())
    }
}

/// One version of a disclosure consent (FHIR R4 `Consent`, scope `patient-privacy`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Consent {
    pub id: String,
    /// 1 for a new consent; each change adds one.
    pub version: u32,
    pub status: ConsentStatus,
    pub category: Coding,
    /// For whom: the patient whose data is disclosed.
    pub patient: PersonRef,
    /// Who gave (or last changed) it: the patient or their representative.
    pub performer: Performer,
    /// The policy the consent is given under (R4 `policy.uri`; R4's `policyRule` is a
    /// CodeableConcept, so a URI belongs in `policy`). ppc-1 requires one.
    pub policy_uri: String,
    /// When this version was recorded (`Consent.dateTime`).
    #[serde(with = "time::serde::rfc3339")]
    pub recorded_at: OffsetDateTime,
    pub provision: Provision,
}

/// What a new consent starts from; [`Consent::create`] checks it.
#[derive(Debug, Clone)]
pub struct NewConsent {
    pub id: String,
    /// `Proposed` when an app asks, `Active` when the patient gives it directly.
    pub status: ConsentStatus,
    pub patient: PersonRef,
    pub performer: Performer,
    pub policy_uri: String,
    pub recorded_at: OffsetDateTime,
    pub provision: Provision,
}

/// A change to a consent, giving its next version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Agree to a proposal: `proposed` → `active`.
    Grant,
    /// Replace the provision (narrow, widen or otherwise change it); status unchanged.
    Amend(Provision),
    /// `active` → `inactive`.
    Withdraw,
    /// Decline a proposal: `proposed` → `rejected`.
    Reject,
}

impl Change {
    pub fn code(&self) -> &'static str {
        match self {
            Change::Grant => "grant",
            Change::Amend(_) => "amend",
            Change::Withdraw => "withdraw",
            Change::Reject => "reject",
        }
    }
}

impl Consent {
    /// Version 1 of a new consent, checked.
    pub fn create(new: NewConsent) -> Result<Consent, ConsentError> {
        if !matches!(new.status, ConsentStatus::Proposed | ConsentStatus::Active) {
            return Err(ConsentError::BadInitialStatus(new.status));
        }
        let consent = Consent {
            id: new.id,
            version: 1,
            status: new.status,
            category: Coding::patient_consent(),
            patient: new.patient,
            performer: new.performer,
            policy_uri: new.policy_uri,
            recorded_at: new.recorded_at,
            provision: new.provision,
        };
        consent.validate()?;
        Ok(consent)
    }

    /// The next version after `change`, made by `performer` at `at`. `self` is left as it
    /// was: earlier versions stay true records of what was agreed then.
    pub fn apply(
        &self,
        change: Change,
        performer: Performer,
        at: OffsetDateTime,
    ) -> Result<Consent, ConsentError> {
        self.validate()?;
        if at < self.recorded_at {
            return Err(ConsentError::ChangeBeforeRecorded);
        }
        let version = self
            .version
            .checked_add(1)
            .ok_or(ConsentError::VersionOverflow)?;
        let (status, provision) = match (self.status, change) {
            (ConsentStatus::Proposed, Change::Grant) => {
                (ConsentStatus::Active, self.provision.clone())
            }
            (ConsentStatus::Proposed, Change::Reject) => {
                (ConsentStatus::Rejected, self.provision.clone())
            }
            (status @ (ConsentStatus::Proposed | ConsentStatus::Active), Change::Amend(p)) => {
                (status, p)
            }
            // The withdrawn version keeps the provision, so records show what ended.
            (ConsentStatus::Active, Change::Withdraw) => {
                (ConsentStatus::Inactive, self.provision.clone())
            }
            (from, change) => {
                return Err(ConsentError::BadTransition {
                    from,
                    change: change.code(),
                })
            }
        };
        let next = Consent {
            id: self.id.clone(),
            version,
            status,
            category: self.category.clone(),
            patient: self.patient.clone(),
            performer,
            policy_uri: self.policy_uri.clone(),
            recorded_at: at,
            provision,
        };
        next.validate()?;
        Ok(next)
    }

    /// Every rule a stored consent must meet; allocation-free, so `decide` can run it on
    /// each access and treat a consent that fails as permitting nothing.
    pub fn validate(&self) -> Result<(), ConsentError> {
        if self.id.is_empty() {
            return Err(ConsentError::NoId);
        }
        if self.version == 0 {
            return Err(ConsentError::NoVersion);
        }
        if self.patient.id.is_empty() {
            return Err(ConsentError::NoPatient);
        }
        if self.performer.person.id.is_empty() {
            return Err(ConsentError::NoPerformer);
        }
        // Acting for oneself and acting for someone else must agree with who is who.
        let is_self = self.performer.person.id == self.patient.id;
        if is_self != (self.performer.representation == Representation::OneSelf) {
            return Err(ConsentError::PerformerMismatch);
        }
        if self.category.system.is_empty() || self.category.code.is_empty() {
            return Err(ConsentError::NoCategory);
        }
        // ppc-1: a consent must name its policy.
        if !is_absolute_uri(&self.policy_uri) {
            return Err(ConsentError::NoPolicy);
        }
        self.provision.check_root()
    }
}

/// `scheme:rest` with an RFC 3986 scheme and no whitespace; enough to tell a URI from a
/// blank or a word. Bytes, not chars: it runs on every decision.
fn is_absolute_uri(s: &str) -> bool {
    let bytes = s.as_bytes();
    let Some(colon) = bytes.iter().position(|&b| b == b':') else {
        return false;
    };
    let (scheme, rest) = (&bytes[..colon], &bytes[colon + 1..]);
    scheme.first().is_some_and(u8::is_ascii_alphabetic)
        && scheme
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
        && !rest.is_empty()
        && !s.chars().any(char::is_whitespace)
}

/// Gateway-local extension on `Consent.performer` saying on what standing a representative
/// acted (R4 has no element for it).
pub const REPRESENTATION_EXTENSION_URL: &str =
    "urn:phr-gateway:fhir:consent-performer-representation";
/// `Consent.policyRule`: opt-in, since nothing is disclosed without a permit.
pub const ACT_CODE_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/v3-ActCode";
/// `provision.class` system: categories are written as the resource types they cover.
pub const RESOURCE_TYPES_SYSTEM: &str = "http://hl7.org/fhir/resource-types";

/// The consent as a FHIR R4 `Consent` resource. Refuses a consent that fails
/// [`Consent::validate`], so every resource written meets ppc-1 and has a recipient.
pub fn to_fhir_json(consent: &Consent) -> Result<Value, ConsentError> {
    consent.validate()?;
    let mut performer = match consent.performer.representation {
        Representation::OneSelf => json!({"reference": format!("Patient/{}", consent.patient.id)}),
        representation => json!({
            "reference": format!("RelatedPerson/{}", consent.performer.person.id),
            "extension": [{
                "url": REPRESENTATION_EXTENSION_URL,
                "valueCode": representation.code(),
            }],
        }),
    };
    if let Some(display) = &consent.performer.person.display {
        performer["display"] = json!(display);
    }
    let mut patient = json!({"reference": format!("Patient/{}", consent.patient.id)});
    if let Some(display) = &consent.patient.display {
        patient["display"] = json!(display);
    }
    let mut category = json!({"system": consent.category.system, "code": consent.category.code});
    if let Some(display) = &consent.category.display {
        category["display"] = json!(display);
    }
    Ok(json!({
        "resourceType": "Consent",
        "id": consent.id,
        "meta": {"versionId": consent.version.to_string()},
        "status": consent.status.code(),
        "scope": {"coding": [{
            "system": CONSENT_SCOPE_SYSTEM,
            "code": "patient-privacy",
        }]},
        "category": [{"coding": [category]}],
        "patient": patient,
        "dateTime": rfc3339(consent.recorded_at)?,
        "performer": [performer],
        "policy": [{"uri": consent.policy_uri}],
        "policyRule": {"coding": [{"system": ACT_CODE_SYSTEM, "code": "OPTIN"}]},
        "provision": provision_json(&consent.provision)?,
    }))
}

fn provision_json(provision: &Provision) -> Result<Value, ConsentError> {
    let mut out = Map::new();
    out.insert("type".into(), json!(provision.kind.code()));
    if let Some(period) = &provision.period {
        let mut p = Map::new();
        if let Some(start) = period.start {
            p.insert("start".into(), json!(rfc3339(start)?));
        }
        if let Some(end) = period.end {
            p.insert("end".into(), json!(rfc3339(end)?));
        }
        out.insert("period".into(), Value::Object(p));
    }
    if !provision.actors.is_empty() {
        let actors: Vec<Value> = provision
            .actors
            .iter()
            .map(|a| {
                json!({
                    "role": {"coding": [{"system": PARTICIPATION_TYPE_SYSTEM, "code": RECIPIENT_ROLE}]},
                    "reference": {"reference": a.fhir_reference()},
                })
            })
            .collect();
        out.insert("actor".into(), Value::Array(actors));
    }
    if !provision.purposes.is_empty() {
        let purposes: Vec<Value> = provision
            .purposes
            .iter()
            .map(|p| json!({"system": p.system, "code": p.code}))
            .collect();
        out.insert("purpose".into(), Value::Array(purposes));
    }
    if !provision.categories.is_empty() {
        let classes: Vec<Value> = provision
            .categories
            .iter()
            .flat_map(|c| c.resource_types())
            .map(|t| json!({"system": RESOURCE_TYPES_SYSTEM, "code": t}))
            .collect();
        out.insert("class".into(), Value::Array(classes));
    }
    if !provision.nested.is_empty() {
        let nested = provision
            .nested
            .iter()
            .map(provision_json)
            .collect::<Result<Vec<_>, _>>()?;
        out.insert("provision".into(), Value::Array(nested));
    }
    Ok(Value::Object(out))
}

pub(crate) fn rfc3339(at: OffsetDateTime) -> Result<String, ConsentError> {
    at.format(&Rfc3339)
        .map_err(|_| ConsentError::TimeOutOfRange)
}

#[cfg(test)]
mod tests;
