"""``gpuscale api``: real API processes on the test database, real workers and the Ollama stand-in.

Every PRD path; a deck uploaded and followed to its results; ``?wait`` woken by completion;
cancel; tokens; limits (nothing written for a refused request); two API processes serving one
deck; and a schemathesis property test against the running service.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from api_kit import GPUSCALE, TOKENS, ApiProc, api_env
from http_kit import serving_files
from pdfs import make_deck, not_a_pdf
from starlette.requests import Request
from starlette.responses import Response

from gpuscale.dev.standin import OllamaStandin
from gpuscale.queue import Queue

ALL_TYPES = {
    "visual_analysis",
    "slide_feedback",
    "company_offering_extraction",
    "startup_name_extraction",
    "healthcare_classification",
    "funding_amount_extraction",
    "deck_date_extraction",
    "template_analysis",
    "specialized_clinical",
    "specialized_regulatory",
    "specialized_science",
}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "documents"
    path.mkdir()
    return path


@pytest.fixture
def start_api(db_env: dict[str, str], root: Path, tmp_path: Path) -> Iterator[Any]:
    started: list[ApiProc] = []

    def start(**extra: str) -> ApiProc:
        env = api_env(
            db_env,
            root,
            GPUSCALE_DECK_MAX_BYTES="200000",
            GPUSCALE_MAX_PDF_PAGES="12",
            GPUSCALE_DECK_FETCH_TIMEOUT_S="3",
            # The test's PDF server is on loopback: allowed by name (``localhost`` is not).
            GPUSCALE_DECK_URL_HOSTS="127.0.0.1",
            **extra,
        )
        proc = ApiProc(env, tmp_path / f"api-{len(started)}.log")
        started.append(proc)
        return proc.wait_ready()

    try:
        yield start
    finally:
        for proc in started:
            proc.stop()


@pytest.fixture
def api(start_api: Any) -> ApiProc:
    proc: ApiProc = start_api()
    return proc


@pytest.fixture
def stored(root: Path) -> str:
    """A deck already in the document store (as an earlier upload would have left it)."""
    make_deck(root / "acme.pdf", pages=3)
    return "acme.pdf"


async def count(db: asyncpg.Pool) -> int:
    return int(await db.fetchval("SELECT count(*) FROM processing_queue"))


# ------------------------------------------------------------------------------ PRD endpoints


async def test_every_prd_path_enqueues_its_task_type(api: ApiProc, db: asyncpg.Pool, stored: str) -> None:
    with api.client() as c:
        r = c.post("/api/visual-analysis", json={"document": stored, "first_page": 1, "last_page": 3})
        assert r.status_code == 202, r.text
        visual = r.json()["id"]
        assert r.headers["location"] == f"/api/tasks/{visual}" == r.json()["location"]
        cases: list[tuple[str, dict[str, Any], str]] = [
            ("/api/slide-feedback", {}, "slide_feedback"),
            ("/api/extraction/company_offering", {}, "company_offering_extraction"),
            ("/api/extraction/startup_name", {}, "startup_name_extraction"),
            ("/api/extraction/healthcare_classification", {}, "healthcare_classification"),
            ("/api/extraction/funding_amount", {}, "funding_amount_extraction"),
            ("/api/extraction/deck_date", {}, "deck_date_extraction"),
            ("/api/template-analysis", {}, "template_analysis"),
            ("/api/specialized-analysis", {"kind": "clinical"}, "specialized_clinical"),
            ("/api/specialized-analysis", {"kind": "regulatory"}, "specialized_regulatory"),
            ("/api/specialized-analysis", {"kind": "science"}, "specialized_science"),
        ]
        for path, extra, task_type in cases:
            body = {
                "document": stored,
                "depends_on": [visual],
                "priority": "high",
                "document_id": "acme",
                **extra,
            }
            r = c.post(path, json=body)
            assert r.status_code == 202, (path, r.text)
            assert r.json()["task_type"] == task_type and r.json()["status"] == "blocked"
            row = await db.fetchrow(
                """SELECT q.*, ARRAY(SELECT depends_on FROM processing_task_deps
                                      WHERE task_id = q.id) AS depends_on
                     FROM processing_queue q WHERE id = $1""",
                r.json()["id"],
            )
            assert row["task_type"] == task_type and row["priority"] == "high"
            assert row["document_id"] == "acme" and list(row["depends_on"]) == [visual]
            assert row["pool"] == ("visual" if task_type == "slide_feedback" else "text")
        # A URL is a valid document too (the workers download it).
        r = c.post("/api/extraction/startup_name", json={"document": "https://example.org/deck.pdf"})
        assert r.status_code == 202, r.text

        r = c.get(f"/api/tasks/{visual}")
        assert r.status_code == 200
        task = r.json()
        assert task["status"] == "queued" and task["attempts"] == 0 and task["result"] is None
        assert task["payload"] == {"document": stored, "first_page": 1, "last_page": 3}

        # Listing: by document and status, paged.
        r = c.get("/api/tasks", params={"document": "acme", "limit": 4})
        page = r.json()
        assert r.status_code == 200 and len(page["items"]) == 4 and page["next"]
        seen = [t["id"] for t in page["items"]]
        while page["next"]:
            page = c.get(page["next"]).json()
            seen += [t["id"] for t in page["items"]]
        assert len(seen) == 10 == len(set(seen)) and seen == sorted(seen)
        r = c.get("/api/tasks", params={"status": "queued"})
        assert {t["id"] for t in r.json()["items"]} == {visual, r.json()["items"][-1]["id"]}
    assert "Authorization" not in api.log() and TOKENS[0] not in api.log()


async def test_bad_input_is_a_clear_4xx_and_writes_nothing(
    api: ApiProc, db: asyncpg.Pool, stored: str
) -> None:
    bad: list[tuple[str, Any, int, str]] = [
        ("/api/visual-analysis", {"document": stored, "first_page": 0, "last_page": 2}, 422, "first_page"),
        ("/api/visual-analysis", {"document": stored, "first_page": 3, "last_page": 2}, 422, "last_page"),
        ("/api/visual-analysis", {"document": stored, "first_page": 1}, 422, "last_page"),
        ("/api/slide-feedback", {"document": stored, "pages": 3}, 422, "pages"),
        ("/api/slide-feedback", {}, 422, "document"),
        ("/api/slide-feedback", [1, 2], 422, "body"),
        ("/api/slide-feedback", {"document": "../etc/passwd"}, 422, "'..' is refused"),
        ("/api/slide-feedback", {"document": "/etc/passwd"}, 422, "absolute paths are refused"),
        ("/api/slide-feedback", {"document": "missing.pdf"}, 422, "not in the document store"),
        # Over NAME_MAX was a 503 "the database is unavailable" (schemathesis): the name's fault.
        ("/api/slide-feedback", {"document": "\u1e70\u033a" * 100}, 422, "too long"),
        ("/api/slide-feedback", {"document": stored, "depends_on": [999999]}, 422, "not found"),
        ("/api/slide-feedback", {"document": stored, "priority": "asap"}, 422, "priority"),
        ("/api/slide-feedback", {"document": "https://x.org/\u0000.pdf"}, 422, "invalid value"),
        ("/api/extraction/favourite_colour", {"document": stored}, 422, "type"),
        ("/api/specialized-analysis", {"document": stored, "kind": "astrology"}, 422, "kind"),
        ("/api/slide-feedback?wait=121", {"document": stored}, 422, "wait"),
    ]
    with api.client() as c:
        for path, body, status, words in bad:
            r = c.post(path, json=body)
            assert r.status_code == status, (path, body, r.text)
            assert words in str(r.json()["detail"]), (path, r.text)
        r = c.post("/api/slide-feedback", content=b"{not json", headers={"Content-Type": "application/json"})
        assert r.status_code == 422
        assert c.get("/api/tasks/424242").status_code == 404
        assert c.get("/api/tasks/99999999999999999999").status_code == 422
        assert c.delete("/api/tasks/424242").status_code == 404
        assert c.get("/api/decks/nope").status_code == 404
        assert c.delete("/api/decks/nope").status_code == 404
        assert c.get("/api/tasks", params={"status": "sleeping"}).status_code == 422
    assert await count(db) == 0


async def test_tokens(api: ApiProc, stored: str) -> None:
    body = {"document": stored}
    with httpx.Client(base_url=api.url) as c:
        assert c.get("/api/health").json() == {"status": "ok", "database": True, "migrations_pending": []}
        assert c.get("/openapi.json").status_code == 200 and c.get("/docs").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKENS[0]}"}):
            for method, path in (
                ("POST", "/api/slide-feedback"),
                ("GET", "/api/tasks"),
                ("GET", "/api/decks/x"),
            ):
                r = c.request(method, path, json=body, headers=headers)
                assert r.status_code == 401, (method, path, headers, r.text)
                assert r.headers["www-authenticate"] == "Bearer"
        for token in TOKENS:  # either token of the list works
            r = c.get("/api/tasks", headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 200
    log = api.log()
    assert "wrong" not in log and TOKENS[0] not in log and TOKENS[1] not in log


def test_refuses_to_start_without_a_token(db_env: dict[str, str], root: Path) -> None:
    env = api_env(db_env, root)
    env.pop("GPUSCALE_API_TOKEN")
    r = subprocess.run([GPUSCALE, "api", "--port", "0"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "GPUSCALE_API_TOKEN" in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------------------------------------ wait and cancel


async def test_wait_is_woken_by_completion_and_times_out_otherwise(
    api: ApiProc, db: asyncpg.Pool, stored: str
) -> None:
    q = Queue(db)
    with api.client() as c:
        started = time.monotonic()
        r = c.post("/api/template-analysis?wait=1", json={"document": stored})
        assert r.status_code == 202 and time.monotonic() - started >= 1.0  # held, then answered 202
        task_id = r.json()["id"]

        answer: dict[str, httpx.Response] = {}
        waiter = threading.Thread(
            target=lambda: answer.update(r=c.get(f"/api/tasks/{task_id}", params={"wait": 60})), daemon=True
        )
        waiter.start()
        # The waiter's first read marks the row to notify its finish (an UPDATE); a claim at that
        # very instant skips the locked row (SKIP LOCKED), as a worker's would: claim again.
        deadline = time.monotonic() + 10
        while not (got := await q.claim("text", "test-server", 1)):
            assert time.monotonic() < deadline, "the task never became claimable"
            await asyncio.sleep(0.05)
        assert [t.id for t in got] == [task_id]
        await asyncio.sleep(0.3)
        assert waiter.is_alive()  # still held: the task is running, not finished
        assert await q.complete(task_id, "test-server", {"sections": "ok"})
        await asyncio.to_thread(waiter.join, 30)
        assert not waiter.is_alive()
        r = answer["r"]
        assert (
            r.status_code == 200 and r.json()["status"] == "done" and r.json()["result"] == {"sections": "ok"}
        )
        # A finished task answers at once, with or without wait.
        assert c.get(f"/api/tasks/{task_id}", params={"wait": 120}).json()["status"] == "done"


async def test_cancel_a_task_and_a_deck(api: ApiProc, db: asyncpg.Pool, stored: str) -> None:
    with api.client() as c:
        first = c.post(
            "/api/visual-analysis", json={"document": stored, "first_page": 1, "last_page": 1}
        ).json()
        after = c.post("/api/slide-feedback", json={"document": stored, "depends_on": [first["id"]]}).json()
        r = c.delete(f"/api/tasks/{first['id']}")
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        dependent = c.get(f"/api/tasks/{after['id']}").json()
        assert dependent["status"] == "failed" and "cancelled" in dependent["error"]
        r = c.delete(f"/api/tasks/{first['id']}")
        assert r.status_code == 409 and "already cancelled" in r.json()["detail"]

        deck = make_deck(pages=4)
        files = {"file": ("deck.pdf", deck, "application/pdf")}
        sub = c.post("/api/decks", params={"document_id": "acme-q3"}, files=files).json()
        assert sub["document_id"] == "acme-q3"
        r = c.post("/api/decks", params={"document_id": "acme-q3"}, files=files)
        assert r.status_code == 409 and "already exists" in r.json()["detail"]
        r = c.delete(f"/api/decks/{sub['document_id']}")
        assert r.status_code == 200 and r.json()["cancelled"] == 11  # 1 page batch + 10
        assert r.json()["deck"]["status"] == "cancelled"
        assert {t["status"] for t in r.json()["deck"]["tasks"]} == {"cancelled"}
        assert c.delete(f"/api/decks/{sub['document_id']}").json()["cancelled"] == 0


# ------------------------------------------------------------------------------ decks


@pytest.fixture
def pdf_server() -> Iterator[str]:
    deck = make_deck(pages=3)

    async def serve(request: Request) -> Response:
        if request.path_params["name"] == "deck.pdf":
            return Response(deck, media_type="application/pdf")
        if request.path_params["name"] == "bounce":  # a redirect to a host that is not allowed
            return Response(
                status_code=302, headers={"Location": f"http://localhost:{request.url.port}/deck.pdf"}
            )
        return Response(b"not found", status_code=404)

    with serving_files(serve, "pdfs") as url:
        yield url


async def test_deck_limits_and_refusals_write_nothing(
    api: ApiProc, db: asyncpg.Pool, root: Path, pdf_server: str
) -> None:
    with api.client() as c:

        def upload(data: bytes, field: str = "file") -> httpx.Response:
            return c.post("/api/decks", files={field: ("deck.pdf", data, "application/pdf")})

        r = upload(b"x" * 300_000)
        assert r.status_code == 413 and "limit" in r.json()["detail"]
        r = upload(make_deck(pages=13))
        assert r.status_code == 422 and "13 pages, over the limit of 12" in r.json()["detail"], r.text
        r = upload(not_a_pdf())
        assert r.status_code == 422 and "not a PDF" in r.json()["detail"]
        r = upload(b"")
        assert r.status_code == 422 and "empty" in r.json()["detail"]
        r = upload(make_deck(pages=2), field="upload")
        assert r.status_code == 422 and "'file'" in r.json()["detail"]
        r = c.post("/api/decks", content=b"%PDF-", headers={"Content-Type": "application/pdf"})
        assert r.status_code == 415
        r = c.post("/api/decks", json={"document": "/etc/passwd"})
        assert r.status_code == 422
        r = c.post("/api/decks", json={"document": f"{pdf_server}/missing.pdf"})
        assert r.status_code == 422 and "answered 404" in r.json()["detail"]
        # Non-public addresses are refused unless GPUSCALE_DECK_URL_HOSTS names the host, redirects too.
        for url in (
            pdf_server.replace("127.0.0.1", "localhost") + "/deck.pdf",
            "http://169.254.169.254/latest/meta-data/",
            "http://[::1]:9/deck.pdf",
            f"{pdf_server}/bounce",
        ):
            r = c.post("/api/decks", json={"document": url})
            assert r.status_code == 422 and "non-public address" in r.json()["detail"], (url, r.text)
        r = c.post(
            "/api/decks?batch_pages=0", files={"file": ("d.pdf", make_deck(pages=2), "application/pdf")}
        )
        assert r.status_code == 422
        assert await count(db) == 0 and os.listdir(root) == []

        # A URL: pages counted from a download, the URL stays in the payloads.
        r = c.post("/api/decks", json={"document": f"{pdf_server}/deck.pdf"})
        assert r.status_code == 202, r.text
        assert r.json()["pages"] == 3 and r.json()["document"] == f"{pdf_server}/deck.pdf"
        assert os.listdir(root) == []


async def test_a_document_id_beyond_latin_1_is_percent_encoded_in_location(
    api: ApiProc, db: asyncpg.Pool
) -> None:
    """Schemathesis (seed 294323424610973175013320996825170225717) found a 500 here: the deck was
    queued, then the Location header could not be encoded (header values are latin-1)."""
    doc = "(df\U000e5b56'UH2\xc5\xa5\x9e"
    with api.client() as c:
        r = c.post(
            "/api/decks",
            params={"document_id": doc, "priority": "normal"},
            files={"file": ("file.pdf", make_deck(pages=1), "application/pdf")},
        )
        assert r.status_code == 202, r.text
        assert r.json()["document_id"] == doc
        location = r.headers["Location"]
        assert location.isascii() and location.startswith("/api/decks/%28df%F3%A5%AD%96")
        r = c.get(location)
        assert r.status_code == 200 and r.json()["document_id"] == doc, r.text
    assert await count(db) > 0


def _multipart(boundary: bytes, *parts: bytes, close: bool = True) -> bytes:
    body = b"".join(b"--" + boundary + b"\r\n" + part + b"\r\n" for part in parts)
    return body + (b"--" + boundary + b"--\r\n" if close else b"")


async def test_malformed_multipart_bodies_are_a_4xx_and_write_nothing(
    api: ApiProc, db: asyncpg.Pool, root: Path
) -> None:
    """Odd parts (non-ASCII or undecodable names, no name, no file, no boundary, cut short) are the
    client's fault: a documented 4xx with a detail, never a 500, and nothing queued or stored."""
    b = b"0dec6263cb34734d7be9474a2095583d"
    pdf = make_deck(pages=1)
    bodies: list[tuple[str, bytes]] = [
        (
            "multipart/form-data; boundary=" + b.decode(),
            _multipart(
                b,
                'Content-Disposition: form-data; name="\xd5\xa5\xe2"\r\n\r\n'.encode()
                + b'{"string": -0.3333333333333333}',
            ),
        ),
        (
            "multipart/form-data; boundary=" + b.decode(),
            _multipart(b, b'Content-Disposition: form-data; name="\xff\xfe\x1b\x01"\r\n\r\nnull'),
        ),
        (
            "multipart/form-data; boundary=" + b.decode(),
            _multipart(b, b"Content-Disposition: form-data\r\n\r\nx"),
        ),
        ("multipart/form-data; boundary=" + b.decode(), _multipart(b, b"Content-Type: text/plain\r\n\r\nx")),
        ("multipart/form-data; boundary=" + b.decode(), b"not multipart at all"),
        ("multipart/form-data", _multipart(b, b'Content-Disposition: form-data; name="file"\r\n\r\n' + pdf)),
        ("multipart/form-data; boundary=" + b.decode(), _multipart(b, b"no headers here")),
        (
            "multipart/form-data; boundary=" + b.decode(),
            _multipart(
                b,
                b'Content-Disposition: form-data; name="file"; filename="d.pdf"\r\n\r\n' + pdf,
                close=False,
            )[:-40],
        ),
        (
            "multipart/form-data; boundary=" + b.decode(),
            _multipart(
                b,
                *[f'Content-Disposition: form-data; name="f{i}"\r\n\r\nv'.encode() for i in range(9)],
            ),
        ),
        (
            "multipart/form-data; boundary=" + b.decode(),
            _multipart(
                b,
                b'Content-Disposition: form-data; name="file"; filename="a.pdf"\r\n\r\n' + pdf,
                b'Content-Disposition: form-data; name="file"; filename="b.pdf"\r\n\r\n' + pdf,
            ),
        ),
    ]
    with api.client() as c:
        for ctype, body in bodies:
            r = c.post("/api/decks", content=body, headers={"Content-Type": ctype})
            assert r.status_code in (400, 415, 422), (ctype, body[:120], r.status_code, r.text)
            assert r.json()["detail"], r.text
    assert await count(db) == 0 and os.listdir(root) == []
    assert "Traceback" not in api.log()


async def test_a_deck_upload_followed_to_its_results(
    start_api: Any, db_env: dict[str, str], root: Path, tmp_path: Path
) -> None:
    """Two API processes, one visual and one text worker, the Ollama stand-in; the deck is
    uploaded through one API and followed, waited on and read through the other."""
    a = start_api()
    b = start_api()
    procs: list[subprocess.Popen[bytes]] = []
    with OllamaStandin(models=["gemma3:12b"], latency_s=0.01, load_latency_s=0.05) as standin:
        worker_env = {
            **db_env,
            "OLLAMA_HOST": standin.url,
            "GPUSCALE_PDF_DPI": "40",
            "GPUSCALE_POLL_INTERVAL_S": "0.5",
            "GPUSCALE_HEARTBEAT_INTERVAL_S": "0.5",
            # The workers' mount of the store: another path to the same folder.
            "GPUSCALE_DOCUMENT_ROOT": str(tmp_path / "mnt"),
        }
        (tmp_path / "mnt").symlink_to(root)
        try:
            with a.client() as ca, b.client() as cb:
                deck = make_deck(pages=5)
                r = ca.post("/api/decks?batch_pages=2", files={"file": ("acme.pdf", deck, "application/pdf")})
                assert r.status_code == 202, r.text
                sub = r.json()
                assert set(sub) == {"document_id", "document", "pages", "task_ids"}
                assert sub["pages"] == 5 and len(sub["task_ids"]["visual_analysis"]) == 3
                assert set(sub["task_ids"]) == ALL_TYPES
                assert (root / sub["document"]).read_bytes() == deck
                assert r.headers["location"] == f"/api/decks/{sub['document_id']}"
                # The same bytes again: a second deck, the same stored file.
                again = ca.post("/api/decks", files={"file": ("copy.pdf", deck, "application/pdf")}).json()
                assert again["document"] == sub["document"] and os.listdir(root) == [sub["document"]]
                cb.delete(f"/api/decks/{again['document_id']}")

                view = cb.get(f"/api/decks/{sub['document_id']}").json()
                assert view["status"] == "queued" and view["results"] is None and len(view["tasks"]) == 13

                for pool in ("visual", "text"):
                    procs.append(
                        subprocess.Popen(
                            [GPUSCALE, "worker", "--pool", pool, "--port", "0", "--host", "127.0.0.1"],
                            env={**worker_env, "GPUSCALE_CONTAINER_ID": f"api-test-{pool}"},
                            stdout=(tmp_path / f"worker-{pool}.log").open("wb"),
                            stderr=subprocess.STDOUT,
                        )
                    )
                last = sub["task_ids"]["specialized_science"][0]
                r = cb.get(f"/api/tasks/{last}", params={"wait": 110})
                assert r.status_code == 200 and r.json()["status"] == "done", r.text
                view = ca.get(f"/api/decks/{sub['document_id']}").json()
                for _ in range(50):  # the two other specialised tasks finish around the same time
                    if view["status"] == "done":
                        break
                    r = cb.get(f"/api/tasks/{view['tasks'][-1]['id']}", params={"wait": 10})
                    view = ca.get(f"/api/decks/{sub['document_id']}").json()
                assert view["status"] == "done" and view["progress"] == 100.0, view
                results = view["results"]
                assert set(results) == ALL_TYPES
                pages = [p["page"] for batch in results["visual_analysis"] for p in batch["pages"]]
                assert pages == [1, 2, 3, 4, 5]
                assert "name" in results["startup_name_extraction"]
                assert cb.get(f"/api/decks/{sub['document_id']}").json() == view
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        for p in procs:
            assert p.returncode == 0, (tmp_path / "worker-visual.log").read_text()[-3000:]


# ------------------------------------------------------------------------------ property test


def test_schemathesis_finds_no_5xx_and_no_schema_violation(api: ApiProc, stored: str) -> None:
    """Requests generated from the service's own OpenAPI document; every answer must be below 500,
    have a documented status and match its documented schema.  Bounded: a few examples per route."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    schema = schemathesis.openapi.from_url(f"{api.url}/openapi.json")
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 12
    failures: list[str] = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=int(os.environ.get("API_FUZZ_EXAMPLES", "12")),
            deadline=None,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def run(case: Any) -> None:
            if case.query and "wait" in case.query:
                case.query["wait"] = 0  # a generated wait would hold queued tasks for up to 2 min
            response = case.call(
                base_url=api.url, headers={"Authorization": f"Bearer {TOKENS[0]}"}, timeout=30
            )
            case.validate_response(response, checks=checks)

        try:
            run()
        except Exception as exc:
            failures.append(f"{operation.label}: {exc}")
    assert not failures, "\n\n".join(failures)


async def test_a_broken_document_store_is_a_503_not_a_500(
    start_api: Any, tmp_path: Path, db: asyncpg.Pool
) -> None:
    """The shared filesystem gone wrong (here: the root is a file) is the service's trouble, said
    as such; nothing is queued."""
    (tmp_path / "not-a-dir").write_text("")
    api = start_api(GPUSCALE_DOCUMENT_ROOT=str(tmp_path / "not-a-dir" / "documents"))
    with api.client() as c:
        r = c.post("/api/decks", files={"file": ("d.pdf", make_deck(pages=2), "application/pdf")})
        assert r.status_code == 503 and "document store is unavailable" in r.json()["detail"], r.text
    assert await count(db) == 0


async def test_concurrent_submissions_of_one_document_id_make_one_deck(
    api: ApiProc, db: asyncpg.Pool
) -> None:
    """The 409 is decided inside the enqueue's transaction: racing submissions cannot both win."""
    pdf = make_deck(pages=2)
    headers = {"Authorization": f"Bearer {TOKENS[0]}"}
    async with httpx.AsyncClient(base_url=api.url, headers=headers, timeout=30) as c:
        answers = await asyncio.gather(
            *(
                c.post(
                    "/api/decks?document_id=race",
                    files={"file": ("d.pdf", pdf, "application/pdf")},
                )
                for _ in range(6)
            )
        )
    codes = sorted(r.status_code for r in answers)
    assert codes == [202] + [409] * 5, [r.text for r in answers]
    winner = next(r for r in answers if r.status_code == 202).json()
    ids = {i for ids in winner["task_ids"].values() for i in ids}
    rows = await db.fetch("SELECT id FROM processing_queue WHERE document_id = 'race'")
    assert {r["id"] for r in rows} == ids
