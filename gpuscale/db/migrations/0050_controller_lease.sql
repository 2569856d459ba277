-- The controllers' leader lease (issue 10), in the manner of Kubernetes' coordination Lease: one
-- row per lease, the holder renews it; it is free once released (holder NULL) or once
-- renewed_at + duration_s has passed by the database's clock (one clock for every controller).
-- generation counts terms: each new holder gets the next one, and every provider action checks it
-- first (the fencing token), so a leader that slept through its term acts on nothing.
CREATE TABLE controller_lease (
    name        text PRIMARY KEY,
    holder      text,
    generation  bigint           NOT NULL CHECK (generation > 0),
    duration_s  double precision NOT NULL CHECK (duration_s > 0),
    acquired_at timestamptz      NOT NULL,
    renewed_at  timestamptz      NOT NULL
);
