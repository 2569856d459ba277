-- NOTIFY gpuscale_finished with the task id whenever a task reaches a final status (issue 15).
--
-- The HTTP API holds `?wait=S` requests until their task finishes; one LISTEN per API process
-- wakes them, so no request polls the table.  A row trigger restricted by `UPDATE OF status` and
-- a WHEN clause costs nothing on the hot updates that leave the status alone (progress, lease
-- extensions) and fires once per finishing row; PostgreSQL folds identical payloads sent in one
-- transaction, and delivers them only when it commits.
CREATE FUNCTION gpuscale_notify_finished() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('gpuscale_finished', NEW.id::text);
    RETURN NULL;
END $$;

CREATE TRIGGER processing_queue_finished_notify
    AFTER UPDATE OF status ON processing_queue
    FOR EACH ROW
    WHEN (NEW.status IN ('done', 'failed', 'dead', 'cancelled') AND OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION gpuscale_notify_finished();
