-- Which key-encryption key wrapped each data key (`file:…`, `pkcs11:…`), so a rotation in
-- progress or a restored backup wrapped by another KEK shows as such. NULL: wrapped before
-- ids were recorded (by the KEK in force then).
ALTER TABLE data_keys ADD COLUMN kek_id TEXT;
