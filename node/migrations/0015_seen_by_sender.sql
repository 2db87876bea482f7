-- A recipient remembers envelopes by sender and message id, not by message id alone. A
-- member that learnt another member's message id before its delivery (from the sender's
-- audit log, say) could otherwise send an envelope of its own under that id first and
-- have the real one refused as a reused id. Both tables are rebuilt with the pair as
-- their key, message id first: ids begin with their creation time, so new rows go to
-- the right edge of the key's B-tree, and the local API, which names a received referral
-- by its message id, finds it by the key's prefix. Seen envelopes are looked up only by
-- that key, so their table is the key's B-tree itself (WITHOUT ROWID): one B-tree to
-- write per envelope instead of two. The inbox keeps its row ids, the order it is
-- listed in, so page tokens stay valid.
CREATE TABLE seen_messages_by_sender (
    sender TEXT NOT NULL,
    message_id BLOB NOT NULL,
    envelope_digest BLOB NOT NULL,
    response BLOB NOT NULL,
    received_at_ms INTEGER NOT NULL,
    PRIMARY KEY (message_id, sender)
) WITHOUT ROWID;
INSERT INTO seen_messages_by_sender
        (sender, message_id, envelope_digest, response, received_at_ms)
    SELECT sender, message_id, envelope_digest, response, received_at_ms FROM seen_messages;

CREATE TABLE inbox_by_sender (
    sender TEXT NOT NULL,
    message_id BLOB NOT NULL,
    purpose TEXT NOT NULL,
    case_ref TEXT NOT NULL,
    case_key_id TEXT NOT NULL REFERENCES case_keys(id),
    consent_id TEXT NOT NULL,
    consent_expires_at_ms INTEGER NOT NULL,
    payload_sealed BLOB NOT NULL,
    received_at_ms INTEGER NOT NULL,
    retain_until_ms INTEGER NOT NULL,
    PRIMARY KEY (message_id, sender),
    FOREIGN KEY (message_id, sender) REFERENCES seen_messages_by_sender(message_id, sender)
);
INSERT INTO inbox_by_sender
        (rowid, sender, message_id, purpose, case_ref, case_key_id, consent_id,
         consent_expires_at_ms, payload_sealed, received_at_ms, retain_until_ms)
    SELECT rowid, sender, message_id, purpose, case_ref, case_key_id, consent_id,
           consent_expires_at_ms, payload_sealed, received_at_ms, retain_until_ms
    FROM inbox;

DROP TABLE inbox;
DROP TABLE seen_messages;
ALTER TABLE seen_messages_by_sender RENAME TO seen_messages;
ALTER TABLE inbox_by_sender RENAME TO inbox;
CREATE INDEX inbox_by_consent ON inbox(sender, consent_id);
CREATE INDEX inbox_retention ON inbox(retain_until_ms);
CREATE INDEX inbox_by_case_key ON inbox(case_key_id);
