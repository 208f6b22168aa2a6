-- Machine recovery after its key is lost (TPM cleared), PostgreSQL dialect.
-- Same columns as the SQLite migration. Times are Unix seconds (BIGINT).

-- SHA-256 hex of the machine's current recovery token; the token itself is never stored.
-- Replaced at every enrollment and every recovery (a token is single use); NULL for machines
-- enrolled before recovery existed, which cannot recover until they enroll again.
ALTER TABLE machines ADD COLUMN recovery_hash TEXT;
-- When the machine last recovered (new key, new certificate through `POST /api/public/recover`).
ALTER TABLE machines ADD COLUMN recovered_at BIGINT;
