"""Placement: which of a pool's deployments runs its replicas (fallback deployments, spot).

A pool may list several provider deployments in order of preference (say spot H100, then
on-demand H100, then on-demand A100).  :func:`decide` says *how many* replicas the pool needs;
:func:`place` says *where*.  Pure, like ``decide``: no I/O, no clock — ``now`` comes in, and the
memory between ticks (:class:`PlacementState`) goes in and comes back out as plain data that the
controller saves with the pool's policy state, so a new leader keeps the cool-offs.

Rules:

* **Home.**  New replicas go to the first deployment that is not cooling off (the *home*).  When
  every deployment is cooling off, the one whose cool-off ends first is home (the pool must run
  somewhere).
* **Failures and cool-off.**  A deployment fails when it reports ``quota_reached`` while asked
  for replicas, when one of its replicas does not register within ``startup_timeout`` (or is
  reported failed), or when ``preemption_limit`` of its replicas vanish (spot preemption: no
  notice, the replica is just gone from the list) within ``preemption_window``.  It is then
  skipped for ``fallback_cooloff`` × 2^(failures-1), at most ``max_fallback_cooloff``; the
  failure count is forgotten after ``max_fallback_cooloff`` without a failure once the cool-off
  is over.
* **Probe before moving back.**  When a cool-off ends, the deployment that failed takes one new
  replica at a time until one registers; the next deployment keeps the replicas it has (idle ones
  too) meanwhile, so a deployment still short of capacity costs no dip and no extra cold start.
* **Never cut running work.**  A deployment more preferred than home (cooling off) keeps its
  registered replicas (they work, and they are the cheaper ones); a deployment less preferred
  than home keeps only its *busy* replicas: its idle ones go first, the busy ones follow as their
  tasks finish, and home takes the rest of the pool's count.  That is how replicas move back to
  the preferred deployment once it recovers.  One exception, the probe: when busy replicas of
  less preferred deployments fill the whole count (a steady backlog: a worker claims its next
  task the moment it finishes one, so none is ever idle at a tick), the least preferred of them
  makes room for it (its worker drains: the task finishes within the drain grace or goes back to
  the queue without spending an attempt); otherwise the recovered deployment would get no probe
  until the backlog is over.  Under full load, each probe that fails costs that one replica's
  place for a cold start; the growing cool-off bounds how often.
* **Preemption.**  Replica ids seen last tick that are gone now, beyond the ones the controller
  itself removed (scale-downs, replacements, replicas already ``stopping``), *vanished*; the
  caller hands their tasks back to the queue without spending an attempt when the deployment is
  spot.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Final

from gpuscale.controller.pools import DeploymentOption, PoolRules

# Failure kinds (metric label values; keep them stable).
QUOTA_REACHED: Final = "quota_reached"
STARTUP_TIMEOUT: Final = "startup_timeout"
PREEMPTED: Final = "preempted"


@dataclass(frozen=True)
class ReplicaObs:
    """One replica of a deployment as the controller sees it this tick."""

    id: str
    started_at: float
    status: str = "running"  # the provider's word mapped onto ours (running/starting/stopping/failed)
    registered: bool = False  # its worker registered and heartbeats
    busy: bool = False  # its worker holds at least one task


@dataclass(frozen=True)
class DeploymentObs:
    """One deployment this tick; ``target`` is the count the provider is set to."""

    name: str
    target: int
    status: str = "healthy"
    replicas: tuple[ReplicaObs, ...] = ()

    @property
    def registered(self) -> int:
        return sum(1 for r in self.replicas if r.registered and r.status != "stopping")

    @property
    def busy(self) -> int:
        # A stopping replica drains on its own; the count no longer holds it.
        return sum(1 for r in self.replicas if r.busy and r.status != "stopping")


@dataclass(frozen=True)
class DeploymentMemory:
    """What placement remembers of one deployment between ticks."""

    failures: int = 0
    cool_until: float | None = None
    last_failure: str | None = None  # kind of the last failure
    last_failure_at: float | None = None
    preempted_at: tuple[float, ...] = ()  # vanished replicas within the preemption window
    preempted_total: int = 0
    # After a failure, until one of its new replicas registers: it takes one replica at a time
    # (a probe) and the fallback keeps what it has meanwhile.
    probing: bool = False
    last_registered: int = 0
    seen: tuple[str, ...] = ()  # replica ids seen last tick (not stopping)
    expected_gone: tuple[str, ...] = ()  # ids the controller stopped or saw stopping
    pending_down: int = 0  # replicas a scale-down still has to remove
    last_target: int | None = None

    def cooling(self, now: float) -> bool:
        return self.cool_until is not None and now < self.cool_until


@dataclass(frozen=True)
class PlacementState:
    deployments: Mapping[str, DeploymentMemory] = field(default_factory=dict)

    def get(self, name: str) -> DeploymentMemory:
        return self.deployments.get(name, DeploymentMemory())

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (saved with the pool's policy state)."""
        return {name: {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(mem).items()}
                for name, mem in self.deployments.items()}  # fmt: skip

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> PlacementState:
        """Inverse of :meth:`to_dict`; unknown keys are ignored, missing ones take defaults."""
        known = set(DeploymentMemory.__dataclass_fields__)
        out: dict[str, DeploymentMemory] = {}
        for name, raw in (data or {}).items():
            if not isinstance(raw, Mapping):
                raise ValueError(f"placement state of {name!r} is not a mapping")
            kw = {k: v for k, v in raw.items() if k in known}
            for key in ("preempted_at", "seen", "expected_gone"):
                if key in kw:
                    kw[key] = tuple(kw[key])
            out[str(name)] = DeploymentMemory(**kw)
        return cls(out)


@dataclass(frozen=True)
class Placement:
    """Where the pool's replicas go this tick."""

    targets: dict[str, int]  # deployment → replica count to pin (deployments not observed: absent)
    home: str  # the deployment new replicas go to
    state: PlacementState
    why: dict[str, str]  # deployment → a short reason, for status and the decision log
    failures: tuple[tuple[str, str], ...] = ()  # (deployment, kind) that failed this tick
    vanished: dict[str, tuple[str, ...]] = field(default_factory=dict)  # deployment → replica ids

    @property
    def total(self) -> int:
        return sum(self.targets.values())

    def summary(self) -> str:
        parts = [f"{name} {n}" + (f" ({self.why[name]})" if self.why.get(name) else "")
                 for name, n in self.targets.items()]  # fmt: skip
        return "; ".join(parts)


def cooloff_s(rules: PoolRules, failures: int) -> float:
    """Cool-off after the ``failures``-th failure in a row."""
    return float(min(rules.fallback_cooloff_s * 2 ** max(0, failures - 1), rules.max_fallback_cooloff_s))


def _vanished(mem: DeploymentMemory, obs: DeploymentObs) -> tuple[tuple[str, ...], int]:
    """Replica ids gone since last tick that nobody removed on purpose; pending_down left."""
    now_ids = {r.id for r in obs.replicas}
    gone = [rid for rid in mem.seen if rid not in now_ids and rid not in mem.expected_gone]
    pending = mem.pending_down
    # A scale-down removes replicas the provider picks: the first ``pending`` gone ones are those.
    take = min(pending, len(gone))
    return tuple(gone[take:]), pending - take


def place(
    rules: PoolRules,
    observed: Mapping[str, DeploymentObs | None],
    desired: int,
    state: PlacementState,
    now: float,
    *,
    replace_ids: Sequence[str] = (),
) -> Placement:
    """Split ``desired`` replicas over the pool's deployments.  Pure.

    ``observed`` maps each deployment name to its observation, or None when it could not be read
    (then its count is left as it is and it takes no new replicas).  ``replace_ids`` are replicas
    the caller stops this tick (startup timeouts)."""
    options: tuple[DeploymentOption, ...] = rules.options
    mems: dict[str, DeploymentMemory] = {}
    failures: list[tuple[str, str]] = []
    vanished: dict[str, tuple[str, ...]] = {}
    for opt in options:
        mem = state.get(opt.name)
        obs = observed.get(opt.name)
        quiet_since = mem.cool_until if mem.cool_until is not None else mem.last_failure_at
        if (
            mem.failures
            and quiet_since is not None
            # Counted from the end of the cool-off: counted from the failure, a cool-off at the
            # maximum was itself the "quiet spell", and the next failure started again at the
            # shortest one (5, 10, 20, 40, 60, 5, 10 … minutes instead of staying at 60).
            and now - quiet_since >= rules.max_fallback_cooloff_s
            and not mem.cooling(now)
        ):
            mem = replace(mem, failures=0)  # a long quiet spell: start the cool-offs afresh
        if obs is None:
            mems[opt.name] = mem
            continue
        gone, pending = _vanished(mem, obs)
        recent = tuple(t for t in mem.preempted_at if now - t < rules.preemption_window_s)
        if gone:
            vanished[opt.name] = gone
            recent = recent + (now,) * len(gone)
        kind: str | None = None
        if obs.status == "quota_reached" and obs.target > 0:
            kind = QUOTA_REACHED
        elif any(
            r.status == "failed" or (not r.registered and now - r.started_at >= rules.startup_timeout_s)
            for r in obs.replicas
            if r.status != "stopping"
        ):
            kind = STARTUP_TIMEOUT
        elif len(recent) >= rules.preemption_limit:
            kind = PREEMPTED
        if kind is not None and mem.cooling(now):
            kind = None  # already skipped: the same trouble seen again is not a new failure
        if kind is not None:
            n = mem.failures + 1
            mem = replace(
                mem,
                failures=n,
                cool_until=now + cooloff_s(rules, n),
                last_failure=kind,
                last_failure_at=now,
            )
            if kind == PREEMPTED:
                recent = ()
            failures.append((opt.name, kind))
            mem = replace(mem, probing=True)
        elif mem.probing and not mem.cooling(now) and obs.registered > mem.last_registered:
            mem = replace(mem, probing=False)  # a new replica registered: it works again
        live = [r for r in obs.replicas if r.status != "stopping"]
        if len(live) <= obs.target:
            pending = 0  # the last scale-down is done
        mems[opt.name] = replace(
            mem,
            preempted_at=recent,
            preempted_total=mem.preempted_total + len(gone),
            seen=tuple(r.id for r in live),
            expected_gone=tuple(
                {r.id for r in obs.replicas if r.status == "stopping"}
                | set(replace_ids) & {r.id for r in obs.replicas}
            ),
            pending_down=pending,
            last_registered=obs.registered,
        )

    # --- home: the first deployment not cooling off ---------------------------------------------
    known = [o.name for o in options if observed.get(o.name) is not None]
    available = [n for n in known if not mems[n].cooling(now)]
    if available:
        home = available[0]
    elif known:
        home = min(known, key=lambda n: (mems[n].cool_until or math.inf, known.index(n)))
    else:
        home = options[0].name
    home_rank = next((i for i, o in enumerate(options) if o.name == home), 0)

    # --- keep what must not be cut; home takes the rest -----------------------------------------
    keep: dict[str, int] = {}
    why: dict[str, str] = {}
    for rank, opt in enumerate(options):
        obs = observed.get(opt.name)
        mem = mems[opt.name]
        if obs is None:
            why[opt.name] = "not observed: left as it is"
            continue
        if opt.name == home:
            continue
        stopped = sum(1 for r in obs.replicas if r.id in replace_ids)
        target = max(0, obs.target - stopped)
        if rank < home_rank:
            keep[opt.name] = min(target, obs.registered)
        else:
            keep[opt.name] = min(target, obs.busy)
        if mem.cooling(now):
            left = (mem.cool_until or now) - now
            why[opt.name] = f"cooling off {left:.0f}s after {mem.last_failure} (failure #{mem.failures})"
        elif rank > home_rank:
            why[opt.name] = "fallback, not needed" if not keep[opt.name] else "busy replicas finish first"
    kept = sum(keep.values())
    home_obs = observed.get(home)
    home_floor = 0
    if home_obs is not None:
        home_stopped = sum(1 for r in home_obs.replicas if r.id in replace_ids)
        home_floor = min(max(0, home_obs.target - home_stopped), home_obs.busy)
    if kept + home_floor > desired:
        # Trim the preferred-but-cooling deployments' idle replicas, least preferred first.
        for opt in reversed(options[:home_rank]):
            obs = observed.get(opt.name)
            if obs is None or opt.name not in keep or kept + home_floor <= desired:
                continue
            cut = min(keep[opt.name] - min(keep[opt.name], obs.busy), kept + home_floor - desired)
            keep[opt.name] -= cut
            kept -= cut
    home_target = max(home_floor, desired - kept)
    if (
        home_obs is not None
        and mems[home].probing
        and not mems[home].cooling(now)
        and home_target == 0
        and 0 < desired == kept  # the count is full, not shrinking
    ):
        # Busy replicas of less preferred deployments fill the pool's count.  Under a steady
        # backlog none of them is ever idle at a tick (a worker claims its next task the moment
        # it finishes one), so "idle ones go first" frees no place: the recovered deployment
        # would get no probe until the backlog is over, when there is nothing left for it to
        # run, and the pool would stay on the fallback all the while.  So the least preferred
        # busy replica makes room for the probe: its worker drains on the scale-down (it
        # finishes its task within the drain grace, or hands it back without spending an
        # attempt).  Only for the probe: once it registers, the others go as their tasks end.
        for opt in reversed(options[home_rank + 1 :]):
            if keep.get(opt.name, 0) > 0:
                keep[opt.name] -= 1
                home_target = 1
                why[opt.name] = f"one busy replica makes room for {home}"
                break
    if home_obs is not None and mems[home].probing and not mems[home].cooling(now):
        # Probing a deployment that failed: one new replica at a time; the next deployment keeps
        # the replicas it has (idle ones too) until the probe registers, so a deployment still
        # short of capacity costs no cold start and no dip.
        probe = max(home_floor, home_obs.registered + 1)
        for opt in options[home_rank + 1 :]:
            obs = observed.get(opt.name)
            if home_target <= probe or obs is None or mems[opt.name].cooling(now):
                continue
            held = min(home_target - probe, max(0, obs.target - keep[opt.name]))
            keep[opt.name] += held
            home_target -= held
            if held:
                why[opt.name] = f"keeps {keep[opt.name]} while {home} probes"
    targets: dict[str, int] = {}
    for opt in options:
        if observed.get(opt.name) is None:
            continue
        targets[opt.name] = home_target if opt.name == home else keep[opt.name]
    home_mem = mems[home]
    if home_mem.cooling(now):
        why[home] = f"every deployment is cooling off; this one ends first ({home_mem.last_failure})"
    elif mems[home].probing:
        why[home] = f"probing after {mems[home].last_failure}: one new replica at a time"
    elif home_rank > 0:
        why[home] = "fallback: " + ", ".join(
            f"{o.name} cooling off" for o in options[:home_rank] if mems[o.name].cooling(now)
        )
    else:
        why[home] = "preferred"
    # Remember scale-downs, so the replicas they remove are not taken for preemptions.
    for name, n in targets.items():
        obs = observed[name]
        assert obs is not None
        n_live = sum(1 for r in obs.replicas if r.status != "stopping" and r.id not in replace_ids)
        drop = max(0, min(n_live, obs.target) - n)
        mems[name] = replace(mems[name], pending_down=mems[name].pending_down + drop, last_target=n)
    return Placement(
        targets=targets,
        home=home,
        state=PlacementState(mems),
        why=why,
        failures=tuple(failures),
        vanished=vanished,
    )
