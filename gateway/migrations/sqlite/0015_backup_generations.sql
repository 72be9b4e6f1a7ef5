-- Each restore of a backup generation into scratch (`restore --verify`, `backup drill`):
-- which generation, when, whether everything verified, and how long the restore took.
-- Times are Unix milliseconds. A generation counts as verified-good while its latest
-- verification passed and retention has not deleted it.
CREATE TABLE backup_verifications (
    id TEXT PRIMARY KEY,
    generation TEXT NOT NULL,
    verified_at BIGINT NOT NULL,
    result TEXT NOT NULL CHECK (result IN ('ok', 'failed')),
    -- What failed (PHI-free: the kind of damage).
    detail TEXT,
    restore_millis BIGINT NOT NULL,
    source TEXT NOT NULL CHECK (source IN ('restore', 'drill')),
    -- One `restore --verify` or one drill (which checks two generations).
    run TEXT NOT NULL
);
CREATE INDEX backup_verifications_by_generation ON backup_verifications (generation, verified_at);
CREATE INDEX backup_verifications_by_time ON backup_verifications (verified_at);

-- Generations retention deleted from their store.
CREATE TABLE backup_pruned (
    generation TEXT PRIMARY KEY,
    pruned_at BIGINT NOT NULL
);
