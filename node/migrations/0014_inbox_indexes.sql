-- Whether any stored referral still needs a received case's data key is looked up by
-- key each time referrals are deleted (purges, narrowings, retention) or a key made for
-- a refused referral is dropped: by this index, not a pass over the inbox, payloads and
-- all.
CREATE INDEX inbox_by_case_key ON inbox(case_key_id);
