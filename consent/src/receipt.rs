//! Consent receipts: the record a patient keeps of each consent event, in the shape of an
//! ISO/IEC TS 27560 consent record, with Kantara Consent Receipt 1.1 field names where they
//! fit. This module only builds the claims; the gateway signs them as a JWS.
//!
//! Everything that varies (receipt id, times, controller, notice) is passed in.

use serde::Serialize;
use time::OffsetDateTime;

use crate::error::ConsentError;
use crate::model::{rfc3339, Consent, ConsentStatus, Period, Provision, Purpose, Recipient};

/// Kantara Consent Receipt specification version.
pub const KANTARA_VERSION: &str = "KI-CR-v1.1.0";
pub const JURISDICTION: &str = "JP";

/// The consent event a receipt records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReceiptEvent {
    Granted,
    Changed,
    Withdrawn,
}

impl ReceiptEvent {
    pub fn code(self) -> &'static str {
        match self {
            ReceiptEvent::Granted => "granted",
            ReceiptEvent::Changed => "changed",
            ReceiptEvent::Withdrawn => "withdrawn",
        }
    }

    /// The status the consent version must have for this event.
    fn expected_status(self) -> ConsentStatus {
        match self {
            ReceiptEvent::Granted | ReceiptEvent::Changed => ConsentStatus::Active,
            ReceiptEvent::Withdrawn => ConsentStatus::Inactive,
        }
    }
}

/// Kantara `piiControllers[]`: who is responsible for the data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PiiController {
    #[serde(rename = "piiController")]
    pub name: String,
    pub on_behalf: bool,
    pub contact: String,
    pub address: String,
    pub email: String,
    pub phone: String,
    #[serde(rename = "piiControllerUrl", skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

/// The privacy notice the performer was shown when acting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Notice {
    pub url: String,
    pub version: String,
}

/// What the caller supplies for one receipt.
#[derive(Debug, Clone)]
pub struct ReceiptInput {
    pub receipt_id: String,
    pub issued_at: OffsetDateTime,
    /// BCP 47, e.g. `ja`.
    pub language: String,
    /// How consent was collected, e.g. `web-form` or `smartphone-app`.
    pub collection_method: String,
    pub controllers: Vec<PiiController>,
    pub policy_url: String,
    pub notice: Notice,
    /// Names to show for recipients; a recipient not listed is shown by its id.
    pub recipient_names: Vec<(Recipient, String)>,
}

/// The receipt claims. Field names follow Kantara CR 1.1; the fields after `spiCat` carry
/// what TS 27560 records and Kantara has no field for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConsentReceipt {
    pub version: &'static str,
    pub jurisdiction: &'static str,
    /// Seconds since the epoch when the consent event was recorded.
    pub consent_timestamp: i64,
    pub collection_method: String,
    #[serde(rename = "consentReceiptID")]
    pub consent_receipt_id: String,
    pub language: String,
    pub pii_principal_id: String,
    pub pii_controllers: Vec<PiiController>,
    pub policy_url: String,
    pub services: Vec<Service>,
    /// Health data is special-care personal information (要配慮個人情報) under APPI.
    pub sensitive: bool,
    pub spi_cat: Vec<&'static str>,
    pub event: ReceiptEvent,
    pub issued_at: String,
    pub consent: ConsentSummary,
    pub subject: Party,
    pub performer: PerformerClaim,
    pub notice: Notice,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Service {
    pub service: String,
    pub purposes: Vec<ServicePurpose>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePurpose {
    pub purpose: String,
    pub purpose_category: Vec<String>,
    pub consent_type: &'static str,
    pub pii_category: Vec<&'static str>,
    pub primary_purpose: bool,
    pub termination: String,
    pub third_party_disclosure: bool,
    pub third_party_name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConsentSummary {
    pub id: String,
    pub version: u32,
    pub status: &'static str,
    pub recorded_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub period: Option<PeriodClaim>,
    /// The nested denies: what is excluded although the permit would cover it.
    pub exclusions: Vec<Exclusion>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeriodClaim {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end: Option<String>,
}

/// An empty list means "any", as in the provision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Exclusion {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub period: Option<PeriodClaim>,
    pub recipients: Vec<String>,
    pub purposes: Vec<String>,
    pub categories: Vec<&'static str>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Party {
    pub id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PerformerClaim {
    pub id: String,
    pub representation: &'static str,
}

/// The receipt for `event` on this consent version. Refuses a consent that fails
/// validation, and an event that does not match the version's status (a withdrawal
/// receipt must be for the `inactive` version, a grant or change for an `active` one).
pub fn build_receipt(
    event: ReceiptEvent,
    consent: &Consent,
    input: &ReceiptInput,
) -> Result<ConsentReceipt, ConsentError> {
    consent.validate()?;
    if consent.status != event.expected_status() {
        return Err(ConsentError::ReceiptEventMismatch {
            event: event.code(),
            expected: event.expected_status(),
            actual: consent.status,
        });
    }
    let provision = &consent.provision;
    let termination = termination(event, consent)?;
    let pii_category: Vec<&'static str> = provision.categories.iter().map(|c| c.code()).collect();
    let services = provision
        .actors
        .iter()
        .map(|recipient| {
            let name = recipient_name(recipient, &input.recipient_names);
            Service {
                service: name.clone(),
                purposes: provision
                    .purposes
                    .iter()
                    .map(|purpose| ServicePurpose {
                        purpose: purpose_text(purpose),
                        purpose_category: vec![purpose.code.clone()],
                        consent_type: "EXPLICIT",
                        pii_category: pii_category.clone(),
                        // Each purpose was named and agreed to on its own.
                        primary_purpose: true,
                        termination: termination.clone(),
                        third_party_disclosure: true,
                        third_party_name: name.clone(),
                    })
                    .collect(),
            }
        })
        .collect();
    let exclusions = provision
        .nested
        .iter()
        .map(|deny| exclusion(deny, &input.recipient_names))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ConsentReceipt {
        version: KANTARA_VERSION,
        jurisdiction: JURISDICTION,
        consent_timestamp: consent.recorded_at.unix_timestamp(),
        collection_method: input.collection_method.clone(),
        consent_receipt_id: input.receipt_id.clone(),
        language: input.language.clone(),
        pii_principal_id: consent.patient.id.clone(),
        pii_controllers: input.controllers.clone(),
        policy_url: input.policy_url.clone(),
        services,
        sensitive: true,
        spi_cat: vec!["health"],
        event,
        issued_at: rfc3339(input.issued_at)?,
        consent: ConsentSummary {
            id: consent.id.clone(),
            version: consent.version,
            status: consent.status.code(),
            recorded_at: rfc3339(consent.recorded_at)?,
            period: provision.period.as_ref().map(period_claim).transpose()?,
            exclusions,
        },
        subject: Party {
            id: consent.patient.id.clone(),
        },
        performer: PerformerClaim {
            id: consent.performer.person.id.clone(),
            representation: consent.performer.representation.code(),
        },
        notice: input.notice.clone(),
    })
}

fn termination(event: ReceiptEvent, consent: &Consent) -> Result<String, ConsentError> {
    if event == ReceiptEvent::Withdrawn {
        return Ok(format!("withdrawn at {}", rfc3339(consent.recorded_at)?));
    }
    Ok(match consent.provision.period.and_then(|p| p.end) {
        Some(end) => format!("ends at {} or on withdrawal", rfc3339(end)?),
        None => "on withdrawal".to_string(),
    })
}

fn exclusion(deny: &Provision, names: &[(Recipient, String)]) -> Result<Exclusion, ConsentError> {
    Ok(Exclusion {
        period: deny.period.as_ref().map(period_claim).transpose()?,
        recipients: deny
            .actors
            .iter()
            .map(|r| recipient_name(r, names))
            .collect(),
        purposes: deny.purposes.iter().map(purpose_text).collect(),
        categories: deny.categories.iter().map(|c| c.code()).collect(),
    })
}

fn recipient_name(recipient: &Recipient, names: &[(Recipient, String)]) -> String {
    names
        .iter()
        .find(|(r, _)| r == recipient)
        .map_or_else(|| recipient.id.clone(), |(_, name)| name.clone())
}

/// Words for the HL7 PurposeOfUse codes the gateway uses; other codes as they are.
fn purpose_text(purpose: &Purpose) -> String {
    let known = if purpose.system == crate::model::PURPOSE_OF_USE_SYSTEM {
        match purpose.code.as_str() {
            "TREAT" => Some("treatment"),
            "PATRQT" => Some("at the patient's request"),
            "HRESCH" => Some("healthcare research"),
            _ => None,
        }
    } else {
        None
    };
    known.map_or_else(|| purpose.code.clone(), str::to_string)
}

fn period_claim(period: &Period) -> Result<PeriodClaim, ConsentError> {
    Ok(PeriodClaim {
        start: period.start.map(rfc3339).transpose()?,
        end: period.end.map(rfc3339).transpose()?,
    })
}

#[cfg(test)]
mod tests;
