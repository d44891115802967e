-- Nothing looks transfers up by destination: the index only cost every
-- insert and every state change (which are not HOT updates) one more entry.
DROP INDEX transfers_to_account_idx;
