"""What a task handler gets (:class:`TaskContext`) and helpers shared by the handlers.

A handler is ``async def handler(ctx: TaskContext) -> dict``: it reads ``ctx.payload``, calls
Ollama through ``ctx.ollama``, reports progress with ``await ctx.progress(percent, message)`` and
returns the JSON-able result.  It fails its task by raising :class:`~gpuscale.worker.errors.TaskError`
(anything else it raises also fails just that task, as retryable).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from gpuscale.queue.results import PageAnalysis, VisualAnalysisResult
from gpuscale.worker.errors import MissingInput, TaskError
from gpuscale.worker.ollama_client import OllamaClient
from gpuscale.worker.settings import WorkerSettings

ProgressFn = Callable[[float, str], Awaitable[None]]
DepsFn = Callable[[], Awaitable[list[dict[str, Any]]]]
P = TypeVar("P", bound=BaseModel)


async def _no_progress(percent: float, message: str) -> None:
    return None


async def _no_deps() -> list[dict[str, Any]]:
    return []


@dataclass
class TaskContext:
    """Everything one task run needs; built by the runtime (or a test)."""

    task_id: Any
    task_type: str
    payload: dict[str, Any]
    settings: WorkerSettings
    server_id: str = "test"
    model: str | None = None
    ollama: OllamaClient | None = None
    progress: ProgressFn = _no_progress
    # Results of the task's dependencies *and theirs* (the deck's visual batches sit two or three
    # levels up from the specialised analyses): [{id, task_type, payload, result}, ...].
    dependency_results: DepsFn = _no_deps
    extra: dict[str, Any] = field(default_factory=dict)

    def require_ollama(self) -> tuple[OllamaClient, str]:
        if self.ollama is None or not self.model:
            raise TaskError(
                f"{self.task_type} needs Ollama and a model; this worker has none", retryable=False
            )
        return self.ollama, self.model


Handler = Callable[[TaskContext], Awaitable[dict[str, Any]]]


def parse_payload(ctx: TaskContext, model: type[P]) -> P:
    """The task's payload as ``model``; a payload that does not fit fails the task for good.

    The same payload fails the same way on every attempt, so retrying it would only burn the
    attempts (and GPU time): the error is not retryable and names what is wrong.
    """
    try:
        return model.model_validate(ctx.payload)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(payload)'}: {e['msg']}" for e in exc.errors()[:5]
        )
        raise TaskError(
            f"invalid {ctx.task_type} payload ({exc.error_count()} errors): {problems}", retryable=False
        ) from None


def merge_visual_pages(deps: Iterable[dict[str, Any]]) -> list[PageAnalysis]:
    """All pages described by ``visual_analysis`` results, in page order, each page once.

    Batches do not overlap when the deck is split properly; if they do (a resubmitted batch), the
    description from the later task id wins, so the merge does not depend on the order of ``deps``.
    """
    by_page: dict[int, tuple[Any, PageAnalysis]] = {}
    found = False
    for dep in sorted(deps, key=lambda d: _sort_key(d.get("id"))):
        if dep.get("task_type") != "visual_analysis":
            continue
        found = True
        try:
            result = VisualAnalysisResult.model_validate(dep.get("result") or {})
        except ValidationError as exc:
            raise MissingInput(
                f"visual_analysis task {dep.get('id')} left a result that does not validate "
                f"({exc.error_count()} errors)"
            ) from None
        for page in result.pages:
            by_page[page.page] = (dep.get("id"), page)
    if not found:
        raise MissingInput("no visual_analysis results among this task's dependencies")
    return [by_page[p][1] for p in sorted(by_page)]


def _sort_key(value: Any) -> tuple[int, Any]:
    # Task ids are integers or strings depending on the queue; keep sorting total either way.
    return (0, value) if isinstance(value, int) else (1, str(value))


def find_result(deps: Iterable[dict[str, Any]], task_type: str) -> dict[str, Any] | None:
    """The result of the (latest) dependency of this type, or None."""
    matches = [d for d in deps if d.get("task_type") == task_type and isinstance(d.get("result"), dict)]
    if not matches:
        return None
    return max(matches, key=lambda d: _sort_key(d.get("id")))["result"]


def deck_text(pages: list[PageAnalysis], max_chars: int) -> tuple[str, bool]:
    """The deck as text for text prompts, slide by slide; cut at ``max_chars`` (then ``True``)."""
    parts: list[str] = []
    for p in pages:
        lines = [f"## Slide {p.page}: {p.title} ({p.slide_type})", p.description.strip()]
        if p.text_content.strip():
            lines.append("Text on the slide: " + p.text_content.strip())
        if p.key_points:
            lines.append("Key points: " + "; ".join(k.strip() for k in p.key_points if k.strip()))
        if p.visual_elements:
            lines.append("Visuals: " + "; ".join(v.strip() for v in p.visual_elements if v.strip()))
        parts.append("\n".join(lines))
    text = "\n\n".join(parts)
    if len(text) <= max_chars:
        return text, False
    return text[:max_chars] + "\n[... deck text cut here ...]", True
