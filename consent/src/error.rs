//! The crate's one error type. Variants carry no heap data so that `Consent::validate`
//! stays allocation-free on the decision path.

use crate::model::ConsentStatus;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConsentError {
    #[error("the consent has no id")]
    NoId,
    #[error("the consent version must be 1 or more")]
    NoVersion,
    #[error("the consent names no patient")]
    NoPatient,
    #[error("the consent names no performer")]
    NoPerformer,
    #[error("the performer's representation does not match who they are (self must be the patient; a representative must not be)")]
    PerformerMismatch,
    #[error("the consent has no category")]
    NoCategory,
    #[error("the consent names no policy (ppc-1): policy_uri must be an absolute URI")]
    NoPolicy,
    #[error("the root provision must be a permit")]
    RootNotPermit,
    #[error("the permit names no recipient")]
    NoRecipients,
    #[error("the permit names no purpose")]
    NoPurposes,
    #[error("the permit names no data category")]
    NoCategories,
    #[error("a nested provision must be a deny")]
    NestedNotDeny,
    #[error("a deny provision may not nest further provisions")]
    NestedTooDeep,
    #[error("a provision period must end after it starts")]
    EmptyPeriod,
    #[error("a recipient has an empty id")]
    EmptyRecipientId,
    #[error("a purpose has an empty system or code")]
    EmptyPurpose,
    #[error("a new consent must be proposed or active, not {}", .0.code())]
    BadInitialStatus(ConsentStatus),
    #[error("cannot {change} a consent that is {}", .from.code())]
    BadTransition {
        from: ConsentStatus,
        change: &'static str,
    },
    #[error("a change cannot be recorded before the version it changes")]
    ChangeBeforeRecorded,
    #[error("a time cannot be written as RFC 3339 (year outside 0000–9999)")]
    TimeOutOfRange,
    #[error("the consent has no more versions")]
    VersionOverflow,
    #[error("a {event} receipt needs a consent that is {}, not {}", .expected.code(), .actual.code())]
    ReceiptEventMismatch {
        event: &'static str,
        expected: ConsentStatus,
        actual: ConsentStatus,
    },
}
