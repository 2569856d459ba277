"""Serving a Starlette app with uvicorn inside an existing asyncio loop or a background thread.

uvicorn's ``Server.serve`` installs its own SIGINT/SIGTERM handlers; the worker must keep its own
(SIGTERM starts a drain), so :class:`EmbeddedServer` leaves signals alone.  Port 0 picks a free
port: the socket is bound here first so the chosen port is known before serving starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Generator
from typing import Any

import uvicorn


class EmbeddedServer(uvicorn.Server):
    """A uvicorn server that does not touch signal handlers."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.setblocking(False)
    return sock


class BackgroundServer:
    """Serve an ASGI app from a daemon thread with its own loop: ``start()`` / ``stop()``.

    Used by the Ollama stand-in so synchronous and asynchronous tests can embed it alike.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, *, name: str = "server") -> None:
        self.app = app
        self.host = host
        self.name = name
        self._sock = bind_socket(host, port)
        self.port: int = self._sock.getsockname()[1]
        self._server: EmbeddedServer | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self, timeout_s: float = 10.0) -> None:
        config = uvicorn.Config(self.app, log_level="warning", lifespan="off", access_log=False)
        self._server = EmbeddedServer(config)
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        deadline = timeout_s
        step = 0.01
        while not self._server.started:
            if self._error is not None or not self._thread.is_alive():
                raise RuntimeError(f"{self.name} failed to start: {self._error!r}")
            if deadline <= 0:
                raise TimeoutError(f"{self.name} did not start within {timeout_s}s")
            threading.Event().wait(step)
            deadline -= step

    def _run(self) -> None:
        assert self._server is not None
        try:
            asyncio.run(self._server.serve(sockets=[self._sock]))
        except BaseException as exc:  # reported by start()
            self._error = exc

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        self._sock.close()
