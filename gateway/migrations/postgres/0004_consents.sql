-- Disclosure consents: a patient allowing a recipient (a PHR app, another provider) to
-- receive data for stated purposes. Times are Unix milliseconds.

-- The current state of each consent, for listing and for the decision on every access.
CREATE TABLE consents (
    id TEXT PRIMARY KEY,
    patient_id TEXT NOT NULL REFERENCES patients(id),
    -- The recipient's client id, and its name as shown when the patient decided.
    recipient TEXT NOT NULL,
    recipient_display TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('proposed', 'active', 'rejected', 'inactive')),
    current_version BIGINT NOT NULL,
    period_end BIGINT,
    -- Set when a representative gave it and their representation ended: the person is
    -- asked to confirm or withdraw it.
    confirmation_requested_at BIGINT,
    updated_at BIGINT NOT NULL
);
CREATE INDEX consents_by_patient ON consents (patient_id, recipient);

-- Every version as recorded (the FHIR-shaped model as JSON), who made it and its receipt.
CREATE TABLE consent_versions (
    consent_id TEXT NOT NULL REFERENCES consents(id),
    version BIGINT NOT NULL,
    event TEXT NOT NULL CHECK (event IN ('granted', 'changed', 'withdrawn')),
    body TEXT NOT NULL,
    performer_account_id TEXT NOT NULL,
    -- The representative's own patient id when someone acted for the patient.
    representative_patient_id TEXT,
    receipt TEXT NOT NULL,
    recorded_at BIGINT NOT NULL,
    PRIMARY KEY (consent_id, version)
);

-- Plain declines, so a recipient does not ask again too soon for the same thing.
CREATE TABLE consent_declines (
    patient_id TEXT NOT NULL,
    recipient TEXT NOT NULL,
    request_digest TEXT NOT NULL,
    declined_at BIGINT NOT NULL,
    PRIMARY KEY (patient_id, recipient, request_digest)
);

-- Acting for someone else: a parent for a dependent child (ends at the age of majority) or
-- a registered proxy (代理人, ends when revoked). Registered by operators after checking.
CREATE TABLE representations (
    id TEXT PRIMARY KEY,
    representative_patient_id TEXT NOT NULL,
    represented_patient_id TEXT NOT NULL REFERENCES patients(id),
    kind TEXT NOT NULL CHECK (kind IN ('parent-of-dependent', 'registered-proxy')),
    -- YYYY-MM-DD; needed for a dependent.
    represented_birth_date TEXT,
    status TEXT NOT NULL CHECK (status IN ('active', 'ended')),
    created_at BIGINT NOT NULL,
    ended_at BIGINT,
    end_reason TEXT
);
CREATE INDEX representations_by_representative
    ON representations (representative_patient_id, represented_patient_id);
