//! Disclosure consent: the FHIR R4 `Consent`-shaped model, `decide()`, and receipts; and the
//! data categories that both consents and pull instructions are given for.
//!
//! Pure domain logic with no I/O. The gateway depends on this crate, never the other way.

pub mod category;

pub use category::DataCategory;
