-- SHA-256 of the directory file this node accepted at `serial`: a directory of the same
-- serial with other content is refused, so that members cannot come to run different
-- directories under one serial. NULL for a serial accepted before this column existed.
ALTER TABLE directory_state ADD COLUMN digest BLOB;
