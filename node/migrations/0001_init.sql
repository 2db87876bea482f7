-- Corridor node schema, version 1. Times are milliseconds since the Unix epoch.
-- Personal data is stored only encrypted under a per-case data key (case_keys), which
-- is stored only wrapped by the node's key-encryption key. Deleting a case_keys row
-- shreds everything encrypted under it.

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

-- Per-case data keys. id is a local case id, or "in:<sender>:<case_ref>" for a case
-- received from another org.
CREATE TABLE case_keys (
    id TEXT PRIMARY KEY,
    wrapped_key BLOB NOT NULL,
    created_at_ms INTEGER NOT NULL
);

-- Cases this node's caseworkers hold. The label is encrypted under the case key.
CREATE TABLE cases (
    id TEXT PRIMARY KEY REFERENCES case_keys(id),
    label_sealed BLOB NOT NULL,
    created_by INTEGER NOT NULL REFERENCES users(id),
    created_at_ms INTEGER NOT NULL
);

-- Consents recorded for cases. List columns are space-separated.
CREATE TABLE consents (
    id TEXT PRIMARY KEY,
    case_id TEXT NOT NULL REFERENCES cases(id),
    given_by TEXT NOT NULL,
    guardian_basis TEXT NOT NULL,
    method TEXT NOT NULL,
    language TEXT NOT NULL,
    recorded_by INTEGER NOT NULL REFERENCES users(id),
    recorded_at_ms INTEGER NOT NULL,
    purposes TEXT NOT NULL,
    recipient_orgs TEXT NOT NULL,
    recipient_roles TEXT NOT NULL,
    fields TEXT NOT NULL,
    excluded_countries TEXT NOT NULL,
    no_family_contact INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    withdrawn_at_ms INTEGER,
    narrowed_at_ms INTEGER
);
CREATE INDEX consents_by_case ON consents(case_id);

-- Sealed, signed envelopes waiting for (or done with) delivery. kind: 1 referral,
-- 2 consent withdrawal. state: queued | delivered | refused | expired | withdrawn.
-- The sealed envelope is dropped once delivered; its digest stays.
CREATE TABLE outbox (
    message_id BLOB PRIMARY KEY,
    kind INTEGER NOT NULL,
    case_id TEXT NOT NULL REFERENCES cases(id),
    consent_id TEXT NOT NULL REFERENCES consents(id),
    recipient TEXT NOT NULL,
    purpose TEXT NOT NULL,
    case_ref TEXT NOT NULL,
    envelope BLOB,
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
CREATE INDEX outbox_by_consent ON outbox(consent_id, kind);

-- Verified answers for what this node sent: the delivery receipt and, for a
-- withdrawal, the purge receipt (protobuf corridor.v1.Receipt / PurgeReceipt).
CREATE TABLE receipts (
    message_id BLOB PRIMARY KEY REFERENCES outbox(message_id),
    receipt BLOB NOT NULL,
    purge_receipt BLOB,
    verified_at_ms INTEGER NOT NULL
);

-- Every envelope this node accepted, with the answer it gave (protobuf
-- corridor.v1.DeliverResponse). Kept after data is purged so that a replay gets the
-- same answer and is never processed twice.
CREATE TABLE seen_messages (
    message_id BLOB PRIMARY KEY,
    sender TEXT NOT NULL,
    envelope_digest BLOB NOT NULL,
    response BLOB NOT NULL,
    received_at_ms INTEGER NOT NULL
);

-- Referrals received. The payload (protobuf corridor.v1.ReferralPayload) is encrypted
-- under the data key of the received case.
CREATE TABLE inbox (
    message_id BLOB PRIMARY KEY REFERENCES seen_messages(message_id),
    sender TEXT NOT NULL,
    purpose TEXT NOT NULL,
    case_ref TEXT NOT NULL,
    case_key_id TEXT NOT NULL REFERENCES case_keys(id),
    consent_id TEXT NOT NULL,
    consent_expires_at_ms INTEGER NOT NULL,
    payload_sealed BLOB NOT NULL,
    received_at_ms INTEGER NOT NULL,
    retain_until_ms INTEGER NOT NULL
);
CREATE INDEX inbox_by_consent ON inbox(sender, consent_id);
CREATE INDEX inbox_retention ON inbox(retain_until_ms);

-- Consents other orgs withdrew: referrals arriving later under them are refused.
CREATE TABLE withdrawn_consents (
    sender TEXT NOT NULL,
    consent_id TEXT NOT NULL,
    withdrawn_at_ms INTEGER NOT NULL,
    PRIMARY KEY (sender, consent_id)
);
