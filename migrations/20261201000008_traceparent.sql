-- W3C trace context from producers: a transfer may carry a `traceparent`
-- (CLI --traceparent, the library, or this column in a plain INSERT); every
-- event published for it carries it as an SQS message attribute, so a
-- consumer continues the producer's trace. The column is nullable with no
-- default (no rewrite); its format check is added NOT VALID here and
-- validated by the next migration, so no exclusive lock is held for a scan.
ALTER TABLE transfers ADD COLUMN IF NOT EXISTS traceparent TEXT NULL;
ALTER TABLE transfers ADD CONSTRAINT transfers_traceparent_format
    CHECK (traceparent IS NULL OR traceparent ~ '^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$') NOT VALID;
