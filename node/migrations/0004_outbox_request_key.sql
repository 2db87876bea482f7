-- A caller's request id (per user) for a referral, so that a retried SendReferral answers
-- with the referral the first call queued instead of sending it twice.
ALTER TABLE outbox ADD COLUMN request_key TEXT;
CREATE UNIQUE INDEX outbox_by_request ON outbox(request_key) WHERE request_key IS NOT NULL;
