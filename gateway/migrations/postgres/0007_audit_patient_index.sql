-- Whose data each audit leaf concerns (the AuditEvent's patient entity, an opaque id), so
-- a patient's access log is read without scanning every leaf. A column beside the leaf, not
-- in it: the hashed bytes are unchanged.
ALTER TABLE audit_leaves ADD COLUMN patient_id TEXT;

-- Leaves written before this column: the patient entity is always the first entity.
UPDATE audit_leaves
SET patient_id = substr(convert_from(body, 'UTF8')::jsonb #>> '{entity,0,what,reference}', 9)
WHERE convert_from(body, 'UTF8')::jsonb #>> '{entity,0,role,code}' = '1'
  AND convert_from(body, 'UTF8')::jsonb #>> '{entity,0,what,reference}' LIKE 'Patient/%';

CREATE INDEX audit_leaves_by_patient ON audit_leaves (patient_id, recorded_at);
