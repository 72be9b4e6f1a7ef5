//! `decide()`: may this recipient see this category of this patient's data for this purpose,
//! now? Deny by default and fail closed: only a well-formed, current, active consent whose
//! permit covers the request and whose exceptions do not exclude it permits.
//!
//! It runs on every disclosure, so it allocates nothing: reasons are enums and the
//! decision borrows the id of the consent it names.

use time::OffsetDateTime;

use crate::category::DataCategory;
use crate::model::{Consent, ConsentStatus, PeriodPosition, Provision, Purpose, Recipient};

/// What is asked for: a category, or a resource type to be mapped to its category.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requested<'a> {
    Category(DataCategory),
    ResourceType(&'a str),
}

/// One disclosure about to happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccessRequest<'a> {
    /// The patient whose data it is.
    pub patient: &'a str,
    pub recipient: &'a Recipient,
    pub purpose: &'a Purpose,
    pub requested: Requested<'a>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Effect {
    Permit,
    Deny,
}

/// Why a request was denied. When several consents deny for different reasons, the one
/// reported is from the consent that came closest to permitting: later variants rank
/// higher (a withdrawn consent for this very app says more than one for another app).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DenyReason {
    /// The request itself is incomplete (empty patient or recipient id).
    MalformedRequest,
    /// The resource type belongs to no category, so no consent can cover it.
    UnknownResourceType,
    /// The patient has no consent at all.
    NoConsent,
    /// The only consents are malformed (e.g. no recipients, no policy): they permit nothing.
    MalformedConsent,
    /// Two different records claim the same consent id and version.
    AmbiguousConsent,
    /// No consent names this recipient.
    RecipientNotCovered,
    /// A consent names this recipient but not this purpose.
    PurposeNotCovered,
    /// A consent names this recipient and purpose but not this category.
    CategoryNotCovered,
    /// The covering consent was asked for but never agreed to.
    Proposed,
    /// The covering consent's proposal was declined.
    Rejected,
    /// The covering consent was withdrawn.
    Withdrawn,
    /// The covering consent's period has not started.
    NotYetValid,
    /// The covering consent's period has ended.
    Expired,
    /// The covering consent permits it, but one of its exceptions (nested deny) excludes it.
    Excluded,
}

impl DenyReason {
    /// Stable code for APIs, logs and audit.
    pub fn code(self) -> &'static str {
        match self {
            DenyReason::MalformedRequest => "malformed-request",
            DenyReason::UnknownResourceType => "unknown-resource-type",
            DenyReason::NoConsent => "no-consent",
            DenyReason::MalformedConsent => "malformed-consent",
            DenyReason::AmbiguousConsent => "ambiguous-consent",
            DenyReason::RecipientNotCovered => "recipient-not-covered",
            DenyReason::PurposeNotCovered => "purpose-not-covered",
            DenyReason::CategoryNotCovered => "category-not-covered",
            DenyReason::Proposed => "proposed",
            DenyReason::Rejected => "rejected",
            DenyReason::Withdrawn => "withdrawn",
            DenyReason::NotYetValid => "not-yet-valid",
            DenyReason::Expired => "expired",
            DenyReason::Excluded => "excluded",
        }
    }

    /// Plain Japanese, as shown to the patient.
    pub fn message_ja(self) -> &'static str {
        match self {
            DenyReason::MalformedRequest => "要求の内容が不完全です。",
            DenyReason::UnknownResourceType => "この種類の情報は提供の対象外です。",
            DenyReason::NoConsent => "情報提供への同意がありません。",
            DenyReason::MalformedConsent => "同意の記録に不備があるため、提供できません。",
            DenyReason::AmbiguousConsent => "同意の記録が矛盾しているため、提供できません。",
            DenyReason::RecipientNotCovered => "この提供先への同意がありません。",
            DenyReason::PurposeNotCovered => "この利用目的への同意がありません。",
            DenyReason::CategoryNotCovered => "この種類の情報への同意がありません。",
            DenyReason::Proposed => "同意はまだ確定していません。",
            DenyReason::Rejected => "同意の依頼は拒否されています。",
            DenyReason::Withdrawn => "同意は撤回されています。",
            DenyReason::NotYetValid => "同意の有効期間がまだ始まっていません。",
            DenyReason::Expired => "同意の有効期間が終了しています。",
            DenyReason::Excluded => "同意の中で、この提供は除外されています。",
        }
    }

    pub fn message_en(self) -> &'static str {
        match self {
            DenyReason::MalformedRequest => "The request is incomplete.",
            DenyReason::UnknownResourceType => "This kind of data is never disclosed.",
            DenyReason::NoConsent => "There is no consent to disclose.",
            DenyReason::MalformedConsent => {
                "The consent record is incomplete, so nothing is disclosed."
            }
            DenyReason::AmbiguousConsent => {
                "The consent records conflict, so nothing is disclosed."
            }
            DenyReason::RecipientNotCovered => "There is no consent for this recipient.",
            DenyReason::PurposeNotCovered => "There is no consent for this purpose.",
            DenyReason::CategoryNotCovered => "There is no consent for this kind of data.",
            DenyReason::Proposed => "The consent has not been agreed yet.",
            DenyReason::Rejected => "The consent request was declined.",
            DenyReason::Withdrawn => "The consent was withdrawn.",
            DenyReason::NotYetValid => "The consent's period has not started yet.",
            DenyReason::Expired => "The consent's period has ended.",
            DenyReason::Excluded => "The consent excludes this disclosure.",
        }
    }
}

/// A consent version, borrowed from the slice `decide` was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConsentRef<'a> {
    pub id: &'a str,
    pub version: u32,
}

impl<'a> ConsentRef<'a> {
    fn of(consent: &'a Consent) -> ConsentRef<'a> {
        ConsentRef {
            id: &consent.id,
            version: consent.version,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Decision<'a> {
    /// Disclose, under this consent version (record it in the audit log).
    Permit { consent: ConsentRef<'a> },
    /// Do not disclose. `consent` is the one the reason is about, when there is one.
    Deny {
        reason: DenyReason,
        consent: Option<ConsentRef<'a>>,
    },
}

impl<'a> Decision<'a> {
    pub fn effect(&self) -> Effect {
        match self {
            Decision::Permit { .. } => Effect::Permit,
            Decision::Deny { .. } => Effect::Deny,
        }
    }

    pub fn is_permit(&self) -> bool {
        self.effect() == Effect::Permit
    }

    pub fn reason(&self) -> Option<DenyReason> {
        match self {
            Decision::Permit { .. } => None,
            Decision::Deny { reason, .. } => Some(*reason),
        }
    }

    pub fn consent(&self) -> Option<ConsentRef<'a>> {
        match self {
            Decision::Permit { consent } => Some(*consent),
            Decision::Deny { consent, .. } => *consent,
        }
    }

    fn deny(reason: DenyReason) -> Decision<'a> {
        Decision::Deny {
            reason,
            consent: None,
        }
    }
}

/// Decide one request against the patient's consents (any versions, any order; consents
/// of other patients are ignored). Of several versions of one consent only the highest
/// counts. The result does not depend on the order of `consents`.
pub fn decide<'a>(
    request: &AccessRequest<'_>,
    consents: &'a [Consent],
    now: OffsetDateTime,
) -> Decision<'a> {
    if request.patient.is_empty() || request.recipient.id.is_empty() {
        return Decision::deny(DenyReason::MalformedRequest);
    }
    let category = match request.requested {
        Requested::Category(category) => category,
        Requested::ResourceType(resource_type) => {
            match DataCategory::of_resource_type(resource_type) {
                Some(category) => category,
                None => return Decision::deny(DenyReason::UnknownResourceType),
            }
        }
    };

    // Among several permitting or equally-ranked consents, the smallest id is named, so
    // the decision is the same whatever order the consents come in.
    let mut permit: Option<&'a Consent> = None;
    let mut deny: Option<(DenyReason, &'a Consent)> = None;
    for (index, consent) in consents.iter().enumerate() {
        if consent.patient.id != request.patient {
            continue;
        }
        let outcome = match standing(consents, index) {
            Standing::Superseded => continue,
            Standing::Duplicated => Err(DenyReason::AmbiguousConsent),
            Standing::Latest => evaluate(consent, request, category, now),
        };
        match outcome {
            Ok(()) => {
                if permit.is_none_or(|p| consent.id < p.id) {
                    permit = Some(consent);
                }
            }
            Err(reason) => {
                let better = match deny {
                    None => true,
                    Some((r, c)) => reason > r || (reason == r && consent.id < c.id),
                };
                if better {
                    deny = Some((reason, consent));
                }
            }
        }
    }
    match (permit, deny) {
        (Some(consent), _) => Decision::Permit {
            consent: ConsentRef::of(consent),
        },
        (None, Some((reason, consent))) => Decision::Deny {
            reason,
            consent: Some(ConsentRef::of(consent)),
        },
        (None, None) => Decision::deny(DenyReason::NoConsent),
    }
}

enum Standing {
    /// The highest version of its id.
    Latest,
    /// A higher version of the same id is present.
    Superseded,
    /// Another record has the same id and version: neither can be trusted.
    Duplicated,
}

fn standing(consents: &[Consent], index: usize) -> Standing {
    let this = &consents[index];
    let mut duplicated = false;
    for (other_index, other) in consents.iter().enumerate() {
        if other_index == index || other.id != this.id {
            continue;
        }
        if other.version > this.version {
            return Standing::Superseded;
        }
        // The same record passed twice is harmless; two different ones are a conflict.
        if other.version == this.version && other != this {
            duplicated = true;
        }
    }
    if duplicated {
        Standing::Duplicated
    } else {
        Standing::Latest
    }
}

/// Checks in the order that ranks the reasons: what the consent covers first, then
/// whether it is in force, then its exceptions.
fn evaluate(
    consent: &Consent,
    request: &AccessRequest<'_>,
    category: DataCategory,
    now: OffsetDateTime,
) -> Result<(), DenyReason> {
    if consent.validate().is_err() {
        return Err(DenyReason::MalformedConsent);
    }
    let provision = &consent.provision;
    if !provision.actors.contains(request.recipient) {
        return Err(DenyReason::RecipientNotCovered);
    }
    if !provision.purposes.contains(request.purpose) {
        return Err(DenyReason::PurposeNotCovered);
    }
    if !provision.categories.contains(&category) {
        return Err(DenyReason::CategoryNotCovered);
    }
    match consent.status {
        ConsentStatus::Active => {}
        ConsentStatus::Proposed => return Err(DenyReason::Proposed),
        ConsentStatus::Rejected => return Err(DenyReason::Rejected),
        ConsentStatus::Inactive => return Err(DenyReason::Withdrawn),
    }
    if let Some(period) = &provision.period {
        match period.position(now) {
            PeriodPosition::Within => {}
            PeriodPosition::Before => return Err(DenyReason::NotYetValid),
            PeriodPosition::After => return Err(DenyReason::Expired),
        }
    }
    if provision
        .nested
        .iter()
        .any(|deny| excludes(deny, request, category, now))
    {
        return Err(DenyReason::Excluded);
    }
    Ok(())
}

/// Whether a nested deny applies; each empty list matches anything.
fn excludes(
    deny: &Provision,
    request: &AccessRequest<'_>,
    category: DataCategory,
    now: OffsetDateTime,
) -> bool {
    deny.period.is_none_or(|period| period.contains(now))
        && (deny.actors.is_empty() || deny.actors.contains(request.recipient))
        && (deny.purposes.is_empty() || deny.purposes.contains(request.purpose))
        && (deny.categories.is_empty() || deny.categories.contains(&category))
}

#[cfg(test)]
mod tests;
