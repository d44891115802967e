-- All of a transfer's events, published or not, by transfer: for `transfer
-- show`, for pruning transfers whose events are gone, and for the relay's
-- "is there an earlier unpublished event of this transfer" check, which used
-- the partial index this one replaces.
CREATE INDEX IF NOT EXISTS outbox_transfer_idx ON outbox (transfer_id, id);
DROP INDEX IF EXISTS outbox_unpublished_by_transfer_idx;
