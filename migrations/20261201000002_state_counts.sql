-- Exact counts per state, without scanning the tables: `status` and
-- `/metrics` read a small table instead of counting millions of rows on every
-- scrape.
--
-- Statement-level triggers (one run per statement, not per row) append the
-- net change per state of each statement to `state_count_deltas`, in the
-- writer's own transaction, so the counts are exactly as visible as the rows
-- they count. Appending never contends (no row is updated, no index is
-- touched); `compact_state_counts()`, run by the worker every few seconds,
-- folds the deltas into `state_counts`. A reader sums both.
--   kind 'transfer': transfers.status;  'refund': transfers.refund_status
--   (NONE, "no refund", is not counted);  'event': outbox.state.

CREATE TABLE state_counts (
    kind  TEXT NOT NULL,
    state TEXT NOT NULL,
    n     BIGINT NOT NULL,
    PRIMARY KEY (kind, state)
);

CREATE TABLE state_count_deltas (
    kind  TEXT NOT NULL,
    state TEXT NOT NULL,
    delta BIGINT NOT NULL
);

CREATE FUNCTION count_transfer_states() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO state_count_deltas (kind, state, delta)
        SELECT kind, state, count(*) FROM (
            SELECT 'transfer' AS kind, status AS state FROM new_rows
            UNION ALL SELECT 'refund', refund_status FROM new_rows WHERE refund_status <> 'NONE'
        ) c GROUP BY kind, state;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO state_count_deltas (kind, state, delta)
        SELECT kind, state, sum(d) FROM (
            SELECT 'transfer' AS kind, status AS state, 1 AS d FROM new_rows
            UNION ALL SELECT 'transfer', status, -1 FROM old_rows
            UNION ALL SELECT 'refund', refund_status, 1 FROM new_rows WHERE refund_status <> 'NONE'
            UNION ALL SELECT 'refund', refund_status, -1 FROM old_rows WHERE refund_status <> 'NONE'
        ) c GROUP BY kind, state HAVING sum(d) <> 0;
    ELSE
        INSERT INTO state_count_deltas (kind, state, delta)
        SELECT kind, state, -count(*) FROM (
            SELECT 'transfer' AS kind, status AS state FROM old_rows
            UNION ALL SELECT 'refund', refund_status FROM old_rows WHERE refund_status <> 'NONE'
        ) c GROUP BY kind, state;
    END IF;
    RETURN NULL;
END
$$;

CREATE FUNCTION count_event_states() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO state_count_deltas (kind, state, delta)
        SELECT 'event', state, count(*) FROM new_rows GROUP BY state;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO state_count_deltas (kind, state, delta)
        SELECT 'event', state, sum(d) FROM (
            SELECT state, 1 AS d FROM new_rows
            UNION ALL SELECT state, -1 FROM old_rows
        ) c GROUP BY state HAVING sum(d) <> 0;
    ELSE
        INSERT INTO state_count_deltas (kind, state, delta)
        SELECT 'event', state, -count(*) FROM old_rows GROUP BY state;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER transfers_count_insert AFTER INSERT ON transfers
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION count_transfer_states();
CREATE TRIGGER transfers_count_update AFTER UPDATE ON transfers
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION count_transfer_states();
CREATE TRIGGER transfers_count_delete AFTER DELETE ON transfers
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION count_transfer_states();
CREATE TRIGGER outbox_count_insert AFTER INSERT ON outbox
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION count_event_states();
CREATE TRIGGER outbox_count_update AFTER UPDATE ON outbox
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION count_event_states();
CREATE TRIGGER outbox_count_delete AFTER DELETE ON outbox
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION count_event_states();

-- Folds the deltas into the totals. One compaction at a time (the others
-- return at once); a delta inserted meanwhile is left for the next one.
CREATE FUNCTION compact_state_counts() RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    folded bigint;
BEGIN
    IF NOT pg_try_advisory_xact_lock(hashtextextended('transfer-worker:compact-state-counts', 0)) THEN
        RETURN 0;
    END IF;
    WITH moved AS (
        DELETE FROM state_count_deltas RETURNING kind, state, delta
    ), sums AS (
        SELECT kind, state, sum(delta) AS d, count(*) AS rows FROM moved GROUP BY kind, state
    ), upserted AS (
        INSERT INTO state_counts (kind, state, n)
        SELECT kind, state, d FROM sums ORDER BY kind, state
        ON CONFLICT (kind, state) DO UPDATE SET n = state_counts.n + EXCLUDED.n
    )
    SELECT COALESCE(sum(rows), 0) INTO folded FROM sums;
    RETURN folded;
END
$$;

-- The counts as of now: totals plus what is not folded in yet.
CREATE VIEW current_state_counts AS
    SELECT kind, state, sum(n)::bigint AS n
      FROM (SELECT kind, state, n FROM state_counts
            UNION ALL SELECT kind, state, delta FROM state_count_deltas) c
     GROUP BY kind, state;
