-- Claim order for decks (issue 12): priority, then the deck submitted first (its deadline comes
-- first), then the task with the longest chain of dependents after it (the deck graph's
-- critical path: healthcare_classification before the other extractions, the page batches
-- before anything), then first come.  `height` is that chain's length in tasks, worked out
-- when the graph is enqueued.  A deck's tasks share one created_at (one transaction).

ALTER TABLE processing_queue ADD COLUMN height integer NOT NULL DEFAULT 0 CHECK (height >= 0);

DROP INDEX processing_queue_claim_idx;
CREATE INDEX processing_queue_claim_idx
    ON processing_queue (pool, priority DESC, created_at, height DESC, id) WHERE status = 'queued';
