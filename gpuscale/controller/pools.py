"""Pool rules: the YAML pools file, parsed and validated with pydantic.

The file accepts the seeds' format exactly as written (``002_4d6e370fed16f91c.txt``)::

    visual_container_scaling:
      min_replicas: 0
      max_replicas: 3
      scale_up_threshold: 2 # tasks waiting
      scale_up_delay: 120s
      scale_down_delay: 600s
      startup_timeout: 300s

A top-level key ``<pool>_container_scaling`` (or ``<pool>_scaling``) defines pool ``<pool>``; a
``pools:`` mapping of name → rules is accepted as well.  Each pool may add: the task types it
serves (default: the registry's types for that pool), ``parallel`` (requests its model serves at
once: ``OLLAMA_NUM_PARALLEL``, default 1) with an optional ``batching`` curve (aggregate
throughput at 1..parallel requests, from ``gpuscale bench ollama``), ``tasks_per_replica`` (tasks
its worker holds, default ``parallel``), the provider ``deployment``, ``price_per_hour``,
``cold_start``, ``prewarm``, expected ``task_durations`` and the sizing knobs below.  Instead of
one ``deployment``, a pool may list ``deployments`` in order of preference, each with its own
price and/or ``spot: true``::

    deployments:
      - {name: gpuscale-visual-spot, spot: true, price_per_hour: 0.87}
      - {name: gpuscale-visual, price_per_hour: 1.75}
      - {name: gpuscale-visual-a100, price_per_hour: 1.29}

The controller places replicas on the first deployment that can take them and falls back to the
next one while a deployment cools off (``fallback_cooloff``, doubling per repeated failure up to
``max_fallback_cooloff``; see :mod:`gpuscale.controller.placement`).  Global keys:
``monthly_budget_usd``, ``critical_immediate``, ``reconcile_interval``.

Durations are ``90s``, ``10m``, ``1h``, ``1h30m`` or plain seconds.  ``scale_down_delay: auto``
stops an idle replica once keeping it would have cost as much as starting it again (its cold
start): the ski-rental break-even, never worse than twice the best possible idle cost.

A bad file raises :class:`PoolsFileError` naming the file, the field and what is wrong; the CLI
prints it and exits 2, so nothing starts on a broken file.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from gpuscale.queue import tasktypes


class PoolsFileError(ValueError):
    """The pools file is missing, not YAML, or breaks a rule; the message names file and field."""


_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: Any) -> float:
    """``90s`` / ``10m`` / ``1h`` / ``1h30m`` / ``2.5`` / ``120`` → seconds (float).

    Raises ValueError with a message meant for a person; ``bool`` is refused (YAML's ``yes``)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like 90s, 10m, 1h or seconds, not {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        if text.startswith("-"):
            raise ValueError(f"duration must not be negative, got {value!r}")
        try:
            seconds = float(text)
        except ValueError:
            pos = 0
            seconds = 0.0
            for match in _DURATION_RE.finditer(text):
                if match.start() != pos:
                    break
                seconds += float(match.group(1)) * _UNIT_S[match.group(2)]
                pos = match.end()
            if pos != len(text) or not text:
                raise ValueError(f"expected a duration like 90s, 10m, 1h or seconds, not {value!r}") from None
    else:
        raise ValueError(f"expected a duration like 90s, 10m, 1h or seconds, not {value!r}")
    if not math.isfinite(seconds):
        raise ValueError(f"duration must be finite, not {value!r}")
    if seconds < 0:
        raise ValueError(f"duration must not be negative, got {value!r}")
    return seconds


def _duration_or_auto(value: Any) -> Any:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    return parse_duration(value)


Duration = Annotated[float, BeforeValidator(parse_duration)]
DurationOrAuto = Annotated[float | Literal["auto"], BeforeValidator(_duration_or_auto)]


class DeploymentOption(BaseModel):
    """One provider deployment a pool may run its replicas on (``deployments:`` list item)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    name: str = Field(min_length=1, max_length=200)
    # None: the pool's ``price_per_hour``.  The controller prefers the API's prices when it can
    # read them (``GET /container-types``); this is the fallback.
    price_per_hour: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    # A spot deployment (``is_spot``): about half the price, replicas may vanish without notice.
    spot: bool = False


class PoolRules(BaseModel):
    """One pool's scaling rules.  Attribute names end in ``_s`` where the YAML key is a duration."""

    # strict: YAML's ``yes``/``on`` and quoted numbers are refused where a number is expected.
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True, strict=True)

    name: str = Field(min_length=1, max_length=63, pattern=r"^[a-z][a-z0-9_-]*$")
    min_replicas: int = Field(default=0, ge=0, le=1000)
    max_replicas: int = Field(default=1, ge=0, le=1000)
    # Tasks waiting (claimable, no free slot) at which the pool counts as backlogged.
    scale_up_threshold: int = Field(default=1, ge=1)
    # The up-condition must hold this long before replicas are added (not for critical work,
    # nor for certain work when the pool is at zero, nor for dependency pre-warm).
    scale_up_delay_s: Duration = Field(default=120.0, alias="scale_up_delay")
    # A surplus replica must be idle this long before it is stopped; "auto" = its cold start.
    scale_down_delay_s: DurationOrAuto = Field(default=600.0, alias="scale_down_delay")
    startup_timeout_s: Duration = Field(default=300.0, alias="startup_timeout")
    task_types: list[str] = Field(default_factory=list)
    # Tasks one replica's worker holds at once (its GPUSCALE_WORKER_CONCURRENCY); default:
    # ``parallel``.  More than ``parallel`` only queues them inside Ollama (FIFO).
    tasks_per_replica: int = Field(default=1, ge=1, le=256)
    # Requests the pool's model serves at once (Ollama's OLLAMA_NUM_PARALLEL, default 1 since
    # Ollama 0.9.7: more requests wait in Ollama's queue, one after another).
    parallel: int = Field(default=1, ge=1, le=64)
    # Optional batching curve: aggregate throughput with 1, 2, … ``parallel`` requests in flight,
    # relative to one request alone (``gpuscale bench ollama`` measures it).  Without it, k
    # requests served at once share the GPU with no gain (each at 1/k of its solo speed).
    batching: list[float] | None = None
    deployment: str = Field(default="", max_length=200)
    price_per_hour: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    # Request → registered and ready to claim (container start, model load, warm-up).
    cold_start_s: Duration = Field(default=120.0, alias="cold_start")
    # Start this pool's replicas while upstream work its tasks depend on is still running.
    prewarm: bool = True
    # "work": size by estimated GPU-seconds of work; "count": the seeds' rule
    # (tasks waiting above the threshold for the delay, replicas = ceil(tasks / tasks_per_replica),
    # the whole pool stops after scale_down_delay of an empty queue).
    sizing: Literal["work", "count"] = "work"
    # Expected GPU-seconds of one task running alone on a replica, per task type (a start; the
    # controller refines these from observed durations).
    task_durations_s: dict[str, Duration] = Field(default_factory=dict, alias="task_durations")
    default_task_duration_s: Duration = Field(default=60.0, alias="default_task_duration")
    # Work sizing: enough replicas that the queued + running work clears within this time.
    drain_target_s: Duration = Field(default=600.0, alias="drain_target")
    # Deadline sizing: this pool's part of a deck should be done this long after the deck was
    # submitted.  The drain target becomes what is left of it for the oldest deck with work here,
    # and replicas are added while that is not met (their cold start is worth the deadline).
    # None: drain_target with the cold-start saving rule.
    stage_deadline_s: Duration | None = Field(default=None, alias="stage_deadline")
    # Which replicas the provider stops when the count is lowered: "idle" (the controller names
    # them: the local and docker providers, and DataCrunch deployments split into one-replica
    # slots with ``_replica_slots``) or "any" (a plain DataCrunch deployment: the cloud picks and
    # may stop a busy replica mid-task).  With "any" the policy lowers the count only while that
    # is cheaper on average than keeping the idle replicas (see policy.py).
    scale_down_victims: Literal["idle", "any"] = "idle"
    # At most this many replicas added by one decision (None: no limit).
    max_step_up: int | None = Field(default=None, ge=1)
    # After a replica misses startup_timeout, wait this long (doubling per repeated failure, up to
    # max_startup_backoff) before the next replacement or scale-up.
    startup_backoff_s: Duration = Field(default=60.0, alias="startup_backoff")
    max_startup_backoff_s: Duration = Field(default=900.0, alias="max_startup_backoff")
    # Fallback deployments, in order of preference (empty: just ``deployment``).
    deployments: tuple[DeploymentOption, ...] = Field(default=(), strict=False)  # YAML gives a list
    # A deployment that reports quota_reached, misses startup_timeout or loses spot replicas too
    # often is skipped for this long; doubling per repeated failure, up to max_fallback_cooloff.
    fallback_cooloff_s: Duration = Field(default=300.0, alias="fallback_cooloff")
    max_fallback_cooloff_s: Duration = Field(default=3600.0, alias="max_fallback_cooloff")
    # This many replicas vanishing (spot preemption) within preemption_window counts as a failure.
    preemption_limit: int = Field(default=2, ge=1)
    preemption_window_s: Duration = Field(default=3600.0, alias="preemption_window")

    @model_validator(mode="before")
    @classmethod
    def _one_or_many(cls, data: Any) -> Any:
        # ``deployments`` (a list) or the old single ``deployment``; never both.
        if isinstance(data, dict) and data.get("deployments"):
            items = data["deployments"]
            if data.get("deployment") and (
                not isinstance(items, list | tuple)
                or not items
                or not isinstance(items[0], dict | DeploymentOption)
                or _opt_name(items[0]) != data["deployment"]
            ):
                raise ValueError("give either deployment or deployments, not both")
            if isinstance(items, list | tuple) and items and isinstance(items[0], dict | DeploymentOption):
                data = {**data, "deployment": _opt_name(items[0])}
        return data

    @model_validator(mode="before")
    @classmethod
    def _default_slots(cls, data: Any) -> Any:
        # A worker that holds more tasks than its model serves at once only hoards work.
        if isinstance(data, dict) and "tasks_per_replica" not in data and "parallel" in data:
            return {**data, "tasks_per_replica": data["parallel"]}
        return data

    @model_validator(mode="after")
    def _check(self) -> PoolRules:
        if self.batching is not None:
            if len(self.batching) != self.parallel:
                raise ValueError(
                    f"batching lists {len(self.batching)} value(s); expected one per request served "
                    f"at once (parallel = {self.parallel})"
                )
            if any(not math.isfinite(v) or v <= 0 for v in self.batching):
                raise ValueError("batching values must be finite and > 0")
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})"
            )
        if self.drain_target_s <= 0:
            raise ValueError("drain_target must be > 0")
        if self.startup_timeout_s <= 0:
            raise ValueError("startup_timeout must be > 0")
        if len(set(self.task_types)) != len(self.task_types):
            raise ValueError("task_types lists a type twice")
        names = [d.name for d in self.deployments]
        if len(set(names)) != len(names):
            raise ValueError("deployments lists a deployment twice")
        if self.max_fallback_cooloff_s < self.fallback_cooloff_s:
            raise ValueError("max_fallback_cooloff must be >= fallback_cooloff")
        stray = sorted(set(self.task_durations_s) - set(self.task_types))
        if stray:
            raise ValueError(f"task_durations names types this pool does not serve: {', '.join(stray)}")
        return self

    @property
    def idle_timeout_s(self) -> float:
        """``scale_down_delay`` in seconds, with ``auto`` resolved to the ski-rental break-even."""
        if self.scale_down_delay_s == "auto":
            return float(self.cold_start_s)
        return float(self.scale_down_delay_s)

    @property
    def scale_down_auto(self) -> bool:
        return self.scale_down_delay_s == "auto"

    def duration_for(self, task_type: str) -> float:
        """Expected GPU-seconds of one task of this type, alone on one replica."""
        return float(self.task_durations_s.get(task_type, self.default_task_duration_s))

    def speedup(self, in_flight: int) -> float:
        """Aggregate throughput with ``in_flight`` requests served at once (capped at
        ``parallel``), relative to one request alone."""
        k = max(1, min(in_flight, self.parallel))
        if self.batching is None:
            return 1.0
        return float(self.batching[k - 1]) / float(self.batching[0])

    @property
    def hourly_cost(self) -> float:
        return self.price_per_hour

    @property
    def options(self) -> tuple[DeploymentOption, ...]:
        """The pool's deployments in order of preference, each with its price filled in (the
        pool's ``price_per_hour`` where the item gave none); one item for the old form."""
        if not self.deployments:
            return (DeploymentOption(name=self.deployment or self.name, price_per_hour=self.price_per_hour),)
        return tuple(
            d
            if d.price_per_hour is not None
            else d.model_copy(update={"price_per_hour": self.price_per_hour})
            for d in self.deployments
        )

    def option(self, deployment: str) -> DeploymentOption | None:
        return next((d for d in self.options if d.name == deployment), None)


def _opt_name(item: Any) -> Any:
    return item.name if isinstance(item, DeploymentOption) else item.get("name")


class Objectives(BaseModel):
    """Service objectives the rules are tuned for (``objectives:`` in the pools file): deck
    completion (submission → last task done) and task wait (claimable → claimed) percentiles.
    ``gpuscale simulate`` reports against them and ``gpuscale tune`` searches for the cheapest
    rules that meet them; each pool's ``stage_deadline`` is how the policy works towards them."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    deck_p50_s: Duration | None = Field(default=None, alias="deck_p50")
    deck_p95_s: Duration | None = Field(default=None, alias="deck_p95")
    wait_p50_s: Duration | None = Field(default=None, alias="wait_p50")
    wait_p95_s: Duration | None = Field(default=None, alias="wait_p95")

    def targets(self) -> dict[str, float]:
        """Name (``deck_p95``) → seconds, for the objectives that are set."""
        out = {}
        for name in ("deck_p50", "deck_p95", "wait_p50", "wait_p95"):
            value = getattr(self, f"{name}_s")
            if value is not None:
                out[name] = float(value)
        return out


class PoolsConfig(BaseModel):
    """All pools plus the global rules."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, strict=True)

    pools: dict[str, PoolRules]
    monthly_budget_usd: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    # Critical-priority tasks scale their pool at once, without scale_up_delay.
    critical_immediate: bool = True
    # How often the controller observes and decides.
    reconcile_interval_s: Duration = Field(default=10.0, alias="reconcile_interval")
    objectives: Objectives | None = None

    @model_validator(mode="after")
    def _check(self) -> PoolsConfig:
        if not self.pools:
            raise ValueError("no pools defined")
        _check_task_types(self.pools, {n: f"pools.{n}" for n in self.pools})
        return self

    def pool_for_type(self, task_type: str) -> PoolRules:
        for rules in self.pools.values():
            if task_type in rules.task_types:
                return rules
        raise KeyError(f"no pool serves task type {task_type!r}")

    def type_to_pool(self) -> dict[str, str]:
        return {t: name for name, rules in self.pools.items() for t in rules.task_types}


def _check_task_types(pools: dict[str, PoolRules], keys: dict[str, str]) -> None:
    """Every task type served by exactly one pool, the one the task registry routes it to."""
    registry = tasktypes.all_types()
    owner: dict[str, str] = {}
    for name, rules in pools.items():
        if rules.name != name:
            raise ValueError(f"{keys[name]}.name: {rules.name!r} does not match the pool name {name!r}")
        for t in rules.task_types:
            if t in owner:
                raise ValueError(
                    f"{keys[name]}.task_types: {t!r} is already served by pool {owner[t]!r}; "
                    "every task type must be served by exactly one pool"
                )
            owner[t] = name
            known = registry.get(t)
            if known is None:
                raise ValueError(
                    f"{keys[name]}.task_types: unknown task type {t!r}; known: {', '.join(sorted(registry))}"
                )
            if known.pool != name:
                raise ValueError(
                    f"{keys[name]}.task_types: {t!r} is routed to pool {known.pool!r} by the task registry"
                )
    # Every registered type of a pool this file defines must be served (by that pool).
    for t, spec in sorted(registry.items()):
        if spec.pool in pools and t not in owner:
            raise ValueError(
                f"{keys[spec.pool]}.task_types: task type {t!r} of pool {spec.pool!r} is missing"
            )


_GLOBAL_KEYS = {"monthly_budget_usd", "critical_immediate", "reconcile_interval", "objectives"}
_SUFFIXES = ("_container_scaling", "_scaling")


def _pool_sections(data: dict[str, Any], source: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split the top level into pool sections (name → raw dict) and global keys."""
    pools: dict[str, Any] = {}
    globals_: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise PoolsFileError(f"{source}: top-level key {key!r} is not a string")
        if key == "pools":
            if not isinstance(value, dict):
                raise PoolsFileError(f"{source}: pools: expected a mapping of pool name → rules")
            for name, body in value.items():
                if str(name) in pools:
                    raise PoolsFileError(f"{source}: pool {name!r} is defined twice")
                pools[str(name)] = (f"pools.{name}", body)
            continue
        if key in _GLOBAL_KEYS:
            globals_[key] = value
            continue
        for suffix in _SUFFIXES:
            if key.endswith(suffix) and len(key) > len(suffix):
                name = key[: -len(suffix)]
                if name in pools:
                    raise PoolsFileError(f"{source}: pool {name!r} is defined twice")
                pools[name] = (key, value)
                break
        else:
            raise PoolsFileError(
                f"{source}: unknown top-level key {key!r} (expected '<pool>_container_scaling', "
                f"'pools' or one of {', '.join(sorted(_GLOBAL_KEYS))})"
            )
    return pools, globals_


def _loc(err: Any) -> str:
    return ".".join(str(p) for p in err.get("loc", ()))


def _msg(err: Any) -> str:
    # pydantic prefixes messages from our validators with "Value error, "; drop it.
    return str(err["msg"]).removeprefix("Value error, ")


def parse_pools(data: Any, source: str = "<pools>") -> PoolsConfig:
    """Validate an already-parsed YAML document.  Raises :class:`PoolsFileError`."""
    if not isinstance(data, dict):
        raise PoolsFileError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    sections, globals_ = _pool_sections(data, source)
    pools: dict[str, PoolRules] = {}
    for name, (key, body) in sections.items():
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise PoolsFileError(f"{source}: {key}: expected a mapping of rules, got {type(body).__name__}")
        raw = dict(body)
        raw.setdefault("name", name)
        raw.setdefault("task_types", tasktypes.types_for_pool(name))
        if not raw.get("deployments"):
            raw.setdefault("deployment", f"gpuscale-{name}")
        try:
            pools[name] = PoolRules.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = _loc(first)
            field = f"{key}.{where}" if where else key
            raise PoolsFileError(f"{source}: {field}: {_msg(first)}") from None
    try:
        _check_task_types(pools, {n: key for n, (key, _) in sections.items()})
    except ValueError as exc:
        raise PoolsFileError(f"{source}: {exc}") from None
    try:
        return PoolsConfig.model_validate({"pools": pools, **globals_})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = _loc(first)
        raise PoolsFileError(f"{source}: {where + ': ' if where else ''}{_msg(first)}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            try:
                dup = key in seen
            except TypeError:
                continue  # an unhashable key: the base constructor reports it
            if dup:
                line = key_node.start_mark.line + 1
                raise PoolsFileError(f"key {key!r} is given twice in one mapping (line {line})")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_pools(path: Path | str) -> PoolsConfig:
    """Read and validate a pools file.  Raises :class:`PoolsFileError` (file, field, problem)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PoolsFileError(f"{path}: pools file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PoolsFileError(f"{path}: cannot read pools file: {exc}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader
    except PoolsFileError as exc:
        raise PoolsFileError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise PoolsFileError(f"{path}: not valid YAML: {exc}") from None
    return parse_pools(data, str(path))
