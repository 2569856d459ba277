"""Running the emulator: in the foreground (``gpuscale emulator``) or embedded in a test.

`Emulator` serves on its own event loop in a background thread, so synchronous
tests (the official SDK is synchronous) and asynchronous ones (the controller) can both use it::

    with Emulator(EmulatorConfig(cold_start_s=0.2)) as emu:
        client = DataCrunchClient(emu.base_url, emu.client_id, emu.client_secret)

``stop()`` shuts the server down, which stops every replica process (SIGTERM, grace, SIGKILL).
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import urllib.request
from typing import Any

from gpuscale.common.serving import AppServer
from gpuscale.dev.emulator.app import EmulatorConfig, EmulatorState, create_app

log = logging.getLogger(__name__)


class Emulator:
    """The emulator in a background thread on ``host:port`` (port 0: any free port)."""

    def __init__(
        self, config: EmulatorConfig | None = None, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.config = config or EmulatorConfig()
        self.host = host
        self.port = port
        self.app = create_app(self.config)
        self.state: EmulatorState = self.app.state.emulator
        self._server: AppServer | None = None

    def __repr__(self) -> str:
        return f"Emulator(url={self.url!r})"

    @property
    def client_id(self) -> str:
        return self.config.client_id

    @property
    def client_secret(self) -> str:
        return self.config.client_secret

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """What ``DATACRUNCH_BASE_URL`` should be set to."""
        return f"{self.url}/v1"

    def start(self, timeout_s: float = 15.0) -> Emulator:
        if self._server is not None:
            return self
        server = AppServer(self.app, self.host, self.port, name="datacrunch-emulator", lifespan="on")
        try:
            server.start_thread(timeout_s)
        except (RuntimeError, TimeoutError):
            server.stop_thread(timeout_s=1)
            raise RuntimeError(f"the DataCrunch emulator did not start on {self.host}:{self.port}") from None
        self._server = server
        self.port = server.port
        atexit.register(self.state.kill_all)
        log.info("DataCrunch emulator on %s", self.url)
        return self

    def stop(self, timeout_s: float = 60.0) -> None:
        """Shut down; every replica gets SIGTERM, then SIGKILL after the grace period."""
        if self._server is None:
            return
        if not self._server.stop_thread(timeout_s):
            log.error("emulator did not stop in %.0fs; killing its replicas", timeout_s)
        self.state.kill_all()
        atexit.unregister(self.state.kill_all)
        self._server = None

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> Emulator:
        return await asyncio.to_thread(self.start)

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.stop)

    # ---------------------------------------------------------------- test hooks (blocking)

    def _admin(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            f"{self.url}/_emulator/{path}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            raw = response.read()
        return json.loads(raw) if raw else None

    def set_faults(self, spec: str | None = None, **values: Any) -> dict[str, Any]:
        """Merge faults (as ``POST /_emulator/faults`` does)."""
        body: dict[str, Any] = dict(values)
        if spec is not None:
            body["spec"] = spec
        result: dict[str, Any] = self._admin("POST", "faults", body)
        return result

    def clear_faults(self) -> None:
        self._admin("DELETE", "faults")

    def expire_tokens(self) -> None:
        self._admin("POST", "expire-tokens")

    def snapshot(self) -> dict[str, Any]:
        result: dict[str, Any] = self._admin("GET", "state")
        return result


async def serve_forever(config: EmulatorConfig, host: str, port: int) -> None:
    """The ``gpuscale emulator`` command: served in the foreground; SIGINT/SIGTERM stop it
    and, through the app's lifespan, every replica."""
    app = create_app(config)
    server = AppServer(
        app, host, port, name="datacrunch-emulator", lifespan="on", log_level="info", access_log=True
    )
    await server.serve()
