"""The FastAPI application of ``gpuscale api``: routes, token check, error mapping.

Every route but ``/api/health`` needs ``Authorization: Bearer <token>`` with one of the tokens in
``GPUSCALE_API_TOKEN``.  Every refusal is a 4xx with a one-line ``detail`` and writes nothing:
payloads are validated by the task types' own models before the queue is touched, uploads are
checked (size, PDF, pages) in a temporary file that is only moved into the document store once
they pass.  A database that cannot be reached answers 503, never 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from enum import Enum
from typing import Annotated, Any
from urllib.parse import quote, urlencode

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ValidationError
from starlette.types import Message

from gpuscale import __version__
from gpuscale.api import models as m
from gpuscale.api.waiter import Finished
from gpuscale.common.settings import Settings
from gpuscale.db.connector import DATABASE_ERRORS, INVALID_VALUE, UNREACHABLE, Connector
from gpuscale.queue import FINAL_STATUSES, DocumentTaken, InvalidTask, NewTask, Priority, Queue, TaskStatus
from gpuscale.queue.deck import DeckError, count_pages, enqueue_deck, url_pages
from gpuscale.queue.documents import DocumentRefused, DocumentStore, is_url

log = logging.getLogger(__name__)

MAX_WAIT_S = 120.0
# Connections an API process holds for its statements (each request's are short, and a `?wait`
# holds none while it waits), plus one for LISTEN: part of the fleet's connection budget (README).
API_CONNECTIONS = 2
MAX_JSON_BYTES = 1024 * 1024  # a task's payload is at most max_payload_bytes (256 KiB by default)
_MULTIPART_OVERHEAD = 64 * 1024
_CHUNK = 1 << 20

Wait = Annotated[
    float,
    Query(
        ge=0, le=MAX_WAIT_S, description="Hold the request up to this many seconds for the task to finish."
    ),
]
IdPath = Annotated[int, Path(ge=1, le=m.MAX_ID)]
DocumentIdPath = Annotated[str, Path(max_length=200)]


class ApiState:
    """What the routes share: the queue, the document store, the finished-task listener."""

    def __init__(self, settings: Settings, queue: Queue, finished: Finished) -> None:
        self.settings = settings
        self.queue = queue
        self.finished = finished
        self.store = DocumentStore(settings.document_root)
        self.url_hosts = frozenset(h.strip() for h in settings.deck_url_hosts.split(",") if h.strip())
        self.tokens = [
            t.strip().encode()
            for t in (settings.api_token.get_secret_value() if settings.api_token else "").split(",")
            if t.strip()
        ]


def _state(request: Request) -> ApiState:
    state: ApiState = request.app.state.api
    return state


_bearer = HTTPBearer(auto_error=False, description="One of the tokens in GPUSCALE_API_TOKEN.")


def _authorized(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    state = _state(request)
    given = credentials.credentials.encode() if credentials is not None else b""
    # Compare against every token, in constant time each, so neither the match nor its position
    # shows in the timing.
    ok = False
    for token in state.tokens:
        ok |= hmac.compare_digest(given, token)
    if credentials is None or not ok:
        raise HTTPException(401, "missing or invalid bearer token", headers={"WWW-Authenticate": "Bearer"})


Auth = Depends(_authorized)
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": m.Problem, "description": "no or a wrong bearer token"},
    422: {"model": m.Problem, "description": "invalid input"},
    503: {"model": m.Problem, "description": "the database or the document store is unavailable; retry"},
}


def create_app(settings: Settings, dsn: str, *, migrate_on_start: bool = True) -> FastAPI:
    """The API on the database at ``dsn`` (the caller resolved it; it is never logged)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db = await Connector.from_settings(
            settings, dsn, min_connections=1, max_connections=API_CONNECTIONS
        ).open()
        try:
            if migrate_on_start:
                await db.migrate()
            # LISTEN needs a session of its own: the direct URL when a pooler sits in front.
            finished = Finished(db.listen_dsn)
            finished.start()
            queue = Queue(db, max_payload_bytes=settings.max_payload_bytes, lease_s=settings.lease_seconds)
            app.state.api = ApiState(settings, queue, finished)
            pruner = asyncio.create_task(_prune_documents(app.state.api), name="prune-documents")
            try:
                yield
            finally:
                pruner.cancel()
                await finished.stop()
        finally:
            await db.close()

    app = FastAPI(
        title="gpuscale task API",
        version=__version__,
        description="Submit pitch decks and analysis tasks to the GPU queue; follow their progress and "
        "fetch their results.  Every route but /api/health needs `Authorization: Bearer <token>`.",
        lifespan=lifespan,
        responses=ERRORS,
    )
    _errors(app)
    _routes(app)
    return app


_PRUNE_EVERY_S = 3600.0
_PRUNE_ERRORS: tuple[type[Exception], ...] = (*DATABASE_ERRORS, OSError)


async def _prune_documents(state: ApiState) -> None:
    """Hourly: delete the stored decks that no task names and nobody touched for the retention.

    The API is what writes the document store, so it is what keeps it from filling up; several API
    replicas pruning at once is harmless (a file already gone is skipped)."""
    while True:
        await asyncio.sleep(_PRUNE_EVERY_S)
        try:
            in_use = await state.queue.documents_in_use()
            result = await asyncio.to_thread(
                state.store.prune, in_use, older_than_s=state.settings.document_retention_days * 86400
            )
        except _PRUNE_ERRORS as exc:
            log.warning("api: pruning the document store failed (%s); next try in 1 h", type(exc).__name__)
            continue
        if result.deleted:
            log.info(
                "api: pruned %d stored document(s), %.1f MiB", len(result.deleted), result.freed_bytes / 2**20
            )


# ------------------------------------------------------------------------------------ errors


def _errors(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _describe(exc.errors())}, status_code=422)

    @app.exception_handler(INVALID_VALUE)
    async def bad_value(_request: Request, exc: Exception) -> JSONResponse:
        # A value PostgreSQL cannot store (e.g. a NUL in a string): the input's fault.
        return JSONResponse({"detail": f"invalid value: {exc.__class__.__name__}"}, status_code=422)

    async def unavailable(_request: Request, exc: Exception) -> JSONResponse:
        log.warning("api: database unavailable: %s", type(exc).__name__)
        return JSONResponse(
            {"detail": "the database is unavailable; try again"},
            status_code=503,
            headers={"Retry-After": "5"},
        )

    for cls in UNREACHABLE:
        app.add_exception_handler(cls, unavailable)

    @app.middleware("http")
    async def body_limit(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        settings: Settings = request.app.state.api.settings
        limit = (
            settings.deck_max_bytes + _MULTIPART_OVERHEAD
            if request.url.path == "/api/decks"
            else MAX_JSON_BYTES
        )
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                return JSONResponse({"detail": "invalid Content-Length"}, status_code=400)
            if int(declared) > limit:
                return JSONResponse(
                    {"detail": f"the request body is {declared} bytes, over the limit of {limit} bytes"},
                    status_code=413,
                )
        return await call_next(request)


def _describe(errors: Any) -> str:
    parts = []
    for e in errors:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p not in ("body",)) or "body"
        parts.append(f"{loc}: {str(e.get('msg', 'invalid')).removeprefix('Value error, ')}")
    return "; ".join(parts)


# ------------------------------------------------------------------------------------ helpers


def _task_view(row: dict[str, Any]) -> m.TaskView:
    return m.TaskView.model_validate(row)


def _check_document(state: ApiState, document: str) -> None:
    """A payload's document must be an http(s) URL or a file in the document store."""
    if is_url(document):
        return
    try:
        path = state.store.resolve(document)
        present = path.is_file()
    except DocumentRefused as exc:
        raise HTTPException(422, f"document: {exc}") from None
    except OSError as exc:
        # Not the database (the OSError handler says that): the shared filesystem.
        raise _store_unavailable(exc) from None
    if not present:
        raise HTTPException(
            422, f"document: {document!r} is not in the document store (upload it with POST /api/decks)"
        )


async def _enqueue(
    state: ApiState, task_type: str, body: BaseModel, payload_model: type[BaseModel], wait: float
) -> Response:
    data = body.model_dump(mode="json", exclude_unset=True)
    payload = {k: v for k, v in data.items() if k in payload_model.model_fields}
    _check_document(state, str(payload.get("document", "")))
    opts = m.TaskOptions.model_validate({k: v for k, v in data.items() if k in m.OPTION_FIELDS})
    try:
        task_id = await state.queue.enqueue(
            NewTask(task_type, payload, opts.priority, list(opts.depends_on), opts.document_id)
        )
    except InvalidTask as exc:
        raise HTTPException(422, str(exc)) from None
    log.info("api: enqueued task %d (%s)", task_id, task_type)
    return await _answer_task(state, task_id, wait, accepted=True)


async def _wait_final(state: ApiState, task_id: int, wait: float) -> dict[str, Any] | None:
    """The task's row, after waiting up to ``wait`` s for it to finish (woken by NOTIFY)."""
    deadline = time.monotonic() + wait
    with state.finished.watch(task_id) as event:
        read = state.queue.watch_task  # the first read asks the database to notify the finish
        while True:
            event.clear()  # before the read: a NOTIFY after it sets the event again
            row = await read(task_id)
            read = state.queue.get_task
            remaining = deadline - time.monotonic()
            if row is None or row["status"] in FINAL_STATUSES or remaining <= 0:
                return row
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), remaining)


async def _answer_task(state: ApiState, task_id: int, wait: float, *, accepted: bool) -> Response:
    row = await _wait_final(state, task_id, wait) if wait > 0 else await state.queue.get_task(task_id)
    if row is None:
        raise HTTPException(404, f"no task {task_id}")
    location = f"/api/tasks/{task_id}"
    if accepted and row["status"] not in FINAL_STATUSES:
        body = m.TaskAccepted(id=task_id, task_type=row["task_type"], status=row["status"], location=location)
        return JSONResponse(body.model_dump(mode="json"), status_code=202, headers={"Location": location})
    return JSONResponse(
        _task_view(row).model_dump(mode="json"), status_code=200, headers={"Location": location}
    )


def _deck_view(document_id: str, rows: list[dict[str, Any]]) -> m.DeckView:
    statuses = {r["status"] for r in rows}
    final = statuses <= {s.value for s in FINAL_STATUSES}
    status: m.DeckStatus
    if statuses == {"done"}:
        status = "done"
    elif final and "cancelled" in statuses and not statuses & {"failed", "dead"}:
        status = "cancelled"
    elif final:
        status = "failed"
    elif statuses & {"running", "done", "failed", "dead", "cancelled"}:
        status = "running"
    else:
        status = "queued"
    progress = sum(100.0 if r["status"] in FINAL_STATUSES else float(r["progress"] or 0) for r in rows) / len(
        rows
    )
    results: dict[str, Any] | None = None
    if status == "done":
        results = {}
        for r in sorted(
            rows, key=lambda r: (r["task_type"], (r["payload"] or {}).get("first_page", 0), r["id"])
        ):
            if r["task_type"] == "visual_analysis":
                results.setdefault("visual_analysis", []).append(r["result"])
            else:
                results[r["task_type"]] = r["result"]
    tasks = [
        m.DeckTask(
            id=r["id"],
            task_type=r["task_type"],
            status=r["status"],
            progress=float(r["progress"] or 0),
            progress_message=r["progress_message"],
            attempts=r["attempts"],
            error=r["error"],
        )
        for r in rows
    ]
    return m.DeckView(
        document_id=document_id, status=status, progress=round(progress, 2), tasks=tasks, results=results
    )


async def _read_upload(state: ApiState, request: Request) -> tuple[str, int]:
    """Store a multipart upload (field ``file``) in the document store: (its name, pages)."""
    limit = state.settings.deck_max_bytes
    # The form parser reads the body as it arrives and spools the file to disk past 1 MiB, so an
    # upload is never held in memory whole; counting what arrives caps chunked uploads too, which
    # the Content-Length check does not cover.
    received = 0

    async def capped() -> Message:
        nonlocal received
        message = await request.receive()
        received += len(message.get("body", b""))
        if received > limit + _MULTIPART_OVERHEAD:
            raise HTTPException(413, f"the upload is over the {limit}-byte limit")
        return message

    try:
        form = await Request(request.scope, capped).form(max_files=1, max_fields=4)
    except HTTPException:
        raise
    except Exception as exc:  # the multipart parser's errors have no common base
        raise HTTPException(422, f"invalid multipart body: {type(exc).__name__}") from None
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise HTTPException(422, "file: the multipart field 'file' with the PDF is required")
    try:
        incoming = await asyncio.to_thread(state.store.begin)
    except OSError as exc:
        raise _store_unavailable(exc) from None
    try:
        while chunk := await upload.read(_CHUNK):
            await asyncio.to_thread(incoming.write, chunk)
            if incoming.size > limit:
                raise HTTPException(413, f"the upload is over the {limit}-byte limit")
        await asyncio.to_thread(incoming.close)
        if incoming.size == 0:
            raise HTTPException(422, "file: the upload is empty")
        try:
            pages = await asyncio.to_thread(count_pages, incoming.path)
        except DeckError as exc:
            # The message names the temporary file; say "the upload" instead.
            raise HTTPException(422, str(exc).replace(str(incoming.path), "file")) from None
        _check_pages(state, pages)
        name = await asyncio.to_thread(incoming.commit)
    except OSError as exc:
        raise _store_unavailable(exc) from None
    finally:
        await asyncio.to_thread(incoming.discard)
        await upload.close()
    return name, pages


def _store_unavailable(exc: OSError) -> HTTPException:
    # The shared filesystem is full, read-only or gone: not the client's fault, and not a bug.
    log.warning("api: the document store cannot take an upload: %s", exc.strerror or type(exc).__name__)
    return HTTPException(503, f"the document store is unavailable ({exc.strerror or type(exc).__name__})")


def _check_pages(state: ApiState, pages: int) -> None:
    limit = state.settings.max_pdf_pages
    if pages > limit:
        raise HTTPException(422, f"the deck has {pages} pages, over the limit of {limit} pages")


# ------------------------------------------------------------------------------------ routes


def _routes(app: FastAPI) -> None:
    tasks_tag: list[str | Enum] = ["tasks (PRD endpoints)"]

    @app.get("/api/health", response_model=m.Health, tags=["health"], responses={503: {"model": m.Health}})
    async def health(request: Request) -> JSONResponse:
        """Database reachable and every migration this build knows applied (no token needed)."""
        state = _state(request)
        try:
            missing = await state.queue.db.pending_migrations(timeout_s=5)
        except DATABASE_ERRORS:
            body = m.Health(status="unavailable", database=False, migrations_pending=[])
            return JSONResponse(body.model_dump(), status_code=503)
        names = [f"{x.version:04d}_{x.name}" for x in missing]
        body = m.Health(status="unavailable" if names else "ok", database=True, migrations_pending=names)
        return JSONResponse(body.model_dump(), status_code=503 if names else 200)

    accepted: dict[int | str, dict[str, Any]] = {
        202: {"model": m.TaskAccepted, "description": "queued; see Location"},
        200: {"model": m.TaskView, "description": "finished within ?wait"},
    }

    @app.post(
        "/api/visual-analysis", status_code=202, responses=accepted, tags=tasks_tag, dependencies=[Auth]
    )
    async def visual_analysis(request: Request, body: m.VisualAnalysisRequest, wait: Wait = 0) -> Response:
        """Analyse a page range of a deck (vision model)."""
        from gpuscale.queue.tasktypes import VisualAnalysisPayload

        return await _enqueue(_state(request), "visual_analysis", body, VisualAnalysisPayload, wait)

    @app.post("/api/slide-feedback", status_code=202, responses=accepted, tags=tasks_tag, dependencies=[Auth])
    async def slide_feedback(request: Request, body: m.DocumentRequest, wait: Wait = 0) -> Response:
        """Feedback per slide; depends on the deck's visual analyses (``depends_on``)."""
        from gpuscale.queue.tasktypes import DocumentPayload

        return await _enqueue(_state(request), "slide_feedback", body, DocumentPayload, wait)

    @app.post(
        "/api/extraction/{type}", status_code=202, responses=accepted, tags=tasks_tag, dependencies=[Auth]
    )
    async def extraction(
        request: Request,
        type: Annotated[m.ExtractionType, Path(description="Which extraction.")],
        body: m.DocumentRequest,
        wait: Wait = 0,
    ) -> Response:
        """A text extraction (company offering, startup name, healthcare classification, funding, date)."""
        from gpuscale.queue.tasktypes import DocumentPayload

        return await _enqueue(_state(request), type.task_type, body, DocumentPayload, wait)

    @app.post(
        "/api/template-analysis", status_code=202, responses=accepted, tags=tasks_tag, dependencies=[Auth]
    )
    async def template_analysis(request: Request, body: m.DocumentRequest, wait: Wait = 0) -> Response:
        """Template-based analysis; depends on the healthcare classification."""
        from gpuscale.queue.tasktypes import DocumentPayload

        return await _enqueue(_state(request), "template_analysis", body, DocumentPayload, wait)

    @app.post(
        "/api/specialized-analysis", status_code=202, responses=accepted, tags=tasks_tag, dependencies=[Auth]
    )
    async def specialized_analysis(request: Request, body: m.SpecializedRequest, wait: Wait = 0) -> Response:
        """Clinical, regulatory or science analysis (``kind``); depends on the template analysis."""
        from gpuscale.queue.tasktypes import DocumentPayload

        return await _enqueue(_state(request), f"specialized_{body.kind.value}", body, DocumentPayload, wait)

    # ---------------------------------------------------------------- decks

    deck_body = {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {"file": {"type": "string", "format": "binary"}},
                    }
                },
                "application/json": {"schema": m.DeckByUrl.model_json_schema()},
            },
        }
    }

    @app.post(
        "/api/decks",
        status_code=202,
        response_model=m.DeckAccepted,
        responses={
            409: {"model": m.Problem, "description": "the document_id is taken"},
            413: {"model": m.Problem, "description": "the upload is too large"},
            415: {"model": m.Problem, "description": "neither multipart nor JSON"},
        },
        openapi_extra=deck_body,
        tags=["decks"],
        dependencies=[Auth],
    )
    async def submit_deck(
        request: Request,
        priority: Priority = Priority.normal,
        batch_pages: Annotated[int | None, Query(ge=1, le=1000, description="Pages per visual task.")] = None,
        document_id: Annotated[
            str | None,
            Query(
                min_length=1,
                max_length=200,
                pattern=r"^[^\x00-\x1f]+$",
                description="The deck's id (default: a new deck-<hex>); 409 if it is taken.",
            ),
        ] = None,
    ) -> JSONResponse:
        """Submit a deck: a PDF upload (multipart field ``file``) or ``{"document": "https://…"}``.

        Creates its whole task graph in one transaction and answers what ``gpuscale submit-deck
        --json`` prints; follow it at ``/api/decks/{document_id}``."""
        state = _state(request)
        if document_id is not None and await state.queue.document_tasks(document_id):
            raise HTTPException(409, f"deck {document_id!r} already exists")
        ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if ctype == "multipart/form-data":
            document, pages = await _read_upload(state, request)
        elif ctype == "application/json":
            raw = await request.body()
            try:
                by_url = m.DeckByUrl.model_validate_json(raw)
            except ValidationError as exc:
                raise HTTPException(422, _describe(exc.errors())) from None
            document = by_url.document
            try:
                pages = await asyncio.to_thread(
                    url_pages,
                    document,
                    max_bytes=state.settings.deck_max_bytes,
                    timeout_s=state.settings.deck_fetch_timeout_s,
                    allow_hosts=state.url_hosts,
                )
            except DeckError as exc:
                raise HTTPException(422, str(exc)) from None
            _check_pages(state, pages)
        else:
            raise HTTPException(
                415, "send the PDF as multipart/form-data (field 'file') or JSON {'document': url}"
            )
        try:
            sub = await enqueue_deck(
                state.queue,
                document,
                pages,
                batch_pages=batch_pages or state.settings.deck_batch_pages,
                priority=priority,
                document_id=document_id,
            )
        except DocumentTaken as exc:
            # Decided again inside the enqueue's transaction: the check above only answers early.
            raise HTTPException(409, str(exc)) from None
        except InvalidTask as exc:
            raise HTTPException(422, str(exc)) from None
        log.info("api: deck %s submitted (%d pages)", sub.document_id, sub.pages)
        # Header values are latin-1 on the wire: a caller's document_id may hold any character, so
        # the Location carries it percent-encoded (the path it names decodes back to the same id).
        location = f"/api/decks/{quote(sub.document_id, safe='')}"
        body = m.DeckAccepted(
            document_id=sub.document_id, document=sub.document, pages=sub.pages, task_ids=sub.task_ids
        )
        return JSONResponse(body.model_dump(), status_code=202, headers={"Location": location})

    @app.get(
        "/api/decks/{document_id}",
        response_model=m.DeckView,
        responses={404: {"model": m.Problem}},
        tags=["decks"],
        dependencies=[Auth],
    )
    async def get_deck(request: Request, document_id: DocumentIdPath) -> m.DeckView:
        """Every task's status, progress and message; the results by task type once done."""
        rows = await _state(request).queue.document_tasks(_clean(document_id))
        if not rows:
            raise HTTPException(404, f"no deck {document_id!r}")
        return _deck_view(document_id, rows)

    @app.delete(
        "/api/decks/{document_id}",
        response_model=m.DeckCancelled,
        responses={404: {"model": m.Problem}},
        tags=["decks"],
        dependencies=[Auth],
    )
    async def cancel_deck(request: Request, document_id: DocumentIdPath) -> m.DeckCancelled:
        """Cancel every task of the deck that has not finished."""
        queue = _state(request).queue
        doc = _clean(document_id)
        if not await queue.document_tasks(doc):
            raise HTTPException(404, f"no deck {document_id!r}")
        n = await queue.cancel_document(doc)
        log.info("api: deck %s: %d task(s) cancelled", document_id, n)
        return m.DeckCancelled(cancelled=n, deck=_deck_view(document_id, await queue.document_tasks(doc)))

    # ---------------------------------------------------------------- tasks

    @app.get(
        "/api/tasks/{task_id}",
        response_model=m.TaskView,
        responses={404: {"model": m.Problem}},
        tags=["tasks"],
        dependencies=[Auth],
    )
    async def get_task(request: Request, task_id: IdPath, wait: Wait = 0) -> Response:
        """A task: status, progress, attempts, error, result.  ``?wait=S`` holds until it finishes."""
        return await _answer_task(_state(request), task_id, wait, accepted=False)

    @app.delete(
        "/api/tasks/{task_id}",
        response_model=m.TaskView,
        responses={404: {"model": m.Problem}, 409: {"model": m.Problem, "description": "already finished"}},
        tags=["tasks"],
        dependencies=[Auth],
    )
    async def cancel_task(request: Request, task_id: IdPath) -> m.TaskView:
        """Cancel a task that has not finished (its dependents fail)."""
        queue = _state(request).queue
        if not await queue.cancel(task_id):
            row = await queue.get_task(task_id)
            if row is None:
                raise HTTPException(404, f"no task {task_id}")
            raise HTTPException(409, f"task {task_id} is already {row['status']}")
        log.info("api: task %d cancelled", task_id)
        row = await queue.get_task(task_id)
        assert row is not None
        return _task_view(row)

    @app.get("/api/tasks", response_model=m.TaskPage, tags=["tasks"], dependencies=[Auth])
    async def list_tasks(
        request: Request,
        document: Annotated[str | None, Query(max_length=200, description="Only this deck's tasks.")] = None,
        status: TaskStatus | None = None,
        after: Annotated[int, Query(ge=0, le=m.MAX_ID, description="Ids after this one (paging).")] = 0,
        limit: Annotated[int, Query(ge=1, le=500)] = 100,
    ) -> m.TaskPage:
        """Tasks by ascending id, filtered by deck and status; follow ``next`` for more."""
        rows = await _state(request).queue.list_tasks(
            document_id=_clean(document) if document is not None else None,
            status=status.value if status else None,
            after_id=after,
            limit=limit,
        )
        nxt = None
        if len(rows) == limit:
            query: dict[str, Any] = {"after": rows[-1]["id"], "limit": limit}
            if document is not None:
                query["document"] = document
            if status is not None:
                query["status"] = status.value
            nxt = f"/api/tasks?{urlencode(query)}"
        return m.TaskPage(items=[m.TaskSummary.model_validate(r) for r in rows], next=nxt)


def _clean(text: str) -> str:
    if "\x00" in text:
        raise HTTPException(422, "NUL characters are not allowed")
    return text
