-- Dead events, for `held` and the operator's list: few, and found without
-- walking the (possibly long) list of pending ones.
-- Not CONCURRENTLY: a concurrent index build waits for every older
-- transaction, including a second `transfer-worker migrate` waiting on
-- sqlx's migration lock, which deadlocks two replicas migrating at once.
-- The index is partial (dead rows only), so the build is one read of the
-- table and a tiny write.
CREATE INDEX IF NOT EXISTS outbox_dead_idx ON outbox (transfer_id, id) WHERE state = 'dead';
