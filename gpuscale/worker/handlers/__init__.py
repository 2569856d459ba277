"""Task handlers by task type, and which pool runs which.

``HANDLERS`` maps every task type the workers can run to its handler; ``handlers_for_pool(pool)``
is what one worker serves (its registered capabilities).  The pool of each type comes from the
task type registry (:mod:`gpuscale.queue.tasktypes`), so routing has one source of truth.
"""

from __future__ import annotations

from gpuscale.queue import tasktypes
from gpuscale.worker.handlers import noop, text, visual
from gpuscale.worker.handlers.base import Handler, TaskContext

HANDLERS: dict[str, Handler] = {
    "visual_analysis": visual.visual_analysis,
    "slide_feedback": visual.slide_feedback,
    "company_offering_extraction": text.extraction,
    "startup_name_extraction": text.extraction,
    "healthcare_classification": text.extraction,
    "funding_amount_extraction": text.extraction,
    "deck_date_extraction": text.extraction,
    "template_analysis": text.template_analysis,
    "specialized_clinical": text.specialized,
    "specialized_regulatory": text.specialized,
    "specialized_science": text.specialized,
    "noop": noop.noop,
}


def handlers_for_pool(pool: str) -> dict[str, Handler]:
    """The handlers of the task types routed to ``pool``."""
    return {name: HANDLERS[name] for name in tasktypes.types_for_pool(pool) if name in HANDLERS}


__all__ = ["HANDLERS", "Handler", "TaskContext", "handlers_for_pool"]
