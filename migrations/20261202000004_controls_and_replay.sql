-- Operators' controls during an incident (issue 18).
--
-- 1. Pause and resume, per part of the worker ('apply': claiming transfers
--    and refunds; 'relay': publishing events). In the database, so that it
--    holds for every replica, survives restarts, and replicas started later
--    obey it. `pause`/`resume` update a row and NOTIFY; replicas also read the
--    rows every second.
CREATE TABLE IF NOT EXISTS worker_controls (
    part   TEXT PRIMARY KEY,
    paused BOOLEAN NOT NULL DEFAULT false,
    reason TEXT NULL,
    since  TIMESTAMPTZ NULL,
    CONSTRAINT worker_controls_part_known CHECK (part IN ('apply', 'relay'))
);
INSERT INTO worker_controls (part) VALUES ('apply'), ('relay') ON CONFLICT DO NOTHING;

-- 2. Replay: an already-published event goes out again, with its original
--    event_id and body, through the relay (`outbox replay`). Its first
--    publication is kept (`first_published_at`, never changed again), every
--    publication is listed (`publications`), and `replays` counts the
--    replays: a replay's FIFO deduplication id is `<event_id>:replay-<n>`,
--    which SQS has not seen (the first publication's is the event_id).
--    Nullable or constant defaults: no rewrite, and no backfill: an event
--    published before this migration has its `published_at` as its first
--    and only publication, which a replay copies into these columns first.
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS first_published_at TIMESTAMPTZ NULL;
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS publications TIMESTAMPTZ[] NOT NULL DEFAULT '{}';
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS replays INT NOT NULL DEFAULT 0;
