"""The HTTP task API (``gpuscale api``): the platform's front door to the queue.

Stateless FastAPI service on the task queue: the PRD's per-task endpoints, deck upload and
progress, task reads and cancellation, a health check.  It holds no state of its own (uploads go
to the document store, everything else to PostgreSQL), so any number of copies can run behind a
load balancer; ``?wait`` is woken by the queue's ``NOTIFY gpuscale_finished``.
"""

from gpuscale.api.app import create_app

__all__ = ["create_app"]
