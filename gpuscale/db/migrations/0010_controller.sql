-- Controller state: the decision timeline, per-pool pause switches, month-to-date spend.

CREATE TABLE scaling_events (
    id            bigserial PRIMARY KEY,
    pool          text        NOT NULL,
    at            timestamptz NOT NULL DEFAULT now(),
    from_replicas integer,                  -- NULL when the provider's count was unknown
    to_replicas   integer     NOT NULL,
    reason        text        NOT NULL,     -- machine-readable (policy reason)
    detail        text        NOT NULL DEFAULT '',
    outcome       text        NOT NULL,     -- applied | unchanged | dry_run | paused | error | hold
    error         text,
    controller_id text        NOT NULL
);
CREATE INDEX scaling_events_pool_at ON scaling_events (pool, at DESC);

CREATE TABLE pool_control (
    pool       text PRIMARY KEY,
    paused     boolean     NOT NULL DEFAULT false,
    updated_at timestamptz NOT NULL DEFAULT now(),
    updated_by text
);

CREATE TABLE pool_spend (
    pool  text             NOT NULL,
    month date             NOT NULL,        -- first day of the month (UTC)
    usd   double precision NOT NULL DEFAULT 0,
    replica_seconds double precision NOT NULL DEFAULT 0,
    PRIMARY KEY (pool, month)
);
