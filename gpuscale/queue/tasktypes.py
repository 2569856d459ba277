"""The task type registry: name → pool, payload model, default attempts and time limit.

Enqueueing checks a task against this registry before anything is written: an unknown type or a
payload that does not validate is refused with a clear error.  The seeds' deck types are built in.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, model_validator


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
    max_attempts: int = 3
    timeout_s: float = 900.0


VISUAL_POOL = "visual"
TEXT_POOL = "text"

TEXT_TYPES = (
    "company_offering_extraction",
    "startup_name_extraction",
    "healthcare_classification",
    "funding_amount_extraction",
    "deck_date_extraction",
    "template_analysis",
    "specialized_clinical",
    "specialized_regulatory",
    "specialized_science",
)

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


register(TaskType("visual_analysis", VISUAL_POOL, VisualAnalysisPayload, max_attempts=3, timeout_s=1200))
register(TaskType("slide_feedback", VISUAL_POOL, DocumentPayload, max_attempts=3, timeout_s=900))
for _name in TEXT_TYPES:
    register(TaskType(_name, TEXT_POOL, DocumentPayload, max_attempts=3, timeout_s=600))
register(TaskType("noop", "bench", NoopPayload, max_attempts=3, timeout_s=3600))
