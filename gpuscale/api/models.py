"""Request and response bodies of the HTTP API.

The request bodies of the per-task endpoints *are* the task types' own payload models
(:mod:`gpuscale.queue.tasktypes`), extended with the options every task takes (priority,
document id, dependencies): the same validation as ``gpuscale enqueue``, and the OpenAPI document
shows exactly what a worker will accept.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from gpuscale.queue import Priority, TaskStatus
from gpuscale.queue.tasktypes import DocumentPayload, VisualAnalysisPayload

MAX_ID = 2**63 - 1  # PostgreSQL bigint
TaskId = Annotated[int, Field(ge=1, le=MAX_ID)]
# Free text that ends up in PostgreSQL: no NUL (text columns cannot hold it), bounded.
DocumentId = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f]+$")]


class TaskOptions(BaseModel):
    """Options every task takes, next to its payload."""

    priority: Priority = Priority.normal
    document_id: DocumentId | None = Field(
        default=None, description="The deck (document) this task belongs to, for GET /api/tasks?document=."
    )
    depends_on: list[TaskId] = Field(
        default_factory=list,
        max_length=256,
        description="Ids of tasks this one waits for (text tasks read their visual analyses' results).",
    )


OPTION_FIELDS = frozenset(TaskOptions.model_fields)


class VisualAnalysisRequest(VisualAnalysisPayload, TaskOptions):
    """``visual_analysis``: describe pages ``first_page..last_page`` of ``document``."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"title": "VisualAnalysisRequest"})


class DocumentRequest(DocumentPayload, TaskOptions):
    """A task on a whole document (slide feedback, extractions, template analysis)."""

    model_config = ConfigDict(extra="forbid")


class SpecializedKind(StrEnum):
    clinical = "clinical"
    regulatory = "regulatory"
    science = "science"


class SpecializedRequest(DocumentPayload, TaskOptions):
    """``specialized_<kind>``: the specialised analysis of a deck after its template analysis."""

    model_config = ConfigDict(extra="forbid")
    kind: SpecializedKind


class ExtractionType(StrEnum):
    """``POST /api/extraction/{type}``: the text extractions of the PRD."""

    company_offering = "company_offering"
    startup_name = "startup_name"
    healthcare_classification = "healthcare_classification"
    funding_amount = "funding_amount"
    deck_date = "deck_date"

    @property
    def task_type(self) -> str:
        return self.value if self is ExtractionType.healthcare_classification else f"{self.value}_extraction"


class TaskAccepted(BaseModel):
    """202: the task is queued; follow ``location``."""

    id: int
    task_type: str
    status: TaskStatus
    location: str


class _TaskFields(BaseModel):
    """The fields every view of a task starts with (each view adds its own after them, in order)."""

    id: int
    task_type: str
    pool: str
    document_id: str | None
    priority: Priority
    status: TaskStatus
    progress: float
    progress_message: str | None
    attempts: int
    max_attempts: int


class TaskView(_TaskFields):
    """A task as the API shows it."""

    depends_on: list[int]
    error: str | None
    payload: dict[str, Any] | None = None
    result: Any = None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class TaskSummary(_TaskFields):
    error: str | None
    created_at: datetime
    finished_at: datetime | None


class TaskPage(BaseModel):
    """One page of ``GET /api/tasks``; ``next`` is the URL of the following page, if any."""

    items: list[TaskSummary]
    next: str | None


class DeckByUrl(BaseModel):
    """``POST /api/decks`` with JSON: a deck the workers download themselves."""

    model_config = ConfigDict(extra="forbid")
    document: str = Field(
        min_length=8,
        max_length=4096,
        pattern=r"^https?://[^\x00-\x20]+$",
        description="An http(s) URL of the PDF.",
    )


class DeckAccepted(BaseModel):
    """202: the same JSON that ``gpuscale submit-deck --json`` prints."""

    document_id: str
    document: str
    pages: int
    task_ids: dict[str, list[int]]


class DeckTask(BaseModel):
    id: int
    task_type: str
    status: TaskStatus
    progress: float
    progress_message: str | None
    attempts: int
    error: str | None


DeckStatus = Literal["queued", "running", "done", "failed", "cancelled"]


class DeckView(BaseModel):
    """A deck's progress; ``results`` (by task type) once every task is done."""

    document_id: str
    status: DeckStatus
    progress: float = Field(description="0-100, the mean of its tasks' progress (finished tasks count 100)")
    tasks: list[DeckTask]
    results: dict[str, Any] | None


class DeckCancelled(BaseModel):
    cancelled: int
    deck: DeckView


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    database: bool
    migrations_pending: list[str]


class Problem(BaseModel):
    """Every 4xx/5xx answer: what was wrong, in one line."""

    detail: Any
