-- Retention: finished tasks are deleted in batches by age (Queue.purge_done).
CREATE INDEX processing_queue_finished_idx
    ON processing_queue (finished_at) WHERE finished_at IS NOT NULL;
