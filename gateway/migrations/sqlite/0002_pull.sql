-- Pulls on the patient's instruction (SQLite). Times are Unix milliseconds.

-- Sources the operator configured (hospitals, the portal). `unavailable_since` is set while
-- the source is down or in maintenance (degraded mode).
CREATE TABLE sources (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    display_name TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    unavailable_since BIGINT,
    unavailable_reason TEXT
);

-- The patient's instruction to fetch from a source, for chosen categories.
CREATE TABLE pull_instructions (
    id TEXT PRIMARY KEY,
    patient_id TEXT NOT NULL REFERENCES patients(id),
    source_id TEXT NOT NULL REFERENCES sources(id),
    performer_account_id TEXT NOT NULL,
    categories TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'active', 'withdrawn', 'failed')),
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX pull_instructions_by_patient ON pull_instructions (patient_id, created_at);

-- Full history of each instruction, with the signed receipt issued at each step.
CREATE TABLE pull_instruction_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    instruction_id TEXT NOT NULL REFERENCES pull_instructions(id),
    at BIGINT NOT NULL,
    event TEXT NOT NULL,
    actor TEXT NOT NULL,
    detail TEXT,
    receipt TEXT
);
CREATE INDEX pull_instruction_events_by_instruction ON pull_instruction_events (instruction_id, id);

-- The link to the patient's record at the source. Secrets are sealed with the patient's
-- data key, so crypto-shredding the patient also kills their tokens.
CREATE TABLE source_links (
    instruction_id TEXT PRIMARY KEY REFERENCES pull_instructions(id),
    patient_id TEXT NOT NULL,
    state_digest BLOB UNIQUE,
    pending_sealed BLOB,
    credentials_sealed BLOB,
    cursor TEXT,
    linked_at BIGINT,
    revoked_at BIGINT
);

-- Durable pull jobs, claimed with a lease; a job whose lease expired is claimed again.
CREATE TABLE pull_jobs (
    id TEXT PRIMARY KEY,
    instruction_id TEXT NOT NULL REFERENCES pull_instructions(id),
    patient_id TEXT NOT NULL,
    source_id TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('queued', 'running', 'done', 'failed', 'cancelled')),
    attempts BIGINT NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_expires_at BIGINT,
    not_before BIGINT NOT NULL,
    received BIGINT NOT NULL DEFAULT 0,
    unchanged BIGINT NOT NULL DEFAULT 0,
    rejected BIGINT NOT NULL DEFAULT 0,
    last_error TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    finished_at BIGINT
);
CREATE INDEX pull_jobs_claimable ON pull_jobs (status, not_before);
CREATE INDEX pull_jobs_by_instruction ON pull_jobs (instruction_id, created_at);

-- Items a pull could not store, with the reason; the rest of the pull is kept.
CREATE TABLE pull_item_errors (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL REFERENCES pull_jobs(id),
    at BIGINT NOT NULL,
    resource_type TEXT,
    source_resource_id TEXT,
    reason TEXT NOT NULL
);
CREATE INDEX pull_item_errors_by_job ON pull_item_errors (job_id, id);
