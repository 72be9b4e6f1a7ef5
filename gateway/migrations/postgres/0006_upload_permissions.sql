-- Checkup institutions (registered OAuth clients) the patient lets send their 特定健診
-- results: receiving on the patient's instruction, like a pull instruction, but the
-- institution sends. The id is the reference the patient hands to the institution.
CREATE TABLE upload_permissions (
    id TEXT PRIMARY KEY,
    patient_id TEXT NOT NULL REFERENCES patients(id),
    client_id TEXT NOT NULL REFERENCES oauth_clients(id),
    performer_account_id TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('active', 'withdrawn')),
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    -- After this the permission no longer admits uploads (Unix milliseconds).
    expires_at BIGINT NOT NULL
);
CREATE INDEX upload_permissions_by_patient ON upload_permissions (patient_id, created_at);

-- Full history: given, each upload the institution made under it, withdrawn; with the
-- signed receipt issued at each of the patient's steps.
CREATE TABLE upload_permission_events (
    id BIGSERIAL PRIMARY KEY,
    permission_id TEXT NOT NULL REFERENCES upload_permissions(id),
    at BIGINT NOT NULL,
    event TEXT NOT NULL,
    actor TEXT NOT NULL,
    detail TEXT,
    receipt TEXT
);
CREATE INDEX upload_permission_events_by_permission ON upload_permission_events (permission_id, id);
