-- The delivery loop looks only for queued items. Indexing every item by (state, due
-- time) kept all delivered, refused, expired and withdrawn items in that index forever,
-- and moved each delivered item from one end of it to the other. A partial index holds
-- only what is still queued: it stays small whatever the outbox's history, and an item
-- leaves it when it is delivered.
DROP INDEX IF EXISTS outbox_due;
CREATE INDEX outbox_due ON outbox(next_attempt_at_ms) WHERE state = 'queued';
