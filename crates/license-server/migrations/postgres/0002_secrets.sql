-- Secret lifecycle and licenses (DESIGN.md §2, seed §3.2/§4.1), PostgreSQL dialect.
-- Same tables and names as the SQLite migration, so both backends share one set of queries.
-- Times are Unix seconds (BIGINT); ids are canonical UUID text.

-- Set by `admin machine rotate` (and by invalidating the active version); cleared by the
-- machine's next acknowledged rotation. The agent sees it in secret-status.
ALTER TABLE machines ADD COLUMN rotation_requested_at BIGINT;

-- One row per (machine, version). `secret_enc` is nonce || AES-256-GCM(master key, secret,
-- aad = machine_id (16 UUID bytes) || version (u64 BE)); the plaintext is never stored.
CREATE TABLE secrets (
    machine_id     TEXT NOT NULL REFERENCES machines(id) ON DELETE CASCADE,
    version        BIGINT NOT NULL CHECK (version > 0),
    state          TEXT NOT NULL CHECK (state IN ('pending', 'active', 'grace', 'invalidated')),
    secret_enc     BYTEA NOT NULL,
    valid_from     BIGINT NOT NULL,
    valid_until    BIGINT NOT NULL,
    grace_until    BIGINT NOT NULL,
    created_at     BIGINT NOT NULL,
    acked_at       BIGINT,
    invalidated_at BIGINT,
    PRIMARY KEY (machine_id, version)
);
-- At most one version waiting for its acknowledgement, and one active version, per machine.
CREATE UNIQUE INDEX secrets_one_pending_per_machine ON secrets(machine_id) WHERE state = 'pending';
CREATE UNIQUE INDEX secrets_one_active_per_machine ON secrets(machine_id) WHERE state = 'active';

CREATE TABLE licenses (
    id          TEXT PRIMARY KEY,
    client_id   TEXT NOT NULL REFERENCES clients(id) ON DELETE CASCADE,
    machine_id  TEXT NOT NULL REFERENCES machines(id) ON DELETE CASCADE,
    features    TEXT NOT NULL,                     -- JSON array of strings
    metadata    TEXT NOT NULL,                     -- JSON object, string values
    issued_at   BIGINT NOT NULL,
    not_before  BIGINT NOT NULL,
    expires_at  BIGINT,                           -- NULL: does not expire
    revoked_at  BIGINT
);
CREATE INDEX licenses_machine ON licenses(machine_id);

-- Nonces of rotate-secret requests seen within the clock-skew window: a replay is refused.
-- Purged per machine at its next rotation (the primary key serves that lookup).
CREATE TABLE rotation_nonces (
    machine_id  TEXT NOT NULL,
    nonce       TEXT NOT NULL,                     -- 32 lowercase hex characters
    seen_at     BIGINT NOT NULL,
    PRIMARY KEY (machine_id, nonce)
);
