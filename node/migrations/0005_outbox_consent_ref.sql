-- The id under which the recipient knows the consent an envelope travels under: each
-- recipient gets its own (see shared/src/caseref.rs), so that recipients cannot link
-- their records through a shared consent id. Envelopes queued before this migration
-- carried the consent's own id, and a withdrawal must name what the recipient holds.
ALTER TABLE outbox ADD COLUMN consent_ref TEXT NOT NULL DEFAULT '';
UPDATE outbox SET consent_ref = consent_id;
