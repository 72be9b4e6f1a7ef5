-- The erasure ledger: each data key the key store shredded (a patient's erasure, an export
-- file's key), and when. It lives in the main database, apart from the key store, so that a
-- key store restored from an older backup has every later erasure applied again before the
-- gateway serves: a restore never brings a shredded key back. Times are Unix ms.
CREATE TABLE erased_data_keys (
    key_id TEXT PRIMARY KEY,
    erased_at BIGINT NOT NULL
);
