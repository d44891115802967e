-- Room on each outbox page for the relay's lease (`claimed_until`) to be
-- written as a HOT update: no new index entries for a column no index
-- holds. Applies to pages written from now on; nothing is rewritten.
ALTER TABLE outbox SET (fillfactor = 70);
