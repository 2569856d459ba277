"""Bad input is refused with one line and exit 2, before anything is started or written.

Each case runs ``gpuscale`` as a user would, in an empty working directory without
``GPUSCALE_DATABASE_URL``: a command that refuses its input must not even create the embedded
database (``.gpuscale/``) there.  The HTTP cases go through the real ASGI apps.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest
from fpdf import FPDF
from pydantic import SecretStr

from gpuscale.common.serving import AppServer
from gpuscale.common.settings import Settings
from gpuscale.controller.pools import PoolsFileError, load_pools
from gpuscale.dev.standin import OllamaStandin
from gpuscale.queue import Queue
from gpuscale.queue.deck import DeckError, count_pages, submit_deck
from gpuscale.queue.documents import DocumentStore

SECRET = "do-not-print-this-8f3a1c"


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any gpuscale or DataCrunch setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUSCALE_", "DATACRUNCH_"))}
    env.update(extra)
    return env


def gpuscale(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpuscale.cli", *args],
        env=env if env is not None else clean_env(),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_refused(r: subprocess.CompletedProcess[str], cwd: Path, *words: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert not (cwd / ".gpuscale").exists(), "an embedded database was created for bad input"


# --------------------------------------------------------------------------- 4: settings


@pytest.mark.parametrize(
    ("name", "value", "words"),
    [
        ("GPUSCALE_PROVIDER", "bogus", ("GPUSCALE_PROVIDER", "datacrunch")),
        ("GPUSCALE_HTTP_PORT", "abc", ("GPUSCALE_HTTP_PORT", "integer")),
        ("GPUSCALE_HEARTBEAT_TIMEOUT_S", "abc", ("GPUSCALE_HEARTBEAT_TIMEOUT_S", "number")),
        ("GPUSCALE_MAX_PDF_PAGES", "0", ("GPUSCALE_MAX_PDF_PAGES",)),
        ("GPUSCALE_LEADER_RENEW_DEADLINE_S", "20", ("GPUSCALE_LEADER_RENEW_DEADLINE_S", "LEASE_DURATION")),
    ],
)
def test_invalid_setting_from_env_exits_2(tmp_path: Path, name: str, value: str, words: tuple[str]) -> None:
    r = gpuscale(tmp_path, "status", env=clean_env(**{name: value}))
    assert_refused(r, tmp_path, *words)
    assert f"'{value}'" not in r.stderr


def test_invalid_setting_never_prints_a_secret(tmp_path: Path) -> None:
    # A secret that fails validation is named, never shown.
    env = clean_env(GPUSCALE_DATABASE_URL=SECRET, GPUSCALE_HTTP_PORT="x" + SECRET)
    r = gpuscale(tmp_path, "status", env=env)
    assert_refused(r, tmp_path, "GPUSCALE_HTTP_PORT")
    assert SECRET not in r.stderr + r.stdout


def test_invalid_worker_setting_exits_2(tmp_path: Path) -> None:
    env = clean_env(GPUSCALE_WORKER_PORT="abc", GPUSCALE_WORKER_TOKEN=SECRET)
    r = gpuscale(tmp_path, "worker", "--pool", "bench", env=env)
    assert_refused(r, tmp_path, "GPUSCALE_WORKER_PORT")
    assert SECRET not in r.stderr + r.stdout


# --------------------------------------------------------------------------- 5: pools file

V = "visual_container_scaling"


@pytest.mark.parametrize(
    ("doc", "words"),
    [
        (f"{V}:\n  max_replicas: 2\n  max_replicas: 200\n", ("max_replicas", "twice")),
        (f"{V}:\n  max_replicas: 2\n{V}:\n  max_replicas: 3\n", (V, "twice")),
        (f"{V}:\n  max_replicas: yes\n", ("max_replicas", "integer")),
        (f"{V}:\n  min_replicas: true\n", ("min_replicas", "integer")),
        (f"{V}:\n  price_per_hour: on\n", ("price_per_hour", "number")),
        (f"{V}: {{}}\nmonthly_budget_usd: yes\n", ("monthly_budget_usd", "number")),
        (f"{V}:\n  max_replicas: '3'\n", ("max_replicas", "integer")),
        (f"{V}:\n  deployments: [{{name: a, price_per_hour: yes}}]\n", ("deployments.0.price_per_hour",)),
        (f"{V}:\n  deployments: [{{name: a, name: b}}]\n", ("name", "twice")),
    ],
)
def test_pools_file_duplicate_keys_and_booleans_refused(tmp_path: Path, doc: str, words: tuple[str]) -> None:
    path = tmp_path / "pools.yaml"
    path.write_text(doc)
    with pytest.raises(PoolsFileError) as info:
        load_pools(path)
    for word in words:
        assert word in str(info.value)


def test_pools_file_numbers_still_accepted(tmp_path: Path) -> None:
    path = tmp_path / "pools.yaml"
    path.write_text(f"{V}:\n  max_replicas: 3\n  price_per_hour: 2\n  prewarm: no\nmonthly_budget_usd: 100\n")
    config = load_pools(path)
    assert config.pools["visual"].max_replicas == 3 and config.pools["visual"].price_per_hour == 2.0
    assert config.pools["visual"].prewarm is False and config.monthly_budget_usd == 100.0


def test_controller_refuses_duplicate_key_before_starting(tmp_path: Path) -> None:
    path = tmp_path / "pools.yaml"
    path.write_text(f"{V}:\n  max_replicas: 2\n  max_replicas: 200\n")
    r = gpuscale(tmp_path, "controller", "--pools", str(path), "--once")
    assert_refused(r, tmp_path, "max_replicas", "twice")


# --------------------------------------------------------------------------- 6, 7: enqueue


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("enqueue", "bogus_type"), ("unknown task type",)),
        (("enqueue", "noop", "--payload", "[" * 40000 + "]" * 40000), ("--payload", "nested")),
        (("enqueue", "noop", "--payload", '{"a":' * 200 + "1" + "}" * 200), ("nested",)),
        (
            ("enqueue", "noop", "--depends-on", "99999999999999999999"),
            ("--depends-on", "99999999999999999999"),
        ),
        (("enqueue", "noop", "--depends-on", "0"), ("--depends-on", "not a task id")),
        (("enqueue", "noop", "--priority", "asap"), ("priority",)),
        (("enqueue", "startup_name_extraction", "--payload", "{}"), ("document",)),
    ],
)
def test_enqueue_refuses_before_starting_a_database(
    tmp_path: Path, args: tuple[str], words: tuple[str]
) -> None:
    r = gpuscale(tmp_path, *args)
    assert_refused(r, tmp_path, *words)


async def test_depends_on_out_of_range_with_a_database(
    db_env: dict[str, str], dsn: str, tmp_path: Path
) -> None:
    r = gpuscale(tmp_path, "enqueue", "noop", "--depends-on", str(2**63), env=db_env)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM processing_queue") == 0
    finally:
        await conn.close()


# --------------------------------------------------------------------------- 8, 9: submit-deck


def _pdf(path: Path, pages: int) -> Path:
    pdf = FPDF()
    for _ in range(pages):
        pdf.add_page()
    pdf.output(str(path))
    return path


def test_submit_deck_refuses_a_fifo_without_opening_it(tmp_path: Path) -> None:
    fifo = tmp_path / "f.pdf"
    os.mkfifo(fifo)
    # Before the fix the command blocked forever in open(); the timeout turns that into a failure.
    r = gpuscale(tmp_path, "submit-deck", str(fifo))
    assert_refused(r, tmp_path, "not a regular file")


@pytest.mark.parametrize("target", ["/dev/null", "/dev/zero"])
def test_submit_deck_refuses_devices(tmp_path: Path, target: str) -> None:
    with pytest.raises(DeckError, match="not a regular file"):
        count_pages(Path(target))


def test_submit_deck_refuses_a_socket(tmp_path: Path) -> None:
    path = tmp_path / "s.pdf"
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(path))
        with pytest.raises(DeckError, match="not a regular file"):
            count_pages(path)
    finally:
        sock.close()


def test_count_pages_of_a_fifo_does_not_block(tmp_path: Path) -> None:
    fifo = tmp_path / "f.pdf"
    os.mkfifo(fifo)
    outcome: list[BaseException | int] = []

    def run() -> None:
        try:
            outcome.append(count_pages(fifo))
        except BaseException as exc:
            outcome.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout=10)
    if t.is_alive():  # unblock the stuck open() so the thread ends
        with open(fifo, "wb"):
            pass
        pytest.fail("count_pages blocked on a FIFO")
    assert isinstance(outcome[0], DeckError) and "not a regular file" in str(outcome[0])


def test_page_limit_setting_default() -> None:
    assert Settings().max_pdf_pages == 300


def test_submit_deck_page_limit_from_the_setting(tmp_path: Path) -> None:
    _pdf(tmp_path / "deck.pdf", 6)
    r = gpuscale(tmp_path, "submit-deck", "deck.pdf", env=clean_env(GPUSCALE_MAX_PDF_PAGES="5"))
    assert_refused(r, tmp_path, "6 pages", "5", "GPUSCALE_MAX_PDF_PAGES")


async def test_submit_deck_page_limit_writes_nothing(db: asyncpg.Pool, tmp_path: Path) -> None:
    path = _pdf(tmp_path / "deck.pdf", 4)
    store = DocumentStore(tmp_path / "documents")
    with pytest.raises(DeckError, match="over the limit of 3 pages"):
        await submit_deck(Queue(db), path, store=store, max_pages=3)
    assert await db.fetchval("SELECT count(*) FROM processing_queue") == 0
    assert not store.root.exists() or not any(store.root.iterdir())
    sub = await submit_deck(Queue(db), path, store=store, max_pages=4)
    assert sub.pages == 4


# --------------------------------------------------------------------------- 10: worker model names


@pytest.fixture
def worker_api() -> Iterator[tuple[str, OllamaStandin]]:
    """The worker API with the Ollama stand-in behind it; yields (url, stand-in)."""
    from gpuscale.worker.http import WorkerStatus, create_app
    from gpuscale.worker.ollama_client import OllamaClient

    with OllamaStandin(models=["gemma3:12b"]) as standin:
        status = WorkerStatus(
            pool="text",
            server_id="t",
            model="gemma3:12b",
            slots=1,
            ollama=OllamaClient(standin.url, timeout_s=5),
        )
        server = AppServer(create_app(status, SecretStr(SECRET)), name="worker-http")
        server.start_thread()
        try:
            yield f"http://127.0.0.1:{server.port}", standin
        finally:
            server.stop_thread()


@pytest.mark.parametrize(
    "raw",
    [
        "..%2F..%2Fetc",
        "../../etc",
        "a%00b",
        "gemma3:12b:extra",
        "gemma3:",
        ":12b",
        "-rf",
        "a" * 300,
        "name%20with%20space",
        "a/b/c/d",
        "%2E%2E",
    ],
)
def test_worker_model_routes_refuse_bad_names(worker_api: tuple[str, OllamaStandin], raw: str) -> None:
    url, standin = worker_api
    headers = {"Authorization": f"Bearer {SECRET}"}
    for method in ("POST", "DELETE"):
        r = httpx.request(method, f"{url}/api/models/{raw}", headers=headers, timeout=10)
        assert r.status_code in (400, 404), (method, raw, r.status_code, r.text)
        if r.status_code == 404:  # the router did not even match (a path that normalised away)
            continue
        assert "model name" in r.json()["error"]
    assert standin.calls["/api/pull"] == 0 and standin.calls["/api/delete"] == 0


@pytest.mark.parametrize("name", ["phi4", "gemma3:12b", "library/gemma3:12b", "hf.co/org/model-x:Q4_K_M"])
def test_worker_model_names_of_ollamas_form_pass(worker_api: tuple[str, OllamaStandin], name: str) -> None:
    url, standin = worker_api
    r = httpx.post(f"{url}/api/models/{name}", headers={"Authorization": f"Bearer {SECRET}"}, timeout=10)
    assert r.status_code == 200, r.text
    assert standin.calls["/api/pull"] == 1


# --------------------------------------------------------------------------- 11: controller API


async def test_controller_events_refuse_a_bad_pool_name(dsn: str) -> None:
    from gpuscale.controller.app import ControllerApp
    from gpuscale.controller.ops_api import build_app
    from gpuscale.controller.pools import PoolRules, PoolsConfig
    from gpuscale.queue.tasktypes import types_for_pool

    config = PoolsConfig(pools={"bench": PoolRules(name="bench", task_types=types_for_pool("bench"))})
    ctl = ControllerApp(Settings(provider="local"), config, dsn, http=False)
    await ctl.setup()
    try:
        transport = httpx.ASGITransport(app=build_app(ctl))
        async with httpx.AsyncClient(transport=transport, base_url="http://ctl") as client:
            for bad in ("%00", "a%00b", "x" * 200, "Visual;DROP"):
                r = await client.get(f"/api/events?pool={bad}")
                assert r.status_code == 400, (bad, r.status_code, r.text)
                assert "pool" in r.json()["error"]
            r = await client.get("/api/events?pool=bench")
            assert r.status_code == 200 and r.json() == {"events": []}
            r = await client.get("/api/events")
            assert r.status_code == 200
    finally:
        await ctl.teardown()
