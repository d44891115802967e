-- Several destinations (issue 19): each (event, destination) pair is a row
-- of its own with its own delivery state, attempts and last error.
--
-- An event is written once, with `destination` NULL ("not routed yet"):
-- its writers (the worker, `cancel`, `refund`, a producer's own
-- transaction) know nothing of routes. The relay of a destination claims
-- the unrouted events its route matches and, in the same statement, sets
-- their destination to its own and inserts one copy per other matching
-- destination (same event_id, body and times; `event_seq` = the original's
-- id). Per (transfer, destination), events go out in `COALESCE(event_seq,
-- id)` order: a copy keeps its original's place although its id is newer.
-- An event no route takes is recorded with destination '' and marked
-- published (nothing to deliver; not an error).
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS destination TEXT NULL;
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS event_seq BIGINT NULL;

-- One row per (event, destination): the event_id alone is no longer unique.
CREATE UNIQUE INDEX IF NOT EXISTS outbox_event_destination_key
    ON outbox (event_id, (COALESCE(destination, '')));
ALTER TABLE outbox DROP CONSTRAINT IF EXISTS outbox_event_id_unique;

-- Each destination's claim walks its own pending rows, and the unrouted
-- ones, in id order, each from an index of its own: another destination's
-- backlog (an outage there) is never walked. The index of all pending
-- events goes: a claim with statistics from before a backlog took it for
-- the cheapest way to its own rows, and walked every other destination's.
CREATE INDEX IF NOT EXISTS outbox_unrouted_idx
    ON outbox (id) WHERE state = 'pending' AND destination IS NULL;
CREATE INDEX IF NOT EXISTS outbox_pending_by_destination_idx
    ON outbox (destination, id) WHERE state = 'pending' AND destination IS NOT NULL;
DROP INDEX IF EXISTS outbox_pending_idx;

-- The counts per state, per destination: kind 'event' for unrouted events,
-- 'event@<destination>' for routed ones (the totals are their sums).
CREATE OR REPLACE FUNCTION count_event_states() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO state_count_deltas (kind, state, delta)
        SELECT k, state, count(*)
          FROM (SELECT COALESCE('event@' || destination, 'event') AS k, state FROM new_rows) r
         GROUP BY k, state;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO state_count_deltas (kind, state, delta)
        SELECT k, state, sum(d) FROM (
            SELECT COALESCE('event@' || destination, 'event') AS k, state, 1 AS d FROM new_rows
            UNION ALL SELECT COALESCE('event@' || destination, 'event'), state, -1 FROM old_rows
        ) c GROUP BY k, state HAVING sum(d) <> 0;
    ELSE
        INSERT INTO state_count_deltas (kind, state, delta)
        SELECT k, state, -count(*)
          FROM (SELECT COALESCE('event@' || destination, 'event') AS k, state FROM old_rows) r
         GROUP BY k, state;
    END IF;
    RETURN NULL;
END
$$;
