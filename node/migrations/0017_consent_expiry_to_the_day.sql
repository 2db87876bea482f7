-- A consent's expiry is kept to the start of its UTC day: every recipient of a referral
-- reads it in the consent receipt, and to the millisecond it is a value unique to the
-- person by which recipients could match the records that pairwise references keep
-- apart. Consents recorded before that rule kept theirs to the millisecond, and went on
-- sending it; they are rounded down here, which only shortens what the person agreed to,
-- by less than a day. (No audit entry names an expiry.)
UPDATE consents SET expires_at_ms = expires_at_ms - (expires_at_ms % 86400000)
    WHERE expires_at_ms % 86400000 <> 0;
