-- terms_narrowed_at_ms: the narrowed_at_ms of the last narrowing of a consent that
-- changed its restrictions or expiry, which every recipient holding data under it is told
-- of (NULL: none did since this was recorded).
ALTER TABLE consents ADD COLUMN terms_narrowed_at_ms INTEGER;

-- The terms (restrictions and expiry) of a consent another org narrowed, as its
-- narrowings restated them: they bind this node for every referral it holds under the
-- consent, beside what each referral's consent receipt states. Space-separated country
-- codes. NULL where no narrowing stated them (a sender that predates them), and cleared
-- once this node holds nothing under the consent any more.
ALTER TABLE narrowed_consents ADD COLUMN excluded_countries TEXT;
ALTER TABLE narrowed_consents ADD COLUMN no_family_contact INTEGER;
ALTER TABLE narrowed_consents ADD COLUMN expires_at_ms INTEGER;
