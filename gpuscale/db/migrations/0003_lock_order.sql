-- Dependents are locked in id order before they are updated: several workers completing (or
-- failing) the page batches of one deck at the same moment all touch the same dependents, and
-- an UPDATE's join order is not fixed, so without this two of them could deadlock.

CREATE OR REPLACE FUNCTION gpuscale_unblock(p_done bigint[]) RETURNS integer LANGUAGE plpgsql AS $$
DECLARE released integer;
BEGIN
    PERFORM 1 FROM processing_queue
      WHERE id IN (SELECT task_id FROM processing_task_deps WHERE depends_on = ANY (p_done))
        AND status = 'blocked'
      ORDER BY id FOR UPDATE;
    WITH c AS (
        SELECT d.task_id, count(*)::integer AS n
          FROM processing_task_deps d WHERE d.depends_on = ANY (p_done) GROUP BY d.task_id),
    u AS (
        UPDATE processing_queue t
           SET pending_deps = t.pending_deps - c.n,
               status = CASE WHEN t.pending_deps - c.n = 0 THEN 'queued' ELSE t.status END,
               queued_at = CASE WHEN t.pending_deps - c.n = 0 THEN now() ELSE t.queued_at END,
               updated_at = now()
          FROM c
         WHERE t.id = c.task_id AND t.status = 'blocked'
        RETURNING t.pool, t.status),
    pools AS (SELECT DISTINCT pool FROM u WHERE status = 'queued')
    SELECT count(*) INTO released FROM (SELECT pg_notify('gpuscale_work', pool) FROM pools) n;
    RETURN released;
END $$;

CREATE OR REPLACE FUNCTION gpuscale_fail_dependents(p_failed bigint[]) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    frontier bigint[] := p_failed;
    total integer := 0;
    level integer;
BEGIN
    LOOP
        PERFORM 1 FROM processing_queue
          WHERE id IN (SELECT task_id FROM processing_task_deps WHERE depends_on = ANY (frontier))
            AND status = 'blocked'
          ORDER BY id FOR UPDATE;
        WITH u AS (
            UPDATE processing_queue t
               SET status = 'failed',
                   error = format('dependency %s (%s) %s: %s', p.id, p.task_type, p.status,
                                  coalesce(p.error, 'no error recorded')),
                   finished_at = now(), updated_at = now()
              FROM processing_task_deps d
              JOIN processing_queue p ON p.id = d.depends_on
             WHERE d.depends_on = ANY (frontier) AND t.id = d.task_id AND t.status = 'blocked'
            RETURNING t.id)
        SELECT array_agg(id), count(*) INTO frontier, level FROM u;
        EXIT WHEN level = 0;
        total := total + level;
    END LOOP;
    RETURN total;
END $$;
