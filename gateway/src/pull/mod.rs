//! Pulls on the patient's instruction: instructions with their history and receipts, the
//! links to sources (sealed secrets), durable jobs claimed with leases, and the worker that
//! runs them against a `Source`.

pub mod instructions;
pub mod page_commit;
pub mod queue;
pub mod registry;
pub mod worker;

pub use instructions::{Instruction, InstructionStatus, Instructions};
pub use page_commit::{CommitCounts, PageCommits};
pub use queue::{JobQueue, PullJob};
pub use registry::SourceRegistry;
pub use worker::PullWorker;
