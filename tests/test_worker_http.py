"""The worker HTTP API over real loopback HTTP, with the Ollama stand-in behind it."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from pydantic import SecretStr

from gpuscale.common.serving import AppServer
from gpuscale.dev.standin import OllamaStandin
from gpuscale.worker.http import WorkerStatus, create_app
from gpuscale.worker.ollama_client import OllamaClient

TOKEN = "s3cret-token-value"


@pytest.fixture
def standin() -> Iterator[OllamaStandin]:
    with OllamaStandin(models=["gemma3:12b"]) as s:
        yield s


class Api:
    def __init__(self, status: WorkerStatus, token: SecretStr | None) -> None:
        self.status = status
        self.server = AppServer(create_app(status, token), name="worker-http")
        self.server.start_thread()
        self.url = f"http://127.0.0.1:{self.server.port}"

    def get(self, path: str, **kw: object) -> httpx.Response:
        return httpx.get(self.url + path, timeout=10, **kw)  # type: ignore[arg-type]

    def call(self, method: str, path: str, token: str | None = TOKEN, **kw: object) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        return httpx.request(method, self.url + path, headers=headers, timeout=10, **kw)  # type: ignore[arg-type]


@pytest.fixture
def api(standin: OllamaStandin) -> Iterator[Api]:
    status = WorkerStatus(
        pool="text",
        server_id="text-abc",
        model="gemma3:12b",
        slots=2,
        ollama=OllamaClient(standin.url, timeout_s=5),
    )
    a = Api(status, SecretStr(TOKEN))
    try:
        yield a
    finally:
        a.server.stop_thread()


def test_health_goes_from_starting_to_ready_to_draining(api: Api, standin: OllamaStandin) -> None:
    r = api.get("/api/health")
    assert r.status_code == 503
    assert (
        r.json()["status"] == "starting" and r.json()["ollama"] == "ok" and r.json()["model_loaded"] is False
    )
    httpx.post(f"{standin.url}/api/generate", json={"model": "gemma3:12b", "prompt": "", "stream": False})
    api.status.ready = True
    body = api.get("/api/health").json()
    assert body["status"] == "ready" and body["model_loaded"] is True and body["slots"] == 2
    assert api.get("/api/health").status_code == 200
    api.status.draining = True
    r = api.get("/api/health")
    assert r.status_code == 503 and r.json()["status"] == "draining"


def test_health_reports_ollama_unreachable(api: Api, standin: OllamaStandin) -> None:
    api.status.ready = True
    standin.stop()
    r = api.get("/api/health")
    assert r.status_code == 503
    assert r.json()["status"] == "ollama_unreachable" and r.json()["ollama"] == "unreachable"


def test_bench_worker_is_healthy_without_ollama() -> None:
    status = WorkerStatus(pool="bench", server_id="b", model=None, slots=4, ready=True)
    a = Api(status, None)
    try:
        r = a.get("/api/health")
        assert r.status_code == 200 and r.json()["ollama"] is None
        assert a.call("GET", "/api/models").status_code == 401  # no token configured: management is off
    finally:
        a.server.stop_thread()


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": "Bearer"},
        {"Authorization": f"Bearer {TOKEN}x"},
    ],
)
def test_model_routes_need_the_token(api: Api, headers: dict[str, str]) -> None:
    for method, path in (
        ("GET", "/api/models"),
        ("POST", "/api/models/phi4"),
        ("DELETE", "/api/models/phi4"),
    ):
        r = httpx.request(method, api.url + path, headers=headers, timeout=10)
        assert r.status_code == 401, (method, path)
        assert TOKEN not in r.text
        assert r.headers["www-authenticate"].startswith("Bearer")


def test_list_pull_delete_models(api: Api, standin: OllamaStandin) -> None:
    listed = api.call("GET", "/api/models").json()
    assert listed["pool_model"] == "gemma3:12b"
    assert [m["model"] for m in listed["models"]] == ["gemma3:12b"]
    r = api.call("POST", "/api/models/llava:13b")
    assert r.status_code == 200 and r.json() == {"model": "llava:13b", "status": "success"}
    assert "llava:13b" in standin.installed
    assert api.call("DELETE", "/api/models/llava:13b").json()["status"] == "deleted"
    assert api.call("DELETE", "/api/models/llava:13b").status_code == 404
    # The model this worker serves is protected unless forced.
    assert api.call("DELETE", "/api/models/gemma3:12b").status_code == 409
    assert api.call("DELETE", "/api/models/gemma3:12b?force=true").status_code == 200
    standin.stop()
    assert api.call("GET", "/api/models").status_code == 502


def test_metrics_are_prometheus_text(api: Api) -> None:
    r = api.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert "# TYPE gpuscale_worker_task_duration_seconds histogram" in r.text
    assert "# TYPE gpuscale_worker_tasks_total counter" in r.text


def test_health_says_when_keep_alive_unloaded_the_model(api: Api, standin: OllamaStandin) -> None:
    """Ollama unloaded the idle model: the worker still works (the next task reloads it), so 200,
    but it does not claim the model is loaded."""
    load = {"model": "gemma3:12b", "prompt": "", "stream": False}
    httpx.post(f"{standin.url}/api/generate", json=load)
    api.status.ready = True
    r = api.get("/api/health")
    assert (r.status_code, r.json()["status"], r.json()["model_loaded"]) == (200, "ready", True)
    httpx.post(f"{standin.url}/api/generate", json={**load, "keep_alive": 0})  # what expiry does
    r = api.get("/api/health")
    assert r.status_code == 200
    assert r.json()["status"] == "model_unloaded" and r.json()["model_loaded"] is False
    assert r.json()["ready"] is True
    httpx.post(f"{standin.url}/api/generate", json=load)  # the next task loads it again
    assert api.get("/api/health").json()["status"] == "ready"
