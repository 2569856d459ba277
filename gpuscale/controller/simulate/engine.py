"""The replay engine: a discrete-event simulation driven by the real policy's ``decide``.

Model:

* A task is submitted at ``arrival_s``; it is *ready* (claimable) once it has arrived and all its
  dependencies are done.  Ready tasks are claimed in the queue's order — priority (critical,
  high, normal), then the deck submitted first, then the longest chain of dependents first (the
  deck graph's critical path), then oldest first — by the least-loaded registered replica of
  their pool with a free slot (``tasks_per_replica``), at once (workers are woken by
  LISTEN/NOTIFY).
* A replica serves as Ollama does: it holds up to ``tasks_per_replica`` claimed tasks, and its
  model serves the first ``parallel`` of them at once (FIFO, in claim order; the others wait in
  Ollama's queue).  ``m`` tasks served together each progress at ``speedup(m) / m`` of their solo
  speed (the pool's ``batching`` curve; without one, ``1 / m``: no gain from sharing the GPU).
* A replica is billed from the moment it is requested until it is stopped; it can claim work
  ``cold_start`` seconds after the request.
* The controller ticks every ``reconcile_interval`` and also right after a submission (the queue
  NOTIFYs it); each tick it builds the policy's input with the controller's own
  :func:`~gpuscale.controller.observe.observe_pool` from what a real controller reads (counts per
  priority and type, running tasks' time since claim and progress, blocked tasks and their
  dependencies; durations learned from finished tasks' claim-to-finish time, never the true
  service times of unfinished tasks), calls ``decide`` and acts:
  new replicas are requested; on a scale-down, starting replicas are cancelled first, then idle
  ones; a busy replica is stopped only if nothing else is left (or, with ``victims``, as the
  provider picks).  A stopped busy replica drains as the worker does on SIGTERM: billing ends at
  once, but its tasks go on for up to ``drain_grace_s`` (the worker's ``drain_grace_s``); what
  has not finished by then is handed back to the queue, its work lost.  The controller sees it
  as draining.  A preempted spot replica hands its tasks back at once.

Policies: ``gpuscale`` (the pools file as written), ``no-prewarm`` (the same with pre-warm off
in every pool), ``always-on`` (``max_replicas`` of every pool for the whole trace period, rounded
up to whole days), ``seeds`` (the seeds' count rule: ``sizing: count``, no pre-warm).
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from gpuscale.controller.observe import (
    BlockedTask,
    Context,
    Fleet,
    PoolQueue,
    RunningTask,
    Upstream,
    WorkRead,
    budget_view,
    observe_pool,
)
from gpuscale.controller.policy import BudgetView, DurationEstimator, PoolObservation, PoolState, decide
from gpuscale.controller.pools import PoolRules, PoolsConfig
from gpuscale.controller.simulate.spot import SpotModel, SpotState, apply_targets
from gpuscale.controller.simulate.trace import TraceError, TraceTask

POLICIES = ("gpuscale", "no-prewarm", "always-on", "seeds")
# Which replicas a scale-down stops: idle ones first (providers that take the controller's hint:
# local, docker), or any running one (DataCrunch chooses itself; a busy one hands its tasks back).
# ``newest`` / ``oldest``: the most recently / earliest requested running replica (deterministic,
# as the emulator's --stop-order does; ``gpuscale replay`` compares with ``newest``).
VICTIMS = ("idle", "any", "newest", "oldest")


def stop_order(config: PoolsConfig) -> str:
    """The stop order the pools file says its provider has (``scale_down_victims``): ``any`` when a
    pool says the provider picks (DataCrunch), else ``idle``.  What ``simulate`` and ``tune`` model
    unless told otherwise, so the policy's assumption and the simulated provider agree."""
    return "any" if any(r.scale_down_victims == "any" for r in config.pools.values()) else "idle"


DAY_S = 86400.0
# How long a stopped worker lets its running tasks finish before handing them back (the worker's
# drain_grace_s default; gpuscale replay scales it by K like every other duration).
DRAIN_GRACE_S = 30.0
_RANK = {"critical": 0, "high": 1, "normal": 2}
_EPS = 1e-6

PENDING, BLOCKED, QUEUED, RUNNING, DONE = range(5)


class _Task:
    __slots__ = (
        "arrival",
        "claimed_at",
        "deck_at",
        "dependents",
        "deps",
        "end_at",
        "graph",
        "height",
        "id",
        "idx",
        "pool",
        "rank",
        "ready_at",
        "remaining",
        "replica",
        "served_by",
        "service",
        "start_at",
        "status",
        "type",
        "unfinished",
    )

    def __init__(self, idx: int, t: TraceTask, pool: int) -> None:
        self.idx = idx
        self.id = t.task_id
        self.type = t.task_type
        self.pool = pool
        self.service = t.service_s
        self.rank = _RANK[t.priority]
        self.arrival = t.arrival_s
        self.deps: list[int] = []
        self.dependents: list[int] = []
        self.status = PENDING
        self.unfinished = 0
        self.ready_at = math.nan
        self.start_at = math.nan
        self.claimed_at = math.nan
        self.end_at = math.nan
        self.remaining = t.service_s
        self.replica: _Replica | None = None
        self.served_by = ""  # the replica that claimed it last (for timelines)
        self.graph = idx
        self.deck_at = t.arrival_s  # when its deck (task graph) was submitted: its deadline's start
        self.height = 0  # the longest chain of dependents after it: its place on the critical path


class _Replica:
    __slots__ = (
        "deployment",
        "drain_until",
        "id",
        "pool",
        "preempt_at",
        "price",
        "ready_at",
        "requested_at",
        "seq",
        "stopped_at",
        "tasks",
    )

    def __init__(self, rid: str, pool: int, requested_at: float, ready_at: float, seq: int = 0) -> None:
        self.id = rid
        self.seq = seq
        self.pool = pool
        self.requested_at = requested_at
        self.ready_at = ready_at
        self.stopped_at: float | None = None
        self.tasks: list[_Task] = []
        # Where it runs and what it costs per hour; spot replicas vanish at preempt_at (spot.py).
        self.deployment = ""
        self.price = 0.0
        self.preempt_at = math.inf
        self.drain_until = math.inf  # stopped while busy: its tasks run on until then


@dataclass
class PoolSeries:
    """Samples (on change) of one pool over time, for plots."""

    t: list[float] = field(default_factory=list)
    queued: list[int] = field(default_factory=list)
    running: list[int] = field(default_factory=list)
    blocked: list[int] = field(default_factory=list)
    replicas: list[int] = field(default_factory=list)
    ready: list[int] = field(default_factory=list)

    def add(self, t: float, queued: int, running: int, blocked: int, replicas: int, ready: int) -> None:
        if self.t and (
            self.queued[-1],
            self.running[-1],
            self.blocked[-1],
            self.replicas[-1],
            self.ready[-1],
        ) == (queued, running, blocked, replicas, ready):
            return
        self.t.append(t)
        self.queued.append(queued)
        self.running.append(running)
        self.blocked.append(blocked)
        self.replicas.append(replicas)
        self.ready.append(ready)


@dataclass
class PoolResult:
    name: str
    price_per_hour: float
    tasks: int = 0
    replica_seconds: float = 0.0
    busy_gpu_seconds: float = 0.0  # sum of service_s of its tasks (the oracle's time)
    # With the spot model: each replica at its deployment's price; preemptions and fallbacks.
    spend_usd: float | None = None
    preemptions: int = 0
    fallbacks: int = 0
    replicas_started: int = 0
    max_replicas_seen: int = 0
    scale_events: dict[str, int] = field(default_factory=dict)
    series: PoolSeries = field(default_factory=PoolSeries)

    @property
    def cost_usd(self) -> float:
        if self.spend_usd is not None:
            return self.spend_usd
        return self.replica_seconds / 3600.0 * self.price_per_hour

    @property
    def oracle_cost_usd(self) -> float:
        return self.busy_gpu_seconds / 3600.0 * self.price_per_hour


@dataclass
class SimResult:
    policy: str
    pools: dict[str, PoolResult]
    waits: list[float]
    graph_times: list[float]
    tasks: int
    unfinished: int
    decks: int
    period_s: float  # the trace period (whole days) used for always-on cost
    end_s: float
    always_on_cost_usd: float
    ticks: int
    wall_s: float = 0.0
    # The pools file's objectives (name → seconds), to report against.
    objectives: dict[str, float] = field(default_factory=dict)

    @property
    def cost_usd(self) -> float:
        return sum(p.cost_usd for p in self.pools.values())

    @property
    def oracle_cost_usd(self) -> float:
        return sum(p.oracle_cost_usd for p in self.pools.values())

    @property
    def scale_events(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for p in self.pools.values():
            for k, v in p.scale_events.items():
                total[k] = total.get(k, 0) + v
        return dict(sorted(total.items()))


def _percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile; 0 for an empty list."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return float(ordered[rank - 1])


def rules_for_policy(config: PoolsConfig, policy: str, cold_start_s: float | None) -> dict[str, PoolRules]:
    """The pool rules a policy runs with (``--cold-start`` overrides every pool's)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; expected one of {', '.join(POLICIES)}")
    out: dict[str, PoolRules] = {}
    for name, rules in config.pools.items():
        changes: dict[str, Any] = {}
        if cold_start_s is not None:
            changes["cold_start_s"] = cold_start_s
        if policy == "no-prewarm":
            changes["prewarm"] = False
        if policy == "seeds":
            changes["prewarm"] = False
            changes["sizing"] = "count"
        out[name] = rules.model_copy(update=changes) if changes else rules
    return out


class _Sim:
    def __init__(
        self,
        trace: Sequence[TraceTask],
        config: PoolsConfig,
        policy: str,
        cold_start_s: float | None,
        tick_s: float,
        budget_usd: float | None = None,
        startup_failure_rate: float = 0.0,
        seed: int = 1,
        counts_only: bool = False,
        period_s: float | None = None,
        spot: SpotModel | None = None,
        victims: str = "idle",
        drain_grace_s: float = DRAIN_GRACE_S,
    ) -> None:
        self.spot = SpotState(spot) if spot is not None else None
        self.drain_grace_s = drain_grace_s
        # Stopped busy replicas, by the end of their drain: (drain_until, seq, replica).
        self.draining: list[tuple[float, int, _Replica]] = []
        if victims not in VICTIMS:
            raise ValueError(f"victims must be one of {', '.join(VICTIMS)}, not {victims!r}")
        self.victims = victims
        # Its own stream, so the victims drawn never change which starts fail.
        self.victim_rng = random.Random(seed + 1)
        self.policy = policy
        self.period_s = period_s
        self.counts_only = counts_only
        self.failure_rate = startup_failure_rate
        self.rng = random.Random(seed)
        self.config = config
        self.rules = rules_for_policy(config, policy, cold_start_s)
        self.pool_names = list(self.rules)
        self.tick_s = tick_s
        type_pool = {t: i for i, name in enumerate(self.pool_names) for t in self.rules[name].task_types}
        self.tasks: list[_Task] = []
        by_id: dict[str, int] = {}
        for i, tt in enumerate(trace):
            if tt.task_type not in type_pool:
                raise TraceError(
                    f"task {tt.task_id!r}: no pool in the pools file serves type {tt.task_type!r}"
                )
            if tt.task_id in by_id:
                raise TraceError(f"duplicate task_id {tt.task_id!r}")
            task = _Task(i, tt, type_pool[tt.task_type])
            for dep in tt.depends_on:
                if dep not in by_id:
                    raise TraceError(f"task {tt.task_id!r}: depends_on {dep!r} is not listed before it")
                j = by_id[dep]
                task.deps.append(j)
                self.tasks[j].dependents.append(i)
            by_id[tt.task_id] = i
            self.tasks.append(task)
        self._graphs()
        self.arrivals = sorted(range(len(self.tasks)), key=lambda i: (self.tasks[i].arrival, i))
        self.estimator = DurationEstimator(config.pools.values())
        n_pools = len(self.pool_names)
        self.queued_by_type: list[dict[str, int]] = [{} for _ in range(n_pools)]
        self.parallel = [self.rules[name].parallel for name in self.pool_names]
        self.speed = [
            [0.0] + [self.rules[name].speedup(m) / m for m in range(1, self.rules[name].parallel + 1)]
            for name in self.pool_names
        ]
        self.queues: list[list[tuple[int, float, int, float, int]]] = [[] for _ in range(n_pools)]
        self.queued_by_rank: list[list[int]] = [[0, 0, 0] for _ in range(n_pools)]
        self.blocked: list[set[int]] = [set() for _ in range(n_pools)]
        self.replicas: list[list[_Replica]] = [[] for _ in range(n_pools)]
        self.all_replicas: list[_Replica] = []
        # Replicas holding tasks, in insertion order (a dict, not a set: replays are deterministic).
        self.busy: dict[_Replica, None] = {}
        self.states = [PoolState() for _ in range(n_pools)]
        # Spend so far, kept incrementally (for the monthly budget projection).
        self.budget_usd = config.monthly_budget_usd if budget_usd is None else budget_usd
        self.closed_cost = 0.0
        self.alive_count = [0] * n_pools
        self.alive_req_sum = [0.0] * n_pools
        self.results = {
            name: PoolResult(name=name, price_per_hour=self.rules[name].price_per_hour)
            for name in self.pool_names
        }
        self.waits: list[float] = []
        self.done = 0
        self.in_flight = 0
        self.seq = 0
        self.ticks = 0

    def _graphs(self) -> None:
        parent = list(range(len(self.tasks)))

        def find(x: int) -> int:
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        for t in self.tasks:
            for d in t.deps:
                a, b = find(t.idx), find(d)
                if a != b:
                    parent[a] = b
        first: dict[int, float] = {}
        for t in self.tasks:
            t.graph = find(t.idx)
            first[t.graph] = min(first.get(t.graph, math.inf), t.arrival)
        for t in reversed(self.tasks):  # dependents are listed after their dependencies
            t.deck_at = first[t.graph]
            t.height = max((self.tasks[j].height + 1 for j in t.dependents), default=0)

    # --- task flow --------------------------------------------------------------------------

    def _make_ready(self, task: _Task, now: float) -> None:
        task.status = QUEUED
        if math.isnan(task.ready_at):
            task.ready_at = now
        # The queue's claim order: priority, then the deck submitted first (the earliest
        # deadline), then the longest chain of dependents first (the critical path:
        # healthcare_classification before the other extractions), then first come.
        heapq.heappush(
            self.queues[task.pool], (task.rank, task.deck_at, -task.height, task.ready_at, task.idx)
        )
        self.queued_by_rank[task.pool][task.rank] += 1
        by_type = self.queued_by_type[task.pool]
        by_type[task.type] = by_type.get(task.type, 0) + 1

    def _arrive(self, task: _Task, now: float) -> None:
        self.in_flight += 1
        task.unfinished = sum(1 for d in task.deps if self.tasks[d].status != DONE)
        if task.unfinished == 0:
            self._make_ready(task, now)
        else:
            task.status = BLOCKED
            self.blocked[task.pool].add(task.idx)

    def _complete(self, task: _Task, now: float) -> None:
        rep = task.replica
        assert rep is not None
        rep.tasks.remove(task)
        if not rep.tasks:
            self.busy.pop(rep, None)
        task.replica = None
        task.status = DONE
        task.end_at = now
        task.remaining = 0.0
        self.done += 1
        self.in_flight -= 1
        # What the controller learns from: claim to finish, as the database records it.
        self.estimator.observe(task.type, now - task.claimed_at)
        for j in task.dependents:
            dep = self.tasks[j]
            dep.unfinished -= 1
            if dep.unfinished == 0 and dep.status == BLOCKED:
                self.blocked[dep.pool].discard(j)
                self._make_ready(dep, now)

    def _dispatch(self, pool: int, now: float) -> None:
        queue = self.queues[pool]
        if not queue:
            return
        tpr = self.rules[self.pool_names[pool]].tasks_per_replica
        free = [r for r in self.replicas[pool] if r.ready_at <= now and len(r.tasks) < tpr]
        rep: _Replica | None = None
        while queue and (free or rep is not None):
            # A worker claims as many tasks as it has free slots, in one claim (the least loaded
            # worker first): with more slots than its model serves at once, it holds the extra
            # tasks in Ollama's queue even while another replica is idle, as the real one does.
            if rep is None:
                rep = min(free, key=lambda r: (len(r.tasks), r.ready_at))
                free.remove(rep)
            idx = heapq.heappop(queue)[-1]
            task = self.tasks[idx]
            self.queued_by_rank[pool][task.rank] -= 1
            self.queued_by_type[pool][task.type] -= 1
            task.status = RUNNING
            task.replica = rep
            task.served_by = rep.id
            task.claimed_at = now
            if math.isnan(task.start_at):
                task.start_at = now
                self.waits.append(now - task.ready_at)
            rep.tasks.append(task)
            self.busy[rep] = None
            if len(rep.tasks) >= tpr:
                rep = None

    def _advance(self, dt: float) -> None:
        if dt <= 0:
            return
        for rep in self.busy:
            m = min(len(rep.tasks), self.parallel[rep.pool])
            done = dt * self.speed[rep.pool][m]
            for task in rep.tasks[:m]:
                task.remaining -= done

    def _next_completion(self, now: float) -> float:
        best = math.inf
        for rep in self.busy:
            m = min(len(rep.tasks), self.parallel[rep.pool])
            rem = min(t.remaining for t in rep.tasks[:m])
            best = min(best, now + max(0.0, rem) / self.speed[rep.pool][m])
        return best

    # --- the controller ---------------------------------------------------------------------

    def _running(self, task: _Task, now: float) -> RunningTask:
        """A running task as the controller reads it: time since claim, the progress its worker
        reports (the fraction of its work done), the replica holding it."""
        assert task.replica is not None
        progress = 1.0 - task.remaining / task.service if task.service > 0 else None
        return RunningTask(
            self.pool_names[task.pool],
            task.type,
            now - task.claimed_at,
            progress,
            task.replica.id,
            now - task.deck_at,
        )

    def _work(self, now: float) -> WorkRead:
        """The queue as the controller reads it, for every pool at once (one read per tick)."""
        pools = {
            name: PoolQueue(
                queued={"critical": r[0], "high": r[1], "normal": r[2]},
                queued_by_type=dict(self.queued_by_type[i]),
                oldest_deck_age_s=now - min(e[1] for e in self.queues[i]) if self.queues[i] else None,
            )
            for i, (name, r) in enumerate(zip(self.pool_names, self.queued_by_rank, strict=True))
        }
        running = [self._running(t, now) for rep in self.busy for t in rep.tasks]
        blocked: list[BlockedTask] = []
        for pool, ids in enumerate(self.blocked):
            for i in sorted(ids):
                task = self.tasks[i]
                deps: list[Upstream] = []
                for d in task.deps:
                    dep = self.tasks[d]
                    if dep.status == DONE:
                        continue
                    if dep.status == RUNNING:
                        r = self._running(dep, now)
                        deps.append(
                            Upstream(r.pool, r.task_type, "running", r.elapsed_s, r.progress, r.server, d)
                        )
                    elif dep.status == QUEUED:
                        deps.append(Upstream(self.pool_names[dep.pool], dep.type, "queued", id=d))
                    elif dep.status == BLOCKED:
                        deps.append(Upstream(self.pool_names[dep.pool], dep.type, "blocked", id=d))
                    else:
                        break  # not submitted yet: nothing about to arrive
                else:
                    blocked.append(
                        BlockedTask(self.pool_names[pool], task.type, tuple(deps), i, now - task.deck_at)
                    )
        return WorkRead(pools=pools, running=running, blocked=blocked)

    def _observe(self, pool: int, now: float, work: WorkRead, ctx: Context) -> tuple[PoolObservation, int]:
        reps = self.replicas[pool]
        starting = tuple((r.id, r.requested_at) for r in reps if r.ready_at > now)
        registered = len(reps) - len(starting)
        busy = sum(1 for r in reps if r.tasks)
        fleet = Fleet(
            provider_replicas=len(reps),
            registered=registered,
            starting=starting,
            idle=registered - busy,
            busy=busy,
            draining=frozenset(r.id for r in self.busy if r.pool == pool and r.drain_until < math.inf),
        )
        obs = observe_pool(self.pool_names[pool], work, fleet, ctx)
        if self.counts_only:
            # What a controller that counts tasks but does not estimate their work would see.
            obs = replace(obs, queued_work_s=None, running_work_s=None, blocked_work_s=None)
        return obs, len(self.blocked[pool])

    def _start_replica(self, pool: int, now: float, deployment: str | None = None) -> None:
        rules = self.rules[self.pool_names[pool]]
        self.seq += 1
        ready_at = now + rules.cold_start_s
        if self.failure_rate and self.rng.random() < self.failure_rate:
            ready_at = math.inf  # never registers: the policy must notice and replace it
        rep = _Replica(f"{self.pool_names[pool]}-{self.seq}", pool, now, ready_at, self.seq)
        rep.deployment = deployment or rules.options[0].name
        rep.price = rules.price_per_hour
        if self.spot is not None:
            rep.price, rep.preempt_at = self.spot.new_replica(rules, rep.deployment, now)
        self.replicas[pool].append(rep)
        self.all_replicas.append(rep)
        self.alive_count[pool] += 1
        self.alive_req_sum[pool] += now
        self.results[self.pool_names[pool]].replicas_started += 1

    def _pick_victims(self, reps: Sequence[_Replica], count: int, now: float) -> list[_Replica]:
        """The ``count`` replicas a lower count stops: starting ones first (newest first), then idle
        ones, then busy ones; or, as the DataCrunch cloud does (it does not know which are idle),
        any running one.  One order for a plain pool and for each deployment of a spot pool."""
        order = sorted(reps, key=lambda r: (r.ready_at <= now, len(r.tasks), -r.requested_at))
        if self.victims != "idle":
            starting = [r for r in order if r.ready_at > now]
            running = [r for r in reps if r.ready_at <= now]
            if self.victims == "any":
                self.victim_rng.shuffle(running)
            else:
                # Replicas requested together were still created one after another.
                running.sort(key=lambda r: (r.requested_at, r.seq), reverse=self.victims == "newest")
            order = starting + running
        return order[:count]

    def _stop_replicas(self, pool: int, count: int, now: float) -> None:
        for rep in self._pick_victims(self.replicas[pool], count, now):
            self._stop(rep, now, self.drain_grace_s)

    def _hand_back(self, rep: _Replica, now: float) -> None:
        for task in list(rep.tasks):
            # Handed back to the queue; its work so far is lost.
            rep.tasks.remove(task)
            task.replica = None
            task.remaining = task.service
            self._make_ready(task, now)
        self.busy.pop(rep, None)

    def _stop(self, rep: _Replica, now: float, grace_s: float = 0.0) -> None:
        """Stop ``rep`` (billing ends now); its tasks drain for ``grace_s``, then come back."""
        pool = rep.pool
        if rep.tasks and grace_s > 0:
            rep.drain_until = now + grace_s
            heapq.heappush(self.draining, (rep.drain_until, rep.seq, rep))
        else:
            self._hand_back(rep, now)
        rep.stopped_at = now
        self.replicas[pool].remove(rep)
        self.alive_count[pool] -= 1
        self.alive_req_sum[pool] -= rep.requested_at
        self.closed_cost += (now - rep.requested_at) * rep.price / 3600

    def _budget(self, now: float) -> BudgetView | None:
        """Spend since the trace start, projected to a 30-day month with the controller's
        formula (:func:`gpuscale.controller.observe.project_spend`)."""
        if self.budget_usd is None:
            return None
        spent = self.closed_cost
        for pool, name in enumerate(self.pool_names):
            alive_s = self.alive_count[pool] * now - self.alive_req_sum[pool]
            spent += alive_s * self.rules[name].price_per_hour / 3600
        return budget_view(self.budget_usd, spent, now)

    def _tick(self, now: float) -> bool:
        """One controller tick; returns True when the whole system is at rest."""
        self.ticks += 1
        at_rest = True
        budget = self._budget(now)
        work = self._work(now)
        ctx = Context(
            rules=self.rules,
            expected=self.estimator.expected,
            registered={
                name: sum(1 for r in self.replicas[i] if r.ready_at <= now)
                for i, name in enumerate(self.pool_names)
            },
        )
        for pool, name in enumerate(self.pool_names):
            rules = self.rules[name]
            result = self.results[name]
            if self.spot is not None:
                for rep in self.spot.due(self.replicas[pool], now):
                    # Preempted: gone without notice, its work lost; the provider replaces it.
                    self._stop(rep, now)  # type: ignore[arg-type]
                    self._start_replica(pool, now, rep.deployment)
                    result.preemptions += 1
            current = len(self.replicas[pool])
            obs, blocked_all = self._observe(pool, now, work, ctx)
            if self.policy == "always-on":
                desired, reason = rules.max_replicas, "always_on"
            else:
                decision = decide(
                    rules,
                    obs,
                    self.states[pool],
                    now,
                    critical_immediate=self.config.critical_immediate,
                    tick_s=self.tick_s,
                    budget=budget,
                )
                self.states[pool] = decision.state
                desired, reason = decision.desired, decision.reason
                for rid in decision.replace:
                    failed = next((r for r in self.replicas[pool] if r.id == rid), None)
                    if failed is not None:
                        self._stop(failed, now)
                        if self.spot is None:
                            self._start_replica(pool, now)
                        result.scale_events[reason] = result.scale_events.get(reason, 0) + 1
                current = len(self.replicas[pool])
                if reason not in ("hold",) or obs.starting:
                    at_rest = False
            if self.spot is not None and self.policy != "always-on":
                # Where the replicas go: the controller's placement over the pool's deployments.
                targets = self.spot.place(name, rules, self.replicas[pool], desired, (), now)
                if sum(targets.values()) != current:
                    at_rest = False
                    result.scale_events[reason] = result.scale_events.get(reason, 0) + 1

                def start(dep: str, p: int = pool) -> None:
                    self._start_replica(p, now, dep)

                def stop(r: Any) -> None:
                    # A scale-down's stop: the worker drains as on any other deployment.
                    self._stop(r, now, self.drain_grace_s)

                def pick(reps: Sequence[Any], n: int) -> Sequence[Any]:
                    return self._pick_victims(reps, n, now)

                apply_targets(targets, self.replicas[pool], start, stop, pick)
                result.fallbacks = self.spot.fallbacks.get(name, 0)
            elif desired != current:
                at_rest = False
                result.scale_events[reason] = result.scale_events.get(reason, 0) + 1
                if desired > current:
                    for _ in range(desired - current):
                        self._start_replica(pool, now)
                else:
                    self._stop_replicas(pool, current - desired, now)
            result.max_replicas_seen = max(result.max_replicas_seen, len(self.replicas[pool]))
            queued = sum(self.queued_by_rank[pool])
            reps = self.replicas[pool]
            result.series.add(
                now,
                queued,
                obs.running or 0,
                blocked_all,
                len(reps),
                sum(1 for r in reps if r.ready_at <= now),
            )
        return at_rest and self.in_flight == 0

    # --- the loop ---------------------------------------------------------------------------

    def run(self) -> SimResult:
        tasks = self.tasks
        n = len(tasks)
        ai = 0
        now = 0.0
        next_tick = 0.0
        last_event = 0.0
        ready_heap: list[float] = []
        while True:
            t_arr = tasks[self.arrivals[ai]].arrival if ai < n else math.inf
            t_comp = self._next_completion(now)
            while ready_heap and ready_heap[0] <= now:
                heapq.heappop(ready_heap)
            t_ready = ready_heap[0] if ready_heap else math.inf
            t_drain = self.draining[0][0] if self.draining else math.inf
            t_next = min(t_arr, t_comp, t_ready, t_drain, next_tick)
            if t_next == math.inf or (ai >= n and t_next > last_event + DAY_S):
                break  # done, or stuck (work no pool can serve): report it as unfinished
            self._advance(t_next - now)
            now = t_next
            # Completions (all that end now, within rounding).
            for rep in list(self.busy):
                for task in [t for t in rep.tasks if t.remaining <= _EPS * max(1.0, t.service)]:
                    self._complete(task, now)
                    last_event = now
            while self.draining and self.draining[0][0] <= now:
                self._hand_back(heapq.heappop(self.draining)[2], now)  # the drain's grace is over
            woke = False
            while ai < n and tasks[self.arrivals[ai]].arrival <= now:
                self._arrive(tasks[self.arrivals[ai]], now)
                ai += 1
                woke = True
                last_event = now
            for pool in range(len(self.pool_names)):
                self._dispatch(pool, now)
            if woke and next_tick > now:
                next_tick = now  # the queue NOTIFYs the controller on new work
            if now >= next_tick:
                before = len(self.all_replicas)
                at_rest = self._tick(now)
                for rep in self.all_replicas[before:]:
                    heapq.heappush(ready_heap, rep.ready_at)
                for pool in range(len(self.pool_names)):
                    self._dispatch(pool, now)
                next_tick = now + self.tick_s
                if at_rest:
                    if ai >= n:
                        break
                    # Nothing can change before the next submission: skip ahead.
                    next_tick = max(next_tick, tasks[self.arrivals[ai]].arrival)
                if ai >= n and self.in_flight == 0 and self.policy == "always-on":
                    break
        end = max(now, last_event)
        period = max(DAY_S, math.ceil(max(last_event, end) / DAY_S - 1e-9) * DAY_S)
        if self.period_s is not None:
            period = max(self.period_s, end)
        for rep in self.all_replicas:
            stop = rep.stopped_at
            if stop is None:
                stop = period if self.policy == "always-on" else end
            res = self.results[self.pool_names[rep.pool]]
            res.replica_seconds += stop - rep.requested_at
            if self.spot is not None:
                res.spend_usd = (res.spend_usd or 0.0) + (stop - rep.requested_at) * rep.price / 3600.0
        for task in tasks:
            self.results[self.pool_names[task.pool]].tasks += 1
            self.results[self.pool_names[task.pool]].busy_gpu_seconds += task.service
        graphs: dict[int, tuple[float, float, bool]] = {}
        for task in tasks:
            first, last, complete = graphs.get(task.graph, (math.inf, 0.0, True))
            graphs[task.graph] = (
                min(first, task.arrival),
                max(last, 0.0 if math.isnan(task.end_at) else task.end_at),
                complete and task.status == DONE,
            )
        graph_times = [last - first for first, last, complete in graphs.values() if complete]
        always_on = sum(r.max_replicas * r.price_per_hour for r in self.rules.values()) * period / 3600.0
        return SimResult(
            policy=self.policy,
            pools=self.results,
            waits=self.waits,
            graph_times=graph_times,
            tasks=n,
            unfinished=n - self.done,
            decks=len(graphs),
            period_s=period,
            end_s=end,
            always_on_cost_usd=always_on,
            ticks=self.ticks,
        )


def simulate(
    trace: Sequence[TraceTask],
    config: PoolsConfig,
    *,
    policy: str = "gpuscale",
    cold_start_s: float | None = None,
    tick_s: float | None = None,
    budget_usd: float | None = None,
    startup_failure_rate: float = 0.0,
    seed: int = 1,
    counts_only: bool = False,
    period_s: float | None = None,
    spot: SpotModel | None = None,
    victims: str = "idle",
    drain_grace_s: float = DRAIN_GRACE_S,
) -> SimResult:
    """Replay ``trace`` against ``policy`` with the pools in ``config``; see the module doc.

    ``budget_usd`` overrides the pools file's ``monthly_budget_usd``: the spend so far,
    extrapolated to 30 days, is handed to the policy as its :class:`BudgetView` each tick.
    ``startup_failure_rate``: the chance that a requested replica never registers (drawn with
    ``seed``), so startup timeouts, replacements and their backoff show in the replay.
    ``counts_only``: the policy gets task counts but no work estimates (it then sizes with each
    pool's ``default_task_duration``).  ``period_s``: the trace's period for the always-on cost
    (default: the whole days it spans; a quiet week that ends on a Friday spans five).
    ``spot``: model spot and fallback deployments (:mod:`gpuscale.controller.simulate.spot`).

    ``victims``: which replicas a scale-down stops once no starting one is left: ``idle`` ones
    first, ``any`` running one (random, as DataCrunch chooses for itself), or the ``newest`` /
    ``oldest`` running one (deterministic, as the emulator's ``--stop-order``).  ``drain_grace_s``:
    how long a stopped busy replica's tasks run on before they are handed back."""
    if not 0.0 <= startup_failure_rate <= 1.0:
        raise ValueError("startup_failure_rate must be within [0, 1]")
    import time

    started = time.perf_counter()
    tick = config.reconcile_interval_s if tick_s is None else tick_s
    if tick <= 0:
        raise ValueError("tick must be > 0")
    result = _Sim(
        trace,
        config,
        policy,
        cold_start_s,
        tick,
        budget_usd,
        startup_failure_rate,
        seed,
        counts_only,
        period_s,
        spot,
        victims,
        drain_grace_s,
    ).run()
    result.wall_s = time.perf_counter() - started
    if config.objectives is not None:
        result.objectives = config.objectives.targets()
    return result


def percentile(values: Sequence[float], q: float) -> float:
    return _percentile(values, q)


def timeline(
    trace: Sequence[TraceTask],
    config: PoolsConfig,
    *,
    victims: str = "idle",
    drain_grace_s: float = DRAIN_GRACE_S,
) -> dict[str, Any]:
    """Simulate like :func:`simulate` and return every task and replica in trace seconds, the
    shape of ``gpuscale replay``'s ``timeline.json``, to put the two side by side deck by deck."""
    sim = _Sim(
        trace,
        config,
        "gpuscale",
        None,
        config.reconcile_interval_s,
        victims=victims,
        drain_grace_s=drain_grace_s,
    )
    sim.run()

    def r1(x: float) -> float | None:
        return None if math.isnan(x) or math.isinf(x) else round(x, 1)

    decks = {g: n for n, g in enumerate(dict.fromkeys(t.graph for t in sim.tasks))}
    return {
        "tasks": [
            {
                "id": t.id,
                "type": t.type,
                "deck": decks[t.graph],
                "arrival": t.arrival,
                "service": t.service,
                "ready": r1(t.ready_at),
                "first_claim": r1(t.start_at),
                "claimed": r1(t.claimed_at),
                "end": r1(t.end_at),
                "replica": t.served_by or None,
            }
            for t in sim.tasks
        ],
        "replicas": [
            {
                "id": r.id,
                "pool": sim.pool_names[r.pool],
                "requested": r1(r.requested_at),
                "ready": r1(r.ready_at),
                "stopped": None if r.stopped_at is None else r1(r.stopped_at),
            }
            for r in sim.all_replicas
        ],
    }
