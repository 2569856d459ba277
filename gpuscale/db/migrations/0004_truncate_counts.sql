-- TRUNCATE bypasses row triggers; keep the counters exact when someone empties the queue.
CREATE FUNCTION gpuscale_count_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM processing_queue_counts;
    RETURN NULL;
END $$;

CREATE TRIGGER processing_queue_count_truncate AFTER TRUNCATE ON processing_queue
    FOR EACH STATEMENT EXECUTE FUNCTION gpuscale_count_truncate();
