"""Fault injection for the DataCrunch emulator.

A fault spec is a comma-separated list of ``name`` or ``name=value`` items, e.g.
``throttle=0.2,retry_after=1,error=0.1,slow=0.5,token_ttl=5,quota=2,unhealthy=deck-text``:

=================  ===========================================================================
``throttle=P``     answer 429 (with ``Retry-After``) to a fraction P of API calls
``throttle_next=N`` answer 429 to the next N API calls
``retry_after=S``  the ``Retry-After`` seconds sent with a 429 (default 1)
``error=P``        answer 500 to a fraction P of API calls
``error_next=N``   answer 500 to the next N API calls
``slow=S``         delay every answer by S seconds
``token_ttl=S``    issue access tokens that expire after S seconds
``quota=N``        at most N replicas across all deployments; the rest wait, status
                   ``quota_reached``
``quota=D``        deployment D (``|``-separated names) gets no new replicas: it keeps those
                   it has, the rest wait, status ``quota_reached`` (a GPU type sold out)
``preempt=R``      spot replicas vanish at R per spot-replica-hour (random, seeded): SIGKILL,
                   no notice, gone from the replica list (the cloud starts a new one)
``preempt=next:N`` the next N running spot replicas vanish (at the next reconciler pass)
``preempt=after:S`` every spot replica vanishes S seconds after its process started
``no_capacity``    scaling a deployment up (or creating / resuming one that would start
                   replicas) answers 400 ``insufficient_capacity``
``refuse_zero``    ``PATCH …/scaling`` with ``max_replica_count`` 0 answers 400
``unhealthy[=D]``  replicas of deployment D (``*`` or bare: every deployment) never become
                   healthy: they stay ``starting`` and no process is started
``seed=N``         seed of the random faults
=================  ===========================================================================

The same names are the JSON fields of ``POST /_emulator/faults`` (merged into the current
faults; ``{"spec": "..."}`` is parsed like the command-line flag; ``DELETE`` clears them).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

_DEPLOYMENT_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class FaultSpecError(ValueError):
    """A fault spec that cannot be parsed."""


@dataclass
class Faults:
    throttle: float = 0.0
    throttle_next: int = 0
    retry_after: float = 1.0
    error: float = 0.0
    error_next: int = 0
    slow: float = 0.0
    token_ttl: float | None = None
    quota: int | None = None
    quota_deployments: list[str] = field(default_factory=list)
    preempt_rate: float = 0.0  # per spot-replica-hour
    preempt_next: int = 0
    preempt_after: float | None = None
    no_capacity: bool = False
    refuse_zero: bool = False
    unhealthy: list[str] = field(default_factory=list)
    seed: int | None = None

    def is_unhealthy(self, deployment: str) -> bool:
        return "*" in self.unhealthy or deployment in self.unhealthy

    def is_sold_out(self, deployment: str) -> bool:
        return "*" in self.quota_deployments or deployment in self.quota_deployments

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def update(self, values: dict[str, Any]) -> None:
        """Merge ``values`` (field → value; ``spec`` → a spec string) into these faults."""
        if "spec" in values:
            parsed = parse_faults(str(values["spec"]))
            given = _given(str(values["spec"]))
            aliases = {
                "quota": ("quota", "quota_deployments"),
                "preempt": ("preempt_rate", "preempt_next", "preempt_after"),
            }
            fields = {name for g in given for name in aliases.get(g, (g,))}
            for f in dataclasses.fields(self):
                if f.name in fields:
                    setattr(self, f.name, getattr(parsed, f.name))
        for key, value in values.items():
            if key == "spec":
                continue
            self._set(key, value)

    def _set(self, key: str, value: Any) -> None:
        names = {f.name: f for f in dataclasses.fields(self)}
        if key == "quota" and value is not None and not _is_int(value):
            # quota=DEPLOYMENT: that deployment is sold out (a count stays a global quota).
            self._set("quota_deployments", value)
            return
        if key == "quota" and value is None:
            self.quota_deployments = []
        if key == "preempt":
            self._set_preempt(value)
            return
        if key not in names:
            raise FaultSpecError(f"unknown fault {key!r} (known: {', '.join(names)})")
        try:
            if key == "unhealthy":
                if value is True or value is None:
                    value = ["*"]
                elif value is False:
                    value = []
                elif isinstance(value, str):
                    value = [v for v in value.split("|") if v] or ["*"]
                else:
                    value = [str(v) for v in value]
            elif key in ("no_capacity", "refuse_zero"):
                value = value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "")
            elif key in ("throttle", "error", "slow", "retry_after"):
                value = float(value)
            elif key == "token_ttl":
                value = None if value is None else float(value)
            elif key in ("throttle_next", "error_next"):
                value = int(value)
            elif key in ("quota", "seed"):
                value = None if value is None else int(value)
            elif key == "quota_deployments":
                if isinstance(value, str):
                    value = [v for v in value.split("|") if v]
                else:
                    value = [str(v) for v in value or []]
                bad = [v for v in value if v != "*" and not _DEPLOYMENT_NAME.match(v)]
                if bad:
                    raise FaultSpecError(f"fault quota: a count or deployment names, not {bad[0]!r}")
            elif key in ("preempt_rate",):
                value = float(value)
            elif key == "preempt_next":
                value = int(value)
            elif key == "preempt_after":
                value = None if value is None else float(value)
        except (TypeError, ValueError):
            raise FaultSpecError(f"fault {key}: bad value {value!r}") from None
        if key in ("throttle", "error") and not 0.0 <= value <= 1.0:
            raise FaultSpecError(f"fault {key}: a probability between 0 and 1, not {value}")
        if (
            key in ("preempt_rate", "preempt_next", "preempt_after", "quota")
            and value is not None
            and value < 0
        ):
            raise FaultSpecError(f"fault {key}: must not be negative, not {value}")
        setattr(self, key, value)

    def _set_preempt(self, value: Any) -> None:
        """``R`` (per spot-replica-hour), ``next:N``, ``after:S``; None / ``off`` clears."""
        if value is None or str(value).strip().lower() in ("", "off", "0"):
            self.preempt_rate, self.preempt_next, self.preempt_after = 0.0, 0, None
            return
        text = str(value).strip()
        kind, sep, arg = text.partition(":")
        if not sep:
            self._set("preempt_rate", text)
        elif kind == "next":
            self._set("preempt_next", arg)
        elif kind == "after":
            self._set("preempt_after", arg)
        else:
            raise FaultSpecError(f"fault preempt: expected R, next:N or after:S, not {text!r}")


def _is_int(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    try:
        int(str(value))
    except ValueError:
        return False
    return True


def _given(spec: str) -> set[str]:
    return {item.split("=", 1)[0].strip() for item in spec.split(",") if item.strip()}


def parse_faults(spec: str | None) -> Faults:
    """Parse a ``--faults`` spec; raises FaultSpecError on an unknown name or bad value."""
    faults = Faults()
    for item in (spec or "").split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep:
            if name not in ("no_capacity", "refuse_zero", "unhealthy"):
                raise FaultSpecError(f"fault {name!r} needs a value ({name}=...)")
            faults._set(name, True)
        else:
            faults._set(name, value.strip())
    return faults
