"""The worker's Prometheus metrics (served on ``GET /metrics`` of the worker HTTP API).

They live in their own registry, not the process-wide default one, so a process that embeds both a
controller and workers (tests, the demo) never registers the same name twice; the controller's
metrics are in :mod:`gpuscale.controller.metrics`.  Names have the ``gpuscale_`` prefix and a ``pool``
label, per the design's metric conventions.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

# From seconds (noop, small text prompts) to the half hour a big visual batch can take.
_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)
_WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

TASKS = Counter(
    "gpuscale_worker_tasks",
    "Tasks finished by this worker, by outcome (done, failed, retry, dead, released, lost).",
    ["pool", "task_type", "outcome"],
    registry=REGISTRY,
)
QUEUE_WAIT = Histogram(
    "gpuscale_worker_queue_wait_seconds",
    "Time a task waited queued before this worker claimed it (fleet-wide: the controller's "
    "gpuscale_queue_wait_seconds).",
    ["pool", "task_type"],
    buckets=_WAIT_BUCKETS,
    registry=REGISTRY,
)
TASK_DURATION = Histogram(
    "gpuscale_worker_task_duration_seconds",
    "Time from claim to completion or failure of a task on this worker.",
    ["pool", "task_type"],
    buckets=_DURATION_BUCKETS,
    registry=REGISTRY,
)
TASK_FAILURES = Counter(
    "gpuscale_worker_task_failures",
    "Task attempts that failed on this worker (retryable or not, timeouts included).",
    ["pool", "task_type"],
    registry=REGISTRY,
)
RUNNING = Gauge(
    "gpuscale_worker_running_tasks", "Tasks running on this worker now.", ["pool"], registry=REGISTRY
)
SLOTS = Gauge("gpuscale_worker_slots", "Tasks this worker may run at once.", ["pool"], registry=REGISTRY)
READY = Gauge(
    "gpuscale_worker_ready",
    "1 when the model is loaded and the worker claims tasks.",
    ["pool"],
    registry=REGISTRY,
)
DRAINING = Gauge(
    "gpuscale_worker_draining", "1 while the worker drains after SIGTERM.", ["pool"], registry=REGISTRY
)
HEARTBEATS = Counter(
    "gpuscale_worker_heartbeats",
    "Heartbeats sent, by result (ok, error, unknown: the server row was gone or declared dead).",
    ["pool", "result"],
    registry=REGISTRY,
)
