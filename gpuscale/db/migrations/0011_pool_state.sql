-- The policy's memory per pool (PoolState), so a new leader picks up the old one's timers
-- (scale-up/idle delays, startup-failure backoff) instead of starting from scratch.
CREATE TABLE pool_state (
    pool          text PRIMARY KEY,
    state         jsonb       NOT NULL,
    controller_id text        NOT NULL,
    updated_at    timestamptz NOT NULL DEFAULT now()
);
