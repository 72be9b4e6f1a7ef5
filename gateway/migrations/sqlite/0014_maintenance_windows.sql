-- Remote maintenance: a window one operator requests (why, which ticket, when) and another
-- approves; maintenance access exists only inside it, every request in it is recorded, and
-- a report for the institution is kept when it closes. Times are Unix ms.
CREATE TABLE maintenance_windows (
    id TEXT PRIMARY KEY,
    requested_by TEXT NOT NULL REFERENCES accounts(id),
    requested_at BIGINT NOT NULL,
    reason TEXT NOT NULL,
    ticket TEXT NOT NULL,
    starts_at BIGINT NOT NULL,
    ends_at BIGINT NOT NULL,
    -- Reading many patients' data at once needs its own justification and approval.
    bulk_phi_requested BIGINT NOT NULL DEFAULT 0,
    bulk_phi_justification TEXT,
    bulk_phi_allowed BIGINT NOT NULL DEFAULT 0,
    -- SHA-256 (hex) of the client certificate the window is bound to, if any.
    client_cert_sha256 TEXT,
    status TEXT NOT NULL CHECK (status IN ('requested', 'approved', 'rejected', 'cancelled', 'closed')),
    decided_by TEXT REFERENCES accounts(id),
    decided_at BIGINT,
    decision_note TEXT,
    closed_at BIGINT,
    -- The report for the institution (JSON), frozen when the window closes.
    report TEXT
);
CREATE INDEX maintenance_windows_by_end ON maintenance_windows (status, ends_at);

-- Every request made in a window, refused ones too, with the patients whose data it read.
CREATE TABLE maintenance_actions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    window_id TEXT NOT NULL REFERENCES maintenance_windows(id),
    at BIGINT NOT NULL,
    account_id TEXT NOT NULL REFERENCES accounts(id),
    session_id TEXT NOT NULL,
    action TEXT NOT NULL,
    outcome TEXT NOT NULL CHECK (outcome IN ('done', 'refused')),
    -- Space-separated opaque patient ids; empty when no patient's data was read.
    patients TEXT NOT NULL DEFAULT ''
);
CREATE INDEX maintenance_actions_by_window ON maintenance_actions (window_id, id);
