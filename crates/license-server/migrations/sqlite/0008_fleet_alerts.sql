-- Fleet conditions the servers watch for (sqlite dialect; times are Unix seconds): one row per
-- condition and machine while it holds, so each is raised once, by whichever replica inserts
-- the row, and resolved once, by whichever deletes it.
CREATE TABLE fleet_alerts (
    kind       TEXT NOT NULL,   -- machine_unseen, certificate_expiring
    machine_id TEXT NOT NULL REFERENCES machines(id) ON DELETE CASCADE,
    raised_at  INTEGER NOT NULL,
    PRIMARY KEY (kind, machine_id)
);
