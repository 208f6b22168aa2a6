-- The dashboard's queries, both dialects alike: what expires soonest, and the audit trail
-- filtered by actor, action or object, without scanning whole tables.
CREATE INDEX certificates_active_expiry ON certificates(expires_at) WHERE state = 'active';
CREATE INDEX licenses_unrevoked_expiry ON licenses(expires_at) WHERE revoked_at IS NULL;
CREATE INDEX audit_events_actor ON audit_events(actor, seq);
CREATE INDEX audit_events_action ON audit_events(action, seq);
CREATE INDEX audit_events_target ON audit_events(target, seq);
