-- No NOTIFY per inserted transfer while a worker polls for new ones anyway.
--
-- A NOTIFY takes PostgreSQL's database-wide notify lock at commit and holds it
-- until the commit is flushed, so producers that each insert a transfer and
-- commit were serialized behind one another's WAL flush: measured with
-- pgbench, 40 clients inserting one transfer per transaction (fsync on),
-- 1,870-2,140 tps with the trigger's NOTIFY and 3,880-4,110 without it.
--
-- Above a steady rate the worker claims new transfers on a short tick of its
-- own (see `transfer::polling`) and does not need the wake-ups; while it does,
-- it keeps `apply_polling.until` in the future (a lease of a few seconds,
-- renewed every second; a worker that dies stops renewing it), and the
-- trigger skips its NOTIFY. A worker stops renewing when the rate falls, keeps
-- polling until the lease it set has passed, and wake-ups resume. Polling
-- every `poll_interval` still covers a transaction that inserted while the
-- lease held and committed after it ended.
--
-- UNLOGGED: after a crash the table is empty, which means "notify".
CREATE UNLOGGED TABLE apply_polling (
    only_row BOOLEAN PRIMARY KEY DEFAULT true CHECK (only_row),
    until    TIMESTAMPTZ NOT NULL
);
-- The trigger reads it as the producer's role: a producer granted only what
-- it needed before this migration must not start failing its inserts. It
-- holds one timestamp.
GRANT SELECT ON apply_polling TO PUBLIC;

-- clock_timestamp(), not now(): a producer's transaction may have started long
-- before its INSERT.
CREATE OR REPLACE FUNCTION notify_transfer_work() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_TABLE_NAME <> 'transfers'
       OR NOT EXISTS (SELECT 1 FROM apply_polling WHERE until > clock_timestamp()) THEN
        PERFORM pg_notify('transfer_worker_work', TG_TABLE_NAME);
    END IF;
    RETURN NULL;
END
$$;
