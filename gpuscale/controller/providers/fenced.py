"""Every provider call behind the leader's fence (issue 10).

:class:`FencedProvider` wraps the controller's provider: before each call (observe, set_replicas,
pause, resume, and any other coroutine method a provider adds) it asks the fence — the leader
lease's ``may_act`` — and refuses with :class:`NotLeader` when this process does not lead right
now.  So a controller that lost its term, or wakes up from a freeze, makes no provider call at all,
not even a read.  ``aclose`` is not fenced: shutting down must always release what was opened.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from gpuscale.controller.metrics import LAST_PROVIDER_CALL, PROVIDER_FENCE
from gpuscale.controller.providers.base import Provider, ProviderError, ProviderState


class NotLeader(ProviderError):
    """The fence refused a provider call: this controller does not lead (now)."""


class FencedProvider:
    """A provider whose every call first passes ``may_act``."""

    def __init__(self, inner: Provider, may_act: Callable[[], Awaitable[bool]]) -> None:
        self.inner = inner
        self.name = inner.name
        self._may_act = may_act
        self.refused = 0  # calls refused by the fence (tests, logs)

    def __repr__(self) -> str:
        return f"FencedProvider({self.inner!r})"

    async def _fence(self, what: str) -> None:
        if not await self._may_act():
            self.refused += 1
            PROVIDER_FENCE.labels("refused").inc()
            raise NotLeader(f"not the leader: {what} refused")
        PROVIDER_FENCE.labels("allowed").inc()
        LAST_PROVIDER_CALL.set(time.time())

    async def observe(self, deployment: str) -> ProviderState:
        await self._fence(f"observe {deployment}")
        return await self.inner.observe(deployment)

    async def set_replicas(self, deployment: str, desired: int, *, idle: Collection[str] = ()) -> None:
        await self._fence(f"set_replicas {deployment}")
        await self.inner.set_replicas(deployment, desired, idle=idle)

    async def pause(self, deployment: str) -> None:
        await self._fence(f"pause {deployment}")
        await self.inner.pause(deployment)

    async def resume(self, deployment: str) -> None:
        await self._fence(f"resume {deployment}")
        await self.inner.resume(deployment)

    async def aclose(self) -> None:
        await self.inner.aclose()

    def __getattr__(self, name: str) -> Any:
        # Provider-specific extras (prices, pids, …): coroutine methods are fenced as well.
        attr = getattr(self.inner, name)
        if not inspect.iscoroutinefunction(attr):
            return attr

        async def fenced(*args: Any, **kwargs: Any) -> Any:
            await self._fence(name)
            return await attr(*args, **kwargs)

        return fenced
