-- A keyed digest of what a request asked to send, kept with its request key, so that a
-- retry with the same request id asking for something else is refused rather than
-- answered with the first referral.
ALTER TABLE outbox ADD COLUMN request_digest BLOB;
