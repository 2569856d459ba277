-- A change counter for the server registry (issue 14): the controller reads the whole server list
-- only when it changed, not every tick (a fleet of hundreds of replicas made every tick read and
-- decode hundreds of rows that were the same as the last time).  What the controller reads of a
-- server (pool, container, status, start) changes on registration, drain, death and removal;
-- heartbeats change none of it and leave the counter alone (the WHEN clause: no write, no lock).
CREATE TABLE processing_servers_version (
    one     boolean PRIMARY KEY DEFAULT true CHECK (one),
    version bigint  NOT NULL
);
INSERT INTO processing_servers_version (one, version) VALUES (true, 1);

CREATE FUNCTION gpuscale_servers_changed() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    UPDATE processing_servers_version SET version = version + 1;
    RETURN NULL;
END $$;

CREATE TRIGGER processing_servers_inserted_or_deleted
    AFTER INSERT OR DELETE ON processing_servers
    FOR EACH STATEMENT EXECUTE FUNCTION gpuscale_servers_changed();

CREATE TRIGGER processing_servers_changed
    AFTER UPDATE ON processing_servers
    FOR EACH ROW
    WHEN (OLD.pool IS DISTINCT FROM NEW.pool
          OR OLD.container_id IS DISTINCT FROM NEW.container_id
          OR OLD.status IS DISTINCT FROM NEW.status
          OR OLD.started_at IS DISTINCT FROM NEW.started_at)
    EXECUTE FUNCTION gpuscale_servers_changed();
