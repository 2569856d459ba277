"""Task handlers by task type, and which pool runs which.

``HANDLERS`` maps every task type the workers can run to its handler; ``handlers_for_pool(pool)``
is what one worker serves (its registered capabilities).  Both derive from the task type catalogue
(:mod:`gpuscale.queue.tasktypes`): each type names its handler there, and its pool, so routing has
one source of truth.
"""

from __future__ import annotations

from gpuscale.queue import tasktypes
from gpuscale.worker.handlers import noop, text, visual
from gpuscale.worker.handlers.base import Handler, TaskContext

# The handler each catalogue entry names (``TaskType.handler``): one function can serve several types.
BY_NAME: dict[str, Handler] = {
    "visual_analysis": visual.visual_analysis,
    "slide_feedback": visual.slide_feedback,
    "extraction": text.extraction,
    "template_analysis": text.template_analysis,
    "specialized": text.specialized,
    "noop": noop.noop,
}


def _handlers() -> dict[str, Handler]:
    """Task type → handler, derived from the catalogue; fails at import when a type names a handler
    that does not exist, so a worker can never register a type it cannot run."""
    catalogue = tasktypes.all_types()
    missing = sorted(f"{t.name} ({t.handler})" for t in catalogue.values() if t.handler not in BY_NAME)
    if missing:
        raise ImportError(f"task types without a worker handler: {', '.join(missing)}")
    return {name: BY_NAME[t.handler] for name, t in catalogue.items()}


HANDLERS: dict[str, Handler] = _handlers()


def handlers_for_pool(pool: str) -> dict[str, Handler]:
    """The handlers of the task types routed to ``pool`` (read from the catalogue now, so a type
    registered at run time, say a benchmark's copy of ``noop``, is served too)."""
    return {name: BY_NAME[tasktypes.get(name).handler] for name in tasktypes.types_for_pool(pool)}


__all__ = ["BY_NAME", "HANDLERS", "Handler", "TaskContext", "handlers_for_pool"]
