"""GPU prices from the provider's API (``GET /container-types``), for cost accounting.

DataCrunch (Verda) lists, per container type, the on-demand (``serverless_price``) and spot
(``serverless_spot_price``) price per hour, as strings.  A deployment's price is the price of its
compute type (``compute.name``, e.g. ``H100``, matched against the type's ``model``), times its
size in GPUs, spot or on demand after its ``is_spot``.  Pure functions; the API calls live in the
DataCrunch client.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ContainerPrice:
    """One container type of ``GET /container-types`` (prices per hour, in ``currency``)."""

    model: str  # e.g. "H100": what a deployment's compute.name says
    name: str  # e.g. "H100 SXM5 80GB"
    on_demand: float
    spot: float
    gpus: int = 1  # GPUs the price is for
    gpu_memory_gb: float | None = None
    currency: str = "usd"


def _num(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if out >= 0 and out == out and out != float("inf") else None


def parse_container_types(data: Any) -> list[ContainerPrice]:
    """The API's list → prices; items without a model or a readable price are skipped."""
    out: list[ContainerPrice] = []
    for item in data if isinstance(data, list) else []:
        if not isinstance(item, Mapping):
            continue
        model, od, spot = (
            item.get("model"),
            _num(item.get("serverless_price")),
            _num(item.get("serverless_spot_price")),
        )
        if not isinstance(model, str) or not model or od is None or spot is None:
            continue
        gpu = item.get("gpu") if isinstance(item.get("gpu"), Mapping) else {}
        mem = item.get("gpu_memory") if isinstance(item.get("gpu_memory"), Mapping) else {}
        gpus = gpu.get("number_of_gpus") if isinstance(gpu, Mapping) else None
        out.append(
            ContainerPrice(
                model=model,
                name=str(item.get("name") or model),
                on_demand=od,
                spot=spot,
                gpus=gpus if isinstance(gpus, int) and gpus > 0 else 1,
                gpu_memory_gb=_num(mem.get("size_in_gigabytes")) if isinstance(mem, Mapping) else None,
                currency=str(item.get("currency") or "usd"),
            )
        )
    return out


def price_for(types: Iterable[ContainerPrice], compute: str, size: int, spot: bool) -> float | None:
    """Price per hour of a deployment on ``size`` × ``compute`` (spot or on demand); None when the
    API lists no such type."""
    matches = [t for t in types if t.model.lower() == compute.lower()]
    if not matches:
        return None
    exact = [t for t in matches if t.gpus == size]
    best = exact[0] if exact else min(matches, key=lambda t: t.gpus)
    per = (best.spot if spot else best.on_demand) / best.gpus
    return per * size


def deployment_price(types: Iterable[ContainerPrice], deployment: Mapping[str, Any]) -> float | None:
    """Price per hour of a Deployment as the API returns it (compute name and size, is_spot)."""
    compute = deployment.get("compute")
    if not isinstance(compute, Mapping) or not isinstance(compute.get("name"), str):
        return None
    size = compute.get("size") if isinstance(compute.get("size"), int) else 1
    return price_for(types, compute["name"], int(size or 1), bool(deployment.get("is_spot")))
