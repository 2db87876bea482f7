-- What a referral disclosed, and which narrowing a narrowing envelope carries out.
--
-- fields: for a referral, the names of the fields it discloses, space-separated (NULL for
-- referrals queued before this column existed; cut once a narrowing's purge receipt is
-- verified, empty once one purged it): a narrowing tells the recipient which of them it
-- may keep. For a consent-narrowing envelope (kind 3), what it asks (`id=field,field` or
-- `id=` per referral), so that a renewal asks the same.
-- narrowed_at_ms: for a consent-narrowing envelope, the consent's narrowed_at_ms it
-- carries out, so that each narrowing asks each recipient once.
ALTER TABLE outbox ADD COLUMN fields TEXT;
ALTER TABLE outbox ADD COLUMN narrowed_at_ms INTEGER;

-- Consents other orgs narrowed, as far as this node carried the narrowing out: a referral
-- under one of them sealed at or before its narrowing (the sender cancelled it, but it was
-- on its way) is refused when it arrives, as it would carry what was taken back.
CREATE TABLE narrowed_consents (
    sender TEXT NOT NULL,
    consent_id TEXT NOT NULL,
    narrowed_at_ms INTEGER NOT NULL,
    PRIMARY KEY (sender, consent_id)
);
