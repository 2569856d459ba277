"""The one way gpuscale serves an ASGI app: :class:`AppServer`, uvicorn on a socket bound up front.

Every HTTP surface uses it: the worker's API, the controller's ops API, the DataCrunch emulator
and the Ollama stand-in.  Three ways to run one server:

- ``await server.start()`` / ``await server.stop()``: as a task on the running event loop (the
  worker, the controller); the caller keeps its own signal handlers (SIGTERM starts a drain);
- ``server.start_thread()`` / ``server.stop_thread()``: on a loop of its own in a daemon thread,
  so synchronous and asynchronous tests can embed it alike (the stand-in, the emulator);
- ``await server.serve()``: in the foreground until SIGINT/SIGTERM, which end in a clean shutdown
  that exits 0 (``gpuscale emulator``).

The socket is bound in the constructor, so port 0 picks a free port that is known (``.port``)
before serving starts, and a taken port fails there with the ``OSError`` that says why.
Readiness is a signal, not a poll: :attr:`AppServer.ready` is set once uvicorn accepts connections
(or once it gave up, which ``start`` reports).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
from collections.abc import Generator
from typing import Any, Literal

import uvicorn


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening, non-blocking TCP socket on ``host:port`` (0: any free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class _Uvicorn(uvicorn.Server):
    """uvicorn that reports when it is up (or gave up) and handles signals only when asked to."""

    def __init__(self, config: uvicorn.Config, *, handle_signals: bool) -> None:
        super().__init__(config)
        self.handle_signals = handle_signals
        # Set when serving, or when startup ended without serving: a threading.Event for a
        # server in a thread, an asyncio.Event (made by the caller) for one on the caller's loop.
        self.up = threading.Event()
        self.up_async: asyncio.Event | None = None

    def mark_up(self) -> None:
        self.up.set()
        if self.up_async is not None:
            self.up_async.set()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().startup(sockets=sockets)
        finally:
            self.mark_up()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # The embedding process owns SIGINT/SIGTERM (the worker drains, the controller finishes
        # its tick).  In the foreground a signal ends in a clean shutdown that exits 0, instead of
        # uvicorn re-raising it against the process once the app has stopped.
        if not self.handle_signals or threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


class AppServer:
    """One ASGI app served by uvicorn on ``host:port`` (port 0: a free one, see :attr:`port`)."""

    def __init__(
        self,
        app: Any,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        name: str = "server",
        lifespan: Literal["on", "off", "auto"] = "off",
        log_level: str | None = "warning",
        access_log: bool = False,
        **options: Any,
    ) -> None:
        """``options``: more :class:`uvicorn.Config` settings (``log_config``,
        ``timeout_graceful_shutdown``, ...)."""
        self.app = app
        self.host = host
        self.name = name
        self._config = uvicorn.Config(
            app, lifespan=lifespan, log_level=log_level, access_log=access_log, **options
        )
        self._sock: socket.socket | None = bind_socket(host, port)
        self.port: int = int(self._sock.getsockname()[1])
        self._server: _Uvicorn | None = None
        self._task: asyncio.Task[None] | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def __repr__(self) -> str:
        return f"AppServer({self.name!r}, url={self.url!r})"

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def ready(self) -> bool:
        """True once it accepts connections."""
        return self._server is not None and self._server.started

    def _new_server(self, *, handle_signals: bool = False) -> _Uvicorn:
        if self._server is not None:
            raise RuntimeError(f"{self.name} was already started")
        if self._sock is None:
            raise RuntimeError(f"{self.name} was stopped; make a new one")
        self._server = _Uvicorn(self._config, handle_signals=handle_signals)
        return self._server

    def _check_started(self, timeout_s: float) -> None:
        server = self._server
        assert server is not None
        if not server.up.is_set():
            raise TimeoutError(f"{self.name} did not start within {timeout_s:g}s")
        if not server.started:
            raise RuntimeError(f"{self.name} failed to start: {self._error!r}")

    # -------------------------------------------------------------- on the running loop

    async def start(self, timeout_s: float = 10.0) -> None:
        """Serve as a task on the running loop; returns once connections are accepted."""
        server = self._new_server()
        server.up_async = asyncio.Event()
        sock = self._sock
        assert sock is not None

        async def serve() -> None:
            try:
                await server.serve(sockets=[sock])
            except Exception as exc:  # reported by start()
                self._error = exc
            finally:
                server.mark_up()

        self._task = asyncio.create_task(serve(), name=self.name)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.up_async.wait(), timeout_s)
        self._check_started(timeout_s)

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Stop serving (open connections get ``timeout_s`` to finish) and close the socket."""
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(self._task, timeout_s)
            self._task = None
        self._close_socket()

    async def serve(self) -> None:
        """Serve in the foreground until SIGINT/SIGTERM (or :meth:`request_exit`)."""
        server = self._new_server(handle_signals=True)
        assert self._sock is not None
        try:
            with contextlib.suppress(asyncio.CancelledError):
                await server.serve(sockets=[self._sock])
        finally:
            self._close_socket()

    def request_exit(self) -> None:
        if self._server is not None:
            self._server.should_exit = True

    # -------------------------------------------------------------- in a thread

    def start_thread(self, timeout_s: float = 15.0) -> None:
        """Serve from a daemon thread on a loop of its own; returns once connections are accepted."""
        server = self._new_server()
        self._thread = threading.Thread(target=self._run_thread, name=self.name, daemon=True)
        self._thread.start()
        server.up.wait(timeout_s)
        self._check_started(timeout_s)

    def _run_thread(self) -> None:
        assert self._server is not None and self._sock is not None
        try:
            asyncio.run(self._server.serve(sockets=[self._sock]))
        except BaseException as exc:  # reported by start_thread()
            self._error = exc
        finally:
            self._server.mark_up()

    def stop_thread(self, timeout_s: float = 10.0) -> bool:
        """Stop serving; False when the thread did not end within ``timeout_s``."""
        self.request_exit()
        stopped = True
        if self._thread is not None:
            self._thread.join(timeout_s)
            stopped = not self._thread.is_alive()
            self._thread = None
        self._close_socket()
        return stopped

    def _close_socket(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
