-- The change feed starts from the audit rows of its last minutes (service::changes).
CREATE INDEX audit_events_at ON audit_events(at);
