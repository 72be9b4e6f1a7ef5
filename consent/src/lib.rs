//! Disclosure consent: the FHIR R4 `Consent`-shaped model ([`model`]), the access decision
//! ([`decision::decide`]), consent receipts ([`receipt`]), and the data categories that both
//! consents and pull instructions are given for ([`category`]).
//!
//! Pure domain logic with no I/O: no files, network, clock or randomness. Times, ids and
//! everything else that varies are passed in. The gateway depends on this crate, never the
//! other way.

pub mod category;
pub mod decision;
pub mod error;
pub mod model;
pub mod receipt;
pub mod representation;

pub use category::DataCategory;
pub use decision::{decide, AccessRequest, ConsentRef, Decision, DenyReason, Effect, Requested};
pub use error::ConsentError;
pub use model::{
    to_fhir_json, Change, Coding, Consent, ConsentStatus, NewConsent, Performer, Period, PersonRef,
    Provision, ProvisionKind, Purpose, Recipient, RecipientKind, Representation,
};
pub use receipt::{
    build_receipt, ConsentReceipt, Notice, PiiController, ReceiptEvent, ReceiptInput,
};
pub use representation::{majority_day, representation_ended};
