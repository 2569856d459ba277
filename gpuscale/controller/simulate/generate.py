"""Realistic traces from the seeds' numbers.

* Decks of about 30 pages (normal, sd 8, 6–60 pages), split into visual_analysis batches of at
  most 8 pages (as even as possible, as the product splits them) at ~25 s per page (each page
  lognormal around 25 s, 10–15 minutes for a 30-page deck on one GPU, as the seeds measured);
  ``slide_feedback`` after all batches (40–90 s).
* Text tasks 20–60 s each, the deck graph of DESIGN.md: five extractions after all batches,
  ``template_analysis`` after ``healthcare_classification``, three specialized analyses after
  ``template_analysis``.
* Arrivals on working days (Mon–Fri) between 09:00 and 18:00, in bursts: upload sessions start
  at random (busier late morning and mid afternoon) and bring 1–4 decks a few minutes apart.
* Priorities per deck: 90 % normal, 9 % high, 1 % critical.

``kind``: ``busy-day`` (one working day, 30 decks), ``quiet-week`` (seven days, ~3 decks per
working day), ``month`` (30 days, ~15 decks per working day).

``platform-month`` is the load the platform sees (issue 12), with batch uploads:

* about 12 decks per working day, 15 % of that on Saturdays and Sundays;
* uploads mostly 08:00–19:00, fewer at lunch (12:00–13:30), a few at night (~5 %);
* 8 % of uploads are a **batch of 3–8 decks at once** (a fund uploading a demo day: the decks
  arrive seconds apart); the rest are single decks;
* per deck 2 % critical, 10 % high priority;
* pages ~N(28, 8), at least 5 (at most 80), 20–30 s of GPU per page, in the product's page
  batches (at most 10 pages, as even as possible: :func:`gpuscale.queue.deck.page_batches`);
* text tasks 20–180 s: extractions 20–60 s, ``template_analysis`` 30–90 s, the specialized
  analyses 60–180 s; ``slide_feedback`` 40–90 s.

Deterministic for a given seed.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, replace

from gpuscale.controller.simulate.trace import TraceTask
from gpuscale.queue import tasktypes
from gpuscale.queue.deck import DEFAULT_BATCH_PAGES, page_batches

DAY_S = 86400.0
KINDS = ("busy-day", "quiet-week", "month", "platform-month")


@dataclass(frozen=True)
class TraceSpec:
    days: int
    decks_per_working_day: float
    pages_mean: float = 30.0
    pages_sd: float = 8.0
    batch_pages: int = 8
    seconds_per_page: float = 25.0
    burst_mean: float = 1.6  # decks per upload session (geometric, 1–4)
    exact_decks: int | None = None  # busy-day: exactly this many decks
    platform: bool = False  # the platform's load shape (see the module doc)
    weekend_share: float = 0.15  # platform: weekend days bring this share of a working day
    batch_share: float = 0.08  # platform: share of uploads that are a batch of 3–8 decks


def spec_for(
    kind: str,
    *,
    decks_per_day: float | None = None,
    days: int | None = None,
    batch_share: float | None = None,
) -> TraceSpec:
    specs = {
        "busy-day": TraceSpec(days=1, decks_per_working_day=30.0, exact_decks=30),
        "quiet-week": TraceSpec(days=7, decks_per_working_day=3.0),
        "month": TraceSpec(days=30, decks_per_working_day=15.0),
        "platform-month": TraceSpec(
            days=30,
            decks_per_working_day=12.0,
            pages_mean=28.0,
            platform=True,
            batch_pages=DEFAULT_BATCH_PAGES,
        ),
    }
    if kind not in specs:
        raise ValueError(f"unknown trace kind {kind!r}; expected one of {', '.join(KINDS)}")
    spec = specs[kind]
    if decks_per_day is not None:
        exact = round(decks_per_day) if spec.exact_decks is not None else None
        spec = replace(spec, decks_per_working_day=decks_per_day, exact_decks=exact)
    if days is not None:
        spec = replace(spec, days=days)
    if batch_share is not None:
        if not spec.platform:
            raise ValueError("batch_share applies to the platform-month kind only")
        spec = replace(spec, batch_share=batch_share)
    return spec


def _session_start(rng: random.Random) -> float:
    """Seconds after midnight: 09:00–18:00, busier 10–12 and 14–17."""
    while True:
        h = rng.uniform(9.0, 18.0)
        weight = 1.0 if (10 <= h < 12 or 14 <= h < 17) else 0.45
        if rng.random() < weight:
            return h * 3600.0


def _session_size(rng: random.Random, mean: float) -> int:
    p = 1.0 / mean
    n = 1
    while n < 4 and rng.random() > p:
        n += 1
    return n


def _arrivals(rng: random.Random, spec: TraceSpec) -> list[float]:
    times: list[float] = []
    for day in range(spec.days):
        # Day 0 is a Monday; Saturday and Sunday bring nothing.
        if spec.exact_decks is None and day % 7 in (5, 6):
            continue
        target = spec.exact_decks
        if target is None:
            # Poisson number of decks around the daily mean (Knuth; the means here are small).
            limit, k, prod = math.exp(-spec.decks_per_working_day), 0, rng.random()
            while prod > limit:
                k += 1
                prod *= rng.random()
            target = k
        day_times: list[float] = []
        while len(day_times) < target:
            t = _session_start(rng)
            for _ in range(min(_session_size(rng, spec.burst_mean), target - len(day_times))):
                day_times.append(day * DAY_S + t)
                t += rng.expovariate(1 / 180.0)  # a few minutes between uploads of one session
        times.extend(day_times)
    return sorted(times)


def _poisson(rng: random.Random, mean: float) -> int:
    """Knuth's method (the means here are small)."""
    limit, k, prod = math.exp(-mean), 0, rng.random()
    while prod > limit:
        k += 1
        prod *= rng.random()
    return k


def _upload_time(rng: random.Random) -> float:
    """Seconds after midnight of one platform upload: working hours, a lunch dip, a few at night."""
    if rng.random() < 0.05:
        h = rng.uniform(19.0, 32.0) % 24.0  # evening and night, 19:00–08:00
        return h * 3600.0
    while True:
        h = rng.uniform(8.0, 19.0)
        weight = 0.4 if 12.0 <= h < 13.5 else 1.0
        if rng.random() < weight:
            return h * 3600.0


# Expected decks per upload: singles, plus batches of 3–8 (mean 5.5).
def _decks_per_upload(spec: TraceSpec) -> float:
    return (1.0 - spec.batch_share) + spec.batch_share * 5.5


def _platform_arrivals(rng: random.Random, spec: TraceSpec) -> list[float]:
    """Arrival times of decks: per day a Poisson number of uploads, each one deck or a batch."""
    times: list[float] = []
    per_upload = _decks_per_upload(spec)
    for day in range(spec.days):
        mean = spec.decks_per_working_day / per_upload
        if day % 7 in (5, 6):  # day 0 is a Monday
            mean *= spec.weekend_share
        for _ in range(_poisson(rng, mean)):
            t = day * DAY_S + _upload_time(rng)
            n = rng.randint(3, 8) if rng.random() < spec.batch_share else 1
            for _ in range(n):
                times.append(t)
                t += rng.uniform(2.0, 20.0)  # a batch: one file after another, seconds apart
    return sorted(times)


def platform_deck_tasks(rng: random.Random, deck: int, arrival: float, spec: TraceSpec) -> list[TraceTask]:
    """One deck's graph with the platform's numbers (see the module doc)."""
    pages = int(min(80, max(5, round(rng.gauss(spec.pages_mean, spec.pages_sd)))))
    prio = _priority(rng, 0.02, 0.12)

    def seconds(tt: tasktypes.TaskType) -> tuple[float, float]:
        if tt.name == "slide_feedback":
            return 40, 90
        if tt.name == "template_analysis":
            return 30, 90
        return (60, 180) if tt.handler == "specialized" else (20, 60)

    return _deck_graph(
        rng, deck, arrival, prio, pages, spec.batch_pages, lambda: rng.uniform(20.0, 30.0), seconds
    )


def _priority(rng: random.Random, critical: float = 0.01, high_or_critical: float = 0.10) -> str:
    """A deck's priority: critical with probability ``critical``, else high up to ``high_or_critical``."""
    x = rng.random()
    return "critical" if x < critical else "high" if x < high_or_critical else "normal"


def deck_tasks(rng: random.Random, deck: int, arrival: float, spec: TraceSpec) -> list[TraceTask]:
    """The whole task graph of one deck, dependencies before dependents."""
    pages = int(min(60, max(6, round(rng.gauss(spec.pages_mean, spec.pages_sd)))))
    prio = _priority(rng)
    sigma = 0.2
    mu = math.log(spec.seconds_per_page) - sigma**2 / 2
    return _deck_graph(
        rng,
        deck,
        arrival,
        prio,
        pages,
        spec.batch_pages,
        lambda: rng.lognormvariate(mu, sigma),
        lambda tt: (40, 90) if tt.name == "slide_feedback" else (20, 60),
    )


def _deck_graph(
    rng: random.Random,
    deck: int,
    arrival: float,
    prio: str,
    pages: int,
    batch_pages: int,
    page_s: Callable[[], float],
    seconds: Callable[[tasktypes.TaskType], tuple[float, float]],
) -> list[TraceTask]:
    """One deck's tasks in the catalogue's deck graph (:func:`gpuscale.queue.tasktypes.deck_order`):
    a page-batch type gets ``page_s()`` per page of each batch, any other type a uniform draw
    from ``seconds(type)``; dependencies before dependents."""
    prefix = f"d{deck:05d}"
    out: list[TraceTask] = []
    ids: dict[str, tuple[str, ...]] = {}  # task type → its tasks' ids in this deck
    for tt in tasktypes.deck_order():
        deps = tuple(tid for name in tt.after or () for tid in ids[name])
        if tt.per_page_batch:
            batches = []
            # Split as the product splits a submitted deck (queue/deck.py).
            for b, (first, last) in enumerate(page_batches(pages, batch_pages)):
                service = sum(page_s() for _ in range(last - first + 1))
                batches.append(
                    TraceTask(arrival, f"{prefix}-va{b + 1}", tt.name, round(service, 1), prio, deps)
                )
            out += batches
            ids[tt.name] = tuple(t.task_id for t in batches)
            continue
        low, high = seconds(tt)
        tid = f"{prefix}-sf" if tt.name == "slide_feedback" else f"{prefix}-{tt.name}"
        out.append(TraceTask(arrival, tid, tt.name, round(rng.uniform(low, high), 1), prio, deps))
        ids[tt.name] = (tid,)
    return out


def generate(
    kind: str,
    *,
    seed: int = 1,
    decks_per_day: float | None = None,
    days: int | None = None,
    batch_share: float | None = None,
) -> list[TraceTask]:
    """A trace of ``kind`` (see :data:`KINDS`); the same seed gives the same trace."""
    spec = spec_for(kind, decks_per_day=decks_per_day, days=days, batch_share=batch_share)
    rng = random.Random(seed)
    tasks: list[TraceTask] = []
    if spec.platform:
        for deck, arrival in enumerate(_platform_arrivals(rng, spec)):
            tasks.extend(platform_deck_tasks(rng, deck, round(arrival, 1), spec))
        return tasks
    for deck, arrival in enumerate(_arrivals(rng, spec)):
        tasks.extend(deck_tasks(rng, deck, round(arrival, 1), spec))
    return tasks
