//! phr-gateway: a PHR data-exchange gateway for Japan.
//!
//! It pulls medical and checkup data on the patient's instruction, keeps it encrypted per
//! patient, and discloses it only under the patient's live consent, with every access in a
//! tamper-evident audit log. `main` is a thin shell over `cli`.

pub mod alerts;
pub mod app;
pub mod audit;
pub mod backup;
pub mod break_glass;
pub mod checkups;
pub mod cli;
pub mod config;
pub mod consents;
pub mod crypto;
pub mod demo;
pub mod disclosure;
pub mod error;
pub mod export;
pub mod fhir;
pub mod group_commit;
pub mod http;
pub mod import;
pub mod keystore;
pub mod maintenance;
pub mod medications;
pub mod mfa;
pub mod notifications;
pub mod oauth;
pub mod provenance;
pub mod pull;
pub mod receipts;
pub mod s3;
pub mod store;
pub mod supply_chain;
pub mod tasks;
pub mod telemetry;
pub mod tls;
pub mod uploads;

pub use app::{Gateway, RunningGateway};
pub use config::Config;
pub use error::{Error, Result};
