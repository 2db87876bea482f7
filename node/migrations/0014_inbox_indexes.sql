-- Whether any stored referral still needs a received case's data key is looked up by
-- key each time referrals are deleted (purges, narrowings, retention) or a key made for
-- a refused referral is dropped: by this index, not a pass over the inbox.
CREATE INDEX inbox_by_case_key ON inbox(case_key_id);

-- The inbox is listed newest first, a page at a time, each page starting after the
-- last one's (received_at_ms, message_id).
CREATE INDEX inbox_by_arrival ON inbox(received_at_ms, message_id);
