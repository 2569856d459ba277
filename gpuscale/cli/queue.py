"""Queue commands: ``db migrate``, ``enqueue``, ``submit-deck``, ``status``, ``bench queue``.

Every command that touches the database applies pending migrations first (idempotent and
serialized by an advisory lock), so a fresh checkout works without a separate ``db migrate``.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from gpuscale.cli.database import open_queue, run_db
from gpuscale.cli.errors import fail
from gpuscale.cli.groups import bench_app, db_app

if TYPE_CHECKING:  # imports stay lazy at run time so `--help` is fast
    from rich.console import Console

    from gpuscale.queue import Queue


@db_app.command("migrate")
def db_migrate() -> None:
    """Apply pending schema migrations (idempotent, safe to run concurrently)."""
    from gpuscale.db import Connector, resolve_dsn

    async def run() -> None:
        async with Connector(resolve_dsn(), max_connections=1) as db:
            applied = await db.migrate()
        typer.echo(
            f"applied {len(applied)} migration(s): {', '.join(f'{m.version:04d}_{m.name}' for m in applied)}"
            if applied
            else "schema is up to date"
        )

    run_db(run)


def enqueue(
    task_type: str = typer.Argument(..., metavar="TYPE", help="Task type, e.g. startup_name_extraction."),
    payload: str = typer.Option("{}", "--payload", help="Payload as a JSON object."),
    priority: str = typer.Option("normal", "--priority", help="normal, high or critical."),
    depends_on: list[int] = typer.Option(
        [], "--depends-on", help="Id of a task this one waits for (repeatable)."
    ),
    document_id: str | None = typer.Option(
        None, "--document-id", help="Document (deck) this task belongs to."
    ),
    max_attempts: int | None = typer.Option(
        None, "--max-attempts", min=1, help="Override the type's default."
    ),
) -> None:
    """Enqueue one task; prints its id."""
    from gpuscale.common.settings import get_settings
    from gpuscale.queue import InvalidTask, NewTask, validate_task

    try:
        data = json.loads(payload)
    except json.JSONDecodeError as exc:
        raise fail(f"--payload is not valid JSON: {exc}") from None
    except RecursionError:
        raise fail("--payload is nested too deeply") from None
    for dep in depends_on:
        if not 1 <= dep <= 2**63 - 1:
            raise fail(f"--depends-on {dep}: not a task id (ids run from 1 to {2**63 - 1})")
    task = NewTask(task_type, data, priority, list(depends_on), document_id, max_attempts)
    try:
        # Everything but the dependencies' existence, before a database is started or touched.
        validate_task(task, get_settings().max_payload_bytes)
    except InvalidTask as exc:
        raise fail(str(exc)) from None

    async def run() -> int:
        async with open_queue(max_size=2) as q:
            return await q.enqueue(task)

    try:
        task_id = run_db(run)
    except InvalidTask as exc:
        raise fail(str(exc)) from None
    typer.echo(task_id)


def submit_deck(
    pdf: str = typer.Argument(
        ...,
        metavar="FILE.pdf|URL",
        help="The pitch deck: a local PDF (copied into the document root) or an http(s) URL.",
    ),
    batch_pages: int | None = typer.Option(
        None,
        "--batch-pages",
        min=1,
        help="Pages per visual_analysis task at most (default: GPUSCALE_DECK_BATCH_PAGES).",
    ),
    priority: str = typer.Option("normal", "--priority", help="normal, high or critical."),
    as_json: bool = typer.Option(False, "--json", help="Print the submission as JSON."),
) -> None:
    """Submit a pitch-deck PDF: stores it in the document root and creates its whole task graph in
    one transaction."""
    from gpuscale.common.settings import get_settings
    from gpuscale.queue import InvalidTask, Priority
    from gpuscale.queue.deck import DeckError, count_pages
    from gpuscale.queue.deck import submit_deck as submit
    from gpuscale.queue.documents import DocumentStore, is_url

    try:
        Priority(priority)
    except ValueError:
        raise fail(f"unknown priority {priority!r}; use normal, high or critical") from None
    settings = get_settings()
    source: Path | str = pdf if is_url(pdf) else Path(pdf)
    if isinstance(source, Path):
        try:
            # Refuse a bad file before starting a database.
            count_pages(source.absolute(), max_pages=settings.max_pdf_pages)
        except DeckError as exc:
            raise fail(str(exc)) from None
    pages_per_task = batch_pages or settings.deck_batch_pages
    store = DocumentStore(settings.document_root)

    async def run() -> Any:
        async with open_queue(max_size=2) as q:
            return await submit(
                q,
                source,
                store=store,
                batch_pages=pages_per_task,
                priority=priority,
                max_bytes=settings.deck_max_bytes,
                max_pages=settings.max_pdf_pages,
            )

    try:
        sub = run_db(run)
    except InvalidTask as exc:
        raise fail(str(exc)) from None
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "document_id": sub.document_id,
                    "document": sub.document,
                    "pages": sub.pages,
                    "task_ids": sub.task_ids,
                }
            )
        )
        return
    total = sum(len(v) for v in sub.task_ids.values())
    typer.echo(f"submitted {sub.document_id}: {sub.pages} pages, {total} tasks")
    for name, ids in sub.task_ids.items():
        typer.echo(f"  {name}: {', '.join(map(str, ids))}")


# ----------------------------------------------------------------------------------- status


async def collect_status(q: Queue) -> dict[str, Any]:
    """The data behind ``gpuscale status``: per-pool counts and registered servers (JSON-ready)."""
    from gpuscale.queue import tasktypes

    stats = await q.stats()
    servers = await q.list_servers(include_dead=True)
    # Pools that serve task types show even when empty; the benchmark pool only when used.
    names = {t.pool for t in tasktypes.all_types().values() if t.pool != "bench"} | set(stats)
    pools: dict[str, Any] = {}
    for name in sorted(names):
        s = stats.get(name)
        pools[name] = {
            "blocked": s.blocked if s else 0,
            "blocked_on_running": s.blocked_on_running if s else 0,
            "queued": s.queued_total if s else 0,
            "queued_by_priority": {p.value: n for p, n in s.queued.items()} if s else {},
            "waiting_backoff": s.waiting_backoff if s else 0,
            "running": s.running if s else 0,
            "done": s.done if s else 0,
            "failed": s.failed if s else 0,
            "dead": s.dead if s else 0,
            "cancelled": s.cancelled if s else 0,
            "oldest_queued_age_s": round(s.oldest_queued_age_s, 3)
            if s and s.oldest_queued_age_s is not None
            else None,
        }
    return {
        "pools": pools,
        "servers": [
            {
                "id": sv.id,
                "pool": sv.pool,
                "status": sv.status,
                "container_id": sv.container_id,
                "current_load": sv.current_load,
                "max_concurrent_tasks": sv.max_concurrent_tasks,
                "models": sv.models,
                "version": sv.version,
                "last_heartbeat": sv.last_heartbeat.isoformat() if sv.last_heartbeat else None,
                "started_at": sv.started_at.isoformat() if sv.started_at else None,
            }
            for sv in servers
        ],
    }


def _age(iso: str | None) -> str:
    secs = _since(iso)
    return "-" if secs is None else _duration(secs) + " ago"


def _duration(secs: float | None) -> str:
    if secs is None or math.isnan(secs):
        return "-"
    secs = max(0.0, secs)
    if secs < 60:
        return f"{secs:.0f}s"
    if secs < 3600:
        return f"{secs / 60:.0f}m"
    return f"{secs / 3600:.1f}h"


def render_status(data: dict[str, Any], console: Console | None = None) -> None:
    """Print :func:`collect_status` data as rich tables (pools, then servers).

    Extra per-pool keys (e.g. the controller's replica counts) become extra columns, so callers
    can merge their own fields into ``data["pools"][name]`` before rendering."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    pools: dict[str, Any] = data.get("pools", {})
    base = ["blocked", "queued", "running", "done", "failed", "dead"]
    # Shown only when some pool has them, to keep the table narrow.
    optional = [c for c in ("waiting_backoff", "cancelled") if any(p.get(c) for p in pools.values())]
    skip = {*base, *optional, "waiting_backoff", "cancelled", "queued_by_priority", "oldest_queued_age_s"}
    skip.update({"blocked_on_running", "deployments", "home"})
    extra = sorted({k for p in pools.values() for k in p if k not in skip})
    table = Table(title="Pools", title_justify="left")
    table.add_column("pool", style="bold")
    for col in base + optional:
        table.add_column("backoff" if col == "waiting_backoff" else col, justify="right")
    table.add_column("oldest", justify="right")
    for col in extra:
        table.add_column(col.replace("_", " "), justify="right")
    for name, p in pools.items():
        prio = p.get("queued_by_priority") or {}
        urgent = [f"{prio[k]}{k[0]}" for k in ("critical", "high") if prio.get(k)]
        queued = str(p.get("queued", 0)) + (f" ({' '.join(urgent)})" if urgent else "")
        cells = [queued if c == "queued" else str(p.get(c, 0)) for c in base + optional]
        table.add_row(
            name, *cells, _duration(p.get("oldest_queued_age_s")), *(str(p.get(c, "-")) for c in extra)
        )
    console.print(table)
    _render_deployments(pools, console)

    servers = data.get("servers", [])
    if not servers:
        console.print("Servers: none registered")
        return
    st = Table(title="Servers", title_justify="left")
    for col in ("id", "pool", "status", "load", "models", "version", "heartbeat", "up"):
        st.add_column(col)
    for s in servers:
        st.add_row(
            s["id"],
            s["pool"],
            s["status"],
            f"{s['current_load']}/{s['max_concurrent_tasks']}",
            ", ".join(s.get("models") or []) or "-",
            s.get("version") or "-",
            _age(s.get("last_heartbeat")),
            _duration(_since(s.get("started_at"))),
        )
    console.print(st)


def _render_deployments(pools: dict[str, Any], console: Console) -> None:
    """Where each pool's replicas run (fallback deployments): one row per deployment."""
    from rich.table import Table

    rows = [(name, d, p.get("home")) for name, p in pools.items() for d in p.get("deployments") or []]
    if not rows or all(len(p.get("deployments") or []) < 2 for p in pools.values()):
        return
    table = Table(title="Deployments (in order of preference)", title_justify="left")
    for col in ("pool", "deployment", "kind", "$/h", "replicas", "registered", "busy", "state", "why"):
        table.add_column(col, justify="right" if col in ("$/h", "replicas", "registered", "busy") else "left")
    now = time.time()
    for pool, d, home in rows:
        until = d.get("cooling_until")
        state = "home" if d.get("name") == home else "-"
        if until:
            state = f"cooling {max(0.0, until - now):.0f}s"
        price = d.get("price_per_hour")
        table.add_row(
            pool,
            str(d.get("name")),
            "spot" if d.get("spot") else "on demand",
            "-" if price is None else f"{price:.2f}",
            *("-" if d.get(k) is None else str(d[k]) for k in ("replicas", "registered", "busy")),
            state,
            str(d.get("why") or ""),
        )
    console.print(table)


def _since(iso: str | None) -> float | None:
    if not iso:
        return None
    return (datetime.now(UTC) - datetime.fromisoformat(iso)).total_seconds()


async def controller_status(q: Queue, controller_url: str | None) -> dict[str, dict[str, Any]]:
    """Per pool: the controller's live view (replicas desired / provider / registered, last
    decision) from its ``/api/pools`` when it answers, else the last recorded decision and the
    pause flag from the database.  Keys become extra columns of the status table."""
    import httpx

    from gpuscale.controller.store import ControllerStore

    out: dict[str, dict[str, Any]] = {}
    store = ControllerStore(q.db)
    paused = await store.paused_pools()
    for pool, event in (await store.last_events()).items():
        out.setdefault(pool, {})["decision"] = f"{event['to_replicas']} ({event['reason']})"
    if controller_url:
        try:
            async with httpx.AsyncClient(timeout=2) as client:
                answer = (await client.get(controller_url.rstrip("/") + "/api/pools")).json()
            for p in answer.get("pools", []):
                row = out.setdefault(p["name"], {})
                row["replicas"] = "/".join(
                    "?" if p.get(k) is None else str(p[k])
                    for k in ("replicas_desired", "replicas_provider", "replicas_registered")
                )
                if len(p.get("deployments") or []) > 1:
                    # Fallback deployments: where the replicas run and why.
                    row["deployments"] = p["deployments"]
                    row["home"] = p.get("home")
                d = p.get("last_decision") or {}
                if d:
                    row["decision"] = f"{d.get('desired')} ({d.get('reason')})"
        except (httpx.HTTPError, ValueError, KeyError):
            pass  # no controller answering here: the database's view is all there is
    for name in paused:
        out.setdefault(name, {})["paused"] = "yes"
    return out


documents_app = typer.Typer(help="The document store (GPUSCALE_DOCUMENT_ROOT).", no_args_is_help=True)


@documents_app.command("prune")
def prune_documents(
    older_than_days: float | None = typer.Option(
        None,
        "--older-than-days",
        min=0.0,
        help="Delete stored PDFs no task names and untouched this long "
        "(default: GPUSCALE_DOCUMENT_RETENTION_DAYS).",
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would go; delete nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Delete the decks in the document root that no task needs any more (the API also does it hourly)."""
    from gpuscale.common.settings import get_settings
    from gpuscale.queue.documents import DocumentStore

    settings = get_settings()
    days = settings.document_retention_days if older_than_days is None else older_than_days
    store = DocumentStore(settings.document_root)
    if not store.root.is_dir():
        raise fail(f"the document root {store.root} is not a directory; check GPUSCALE_DOCUMENT_ROOT")

    async def in_use() -> set[str]:
        async with open_queue(max_size=1) as q:
            return await q.documents_in_use()

    result = store.prune(run_db(in_use), older_than_s=days * 86400, dry_run=dry_run)
    if as_json:
        out = {"deleted": result.deleted, "freed_bytes": result.freed_bytes, "kept": result.kept}
        typer.echo(json.dumps({**out, "dry_run": dry_run}))
        return
    verb = "would delete" if dry_run else "deleted"
    typer.echo(
        f"{verb} {len(result.deleted)} document(s), {result.freed_bytes / 2**20:.1f} MiB; "
        f"kept {result.kept} under {store.root}"
    )


def status(
    as_json: bool = typer.Option(False, "--json", help="Print the same data as JSON."),
    watch: float | None = typer.Option(
        None, "--watch", min=0.5, help="Refresh every N seconds until Ctrl-C (e.g. --watch 2)."
    ),
    controller_url: str | None = typer.Option(
        None,
        "--controller",
        help="Controller HTTP API for live replica counts (default http://GPUSCALE_HTTP_HOST:GPUSCALE_HTTP_PORT).",
    ),
) -> None:
    """Show pools (blocked / queued / running / done / failed / dead, replicas desired/provider/
    registered, last decision) and servers."""
    from gpuscale.common.settings import get_settings

    if controller_url is None:
        settings = get_settings()
        controller_url = f"http://{settings.http_host}:{settings.http_port}"

    async def collect(q: Queue) -> dict[str, Any]:
        data = await collect_status(q)
        for name, extra in (await controller_status(q, controller_url)).items():
            if name in data["pools"]:
                data["pools"][name].update(extra)
        return data

    async def once() -> dict[str, Any]:
        async with open_queue(max_size=2) as q:
            return await collect(q)

    if watch is None:
        data = run_db(once)
        if as_json:
            typer.echo(json.dumps(data, indent=2))
        else:
            render_status(data)
        return

    async def loop() -> None:
        from rich.console import Console, Group
        from rich.live import Live

        console = Console()
        async with open_queue(max_size=2) as q:
            with Live(console=console, auto_refresh=False) as live:
                while True:
                    data = await collect(q)
                    if as_json:
                        live.update(json.dumps(data, indent=2), refresh=True)
                    else:
                        capture = Console(width=console.width, record=True)
                        with capture.capture() as cap:
                            render_status(data, capture)
                        from rich.text import Text

                        live.update(Group(Text.from_ansi(cap.get())), refresh=True)
                    await asyncio.sleep(watch)

    try:
        run_db(loop)
    except KeyboardInterrupt:
        pass


# ----------------------------------------------------------------------------------- bench


@bench_app.command("queue")
def bench_queue(
    tasks: int = typer.Option(20_000, "--tasks", min=1, help="No-op tasks to enqueue and drain."),
    concurrency: int = typer.Option(8, "--concurrency", min=1, max=256, help="Concurrent consumers."),
    claim_batch: int = typer.Option(
        100, "--claim-batch", min=1, help="Tasks per claim (and per batched complete)."
    ),
    enqueue_batch: int = typer.Option(1000, "--enqueue-batch", min=1, help="Tasks per enqueue round trip."),
    depth_rows: int = typer.Option(
        0, "--depth-rows", min=0, help="Also time depth reads with this many queued rows (e.g. 1000000)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Enqueue and drain no-op tasks through the real claim/complete path; print throughput.

    Uses the "bench" pool as scratch space: emptied (and vacuumed) before and after."""
    from gpuscale.dev.queuebench import run_queue_bench

    async def run() -> Any:
        async with open_queue(max_size=concurrency + 2) as q:
            return await run_queue_bench(
                q.db,
                tasks=tasks,
                concurrency=concurrency,
                claim_batch=claim_batch,
                enqueue_batch=enqueue_batch,
                depth_rows=depth_rows or None,
            )

    result = run_db(run).as_dict()
    if as_json:
        typer.echo(json.dumps(result))
        return
    for key, value in result.items():
        typer.echo(f"{key:>24}: {value}")


@bench_app.command("fleet")
def bench_fleet(
    replicas: int = typer.Option(50, "--replicas", min=1, max=5000, help="Simulated replicas (workers)."),
    pools: int = typer.Option(4, "--pools", min=1, max=200, help="Pools the replicas are spread over."),
    pgbouncer: bool = typer.Option(
        False, "--pgbouncer", help="Route the replicas through a PgBouncer in transaction mode."
    ),
    max_connections: int = typer.Option(
        100, "--max-connections", min=10, max=10_000, help="The scratch server's max_connections."
    ),
    duration: float = typer.Option(30.0, "--duration", min=1, help="Seconds of steady task stream."),
    rate: float = typer.Option(50.0, "--rate", min=0, help="Tasks per second, over all pools."),
    task_s: float = typer.Option(0.2, "--task-s", min=0, help="How long each noop task sleeps."),
    slots: int = typer.Option(2, "--slots", min=1, max=64, help="Tasks one replica runs at once."),
    processes: int = typer.Option(0, "--processes", min=0, max=64, help="Replica processes (0: auto)."),
    listen: bool | None = typer.Option(
        None, "--listen/--poll", help="Workers LISTEN or poll (default: poll through PgBouncer)."
    ),
    pool_size: int = typer.Option(20, "--pool-size", min=1, help="PgBouncer's server connections."),
    heartbeat: float = typer.Option(10.0, "--heartbeat", min=0.1, help="Worker heartbeat interval (s)."),
    poll: float = typer.Option(5.0, "--poll-interval", min=0.05, help="Worker polling interval (s)."),
    tick: float = typer.Option(2.0, "--tick", min=0.1, help="Controller reconcile interval (s)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Simulated replicas and a controller against one throwaway PostgreSQL: connections,
    claim/heartbeat/reconcile timings, and tasks done, unfinished and lost.

    Starts its own PostgreSQL (and PgBouncer, Debian's binary) and removes them afterwards;
    GPUSCALE_DATABASE_URL is not used."""
    from gpuscale.db.pgbouncer import PgBouncerError, find_pgbouncer
    from gpuscale.dev.fleetbench import FleetOptions, run_fleet_bench

    if pgbouncer and find_pgbouncer() is None:
        raise fail("--pgbouncer needs the pgbouncer binary (Debian: apt-get install pgbouncer)")
    opts = FleetOptions(
        replicas=replicas,
        pools=pools,
        pgbouncer=pgbouncer,
        max_connections=max_connections,
        duration_s=duration,
        rate=rate,
        task_s=task_s,
        slots=slots,
        processes=processes,
        listen=listen,
        pool_size=pool_size,
        heartbeat_s=heartbeat,
        poll_s=poll,
        tick_s=tick,
    )
    try:
        result = run_fleet_bench(opts)
    except PgBouncerError as exc:
        raise fail(str(exc)) from None
    if as_json:
        typer.echo(json.dumps(result))
        return
    for key, value in result.items():
        typer.echo(f"{key:>24}: {value}")


def register(app: typer.Typer) -> None:
    app.add_typer(db_app, name="db")
    app.command("enqueue")(enqueue)
    app.command("submit-deck")(submit_deck)
    app.command("status")(status)
    app.add_typer(documents_app, name="documents")
    app.add_typer(bench_app, name="bench")
