-- What a referral disclosed, and which narrowing a narrowing notice carries out.
-- fields: the referral's field names, space-separated (NULL for referrals queued before
-- this column existed): a narrowing tells the recipient which of them it may keep.
-- narrowed_at_ms: for a consent-narrowing envelope (kind 3), the consent's narrowed_at_ms
-- it was sent for, so that each narrowing asks each recipient once.
ALTER TABLE outbox ADD COLUMN fields TEXT;
ALTER TABLE outbox ADD COLUMN narrowed_at_ms INTEGER;
