-- A statement's own check, for statements that travel in one message with
-- their COMMIT (the apply's write: see src/db/literal.rs). The worker
-- cannot look at what such a statement did before the commit, so the
-- statement refuses to go on itself: an error here skips the COMMIT that
-- follows it, and the transaction rolls back.
CREATE OR REPLACE FUNCTION transfer_worker_expect(ok boolean, what text) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF ok IS NOT TRUE THEN
        RAISE EXCEPTION 'inconsistent: %', what;
    END IF;
    RETURN true;
END
$$;
