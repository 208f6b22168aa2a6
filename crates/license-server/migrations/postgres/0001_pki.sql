-- Per-machine PKI and enrollment (seed 004), PostgreSQL dialect. Same tables and names as the
-- SQLite migration so that both backends share one set of queries.

CREATE TABLE clients (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    created_at  BIGINT NOT NULL
);

CREATE TABLE install_tokens (
    id              TEXT PRIMARY KEY,
    token_hash      TEXT NOT NULL UNIQUE,
    client_id       TEXT NOT NULL REFERENCES clients(id) ON DELETE CASCADE,
    created_at      BIGINT NOT NULL,
    expires_at      BIGINT NOT NULL,
    used_at         BIGINT,
    used_by_machine TEXT
);

CREATE TABLE machines (
    id               TEXT PRIMARY KEY,
    client_id        TEXT NOT NULL REFERENCES clients(id) ON DELETE CASCADE,
    hostname         TEXT NOT NULL,
    hardware_id      TEXT NOT NULL,
    arch             TEXT NOT NULL,
    enrolled_at      BIGINT NOT NULL,
    last_enrolled_at BIGINT NOT NULL,
    revoked_at       BIGINT,
    UNIQUE (client_id, hardware_id)
);

CREATE TABLE certificates (
    serial        TEXT PRIMARY KEY,
    machine_id    TEXT NOT NULL REFERENCES machines(id) ON DELETE CASCADE,
    client_id     TEXT NOT NULL,
    state         TEXT NOT NULL CHECK (state IN ('active', 'revoked', 'superseded')),
    key_origin    TEXT NOT NULL CHECK (key_origin IN ('csr', 'server')),
    issued_at     BIGINT NOT NULL,
    expires_at    BIGINT NOT NULL,
    revoked_at    BIGINT,
    superseded_at BIGINT,
    pem           TEXT NOT NULL
);
CREATE INDEX certificates_machine ON certificates(machine_id);
-- See the SQLite migration for why the predicate is on `state` (immutable) and not on time.
CREATE UNIQUE INDEX certificates_one_active_per_machine ON certificates(machine_id) WHERE state = 'active';

CREATE TABLE admin_tokens (
    id          TEXT PRIMARY KEY,
    token_hash  TEXT NOT NULL UNIQUE,
    name        TEXT NOT NULL,
    role        TEXT NOT NULL CHECK (role IN ('readonly', 'admin')),
    created_at  BIGINT NOT NULL,
    revoked_at  BIGINT
);

CREATE TABLE audit_events (
    seq      BIGSERIAL PRIMARY KEY,
    at       BIGINT NOT NULL,
    actor    TEXT NOT NULL,
    action   TEXT NOT NULL,
    target   TEXT,
    outcome  TEXT NOT NULL,
    details  TEXT NOT NULL
);
CREATE FUNCTION audit_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_events is append-only';
END;
$$;
CREATE TRIGGER audit_events_no_update BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_append_only();
