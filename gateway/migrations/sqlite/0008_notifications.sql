-- Signed notifications to recipients (webhooks): where each client wants them, and an
-- outbox written in the transaction of the change it announces, delivered with retries.

CREATE TABLE webhook_endpoints (
    client_id TEXT PRIMARY KEY REFERENCES oauth_clients(id),
    url TEXT NOT NULL,
    registered_by TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

-- `event`: consent-withdrawn, consent-expired, new-data, data-corrected. `body` is the
-- event's PHI-free JSON (opaque ids, category codes). Times are Unix milliseconds.
CREATE TABLE notifications (
    id TEXT PRIMARY KEY,
    client_id TEXT NOT NULL REFERENCES oauth_clients(id),
    patient_id TEXT NOT NULL,
    consent_id TEXT NOT NULL,
    event TEXT NOT NULL,
    body TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    lease_until BIGINT,
    last_error TEXT,
    created_at BIGINT NOT NULL,
    delivered_at BIGINT,
    acknowledged_at BIGINT
);
CREATE INDEX notifications_due ON notifications (status, next_attempt_at);
CREATE INDEX notifications_by_consent ON notifications (consent_id, event, status);
