-- The relay's index of events waiting to be sent holds pending events only
-- (it held every unpublished one, dead ones included). With dead events in
-- it, `state = 'dead'` implied its predicate, so a lookup of dead events
-- (`status`, `/metrics`, the console) could be planned on it and walk a whole
-- backlog: with statistics from before an outage it looks as small as the
-- dead index. Now `state = 'dead'` matches only outbox_dead_idx, and the
-- relay's "earlier unpublished event of this transfer" check
-- (`state <> 'published'`) only outbox_transfer_idx.
-- Not CONCURRENTLY, as outbox_dead_idx: a concurrent build would wait for a
-- second replica's `migrate` waiting on sqlx's migration lock. The index is
-- partial (pending rows only): one read of the table, a small write.
CREATE INDEX IF NOT EXISTS outbox_pending_idx ON outbox (id) WHERE state = 'pending';
DROP INDEX IF EXISTS outbox_unpublished_idx;
