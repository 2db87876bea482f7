-- The fields narrowings of a consent have taken away, space-separated: a referral sent
-- before its fields were recorded (outbox.fields NULL) is kept whole by a narrowing, and
-- may carry one of these only if its purpose allows one. NULL where not known: a consent
-- never narrowed, or narrowed before this column existed (then any field its purposes
-- allow and it no longer covers counts).
ALTER TABLE consents ADD COLUMN removed_fields TEXT;
