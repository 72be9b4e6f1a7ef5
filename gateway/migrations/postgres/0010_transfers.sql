-- PHR-to-PHR transfer. Sending: where each recipient takes pushed records, and each
-- transfer the patient started (retried until delivered or failed). Receiving: one-time
-- codes a patient hands to the sending service, the sending services (peers) and their
-- keys, and what arrived (so a repeated push is recognised).

CREATE TABLE transfer_endpoints (
    client_id TEXT PRIMARY KEY REFERENCES oauth_clients(id),
    url TEXT NOT NULL,
    registered_by TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE transfers (
    id TEXT PRIMARY KEY,
    patient_id TEXT NOT NULL REFERENCES patients(id),
    client_id TEXT NOT NULL REFERENCES oauth_clients(id),
    performer_account_id TEXT NOT NULL,
    categories TEXT NOT NULL,
    -- The recipient's one-time code, sealed with the patient's data key; cleared once sent.
    code_sealed BYTEA,
    status TEXT NOT NULL CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    last_error TEXT,
    resources BIGINT,
    receipt TEXT,
    created_at BIGINT NOT NULL,
    delivered_at BIGINT
);
CREATE INDEX transfers_by_patient ON transfers (patient_id, created_at);
CREATE INDEX transfers_due ON transfers (status, next_attempt_at);

CREATE TABLE transfer_codes (
    code_hash BYTEA PRIMARY KEY,
    patient_id TEXT NOT NULL REFERENCES patients(id),
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at BIGINT,
    -- The sender's transfer id (with its issuer) that used the code.
    used_by TEXT
);

CREATE TABLE transfer_peers (
    issuer TEXT PRIMARY KEY,
    display_name TEXT NOT NULL,
    jwks TEXT NOT NULL,
    registered_by TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE received_transfers (
    issuer TEXT NOT NULL,
    transfer_id TEXT NOT NULL,
    patient_id TEXT NOT NULL,
    resources BIGINT NOT NULL,
    receipt TEXT NOT NULL,
    received_at BIGINT NOT NULL,
    PRIMARY KEY (issuer, transfer_id)
);
