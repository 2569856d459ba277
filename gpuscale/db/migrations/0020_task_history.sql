-- A compact history of finished work (issue 12), for `gpuscale trace export` and tuning.
--
-- Retention deletes `done` tasks after retention_days (a week by default); a month of load must
-- outlive that.  One narrow row per completed task: when it was submitted, became claimable,
-- started and finished, its type, pool, priority and the ids it depended on — no payload, no
-- result.  Written by gpuscale_complete in the same statement that marks the task done, so the
-- history has every completion and nothing that was not completed.  Rows are kept for
-- history_retention_days (purge_history).

CREATE TABLE processing_task_history (
    id           bigint PRIMARY KEY,             -- the task's id in processing_queue
    task_type    text NOT NULL,
    pool         text NOT NULL,
    document_id  text,
    priority     gpuscale_priority NOT NULL,
    depends_on   bigint[] NOT NULL DEFAULT '{}',
    attempts     integer NOT NULL,
    created_at   timestamptz NOT NULL,           -- submitted (a deck's graph: all at once)
    queued_at    timestamptz,                    -- last became claimable
    started_at   timestamptz,                    -- claimed by the attempt that finished it
    finished_at  timestamptz NOT NULL
);
CREATE INDEX processing_task_history_created_idx ON processing_task_history (created_at);

CREATE OR REPLACE FUNCTION gpuscale_complete(p_ids bigint[], p_results jsonb[], p_server text)
RETURNS SETOF bigint LANGUAGE plpgsql AS $$
DECLARE done_ids bigint[];
BEGIN
    WITH upd AS (
        UPDATE processing_queue t
           SET status = 'done', result = r.result, progress = 100, finished_at = now(),
               updated_at = now(), lease_owner = NULL, lease_expires_at = NULL
          FROM unnest(p_ids, p_results) AS r(id, result)
         WHERE t.id = r.id AND t.status = 'running' AND t.lease_owner = p_server
        RETURNING t.id, t.task_type, t.pool, t.document_id, t.priority, t.depends_on, t.attempts,
                  t.created_at, t.queued_at, t.started_at, t.finished_at),
    hist AS (
        INSERT INTO processing_task_history (id, task_type, pool, document_id, priority, depends_on,
                                             attempts, created_at, queued_at, started_at,
                                             finished_at)
        SELECT id, task_type, pool, document_id, priority, depends_on, attempts, created_at,
               queued_at, started_at, finished_at
          FROM upd
        ON CONFLICT (id) DO NOTHING
        RETURNING id)
    SELECT array_agg(id) INTO done_ids FROM upd;
    IF done_ids IS NULL THEN
        RETURN;
    END IF;
    -- Cheap probe first: most tasks (and every benchmark task) have no dependents.
    IF EXISTS (SELECT 1 FROM processing_task_deps WHERE depends_on = ANY (done_ids)) THEN
        PERFORM gpuscale_unblock(done_ids);
    END IF;
    RETURN QUERY SELECT unnest(done_ids);
END $$;
