-- Foundation schema (SQLite). Times are Unix milliseconds; ids are opaque gateway ids.
CREATE TABLE patients (
    id TEXT PRIMARY KEY,
    created_at BIGINT NOT NULL
);

CREATE TABLE resources (
    id TEXT PRIMARY KEY,
    patient_id TEXT NOT NULL REFERENCES patients(id),
    resource_type TEXT NOT NULL,
    category TEXT NOT NULL,
    source TEXT NOT NULL,
    source_resource_id TEXT NOT NULL,
    current_version BIGINT NOT NULL,
    last_updated BIGINT NOT NULL,
    UNIQUE (patient_id, source, resource_type, source_resource_id)
);
CREATE INDEX resources_by_patient ON resources (patient_id, resource_type, id);

CREATE TABLE resource_versions (
    resource_id TEXT NOT NULL REFERENCES resources(id),
    version BIGINT NOT NULL,
    patient_id TEXT NOT NULL,
    source_version TEXT NOT NULL,
    digest BLOB NOT NULL,
    last_updated BIGINT NOT NULL,
    body BLOB NOT NULL,
    PRIMARY KEY (resource_id, version),
    UNIQUE (resource_id, source_version)
);

CREATE TABLE accounts (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('patient', 'operator')),
    username TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    patient_id TEXT REFERENCES patients(id),
    failed_logins BIGINT NOT NULL DEFAULT 0,
    lockouts BIGINT NOT NULL DEFAULT 0,
    locked_until BIGINT,
    created_at BIGINT NOT NULL
);

CREATE TABLE sessions (
    token_hash BLOB PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts(id),
    created_at BIGINT NOT NULL,
    last_seen_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    ended_at BIGINT
);
CREATE INDEX sessions_by_account ON sessions (account_id);

CREATE TABLE audit_leaves (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    recorded_at BIGINT NOT NULL,
    body BLOB NOT NULL,
    leaf_hash BLOB NOT NULL,
    tree_index BIGINT UNIQUE
);
CREATE INDEX audit_leaves_unsequenced ON audit_leaves (id) WHERE tree_index IS NULL;
CREATE INDEX audit_leaves_recorded ON audit_leaves (recorded_at);

CREATE TABLE audit_checkpoints (
    tree_size BIGINT PRIMARY KEY,
    root BLOB NOT NULL,
    note TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE audit_sequencer (
    id BIGINT PRIMARY KEY CHECK (id = 1),
    tree_size BIGINT NOT NULL,
    compact_range BLOB NOT NULL,
    checkpoint_size BIGINT NOT NULL,
    checkpoint_at BIGINT NOT NULL
);
