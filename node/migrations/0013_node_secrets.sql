-- Secrets of the node's own that key what it derives, kept with the records they key
-- rather than derived from a key that may rotate: the pairwise secret ('pairwise') keys
-- the case and consent references its recipients know, request keys, audit pseudonyms
-- and the keys of terms confirmations, which must stay the same for as long as those
-- records exist. Each is sealed under the data key, bound to its name.
CREATE TABLE node_secrets (
    name TEXT PRIMARY KEY,
    sealed BLOB NOT NULL,
    created_at_ms INTEGER NOT NULL
);
