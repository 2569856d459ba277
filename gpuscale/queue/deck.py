"""Submitting a pitch deck: check the PDF, count its pages, enqueue its whole task graph at once.

The graph (DESIGN.md) is the task type catalogue's (:func:`gpuscale.queue.tasktypes.deck_order`):
visual analysis split into page batches so several replicas share a deck; ``slide_feedback`` and
the five text extractions wait for every batch; ``template_analysis`` waits for
``healthcare_classification``; the three specialized analyses wait for ``template_analysis``.
Everything is written in one transaction, or nothing is.

A local PDF is first copied into the document store (:mod:`gpuscale.queue.documents`) and the
payloads name it relative to the store's root, so the workers read it through their own mount of
the same filesystem; an ``http(s)`` URL is downloaded once to count its pages and stays a URL.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import stat
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from gpuscale.common.pdfium import PDFIUM_LOCK
from gpuscale.queue import tasktypes
from gpuscale.queue.documents import DocumentRefused, DocumentStore, is_url
from gpuscale.queue.tasks import InvalidTask, NewTask, Priority, Queue


class DeckError(InvalidTask):
    """The file is not a readable PDF (or the options are wrong); nothing was written."""


@dataclass(frozen=True)
class DeckSubmission:
    document_id: str
    document: str  # what every task's payload names: a name relative to the document root, or a URL
    pages: int
    task_ids: dict[str, list[int]]  # task type → ids (visual_analysis: one per page batch)


DEFAULT_MAX_PAGES = 300  # GPUSCALE_MAX_PDF_PAGES


def _read_head(pdf: Path) -> bytes:
    """The first KiB of ``pdf``, refusing anything but a regular file *before* opening it.

    Opening a FIFO for reading blocks until a writer comes, and a device may never end; so the
    type is checked with ``stat`` first, and the file is opened non-blocking and checked again
    (it may have been swapped in between)."""
    not_regular = f"{pdf}: not a regular file (a FIFO, device or socket); give a PDF file"
    try:
        st = os.stat(pdf)
    except FileNotFoundError:
        raise DeckError(f"{pdf}: no such file") from None
    except OSError as exc:
        raise DeckError(f"{pdf}: cannot read: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise DeckError(f"{pdf}: is a directory, not a PDF file")
    if not stat.S_ISREG(st.st_mode):
        raise DeckError(not_regular)
    try:
        fd = os.open(pdf, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise DeckError(f"{pdf}: no such file") from None
    except OSError as exc:
        raise DeckError(f"{pdf}: cannot read: {exc.strerror or exc}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise DeckError(not_regular)
        return os.read(fd, 1024)
    except OSError as exc:
        raise DeckError(f"{pdf}: cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def count_pages(pdf: Path, *, max_pages: int | None = None) -> int:
    """Pages of a PDF, via pdfium; :class:`DeckError` with a clear reason if it is not one, or
    if it has more than ``max_pages`` pages."""
    head = _read_head(pdf)
    # pdfium tolerates junk before the header; a deck upload should start with it.
    if b"%PDF-" not in head:
        raise DeckError(f"{pdf}: not a PDF file (no %PDF- header)")

    import pypdfium2

    # pdfium is not thread-safe, and submissions run it in worker threads.
    with PDFIUM_LOCK:
        try:
            doc = pypdfium2.PdfDocument(str(pdf))
        except pypdfium2.PdfiumError as exc:
            raise DeckError(f"{pdf}: corrupt or unreadable PDF ({exc})") from None
        try:
            pages = len(doc)
        finally:
            doc.close()
    if pages < 1:
        raise DeckError(f"{pdf}: the PDF has no pages")
    if max_pages is not None and pages > max_pages:
        raise DeckError(
            f"{pdf}: {pages} pages is over the limit of {max_pages} pages (GPUSCALE_MAX_PDF_PAGES)"
        )
    return pages


def _refuse_private_hosts(allow: frozenset[str]) -> Callable[[httpx.Request], None]:
    """An httpx request hook that refuses hosts on a non-public address unless ``allow`` names them.

    A URL deck makes the API download from wherever the caller says: without this, a caller could
    make it fetch the cloud's metadata service or anything else on the controller's network.  The
    hook runs for every request, redirects included, so a public URL cannot bounce inside."""

    def check(request: httpx.Request) -> None:
        host = request.url.host
        if host in allow:
            return
        try:
            infos = socket.getaddrinfo(host, request.url.port or 443, proto=socket.IPPROTO_TCP)
        except OSError:
            raise DeckError(f"{request.url}: cannot resolve {host!r}") from None
        for info in infos:
            address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
            if not address.is_global:
                raise DeckError(
                    f"{request.url}: {host} is on a non-public address ({address}); "
                    "list it in GPUSCALE_DECK_URL_HOSTS to allow it"
                )

    return check


def _fetch_url(
    url: str, dest: Path, max_bytes: int | None, timeout_s: float, allow_hosts: frozenset[str] | None
) -> None:
    """Download ``url`` to ``dest`` (at most ``max_bytes``); :class:`DeckError` if it cannot.

    ``allow_hosts`` given (the API's case): only public hosts and those it names are fetched."""
    hooks = {"request": [_refuse_private_hosts(allow_hosts)]} if allow_hosts is not None else {}
    try:
        with (
            httpx.Client(timeout=timeout_s, follow_redirects=True, event_hooks=hooks) as client,
            client.stream("GET", url) as resp,
        ):
            if resp.status_code >= 400:
                raise DeckError(f"{url}: the server answered {resp.status_code}")
            size = 0
            with dest.open("wb") as fh:
                for chunk in resp.iter_bytes():
                    size += len(chunk)
                    if max_bytes is not None and size > max_bytes:
                        raise DeckError(f"{url}: the document is over the {max_bytes}-byte limit")
                    fh.write(chunk)
    except DeckError:
        raise
    except (httpx.HTTPError, httpx.InvalidURL, ValueError) as exc:
        # InvalidURL is not an HTTPError; a URL that cannot even be parsed is bad input too.
        raise DeckError(f"{url}: cannot download: {type(exc).__name__}") from None


def url_pages(
    url: str,
    *,
    max_bytes: int | None = None,
    timeout_s: float = 60.0,
    max_pages: int | None = None,
    allow_hosts: frozenset[str] | None = None,
) -> int:
    """Pages of the PDF at ``url`` (downloaded to a temporary file that is then removed).

    With ``allow_hosts``, a host on a loopback, private or link-local address is refused unless
    named there (see :func:`_refuse_private_hosts`)."""
    with tempfile.TemporaryDirectory(prefix="gpuscale-deck-") as tmp:
        dest = Path(tmp) / "deck.pdf"
        _fetch_url(url, dest, max_bytes, timeout_s, allow_hosts)
        pages = count_pages(dest, max_pages=max_pages)
    return pages


def _store_local(
    pdf: Path, store: DocumentStore, max_bytes: int | None, max_pages: int | None
) -> tuple[str, int]:
    """Check a local PDF (pages, size), then copy it into ``store``: (its name there, pages)."""
    path = pdf.absolute()
    pages = count_pages(path, max_pages=max_pages)
    size = path.stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise DeckError(f"{path}: {size} bytes is over the {max_bytes}-byte limit")
    try:
        return store.put_file(path, max_bytes=max_bytes), pages
    except DocumentRefused as exc:
        raise DeckError(str(exc)) from None
    except OSError as exc:
        raise DeckError(f"cannot store the document under {store.root}: {exc.strerror or exc}") from None


# Pages per visual_analysis task at most (GPUSCALE_DECK_BATCH_PAGES): ~10 × 25 s of GPU, so a
# 30-page deck is three batches, each with its own replica (issue 12: 8 left a short fourth
# batch on ~half the decks, one more cold start for a few pages).
DEFAULT_BATCH_PAGES = 10


def page_batches(pages: int, batch_pages: int) -> list[tuple[int, int]]:
    """1-based inclusive page ranges: as few batches of at most ``batch_pages`` pages as the deck
    needs, as even as possible (28 pages at 10: 10, 9, 9 — not 10, 10, 8).  Each batch is one
    GPU task, usually on a replica of its own that pays a cold start; the deck's visual stage
    ends with its longest batch, so a short last batch would cost a cold start for little work
    and even batches end the stage soonest (issue 12)."""
    if pages <= 0:
        return []
    count = -(-pages // batch_pages)
    base, extra = divmod(pages, count)
    out: list[tuple[int, int]] = []
    first = 1
    for i in range(count):
        size = base + (1 if i < extra else 0)
        out.append((first, first + size - 1))
        first += size
    return out


async def submit_deck(
    queue: Queue,
    pdf: Path | str,
    *,
    store: DocumentStore,
    batch_pages: int = DEFAULT_BATCH_PAGES,
    priority: Priority | str = Priority.normal,
    document_id: str | None = None,
    max_bytes: int | None = None,
    max_pages: int | None = DEFAULT_MAX_PAGES,
) -> DeckSubmission:
    """Validate ``pdf`` (a local file or an ``http(s)`` URL; at most ``max_pages`` pages), store
    a local file in ``store``, and enqueue the deck's task graph in one transaction."""
    if not isinstance(batch_pages, int) or batch_pages < 1:
        raise DeckError(f"batch_pages must be a positive integer, not {batch_pages!r}")
    if isinstance(pdf, str) and is_url(pdf):
        pages = await asyncio.to_thread(url_pages, pdf, max_bytes=max_bytes, max_pages=max_pages)
        document = pdf
    else:
        document, pages = await asyncio.to_thread(_store_local, Path(pdf), store, max_bytes, max_pages)
    return await enqueue_deck(
        queue, document, pages, batch_pages=batch_pages, priority=priority, document_id=document_id
    )


async def enqueue_deck(
    queue: Queue,
    document: str,
    pages: int,
    *,
    batch_pages: int = DEFAULT_BATCH_PAGES,
    priority: Priority | str = Priority.normal,
    document_id: str | None = None,
) -> DeckSubmission:
    """Enqueue the task graph of an already stored (or URL) ``document`` of ``pages`` pages."""
    if not isinstance(batch_pages, int) or batch_pages < 1:
        raise DeckError(f"batch_pages must be a positive integer, not {batch_pages!r}")
    doc_id = document_id or f"deck-{uuid.uuid4().hex[:16]}"

    tasks: list[NewTask] = []
    after: list[list[int]] = []
    index: dict[str, list[int]] = {}  # task type → its tasks' positions in ``tasks``

    for tt in tasktypes.deck_order():
        deps = [i for name in tt.after or () for i in index[name]]
        payloads: list[dict[str, object]] = [{"document": document}]
        if tt.per_page_batch:
            batches = page_batches(pages, batch_pages)
            payloads = [{"document": document, "first_page": a, "last_page": b} for a, b in batches]
        for payload in payloads:
            tasks.append(NewTask(tt.name, payload, priority=priority, document_id=doc_id))
            after.append(deps)
            index.setdefault(tt.name, []).append(len(tasks) - 1)

    ids = await queue.enqueue_graph(tasks, after, new_document=document_id)
    task_ids = {name: [ids[i] for i in positions] for name, positions in index.items()}
    return DeckSubmission(doc_id, document, pages, task_ids)
