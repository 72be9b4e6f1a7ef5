-- Audit shipping: how far the leaves and signed checkpoints have been copied to the
-- write-once sink. One row; the leaves not yet shipped stay in audit_leaves, which is the
-- buffer while the sink is down. Times are Unix milliseconds.
CREATE TABLE audit_shipping (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    -- Leaves with tree_index below this are in the sink.
    shipped_leaves BIGINT NOT NULL DEFAULT 0,
    -- Largest checkpoint tree size in the sink (0: none yet).
    shipped_checkpoint_size BIGINT NOT NULL DEFAULT 0,
    last_success_at BIGINT,
    last_failure_at BIGINT,
    last_error TEXT,
    -- 1 while shipping fails: the failure and the recovery are each audited once.
    failing BIGINT NOT NULL DEFAULT 0,
    failing_since BIGINT
);
INSERT INTO audit_shipping (id) VALUES (1);
