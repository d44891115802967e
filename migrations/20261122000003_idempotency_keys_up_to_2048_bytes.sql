-- Idempotency keys up to 2 KiB instead of 255 characters: producers use
-- composite keys (tenant, order, attempt ...) and we have no reason to refuse
-- them. The bound is in bytes because the unique B-tree index is (its entries
-- must stay well under the 2,704-byte limit of an 8 KiB page).
ALTER TABLE transfers DROP CONSTRAINT transfers_idempotency_key_length;
ALTER TABLE transfers ADD CONSTRAINT transfers_idempotency_key_length
    CHECK (char_length(idempotency_key) >= 1 AND octet_length(idempotency_key) <= 2048);
