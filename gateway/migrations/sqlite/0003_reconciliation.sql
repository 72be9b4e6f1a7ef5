-- Reconciliation across sources: the keys under which a record was recognised. `match_key`
-- is a digest, never the clinical values themselves: of a dispensing's day, institution and
-- drug code (kind 'clinical'), or of the record's identity at its source (kind 'origin', so
-- a correction finds the resource even when it changes the day or the code). `target` is
-- the `source_resource_id` of the one stored resource under the reconciled source.
CREATE TABLE reconciliation_keys (
    patient_id TEXT NOT NULL,
    match_key TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('origin', 'clinical')),
    target TEXT NOT NULL,
    origin_source TEXT NOT NULL,
    PRIMARY KEY (patient_id, match_key)
);
CREATE INDEX reconciliation_keys_by_target ON reconciliation_keys (patient_id, target);
