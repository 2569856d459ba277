"""``gpuscale api``: serve the HTTP task API (see :mod:`gpuscale.api`)."""

from __future__ import annotations

import typer

from gpuscale.cli.errors import fail


def api(
    host: str = typer.Option(
        None, "--host", help="Address to listen on (default GPUSCALE_API_HOST, 127.0.0.1)."
    ),
    port: int = typer.Option(
        None, "--port", min=0, max=65535, help="Port (default GPUSCALE_API_PORT, 8080; 0 picks a free one)."
    ),
) -> None:
    """Serve the task API: the PRD's endpoints, deck upload and progress, task reads and cancel.

    Stateless: run as many as you like behind a load balancer.  Needs GPUSCALE_API_TOKEN (one or
    more bearer tokens, comma-separated) and the document root the workers read
    (GPUSCALE_DOCUMENT_ROOT).  OpenAPI at /openapi.json, interactive docs at /docs.
    """
    import asyncio

    from gpuscale.api import create_app
    from gpuscale.cli.database import run_db
    from gpuscale.common.serving import AppServer
    from gpuscale.common.settings import get_settings
    from gpuscale.db import resolve_dsn

    settings = get_settings()
    if settings.api_token is None or not any(
        t.strip() for t in settings.api_token.get_secret_value().split(",")
    ):
        raise fail("GPUSCALE_API_TOKEN is not set: give the API at least one bearer token (comma-separated)")
    listen_host = host or settings.api_host
    listen_port = settings.api_port if port is None else port

    async def serve() -> None:
        dsn = await asyncio.to_thread(resolve_dsn, settings)
        app = create_app(settings, dsn)
        try:
            server = AppServer(
                app,
                listen_host,
                listen_port,
                name="api",
                lifespan="on",
                log_level=None,
                access_log=True,
                log_config=None,  # our logging setup; the access log never shows headers
                timeout_graceful_shutdown=10,
            )
        except OSError as exc:  # not the database: say so, before run_db reads it as one
            raise fail(f"cannot listen on {listen_host}:{listen_port}: {exc.strerror or exc}") from None
        await server.serve()
        if not server.ready:
            raise OSError(f"the API did not start on {listen_host}:{listen_port}")

    run_db(serve)


def register(app: typer.Typer) -> None:
    app.command("api")(api)
