-- Corridor node schema, version 1. Times are milliseconds since the Unix epoch.

-- Local users of the caseworker API and their bearer tokens (stored as SHA-256).
CREATE TABLE users (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    role TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL
);

CREATE TABLE tokens (
    token_hash BLOB PRIMARY KEY,
    user_id INTEGER NOT NULL REFERENCES users(id),
    created_at_ms INTEGER NOT NULL,
    revoked_at_ms INTEGER
);

-- Cases this node's caseworkers hold.
CREATE TABLE cases (
    id TEXT PRIMARY KEY,
    label TEXT NOT NULL,
    created_by INTEGER NOT NULL REFERENCES users(id),
    created_at_ms INTEGER NOT NULL
);

-- Consents recorded for cases. recipients and purposes are space-separated lists.
CREATE TABLE consents (
    id TEXT PRIMARY KEY,
    case_id TEXT NOT NULL REFERENCES cases(id),
    recipients TEXT NOT NULL,
    purposes TEXT NOT NULL,
    given_by TEXT NOT NULL,
    method TEXT NOT NULL,
    recorded_by INTEGER NOT NULL REFERENCES users(id),
    recorded_at_ms INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    withdrawn_at_ms INTEGER
);
CREATE INDEX consents_by_case ON consents(case_id);

-- Sealed, signed envelopes waiting for (or done with) delivery.
-- state: queued | delivered | refused | expired
CREATE TABLE outbox (
    message_id BLOB PRIMARY KEY,
    case_id TEXT NOT NULL REFERENCES cases(id),
    consent_id TEXT NOT NULL REFERENCES consents(id),
    recipient TEXT NOT NULL,
    purpose TEXT NOT NULL,
    envelope BLOB NOT NULL,
    envelope_digest BLOB NOT NULL,
    created_by INTEGER NOT NULL REFERENCES users(id),
    created_at_ms INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at_ms INTEGER NOT NULL,
    last_error TEXT,
    delivered_at_ms INTEGER
);
CREATE INDEX outbox_due ON outbox(state, next_attempt_at_ms);

-- Verified receipts for what this node sent (protobuf corridor.v1.Receipt).
CREATE TABLE receipts (
    message_id BLOB PRIMARY KEY REFERENCES outbox(message_id),
    receipt BLOB NOT NULL,
    verified_at_ms INTEGER NOT NULL
);

-- Every envelope this node accepted, with the receipt it answered. Kept after the
-- payload is purged so that a replay is answered with the same receipt and never
-- processed twice.
CREATE TABLE seen_messages (
    message_id BLOB PRIMARY KEY,
    sender TEXT NOT NULL,
    envelope_digest BLOB NOT NULL,
    receipt BLOB NOT NULL,
    received_at_ms INTEGER NOT NULL
);

-- Referrals received (payload: protobuf corridor.v1.ReferralPayload).
CREATE TABLE inbox (
    message_id BLOB PRIMARY KEY REFERENCES seen_messages(message_id),
    sender TEXT NOT NULL,
    purpose TEXT NOT NULL,
    case_ref TEXT NOT NULL,
    payload BLOB NOT NULL,
    received_at_ms INTEGER NOT NULL
);
