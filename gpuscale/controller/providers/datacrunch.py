"""DataCrunch (Verda) container API: an async client and the ``datacrunch`` provider.

The official SDK (``verda``) is synchronous, so the controller speaks the same API with its own
httpx client: one shared connection pool, explicit timeouts, OAuth2 client credentials (refreshed
shortly before expiry, re-authenticated once on a 401, never in a loop), and tenacity retries with
exponential backoff and jitter on timeouts, connection errors, 5xx and 429 (honouring
``Retry-After``).  Capacity and quota refusals are 4xx answers that retrying will not fix: they
surface at once as :class:`CapacityError` carrying the API's message.

The provider pins the replica count (``min_replica_count = max_replica_count = desired``) because
DataCrunch's own autoscaler watches its HTTP request queue, which our workers never use.
DataCrunch also picks which replica a lowered count stops; a deployment applied with
``_replica_slots: N`` is N one-replica deployments ``NAME-r00`` … that the provider shows and
drives as one, stopping exactly the idle replica the controller names (see
:class:`DataCrunchProvider`).

Credentials and tokens never appear in logs, reprs, errors or metrics: the client keeps them in
``SecretStr`` and scrubs them from any message built from an API answer.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import re
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

import httpx
from pydantic import SecretStr
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt
from tenacity.wait import wait_base

from gpuscale.controller.deployspec import parse_slot_name
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
_T = TypeVar("_T")

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


# A slot set to 0 this long ago is not the first one picked to start a replica again.
_RECENT_STOP_S = 600.0

# Slot statuses, worst first: a slotted deployment reports the worst of its active slots'.
_STATUS_RANK = ("quota_reached", "error", "failed", "unhealthy", "degraded", "initializing", "starting")


@dataclass(frozen=True)
class _Slot:
    """One slot of a slotted deployment, as ``GET /container-deployments`` listed it."""

    name: str
    index: int
    min: int
    max: int


@dataclass(frozen=True)
class _Listing:
    """One read of ``GET /container-deployments``: the plain names, and the slots by logical name."""

    names: frozenset[str]
    slots: Mapping[str, tuple[_Slot, ...]]
    bodies: Mapping[str, Mapping[str, Any]]


def _listing(items: list[dict[str, Any]]) -> _Listing:
    names: set[str] = set()
    slots: dict[str, list[_Slot]] = {}
    bodies: dict[str, Mapping[str, Any]] = {}
    for item in items:
        name = item.get("name")
        if not isinstance(name, str):
            continue
        names.add(name)
        bodies[name] = item
        parsed = parse_slot_name(name)
        raw_scaling = item.get("scaling")
        scaling: dict[str, Any] = raw_scaling if isinstance(raw_scaling, dict) else {}
        if parsed is not None:
            lo, hi = scaling.get("min_replica_count"), scaling.get("max_replica_count")
            slots.setdefault(parsed[0], []).append(
                _Slot(name, parsed[1], lo if isinstance(lo, int) else 0, hi if isinstance(hi, int) else 0)
            )
    return _Listing(
        frozenset(names), {b: tuple(sorted(v, key=lambda s: s.index)) for b, v in slots.items()}, bodies
    )


class DataCrunchProvider:
    """The ``datacrunch`` provider: pins each deployment's replica count through the API.

    **Slots.**  DataCrunch picks which replica a lowered count stops, so a plain deployment cannot
    stop the idle replica the controller names (its state says ``stops_named=False``).  A logical
    deployment NAME applied with ``_replica_slots: N`` exists as N deployments NAME-r00 … of one
    replica each (see :mod:`gpuscale.controller.deployspec`); the provider shows them as one:
    ``observe(NAME)`` merges the slots' replicas, ``set_replicas(NAME, n, idle=…)`` stops exactly
    the slots of the idle replicas (then the newest) by pinning them 0/0 (or pausing them where
    0/0 is refused) and starts free slots (lowest index first) by pinning them 1/1.  A name is
    taken as slotted when it has no plain deployment of its own (a 404) and its slots are listed
    by ``GET /container-deployments``; that list is read once for all the deployments observed
    side by side (shared for ``list_ttl_s``), and only the slots that are pinned to a replica, or
    had one when last read, cost their replicas and status calls.
    """

    name = "datacrunch"

    def __init__(self, client: DataCrunchClient, *, list_ttl_s: float = 1.0) -> None:
        self.client = client
        # Replicas reported without a start time get the time we first saw them, so a
        # startup timeout measured from ``started_at`` still fires (per deployment).
        self._first_seen: dict[str, dict[str, float]] = {}
        self._list_ttl_s = list_ttl_s
        self._listed: _Listing | None = None
        self._listed_at = -math.inf
        self._list_task: asyncio.Future[_Listing] | None = None
        # Bumped by every change of the slots' pins: a list read that began before a change must
        # neither be joined nor cached after it (it would show the pins as they were).
        self._list_generation = 0
        self._stopped_at: dict[str, float] = {}  # slot → when set_replicas last set it to 0
        self._unmatched_warned: set[str] = set()
        self._slotted: set[str] = set()  # logical names known to be realised as slots
        self._slot_replicas: dict[str, list[Replica]] = {}  # per slot, its replicas as last read
        self._slot_status: dict[str, str] = {}  # per slot, its status as last read or left
        self._parked: set[str] = set()  # slots paused by set_replicas where 0/0 was refused
        self._over_warned: set[str] = set()

    def __repr__(self) -> str:
        return f"DataCrunchProvider({self.client!r})"

    # ------------------------------------------------------------------ which kind of name

    async def _list(self) -> _Listing:
        """The deployments as listed at most ``list_ttl_s`` ago; concurrent callers share one call."""
        if self._listed is not None and time.monotonic() - self._listed_at < self._list_ttl_s:
            return self._listed
        task = self._list_task
        if task is None or task.done():
            task = self._list_task = asyncio.ensure_future(self._fetch_list())
        return await asyncio.shield(task)

    async def _fetch_list(self) -> _Listing:
        at, generation = time.monotonic(), self._list_generation
        listed = _listing(await self.client.list_deployments())
        if generation == self._list_generation:
            self._listed, self._listed_at = listed, at
        return listed

    def _pins_changed(self) -> None:
        self._list_generation += 1
        self._listed, self._list_task = None, None

    async def _slots_of(self, name: str) -> tuple[_Slot, ...] | None:
        """The slots of ``name`` when it is known to be slotted (and still is), else None."""
        if name not in self._slotted:
            return None
        listed = await self._list()
        slots = listed.slots.get(name)
        if slots and name not in listed.names:
            return slots
        self._slotted.discard(name)
        return None

    async def _discover(self, name: str) -> tuple[_Slot, ...] | None:
        """After a 404 for ``name``: its slots, when the list has them."""
        listed = await self._list()
        slots = listed.slots.get(name)
        if not slots or name in listed.names:
            return None
        if name not in self._slotted:
            self._slotted.add(name)
            log.info("DataCrunch: %s is %d slot deployment(s) %s …", name, len(slots), slots[0].name)
        return slots

    # ------------------------------------------------------------------ observe

    def _replicas(self, deployment: str, raw_replicas: list[dict[str, Any]], now: float) -> list[Replica]:
        first_seen = self._first_seen.setdefault(deployment, {})
        replicas = []
        seen = set()
        for item in raw_replicas:
            rid = str(item["id"])
            seen.add(rid)
            started = _parse_time(item.get("started_at"))
            if started is None:
                started = first_seen.setdefault(rid, now)
            raw_status = str(item.get("status") or "").lower()
            replicas.append(Replica(rid, _REPLICA_STATUS.get(raw_status, raw_status or "unknown"), started))
        for rid in set(first_seen) - seen:
            del first_seen[rid]
        return replicas

    async def _plain_or_slots(
        self,
        deployment: str,
        plain: Callable[[str], Awaitable[_T]],
        slotted: Callable[[tuple[_Slot, ...]], Awaitable[_T]],
    ) -> _T:
        """``plain(deployment)``, or ``slotted(its slots)`` when it is realised as slots: known
        ones at once, otherwise found after the plain call's 404."""
        slots = await self._slots_of(deployment)
        if slots is None:
            try:
                return await plain(deployment)
            except DeploymentNotFound:
                slots = await self._discover(deployment)
                if slots is None:
                    raise
        return await slotted(slots)

    async def observe(self, deployment: str) -> ProviderState:
        return await self._plain_or_slots(deployment, self._observe_plain, self._observe_slots)

    async def _observe_plain(self, deployment: str) -> ProviderState:
        raw_replicas, status, scaling = await asyncio.gather(
            self.client.get_replicas(deployment),
            self.client.get_status(deployment),
            self.client.get_scaling(deployment),
        )
        replicas = self._replicas(deployment, raw_replicas, time.time())
        paused = status == "paused"
        pinned = paused or scaling["min_replica_count"] == scaling["max_replica_count"]
        # Not pinned (min < max, e.g. a fresh deployment): the cloud's own autoscaler decides, so
        # the count is what runs now; the controller pins it on its next action.
        target = 0 if paused else int(scaling["min_replica_count"]) if pinned else len(replicas)
        # DataCrunch chooses which replica a lower count stops: not the one the controller names.
        return ProviderState(
            replicas=replicas, target=target, paused=paused, status=status, pinned=pinned, stops_named=False
        )

    def _paused(self, slot: _Slot) -> bool:
        return self._slot_status.get(slot.name) == "paused"

    def _worth_reading(self, slot: _Slot) -> bool:
        # A slot pinned to a replica, or one that had replicas (one set to 0 may still show its
        # replica stopping); a slot known paused with nothing left costs no call.
        return bool(self._slot_replicas.get(slot.name)) or (slot.min >= 1 and not self._paused(slot))

    async def _read_slot(self, slot: str) -> tuple[list[dict[str, Any]], str] | None:
        try:
            raw, status = await asyncio.gather(self.client.get_replicas(slot), self.client.get_status(slot))
        except DeploymentNotFound:
            return None  # deleted since it was listed
        return raw, status

    async def _observe_slots(self, slots: tuple[_Slot, ...]) -> ProviderState:
        read = [s for s in slots if self._worth_reading(s)]
        results = await asyncio.gather(*(self._read_slot(s.name) for s in read))
        now = time.time()
        statuses: dict[str, str] = {}
        for slot, res in zip(read, results, strict=True):
            if res is None:
                self._slot_replicas.pop(slot.name, None)
                continue
            raw, status = res
            self._slot_status[slot.name] = status
            statuses[slot.name] = status
            self._slot_replicas[slot.name] = self._replicas(slot.name, raw, now)
        for slot in slots:
            if slot not in read:
                self._slot_replicas.pop(slot.name, None)
                self._first_seen.pop(slot.name, None)
        replicas = [r for s in slots for r in self._slot_replicas.get(s.name, ())]
        active = [s for s in slots if s.min >= 1 and not self._paused(s)]
        paused = all(self._paused(s) for s in slots)
        asked = [statuses.get(s.name, "") for s in active]
        worst = [st for st in _STATUS_RANK if st in asked]
        others = [st for st in asked if st and st not in ("healthy", "paused") and st not in _STATUS_RANK]
        status = "paused" if paused else (worst or others or ["healthy"])[0]
        return ProviderState(
            replicas=replicas,
            target=len(active),
            paused=paused,
            status=status,
            # 1/1 or 0/0 only: a slot pinned to 2/2 by hand runs two replicas, and the next
            # set_replicas puts it back to one.
            pinned=all((s.min, s.max) in ((0, 0), (1, 1)) or self._paused(s) for s in slots),
            stops_named=True,
        )

    # ------------------------------------------------------------------ set the count

    async def set_replicas(self, deployment: str, desired: int, *, idle: Collection[str] = ()) -> None:
        # A plain deployment ignores ``idle`` (DataCrunch picks which replica to stop; workers
        # drain on SIGTERM); a slotted one stops the idle replicas' slots.
        if desired < 0:
            raise ValueError("desired replica count must be >= 0")

        async def plain(name: str) -> None:
            await self._set_plain(name, desired)

        async def slotted(slots: tuple[_Slot, ...]) -> None:
            await self._set_slots(deployment, slots, desired, idle)

        await self._plain_or_slots(deployment, plain, slotted)

    async def _set_slots(
        self, deployment: str, slots: tuple[_Slot, ...], desired: int, idle: Collection[str]
    ) -> None:
        from gpuscale.controller.providers.pinned import choose_victims

        # Pinned to a replica but never read by this process (a new leader): is it paused?
        unread = [s for s in slots if s.min >= 1 and s.name not in self._slot_status]
        for slot, status in zip(
            unread, await asyncio.gather(*(self.client.get_status(s.name) for s in unread)), strict=True
        ):
            self._slot_status[slot.name] = status
        active = [s for s in slots if s.min >= 1 and not self._paused(s)]
        want: dict[str, int] = {}  # slot → 0 or 1, only where something must change
        if desired < len(active):
            owner = {r.id: s.name for s in active for r in self._slot_replicas.get(s.name, ())}
            live = [
                (
                    s.name,
                    # A slot whose replica has not shown yet is the newest: stopping it is cheapest.
                    min((r.started_at for r in self._slot_replicas.get(s.name, ())), default=math.inf),
                )
                for s in active
            ]
            idle_slots = {owner[rid] for rid in idle if rid in owner}
            if idle and not idle_slots and deployment not in self._unmatched_warned:
                # The registry's container ids are not this deployment's replica ids (a worker
                # registers its hostname unless GPUSCALE_CONTAINER_ID says otherwise): the
                # newest slot goes instead of the idle one, which may stop a busy replica.
                self._unmatched_warned.add(deployment)
                log.warning(
                    "DataCrunch: none of the idle replicas named for %s (%s) is one of its slots' "
                    "replicas: stopping the newest instead",
                    deployment,
                    ", ".join(sorted(idle)[:3]),
                )
            for name in choose_victims(live, len(active) - desired, idle_slots):
                want[name] = 0
                self._stopped_at[name] = time.monotonic()
        elif desired > len(active):
            # Free slots, lowest index first, but not one set to 0 in the last few minutes while
            # another will do: a replacement stops a stuck replica and asks for one more in the
            # same tick, and pinning that slot 1/1 again would simply keep the stuck replica.
            now = time.monotonic()

            def recently_stopped(slot: _Slot) -> float:
                at = self._stopped_at.get(slot.name, -math.inf)
                return at if now - at < _RECENT_STOP_S else -math.inf

            free = sorted(
                (s for s in slots if s not in active),
                key=lambda s: (bool(self._slot_replicas.get(s.name)), recently_stopped(s), s.index),
            )
            if desired > len(slots) and deployment not in self._over_warned:
                self._over_warned.add(deployment)
                log.warning(
                    "DataCrunch: %s has %d replica slot(s) and %d replicas were asked for; running "
                    "%d (raise _replica_slots in its spec and re-run gpuscale deploy apply)",
                    deployment,
                    len(slots),
                    desired,
                    len(slots),
                )
            for slot in free[: desired - len(active)]:
                want[slot.name] = 1
        for slot in slots:
            if slot.name in want:
                continue
            if slot in active and (slot.min, slot.max) != (1, 1):
                want[slot.name] = 1  # pinned to more than one, or not pinned: back to one
            elif slot not in active and slot.min != slot.max and not self._paused(slot):
                want[slot.name] = 0  # fresh (0/1): pinned, so DataCrunch's autoscaler stays out
        if not want:
            return
        log.info(
            "DataCrunch: %s to %d: %s",
            deployment,
            desired,
            ", ".join(f"{n} -> {c}" for n, c in sorted(want.items())),
        )
        # Side by side; a list read begun before or during the writes is not used after them.
        self._pins_changed()
        results = await asyncio.gather(
            *(self._set_slot(n, c) for n, c in sorted(want.items(), key=lambda i: -i[1])),
            return_exceptions=True,
        )
        self._pins_changed()
        for res in results:
            if isinstance(res, BaseException):
                raise res

    async def _set_slot(self, slot: str, count: int) -> None:
        paused = await self._set_plain(slot, count)
        self._slot_status[slot] = (
            "paused" if paused else self._slot_status.get(slot, "") if count == 0 else ""
        )
        if count:
            self._parked.discard(slot)

    async def _set_plain(self, deployment: str, desired: int) -> bool:
        """Pin one DataCrunch deployment at ``desired``: 0/0, or pause where 0/0 is refused;
        resume before pinning more.  Returns whether it is paused afterwards."""
        scaling, status = await asyncio.gather(
            self.client.get_scaling(deployment), self.client.get_status(deployment)
        )
        paused = status == "paused"
        pinned = scaling["min_replica_count"] == scaling["max_replica_count"] == desired
        if desired == 0:
            if paused or pinned:
                return paused
            try:
                await self.client.patch_scaling(deployment, _pin(scaling, 0))
            except (ApiError, CapacityError) as exc:
                # Any refusal of 0/0 (a 4xx, whatever its wording) means: pause instead.
                if not 400 <= (exc.status_code or 0) < 500:
                    raise
                log.info("DataCrunch refused 0/0 for %s (%s); pausing instead", deployment, exc.message)
                await self._pin_one_then_pause(deployment, scaling)
                self._parked.add(deployment)
                return True
            return False
        if paused:
            await self.client.resume(deployment)
        if not pinned:
            await self.client.patch_scaling(deployment, _pin(scaling, desired))
        return False

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
        by ``GET /container-types`` (a slotted deployment: its slots').  Deployments the API
        cannot price are left out."""
        from gpuscale.controller.prices import deployment_price, parse_container_types

        types = parse_container_types(await self.client.get_container_types())
        out: dict[str, float] = {}
        for name in deployments:
            slots = await self._slots_of(name)
            dep: Mapping[str, Any] | None = None if slots else await self.client.get_deployment(name)
            if dep is None:
                slots = slots or await self._discover(name)
                dep = (await self._list()).bodies.get(slots[0].name) if slots else None
            price = deployment_price(types, dict(dep)) if dep is not None else None
            if price is not None:
                out[name] = price
        return out

    async def _names(
        self, deployment: str, one: Callable[[str], Awaitable[None]], *, skip: Collection[str] = ()
    ) -> None:
        """``one`` on the deployment, or on each of its slots (but ``skip``) when it is slotted."""

        async def each(slots: tuple[_Slot, ...]) -> None:
            await asyncio.gather(*(one(s.name) for s in slots if s.name not in skip))

        await self._plain_or_slots(deployment, one, each)

    async def pause(self, deployment: str) -> None:
        await self._names(deployment, self._pause_one)

    async def _pause_one(self, deployment: str) -> None:
        if await self.client.get_status(deployment) != "paused":
            await self.client.pause(deployment)
        self._slot_status[deployment] = "paused"

    async def resume(self, deployment: str) -> None:
        # Slots paused by set_replicas in place of 0/0 stay stopped: resuming them would start
        # replicas the controller set to none.
        await self._names(deployment, self._resume_one, skip=set(self._parked))

    async def _resume_one(self, deployment: str) -> None:
        if await self.client.get_status(deployment) == "paused":
            await self.client.resume(deployment)
        self._slot_status.pop(deployment, None)

    async def aclose(self) -> None:
        await self.client.aclose()


def _pin(scaling: Mapping[str, Any], count: int) -> dict[str, Any]:
    """The scaling options as read, with min = max = count (everything else kept)."""
    pinned = dict(scaling)
    pinned["min_replica_count"] = count
    pinned["max_replica_count"] = count
    return pinned
