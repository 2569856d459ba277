-- Every SQL statement of gpuscale, each under a name (loaded by gpuscale.db.queries).
--
-- A block starts with "-- name: <name>"; the comment lines right after it say what it does, and
-- the block runs until the next "-- name:".  Statements take $n parameters only: nothing is ever
-- spliced into this text.  jsonb parameters and columns are Python values (the connector
-- registers the codec), so no statement needs ::text round trips for them.
--
-- Sections: tasks (enqueue, claim, complete, fail, release, reap, reads), the server registry,
-- the controller's own tables, process plumbing (health, the leader lease, the demo database).

-- ====================================================================== tasks: enqueue

-- name: insert_tasks
-- Insert a whole batch in one statement.  Ids come from the caller when it needed them in
-- advance ($8: dependencies inside the batch), otherwise from the sequence; $9/$10 are the
-- dependency edges (task, dependency); $11 each task's height (the longest chain of dependents
-- after it in the batch: the claim order's critical path).  The counters trigger and the NOTIFY
-- for pools that got claimable work ride along.
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::jsonb[], $5::gpuscale_priority[],
                         $6::integer[], $7::integer[], $8::bigint[], $11::integer[])
         WITH ORDINALITY AS t(task_type, pool, document_id, payload, priority, max_attempts,
                              pending, given_id, height, ord)),
ids AS MATERIALIZED (
    SELECT ord, coalesce(given_id, nextval('processing_queue_id_seq')) AS id FROM input ORDER BY ord),
ins AS (
    INSERT INTO processing_queue (id, task_type, pool, document_id, payload, priority, status,
                                  pending_deps, max_attempts, queued_at, height)
    SELECT ids.id, i.task_type, i.pool, i.document_id, i.payload, i.priority,
           CASE WHEN i.pending > 0 THEN 'blocked' ELSE 'queued' END::gpuscale_task_status,
           i.pending, i.max_attempts,
           CASE WHEN i.pending > 0 THEN NULL ELSE now() END, i.height
      FROM input i JOIN ids USING (ord)
    RETURNING pool, status),
edges AS (
    INSERT INTO processing_task_deps (task_id, depends_on)
    SELECT task, dep FROM unnest($9::bigint[], $10::bigint[]) AS e(task, dep)
    RETURNING 1)
SELECT (SELECT array_agg(id ORDER BY ord) FROM ids) AS ids,
       (SELECT count(*) FROM edges) AS edges,
       (SELECT count(*) FROM (SELECT pg_notify('gpuscale_work', pool)
                                FROM (SELECT DISTINCT pool FROM ins WHERE status = 'queued') p) n)
           AS notified

-- name: lock_dependencies
-- The existing tasks a batch depends on, FOR SHARE: one being completed right now is waited for,
-- so we see its final status; one locked first cannot finish until the batch commits, and its
-- completer then sees the new edges (gpuscale_unblock runs as a later statement).
SELECT id, status::text, task_type FROM processing_queue
 WHERE id = ANY($1::bigint[]) ORDER BY id FOR SHARE

-- name: lock_document
-- Serialise the batches that start document $1 (a caller-chosen deck id) until the transaction
-- ends: two submissions of the same id cannot both see it free.  Transaction-scoped, so it holds
-- through a pooler in transaction mode.
SELECT pg_advisory_xact_lock(hashtextextended('gpuscale.document:' || $1, 0))

-- name: document_exists
-- Whether any task (of any status) belongs to document $1.
SELECT EXISTS (SELECT 1 FROM processing_queue WHERE document_id = $1)

-- name: documents_in_use
-- Every document name some task's payload holds (any status: a dead task may be retried): the
-- document store keeps these.  A scan, run by the hourly prune only.
SELECT DISTINCT payload->>'document' AS document FROM processing_queue WHERE payload ? 'document'

-- name: reserve_task_ids
-- $1 ids from the task sequence, for a batch whose tasks depend on each other.
SELECT array_agg(nextval('processing_queue_id_seq')) FROM generate_series(1, $1)

-- ====================================================================== tasks: worker side

-- name: claim_tasks
-- Claim up to $3 claimable tasks of pool $1 for server $2 with a lease of $4 s: critical, high,
-- normal; then the deck submitted first (its deadline comes first); then the task with the
-- longest chain of dependents (the deck graph's critical path); then first come (migration 0021).
-- SKIP LOCKED lets claimers run side by side.
WITH c AS (
    SELECT id FROM processing_queue
     WHERE pool = $1 AND status = 'queued'
       AND (not_before IS NULL OR not_before <= now())
     ORDER BY priority DESC, created_at, height DESC, id
     LIMIT $3
       FOR UPDATE SKIP LOCKED)
UPDATE processing_queue t
   SET status = 'running', lease_owner = $2,
       lease_expires_at = now() + make_interval(secs => $4),
       attempts = t.attempts + 1, started_at = now(), not_before = NULL,
       progress = 0, progress_message = NULL, updated_at = now()
  FROM c
 WHERE t.id = c.id
RETURNING t.id, t.task_type, t.pool, t.document_id, t.payload, t.priority::text,
          t.created_at, t.height, t.attempts, t.max_attempts,
          ARRAY(SELECT d.depends_on FROM processing_task_deps d
                 WHERE d.task_id = t.id ORDER BY d.depends_on) AS depends_on,
          t.lease_expires_at,
          extract(epoch FROM now() - t.queued_at)::float8 AS queue_wait_s

-- name: extend_leases
-- Push back by $2 s the leases server $1 holds (only ids $3 when given; with $4, only leases
-- that end within $4 s, so a heartbeat rewrites a task row every few beats, not every beat).
-- SKIP LOCKED: a row being completed or failed right now needs no longer lease, and waiting for
-- it could deadlock with a batched complete taking rows in another order.
UPDATE processing_queue SET lease_expires_at = now() + make_interval(secs => $2)
 WHERE id IN (SELECT id FROM processing_queue
               WHERE status = 'running' AND lease_owner = $1
                 AND ($3::bigint[] IS NULL OR id = ANY($3::bigint[]))
                 AND ($4::float8 IS NULL OR lease_expires_at < now() + make_interval(secs => $4))
                 FOR UPDATE SKIP LOCKED)
RETURNING id

-- name: report_progress
UPDATE processing_queue SET progress = $3, progress_message = $4, updated_at = now()
 WHERE id = $1 AND status = 'running' AND lease_owner = $2

-- name: complete_tasks
-- Mark tasks $1 done with results $2 if server $3 still holds them, and release their
-- dependents (gpuscale_complete, migration 0003); returns the ids completed.
SELECT id FROM gpuscale_complete($1::bigint[], $2::jsonb[], $3) AS id

-- name: fail_task
-- Record a failure of task $1 held by $2 with error $3.  Retryable ($4): queued again after a
-- jittered exponential backoff (base $5 s, cap $6 s), or dead once attempts are used up; not
-- retryable: failed.  Returns the new status, or no row when $2 no longer holds the task.
UPDATE processing_queue t
   SET status = CASE WHEN NOT $4 THEN 'failed'
                     WHEN t.attempts >= t.max_attempts THEN 'dead'
                     ELSE 'queued' END::gpuscale_task_status,
       not_before = CASE WHEN $4 AND t.attempts < t.max_attempts
           THEN now() + b.delay END,
       -- claimable again when the backoff ends: that is when queue wait starts
       queued_at = CASE WHEN $4 AND t.attempts < t.max_attempts
           THEN now() + b.delay ELSE t.queued_at END,
       finished_at = CASE WHEN NOT $4 OR t.attempts >= t.max_attempts THEN now() END,
       error = $3, lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
  FROM (SELECT make_interval(secs => least($6, $5 * power(2, q.attempts - 1))
                                     * (0.5 + random())) AS delay
          FROM processing_queue q WHERE q.id = $1) b
 WHERE t.id = $1 AND t.status = 'running' AND t.lease_owner = $2
RETURNING status::text

-- name: task_status
SELECT status::text FROM processing_queue WHERE id = $1

-- name: fail_dependents
-- Tasks waiting (directly or not) for the finally failed tasks $1 fail, naming the dependency.
SELECT gpuscale_fail_dependents($1::bigint[])

-- name: release_task
-- Hand task $1 held by server $2 back without spending an attempt; returns how many (0 or 1).
WITH r AS (
    UPDATE processing_queue
       SET status = 'queued', attempts = greatest(attempts - 1, 0), lease_owner = NULL,
           lease_expires_at = NULL, not_before = NULL, queued_at = now(),
           progress = 0, progress_message = NULL, updated_at = now()
     WHERE status = 'running' AND id = $1 AND lease_owner = $2
    RETURNING pool)
SELECT (SELECT count(*) FROM r)
     + 0 * (SELECT count(*) FROM (SELECT pg_notify('gpuscale_work', pool)
                                    FROM (SELECT DISTINCT pool FROM r) p) n)

-- name: release_server_tasks
-- Hand back everything server $1 holds, without spending attempts; returns how many.
WITH r AS (
    UPDATE processing_queue
       SET status = 'queued', attempts = greatest(attempts - 1, 0), lease_owner = NULL,
           lease_expires_at = NULL, not_before = NULL, queued_at = now(),
           progress = 0, progress_message = NULL, updated_at = now()
     WHERE status = 'running' AND lease_owner = $1
    RETURNING pool)
SELECT (SELECT count(*) FROM r)
     + 0 * (SELECT count(*) FROM (SELECT pg_notify('gpuscale_work', pool)
                                    FROM (SELECT DISTINCT pool FROM r) p) n)

-- name: cancel_task
UPDATE processing_queue
   SET status = 'cancelled', error = 'cancelled', finished_at = now(),
       lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
 WHERE id = $1 AND status IN ('blocked', 'queued', 'running')
RETURNING id

-- name: requeue_expired
-- Running tasks whose lease ran out go back to queued (or dead once attempts are used up);
-- returns each one's id and new status.
WITH c AS (
    SELECT id FROM processing_queue
     WHERE status = 'running' AND lease_expires_at < now() FOR UPDATE SKIP LOCKED),
r AS (
    UPDATE processing_queue t
       SET status = CASE WHEN t.attempts >= t.max_attempts THEN 'dead'
                         ELSE 'queued' END::gpuscale_task_status,
           error = 'lease expired (held by ' || t.lease_owner || ')',
           finished_at = CASE WHEN t.attempts >= t.max_attempts THEN now() END,
           queued_at = CASE WHEN t.attempts >= t.max_attempts THEN t.queued_at ELSE now() END,
           lease_owner = NULL, lease_expires_at = NULL, not_before = NULL, updated_at = now()
      FROM c WHERE t.id = c.id AND t.status = 'running'
    RETURNING t.id, t.pool, t.status::text AS status)
SELECT id, status,
       (SELECT count(*) FROM (SELECT pg_notify('gpuscale_work', pool)
          FROM (SELECT DISTINCT pool FROM r WHERE status = 'queued') p) n) AS notified
  FROM r

-- name: requeue_server_tasks
-- The running tasks of servers $1 (declared dead) go back to queued (or dead once attempts are
-- used up: the interrupted attempt counts); returns each one's id and new status.
WITH c AS (
    SELECT id FROM processing_queue
     WHERE status = 'running' AND lease_owner = ANY($1::text[]) FOR UPDATE SKIP LOCKED),
r AS (
    UPDATE processing_queue t
       SET status = CASE WHEN t.attempts >= t.max_attempts THEN 'dead'
                         ELSE 'queued' END::gpuscale_task_status,
           error = 'server ' || t.lease_owner || ' stopped heartbeating',
           finished_at = CASE WHEN t.attempts >= t.max_attempts THEN now() END,
           queued_at = CASE WHEN t.attempts >= t.max_attempts THEN t.queued_at ELSE now() END,
           lease_owner = NULL, lease_expires_at = NULL, not_before = NULL, updated_at = now()
      FROM c WHERE t.id = c.id AND t.status = 'running'
    RETURNING t.id, t.pool, t.status::text AS status)
SELECT id, status,
       (SELECT count(*) FROM (SELECT pg_notify('gpuscale_work', pool)
          FROM (SELECT DISTINCT pool FROM r WHERE status = 'queued') p) n) AS notified
  FROM r

-- name: compact_counts
-- Fold the per-connection counter shards together; returns how many rows it folded.
SELECT gpuscale_compact_counts()

-- ====================================================================== tasks: reads

-- name: finished_since
-- Tasks that finished (done, failed, dead) after $1, oldest first, at most $2, with their queue
-- wait and the duration of their last attempt.
SELECT pool, task_type, status::text AS status, finished_at,
       extract(epoch FROM started_at - queued_at)::float8 AS wait_s,
       extract(epoch FROM finished_at - started_at)::float8 AS duration_s
  FROM processing_queue
 WHERE finished_at > $1 AND status IN ('done', 'failed', 'dead')
 ORDER BY finished_at
 LIMIT $2

-- name: running_by_server
SELECT lease_owner, count(*) AS n FROM processing_queue
 WHERE status = 'running' AND lease_owner IS NOT NULL GROUP BY 1

-- name: get_task
SELECT id, task_type, pool, document_id, payload, priority::text, status::text,
       ARRAY(SELECT d.depends_on FROM processing_task_deps d
              WHERE d.task_id = t.id ORDER BY d.depends_on) AS depends_on,
       pending_deps, attempts, max_attempts, not_before, lease_owner, lease_expires_at, progress,
       progress_message, result, error, created_at, queued_at, started_at, finished_at, updated_at
  FROM processing_queue t WHERE id = $1

-- name: watch_task
-- Ask for NOTIFY gpuscale_finished when task $1 finishes (migration 0060) and read it, as get_task.
-- No row when it has already finished (or does not exist): read it with get_task then.  The
-- update waits for a completion in progress and then sees it, so a finish is never missed: either
-- this returns nothing, or the row carries the flag before the task can finish.
UPDATE processing_queue t SET notify_finished = true
 WHERE id = $1 AND status NOT IN ('done', 'failed', 'dead', 'cancelled')
RETURNING id, task_type, pool, document_id, payload, priority::text, status::text,
       ARRAY(SELECT d.depends_on FROM processing_task_deps d
              WHERE d.task_id = t.id ORDER BY d.depends_on) AS depends_on,
       pending_deps, attempts, max_attempts, not_before, lease_owner, lease_expires_at, progress,
       progress_message, result, error, created_at, queued_at, started_at, finished_at, updated_at

-- name: document_tasks
-- Every task of document $1 with all its columns, by id.
SELECT id, task_type, pool, document_id, payload, priority::text, status::text,
       ARRAY(SELECT d.depends_on FROM processing_task_deps d
              WHERE d.task_id = t.id ORDER BY d.depends_on) AS depends_on,
       pending_deps, attempts, max_attempts, not_before, lease_owner, lease_expires_at, progress,
       progress_message, result, error, created_at, queued_at, started_at, finished_at, updated_at
  FROM processing_queue t WHERE document_id = $1 ORDER BY id

-- name: list_tasks
-- A page of tasks by ascending id after $3 (keyset paging), at most $4, of document $1 and with
-- status $2 when given; without payload and result.
SELECT id, task_type, pool, document_id, priority::text, status::text, attempts,
       max_attempts, progress, progress_message, error, created_at, started_at,
       finished_at, updated_at
  FROM processing_queue
 WHERE ($1::text IS NULL OR document_id = $1)
   AND ($2::text IS NULL OR status = $2::gpuscale_task_status)
   AND id > $3
 ORDER BY id LIMIT $4

-- name: cancel_document_tasks
-- Cancel every unfinished task of document $1; returns their ids.
UPDATE processing_queue
   SET status = 'cancelled', error = 'cancelled', finished_at = now(),
       lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
 WHERE document_id = $1 AND status IN ('blocked', 'queued', 'running')
RETURNING id

-- name: queue_snapshot
-- Everything the controller reads of the queue, in one statement: one round trip and one
-- snapshot (a tick used to take nine round trips, one after the other).  Each column is a JSON
-- array of rows; the cost is the counters plus the running and blocked rows (bounded by the
-- replicas' slots and the decks in flight), never the whole queue:
-- counts: per (pool, status, priority), from the counters table;
-- by_type: claimable work per (pool, task type), from the type counters (migration 0013);
-- backoff: queued tasks still waiting out a retry backoff, per (pool, priority, task type);
-- blocked_ready: per pool, blocked tasks none of whose dependencies is itself blocked;
-- ages: per pool, the age in seconds of the oldest claimable task (one index probe per priority);
-- decks: per pool, the age of the oldest deck with a claimable task (the first row of the claim
--   index per priority);
-- running: every running task with how long it has run, its progress and its deck's age;
-- blocked: blocked tasks (with their deck's age) and each of their unfinished dependencies (by
--   id: the observation follows chains of blocked tasks to their ETA).
-- Without $1 only the counts (counts, backoff, blocked_ready, ages): the rest is NULL and not read
-- (a scalar subquery in a CASE branch not taken never runs).
SELECT
  (SELECT coalesce(json_agg(c), '[]') FROM (
      SELECT pool, status::text AS status, priority::text AS priority, sum(n)::bigint AS n
        FROM processing_queue_counts GROUP BY 1, 2, 3 HAVING sum(n) <> 0) c) AS counts,
  CASE WHEN $1::boolean THEN (SELECT coalesce(json_agg(c), '[]') FROM (
        SELECT pool, task_type, sum(n)::bigint AS n FROM processing_queue_type_counts
         GROUP BY 1, 2 HAVING sum(n) <> 0) c) END AS by_type,
  (SELECT coalesce(json_agg(b), '[]') FROM (
      SELECT pool, priority::text AS priority, task_type, count(*) AS n FROM processing_queue
       WHERE status = 'queued' AND not_before IS NOT NULL AND not_before > now()
       GROUP BY 1, 2, 3) b) AS backoff,
  (SELECT coalesce(json_agg(b), '[]') FROM (
      SELECT t.pool, count(*) AS n FROM processing_queue t
       WHERE t.status = 'blocked'
         AND NOT EXISTS (SELECT 1 FROM processing_task_deps d
                           JOIN processing_queue p ON p.id = d.depends_on
                          WHERE d.task_id = t.id AND p.status = 'blocked')
       GROUP BY 1) b) AS blocked_ready,
  (SELECT coalesce(json_agg(a), '[]') FROM (
      SELECT p.pool, extract(epoch FROM now() - min(x.queued_at))::float8 AS age
        FROM (SELECT DISTINCT pool FROM processing_queue_counts) p
       CROSS JOIN unnest(enum_range(NULL::gpuscale_priority)) AS pr(priority)
       CROSS JOIN LATERAL (
          SELECT q.queued_at FROM processing_queue q
           WHERE q.pool = p.pool AND q.status = 'queued' AND q.priority = pr.priority
             AND (q.not_before IS NULL OR q.not_before <= now())
           ORDER BY q.priority DESC, q.id LIMIT 1) x
       GROUP BY p.pool) a) AS ages,
  CASE WHEN $1 THEN (SELECT coalesce(json_agg(a), '[]') FROM (
        SELECT p.pool, extract(epoch FROM now() - min(x.created_at))::float8 AS age
          FROM (SELECT DISTINCT pool FROM processing_queue_type_counts) p
         CROSS JOIN unnest(enum_range(NULL::gpuscale_priority)) AS pr(priority)
         CROSS JOIN LATERAL (
            SELECT q.created_at FROM processing_queue q
             WHERE q.pool = p.pool AND q.status = 'queued' AND q.priority = pr.priority
             ORDER BY q.priority DESC, q.created_at LIMIT 1) x
         GROUP BY p.pool) a) END AS decks,
  CASE WHEN $1 THEN (SELECT coalesce(json_agg(r), '[]') FROM (
        SELECT id, pool, task_type, lease_owner, progress,
               extract(epoch FROM now() - started_at)::float8 AS elapsed_s,
               extract(epoch FROM now() - created_at)::float8 AS deck_age_s
          FROM processing_queue WHERE status = 'running') r) END AS running,
  CASE WHEN $1 THEN (SELECT coalesce(json_agg(b), '[]') FROM (
        SELECT t.id, t.pool, t.task_type,
               extract(epoch FROM now() - t.created_at)::float8 AS deck_age_s,
               p.id AS dep_id, p.pool AS dep_pool, p.task_type AS dep_type,
               p.status::text AS dep_status, p.lease_owner AS dep_server,
               p.progress AS dep_progress,
               extract(epoch FROM now() - p.started_at)::float8 AS dep_elapsed_s
          FROM processing_queue t
          JOIN processing_task_deps d ON d.task_id = t.id
          JOIN processing_queue p ON p.id = d.depends_on
         WHERE t.status = 'blocked' AND p.status IN ('blocked', 'queued', 'running')
         ORDER BY t.id, p.id) b) END AS blocked

-- name: tasks_for_document
SELECT id, task_type, pool, status::text, progress, error FROM processing_queue
 WHERE document_id = $1 ORDER BY id

-- name: dependency_results
-- The tasks task $1 directly depends on, with their payloads and results.
SELECT p.id, p.task_type, p.payload, p.result
  FROM processing_task_deps d JOIN processing_queue p ON p.id = d.depends_on
 WHERE d.task_id = $1 ORDER BY p.id

-- name: depth
-- Claimable tasks in pool $1, at most $2: counters minus tasks in retry backoff.
SELECT greatest(0, least($2::bigint,
       (SELECT coalesce(sum(n), 0) FROM processing_queue_counts
         WHERE pool = $1 AND status = 'queued')
     - (SELECT count(*) FROM processing_queue
         WHERE pool = $1 AND status = 'queued' AND not_before IS NOT NULL
           AND not_before > now())))

-- name: depth_by_scan
-- The same number as depth without a cap, by counting rows (benchmarks and tests compare).
SELECT count(*) FROM processing_queue
 WHERE pool = $1 AND status = 'queued'
   AND (not_before IS NULL OR not_before <= now())

-- ====================================================================== tasks: housekeeping

-- name: purge_pool
-- Delete every task of pool $1 (benchmarks' scratch pool).  Dependencies across pools are
-- removed by the cascade; a dependent elsewhere would wait forever, so this is for isolated pools.
DELETE FROM processing_queue WHERE pool = $1

-- name: purge_done
-- Delete up to $2 done tasks that finished more than $1 s ago.  Failed, dead and cancelled tasks
-- stay (dead letters); a done task an unfinished task still depends on stays (its input).
DELETE FROM processing_queue
 WHERE id IN (
    SELECT q.id FROM processing_queue q
     WHERE q.finished_at IS NOT NULL
       AND q.finished_at < now() - make_interval(secs => $1)
       AND q.status = 'done'
       AND NOT EXISTS (
            SELECT 1 FROM processing_task_deps d
              JOIN processing_queue t ON t.id = d.task_id
             WHERE d.depends_on = q.id
               AND t.status IN ('blocked', 'queued', 'running'))
     ORDER BY q.finished_at
     LIMIT $2
       FOR UPDATE SKIP LOCKED)

-- name: history_since
-- Completed tasks submitted at or after $1, from the compact history (migration 0020).
SELECT id, task_type, pool, document_id, priority::text AS priority, depends_on,
       attempts, created_at, queued_at, started_at, finished_at
  FROM processing_task_history
 WHERE created_at >= $1
 ORDER BY created_at, id

-- name: purge_history
-- Delete up to $2 history rows of tasks submitted more than $1 s ago.
DELETE FROM processing_task_history
 WHERE id IN (SELECT id FROM processing_task_history
               WHERE created_at < now() - make_interval(secs => $1)
               ORDER BY created_at LIMIT $2)

-- name: vacuum_queue
VACUUM (ANALYZE) processing_queue, processing_task_deps, processing_queue_counts

-- ====================================================================== server registry

-- name: register_server
-- Insert or refresh a server's row; $11 (started_at) keeps the old value when NULL.
INSERT INTO processing_servers AS s
    (id, server_type, pool, container_id, status, capabilities, current_load,
     max_concurrent_tasks, models, version, last_heartbeat, started_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, now(), coalesce($11, now()))
ON CONFLICT (id) DO UPDATE SET
    server_type = EXCLUDED.server_type, pool = EXCLUDED.pool,
    container_id = EXCLUDED.container_id, status = EXCLUDED.status,
    capabilities = EXCLUDED.capabilities, current_load = EXCLUDED.current_load,
    max_concurrent_tasks = EXCLUDED.max_concurrent_tasks, models = EXCLUDED.models,
    version = EXCLUDED.version, last_heartbeat = now(),
    started_at = coalesce($11, s.started_at), updated_at = now()

-- name: server_heartbeat
-- Refresh server $1's heartbeat and load; no row changes when it is unknown or declared dead.
UPDATE processing_servers
   SET last_heartbeat = now(), current_load = $2, status = coalesce($3, status),
       updated_at = now()
 WHERE id = $1 AND status <> 'dead'

-- name: set_server_status
UPDATE processing_servers SET status = $2, updated_at = now() WHERE id = $1

-- name: delete_server
DELETE FROM processing_servers WHERE id = $1

-- name: list_servers
-- Servers of pool $1 (all pools when NULL), dead ones only when $2.
SELECT id, pool, container_id, status, capabilities, current_load,
       max_concurrent_tasks, models, version, last_heartbeat, started_at
  FROM processing_servers
 WHERE ($1::text IS NULL OR pool = $1) AND ($2 OR status <> 'dead')
 ORDER BY pool, started_at, id

-- name: purge_dead_servers
DELETE FROM processing_servers
 WHERE status = 'dead' AND updated_at < now() - make_interval(secs => $1)

-- name: mark_silent_servers_dead
-- Servers silent for $1 s become dead; returns their ids.
UPDATE processing_servers SET status = 'dead', updated_at = now()
 WHERE status <> 'dead' AND last_heartbeat < now() - make_interval(secs => $1)
RETURNING id

-- ====================================================================== controller tables

-- name: record_scaling_event
INSERT INTO scaling_events
       (pool, from_replicas, to_replicas, reason, detail, outcome, error, controller_id)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)

-- name: scaling_events
-- The latest $2 decisions of pool $1 (all pools when NULL), newest first.
SELECT id, pool, at, from_replicas, to_replicas, reason, detail, outcome, error, controller_id
  FROM scaling_events
 WHERE $1::text IS NULL OR pool = $1
 ORDER BY at DESC, id DESC
 LIMIT $2

-- name: last_scaling_events
-- The latest recorded decision of every pool.
SELECT DISTINCT ON (pool) pool, to_replicas, reason, outcome, extract(epoch FROM at) AS at
  FROM scaling_events ORDER BY pool, at DESC, id DESC

-- name: set_pool_paused
INSERT INTO pool_control (pool, paused, updated_by) VALUES ($1, $2, $3)
ON CONFLICT (pool) DO UPDATE
   SET paused = EXCLUDED.paused, updated_at = now(), updated_by = EXCLUDED.updated_by

-- name: paused_pools
SELECT pool FROM pool_control WHERE paused

-- name: registry_if_changed
-- The pools paused (on every row) and the registry's change counter (migration 0065) and, only
-- when it is not $1, every server that is not dead with what the controller reads of it; else
-- one row without a server.  One statement, one snapshot: the list matches its counter.
SELECT p.paused, v.version, s.id, s.pool, s.container_id, s.status, s.started_at
  FROM (SELECT coalesce(array_agg(pool), '{}') AS paused FROM pool_control WHERE paused) p
 CROSS JOIN processing_servers_version v
  LEFT JOIN processing_servers s ON v.version IS DISTINCT FROM $1::bigint AND s.status <> 'dead'
 ORDER BY s.pool, s.started_at, s.id

-- name: queued_critical_pools
-- Those of pools $1 with a queued critical task, from the counters (the fast path's check).
SELECT pool FROM processing_queue_counts
 WHERE pool = ANY($1::text[]) AND status = 'queued' AND priority = 'critical'
 GROUP BY 1 HAVING sum(n) > 0

-- name: add_pool_spend
INSERT INTO pool_spend (pool, month, usd, replica_seconds) VALUES ($1, $2, $3, $4)
ON CONFLICT (pool, month) DO UPDATE
   SET usd = pool_spend.usd + EXCLUDED.usd,
       replica_seconds = pool_spend.replica_seconds + EXCLUDED.replica_seconds

-- name: month_spend
SELECT pool, usd FROM pool_spend WHERE month = $1

-- name: save_pool_states
-- The saved policy state of pools $1 ($2: each one's), written by controller $3 in one statement.
INSERT INTO pool_state (pool, state, controller_id)
SELECT pool, state, $3 FROM unnest($1::text[], $2::jsonb[]) AS s(pool, state)
ON CONFLICT (pool) DO UPDATE
   SET state = EXCLUDED.state, controller_id = EXCLUDED.controller_id, updated_at = now()

-- name: load_pool_states
SELECT pool, state FROM pool_state

-- ====================================================================== process plumbing

-- name: ping
-- Is the session alive? (health checks, and a LISTEN connection noticing silent breakage)
SELECT 1

-- name: database_now
SELECT now()

-- name: prime_array_codecs
-- Never run, only prepared by every new connection (see connector.init_connection): the array
-- types the statements pass or return, so the driver learns their codecs at connect time.
SELECT $1::bigint[], $2::integer[], $3::jsonb[], $4::text[], $5::float8[]

-- name: queue_schema_exists
SELECT to_regclass('processing_queue') IS NOT NULL

-- ====================================================================== the leader lease
-- Times are the database's (clock_timestamp(), not the transaction's now()), so every controller
-- judges expiry by one clock.  $1 is the lease's name, $2 the holder's identity.

-- name: lease_acquire
-- Take lease $1 for $2 if it is free: never taken, released, expired, or already $2's (a holder
-- that stepped down starts a new term).  A new term gets the next generation.  No row: another
-- holder's term is running.  Two candidates at once: the row lock orders them, and the second
-- sees the first's fresh term and gets no row.
INSERT INTO controller_lease AS l (name, holder, generation, duration_s, acquired_at, renewed_at)
VALUES ($1, $2, 1, $3, clock_timestamp(), clock_timestamp())
ON CONFLICT (name) DO UPDATE
   SET holder = EXCLUDED.holder, generation = l.generation + 1, duration_s = EXCLUDED.duration_s,
       acquired_at = EXCLUDED.acquired_at, renewed_at = EXCLUDED.renewed_at
 WHERE l.holder IS NULL OR l.holder = EXCLUDED.holder
    OR l.renewed_at + make_interval(secs => l.duration_s) <= clock_timestamp()
RETURNING generation

-- name: lease_renew
-- Extend $2's term $3 of lease $1 (for $4 seconds from now), only while it has not expired: an
-- expired term is over even if nobody took it.  No row: the term is over.
UPDATE controller_lease
   SET renewed_at = clock_timestamp(), duration_s = $4
 WHERE name = $1 AND holder = $2 AND generation = $3
   AND renewed_at + make_interval(secs => duration_s) > clock_timestamp()
RETURNING generation

-- name: lease_check
-- The fence before a provider action: is term $3 of lease $1 still $2's and unexpired?
SELECT generation FROM controller_lease
 WHERE name = $1 AND holder = $2 AND generation = $3
   AND renewed_at + make_interval(secs => duration_s) > clock_timestamp()

-- name: lease_release
-- Hand the lease back at the end of term $3, so a standby need not wait for it to expire.
UPDATE controller_lease SET holder = NULL WHERE name = $1 AND holder = $2 AND generation = $3

-- name: lease_read
-- The lease as it stands, with the database's clock (status, tests).
SELECT holder, generation, duration_s, acquired_at, renewed_at,
       renewed_at + make_interval(secs => duration_s) <= clock_timestamp() AS expired,
       clock_timestamp() AS now
  FROM controller_lease WHERE name = $1

-- name: max_connections
SELECT current_setting('max_connections')::integer

-- name: client_connections
-- Client connections to the server, leaving out those whose application_name is $1 (a
-- benchmark's own).
SELECT count(*) FROM pg_stat_activity
 WHERE backend_type = 'client backend' AND application_name <> $1

-- name: count_unfinished_of
-- How many of tasks $1 are not done yet.
SELECT count(*) FROM processing_queue WHERE id = ANY($1::bigint[]) AND status <> 'done'

-- name: fleet_bench_outcome
-- What became of tasks $1: done, still unfinished, failed, how many rows exist at all (one
-- missing is a lost task), retried, and timings from the server's clock (bench fleet).
SELECT count(*) FILTER (WHERE status = 'done') AS done,
       count(*) FILTER (WHERE status IN ('blocked', 'queued', 'running')) AS unfinished,
       count(*) FILTER (WHERE status IN ('failed', 'dead')) AS failed,
       count(*) AS present,
       coalesce(sum(attempts - 1) FILTER (WHERE attempts > 1), 0) AS retried,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY e2e) FILTER (WHERE status = 'done') AS e2e_p50,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY e2e) FILTER (WHERE status = 'done') AS e2e_p99,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY wait) FILTER (WHERE status = 'done') AS wait_p50,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY wait) FILTER (WHERE status = 'done') AS wait_p99
  FROM (SELECT status, attempts,
               extract(epoch FROM finished_at - created_at) AS e2e,
               extract(epoch FROM started_at - queued_at) AS wait
          FROM processing_queue WHERE id = ANY($1::bigint[])) t

-- name: drop_demo_database
-- The demo starts from a fresh database each run, so the counts on screen are this run's.
DROP DATABASE IF EXISTS gpuscale_demo WITH (FORCE)

-- name: create_demo_database
CREATE DATABASE gpuscale_demo

-- ====================================================================== gpuscale replay

-- name: replay_final_count
-- How many of the replayed tasks ($1) are in one of the states $2 (final ones).
SELECT count(*) FROM processing_queue WHERE id = ANY($1::bigint[]) AND status::text = ANY($2::text[])

-- name: replay_task_times
-- The replayed tasks' states and times (epoch seconds), to report the replay in trace time.
SELECT id, status::text AS status,
       extract(epoch FROM queued_at)::float8 AS queued_at,
       extract(epoch FROM started_at)::float8 AS started_at,
       extract(epoch FROM finished_at)::float8 AS finished_at,
       attempts, result->>'server_id' AS server
  FROM processing_queue WHERE id = ANY($1::bigint[])

-- name: replay_registrations
-- When each replica's worker registered (servers are deleted when they deregister, so the
-- replay samples this while it runs).
SELECT container_id, extract(epoch FROM started_at)::float8 AS started_at
  FROM processing_servers WHERE container_id IS NOT NULL

-- name: replay_scale_log
-- Every scale change the controller applied, in order (epoch seconds), for the replay's timeline.
SELECT pool, extract(epoch FROM at)::float8 AS at, from_replicas, to_replicas, reason, detail
  FROM scaling_events
 WHERE from_replicas IS NOT NULL AND to_replicas <> from_replicas AND outcome = 'applied'
 ORDER BY at, id

-- name: replay_scale_events
-- The scale changes the controller applied, per pool and reason.
SELECT pool, reason, count(*) AS n FROM scaling_events
 WHERE from_replicas IS NOT NULL AND to_replicas <> from_replicas AND outcome = 'applied'
 GROUP BY 1, 2
