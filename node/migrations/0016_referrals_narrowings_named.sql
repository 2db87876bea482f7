-- Referrals a narrowing named that this node did not hold when it carried the narrowing
-- out: they were on their way. Each is refused when it arrives, whatever its sealing
-- time says. The sealing time alone decides only while the sender's clock does not step
-- back: a referral sealed before a narrowing, on a clock that has since stepped back by
-- more than envelopes are stamped around, carries a later time than the narrowing, and
-- would otherwise be stored whole, with the fields the narrowing took away. Kept until
-- the referral can no longer arrive: its id begins with its creation time on the same
-- clock as its expiry, which comes at most 30 days later; and for ids that do not (made
-- by senders before ids began with it), for as long after the narrowing (named_at_ms,
-- this node's clock).
CREATE TABLE narrowed_referrals (
    message_id BLOB NOT NULL,
    sender TEXT NOT NULL,
    named_at_ms INTEGER NOT NULL,
    PRIMARY KEY (message_id, sender)
) WITHOUT ROWID;
