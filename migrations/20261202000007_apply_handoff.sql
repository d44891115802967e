-- A transfer batch's events handed straight to the relay of the process
-- that applied them (see src/outbox/handoff.rs for why and when).
--
-- The write of a transfer batch gains two arguments. With p_destination
-- NULL it is the write of 20261202000006 unchanged: its events are written
-- unrouted, for a relay's claim. With a destination, each event is written
-- as that destination's, already under the relay's lease (claimed_until =
-- now() + p_lease_ms), exactly as a relay's claim would have left it; and
-- the events come back (ids, bodies, the lease as text, the time they
-- occurred) for the relay to send without claiming them. Another relay
-- sees them leased and skips them, as it skips any claimed event; if the
-- process dies before sending, the lease runs out and any relay takes them.
-- Only a transfer's first events are written here (the step moves a PENDING
-- transfer, which has no event before), so each is the head of its
-- transfer's order at its destination, as a claim requires.
--
-- The eight-argument form stays, as a call of this one, for a worker of the
-- previous version still running during a rolling upgrade.
CREATE OR REPLACE FUNCTION transfer_worker_finish_transfers(
    p_ids BIGINT[], p_states TEXT[], p_reasons TEXT[], p_event_ids TEXT[], p_types TEXT[],
    p_accounts BIGINT[], p_deltas BIGINT[], p_spent BIGINT[],
    p_destination TEXT, p_lease_ms FLOAT8)
RETURNS TABLE (n_accounts BIGINT, n_rows BIGINT,
               handed_lease TEXT, handed_occurred_at TEXT, handed_occurred_epoch FLOAT8,
               handed_ids BIGINT[], handed_transfer_ids BIGINT[], handed_event_ids TEXT[],
               handed_types TEXT[], handed_data TEXT[])
LANGUAGE plpgsql AS $$
DECLARE
    v_accounts BIGINT;
    v_rows BIGINT;
    v_written outbox[];
    v_lease TIMESTAMPTZ := CASE WHEN p_destination IS NOT NULL
                                THEN now() + p_lease_ms * interval '1 millisecond' END;
BEGIN
    WITH moved AS (
        UPDATE accounts a
           SET balance = a.balance + d.delta,
               spent_today = CASE WHEN d.spent = 0 THEN a.spent_today
                                  WHEN a.spent_day = (now() AT TIME ZONE 'UTC')::date
                                  THEN LEAST(a.spent_today::numeric + d.spent, 9223372036854775807)::bigint
                                  ELSE d.spent END,
               spent_day = CASE WHEN d.spent = 0 THEN a.spent_day ELSE (now() AT TIME ZONE 'UTC')::date END
          FROM unnest(p_accounts, p_deltas, p_spent) AS d(id, delta, spent)
         WHERE a.id = d.id
     RETURNING 1
    ), applied AS (
        UPDATE transfers t
           SET status = o.state, failure_reason = o.reason, applied_at = now()
          FROM unnest(p_ids, p_states, p_reasons, p_event_ids, p_types)
               AS o(id, state, reason, event_id, event_type)
         WHERE t.id = o.id AND t.status || '' = 'PENDING'
     RETURNING t AS row, o.event_id, o.event_type
    ), written AS (
        INSERT INTO outbox (event_id, transfer_id, event_type, data, destination, claimed_until)
        SELECT a.event_id::uuid, (a.row).id, a.event_type, transfer_event_data(a.row, a.event_type),
               p_destination, v_lease
          FROM applied a
         ORDER BY (a.row).id
     RETURNING outbox AS row
    )
    SELECT (SELECT count(*) FROM moved), (SELECT count(*) FROM written),
           CASE WHEN p_destination IS NOT NULL
                THEN (SELECT array_agg(w.row ORDER BY (w.row).id) FROM written w) END
      INTO v_accounts, v_rows, v_written;
    IF v_accounts <> coalesce(cardinality(p_accounts), 0) OR v_rows <> coalesce(cardinality(p_ids), 0) THEN
        RAISE EXCEPTION 'inconsistent: updated % of % accounts and moved % of % claimed rows out of PENDING',
            v_accounts, coalesce(cardinality(p_accounts), 0), v_rows, coalesce(cardinality(p_ids), 0);
    END IF;
    IF v_written IS NULL THEN
        RETURN QUERY SELECT v_accounts, v_rows, NULL::text, NULL::text, NULL::float8,
                            NULL::bigint[], NULL::bigint[], NULL::text[], NULL::text[], NULL::text[];
        RETURN;
    END IF;
    -- The lease exactly as a claim prints it (the relay's outcomes are
    -- recorded only where it still holds), and the time as events carry it.
    RETURN QUERY
    SELECT v_accounts, v_rows, v_lease::text,
           to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
           extract(epoch FROM now())::float8,
           array_agg(w.id ORDER BY w.id), array_agg(w.transfer_id ORDER BY w.id),
           array_agg(w.event_id::text ORDER BY w.id), array_agg(w.event_type ORDER BY w.id),
           array_agg(w.data::text ORDER BY w.id)
      FROM unnest(v_written) w;
END
$$;

CREATE OR REPLACE FUNCTION transfer_worker_finish_transfers(
    p_ids BIGINT[], p_states TEXT[], p_reasons TEXT[], p_event_ids TEXT[], p_types TEXT[],
    p_accounts BIGINT[], p_deltas BIGINT[], p_spent BIGINT[])
RETURNS TABLE (n_accounts BIGINT, n_rows BIGINT)
LANGUAGE sql AS $$
    SELECT f.n_accounts, f.n_rows
      FROM transfer_worker_finish_transfers(p_ids, p_states, p_reasons, p_event_ids, p_types,
                                            p_accounts, p_deltas, p_spent, NULL, NULL) f;
$$;
