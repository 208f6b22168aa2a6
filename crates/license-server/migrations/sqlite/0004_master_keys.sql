-- Master key rollover (issue 9), SQLite dialect. Times are Unix seconds (INTEGER).

-- Which master key sealed each secret row. Rows written before rollover existed were sealed
-- under the data directory's first key, `k1`.
ALTER TABLE secrets ADD COLUMN master_key_id TEXT NOT NULL DEFAULT 'k1';
CREATE INDEX secrets_master_key ON secrets(master_key_id);

-- The registry of master keys, shared by every replica. Never holds key material: the keys
-- live in each data directory's master-keys.json; `check_value` (a truncated SHA-256 of a
-- label and the key) lets a replica prove it holds the same key under the same id.
-- staged: generated, not yet used to seal; current: seals every new secret (one at most);
-- previous: rows are being re-encrypted away from it; kept: drained, retained (--keep-old);
-- retired: no row uses it, removed from the data directory that rotated it.
CREATE TABLE master_keys (
    id           TEXT PRIMARY KEY,
    check_value  TEXT,                              -- NULL until a server holding it fills it
    state        TEXT NOT NULL CHECK (state IN ('staged', 'current', 'previous', 'kept', 'retired')),
    created_at   INTEGER NOT NULL,
    activated_at INTEGER,
    retired_at   INTEGER
);
CREATE UNIQUE INDEX master_keys_one_current ON master_keys(state) WHERE state = 'current';
CREATE UNIQUE INDEX master_keys_one_staged ON master_keys(state) WHERE state = 'staged';
INSERT INTO master_keys (id, check_value, state, created_at, activated_at)
VALUES ('k1', NULL, 'current', CAST(strftime('%s', 'now') AS INTEGER), NULL);

-- Every serving process says, every few seconds, which master keys its data directory holds,
-- so a rollover never makes a key current before every live replica can read under it.
CREATE TABLE master_key_holders (
    holder_id    TEXT PRIMARY KEY,                  -- random, one per `serve` process
    description  TEXT NOT NULL,                     -- host, pid and data directory
    key_ids      TEXT NOT NULL,                     -- comma separated, only ids whose check matches
    seen_at      INTEGER NOT NULL
);
