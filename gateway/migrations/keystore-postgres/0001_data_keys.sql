-- The key store lives apart from the main database so that database backups never carry
-- usable keys, and deleting a row here crypto-shreds a patient's data everywhere.
CREATE TABLE data_keys (
    patient_id TEXT PRIMARY KEY,
    wrapped_key BYTEA NOT NULL,
    created_at BIGINT NOT NULL
);
