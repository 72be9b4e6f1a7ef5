//! Disclosure consent: the FHIR R4 `Consent`-shaped model, `decide()`, and receipts.
//!
//! Pure domain logic with no I/O; filled by the consent issue. The gateway depends on this
//! crate, never the other way round.
