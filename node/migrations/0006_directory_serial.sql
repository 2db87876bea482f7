-- The highest directory serial this node has accepted: an older directory (which may
-- still list a member since removed) is refused at start.
CREATE TABLE directory_state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    serial INTEGER NOT NULL
);
