"""DataCrunch deployment specs: load ``deploy/datacrunch/*.yaml``, normalise, diff.

A spec file holds a pool's deployments in the API's own shape (the JSON of ``POST
/container-deployments``, written as YAML): one mapping, a list of them, or several YAML
documents (``---``), in the pool's order of preference (fallback deployments, see ``pools.py``).
Loading checks every key against that shape, so a typo fails with the file and the path of the
bad key instead of being silently dropped by the API.

``normalize()`` fills the API's defaults and drops read-only fields so that what a file asks for
and what the API answers compare equal when they mean the same; the emulator stores deployments
in the same normal form.  ``diff()`` lists what ``deploy apply`` would change.

The replica counts (``scaling.min_replica_count`` / ``max_replica_count``) of an existing
deployment belong to the controller, which pins them at run time: ``deploy apply`` never diffs
or overwrites them (see :func:`update_body`).

Keys starting with ``_`` are gpuscale's own, never sent to the API.  The one a file may set is
``_replica_slots: N`` (:data:`SLOTS_KEY`): the logical deployment is realised as N DataCrunch
deployments ``{name}-r00`` … ``{name}-r{N-1:02d}`` (:func:`expand`), identical but for the name,
created at 0/1 and pinned by the controller at 1/1 (one replica) or 0/0 (none).  Why: DataCrunch
picks which replica a lowered replica count stops (there is no endpoint to choose), so with one
deployment per replica the controller stops exactly the idle replica it names by stopping that
replica's slot.  :func:`slot_name` and :func:`parse_slot_name` map between the two kinds of name.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import yaml

READ_ONLY = ("endpoint_base_url", "created_at")
REPLICA_COUNTS = ("min_replica_count", "max_replica_count")
NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


# Shared filesystem mounts name their volume with this placeholder in the shipped specs: the id
# is per account, so ``deploy apply`` fills it from GPUSCALE_SHARED_VOLUME_ID (and refuses to
# apply a spec that still holds it).
VOLUME_PLACEHOLDER = "${GPUSCALE_SHARED_VOLUME_ID}"
VOLUME_TYPES = ("scratch", "shared", "memory", "secret")


class SpecError(ValueError):
    """A deployment spec that does not match the API's shape."""


# gpuscale's own key (see the module docstring): one DataCrunch deployment per replica slot.
SLOTS_KEY = "_replica_slots"
_SLOT_RE = re.compile(r"^(?P<base>.+)-r(?P<index>\d{2,})$")


def slot_name(base: str, index: int) -> str:
    """The DataCrunch deployment holding slot ``index`` of the logical deployment ``base``."""
    return f"{base}-r{index:02d}"


def parse_slot_name(name: str) -> tuple[str, int] | None:
    """``(base, index)`` when ``name`` is a slot's deployment name (exactly as :func:`slot_name`
    writes it), else None."""
    match = _SLOT_RE.match(name)
    if match is None:
        return None
    base, index = match["base"], int(match["index"])
    return (base, index) if slot_name(base, index) == name else None


def logical_name(name: str, known: Collection[str]) -> str | None:
    """The deployment of ``known`` that ``name`` is, or is a slot of; None for neither."""
    if name in known:
        return name
    slot = parse_slot_name(name)
    return slot[0] if slot is not None and slot[0] in known else None


def replica_slots(deployment: Mapping[str, Any]) -> int | None:
    """The spec's ``_replica_slots`` (None: one plain deployment)."""
    value = deployment.get(SLOTS_KEY)
    return None if value is None else int(value)


def validate_slots(deployment: Mapping[str, Any]) -> None:
    """Check ``_replica_slots``: an integer >= 1 whose every slot name is a valid deployment name."""
    if SLOTS_KEY not in deployment:
        return
    value = deployment[SLOTS_KEY]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SpecError(f"{SLOTS_KEY}: must be an integer >= 1, got {value!r}")
    last = slot_name(str(deployment["name"]), value - 1)
    if not NAME_RE.match(last):
        raise SpecError(
            f"{SLOTS_KEY}: slot name {last!r} is not a valid deployment name (at most 63 characters)"
        )


def without_private(deployment: Mapping[str, Any]) -> dict[str, Any]:
    """A copy without gpuscale's own top-level keys (what the API may see)."""
    return {
        k: copy.deepcopy(v) for k, v in deployment.items() if not (isinstance(k, str) and k.startswith("_"))
    }


def expand(deployment: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The DataCrunch deployments that realise ``deployment``: itself without private keys, or
    with ``_replica_slots: N`` its N slots, each created at min 0 / max 1 (nothing runs until the
    controller pins one)."""
    body = without_private(deployment)
    slots = replica_slots(deployment)
    if slots is None:
        return [body]
    out = []
    for i in range(slots):
        item = copy.deepcopy(body)
        item["name"] = slot_name(str(body["name"]), i)
        scaling = normalize_scaling(item.get("scaling"))  # the API wants all of it, or none
        scaling["min_replica_count"], scaling["max_replica_count"] = 0, 1
        item["scaling"] = scaling
        out.append(item)
    return out


# The shape of a Deployment: key → nested shape, or a type for a leaf.  ``None`` in a tuple of
# types means the value may be null.
_ENV = {"name": str, "value_or_reference_to_secret": str, "type": str}
_HEALTHCHECK = {"enabled": bool, "port": (int, None), "path": (str, None)}
_ENTRYPOINT = {"enabled": bool, "entrypoint": (list, None), "cmd": (list, None)}
_VOLUME = {
    "type": str,
    "mount_path": str,
    "size_in_mb": (int, None),
    "volume_id": (str, None),
    "secret_name": (str, None),
    "file_names": (list, None),
}
_CONTAINER = {
    "name": (str, None),
    "image": (str, dict),
    "exposed_port": int,
    "healthcheck": (_HEALTHCHECK, None),
    "entrypoint_overrides": (_ENTRYPOINT, None),
    "env": ([_ENV], None),
    "volume_mounts": ([_VOLUME], None),
}
_POLICY = {"delay_seconds": int}
_UTIL = {"enabled": bool, "threshold": (float, int, None)}
SCALING_SHAPE = {
    "min_replica_count": int,
    "max_replica_count": int,
    "scale_down_policy": _POLICY,
    "scale_up_policy": _POLICY,
    "queue_message_ttl_seconds": int,
    "concurrent_requests_per_replica": int,
    "scaling_triggers": {
        "queue_load": ({"threshold": (float, int)}, None),
        "cpu_utilization": (_UTIL, None),
        "gpu_utilization": (_UTIL, None),
    },
}
DEPLOYMENT_SHAPE = {
    "name": str,
    "containers": [_CONTAINER],
    "compute": {"name": str, "size": int, "is_available": (bool, None)},
    "container_registry_settings": ({"is_private": bool, "credentials": ({"name": str}, None)}, None),
    "is_spot": (bool, None),
    "scaling": (SCALING_SHAPE, None),
    "endpoint_base_url": (str, None),
    "created_at": (str, None),
}
_REQUIRED = {
    "": ("name", "containers", "compute"),
    "containers[]": ("image", "exposed_port"),
    "compute": ("name", "size"),
    "env[]": ("name", "value_or_reference_to_secret", "type"),
    "scaling": tuple(SCALING_SHAPE),
}

DEFAULT_SCALING: dict[str, Any] = {
    "min_replica_count": 0,
    "max_replica_count": 1,
    "scale_down_policy": {"delay_seconds": 300},
    "scale_up_policy": {"delay_seconds": 0},
    "queue_message_ttl_seconds": 3600,
    "concurrent_requests_per_replica": 1,
    "scaling_triggers": {
        "queue_load": {"threshold": 1.0},
        "cpu_utilization": {"enabled": False, "threshold": None},
        "gpu_utilization": {"enabled": False, "threshold": None},
    },
}


def _check(value: Any, shape: Any, path: str, *, ignore_private: bool) -> None:
    """Raise SpecError when ``value`` does not fit ``shape`` (unknown keys included)."""
    options = shape if isinstance(shape, tuple) else (shape,)
    if value is None:
        if None in options:
            return
        raise SpecError(f"{path or 'deployment'}: must not be null")
    errors: list[str] = []
    for option in options:
        if option is None:
            continue
        try:
            if isinstance(option, dict):
                if not isinstance(value, dict):
                    raise SpecError(f"{path or 'deployment'}: expected a mapping")
                _check_mapping(value, option, path, ignore_private=ignore_private)
            elif isinstance(option, list):
                if not isinstance(value, list):
                    raise SpecError(f"{path}: expected a list")
                for i, item in enumerate(value):
                    _check(item, option[0], f"{path}[{i}]", ignore_private=ignore_private)
            elif option is float:
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise SpecError(f"{path}: expected a number")
            elif option is int:
                if isinstance(value, bool) or not isinstance(value, int):
                    raise SpecError(f"{path}: expected an integer")
            elif not isinstance(value, option):
                raise SpecError(f"{path}: expected {option.__name__}, got {type(value).__name__}")
            return
        except SpecError as exc:
            errors.append(str(exc))
    raise SpecError(errors[0] if len(errors) == 1 else " / ".join(errors))


def _check_mapping(value: dict[str, Any], shape: dict[str, Any], path: str, *, ignore_private: bool) -> None:
    for key, item in value.items():
        if ignore_private and isinstance(key, str) and key.startswith("_"):
            continue
        if key not in shape:
            where = f"{path}.{key}" if path else key
            raise SpecError(f"{where}: unknown field (allowed: {', '.join(shape)})")
        _check(item, shape[key], f"{path}.{key}" if path else key, ignore_private=ignore_private)
    generic = re.sub(r"\[\d+\]", "[]", path).split(".")[-1] if path else ""
    for key in _REQUIRED.get(generic, ()):
        if key not in value:
            raise SpecError(f"{path + '.' if path else ''}{key}: required")


def validate(deployment: Any, *, ignore_private: bool = True) -> None:
    """Check a Deployment body against the API's shape; raises SpecError with the bad key's path."""
    _check(deployment, DEPLOYMENT_SHAPE, "", ignore_private=ignore_private)
    name = deployment["name"]
    if not NAME_RE.match(name):
        raise SpecError(f"name: {name!r} is not a valid deployment name (lowercase letters, digits, '-')")
    if not deployment["containers"]:
        raise SpecError("containers: at least one container is required")
    for i, container in enumerate(deployment["containers"]):
        for j, env in enumerate(container.get("env") or []):
            if env["type"] not in ("plain", "secret"):
                raise SpecError(f"containers[{i}].env[{j}].type: must be 'plain' or 'secret'")
        port = container["exposed_port"]
        if not 1 <= port <= 65535:
            raise SpecError(f"containers[{i}].exposed_port: {port} is not a port")
        for j, mount in enumerate(container.get("volume_mounts") or []):
            where = f"containers[{i}].volume_mounts[{j}]"
            if mount["type"] not in VOLUME_TYPES:
                raise SpecError(f"{where}.type: must be one of {', '.join(VOLUME_TYPES)}")
            if mount["type"] == "shared" and not mount.get("volume_id"):
                # The API refuses it too ("volume_mounts.*.volume_id should not be null").
                raise SpecError(f"{where}.volume_id: a shared mount needs the volume's id")
    if deployment.get("scaling") is not None:
        validate_scaling(deployment["scaling"], path="scaling")


def validate_scaling(scaling: Any, *, path: str = "scaling") -> None:
    _check(scaling, SCALING_SHAPE, path, ignore_private=True)
    lo, hi = scaling["min_replica_count"], scaling["max_replica_count"]
    if lo < 0 or hi < 0 or lo > hi:
        raise SpecError(f"{path}: need 0 <= min_replica_count <= max_replica_count, got {lo}/{hi}")


def _normalize_container(container: Mapping[str, Any]) -> dict[str, Any]:
    hc = container.get("healthcheck") or {"enabled": False}
    ep = container.get("entrypoint_overrides") or {"enabled": False}
    return {
        "image": container["image"],
        "exposed_port": container["exposed_port"],
        "healthcheck": {
            "enabled": bool(hc.get("enabled", True)),
            "port": hc.get("port"),
            "path": hc.get("path"),
        },
        "entrypoint_overrides": {
            "enabled": bool(ep.get("enabled", True)),
            "entrypoint": ep.get("entrypoint"),
            "cmd": ep.get("cmd"),
        },
        "env": [
            {
                "name": e["name"],
                "value_or_reference_to_secret": e["value_or_reference_to_secret"],
                "type": e["type"],
            }
            for e in container.get("env") or []
        ],
        "volume_mounts": [
            {k: v for k, v in m.items() if v is not None} for m in container.get("volume_mounts") or []
        ],
    }


def normalize_scaling(scaling: Mapping[str, Any] | None) -> dict[str, Any]:
    merged = copy.deepcopy(DEFAULT_SCALING)
    for key, value in (scaling or {}).items():
        if key == "scaling_triggers" and isinstance(value, dict):
            merged["scaling_triggers"].update({k: v for k, v in value.items() if v is not None})
        elif value is not None and not key.startswith("_"):
            merged[key] = copy.deepcopy(value)
    triggers = merged["scaling_triggers"]
    if triggers.get("queue_load") is not None:
        triggers["queue_load"] = {"threshold": float(triggers["queue_load"]["threshold"])}
    return merged


def normalize(deployment: Mapping[str, Any]) -> dict[str, Any]:
    """The comparable form: defaults filled, read-only and client-side fields dropped."""
    registry = deployment.get("container_registry_settings") or {"is_private": False}
    return {
        "name": deployment["name"],
        "containers": [_normalize_container(c) for c in deployment["containers"]],
        "compute": {"name": deployment["compute"]["name"], "size": deployment["compute"]["size"]},
        "container_registry_settings": {
            "is_private": bool(registry.get("is_private", False)),
            "credentials": registry.get("credentials"),
        },
        "is_spot": bool(deployment.get("is_spot") or False),
        "scaling": normalize_scaling(deployment.get("scaling")),
    }


def load_all(path: Path) -> list[dict[str, Any]]:
    """Every deployment of a spec file (one mapping, a list, or several YAML documents), in the
    file's order, each checked against the API's shape (SpecError names the file and item), in
    normal form plus its ``_replica_slots`` when the file sets it (:func:`expand` turns it into
    the deployments to create)."""
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except OSError as exc:
        raise SpecError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {exc}") from None
    items: list[Any] = []
    for doc in docs:
        items.extend(doc if isinstance(doc, list) else [doc])
    if not items:
        raise SpecError(f"{path}: no deployment in the file")
    out = []
    for i, data in enumerate(items):
        where = f"{path}" if len(items) == 1 else f"{path}: deployment #{i + 1}"
        try:
            # gpuscale's own keys are known ones only: a typo there fails like any other.
            private = {k: v for k, v in data.items() if k == SLOTS_KEY} if isinstance(data, dict) else {}
            validate(
                {k: v for k, v in data.items() if k not in private} if private else data, ignore_private=False
            )
            validate_slots(data)
        except SpecError as exc:
            raise SpecError(f"{where}: {exc}") from None
        out.append({**normalize(data), **private})
    names = [d["name"] for d in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise SpecError(f"{path}: deployment {', '.join(twice)} is defined twice")
    return out


def load_file(path: Path) -> dict[str, Any]:
    """The first (preferred) deployment of a spec file; :func:`load_all` reads them all."""
    return load_all(path)[0]


def placeholders(deployment: Mapping[str, Any]) -> list[str]:
    """Paths of shared mounts whose volume id is still :data:`VOLUME_PLACEHOLDER`."""
    return [
        f"containers[{i}].volume_mounts[{j}].volume_id"
        for i, container in enumerate(deployment.get("containers") or [])
        for j, mount in enumerate(container.get("volume_mounts") or [])
        if mount.get("type") == "shared" and mount.get("volume_id") == VOLUME_PLACEHOLDER
    ]


def fill_volume_id(deployment: Mapping[str, Any], volume_id: str) -> dict[str, Any]:
    """A copy with every placeholder volume id replaced by ``volume_id``."""
    out = copy.deepcopy(dict(deployment))
    for container in out.get("containers") or []:
        for mount in container.get("volume_mounts") or []:
            if mount.get("type") == "shared" and mount.get("volume_id") == VOLUME_PLACEHOLDER:
                mount["volume_id"] = volume_id
    return out


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else key))
        return out or {prefix: {}}
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        out = {}
        for i, item in enumerate(value):
            out.update(_flatten(item, f"{prefix}[{i}]"))
        return out
    return {prefix: value}


def diff(current: Mapping[str, Any] | None, desired: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(path, current value, desired value)`` for every leaf that differs, replica counts excluded.

    ``current`` None (no such deployment) lists every desired leaf against None."""
    want = _flatten(_without_counts(normalize(desired)))
    have = _flatten(_without_counts(normalize(current))) if current is not None else {}
    missing = object()
    changes = []
    for key in sorted(set(want) | set(have)):
        a, b = have.get(key, missing), want.get(key, missing)
        if a != b:
            changes.append((key, None if a is missing else a, None if b is missing else b))
    return changes


def _without_counts(deployment: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(deployment)
    for key in REPLICA_COUNTS:
        out["scaling"].pop(key, None)
    return out


def update_body(current: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any]:
    """The PATCH body for an existing deployment: the desired spec with the live replica counts,
    so applying a spec never fights the controller's pin."""
    body = normalize(desired)
    live = normalize_scaling(current.get("scaling"))
    for key in REPLICA_COUNTS:
        body["scaling"][key] = live[key]
    # Keep the system-managed container names, as the SDK does when it updates what it read.
    for container, existing in zip(body["containers"], current.get("containers") or [], strict=False):
        if isinstance(existing, dict) and existing.get("name"):
            container["name"] = existing["name"]
    return body


# The serving settings a pool's deployment must carry, from its rules in the pools file: the
# worker holds ``tasks_per_replica`` tasks, Ollama serves ``parallel`` of them at once.
SERVING_ENV = ("GPUSCALE_WORKER_CONCURRENCY", "OLLAMA_NUM_PARALLEL")


def serving_env(tasks_per_replica: int, parallel: int) -> dict[str, str]:
    return {"GPUSCALE_WORKER_CONCURRENCY": str(tasks_per_replica), "OLLAMA_NUM_PARALLEL": str(parallel)}


def with_serving_env(deployment: Mapping[str, Any], tasks_per_replica: int, parallel: int) -> dict[str, Any]:
    """A copy of ``deployment`` whose first container's env sets :func:`serving_env`."""
    out = copy.deepcopy(dict(deployment))
    container = out["containers"][0]
    wanted = serving_env(tasks_per_replica, parallel)
    env = [e for e in container.get("env") or [] if e.get("name") not in wanted]
    env += [{"name": k, "value_or_reference_to_secret": v, "type": "plain"} for k, v in wanted.items()]
    container["env"] = env
    return out


def serving_mismatches(deployment: Mapping[str, Any], tasks_per_replica: int, parallel: int) -> list[str]:
    """Where the deployment's env disagrees with the pool's serving rules (empty: it agrees)."""
    env = {
        e.get("name"): e.get("value_or_reference_to_secret")
        for e in (deployment["containers"][0].get("env") or [])
    }
    return [
        f"{k} is {env.get(k)!r}, the pools file says {v!r}"
        for k, v in serving_env(tasks_per_replica, parallel).items()
        if env.get(k) != v
    ]
