-- Per-machine PKI and enrollment (seed 004), SQLite dialect.
-- Times are Unix seconds (INTEGER); ids are canonical UUID text.

CREATE TABLE clients (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    created_at  INTEGER NOT NULL
);

CREATE TABLE install_tokens (
    id              TEXT PRIMARY KEY,
    token_hash      TEXT NOT NULL UNIQUE,          -- SHA-256 hex; the token itself is never stored
    client_id       TEXT NOT NULL REFERENCES clients(id) ON DELETE CASCADE,
    created_at      INTEGER NOT NULL,
    expires_at      INTEGER NOT NULL,
    used_at         INTEGER,
    used_by_machine TEXT
);

CREATE TABLE machines (
    id               TEXT PRIMARY KEY,
    client_id        TEXT NOT NULL REFERENCES clients(id) ON DELETE CASCADE,
    hostname         TEXT NOT NULL,
    hardware_id      TEXT NOT NULL,
    arch             TEXT NOT NULL,
    enrolled_at      INTEGER NOT NULL,
    last_enrolled_at INTEGER NOT NULL,
    revoked_at       INTEGER,
    UNIQUE (client_id, hardware_id)
);

CREATE TABLE certificates (
    serial        TEXT PRIMARY KEY,                -- lowercase hex of the DER serial
    machine_id    TEXT NOT NULL REFERENCES machines(id) ON DELETE CASCADE,
    client_id     TEXT NOT NULL,
    state         TEXT NOT NULL CHECK (state IN ('active', 'revoked', 'superseded')),
    key_origin    TEXT NOT NULL CHECK (key_origin IN ('csr', 'server')),
    issued_at     INTEGER NOT NULL,
    expires_at    INTEGER NOT NULL,
    revoked_at    INTEGER,
    superseded_at INTEGER,
    pem           TEXT NOT NULL
);
CREATE INDEX certificates_machine ON certificates(machine_id);
-- At most one active certificate per machine. The seed's predicate
-- `revoked_at IS NULL AND expires_at > NOW()` is not immutable (PostgreSQL refuses it, and it
-- would let an expired row block nothing). Instead every certificate row carries a state that
-- only transactions change: issuing a certificate first moves the machine's current one to
-- 'superseded' (expired or not), so 'active' rows are unique per machine, and "active" in the
-- product sense is `state = 'active' AND expires_at > now`.
CREATE UNIQUE INDEX certificates_one_active_per_machine ON certificates(machine_id) WHERE state = 'active';

CREATE TABLE admin_tokens (
    id          TEXT PRIMARY KEY,
    token_hash  TEXT NOT NULL UNIQUE,
    name        TEXT NOT NULL,
    role        TEXT NOT NULL CHECK (role IN ('readonly', 'admin')),
    created_at  INTEGER NOT NULL,
    revoked_at  INTEGER
);

CREATE TABLE audit_events (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    at       INTEGER NOT NULL,
    actor    TEXT NOT NULL,
    action   TEXT NOT NULL,
    target   TEXT,
    outcome  TEXT NOT NULL,
    details  TEXT NOT NULL
);
-- Append-only, enforced by the database itself.
CREATE TRIGGER audit_events_no_update BEFORE UPDATE ON audit_events
BEGIN SELECT RAISE(ABORT, 'audit_events is append-only'); END;
CREATE TRIGGER audit_events_no_delete BEFORE DELETE ON audit_events
BEGIN SELECT RAISE(ABORT, 'audit_events is append-only'); END;
