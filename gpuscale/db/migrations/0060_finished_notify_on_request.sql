-- NOTIFY gpuscale_finished only for the tasks someone waits on (issue 14).
--
-- PostgreSQL serialises every committing transaction that has sent a NOTIFY on one cluster-wide
-- lock, held until its commit is done.  Notifying on every finished task (migration 0030) thus
-- made every completion in the fleet queue behind every other: at 500 simulated replicas the fleet
-- bench logged hundreds of waits of 50 ms and more on that lock, and completions (and the claims
-- queued behind them in a pooler) took seconds.  Now the API marks the tasks its `?wait` requests
-- watch (query watch_task), and only those notify when they finish; a task nobody waits on
-- finishes without the lock.
ALTER TABLE processing_queue ADD COLUMN notify_finished boolean NOT NULL DEFAULT false;

DROP TRIGGER processing_queue_finished_notify ON processing_queue;

CREATE TRIGGER processing_queue_finished_notify
    AFTER UPDATE OF status ON processing_queue
    FOR EACH ROW
    WHEN (NEW.notify_finished
          AND NEW.status IN ('done', 'failed', 'dead', 'cancelled')
          AND OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION gpuscale_notify_finished();
