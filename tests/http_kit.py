"""A file server for the tests that fetch documents over HTTP: one handler answers ``GET /{name}``
on a loopback port, in a thread, for as long as the ``with`` block runs."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gpuscale.common.serving import AppServer


@contextmanager
def serving_files(serve: Callable[[Request], Awaitable[Response]], name: str) -> Iterator[str]:
    """serve answers every ``/{name}`` path (``request.path_params["name"]``); yields the base URL."""
    server = AppServer(Starlette(routes=[Route("/{name}", serve)]), name=name)
    server.start_thread()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.stop_thread()
