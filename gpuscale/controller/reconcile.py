"""One reconcile of the pools: observe → decide → act → record.

Everything that touches the outside world is here, at the edges; the decision itself is
:func:`gpuscale.controller.policy.decide`, a pure function.  Each pool is reconciled independently: an
error observing or acting on one pool never stops another, and an observation that failed is
passed to the policy as *unknown* (``None``), which holds the replica count — a controller that
cannot read its queue or its provider never scales down.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gpuscale.controller import metrics as m
from gpuscale.controller.observe import (
    BlockedTask,
    Context,
    Fleet,
    PoolQueue,
    Upstream,
    WorkRead,
    budget_view,
    observe_pool,
)
from gpuscale.controller.placement import DeploymentObs, Placement, PlacementState, ReplicaObs, place
from gpuscale.controller.policy import (
    BudgetView,
    Decision,
    DurationEstimator,
    PoolObservation,
    PoolState,
    decide,
)
from gpuscale.controller.pools import PoolRules, PoolsConfig
from gpuscale.controller.providers.base import Provider, ProviderState
from gpuscale.controller.providers.fenced import FencedProvider, NotLeader
from gpuscale.controller.store import ControllerStore, ScalingEvent
from gpuscale.queue import PoolStats, Queue, ServerInfo, WorkDetail

log = logging.getLogger("gpuscale.controller")

# Where the learned durations live in a pool's saved state (next to the policy's memory).
_EXPECTED_KEY = "expected_s"

# A learned duration that moved less than this (relative) since it was saved is not worth a
# write: in a busy fleet every tick refines them a little, which made every tick write every pool.
LEARNED_SAVE_TOLERANCE = 0.05

# Decisions that keep the count but are still worth a line in the timeline.
_NOTEWORTHY_HOLDS = {"hold_unknown", "startup_timeout", "startup_backoff", "budget_cap"}


@dataclass
class PoolView:
    """What ops see of one pool (``/api/pools``, ``gpuscale status``)."""

    name: str
    deployment: str
    paused: bool = False
    rules: dict[str, Any] = field(default_factory=dict)
    queued: dict[str, int] | None = None
    running: int | None = None
    blocked: int | None = None
    blocked_on_running: int | None = None
    oldest_queued_age_s: float | None = None
    done: int | None = None
    failed: int | None = None
    dead: int | None = None
    replicas_desired: int | None = None
    replicas_provider: int | None = None
    replicas_registered: int | None = None
    replicas_starting: int | None = None
    provider_status: str | None = None
    # Fallback deployments: where the replicas run and why (one item per listed deployment).
    home: str | None = None
    deployments: list[dict[str, Any]] = field(default_factory=list)
    last_decision: dict[str, Any] | None = None
    errors: list[str] = field(default_factory=list)
    at: float | None = None


@dataclass
class Observed:
    """Raw observations of one tick; ``None`` where the source could not be read."""

    stats: dict[str, PoolStats] | None
    servers: list[ServerInfo] | None
    paused: set[str] | None
    errors: list[str] = field(default_factory=list)
    detail: WorkDetail | None = None
    at: float = field(default_factory=time.monotonic)  # when it was read, to skip stale ones
    # Per pool, its deployments as the provider reported them, read side by side with the
    # database (or the error that read raised); taken by the pool's reconcile, read anew if absent.
    providers: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    providers_at: float = -math.inf  # when the reads in ``providers`` began
    # Derived once per observation, not once per pool: with hundreds of servers and running
    # tasks, redoing these for each of tens of pools made a tick grow with pools × fleet.
    _by_pool: dict[str, list[ServerInfo]] | None = field(default=None, init=False, repr=False, compare=False)
    _work: tuple[WorkRead | None] | None = field(default=None, init=False, repr=False, compare=False)
    _registered: dict[str, int] | None = field(default=None, init=False, repr=False, compare=False)

    def _index(self) -> dict[str, list[ServerInfo]]:
        if self._by_pool is None:
            self._by_pool = {}
            for s in self.servers or ():
                self._by_pool.setdefault(s.pool, []).append(s)
        return self._by_pool

    def servers_of(self, pool: str) -> list[ServerInfo] | None:
        """The registry's servers of ``pool``; ``None`` when the registry could not be read."""
        return None if self.servers is None else self._index().get(pool, [])

    def registered(self) -> dict[str, int]:
        """Live (starting or active) servers per pool."""
        if self._registered is None:
            self._registered = {
                pool: sum(1 for s in servers if s.status in ("starting", "active"))
                for pool, servers in self._index().items()
            }
        return self._registered

    def work(self) -> WorkRead | None:
        if self._work is None:
            self._work = (work_read(self.stats, self.detail),)
        return self._work[0]


def _state_moved(saved: tuple[Any, ...] | None, now: tuple[Any, ...]) -> bool:
    """Whether a pool's (policy state, placement memory, learned durations) differs from what was
    last saved enough to write it again: any change of the state or the placement, a learned
    duration new, gone, or moved by more than ``LEARNED_SAVE_TOLERANCE``."""
    if saved is None or saved[:2] != now[:2]:
        return True
    old, new = saved[2], now[2]
    if old.keys() != new.keys():
        return True
    for t, v in new.items():
        w = old[t]
        if (v is None) != (w is None):
            return True
        if v is not None and w is not None and abs(v - w) > LEARNED_SAVE_TOLERANCE * max(abs(w), 1e-9):
            return True
    return False


def merge_states(states: Sequence[ProviderState]) -> ProviderState:
    """One pool-wide provider state from its deployments' (pure): the policy sizes the pool as a
    whole; placement splits the count again."""
    statuses = [s.status for s in states]
    status = next((st for st in statuses if st not in ("healthy", "paused")), statuses[0] if statuses else "")
    return ProviderState(
        replicas=[r for s in states for r in s.replicas],
        target=sum(s.target for s in states),
        paused=bool(states) and all(s.paused for s in states),
        status=status,
        pinned=all(s.pinned for s in states),
        stops_named=all(s.stops_named for s in states),
    )


def deployment_obs(
    rules: PoolRules, name: str, state: ProviderState, servers: Sequence[ServerInfo] | None
) -> DeploymentObs:
    """A deployment's replicas with what the registry says of each (registered, busy); pure."""
    live = {
        s.container_id: s
        for s in servers or ()
        if s.pool == rules.name and s.container_id and s.status in ("starting", "active")
    }
    return DeploymentObs(
        name=name,
        target=state.target,
        status=state.status,
        replicas=tuple(
            ReplicaObs(
                id=r.id,
                started_at=r.started_at,
                status=r.status,
                registered=r.id in live,
                busy=r.id in live and live[r.id].current_load > 0,
            )
            for r in state.replicas
        ),
    )


def fleet_of(rules: PoolRules, servers: Sequence[ServerInfo] | None, provider: ProviderState | None) -> Fleet:
    """The pool's replicas as the provider and the registry report them (pure)."""
    registered: int | None = None
    idle_n: int | None = None
    busy_n: int | None = None
    starting: list[tuple[str, float]] = []
    if servers is not None:
        live = [s for s in servers if s.pool == rules.name and s.status in ("starting", "active")]
        registered = len(live)
        idle_n = sum(1 for s in live if s.current_load == 0)
        busy_n = sum(1 for s in live if s.current_load > 0)
        if provider is not None:
            known = {s.container_id for s in servers if s.pool == rules.name and s.container_id}
            # A replica the provider reports as failed will never register: it counts as overdue
            # at once (started at epoch 0), so the startup-timeout path replaces it.
            starting = [
                (r.id, 0.0 if r.status == "failed" else r.started_at)
                for r in provider.replicas
                if r.id not in known and r.status != "stopping"
            ]
    draining = frozenset(
        s.id for s in servers or () if s.pool == rules.name and s.status not in ("starting", "active")
    )
    return Fleet(
        provider_replicas=provider.target if provider is not None else None,
        registered=registered,
        starting=tuple(starting),
        idle=idle_n,
        busy=busy_n,
        draining=draining,
    )


def work_read(stats: Mapping[str, PoolStats] | None, detail: WorkDetail | None) -> WorkRead | None:
    """The queue as the observation reads it; ``None`` (unknown) when either read failed."""
    if stats is None or detail is None:
        return None
    pools: dict[str, PoolQueue] = {}
    names = set(stats) | {p for p, _ in detail.queued_by_type}
    for name in names:
        s = stats.get(name)
        pools[name] = PoolQueue(
            queued={str(p): int(n) for p, n in s.queued.items()} if s is not None else {},
            queued_by_type={t: n for (p, t), n in detail.queued_by_type.items() if p == name},
            oldest_queued_age_s=s.oldest_queued_age_s if s is not None else None,
            oldest_deck_age_s=detail.oldest_deck_age_s.get(name),
        )
    running = detail.running  # the queue's rows as they are: they carry what observe_pool reads
    blocked = [
        BlockedTask(
            b.pool,
            b.task_type,
            tuple(
                Upstream(d.pool, d.task_type, d.status, d.elapsed_s, d.progress, d.server, d.id)
                for d in b.deps
            ),
            b.id,
            b.deck_age_s,
        )
        for b in detail.blocked
    ]
    return WorkRead(pools=pools, running=running, blocked=blocked)


def build_observation(
    rules: PoolRules,
    work: WorkRead | None,
    servers: Sequence[ServerInfo] | None,
    provider: ProviderState | None,
    ctx: Context,
) -> tuple[PoolObservation, dict[str, int]]:
    """Turn raw observations into the policy's input (pure; the same
    :func:`~gpuscale.controller.observe.observe_pool` as the simulator's).  Returns the
    observation and counts for display: registered, starting."""
    fleet = fleet_of(rules, servers, provider)
    obs = observe_pool(rules.name, work, fleet, ctx)
    return obs, {"registered": fleet.registered or 0, "starting": len(fleet.starting)}


class Reconciler:
    """Holds each pool's policy memory and runs reconciles; one instance per controller process."""

    def __init__(
        self,
        config: PoolsConfig,
        queue: Queue,
        store: ControllerStore,
        provider: Provider,
        *,
        controller_id: str,
        dry_run: bool = False,
        may_act: Callable[[], Any] | None = None,
        leading: Callable[[], bool] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.queue = queue
        self.store = store
        self.provider = provider
        self.controller_id = controller_id
        self.dry_run = dry_run
        self._may_act = may_act
        # Whether this process leads right now (a local check, no round trip): the pool's saved
        # state and its timeline are the leader's to write.
        self._leading = leading or (lambda: True)
        self.clock = clock
        self.states: dict[str, PoolState] = {name: PoolState() for name in config.pools}
        # Expected seconds per task type, learned from the tasks seen finishing; saved with the
        # pool state so a new leader keeps what the old one learned.
        self.estimator = DurationEstimator(config.pools.values())
        self.views: dict[str, PoolView] = {
            name: PoolView(name=name, deployment=r.deployment or name, rules=r.model_dump(mode="json"))
            for name, r in config.pools.items()
        }
        self.provider_counts: dict[str, int] = {}
        # Per pool: each deployment's replica count as last observed (cost accounting) and the
        # placement memory (cool-offs, preemptions), saved with the policy state.
        self.deployment_counts: dict[str, dict[str, int]] = {name: {} for name in config.pools}
        self.placements: dict[str, PlacementState] = {name: PlacementState() for name in config.pools}
        self._locks = {name: asyncio.Lock() for name in config.pools}
        self._cold_seen: set[str] = set()
        self._dead_seen: dict[str, int] = {}
        self._last_logged: dict[str, tuple[int, str, tuple[tuple[str, int], ...]]] = {}
        self._observed_at: dict[str, float] = {}
        self._acted_at: dict[str, float] = {}  # when each pool's last change reached the provider
        self._last_saved: dict[str, tuple[Any, ...]] = {}  # what the state last written came from
        # Pool states to write in the next batch, and the batch's write (see _save_state).
        self._to_save: dict[str, dict[str, Any]] = {}
        self._saving: asyncio.Task[None] | None = None
        self._saving_taken = False  # whether that write took its batch (later ones start another)
        # The server list as last read, and the registry's change counter it came with.
        self._servers: list[ServerInfo] | None = None
        self._servers_version: int | None = None
        self._victims_warned: set[str] = set()  # deployments already warned of (see _warn_victims)
        # Every series exists from the first scrape (at 0), so rate() sees the first event too.
        for name, r in config.pools.items():
            for child in (
                m.COLD_START_SECONDS,
                m.RECONCILE_SECONDS,
                m.REPLACEMENTS,
                m.SPEND_USD,
                m.TASKS_DEAD,
            ):
                child.labels(name)
            for tt in r.task_types:
                for fam in (m.QUEUE_WAIT_SECONDS, m.TASK_DURATION_SECONDS, m.TASK_FAILURES):
                    fam.labels(name, tt)
            for opt in r.options:
                m.DEPLOYMENT_SPEND_USD.labels(name, opt.name)
                m.PREEMPTIONS.labels(name, opt.name)
        self.export_expected()

    async def load_states(self) -> None:
        """Take over the policy memory a previous leader saved (on becoming leader)."""
        self._last_saved.clear()  # another leader may have written since: write ours again
        try:
            saved = await self.store.load_pool_states()
        except Exception as exc:
            log.warning("could not load the saved policy state: %s", type(exc).__name__)
            return
        for name, data in saved.items():
            if name in self.states:
                try:
                    self.states[name] = PoolState.from_dict(data)
                    self.placements[name] = PlacementState.from_dict(data.get("placement"))
                except (TypeError, ValueError):
                    log.warning("pool %s: saved policy state unreadable; starting afresh", name)
                learned = data.get(_EXPECTED_KEY)
                if isinstance(learned, dict):
                    self.estimator.restore(learned)
        self.export_expected()

    # ------------------------------------------------------------------ observe
    async def observe(self) -> Observed:
        # Two reads, each one statement, side by side (the controller has two connections for
        # its work): the queue, and the registry with the pause switches.  A tick waits for one
        # round trip, whatever the number of pools and replicas.
        (stats, detail, qerr), (paused, servers, serr) = await asyncio.gather(
            self._observe_queue(), self._observe_registry()
        )
        if servers is not None:
            servers, lerr = await self._with_load(servers, detail)
            serr += lerr
        return Observed(stats, servers, paused, qerr + serr, detail=detail)

    async def _observe_queue(self) -> tuple[dict[str, PoolStats] | None, WorkDetail | None, list[str]]:
        try:
            stats, detail = await self.queue.snapshot()
        except Exception as exc:  # any failure reading the queue means "unknown", never zero
            for pool in self.config.pools:
                m.OBSERVE_ERRORS.labels(pool, "queue").inc()
            return None, None, [f"queue: {type(exc).__name__}: {exc}"]
        return stats, detail, []

    async def _observe_registry(self) -> tuple[set[str] | None, list[ServerInfo] | None, list[str]]:
        """The pause switches and the registry's servers; the list is read again only when the
        registry's change counter moved (registrations, drains, deaths, removals; not
        heartbeats), so a tick's read is one short row whatever the size of the fleet."""
        try:
            paused, version, fresh = await self.store.registry_if_changed(self._servers_version)
        except Exception as exc:
            return None, None, [f"servers: {type(exc).__name__}", f"pause flags: {type(exc).__name__}"]
        if fresh is not None:
            self._servers, self._servers_version = fresh, version
        return paused, self._servers, []

    async def _with_load(
        self, servers: list[ServerInfo], detail: WorkDetail | None
    ) -> tuple[list[ServerInfo] | None, list[str]]:
        """This observation's copies of the servers, each with the tasks it holds now (busy or
        idle from the running tasks just read, fresher than a heartbeat's load)."""
        held: dict[str, int] = {}
        if detail is not None:
            for r in detail.running:
                if r.server is not None:
                    held[r.server] = held.get(r.server, 0) + 1
        else:  # the queue's read failed: ask for the running counts alone
            try:
                held = await self.queue.running_by_server()
            except Exception as exc:
                return None, [f"servers: {type(exc).__name__}"]
        # The cached objects as they are for idle servers (nothing writes to them), new ones for
        # those that hold tasks: the cached list is shared by every observation.
        load = held.get
        return [
            s
            if (n := load(s.id, 0)) == s.current_load
            else ServerInfo(s.id, s.pool, s.container_id, s.status, current_load=n, started_at=s.started_at)
            for s in servers
        ], []

    async def _observe_providers(self, names: Sequence[str]) -> dict[str, Any]:
        """:meth:`_observe_provider` of each of ``names``, side by side; a pool's entry is the
        exception when its read raised (the fence refused it)."""
        results = await asyncio.gather(
            *(self._observe_provider(self.config.pools[n]) for n in names), return_exceptions=True
        )
        return dict(zip(names, results, strict=True))

    async def _observe_provider(
        self, rules: PoolRules
    ) -> tuple[ProviderState | None, dict[str, ProviderState | None], str | None]:
        """Every deployment of the pool; the merged state is None (unknown: hold) when one that
        may hold replicas could not be read."""
        names = [o.name for o in rules.options]
        results = await asyncio.gather(*(self.provider.observe(n) for n in names), return_exceptions=True)
        per: dict[str, ProviderState | None] = {}
        errors: list[str] = []
        for dep, res in zip(names, results, strict=True):
            if isinstance(res, BaseException):
                if not isinstance(res, Exception) or isinstance(res, NotLeader):
                    raise res
                per[dep] = None
                label = "provider" if len(names) == 1 else f"provider {dep}"
                errors.append(f"{label}: {type(res).__name__}: {res}")
            else:
                per[dep] = res
                if rules.scale_down_victims == "idle" and not res.stops_named:
                    self._warn_victims(rules, dep)
        if errors:
            m.OBSERVE_ERRORS.labels(rules.name, "provider").inc()
        placement = self.placements[rules.name]
        blind = [
            dep
            for dep, st in per.items()
            if st is None and (len(names) == 1 or (placement.get(dep).last_target or 0) > 0)
        ]
        known = [st for st in per.values() if st is not None]
        merged = None if blind or not known else merge_states(known)
        return merged, per, "; ".join(errors) or None

    def _warn_victims(self, rules: PoolRules, dep: str) -> None:
        """Once per deployment: the rules count on stopping idle replicas, the provider picks."""
        if dep in self._victims_warned:
            return
        self._victims_warned.add(dep)
        log.warning(
            "pool %s: its rules say scale_down_victims: idle, but deployment %s cannot stop the replica "
            "the controller names (DataCrunch picks which one a lower count stops, maybe a busy one): "
            "give it _replica_slots in its spec and re-run gpuscale deploy apply (one DataCrunch "
            "deployment per replica), or set scale_down_victims: any in the pools file",
            rules.name,
            dep,
        )

    # ------------------------------------------------------------------ fast path
    def at_max(self, name: str) -> bool:
        """Whether ``name`` ran at its ``max_replicas`` when last observed (no more can start)."""
        current = self.provider_counts.get(name)
        return current is not None and current >= self.config.pools[name].max_replicas

    async def fast_worthy(self, names: Sequence[str]) -> list[str]:
        """Of the pools that got new claimable work, those where it can change the decision
        before the next tick: below their max and either at zero (scale from zero), not yet
        timing a scale-up (the new work may start the ``scale_up_delay``), or holding a queued
        ``critical`` task (asked of the counters, one round trip, only for pools already
        timing).  Elsewhere the work waits for the tick: nothing the policy does would change."""
        out: list[str] = []
        ask: list[str] = []
        for name in names:
            if self.at_max(name):
                continue
            current = self.provider_counts.get(name)
            if not current or self.states[name].up_since is None:
                out.append(name)
            else:
                ask.append(name)
        if ask:
            try:
                critical = await self.store.queued_critical(ask)
            except Exception as exc:  # unknown: reconcile them, as before the check
                log.debug("fast path: critical counts unknown: %s", type(exc).__name__)
                critical = set(ask)
            out.extend(n for n in ask if n in critical)
        return sorted(out)

    # ------------------------------------------------------------------ reconcile
    async def reconcile_all(self, budget_spend: Mapping[str, float] | None = None) -> dict[str, Decision]:
        return await self.reconcile_some(list(self.config.pools), budget_spend)

    async def reconcile_some(
        self, names: Sequence[str], budget_spend: Mapping[str, float] | None = None
    ) -> dict[str, Decision]:
        """One observation, then each of ``names`` (the fast path passes the pools notified)."""
        # The provider's deployments are read side by side with the database (their fence check
        # on the lease's connection, their calls over HTTP), not after it, pool by pool.
        providers_at = time.monotonic()
        observed, provided = await asyncio.gather(self.observe(), self._observe_providers(names))
        observed.providers.update(provided)
        observed.providers_at = providers_at
        results = await asyncio.gather(
            *(self.reconcile_pool(n, observed, budget_spend) for n in names), return_exceptions=True
        )
        out: dict[str, Decision] = {}
        for name, res in zip(names, results, strict=True):
            if isinstance(res, BaseException):
                log.exception("reconcile of pool %s failed", name, exc_info=res)
            elif res is not None:
                out[name] = res
        return out

    async def reconcile_one(
        self, name: str, budget_spend: Mapping[str, float] | None = None
    ) -> Decision | None:
        """Fast path (a notification): observe and reconcile just this pool."""
        return await self.reconcile_pool(name, await self.observe(), budget_spend)

    async def reconcile_pool(
        self, name: str, observed: Observed, budget_spend: Mapping[str, float] | None
    ) -> Decision | None:
        """Reconcile ``name`` on ``observed``; ``None`` when this process may not act (the fence
        refused) or when a reconcile on newer data ran while this one waited for the pool."""
        rules = self.config.pools[name]
        async with self._locks[name]:
            if self._observed_at.get(name, float("-inf")) > observed.at:
                # A fast-path reconcile ran on newer data while this one waited for the lock: the
                # pool is decided on the latest there is; observing everything again for it (as
                # this did) made a tick that met a fast reconcile take two observations.
                return None
            self._observed_at[name] = observed.at
            if observed.providers_at < self._acted_at.get(name, float("-inf")):
                # The provider was read before the last reconcile of this pool changed it (a tick
                # and a fast reconcile observe side by side; only the acting is one at a time):
                # deciding on the count as it was would undo that change (a replica stopped for
                # being idle, started again a moment later).  Read the provider again, under the lock.
                observed.providers.pop(name, None)
            started = time.perf_counter()
            try:
                return await self._reconcile_locked(rules, observed, budget_spend)
            except NotLeader as exc:
                # The fence refused a provider call: this process does not lead (any more).  It
                # neither acts nor records anything for the pool: that is the leader's to do.
                log.info("pool %s: reconcile stopped, %s", name, exc)
                return None
            finally:
                m.RECONCILE_SECONDS.labels(name).observe(time.perf_counter() - started)

    async def _reconcile_locked(
        self, rules: PoolRules, observed: Observed, budget_spend: Mapping[str, float] | None
    ) -> Decision:
        name = rules.name
        now = self.clock()
        view = self.views[name]
        errors = list(observed.errors)
        read = observed.providers.pop(name, None)
        if isinstance(read, BaseException):
            raise read  # NotLeader: the fence refused the read
        provider_state, per_deployment, perr = read or await self._observe_provider(rules)
        if perr:
            errors.append(perr)
        stats = observed.stats.get(name) if observed.stats is not None else None
        if observed.stats is not None and stats is None:
            stats = PoolStats(name, {}, 0, 0, 0, 0, None, 0, 0, 0)  # type: ignore[arg-type]
        if provider_state is not None:
            self.provider_counts[name] = provider_state.target
        servers = observed.servers_of(name)
        ctx = Context(
            rules=self.config.pools, expected=self.estimator.expected, registered=observed.registered()
        )
        obs, counts = build_observation(rules, observed.work(), servers, provider_state, ctx)
        budget = self._budget_view(budget_spend, now)
        decision = decide(
            rules,
            obs,
            self.states[name],
            now,
            budget=budget,
            critical_immediate=self.config.critical_immediate,
            tick_s=self.config.reconcile_interval_s,
        )
        self.states[name] = decision.state
        dep_obs = {
            dep: deployment_obs(rules, dep, st, servers) if st is not None else None
            for dep, st in per_deployment.items()
        }
        placement: Placement | None = None
        if provider_state is not None and servers is not None:
            placement = place(
                rules, dep_obs, decision.desired, self.placements[name], now, replace_ids=decision.replace
            )
            self.placements[name] = placement.state
        self.deployment_counts[name] = {
            dep: st.target for dep, st in per_deployment.items() if st is not None
        }
        if not self.dry_run:
            # Written when it changed, not every tick: a write per pool per tick would grow with
            # the pools and the tick rate even when nothing happens.
            # Compared on the frozen state objects: building the saved form costs more than that.
            learned = self.estimator.snapshot()
            source = (decision.state, self.placements[name], {t: learned.get(t) for t in rules.task_types})
            if _state_moved(self._last_saved.get(name), source) and self._leading():
                try:
                    await self._save_state(name, self._saved_state(rules, decision.state))
                    self._last_saved[name] = source
                except Exception as exc:  # the memory is a help, not a must: the next tick saves it
                    log.debug("pool %s: could not save the policy state: %s", name, type(exc).__name__)
        self._observe_metrics(name, stats, obs, decision, counts, servers, provider_state)
        self._placement_metrics(rules, per_deployment, placement)

        paused = observed.paused is None or name in observed.paused
        if placement is not None and placement.vanished and not paused:
            await self._hand_back_vanished(rules, placement, servers)
        outcome, error = await self._act(
            rules, decision, provider_state, per_deployment, placement, servers, paused, errors
        )
        if outcome in ("applied", "error"):
            # An error may still have changed some deployments (or slots) before the failing call.
            self._acted_at[name] = time.monotonic()  # the clock of Observed.providers_at
        await self._record(rules, decision, provider_state, outcome, error, errors, placement)
        self._deployment_view(rules, view, per_deployment, dep_obs, placement, now)

        view.paused = bool(observed.paused is not None and name in observed.paused)
        if stats is not None:
            view.queued = {str(k): v for k, v in stats.queued.items()}
            view.running, view.blocked = stats.running, stats.blocked
            view.blocked_on_running = stats.blocked_on_running
            view.oldest_queued_age_s = stats.oldest_queued_age_s
            view.done, view.failed, view.dead = stats.done, stats.failed, stats.dead
        view.replicas_desired = decision.desired
        view.replicas_provider = provider_state.target if provider_state else None
        view.replicas_registered = counts["registered"] if observed.servers is not None else None
        view.replicas_starting = counts["starting"]
        view.provider_status = provider_state.status if provider_state else None
        view.last_decision = {
            "desired": decision.desired,
            "current": decision.current,
            "reason": decision.reason,
            "detail": decision.detail,
            "outcome": outcome,
            "at": now,
        }
        view.errors = errors + ([error] if error else [])
        view.at = now
        return decision

    def _budget_view(self, spend: Mapping[str, float] | None, now: float) -> BudgetView | None:
        """The calendar month's spend so far, projected to its end (one formula with the
        simulator's: :func:`gpuscale.controller.observe.project_spend`)."""
        today = dt.datetime.fromtimestamp(now, dt.UTC)
        start = dt.datetime(today.year, today.month, 1, tzinfo=dt.UTC)
        nxt = dt.datetime(today.year + (today.month == 12), today.month % 12 + 1, 1, tzinfo=dt.UTC)
        spent = None if spend is None else sum(spend.values())
        return budget_view(
            self.config.monthly_budget_usd,
            spent,
            (today - start).total_seconds(),
            (nxt - start).total_seconds(),
        )

    # ------------------------------------------------------------------ durations
    def learn_duration(self, task_type: str, seconds: float) -> None:
        """A task finished after ``seconds`` on its worker: refine the expected duration."""
        self.estimator.observe(task_type, seconds)

    def export_expected(self) -> None:
        for name, rules in self.config.pools.items():
            for t in rules.task_types:
                m.TASK_EXPECTED_SECONDS.labels(name, t).set(self.estimator.expected(t))

    def _saved_state(self, rules: PoolRules, state: PoolState) -> dict[str, Any]:
        """The policy's memory plus the learned durations of the pool's task types."""
        out = state.to_dict()
        learned = self.estimator.snapshot()
        out[_EXPECTED_KEY] = {t: learned[t] for t in rules.task_types if t in learned}
        out["placement"] = self.placements[rules.name].to_dict()  # cool-offs survive a failover
        return out

    async def _save_state(self, name: str, state: dict[str, Any]) -> None:
        """Write a pool's saved state, together with those of the pools reconciled side by side:
        a tick's pools reach this point in the same moment and go in one statement (a round trip
        per pool and tick made the tick grow with the pools; learned durations change most ticks
        in a busy fleet)."""
        if self._saving is None or self._saving_taken:
            self._saving, self._saving_taken = asyncio.create_task(self._write_states()), False
            self._saving.add_done_callback(lambda t: t.cancelled() or t.exception())
        self._to_save[name] = state
        await asyncio.shield(self._saving)

    async def _write_states(self) -> None:
        await asyncio.sleep(0)  # let the pools decided in this moment join the batch
        batch, self._to_save, self._saving_taken = self._to_save, {}, True
        await self.store.save_pool_states(batch, self.controller_id)

    async def _act(
        self,
        rules: PoolRules,
        decision: Decision,
        provider_state: ProviderState | None,
        per_deployment: Mapping[str, ProviderState | None],
        placement: Placement | None,
        servers: Sequence[ServerInfo] | None,
        paused: bool,
        errors: list[str],
    ) -> tuple[str, str | None]:
        if provider_state is None or placement is None:
            return "hold", None
        if paused:
            return "paused", None
        changes: list[tuple[str, ProviderState, int, list[str]]] = []
        for dep, target in placement.targets.items():
            st = per_deployment.get(dep)
            if st is None:
                continue
            ids = {r.id for r in st.replicas}
            stop = [rid for rid in decision.replace if rid in ids]
            if stop or target != st.target or not st.pinned:
                changes.append((dep, st, target, stop))
        if not changes:
            return "unchanged", None
        if self.dry_run:
            return "dry_run", None
        if (
            self._may_act is not None
            and not isinstance(self.provider, FencedProvider)  # that one checks before each call
            and not await self._may_act()
        ):
            raise NotLeader(f"pool {rules.name}: not the leader; nothing changed")
        idle = [
            s.container_id
            for s in servers or ()
            if s.pool == rules.name and s.current_load == 0 and s.container_id
        ]
        failed: list[str] = []
        # Up before down: the pool's capacity never dips while replicas move between deployments.
        changes.sort(key=lambda c: c[2] - c[1].target, reverse=True)
        for dep, st, target, stop in changes:
            try:
                if stop:
                    await self._replace(dep, st.target, stop)
                await self.provider.set_replicas(dep, target, idle=idle)
            except NotLeader:
                raise
            except Exception as exc:
                log.warning(
                    "pool %s: provider call for %s failed: %s: %s", rules.name, dep, type(exc).__name__, exc
                )
                failed.append(
                    f"{type(exc).__name__}: {exc}"
                    if len(rules.options) == 1
                    else f"{dep}: {type(exc).__name__}: {exc}"
                )
        if failed:
            return "error", "; ".join(failed)
        return "applied", None

    async def _hand_back_vanished(
        self, rules: PoolRules, placement: Placement, servers: Sequence[ServerInfo] | None
    ) -> None:
        """Replicas of a spot deployment that vanished were preempted: their workers are gone,
        so their tasks go back to the queue at once, without spending an attempt (the task did
        nothing wrong).  On-demand replicas that vanish are left to the reaper (a task that keeps
        killing its worker must still run out of attempts)."""
        for dep, ids in placement.vanished.items():
            opt = rules.option(dep)
            m.PREEMPTIONS.labels(rules.name, dep).inc(len(ids))
            log.warning(
                "pool %s: %d replica(s) of %s vanished%s: %s",
                rules.name,
                len(ids),
                dep,
                " (spot preemption)" if opt is not None and opt.spot else "",
                ", ".join(ids),
            )
            if opt is None or not opt.spot or self.dry_run:
                continue
            if self._may_act is not None and not await self._may_act():
                return
            gone = set(ids)
            for s in servers or ():
                if s.container_id in gone and s.pool == rules.name:
                    try:
                        await self.queue.set_server_status(s.id, "dead")
                        n = await self.queue.release_all(s.id)
                    except Exception as exc:
                        log.warning("pool %s: could not hand back %s's tasks: %s", rules.name, s.id, exc)
                        continue
                    if n:
                        log.info("pool %s: %d task(s) of preempted %s back in the queue", rules.name, n, s.id)

    async def _replace(self, deployment: str, current: int, replica_ids: Sequence[str]) -> None:
        """Stop replicas that never registered.  Providers that choose whom to stop (local,
        docker) stop exactly these; the DataCrunch cloud picks itself, so there a healthy replica
        may go instead — the count comes back either way when the caller sets ``desired``."""
        await self.provider.set_replicas(deployment, max(0, current - len(replica_ids)), idle=replica_ids)

    async def _record(
        self,
        rules: PoolRules,
        decision: Decision,
        provider_state: ProviderState | None,
        outcome: str,
        error: str | None,
        errors: Sequence[str] = (),
        placement: Placement | None = None,
    ) -> None:
        name = rules.name
        current = provider_state.target if provider_state is not None else None
        changed = current is not None and decision.desired != current
        if changed and outcome in ("applied", "dry_run"):
            direction = "up" if decision.desired > (current or 0) else "down"
            m.SCALE_EVENTS.labels(name, direction, decision.reason).inc()
        if decision.replace:
            m.REPLACEMENTS.labels(name).inc(len(decision.replace))
        detail = decision.detail
        placed: tuple[tuple[str, int], ...] = ()
        failed = bool(placement is not None and placement.failures)
        if placement is not None and len(rules.options) > 1:
            placed = tuple(placement.targets.items())
            # The decision log says where the replicas run and why, and which deployment failed.
            for dep, kind in placement.failures:
                m.DEPLOYMENT_FAILURES.labels(name, dep, kind).inc()
            lost = [f"{dep} failed ({kind})" for dep, kind in placement.failures]
            detail = f"{detail}; placed: {placement.summary()}" + (f"; {', '.join(lost)}" if lost else "")
        elif placement is not None:
            for dep, kind in placement.failures:
                m.DEPLOYMENT_FAILURES.labels(name, dep, kind).inc()
        noteworthy = (
            changed
            or outcome == "applied"
            or decision.reason in _NOTEWORTHY_HOLDS
            or error is not None
            or failed
        )
        key = (decision.desired, decision.reason, placed)
        if not noteworthy:
            self._last_logged.pop(name, None)
            return
        if not changed and not failed and self._last_logged.get(name) == key and error is None:
            return  # the same hold again: one line, not one per tick
        self._last_logged[name] = key
        frm = "?" if current is None else str(current)
        msg = "pool=%s %s → %d reason=%s outcome=%s: %s"
        args = (name, frm, decision.desired, decision.reason, outcome, detail)
        fields = {
            "pool": name,
            "from": current,
            "to": decision.desired,
            "reason": decision.reason,
            "outcome": outcome,
        }
        if error or (decision.reason == "hold_unknown" and errors):
            fields["error"] = error or "; ".join(errors)
            log.warning(msg + " error=%s", *args, fields["error"], extra={"fields": fields})
        else:
            log.info(msg, *args, extra={"fields": fields})
        if not self._leading():
            # It lost the lease during this reconcile (a freeze, say): the timeline is the new
            # leader's; what was logged above stays in this process's log.
            return
        try:
            await self.store.record_event(
                ScalingEvent(
                    pool=name,
                    from_replicas=current,
                    to_replicas=decision.desired,
                    reason=decision.reason,
                    detail=detail,
                    outcome=outcome,
                    error=error,
                    controller_id=self.controller_id,
                )
            )
        except Exception as exc:
            log.warning("pool %s: could not record the decision: %s", name, type(exc).__name__)

    def _observe_metrics(
        self,
        name: str,
        stats: PoolStats | None,
        obs: PoolObservation,
        decision: Decision,
        counts: Mapping[str, int],
        servers: Sequence[ServerInfo] | None,
        provider_state: ProviderState | None,
    ) -> None:
        m.REPLICAS_DESIRED.labels(name).set(decision.desired)
        if stats is not None:
            for prio in ("normal", "high", "critical"):
                m.QUEUE_DEPTH.labels(name, prio).set((obs.queued or {}).get(prio, 0))
            m.TASKS_RUNNING.labels(name).set(stats.running)
            m.TASKS_BLOCKED.labels(name).set(stats.blocked)
            m.OLDEST_QUEUED_AGE.labels(name).set(stats.oldest_queued_age_s or 0.0)
            before = self._dead_seen.get(name)
            if before is not None and stats.dead > before:
                m.TASKS_DEAD.labels(name).inc(stats.dead - before)
            self._dead_seen[name] = stats.dead
        if provider_state is not None:
            m.REPLICAS_PROVIDER.labels(name).set(provider_state.target)
            m.REPLICAS_STARTING.labels(name).set(counts["starting"])
        if servers is not None:
            m.REPLICAS_REGISTERED.labels(name).set(counts["registered"])
            if provider_state is not None:
                self._cold_starts(name, servers, provider_state)

    def _placement_metrics(
        self,
        rules: PoolRules,
        per_deployment: Mapping[str, ProviderState | None],
        placement: Placement | None,
    ) -> None:
        for opt in rules.options:
            st = per_deployment.get(opt.name)
            if st is not None:
                m.DEPLOYMENT_REPLICAS.labels(rules.name, opt.name).set(st.target)
            if placement is not None:
                m.DEPLOYMENT_AVAILABLE.labels(rules.name, opt.name).set(
                    0 if placement.state.get(opt.name).cooling(self.clock()) else 1
                )
                m.DEPLOYMENT_HOME.labels(rules.name, opt.name).set(1 if placement.home == opt.name else 0)

    def _deployment_view(
        self,
        rules: PoolRules,
        view: PoolView,
        per_deployment: Mapping[str, ProviderState | None],
        dep_obs: Mapping[str, DeploymentObs | None],
        placement: Placement | None,
        now: float,
    ) -> None:
        if placement is not None:
            view.home = placement.home
        items: list[dict[str, Any]] = []
        for opt in rules.options:
            st = per_deployment.get(opt.name)
            obs = dep_obs.get(opt.name)
            mem = self.placements[rules.name].get(opt.name)
            items.append(
                {
                    "name": opt.name,
                    "spot": opt.spot,
                    "price_per_hour": opt.price_per_hour,
                    "status": st.status if st is not None else None,
                    "replicas": st.target if st is not None else None,
                    "placed": placement.targets.get(opt.name) if placement is not None else None,
                    "registered": obs.registered if obs is not None else None,
                    "busy": obs.busy if obs is not None else None,
                    "cooling_until": mem.cool_until if mem.cooling(now) else None,
                    "failures": mem.failures,
                    "last_failure": mem.last_failure,
                    "preempted": mem.preempted_total,
                    "why": placement.why.get(opt.name, "") if placement is not None else "",
                }
            )
        view.deployments = items

    def _cold_starts(self, name: str, servers: Sequence[ServerInfo], provider_state: ProviderState) -> None:
        """Replica requested (provider's start time) → its worker registered."""
        by_id = {r.id: r for r in provider_state.replicas}
        for s in servers:
            if s.pool != name or not s.container_id or s.container_id in self._cold_seen:
                continue
            replica = by_id.get(s.container_id)
            if replica is None or s.started_at is None:
                continue
            self._cold_seen.add(s.container_id)
            cold = s.started_at.timestamp() - replica.started_at
            if 0 <= cold < 24 * 3600 and not math.isnan(cold):
                m.COLD_START_SECONDS.labels(name).observe(cold)
