"""DataCrunch (Verda) container API: an async client and the ``datacrunch`` provider.

The official SDK (``verda``) is synchronous, so the controller speaks the same API with its own
httpx client: one shared connection pool, explicit timeouts, OAuth2 client credentials (refreshed
shortly before expiry, re-authenticated once on a 401, never in a loop), and tenacity retries with
exponential backoff and jitter on timeouts, connection errors, 5xx and 429 (honouring
``Retry-After``).  Capacity and quota refusals are 4xx answers that retrying will not fix: they
surface at once as :class:`CapacityError` carrying the API's message.

The provider pins the replica count (``min_replica_count = max_replica_count = desired``) because
DataCrunch's own autoscaler watches its HTTP request queue, which our workers never use.

Credentials and tokens never appear in logs, reprs, errors or metrics: the client keeps them in
``SecretStr`` and scrubs them from any message built from an API answer.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
from pydantic import SecretStr
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt
from tenacity.wait import wait_base

from gpuscale.controller.metrics import PROVIDER_REQUEST_SECONDS, PROVIDER_REQUESTS
from gpuscale.controller.providers.base import (
    REPLICA_FAILED,
    REPLICA_RUNNING,
    REPLICA_STARTING,
    REPLICA_STOPPING,
    CapacityError,
    DeploymentNotFound,
    ProviderError,
    ProviderState,
    Replica,
)

log = logging.getLogger(__name__)

TOKEN_PATH = "/oauth2/token"
DEPLOYMENTS_PATH = "/container-deployments"
CONTAINER_TYPES_PATH = "/container-types"

# Words in an error's code or message that mark a capacity / quota refusal (not retryable, but
# not our fault either: the controller holds and reports it).
_CAPACITY_WORDS = re.compile(
    r"quota|capacity|insufficient|not available|unavailable|no (gpu|resources)|limit", re.IGNORECASE
)

# DataCrunch's replica vocabulary is not documented; map the likely words onto ours.
_REPLICA_STATUS = {
    "running": REPLICA_RUNNING,
    "healthy": REPLICA_RUNNING,
    "ready": REPLICA_RUNNING,
    "starting": REPLICA_STARTING,
    "pending": REPLICA_STARTING,
    "provisioning": REPLICA_STARTING,
    "initializing": REPLICA_STARTING,
    "creating": REPLICA_STARTING,
    "image_pulling": REPLICA_STARTING,
    "pulling": REPLICA_STARTING,
    "stopping": REPLICA_STOPPING,
    "terminating": REPLICA_STOPPING,
    "shutting_down": REPLICA_STOPPING,
    "failed": REPLICA_FAILED,
    "error": REPLICA_FAILED,
    "crashed": REPLICA_FAILED,
    "unhealthy": REPLICA_FAILED,
}


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to retry transient failures; tests shrink the waits to milliseconds."""

    attempts: int = 5  # total tries per call, the first included
    initial_s: float = 0.5
    max_s: float = 20.0
    jitter_s: float = 0.5
    max_retry_after_s: float = 60.0  # never sleep longer than this on a Retry-After


class ApiError(ProviderError):
    """An error answer from the API (status, code, message), credentials already scrubbed."""

    def __init__(
        self,
        endpoint: str,
        status_code: int,
        code: str | None,
        message: str,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{endpoint}: HTTP {status_code} {code or ''}: {message}".replace("  ", " "))
        self.endpoint = endpoint
        self.status_code = status_code
        self.code = code
        self.message = message
        self.retry_after = retry_after


class _Transient(ProviderError):
    """Raised inside the retry loop for a failure worth retrying (timeouts, 5xx, 429)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class _WaitRetryAfter(wait_base):
    """Wait what the server asked for (Retry-After) when it said so, else exponential + jitter."""

    def __init__(self, policy: RetryPolicy) -> None:
        self._policy = policy

    def __call__(self, retry_state: Any) -> float:
        policy = self._policy
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            return float(min(max(retry_after, 0.0), policy.max_retry_after_s))
        backoff = policy.initial_s * 2 ** max(retry_state.attempt_number - 1, 0)
        return min(backoff, policy.max_s) + random.uniform(0.0, policy.jitter_s)


def _parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:  # the HTTP-date form
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _parse_time(value: Any) -> float | None:
    if isinstance(value, int | float):
        return float(value)
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def is_capacity_error(code: str | None, message: str) -> bool:
    return bool(_CAPACITY_WORDS.search(code or "") or _CAPACITY_WORDS.search(message or ""))


class DataCrunchClient:
    """Async client for the container-deployments part of the DataCrunch API.

    One instance holds one connection pool and one token; share it.  Every method raises
    :class:`ProviderError` (or a subclass) on failure and never leaks the credentials."""

    def __init__(
        self,
        base_url: str,
        client_id: str,
        client_secret: SecretStr | str,
        *,
        timeout_s: float = 10.0,
        retry: RetryPolicy | None = None,
        refresh_margin_s: float = 60.0,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if not client_id or not client_secret:
            raise ProviderError("DataCrunch client id and secret must both be set")
        self.base_url = base_url.rstrip("/")
        self._client_id = client_id
        self._secret = client_secret if isinstance(client_secret, SecretStr) else SecretStr(client_secret)
        self._retry = retry or RetryPolicy()
        self._refresh_margin_s = refresh_margin_s
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0)),
            limits=httpx.Limits(max_connections=20, max_keepalive_connections=10),
            headers={"User-Agent": "gpuscale", "Accept": "application/json"},
            transport=transport,
        )
        self._access: SecretStr | None = None
        self._refresh: SecretStr | None = None
        self._expires_at = 0.0
        self._auth_lock = asyncio.Lock()
        self._sleep = sleep  # the retry waits; tests record them instead of sleeping

    def __repr__(self) -> str:
        return f"DataCrunchClient(base_url={self.base_url!r})"

    async def aclose(self) -> None:
        await self._http.aclose()

    # ------------------------------------------------------------------ plumbing

    def _scrub(self, text: str) -> str:
        """Remove any credential or token from a message before it goes anywhere."""
        for secret in (self._secret, self._access, self._refresh):
            value = secret.get_secret_value() if secret else ""
            if value and len(value) >= 4:
                text = text.replace(value, "***")
        return text

    async def _send(
        self, method: str, path: str, endpoint: str, *, json: Any = None, auth: bool = True
    ) -> httpx.Response:
        """One HTTP exchange, counted in the metrics; transport failures become _Transient."""
        headers = {}
        if auth:
            assert self._access is not None
            headers["Authorization"] = f"Bearer {self._access.get_secret_value()}"
        started = time.perf_counter()
        try:
            response = await self._http.request(method, path, json=json, headers=headers)
        except httpx.TimeoutException as exc:
            PROVIDER_REQUESTS.labels(endpoint, "timeout").inc()
            raise _Transient(f"{endpoint}: timed out ({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            PROVIDER_REQUESTS.labels(endpoint, "error").inc()
            raise _Transient(f"{endpoint}: {type(exc).__name__}: {self._scrub(str(exc))}") from None
        finally:
            PROVIDER_REQUEST_SECONDS.labels(endpoint).observe(time.perf_counter() - started)
        PROVIDER_REQUESTS.labels(endpoint, str(response.status_code)).inc()
        return response

    def _error(self, endpoint: str, response: httpx.Response) -> ApiError:
        code: str | None = None
        message = ""
        try:
            body = response.json()
            if isinstance(body, dict):
                code = str(body["code"]) if body.get("code") is not None else None
                message = str(body.get("message") or "")
        except ValueError:
            message = response.text[:200]
        return ApiError(
            endpoint,
            response.status_code,
            self._scrub(code) if code else None,
            self._scrub(message) or response.reason_phrase,
            _parse_retry_after(response.headers.get("Retry-After")),
        )

    async def _retrying(self, fn: Any) -> Any:
        """Run ``fn`` with the retry policy; retries only _Transient failures."""
        policy = self._retry
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception(lambda e: isinstance(e, _Transient)),
                stop=stop_after_attempt(max(1, policy.attempts)),
                wait=_WaitRetryAfter(policy),
                sleep=self._sleep,
                reraise=True,
            ):
                with attempt:
                    result = await fn()
        except _Transient as exc:
            raise ProviderError(f"{exc} (gave up after {policy.attempts} attempts)") from None
        return result

    def _check_transient(self, endpoint: str, response: httpx.Response) -> None:
        if response.status_code == 429 or response.status_code >= 500:
            err = self._error(endpoint, response)
            log.warning("DataCrunch %s answered %s; will retry", endpoint, response.status_code)
            raise _Transient(str(err), retry_after=err.retry_after)

    # ------------------------------------------------------------------ authentication

    async def _token_call(self, body: dict[str, str]) -> httpx.Response:
        endpoint = f"POST {TOKEN_PATH}"

        async def once() -> httpx.Response:
            response = await self._send("POST", TOKEN_PATH, endpoint, json=body, auth=False)
            self._check_transient(endpoint, response)
            return response

        response: httpx.Response = await self._retrying(once)
        return response

    def _store_token(self, response: httpx.Response) -> None:
        try:
            data = response.json()
            access = str(data["access_token"])
            refresh = data.get("refresh_token")
            raw_expiry = data.get("expires_in")
            expires_in = float(3600 if raw_expiry is None else raw_expiry)
        except (ValueError, KeyError, TypeError):
            raise ProviderError(f"POST {TOKEN_PATH}: unexpected answer (no access_token)") from None
        self._access = SecretStr(access)
        self._refresh = SecretStr(str(refresh)) if refresh else None
        # Refresh shortly before expiry: a margin, but never more than a third of a short lifetime.
        margin = min(self._refresh_margin_s, expires_in / 3)
        self._expires_at = time.monotonic() + expires_in - margin

    async def _authenticate(self) -> None:
        response = await self._token_call(
            {
                "grant_type": "client_credentials",
                "client_id": self._client_id,
                "client_secret": self._secret.get_secret_value(),
            }
        )
        if response.status_code >= 400:
            err = self._error(f"POST {TOKEN_PATH}", response)
            raise ProviderError(f"DataCrunch authentication failed: HTTP {err.status_code} {err.message}")
        self._store_token(response)
        log.debug("DataCrunch: authenticated")

    async def _refresh_token(self) -> None:
        if self._refresh is None:
            await self._authenticate()
            return
        response = await self._token_call(
            {"grant_type": "refresh_token", "refresh_token": self._refresh.get_secret_value()}
        )
        if response.status_code in (400, 401):
            await self._authenticate()  # the refresh token expired too
            return
        if response.status_code >= 400:
            err = self._error(f"POST {TOKEN_PATH}", response)
            raise ProviderError(f"DataCrunch token refresh failed: HTTP {err.status_code} {err.message}")
        self._store_token(response)
        log.debug("DataCrunch: token refreshed")

    async def _ensure_token(self, *, force: bool = False, stale: SecretStr | None = None) -> None:
        async with self._auth_lock:
            if force:
                # Another call may already have re-authenticated while we waited for the lock.
                if self._access is not None and self._access is not stale:
                    return
                # The stale token stays in place until the new one arrives: a concurrent call
                # waking from a back-off must still find a token to send (and get its own 401).
                await self._authenticate()
            elif self._access is None:
                await self._authenticate()
            elif time.monotonic() >= self._expires_at:
                await self._refresh_token()

    # ------------------------------------------------------------------ requests

    async def request(self, method: str, path: str, endpoint: str, *, json: Any = None) -> Any:
        """Send one API call (token, retries, one re-auth on 401) and decode its JSON answer."""
        full_endpoint = f"{method} {endpoint}"
        await self._ensure_token()
        reauthed = False
        while True:
            token = self._access

            async def once() -> httpx.Response:
                response = await self._send(method, path, full_endpoint, json=json)
                self._check_transient(full_endpoint, response)
                return response

            response: httpx.Response = await self._retrying(once)
            if response.status_code == 401 and not reauthed:
                # The token was revoked or expired early: authenticate again, exactly once.
                reauthed = True
                log.info("DataCrunch %s answered 401; re-authenticating once", full_endpoint)
                await self._ensure_token(force=True, stale=token)
                continue
            break
        if response.status_code >= 400:
            err = self._error(full_endpoint, response)
            if response.status_code == 404:
                raise DeploymentNotFound(str(err))
            if response.status_code != 401 and is_capacity_error(err.code, err.message):
                raise CapacityError(err.message, code=err.code, status_code=err.status_code)
            raise err
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise ProviderError(f"{full_endpoint}: answer is not JSON") from None

    # ------------------------------------------------------------------ endpoints

    @staticmethod
    def _dep(name: str, suffix: str = "") -> tuple[str, str]:
        if not re.fullmatch(r"[A-Za-z0-9._~-]+", name):
            raise ProviderError(f"invalid deployment name {name!r}")
        return f"{DEPLOYMENTS_PATH}/{name}{suffix}", f"{DEPLOYMENTS_PATH}/{{name}}{suffix}"

    async def list_deployments(self) -> list[dict[str, Any]]:
        data = await self.request("GET", DEPLOYMENTS_PATH, DEPLOYMENTS_PATH)
        if not isinstance(data, list):
            raise ProviderError(f"GET {DEPLOYMENTS_PATH}: expected a list")
        return data

    async def get_deployment(self, name: str) -> dict[str, Any] | None:
        """The deployment, or None when it does not exist."""
        path, endpoint = self._dep(name)
        try:
            data = await self.request("GET", path, endpoint)
        except DeploymentNotFound:
            return None
        return _expect_dict(data, f"GET {endpoint}")

    async def create_deployment(self, deployment: Mapping[str, Any]) -> dict[str, Any]:
        data = await self.request("POST", DEPLOYMENTS_PATH, DEPLOYMENTS_PATH, json=dict(deployment))
        return _expect_dict(data, f"POST {DEPLOYMENTS_PATH}")

    async def update_deployment(self, name: str, deployment: Mapping[str, Any]) -> dict[str, Any]:
        path, endpoint = self._dep(name)
        data = await self.request("PATCH", path, endpoint, json=dict(deployment))
        return _expect_dict(data, f"PATCH {endpoint}")

    async def delete_deployment(self, name: str) -> None:
        path, endpoint = self._dep(name)
        await self.request("DELETE", path, endpoint)

    async def get_status(self, name: str) -> str:
        path, endpoint = self._dep(name, "/status")
        data = _expect_dict(await self.request("GET", path, endpoint), f"GET {endpoint}")
        status = data.get("status")
        if not isinstance(status, str):
            raise ProviderError(f"GET {endpoint}: answer has no status")
        return status

    async def get_scaling(self, name: str) -> dict[str, Any]:
        path, endpoint = self._dep(name, "/scaling")
        data = _expect_dict(await self.request("GET", path, endpoint), f"GET {endpoint}")
        for key in ("min_replica_count", "max_replica_count"):
            if not isinstance(data.get(key), int):
                raise ProviderError(f"GET {endpoint}: answer has no integer {key}")
        return data

    async def patch_scaling(self, name: str, scaling: Mapping[str, Any]) -> dict[str, Any]:
        path, endpoint = self._dep(name, "/scaling")
        return _expect_dict(
            await self.request("PATCH", path, endpoint, json=dict(scaling)), f"PATCH {endpoint}"
        )

    async def get_replicas(self, name: str) -> list[dict[str, Any]]:
        path, endpoint = self._dep(name, "/replicas")
        data = _expect_dict(await self.request("GET", path, endpoint), f"GET {endpoint}")
        replicas = data.get("list")
        if not isinstance(replicas, list) or not all(isinstance(r, dict) and "id" in r for r in replicas):
            raise ProviderError(f"GET {endpoint}: expected {{'list': [{{'id', 'status', 'started_at'}}]}}")
        return replicas

    async def pause(self, name: str) -> None:
        path, endpoint = self._dep(name, "/pause")
        await self.request("POST", path, endpoint)

    async def resume(self, name: str) -> None:
        path, endpoint = self._dep(name, "/resume")
        await self.request("POST", path, endpoint)

    async def restart(self, name: str) -> None:
        path, endpoint = self._dep(name, "/restart")
        await self.request("POST", path, endpoint)

    async def get_container_types(self, currency: str = "usd") -> list[dict[str, Any]]:
        """``GET /container-types?currency=…``: per GPU type, on-demand and spot prices."""
        if not re.fullmatch(r"[a-z]{3}", currency):
            raise ProviderError(f"invalid currency {currency!r}")
        data = await self.request("GET", f"{CONTAINER_TYPES_PATH}?currency={currency}", CONTAINER_TYPES_PATH)
        if not isinstance(data, list):
            raise ProviderError(f"GET {CONTAINER_TYPES_PATH}: expected a list")
        return data


def _expect_dict(data: Any, what: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ProviderError(f"{what}: expected a JSON object, got {type(data).__name__}")
    return data


class DataCrunchProvider:
    """The ``datacrunch`` provider: pins each deployment's replica count through the API."""

    name = "datacrunch"

    def __init__(self, client: DataCrunchClient) -> None:
        self.client = client
        # Replicas reported without a start time get the time we first saw them, so a
        # startup timeout measured from ``started_at`` still fires.
        self._first_seen: dict[str, float] = {}

    def __repr__(self) -> str:
        return f"DataCrunchProvider({self.client!r})"

    async def observe(self, deployment: str) -> ProviderState:
        raw_replicas, status, scaling = await asyncio.gather(
            self.client.get_replicas(deployment),
            self.client.get_status(deployment),
            self.client.get_scaling(deployment),
        )
        now = time.time()
        replicas = []
        seen = set()
        for item in raw_replicas:
            rid = str(item["id"])
            seen.add(rid)
            started = _parse_time(item.get("started_at"))
            if started is None:
                started = self._first_seen.setdefault(rid, now)
            raw_status = str(item.get("status") or "").lower()
            replicas.append(Replica(rid, _REPLICA_STATUS.get(raw_status, raw_status or "unknown"), started))
        for rid in set(self._first_seen) - seen:
            del self._first_seen[rid]
        paused = status == "paused"
        pinned = paused or scaling["min_replica_count"] == scaling["max_replica_count"]
        # Not pinned (min < max, e.g. a fresh deployment): the cloud's own autoscaler decides, so
        # the count is what runs now; the controller pins it on its next action.
        target = 0 if paused else int(scaling["min_replica_count"]) if pinned else len(replicas)
        return ProviderState(replicas=replicas, target=target, paused=paused, status=status, pinned=pinned)

    async def set_replicas(self, deployment: str, desired: int, *, idle: Collection[str] = ()) -> None:
        # ``idle`` is ignored: DataCrunch picks which replica to stop; workers drain on SIGTERM.
        if desired < 0:
            raise ValueError("desired replica count must be >= 0")
        scaling, status = await asyncio.gather(
            self.client.get_scaling(deployment), self.client.get_status(deployment)
        )
        paused = status == "paused"
        pinned = scaling["min_replica_count"] == scaling["max_replica_count"] == desired
        if desired == 0:
            if paused or pinned:
                return
            try:
                await self.client.patch_scaling(deployment, _pin(scaling, 0))
            except (ApiError, CapacityError) as exc:
                # Any refusal of 0/0 (a 4xx, whatever its wording) means: pause instead.
                if not 400 <= (exc.status_code or 0) < 500:
                    raise
                log.info("DataCrunch refused 0/0 for %s (%s); pausing instead", deployment, exc.message)
                await self._pin_one_then_pause(deployment, scaling)
            return
        if paused:
            await self.client.resume(deployment)
        if not pinned:
            await self.client.patch_scaling(deployment, _pin(scaling, desired))

    async def _pin_one_then_pause(self, deployment: str, scaling: Mapping[str, Any]) -> None:
        """Pause, after pinning 1/1 when the minimum is higher: ``resume`` then restarts at most
        one replica, so scaling up again after it never starts more than asked for and cut back.
        With a minimum of 0 or 1 pinning first would only start (and bill) a replica to pause it."""
        if scaling["min_replica_count"] > 1:
            try:
                await self.client.patch_scaling(deployment, _pin(scaling, 1))
            except (ApiError, CapacityError) as exc:
                log.info("DataCrunch refused 1/1 for %s too (%s)", deployment, exc)
        await self.client.pause(deployment)

    async def deployment_prices(self, deployments: Collection[str]) -> dict[str, float]:
        """Price per hour of each deployment from the API: its compute type and is_spot, priced
        by ``GET /container-types``.  Deployments the API cannot price are left out."""
        from gpuscale.controller.prices import deployment_price, parse_container_types

        types = parse_container_types(await self.client.get_container_types())
        out: dict[str, float] = {}
        for name in deployments:
            dep = await self.client.get_deployment(name)
            price = deployment_price(types, dep) if dep is not None else None
            if price is not None:
                out[name] = price
        return out

    async def pause(self, deployment: str) -> None:
        if await self.client.get_status(deployment) != "paused":
            await self.client.pause(deployment)

    async def resume(self, deployment: str) -> None:
        if await self.client.get_status(deployment) == "paused":
            await self.client.resume(deployment)

    async def aclose(self) -> None:
        await self.client.aclose()


def _pin(scaling: Mapping[str, Any], count: int) -> dict[str, Any]:
    """The scaling options as read, with min = max = count (everything else kept)."""
    pinned = dict(scaling)
    pinned["min_replica_count"] = count
    pinned["max_replica_count"] = count
    return pinned
