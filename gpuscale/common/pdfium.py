"""The one lock around pdfium (pypdfium2): pdfium is not thread-safe, process-wide.

Counting a deck's pages when it is submitted (:mod:`gpuscale.queue.deck`) and rendering its pages in
the worker (:mod:`gpuscale.worker.pdf`) both run pdfium in threads; one process may do both (a test,
an API that also renders), so every pdfium call holds this one lock, never a lock of its own.
"""

from __future__ import annotations

import threading

PDFIUM_LOCK = threading.Lock()
