"""Prometheus metrics of gpuscale (prefix ``gpuscale_``), defined once at import.

Provider API calls are counted here; the controller adds its own metrics to this module.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

PROVIDER_REQUESTS = Counter(
    "gpuscale_provider_requests_total",
    "Provider API calls by endpoint and outcome (HTTP status, or 'error' when no answer came).",
    ["endpoint", "status"],
)
PROVIDER_REQUEST_SECONDS = Histogram(
    "gpuscale_provider_request_seconds",
    "Duration of provider API calls by endpoint.",
    ["endpoint"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)

# --- controller: what it observed, decided and did, per pool -------------------------------------
from prometheus_client import Gauge  # noqa: E402

QUEUE_DEPTH = Gauge(
    "gpuscale_queue_depth", "Claimable tasks waiting, by pool and priority.", ["pool", "priority"]
)
TASKS_RUNNING = Gauge("gpuscale_tasks_running", "Tasks running (leased by a worker).", ["pool"])
TASKS_BLOCKED = Gauge("gpuscale_tasks_blocked", "Tasks waiting on unfinished dependencies.", ["pool"])
OLDEST_QUEUED_AGE = Gauge(
    "gpuscale_oldest_queued_age_seconds", "Age of the oldest claimable task (0 when none).", ["pool"]
)
TASK_EXPECTED_SECONDS = Gauge(
    "gpuscale_task_expected_seconds",
    "Expected seconds of one task on a replica, learned from finished tasks (what the policy sizes by).",
    ["pool", "task_type"],
)
REPLICAS_DESIRED = Gauge("gpuscale_replicas_desired", "Replica count the policy decided.", ["pool"])
REPLICAS_PROVIDER = Gauge("gpuscale_replicas_provider", "Replicas the provider reports.", ["pool"])
REPLICAS_REGISTERED = Gauge("gpuscale_replicas_registered", "Workers registered and heartbeating.", ["pool"])
REPLICAS_STARTING = Gauge(
    "gpuscale_replicas_starting", "Replicas the provider reports that have not registered yet.", ["pool"]
)
SCALE_EVENTS = Counter(
    "gpuscale_scale_events_total",
    "Replica count changes decided, by direction (up/down) and reason.",
    ["pool", "direction", "reason"],
)
RECONCILE_SECONDS = Histogram(
    "gpuscale_reconcile_seconds",
    "Duration of one reconcile of one pool (observe, decide, act, record).",
    ["pool"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
COLD_START_SECONDS = Histogram(
    "gpuscale_cold_start_seconds",
    "Time from a replica first reported by the provider to its worker registering.",
    ["pool"],
    buckets=(1, 2, 5, 10, 20, 30, 60, 120, 180, 300, 600),
)
SPEND_USD = Counter(
    "gpuscale_spend_usd_total", "Estimated spend: provider replicas × price per replica-hour.", ["pool"]
)
TASKS_DEAD = Counter("gpuscale_tasks_dead_total", "Tasks that used up their attempts.", ["pool"])
REPLACEMENTS = Counter(
    "gpuscale_replica_replacements_total",
    "Replicas given up on (not registered within startup_timeout) and replaced.",
    ["pool"],
)
LEADER = Gauge(
    "gpuscale_leader", "1 while this controller leads (holds the lease, within its renew deadline), else 0."
)
PROVIDER_FENCE = Counter(
    "gpuscale_provider_fence_total",
    "Provider calls checked by the leader fence, by outcome (allowed, refused).",
    ["outcome"],
)
for _outcome in ("allowed", "refused"):
    PROVIDER_FENCE.labels(_outcome)  # both series exist from the first scrape
LAST_PROVIDER_CALL = Gauge(
    "gpuscale_provider_last_call_timestamp_seconds",
    "When this controller last let a provider call through its leader fence (Unix time; 0: never).",
)
OBSERVE_ERRORS = Counter(
    "gpuscale_observe_errors_total",
    "Observations that failed (the pool held its replicas), by source.",
    ["pool", "source"],
)

# Fleet-wide task timings, exported by the leader from the queue (finished tasks), so they do not
# depend on scraping short-lived workers in time; workers keep their own gpuscale_worker_* copies.
_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)
_WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
QUEUE_WAIT_SECONDS = Histogram(
    "gpuscale_queue_wait_seconds",
    "Time a finished task waited claimable before its last attempt started.",
    ["pool", "task_type"],
    buckets=_WAIT_BUCKETS,
)
TASK_DURATION_SECONDS = Histogram(
    "gpuscale_task_duration_seconds",
    "Duration of a finished task's last attempt (claim to done/failed).",
    ["pool", "task_type"],
    buckets=_DURATION_BUCKETS,
)
TASK_FAILURES = Counter(
    "gpuscale_task_failures_total",
    "Tasks that ended failed or dead.",
    ["pool", "task_type"],
)

# --- fallback deployments and spot (issue 13): where a pool's replicas run ----------------------
# New names with a ``deployment`` label; the per-pool series above keep their names and labels.
DEPLOYMENT_REPLICAS = Gauge(
    "gpuscale_deployment_replicas",
    "Replicas the provider reports per deployment of a pool (its pinned count).",
    ["pool", "deployment"],
)
DEPLOYMENT_AVAILABLE = Gauge(
    "gpuscale_deployment_available",
    "1 while a deployment may take new replicas, 0 while it cools off after a failure.",
    ["pool", "deployment"],
)
DEPLOYMENT_HOME = Gauge(
    "gpuscale_deployment_home",
    "1 for the deployment a pool's new replicas go to (the first one not cooling off).",
    ["pool", "deployment"],
)
DEPLOYMENT_FAILURES = Counter(
    "gpuscale_deployment_failures_total",
    "Deployment failures that started a cool-off, by kind (quota_reached, startup_timeout, preempted).",
    ["pool", "deployment", "kind"],
)
PREEMPTIONS = Counter(
    "gpuscale_replica_preemptions_total",
    "Replicas that vanished from a deployment without the controller asking (spot preemption).",
    ["pool", "deployment"],
)
DEPLOYMENT_SPEND_USD = Counter(
    "gpuscale_deployment_spend_usd_total",
    "Estimated spend per deployment: its replicas × its price (the API's, else the pools file's).",
    ["pool", "deployment"],
)
DEPLOYMENT_PRICE = Gauge(
    "gpuscale_deployment_price_usd_per_hour",
    "Price per replica-hour used for a deployment's cost, by source (api or pools_file).",
    ["pool", "deployment", "source"],
)
