"""The DataCrunch client and provider against respx: every endpoint and every failure path.

respx stands in for the real cloud only; the same client runs against the emulator (real HTTP) in
the contract and emulator tests.  Retry waits are recorded instead of slept, so the backoff and
``Retry-After`` handling are checked exactly without slowing the suite.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import httpx
import pytest
import respx
from prometheus_client import REGISTRY, generate_latest

from gpuscale.common.errors import ConfigError
from gpuscale.common.settings import Settings
from gpuscale.controller.providers import CapacityError, DeploymentNotFound, ProviderError, make_provider
from gpuscale.controller.providers.datacrunch import (
    ApiError,
    DataCrunchClient,
    DataCrunchProvider,
    RetryPolicy,
)

BASE = "https://dc.test.invalid/v1"
CLIENT_ID = "gpuscale-client"
SECRET = "top-secret-client-secret-42"
DEP = "deck-visual"
DEP_PATH = f"/container-deployments/{DEP}"
SCALING: dict[str, Any] = {
    "min_replica_count": 0,
    "max_replica_count": 3,
    "scale_down_policy": {"delay_seconds": 600},
    "scale_up_policy": {"delay_seconds": 120},
    "queue_message_ttl_seconds": 3600,
    "concurrent_requests_per_replica": 1,
    "scaling_triggers": {
        "queue_load": {"threshold": 1.0},
        "cpu_utilization": {"enabled": False, "threshold": None},
        "gpu_utilization": {"enabled": False, "threshold": None},
    },
}


def token(access: str = "tok-1", expires_in: float = 3600, refresh: str = "ref-1") -> httpx.Response:
    return httpx.Response(
        200,
        json={
            "access_token": access,
            "refresh_token": refresh,
            "scope": "cloud-api-v1",
            "token_type": "Bearer",
            "expires_in": expires_in,
        },
    )


def error(status: int, code: str, message: str, **headers: str) -> httpx.Response:
    return httpx.Response(status, json={"code": code, "message": message}, headers=headers)


@pytest.fixture
def api() -> Any:
    with respx.mock(base_url=BASE, assert_all_called=False) as mock:
        yield mock


@pytest.fixture
def waits() -> list[float]:
    return []


@pytest.fixture
def client(waits: list[float]) -> Any:
    async def record(seconds: float) -> None:
        waits.append(seconds)

    return DataCrunchClient(
        BASE,
        CLIENT_ID,
        SECRET,
        retry=RetryPolicy(attempts=4, initial_s=0.5, max_s=4.0, jitter_s=0.0),
        sleep=record,
    )


def bodies(route: respx.Route) -> list[dict[str, Any]]:
    return [json.loads(call.request.content) for call in route.calls]


# ---------------------------------------------------------------------- authentication


async def test_authenticates_once_and_sends_the_bearer_token(api: Any, client: DataCrunchClient) -> None:
    auth = api.post("/oauth2/token").mock(return_value=token("tok-1"))
    status = api.get(f"{DEP_PATH}/status").mock(return_value=httpx.Response(200, json={"status": "healthy"}))
    assert await client.get_status(DEP) == "healthy"
    assert await client.get_status(DEP) == "healthy"
    assert auth.call_count == 1
    assert bodies(auth) == [
        {"grant_type": "client_credentials", "client_id": CLIENT_ID, "client_secret": SECRET}
    ]
    assert all(call.request.headers["Authorization"] == "Bearer tok-1" for call in status.calls)


async def test_refreshes_the_token_before_it_expires(api: Any, client: DataCrunchClient) -> None:
    auth = api.post("/oauth2/token").mock(side_effect=[token("tok-1", expires_in=0), token("tok-2")])
    status = api.get(f"{DEP_PATH}/status").mock(return_value=httpx.Response(200, json={"status": "healthy"}))
    await client.get_status(DEP)
    await client.get_status(DEP)
    assert bodies(auth)[1] == {"grant_type": "refresh_token", "refresh_token": "ref-1"}
    assert [c.request.headers["Authorization"] for c in status.calls] == ["Bearer tok-1", "Bearer tok-2"]


async def test_a_rejected_refresh_authenticates_again(api: Any, client: DataCrunchClient) -> None:
    auth = api.post("/oauth2/token").mock(
        side_effect=[
            token("tok-1", expires_in=0),
            error(401, "unauthorized_request", "refresh expired"),
            token("tok-3"),
        ]
    )
    status = api.get(f"{DEP_PATH}/status").mock(return_value=httpx.Response(200, json={"status": "healthy"}))
    await client.get_status(DEP)
    await client.get_status(DEP)
    assert [b["grant_type"] for b in bodies(auth)] == [
        "client_credentials",
        "refresh_token",
        "client_credentials",
    ]
    assert status.calls.last.request.headers["Authorization"] == "Bearer tok-3"


async def test_a_401_reauthenticates_exactly_once(api: Any, client: DataCrunchClient) -> None:
    auth = api.post("/oauth2/token").mock(side_effect=[token("tok-1"), token("tok-2")])
    status = api.get(f"{DEP_PATH}/status").mock(
        side_effect=[
            error(401, "unauthorized_request", "expired"),
            httpx.Response(200, json={"status": "paused"}),
        ]
    )
    assert await client.get_status(DEP) == "paused"
    assert auth.call_count == 2 and status.call_count == 2
    assert status.calls.last.request.headers["Authorization"] == "Bearer tok-2"


async def test_a_persistent_401_does_not_loop(api: Any, client: DataCrunchClient) -> None:
    auth = api.post("/oauth2/token").mock(side_effect=[token("tok-1"), token("tok-2"), token("tok-3")])
    status = api.get(f"{DEP_PATH}/status").mock(return_value=error(401, "unauthorized_request", "no"))
    with pytest.raises(ProviderError, match="401"):
        await client.get_status(DEP)
    assert status.call_count == 2 and auth.call_count == 2


async def test_bad_credentials_fail_without_leaking_the_secret(
    api: Any, client: DataCrunchClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    api.post("/oauth2/token").mock(
        return_value=error(401, "unauthorized_request", "invalid client credentials")
    )
    with pytest.raises(ProviderError, match="authentication failed") as info:
        await client.get_status(DEP)
    assert SECRET not in str(info.value) and SECRET not in repr(info.value)
    assert SECRET not in caplog.text
    assert SECRET not in repr(client) and SECRET not in repr(DataCrunchProvider(client))


async def test_an_api_message_echoing_a_credential_is_scrubbed(api: Any, client: DataCrunchClient) -> None:
    api.post("/oauth2/token").mock(return_value=token("tok-secret-access"))
    api.get(f"{DEP_PATH}/status").mock(
        return_value=error(400, "invalid_request", f"bad header Bearer tok-secret-access for {SECRET}")
    )
    with pytest.raises(ProviderError) as info:
        await client.get_status(DEP)
    assert SECRET not in str(info.value) and "tok-secret-access" not in str(info.value)
    assert "***" in str(info.value)


def test_missing_credentials_are_a_config_error() -> None:
    with pytest.raises(ConfigError, match="DATACRUNCH_CLIENT_ID"):
        make_provider(
            Settings(provider="datacrunch", datacrunch_client_id=None, datacrunch_client_secret=None)
        )


# ---------------------------------------------------------------------- retries


async def test_5xx_is_retried_with_exponential_backoff(
    api: Any, client: DataCrunchClient, waits: list[float]
) -> None:
    api.post("/oauth2/token").mock(return_value=token())
    route = api.get(f"{DEP_PATH}/scaling").mock(
        side_effect=[
            error(503, "unavailable", "try later"),
            error(502, "bad_gateway", "oops"),
            error(500, "internal", "oops"),
            httpx.Response(200, json=SCALING),
        ]
    )
    assert (await client.get_scaling(DEP))["max_replica_count"] == 3
    assert route.call_count == 4
    assert waits == [0.5, 1.0, 2.0]


async def test_429_honours_retry_after(api: Any, client: DataCrunchClient, waits: list[float]) -> None:
    api.post("/oauth2/token").mock(return_value=token())
    route = api.get(f"{DEP_PATH}/status").mock(
        side_effect=[
            error(429, "too_many_requests", "slow down", **{"Retry-After": "7"}),
            error(429, "too_many_requests", "slow down"),  # no header: exponential backoff
            httpx.Response(200, json={"status": "healthy"}),
        ]
    )
    assert await client.get_status(DEP) == "healthy"
    assert route.call_count == 3
    assert waits == [7.0, 1.0]


async def test_timeouts_and_connection_errors_are_retried(
    api: Any, client: DataCrunchClient, waits: list[float]
) -> None:
    api.post("/oauth2/token").mock(return_value=token())
    route = api.get(f"{DEP_PATH}/status").mock(
        side_effect=[
            httpx.ConnectTimeout("connect timed out"),
            httpx.ReadTimeout("read timed out"),
            httpx.ConnectError("connection refused"),
            httpx.Response(200, json={"status": "healthy"}),
        ]
    )
    assert await client.get_status(DEP) == "healthy"
    assert route.call_count == 4 and len(waits) == 3


async def test_gives_up_after_the_configured_attempts(api: Any, client: DataCrunchClient) -> None:
    api.post("/oauth2/token").mock(return_value=token())
    route = api.get(f"{DEP_PATH}/status").mock(return_value=error(500, "internal", "down"))
    with pytest.raises(ProviderError, match="gave up after 4 attempts"):
        await client.get_status(DEP)
    assert route.call_count == 4


async def test_the_token_call_is_retried_too(api: Any, client: DataCrunchClient) -> None:
    auth = api.post("/oauth2/token").mock(side_effect=[httpx.ConnectError("refused"), token()])
    api.get(f"{DEP_PATH}/status").mock(return_value=httpx.Response(200, json={"status": "healthy"}))
    assert await client.get_status(DEP) == "healthy"
    assert auth.call_count == 2


@pytest.mark.parametrize(
    ("status", "code", "message"),
    [
        (400, "insufficient_resources", "No H100 GPUs are available in FIN-01"),
        (403, "quota_exceeded", "Serverless GPU quota reached"),
        (409, "conflict", "Requested capacity not available"),
    ],
)
async def test_capacity_and_quota_answers_are_typed_and_not_retried(
    api: Any, client: DataCrunchClient, status: int, code: str, message: str
) -> None:
    api.post("/oauth2/token").mock(return_value=token())
    route = api.patch(f"{DEP_PATH}/scaling").mock(return_value=error(status, code, message))
    with pytest.raises(CapacityError) as info:
        await client.patch_scaling(DEP, SCALING)
    assert info.value.message == message and info.value.code == code and info.value.status_code == status
    assert route.call_count == 1


async def test_other_4xx_are_provider_errors_and_not_retried(api: Any, client: DataCrunchClient) -> None:
    api.post("/oauth2/token").mock(return_value=token())
    route = api.patch(f"{DEP_PATH}/scaling").mock(
        return_value=error(400, "invalid_request", "min_replica_count must be >= 0")
    )
    with pytest.raises(ApiError) as info:
        await client.patch_scaling(DEP, SCALING)
    assert not isinstance(info.value, CapacityError)
    assert info.value.status_code == 400 and "min_replica_count" in str(info.value)
    assert route.call_count == 1


async def test_404_is_deployment_not_found(api: Any, client: DataCrunchClient) -> None:
    api.post("/oauth2/token").mock(return_value=token())
    api.get(DEP_PATH).mock(return_value=error(404, "not_found", "no such deployment"))
    api.get(f"{DEP_PATH}/status").mock(return_value=error(404, "not_found", "no such deployment"))
    assert await client.get_deployment(DEP) is None
    with pytest.raises(DeploymentNotFound):
        await client.get_status(DEP)


@pytest.mark.parametrize(
    ("path", "answer", "call"),
    [
        ("/status", httpx.Response(200, json={"state": "healthy"}), "get_status"),
        ("/status", httpx.Response(200, text="<html>gateway</html>"), "get_status"),
        ("/scaling", httpx.Response(200, json={"min_replica_count": "one"}), "get_scaling"),
        ("/replicas", httpx.Response(200, json={"items": []}), "get_replicas"),
        ("/replicas", httpx.Response(200, json={"list": [{"status": "running"}]}), "get_replicas"),
        ("", httpx.Response(200, json=[1, 2]), "get_deployment"),
    ],
)
async def test_answers_that_make_no_sense_are_clear_errors(
    api: Any, client: DataCrunchClient, path: str, answer: httpx.Response, call: str
) -> None:
    api.post("/oauth2/token").mock(return_value=token())
    api.get(f"{DEP_PATH}{path}").mock(return_value=answer)
    with pytest.raises(ProviderError, match=r"expected|no status|not JSON|no integer"):
        await getattr(client, call)(DEP)


async def test_invalid_deployment_names_never_reach_the_api(client: DataCrunchClient) -> None:
    with pytest.raises(ProviderError, match="invalid deployment name"):
        await client.get_status("../secrets")


# ---------------------------------------------------------------------- endpoints


@pytest.mark.parametrize(
    ("call", "args", "method", "path", "answer"),
    [
        ("list_deployments", (), "GET", "/container-deployments", []),
        ("get_deployment", (DEP,), "GET", DEP_PATH, {"name": DEP}),
        ("create_deployment", ({"name": DEP},), "POST", "/container-deployments", {"name": DEP}),
        ("update_deployment", (DEP, {"name": DEP}), "PATCH", DEP_PATH, {"name": DEP}),
        ("delete_deployment", (DEP,), "DELETE", DEP_PATH, None),
        ("get_status", (DEP,), "GET", f"{DEP_PATH}/status", {"status": "healthy"}),
        ("get_scaling", (DEP,), "GET", f"{DEP_PATH}/scaling", SCALING),
        ("patch_scaling", (DEP, SCALING), "PATCH", f"{DEP_PATH}/scaling", SCALING),
        ("get_replicas", (DEP,), "GET", f"{DEP_PATH}/replicas", {"list": []}),
        ("pause", (DEP,), "POST", f"{DEP_PATH}/pause", None),
        ("resume", (DEP,), "POST", f"{DEP_PATH}/resume", None),
        ("restart", (DEP,), "POST", f"{DEP_PATH}/restart", None),
    ],
)
async def test_every_endpoint(
    api: Any, client: DataCrunchClient, call: str, args: tuple[Any, ...], method: str, path: str, answer: Any
) -> None:
    api.post("/oauth2/token").mock(return_value=token())
    response = httpx.Response(200, json=answer) if answer is not None else httpx.Response(200)
    route = api.route(method=method, path=path).mock(return_value=response)
    await getattr(client, call)(*args)
    assert route.call_count == 1
    sent = route.calls.last.request
    assert sent.headers["Authorization"] == "Bearer tok-1"
    if method in ("POST", "PATCH") and len(args) > (0 if call == "create_deployment" else 1):
        assert json.loads(sent.content) == args[-1]


# ---------------------------------------------------------------------- the provider


def scaling(lo: int, hi: int) -> dict[str, Any]:
    return {**SCALING, "min_replica_count": lo, "max_replica_count": hi}


def mock_deployment(
    api: Any, *, lo: int, hi: int, status: str = "healthy", patch_status: int = 200
) -> dict[str, Any]:
    calls: list[str] = []

    def record(name: str, response: httpx.Response) -> Any:
        def side_effect(request: httpx.Request) -> httpx.Response:
            calls.append(name)
            return response

        return side_effect

    api.post("/oauth2/token").mock(return_value=token())
    api.get(f"{DEP_PATH}/scaling").mock(
        side_effect=record("get_scaling", httpx.Response(200, json=scaling(lo, hi)))
    )
    api.get(f"{DEP_PATH}/status").mock(
        side_effect=record("status", httpx.Response(200, json={"status": status}))
    )
    patch = (
        httpx.Response(200, json=scaling(lo, hi))
        if patch_status == 200
        else error(patch_status, "invalid_request", "min_replica_count must be at least 1")
    )
    routes = {
        "patch": api.patch(f"{DEP_PATH}/scaling").mock(side_effect=record("patch", patch)),
        "pause": api.post(f"{DEP_PATH}/pause").mock(side_effect=record("pause", httpx.Response(200))),
        "resume": api.post(f"{DEP_PATH}/resume").mock(side_effect=record("resume", httpx.Response(200))),
    }
    return {"calls": calls, **routes}


async def test_set_replicas_writes_nothing_when_already_pinned(api: Any, client: DataCrunchClient) -> None:
    m = mock_deployment(api, lo=2, hi=2)
    await DataCrunchProvider(client).set_replicas(DEP, 2, idle=["whatever"])
    assert "patch" not in m["calls"] and "pause" not in m["calls"] and "resume" not in m["calls"]


async def test_set_replicas_pins_min_and_max_keeping_everything_else(
    api: Any, client: DataCrunchClient
) -> None:
    m = mock_deployment(api, lo=0, hi=3)
    await DataCrunchProvider(client).set_replicas(DEP, 2)
    (body,) = bodies(m["patch"])
    assert body == scaling(2, 2)


async def test_zero_uses_0_0(api: Any, client: DataCrunchClient) -> None:
    m = mock_deployment(api, lo=2, hi=2)
    await DataCrunchProvider(client).set_replicas(DEP, 0)
    assert bodies(m["patch"]) == [scaling(0, 0)]
    assert m["pause"].call_count == 0


async def test_zero_falls_back_to_pause_when_refused(api: Any, client: DataCrunchClient) -> None:
    m = mock_deployment(api, lo=2, hi=2, patch_status=400)
    await DataCrunchProvider(client).set_replicas(DEP, 0)
    # 0/0 refused; 1/1 (so a later resume starts at most one replica) refused too; pause.
    assert m["calls"][-3:] == ["patch", "patch", "pause"]
    assert bodies(m["patch"]) == [scaling(0, 0), scaling(1, 1)]


async def test_refused_zero_pins_one_before_pausing(api: Any, client: DataCrunchClient) -> None:
    m = mock_deployment(api, lo=3, hi=3)
    m["patch"].mock(
        side_effect=[
            error(400, "invalid_request", "min_replica_count must be >= 1"),
            httpx.Response(200, json=scaling(1, 1)),
        ]
    )
    await DataCrunchProvider(client).set_replicas(DEP, 0)
    assert bodies(m["patch"]) == [scaling(0, 0), scaling(1, 1)]
    assert m["pause"].call_count == 1


async def test_zero_refused_in_capacity_words_still_pauses(api: Any, client: DataCrunchClient) -> None:
    m = mock_deployment(api, lo=2, hi=2)
    api.patch(f"{DEP_PATH}/scaling").mock(
        return_value=error(400, "invalid_request", "below the replica limit")
    )
    await DataCrunchProvider(client).set_replicas(DEP, 0)
    assert m["pause"].call_count == 1


async def test_scaling_up_from_paused_resumes_first(api: Any, client: DataCrunchClient) -> None:
    m = mock_deployment(api, lo=1, hi=1, status="paused")
    await DataCrunchProvider(client).set_replicas(DEP, 2)
    assert [c for c in m["calls"] if c in ("resume", "patch")] == ["resume", "patch"]
    assert bodies(m["patch"]) == [scaling(2, 2)]


async def test_paused_and_zero_writes_nothing(api: Any, client: DataCrunchClient) -> None:
    m = mock_deployment(api, lo=1, hi=1, status="paused")
    await DataCrunchProvider(client).set_replicas(DEP, 0)
    assert not {"patch", "pause", "resume"} & set(m["calls"])


async def test_capacity_errors_surface_from_set_replicas(api: Any, client: DataCrunchClient) -> None:
    mock_deployment(api, lo=0, hi=0)
    api.patch(f"{DEP_PATH}/scaling").mock(return_value=error(400, "quota_exceeded", "GPU quota reached"))
    with pytest.raises(CapacityError, match="GPU quota reached"):
        await DataCrunchProvider(client).set_replicas(DEP, 3)


async def test_pause_and_resume_are_idempotent(api: Any, client: DataCrunchClient) -> None:
    m = mock_deployment(api, lo=1, hi=1, status="paused")
    provider = DataCrunchProvider(client)
    await provider.pause(DEP)
    await provider.resume(DEP)
    assert m["pause"].call_count == 0 and m["resume"].call_count == 1


async def test_observe_reads_replicas_status_and_scaling(api: Any, client: DataCrunchClient) -> None:
    mock_deployment(api, lo=2, hi=2, status="degraded")
    api.get(f"{DEP_PATH}/replicas").mock(
        return_value=httpx.Response(
            200,
            json={
                "list": [
                    {"id": "r-1", "status": "running", "started_at": "2026-05-01T10:00:00Z"},
                    {"id": "r-2", "status": "provisioning", "started_at": None},
                    {"id": "r-3", "status": "TERMINATING", "started_at": "2026-05-01T10:00:00+00:00"},
                ]
            },
        )
    )
    provider = DataCrunchProvider(client)
    state = await provider.observe(DEP)
    assert state.target == 2 and state.status == "degraded" and not state.paused
    assert [(r.id, r.status) for r in state.replicas] == [
        ("r-1", "running"),
        ("r-2", "starting"),
        ("r-3", "stopping"),
    ]
    assert state.replicas[0].started_at == 1777629600.0
    # A replica without a start time keeps the time it was first seen, across observations.
    again = await provider.observe(DEP)
    assert again.replicas[1].started_at == state.replicas[1].started_at > 0


async def test_observe_paused(api: Any, client: DataCrunchClient) -> None:
    mock_deployment(api, lo=2, hi=2, status="paused")
    api.get(f"{DEP_PATH}/replicas").mock(return_value=httpx.Response(200, json={"list": []}))
    state = await DataCrunchProvider(client).observe(DEP)
    assert state.paused and state.target == 0 and state.status == "paused"


# ---------------------------------------------------------------------- metrics


async def test_every_call_is_counted_and_timed_without_credentials(
    api: Any, client: DataCrunchClient
) -> None:
    endpoint = "GET /container-deployments/{name}/status"

    def count(status: str) -> float:
        value = REGISTRY.get_sample_value(
            "gpuscale_provider_requests_total", {"endpoint": endpoint, "status": status}
        )
        return value or 0.0

    def timed() -> float:
        return (
            REGISTRY.get_sample_value("gpuscale_provider_request_seconds_count", {"endpoint": endpoint})
            or 0.0
        )

    ok, throttled, before = count("200"), count("429"), timed()
    api.post("/oauth2/token").mock(return_value=token("tok-metrics"))
    api.get(f"{DEP_PATH}/status").mock(
        side_effect=[error(429, "too_many_requests", "slow"), httpx.Response(200, json={"status": "healthy"})]
    )
    await client.get_status(DEP)
    assert count("200") == ok + 1 and count("429") == throttled + 1 and timed() == before + 2
    assert (
        REGISTRY.get_sample_value(
            "gpuscale_provider_requests_total", {"endpoint": "POST /oauth2/token", "status": "200"}
        )
        or 0
    ) >= 1
    exposition = generate_latest().decode()
    assert SECRET not in exposition and "tok-metrics" not in exposition and CLIENT_ID not in exposition


async def test_refused_zero_from_a_minimum_of_zero_pauses_without_starting_a_replica(
    api: Any, client: DataCrunchClient
) -> None:
    # A fresh deployment (0..6) the cloud refuses to pin at 0/0: pinning 1/1 first would start
    # (and bill) a GPU replica only to pause it.
    m = mock_deployment(api, lo=0, hi=6, patch_status=400)
    await DataCrunchProvider(client).set_replicas(DEP, 0)
    assert bodies(m["patch"]) == [scaling(0, 0)]
    assert m["pause"].call_count == 1
