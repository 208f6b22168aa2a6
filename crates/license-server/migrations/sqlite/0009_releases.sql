-- Agent releases (sqlite dialect; times are Unix seconds). Everything a serving process needs
-- to offer and serve a release is here, so every replica can: the public release keys, the
-- signed manifests and rollout state, the binaries in 256 KiB chunks, the machines' reports.
-- The private release key stays in the publishing host's data directory.
CREATE TABLE release_keys (
    id         TEXT PRIMARY KEY,   -- KeyId, 16 hex digits
    public_key TEXT NOT NULL,      -- ed25519:<base64>
    state      TEXT NOT NULL,      -- current, retired
    created_at INTEGER NOT NULL,
    retired_at INTEGER
);

CREATE TABLE releases (
    id                  TEXT PRIMARY KEY,   -- uuid, the manifest's release_id
    version             TEXT NOT NULL,
    channel             TEXT NOT NULL,
    arch                TEXT NOT NULL,
    sha256              TEXT NOT NULL,
    size                INTEGER NOT NULL,
    min_version         TEXT,
    rollback            INTEGER NOT NULL DEFAULT 0,
    published_at        INTEGER NOT NULL,
    key_id              TEXT NOT NULL,      -- the release key that signed the manifest
    signature           TEXT NOT NULL,      -- base64
    state               TEXT NOT NULL,      -- active, paused, halted, withdrawn
    percent             INTEGER NOT NULL,
    clients             TEXT NOT NULL,      -- JSON array of client ids
    halt_after_failures INTEGER NOT NULL,
    halted_reason       TEXT,
    UNIQUE (version, channel, arch)
);
CREATE INDEX releases_offer ON releases (channel, arch, state);

CREATE TABLE release_chunks (
    release_id TEXT NOT NULL REFERENCES releases(id) ON DELETE CASCADE,
    seq        INTEGER NOT NULL,
    data       BLOB NOT NULL,
    PRIMARY KEY (release_id, seq)
);

-- The latest report of each machine on each release.
CREATE TABLE release_reports (
    release_id      TEXT NOT NULL REFERENCES releases(id) ON DELETE CASCADE,
    machine_id      TEXT NOT NULL,
    outcome         TEXT NOT NULL,      -- success, failed, refused
    reason          TEXT NOT NULL,
    running_version TEXT NOT NULL,
    reported_at     INTEGER NOT NULL,
    PRIMARY KEY (release_id, machine_id)
);
