-- Validates the format check the previous migration added without validation
-- (a SHARE UPDATE EXCLUSIVE lock: writes go on while it scans).
ALTER TABLE transfers VALIDATE CONSTRAINT transfers_traceparent_format;
