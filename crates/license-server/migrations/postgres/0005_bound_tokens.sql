-- Install tokens bound to one machine, PostgreSQL dialect.

-- The machine such a token re-enrolls (a wiped or replaced till), whatever hardware id the
-- request reports. NULL for ordinary tokens, which enroll new machines and re-enroll a known
-- one only with a signature by its key.
ALTER TABLE install_tokens ADD COLUMN machine_id TEXT;
