-- Fleet health, SQLite dialect. Times are Unix seconds.

-- When the machine last made an authenticated request to the agent listener, kept to
-- within LAST_SEEN_RESOLUTION (a poll does not write it every time).
ALTER TABLE machines ADD COLUMN last_seen_at INTEGER;
-- The machine's latest health report (JSON, as `POST /api/v1/health` accepted it) and when it
-- last changed.
ALTER TABLE machines ADD COLUMN health_report TEXT;
ALTER TABLE machines ADD COLUMN health_reported_at INTEGER;
