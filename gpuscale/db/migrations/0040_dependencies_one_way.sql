-- Dependencies are stored one way: the edges in processing_task_deps.
--
-- Until now every task also carried a copy of its dependency ids in processing_queue.depends_on,
-- written at enqueue time and read back by claims; two copies of one fact can only drift apart.
-- Readers now derive the list from the edges.  pending_deps stays: it is not another copy but the
-- count of dependencies not yet done, the counter that unblocks a task in O(1).  The history
-- table (0020) keeps its own depends_on: it records what a finished task waited for, after
-- retention has deleted the edges.

-- gpuscale_complete (0020) copied processing_queue.depends_on into the history; it now reads
-- the edges.  Otherwise unchanged.
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
        RETURNING t.id, t.task_type, t.pool, t.document_id, t.priority, t.attempts,
                  t.created_at, t.queued_at, t.started_at, t.finished_at),
    hist AS (
        INSERT INTO processing_task_history (id, task_type, pool, document_id, priority, depends_on,
                                             attempts, created_at, queued_at, started_at,
                                             finished_at)
        SELECT u.id, u.task_type, u.pool, u.document_id, u.priority,
               ARRAY(SELECT d.depends_on FROM processing_task_deps d
                      WHERE d.task_id = u.id ORDER BY d.depends_on),
               u.attempts, u.created_at, u.queued_at, u.started_at, u.finished_at
          FROM upd u
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

ALTER TABLE processing_queue DROP COLUMN depends_on;
