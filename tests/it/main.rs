//! End-to-end tests: the real gateway in-process, on a fresh SQLite or PostgreSQL database.
//! Every storage test runs on both engines (`both_engines!`).

mod browser;
mod bulk_export;
mod helpers;

mod access_log;
mod alerts;
mod audit;
mod audit_shipping;
mod backup;
mod backup_generations;
mod break_glass;
mod config;
mod consent_flow;
mod consent_pages;
mod consent_rules;
mod consents;
mod erasure;
mod fhir_api;
mod fhir_client;
mod fhir_scale;
mod fhir_validation;
mod http;
mod institution_uploads;
mod kek_rotation;
mod key_management;
mod maintenance;
mod notifications;
mod oauth;
mod openapi;
mod operator_pages;
mod patient_export;
mod portal;
mod portal_security;
mod pull;
mod pull_group_commit;
mod pull_queue;
mod pull_self_info;
mod reconciliation;
mod representations;
mod resources;
mod second_factors;
mod security;
mod step_up;
mod supply_chain;
mod transfers;
