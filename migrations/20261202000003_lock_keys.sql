-- Advisory-lock keys computable in plain SQL, equal to the library's
--    (`concurrency::advisory::hash_key`): the first 8 bytes of SHA-256 over
--    `<byte length of namespace>:<namespace><key>` (UTF-8), as a bigint. A SQL
--    producer takes a request guard with
--    `SELECT pg_advisory_xact_lock(transfer_worker_lock_key('guard', 'user-42:purchase'))`.
CREATE FUNCTION transfer_worker_lock_key(namespace TEXT, key TEXT) RETURNS BIGINT
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT ('x' || left(encode(sha256(
               convert_to(octet_length(convert_to(namespace, 'UTF8')) || ':' || namespace || key, 'UTF8')),
           'hex'), 16))::bit(64)::bigint
$$;

-- The state counters' compaction and its TRUNCATE reset serialize on a key
-- of that function too (one key scheme for every lock of ours).
CREATE OR REPLACE FUNCTION compact_state_counts() RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    folded bigint;
BEGIN
    IF NOT pg_try_advisory_xact_lock(transfer_worker_lock_key('transfer-worker', 'compact-state-counts')) THEN
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

CREATE OR REPLACE FUNCTION forget_state_counts() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    kinds TEXT[] := CASE TG_TABLE_NAME WHEN 'transfers' THEN ARRAY['transfer', 'refund'] ELSE ARRAY['event'] END;
BEGIN
    PERFORM pg_advisory_xact_lock(transfer_worker_lock_key('transfer-worker', 'compact-state-counts'));
    DELETE FROM state_count_deltas WHERE kind = ANY(kinds);
    DELETE FROM state_counts WHERE kind = ANY(kinds);
    RETURN NULL;
END
$$;
