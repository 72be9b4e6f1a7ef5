-- Alerts raised by rules over the audit stream (and over facts such as certificate expiry).
-- `dedup_key` names one occurrence (rule, subject, occurrence window): the same occurrence
-- seen again updates `last_seen` instead of raising a second alert. Summaries are PHI-free.
-- Times are Unix milliseconds.
CREATE TABLE alerts (
    id TEXT PRIMARY KEY,
    rule TEXT NOT NULL,
    severity TEXT NOT NULL CHECK (severity IN ('warning', 'critical')),
    dedup_key TEXT NOT NULL UNIQUE,
    summary TEXT NOT NULL,
    first_seen BIGINT NOT NULL,
    last_seen BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    acknowledged_by TEXT,
    acknowledged_at BIGINT
);
CREATE INDEX alerts_by_time ON alerts (created_at);

-- How far the evaluator has read the audit log: the next tree index to read.
CREATE TABLE alert_cursor (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    next_tree_index BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

-- One signed webhook delivery of an alert to one operator endpoint, retried with backoff.
CREATE TABLE alert_deliveries (
    id TEXT PRIMARY KEY,
    alert_id TEXT NOT NULL REFERENCES alerts(id),
    url TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    lease_until BIGINT,
    last_error TEXT,
    created_at BIGINT NOT NULL,
    delivered_at BIGINT
);
CREATE INDEX alert_deliveries_due ON alert_deliveries (status, next_attempt_at);
