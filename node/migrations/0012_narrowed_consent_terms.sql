-- terms_narrowed_at_ms: the narrowed_at_ms of the last narrowing of a consent that
-- changed its restrictions or expiry. Every recipient holding data under the consent
-- that no narrowing since has told is told of them (NULL: none did since this was
-- recorded).
ALTER TABLE consents ADD COLUMN terms_narrowed_at_ms INTEGER;

-- The terms (restrictions and expiry) of a consent another org narrowed, as its
-- narrowings restated them, which bind this node for every referral it holds under the
-- consent beside what each referral's consent receipt states: a protobuf ConsentTerms
-- sealed under the data key of case terms_case_key_id (the case of the referrals held
-- under it), since restrictions say something of the person. NULL where no narrowing
-- restated them (a sender that predates them), and cleared once this node holds nothing
-- under the consent any more.
ALTER TABLE narrowed_consents ADD COLUMN terms_sealed BLOB;
ALTER TABLE narrowed_consents ADD COLUMN terms_case_key_id TEXT;
