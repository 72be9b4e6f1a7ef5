-- Bulk Data exports: durable jobs claimed with leases (any gateway process may run or
-- answer for them), and their NDJSON output, sealed per job in chunks (so every process can
-- serve the files, and destroying the job's key erases them).
CREATE TABLE export_jobs (
    id TEXT PRIMARY KEY,
    client_id TEXT NOT NULL REFERENCES oauth_clients(id),
    -- `group` (Group/[id]/$export) or `patient` (Patient/$export).
    kind TEXT NOT NULL,
    group_id TEXT,
    request_url TEXT NOT NULL,
    -- The parsed kick-off (types, since, type filters) as JSON.
    parameters TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('queued', 'running', 'done', 'failed', 'cancelled')),
    lease_owner TEXT,
    lease_expires_at BIGINT,
    patients_total BIGINT,
    patients_done BIGINT NOT NULL DEFAULT 0,
    error TEXT,
    transaction_time BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    finished_at BIGINT,
    expires_at BIGINT,
    last_polled_at BIGINT
);
CREATE INDEX export_jobs_ready ON export_jobs (status, created_at);

CREATE TABLE export_chunks (
    job_id TEXT NOT NULL REFERENCES export_jobs(id),
    -- The output file: a resource type, or `deleted`.
    file TEXT NOT NULL,
    seq BIGINT NOT NULL,
    lines BIGINT NOT NULL,
    sealed BYTEA NOT NULL,
    PRIMARY KEY (job_id, file, seq)
);
