//! Exports: FHIR Bulk Data Access (`$export`) for recipients' backends. The kick-off's
//! parameters are parsed in `request` (no I/O); the durable jobs, their consent checks and
//! their sealed NDJSON output live in `jobs`.

pub mod jobs;
pub mod request;
pub mod summary;

pub use jobs::{ExportJob, ExportJobs, ExportStatus, OutputFile, DELETED_FILE};
pub use request::ExportParameters;
