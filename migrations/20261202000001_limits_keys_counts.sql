-- Guarantees that survive what other people's systems do (issue 14):
--
-- 1. Daily limits that cannot be sidestepped. What left an account by
--    transfer on the current UTC day is kept on the account's own row, for
--    every account (with a limit or not), by the same UPDATE that moves its
--    balance, under the row lock every writer of that account takes. So a
--    limit set later in the day (by the CLI or by SQL) counts everything the
--    account sent that day, and no pruning can lose a total a check needs.
--    A transfer counts on the UTC day the worker applies it. `daily_spent`
--    (the per-day totals of limited accounts) is no longer written or read;
--    it stays until a later release so that a replica of the previous version
--    still running during a rolling deploy does not fail.
--    Both columns are nullable or have a constant default: no rewrite.
ALTER TABLE accounts ADD COLUMN IF NOT EXISTS spent_day DATE NULL;
ALTER TABLE accounts ADD COLUMN IF NOT EXISTS spent_today BIGINT NOT NULL DEFAULT 0;

-- 2. Idempotency keys that outlive pruning. When `prune --transfers-older-than`
--    deletes a finished transfer, its key, id, parameters and final states
--    move here, and stay for the keys' own retention window (`prune
--    --keys-older-than`, default 90 days, never shorter than the transfers').
--    A retry inside it gets the original answer from the CLI and library;
--    a plain SQL INSERT of such a key is refused by the trigger below with a
--    unique violation naming `transfers_idempotency_key_retired`, as the unique
--    constraint refuses a key still in `transfers`.
CREATE TABLE IF NOT EXISTS retired_keys (
    idempotency_key TEXT PRIMARY KEY,
    transfer_id     BIGINT NOT NULL,
    from_account    BIGINT NOT NULL,
    to_account      BIGINT NOT NULL,
    amount          BIGINT NOT NULL,
    status          TEXT NOT NULL,
    refund_status   TEXT NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL,
    retired_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS retired_keys_created_idx ON retired_keys (created_at);

-- One check per INSERT statement, not per row: a bulk insert of 100,000
-- transfers costs one join against a table that is usually empty.
CREATE FUNCTION refuse_retired_keys() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    k TEXT;
    t BIGINT;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM retired_keys) THEN
        RETURN NULL;
    END IF;
    SELECT n.idempotency_key, r.transfer_id INTO k, t
      FROM new_rows n JOIN retired_keys r USING (idempotency_key) LIMIT 1;
    IF k IS NOT NULL THEN
        RAISE EXCEPTION 'idempotency key % was used by transfer %, since pruned', k, t
            USING ERRCODE = 'unique_violation', CONSTRAINT = 'transfers_idempotency_key_retired',
                  TABLE = 'transfers', SCHEMA = current_schema();
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER transfers_refuse_retired_keys AFTER INSERT ON transfers
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION refuse_retired_keys();

-- 3. Counts that follow a TRUNCATE: the counting triggers see rows deleted
--    one by one, not a TRUNCATE; this one forgets the counts of the states
--    of the truncated table (under the compaction's lock, so a compaction in
--    flight cannot fold old deltas back in afterwards).
CREATE FUNCTION forget_state_counts() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    kinds TEXT[] := CASE TG_TABLE_NAME WHEN 'transfers' THEN ARRAY['transfer', 'refund'] ELSE ARRAY['event'] END;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('transfer-worker:compact-state-counts', 0));
    DELETE FROM state_count_deltas WHERE kind = ANY(kinds);
    DELETE FROM state_counts WHERE kind = ANY(kinds);
    RETURN NULL;
END
$$;
CREATE TRIGGER transfers_count_truncate AFTER TRUNCATE ON transfers
    FOR EACH STATEMENT EXECUTE FUNCTION forget_state_counts();
CREATE TRIGGER outbox_count_truncate AFTER TRUNCATE ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION forget_state_counts();

-- 4. A SQL producer's traceparent is held to exactly what the CLI accepts
--    (W3C Trace Context: version ff is invalid, and so are all-zero trace or
--    parent ids). Added unvalidated here; the next migration clears the
--    values that break it (they were never valid context) and validates it.
ALTER TABLE transfers ADD CONSTRAINT transfers_traceparent_w3c CHECK (
    traceparent IS NULL OR (
        traceparent ~ '^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$'
        AND left(traceparent, 2) <> 'ff'
        AND substr(traceparent, 4, 32) <> repeat('0', 32)
        AND substr(traceparent, 37, 16) <> repeat('0', 16))) NOT VALID;
