-- The dashboard's and /metrics' fleet queries over large fleets (store/fleet.rs, store/audit.rs),
-- both dialects alike: counts and short lists from small indexes instead of scans.

-- What expires soonest.
CREATE INDEX certificates_active_expiry ON certificates(expires_at) WHERE state = 'active';
CREATE INDEX licenses_unrevoked_expiry ON licenses(expires_at) WHERE revoked_at IS NULL;

-- Machines by when they were last seen, and the revoked ones.
CREATE INDEX machines_unrevoked_seen ON machines(last_seen_at) WHERE revoked_at IS NULL;
CREATE INDEX machines_revoked ON machines(revoked_at) WHERE revoked_at IS NOT NULL;

-- Unrevoked machines whose latest health report shows a problem: one small index per problem.
-- Each predicate is the one store/fleet.rs queries with, word for word (the planners match
-- them textually; a unit test there checks it).
CREATE INDEX machines_degraded ON machines(health_reported_at)
    WHERE revoked_at IS NULL AND health_report IS NOT NULL
     AND health_report NOT LIKE '%"degraded_mode":"inactive"%';
CREATE INDEX machines_tpm_fallback ON machines(health_reported_at)
    WHERE revoked_at IS NULL
     AND health_report LIKE '%"tpm_enabled":true,"tpm_available":false%';
CREATE INDEX machines_rotation_failing ON machines(health_reported_at)
    WHERE revoked_at IS NULL AND health_report IS NOT NULL
     AND health_report NOT LIKE '%"rotation_failures":0,%';
CREATE INDEX machines_clock_rollback ON machines(health_reported_at)
    WHERE revoked_at IS NULL AND health_report IS NOT NULL
     AND health_report NOT LIKE '%"clock_rollback_secs":null%';
CREATE INDEX machines_troubled ON machines(health_reported_at)
    WHERE revoked_at IS NULL AND health_report IS NOT NULL
     AND (health_report NOT LIKE '%"rotation_failures":0,%'
          OR health_report NOT LIKE '%"clock_rollback_secs":null%');

-- The audit trail filtered by actor, event or object, newest first.
CREATE INDEX audit_events_actor ON audit_events(actor, seq);
CREATE INDEX audit_events_action ON audit_events(action, seq);
CREATE INDEX audit_events_target ON audit_events(target, seq);
