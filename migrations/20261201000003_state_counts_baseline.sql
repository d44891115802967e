-- The counts of the rows written before the counting triggers existed, in
-- a separate migration so that no lock is held while the tables are counted
-- (the triggers, created and committed by the previous migration, already
-- record every later write as a delta). One statement, one snapshot: the rows
-- it sees were written either before the triggers (not in any delta) or after
-- (each in a delta visible in the same snapshot), so the baseline is the
-- table's count minus the visible deltas, and baseline + all deltas is exact.
INSERT INTO state_counts (kind, state, n)
SELECT kind, state, sum(n) FROM (
    SELECT 'transfer' AS kind, status AS state, count(*) AS n FROM transfers GROUP BY status
    UNION ALL SELECT 'refund', refund_status, count(*) FROM transfers WHERE refund_status <> 'NONE' GROUP BY refund_status
    UNION ALL SELECT 'event', state, count(*) FROM outbox GROUP BY state
    UNION ALL SELECT kind, state, -sum(delta) FROM state_count_deltas GROUP BY kind, state
) c
GROUP BY kind, state
ON CONFLICT (kind, state) DO UPDATE SET n = state_counts.n + EXCLUDED.n;
