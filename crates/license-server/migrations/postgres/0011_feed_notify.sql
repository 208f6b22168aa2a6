-- Every statement that adds audit rows notifies the serving processes' change feeds when it
-- commits (store::notify), so they read the trail when it grew instead of polling it.
CREATE FUNCTION lsa_audit_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('lsa_audit', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER audit_events_notify AFTER INSERT ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION lsa_audit_notify();
