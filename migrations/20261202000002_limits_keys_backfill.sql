-- The follow-ups of the previous migration that read whole tables, in a
-- transaction of their own that holds no exclusive lock while it reads.
--
-- Today's totals: what each account sent by transfer since midnight UTC,
-- from the transfers applied today (the worker keeps them from now on).
UPDATE accounts a
   SET spent_day = (now() AT TIME ZONE 'UTC')::date,
       spent_today = s.spent
  FROM (SELECT from_account, LEAST(sum(amount), 9223372036854775807)::bigint AS spent
          FROM transfers
         WHERE status = 'SUCCEEDED'
           AND applied_at >= date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
         GROUP BY from_account) s
 WHERE a.id = s.from_account;

-- Trace contexts W3C calls invalid were never forwarded as context; clear
-- them, then hold every row to the stricter check and drop the old one.
UPDATE transfers SET traceparent = NULL
 WHERE traceparent IS NOT NULL
   AND (left(traceparent, 2) = 'ff'
        OR substr(traceparent, 4, 32) = repeat('0', 32)
        OR substr(traceparent, 37, 16) = repeat('0', 16));
ALTER TABLE transfers VALIDATE CONSTRAINT transfers_traceparent_w3c;
ALTER TABLE transfers DROP CONSTRAINT IF EXISTS transfers_traceparent_format;
