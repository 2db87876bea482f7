-- The free-text details of a consent (the guardian's basis, the language) are personal
-- data: they are stored sealed under the case's data key, and the plaintext columns stay
-- empty. Rows written before are sealed when the node starts.
ALTER TABLE consents ADD COLUMN details_sealed BLOB;
