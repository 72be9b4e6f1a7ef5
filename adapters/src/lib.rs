//! Sources the gateway pulls from on the patient's instruction (hospital FHIR R4 via SMART,
//! the portal-style self-information API, 特定健診 CDA files) and their simulators.
//!
//! Filled by the pull issues. Never depends on the gateway crate.
