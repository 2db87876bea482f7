-- Appends to the audit log touch only the right edge of its two rowid tables; an index
-- on leaf hashes made every append a random write into a B-tree as large as the log (the
-- append rate fell by more than half at a million entries). Entries are named by index:
-- receipts carry it, and a proof request that also gives a leaf hash is checked against
-- the entry at that index.
DROP INDEX IF EXISTS audit_entries_by_leaf;
