-- Claimable work per task type (issue 11): the controller sizes pools by estimated work, and
-- the work of a queued task depends on its type.  Kept like processing_queue_counts (statement
-- triggers, shards per backend pid, folded by gpuscale_compact_counts) so the read stays O(1) in
-- the queue's size.  Only 'queued' rows are counted: running tasks are read one by one anyway
-- (few, with their progress) and the other states are not needed per type.
CREATE TABLE processing_queue_type_counts (
    pool      text    NOT NULL,
    task_type text    NOT NULL,
    slot      integer NOT NULL,
    n         bigint  NOT NULL,
    PRIMARY KEY (pool, task_type, slot)
);

CREATE FUNCTION gpuscale_type_count_ins() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO processing_queue_type_counts AS c (pool, task_type, slot, n)
    SELECT pool, task_type, pg_backend_pid(), count(*)
      FROM new_rows WHERE status = 'queued' GROUP BY 1, 2 ORDER BY 1, 2
    ON CONFLICT (pool, task_type, slot) DO UPDATE SET n = c.n + EXCLUDED.n;
    RETURN NULL;
END $$;

CREATE FUNCTION gpuscale_type_count_upd() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO processing_queue_type_counts AS c (pool, task_type, slot, n)
    SELECT pool, task_type, pg_backend_pid(), sum(d)
      FROM (SELECT pool, task_type, 1 AS d FROM new_rows WHERE status = 'queued'
            UNION ALL
            SELECT pool, task_type, -1 AS d FROM old_rows WHERE status = 'queued') x
     GROUP BY 1, 2 HAVING sum(d) <> 0 ORDER BY 1, 2
    ON CONFLICT (pool, task_type, slot) DO UPDATE SET n = c.n + EXCLUDED.n;
    RETURN NULL;
END $$;

CREATE FUNCTION gpuscale_type_count_del() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO processing_queue_type_counts AS c (pool, task_type, slot, n)
    SELECT pool, task_type, pg_backend_pid(), -count(*)
      FROM old_rows WHERE status = 'queued' GROUP BY 1, 2 ORDER BY 1, 2
    ON CONFLICT (pool, task_type, slot) DO UPDATE SET n = c.n + EXCLUDED.n;
    RETURN NULL;
END $$;

CREATE TRIGGER processing_queue_type_count_ins AFTER INSERT ON processing_queue
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION gpuscale_type_count_ins();
CREATE TRIGGER processing_queue_type_count_upd AFTER UPDATE ON processing_queue
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION gpuscale_type_count_upd();
CREATE TRIGGER processing_queue_type_count_del AFTER DELETE ON processing_queue
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION gpuscale_type_count_del();

-- The triggers exist (and hold off writers until commit) before the backfill reads the table.
INSERT INTO processing_queue_type_counts (pool, task_type, slot, n)
SELECT pool, task_type, 0, count(*) FROM processing_queue WHERE status = 'queued' GROUP BY 1, 2;

CREATE OR REPLACE FUNCTION gpuscale_count_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM processing_queue_counts;
    DELETE FROM processing_queue_type_counts;
    RETURN NULL;
END $$;

-- Fold both counter tables' shards into slot 0 (same rules as in 0001).
CREATE OR REPLACE FUNCTION gpuscale_compact_counts() RETURNS integer LANGUAGE plpgsql AS $$
DECLARE moved integer;
DECLARE moved_types integer;
BEGIN
    IF NOT pg_try_advisory_xact_lock(7163551921) THEN
        RETURN 0;
    END IF;
    WITH gone AS (
        DELETE FROM processing_queue_counts c
         WHERE c.ctid IN (SELECT ctid FROM processing_queue_counts
                           WHERE slot <> 0 FOR UPDATE SKIP LOCKED)
        RETURNING pool, status, priority, n),
    folded AS (
        INSERT INTO processing_queue_counts AS c (pool, status, priority, slot, n)
        SELECT pool, status, priority, 0, sum(n) FROM gone GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
        ON CONFLICT (pool, status, priority, slot) DO UPDATE SET n = c.n + EXCLUDED.n
        RETURNING 1)
    SELECT count(*) INTO moved FROM gone;
    DELETE FROM processing_queue_counts WHERE slot = 0 AND n = 0;
    WITH gone AS (
        DELETE FROM processing_queue_type_counts c
         WHERE c.ctid IN (SELECT ctid FROM processing_queue_type_counts
                           WHERE slot <> 0 FOR UPDATE SKIP LOCKED)
        RETURNING pool, task_type, n),
    folded AS (
        INSERT INTO processing_queue_type_counts AS c (pool, task_type, slot, n)
        SELECT pool, task_type, 0, sum(n) FROM gone GROUP BY 1, 2 ORDER BY 1, 2
        ON CONFLICT (pool, task_type, slot) DO UPDATE SET n = c.n + EXCLUDED.n
        RETURNING 1)
    SELECT count(*) INTO moved_types FROM gone;
    DELETE FROM processing_queue_type_counts WHERE slot = 0 AND n = 0;
    RETURN moved + moved_types;
END $$;
