-- The relay no longer holds a transaction (and its row locks) across its
-- SQS call. It claims events with a lease committed before it sends, and
-- records the outcome in a second short transaction guarded by that lease:
--   claimed_until       set by the claim; NULL or in the past = claimable;
--                       its value identifies the claim that set it.
--   transient_failures  per-entry failures that were not the message's
--                       fault (throttling, SQS internal errors): they set
--                       the event's own backoff and never count toward dead.
-- Both are nullable or have a constant default: no table rewrite.
ALTER TABLE outbox ADD COLUMN claimed_until TIMESTAMPTZ NULL;
ALTER TABLE outbox ADD COLUMN transient_failures INT NOT NULL DEFAULT 0;
