"""Errors a task handler raises to fail its task with a clear reason.

``retryable`` tells the queue whether another attempt can help: a timeout, an unreachable Ollama or
an answer that did not validate may well succeed next time; a corrupt PDF or a missing file never
will, so those tasks fail at once instead of burning their attempts.
"""

from __future__ import annotations


class TaskError(Exception):
    """A task failed; ``str(exc)`` is the reason stored with the task."""

    retryable: bool = True

    def __init__(self, message: str, *, retryable: bool | None = None, raw: str | None = None) -> None:
        super().__init__(message)
        if retryable is not None:
            self.retryable = retryable
        # The raw model answer, kept for diagnosis when it did not validate.
        self.raw = raw


class DocumentError(TaskError):
    """The document is missing, too large, or not a valid PDF: retrying will not fix it."""

    retryable = False


class OllamaError(TaskError):
    """Ollama could not answer (unreachable, timed out, server error): worth another attempt."""

    retryable = True


class InvalidAnswer(OllamaError):
    """Ollama answered, but the answer does not validate against the result model."""


class MissingInput(TaskError):
    """The task's dependencies did not leave the results it needs."""

    retryable = False
