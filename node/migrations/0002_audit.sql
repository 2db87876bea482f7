-- The node's audit log: an append-only RFC 9162 Merkle tree of entries that hold no
-- personal data (see docs/audit-log.md), stored so that proofs need O(log n) reads.

-- Entries, the Merkle leaves, by index.
CREATE TABLE audit_entries (
    idx INTEGER PRIMARY KEY,
    entry BLOB NOT NULL,
    leaf_hash BLOB NOT NULL
);
CREATE INDEX audit_entries_by_leaf ON audit_entries(leaf_hash);

-- Every stored hash of the tree, by its stored-hash index (the numbering of Go's
-- golang.org/x/mod/sumdb/tlog): level-0 leaf hashes and every complete subtree above.
CREATE TABLE audit_hashes (
    id INTEGER PRIMARY KEY,
    hash BLOB NOT NULL
);

-- Checkpoints this node signed (C2SP signed notes). The node signs a new one only if it
-- is consistent with the last one here.
CREATE TABLE checkpoints (
    size INTEGER PRIMARY KEY,
    root BLOB NOT NULL,
    note TEXT NOT NULL,
    signed_at_ms INTEGER NOT NULL
);

-- Cosignatures witnesses gave our checkpoints (C2SP tlog-cosignature lines).
CREATE TABLE cosignatures (
    size INTEGER NOT NULL,
    witness TEXT NOT NULL,
    line TEXT NOT NULL,
    PRIMARY KEY (size, witness)
);

-- As a log: the size each witness last cosigned, to send it the right consistency proof.
CREATE TABLE witness_views (
    witness TEXT PRIMARY KEY,
    size INTEGER NOT NULL
);

-- As a witness: the latest checkpoint cosigned for each log (tlog-witness state).
CREATE TABLE witnessed_logs (
    origin TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    root BLOB NOT NULL,
    updated_at_ms INTEGER NOT NULL
);
