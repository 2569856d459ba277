"""The task type catalogue: every task type declared once, with everything known about it.

A :class:`TaskType` names its pool, payload model, result model (and, for text tasks, the answer
model the LLM fills in), the worker handler that runs it, its default attempts and time limit, and
its place in the deck graph (the types it waits for).  Everything else derives from here: routing
(:func:`types_for_pool`), the worker's handler table (:mod:`gpuscale.worker.handlers`, checked
against this catalogue at import), result validation (:func:`validate_result`), the deck graph that
``submit_deck`` enqueues and the simulator's traces generate (:func:`deck_order`).

Enqueueing checks a task against this catalogue before anything is written: an unknown type or a
payload that does not validate is refused with a clear error.  The seeds' deck types are built in.
"""

from __future__ import annotations

import graphlib
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gpuscale.queue import results as r


class UnknownTaskType(ValueError):
    pass


class DocumentPayload(BaseModel):
    """Every deck task names its document: a path on a shared mount or an http(s) URL."""

    model_config = ConfigDict(extra="forbid")
    document: str = Field(min_length=1, max_length=4096)


class VisualAnalysisPayload(DocumentPayload):
    """One page batch of a deck; pages are 1-based and inclusive."""

    first_page: int = Field(ge=1)
    last_page: int = Field(ge=1)
    dpi: int | None = Field(default=None, ge=36, le=600)

    @model_validator(mode="after")
    def _ordered(self) -> VisualAnalysisPayload:
        if self.last_page < self.first_page:
            raise ValueError("last_page must be >= first_page")
        return self


class NoopPayload(BaseModel):
    """For benchmarks and tests: optionally sleeps, optionally fails."""

    model_config = ConfigDict(extra="forbid")
    sleep_s: float = Field(default=0.0, ge=0, le=3600)
    fail: bool = False


@dataclass(frozen=True)
class TaskType:
    name: str
    pool: str
    payload_model: type[BaseModel]
    result_model: type[BaseModel]
    handler: str  # which worker handler runs it (gpuscale.worker.handlers maps each to a function)
    max_attempts: int = 3
    timeout_s: float = 900.0
    answer_model: type[BaseModel] | None = None  # what the LLM is asked to fill in (text tasks)
    # The deck graph: the task types of the same deck this one waits for (all their tasks).
    # ``None``: not part of a deck (``noop``).
    after: tuple[str, ...] | None = ()
    per_page_batch: bool = False  # one task per page batch of the deck, not one per deck

    @property
    def in_deck(self) -> bool:
        return self.after is not None


VISUAL_POOL = "visual"
TEXT_POOL = "text"

_REGISTRY: dict[str, TaskType] = {}


def register(task_type: TaskType) -> TaskType:
    _REGISTRY[task_type.name] = task_type
    return task_type


def get(name: str) -> TaskType:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise UnknownTaskType(f"unknown task type {name!r}; known types: {known}") from None


def all_types() -> dict[str, TaskType]:
    return dict(_REGISTRY)


def types_for_pool(pool: str) -> list[str]:
    return sorted(t.name for t in _REGISTRY.values() if t.pool == pool)


def validate_result(task_type: str, result: dict[str, Any]) -> BaseModel:
    """Validate a stored result against its task type's model (:class:`UnknownTaskType` if unknown)."""
    return get(task_type).result_model.model_validate(result)


def deck_order() -> list[TaskType]:
    """The deck's task types, each after the types it waits for (ties in declaration order)."""
    deck = {name: t for name, t in _REGISTRY.items() if t.after is not None}
    graph = graphlib.TopologicalSorter({name: t.after or () for name, t in deck.items()})
    rank = {name: i for i, name in enumerate(deck)}
    graph.prepare()  # raises graphlib.CycleError on a circular declaration
    order: list[TaskType] = []
    while graph.is_active():
        ready = sorted(graph.get_ready(), key=lambda name: rank.get(name, len(rank)))
        for name in ready:
            if name not in deck:
                raise UnknownTaskType(f"a deck task type waits for {name!r}, which is not a deck task type")
            order.append(deck[name])
            graph.done(name)
    return order


# ----------------------------------------------------------------------------- the catalogue

register(
    TaskType(
        "visual_analysis",
        VISUAL_POOL,
        VisualAnalysisPayload,
        r.VisualAnalysisResult,
        "visual_analysis",
        timeout_s=1200,
        per_page_batch=True,
    )
)
register(
    TaskType(
        "slide_feedback",
        VISUAL_POOL,
        DocumentPayload,
        r.SlideFeedbackResult,
        "slide_feedback",
        timeout_s=900,
        after=("visual_analysis",),
    )
)


def _text(name: str, answer: type[r.Answer], result: type[BaseModel], handler: str, after: str) -> None:
    """A text task: reads the deck's text, asks the LLM for ``answer``, stores ``result``."""
    register(TaskType(name, TEXT_POOL, DocumentPayload, result, handler, 3, 600, answer, (after,)))


_VISUAL, _HEALTHCARE, _TEMPLATE = "visual_analysis", "healthcare_classification", "template_analysis"
_text("company_offering_extraction", r.CompanyOffering, r.CompanyOfferingResult, "extraction", _VISUAL)
_text("startup_name_extraction", r.StartupName, r.StartupNameResult, "extraction", _VISUAL)
_text(_HEALTHCARE, r.HealthcareClassification, r.HealthcareClassificationResult, "extraction", _VISUAL)
_text("funding_amount_extraction", r.FundingAmount, r.FundingAmountResult, "extraction", _VISUAL)
_text("deck_date_extraction", r.DeckDate, r.DeckDateResult, "extraction", _VISUAL)
_text(_TEMPLATE, r.TemplateAnalysis, r.TemplateAnalysisResult, "template_analysis", _HEALTHCARE)
_text("specialized_clinical", r.ClinicalAnalysis, r.ClinicalAnalysisResult, "specialized", _TEMPLATE)
_text("specialized_regulatory", r.RegulatoryAnalysis, r.RegulatoryAnalysisResult, "specialized", _TEMPLATE)
_text("specialized_science", r.ScienceAnalysis, r.ScienceAnalysisResult, "specialized", _TEMPLATE)
register(TaskType("noop", "bench", NoopPayload, r.NoopResult, "noop", timeout_s=3600, after=None))
