-- The apply's batch as two statements, each sent in one message with its
-- transaction's BEGIN or COMMIT (see src/transfer/store/batch.rs, which
-- calls them, for why). They are functions so that their plans are cached
-- per session, as a bound statement's would be: such a message cannot carry
-- bound parameters, and planning the statements at every batch cost more
-- than the round trips saved, at full batches.
--
-- One pair per step (a PENDING transfer, a REQUESTED refund): they differ
-- only in who pays whom, the waiting-state guard (a literal, where the
-- partial indexes need it) and the columns a finish sets.

-- Claims up to p_limit rows waiting for the step whose retry time has come,
-- in id order from p_floor, skipping rows other transactions hold and rows
-- touching a p_busy account. With p_lock_accounts, the same statement takes
-- the rows' accounts FOR NO KEY UPDATE SKIP LOCKED (never waiting, so in any
-- order); the rows come first (account false), then the accounts it got.
-- The accounts are a semi-join on the claimed rows, not `id = ANY(array)`:
-- on a small table the planner scans it, and a scan's `= ANY` compares
-- every account with every claimed one (a millisecond a batch of 100).
-- Called inside a transaction that begun with enable_sort off: the claim
-- walks the waiting index in order, and turns sorts back on for the rest of
-- the transaction itself.
CREATE OR REPLACE FUNCTION transfer_worker_claim_transfers(
    p_limit BIGINT, p_floor BIGINT, p_busy BIGINT[], p_lock_accounts BOOLEAN)
RETURNS TABLE (account BOOLEAN, id BIGINT, debit BIGINT, credit BIGINT, amount BIGINT,
               created_epoch FLOAT8, traceparent TEXT,
               balance BIGINT, daily_limit BIGINT, spent_today BIGINT)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH claimed AS (
        SELECT t.id, t.from_account AS debit, t.to_account AS credit, t.amount AS amount,
               extract(epoch FROM t.created_at)::float8 AS created_epoch, t.traceparent
          FROM transfers t
         WHERE t.status = 'PENDING' AND t.next_attempt_at <= now() AND t.id >= p_floor
           AND NOT (t.from_account = ANY(p_busy) OR t.to_account = ANY(p_busy))
           AND set_config('enable_sort', 'on', true) = 'on'
         ORDER BY t.id
         LIMIT p_limit
           FOR NO KEY UPDATE SKIP LOCKED
    ), locked AS (
        SELECT a.id, a.balance, a.daily_limit,
               CASE WHEN a.spent_day = (now() AT TIME ZONE 'UTC')::date THEN a.spent_today ELSE 0 END AS spent_today
          FROM accounts a
         WHERE p_lock_accounts
           AND a.id IN (SELECT c.debit FROM claimed c UNION ALL SELECT c.credit FROM claimed c)
           FOR NO KEY UPDATE OF a SKIP LOCKED
    )
    SELECT false, c.id, c.debit, c.credit, c.amount, c.created_epoch, c.traceparent,
           NULL::bigint, NULL::bigint, NULL::bigint
      FROM claimed c
    UNION ALL
    SELECT true, l.id, NULL, NULL, NULL, NULL, NULL, l.balance, l.daily_limit, l.spent_today
      FROM locked l;
END
$$;

-- The write of a batch: moves the money (per account, the balance change and
-- what it adds to the sender's day's total, saturating), moves the rows out
-- of the waiting state (guarded by it) and inserts one event per row that
-- changed. It checks itself: unless every account and every row was
-- updated, it raises, and the COMMIT sent after it does not run.
--
-- The guard is written `state || '' = ...` so that no partial index on the
-- waiting state can serve it: the planner sizes those indexes from
-- statistics taken before a burst (a million finished rows and an unanalyzed
-- backlog of 100,000 look like an empty index), and would then hash the
-- whole backlog for every batch of 100 (measured: 60 ms a batch instead of
-- 5). This way the rows are reached from their ids, through the primary key.
CREATE OR REPLACE FUNCTION transfer_worker_finish_transfers(
    p_ids BIGINT[], p_states TEXT[], p_reasons TEXT[], p_event_ids TEXT[], p_types TEXT[],
    p_accounts BIGINT[], p_deltas BIGINT[], p_spent BIGINT[])
RETURNS TABLE (n_accounts BIGINT, n_rows BIGINT)
LANGUAGE plpgsql AS $$
DECLARE
    v_accounts BIGINT;
    v_rows BIGINT;
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
        INSERT INTO outbox (event_id, transfer_id, event_type, data)
        SELECT a.event_id::uuid, (a.row).id, a.event_type, transfer_event_data(a.row, a.event_type)
          FROM applied a
         ORDER BY (a.row).id
     RETURNING 1
    )
    SELECT (SELECT count(*) FROM moved), (SELECT count(*) FROM written) INTO v_accounts, v_rows;
    IF v_accounts <> coalesce(cardinality(p_accounts), 0) OR v_rows <> coalesce(cardinality(p_ids), 0) THEN
        RAISE EXCEPTION 'inconsistent: updated % of % accounts and moved % of % claimed rows out of PENDING',
            v_accounts, coalesce(cardinality(p_accounts), 0), v_rows, coalesce(cardinality(p_ids), 0);
    END IF;
    RETURN QUERY SELECT v_accounts, v_rows;
END
$$;

-- Claims up to p_limit rows waiting for the step whose retry time has come,
-- in id order from p_floor, skipping rows other transactions hold and rows
-- touching a p_busy account. With p_lock_accounts, the same statement takes
-- the rows' accounts FOR NO KEY UPDATE SKIP LOCKED (never waiting, so in any
-- order); the rows come first (account false), then the accounts it got.
-- The accounts are a semi-join on the claimed rows, not `id = ANY(array)`:
-- on a small table the planner scans it, and a scan's `= ANY` compares
-- every account with every claimed one (a millisecond a batch of 100).
-- Called inside a transaction that begun with enable_sort off: the claim
-- walks the waiting index in order, and turns sorts back on for the rest of
-- the transaction itself.
CREATE OR REPLACE FUNCTION transfer_worker_claim_refunds(
    p_limit BIGINT, p_floor BIGINT, p_busy BIGINT[], p_lock_accounts BOOLEAN)
RETURNS TABLE (account BOOLEAN, id BIGINT, debit BIGINT, credit BIGINT, amount BIGINT,
               created_epoch FLOAT8, traceparent TEXT,
               balance BIGINT, daily_limit BIGINT, spent_today BIGINT)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH claimed AS (
        SELECT t.id, t.to_account AS debit, t.from_account AS credit, t.refund_amount AS amount,
               extract(epoch FROM t.created_at)::float8 AS created_epoch, t.traceparent
          FROM transfers t
         WHERE t.refund_status = 'REQUESTED' AND t.next_attempt_at <= now() AND t.id >= p_floor
           AND NOT (t.from_account = ANY(p_busy) OR t.to_account = ANY(p_busy))
           AND set_config('enable_sort', 'on', true) = 'on'
         ORDER BY t.id
         LIMIT p_limit
           FOR NO KEY UPDATE SKIP LOCKED
    ), locked AS (
        SELECT a.id, a.balance, a.daily_limit,
               CASE WHEN a.spent_day = (now() AT TIME ZONE 'UTC')::date THEN a.spent_today ELSE 0 END AS spent_today
          FROM accounts a
         WHERE p_lock_accounts
           AND a.id IN (SELECT c.debit FROM claimed c UNION ALL SELECT c.credit FROM claimed c)
           FOR NO KEY UPDATE OF a SKIP LOCKED
    )
    SELECT false, c.id, c.debit, c.credit, c.amount, c.created_epoch, c.traceparent,
           NULL::bigint, NULL::bigint, NULL::bigint
      FROM claimed c
    UNION ALL
    SELECT true, l.id, NULL, NULL, NULL, NULL, NULL, l.balance, l.daily_limit, l.spent_today
      FROM locked l;
END
$$;

-- The write of a batch: moves the money (per account, the balance change and
-- what it adds to the sender's day's total, saturating), moves the rows out
-- of the waiting state (guarded by it) and inserts one event per row that
-- changed. It checks itself: unless every account and every row was
-- updated, it raises, and the COMMIT sent after it does not run.
--
-- The guard is written `state || '' = ...` so that no partial index on the
-- waiting state can serve it: the planner sizes those indexes from
-- statistics taken before a burst (a million finished rows and an unanalyzed
-- backlog of 100,000 look like an empty index), and would then hash the
-- whole backlog for every batch of 100 (measured: 60 ms a batch instead of
-- 5). This way the rows are reached from their ids, through the primary key.
CREATE OR REPLACE FUNCTION transfer_worker_finish_refunds(
    p_ids BIGINT[], p_states TEXT[], p_reasons TEXT[], p_event_ids TEXT[], p_types TEXT[],
    p_accounts BIGINT[], p_deltas BIGINT[], p_spent BIGINT[])
RETURNS TABLE (n_accounts BIGINT, n_rows BIGINT)
LANGUAGE plpgsql AS $$
DECLARE
    v_accounts BIGINT;
    v_rows BIGINT;
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
           SET refund_status = o.state, refund_failure_reason = o.reason, refund_applied_at = now()
          FROM unnest(p_ids, p_states, p_reasons, p_event_ids, p_types)
               AS o(id, state, reason, event_id, event_type)
         WHERE t.id = o.id AND t.refund_status || '' = 'REQUESTED'
     RETURNING t AS row, o.event_id, o.event_type
    ), written AS (
        INSERT INTO outbox (event_id, transfer_id, event_type, data)
        SELECT a.event_id::uuid, (a.row).id, a.event_type, transfer_event_data(a.row, a.event_type)
          FROM applied a
         ORDER BY (a.row).id
     RETURNING 1
    )
    SELECT (SELECT count(*) FROM moved), (SELECT count(*) FROM written) INTO v_accounts, v_rows;
    IF v_accounts <> coalesce(cardinality(p_accounts), 0) OR v_rows <> coalesce(cardinality(p_ids), 0) THEN
        RAISE EXCEPTION 'inconsistent: updated % of % accounts and moved % of % claimed rows out of REQUESTED',
            v_accounts, coalesce(cardinality(p_accounts), 0), v_rows, coalesce(cardinality(p_ids), 0);
    END IF;
    RETURN QUERY SELECT v_accounts, v_rows;
END
$$;
