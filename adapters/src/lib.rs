//! Sources the gateway pulls from on the patient's instruction (hospital FHIR R4 via SMART,
//! the portal-style self-information API, 特定健診 CDA files), their simulators, and the
//! code-system normaliser.
//!
//! Never depends on the gateway crate: the gateway drives a `Source` and stores what it
//! yields.

pub mod codesystem;
pub mod error;
pub mod fhir_r4;
mod http;
mod instant;
pub mod oauth;
pub mod self_info;
pub mod simulator_web;
pub mod source;
pub mod tokutei_cda;

pub use error::SourceError;
pub use source::{
    AuthorizationRequest, AuthorizationStart, Callback, Capabilities, LinkCredentials, LinkMode,
    PendingAuthorization, Provenance, PullBatch, PullItem, PullRequest, PullStream, PulledResource,
    Source,
};
