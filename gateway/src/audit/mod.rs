//! The tamper-evident audit log: FHIR AuditEvent leaves (BALP) in an RFC 6962 Merkle tree
//! with Ed25519-signed checkpoints in the C2SP tlog-checkpoint format.
//!
//! Leaves are written in the transaction of the change they record (`record`), with no tree
//! index yet; one sequencer (`AuditLog::sequence`) assigns indices in commit order and signs
//! checkpoints, so several writers and processes stay consistent.

pub mod access_log;
pub mod checkpoint;
pub mod event;
pub mod export;
pub mod key_rotation;
pub mod keyring;
pub mod log;
pub mod merkle;
pub mod search;
pub mod shipping;
pub mod verify;

pub use event::{AccountRole, Actor, Agent, AuditEvent, EventKind, Outcome};
pub use log::{record, record_all, AuditLog};
