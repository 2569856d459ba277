"""``gpuscale demo``: the whole loop on a laptop — PostgreSQL, emulator, Ollama stand-in, controller,
sample decks — with a live view, a summary, and nothing left running afterwards.

Exit status: 0 when every task is done and every pool is back to its minimum, 1 otherwise (the
summary says why), 2 on bad arguments or configuration, 130 when interrupted.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.live import Live

from gpuscale.cli.errors import fail


def demo(
    decks: int = typer.Option(3, "--decks", min=1, max=50, help="How many sample decks to submit."),
    pages: int | None = typer.Option(
        None, "--pages", min=1, max=200, help="Pages per deck (default: each sample deck's own, 10–24)."
    ),
    headless: bool = typer.Option(
        False, "--headless", help="No live view: progress lines, then the summary."
    ),
    json_out: bool = typer.Option(
        False, "--json", help="Print only the summary, as JSON (implies --headless)."
    ),
    ollama_host: str | None = typer.Option(
        None, "--ollama-host", help="Use this real Ollama (http://host:11434) instead of the stand-in."
    ),
    pools_file: Path = typer.Option(
        Path("deploy/demo/pools.yaml"), "--pools", help="Pool rules for the demo (short delays)."
    ),
    data_dir: Path = typer.Option(
        Path(".gpuscale/demo"), "--data-dir", help="Where the demo keeps its database, decks and logs."
    ),
    timeout: float = typer.Option(600.0, "--timeout", min=10, help="Give up after this many seconds."),
    http_port: int = typer.Option(
        0, "--http-port", min=0, max=65535, help="Controller HTTP port (0: a free one)."
    ),
    replica_start: float = typer.Option(
        8.0, "--replica-start", min=0, max=600, help="Seconds the emulator takes to start a container."
    ),
    latency: float = typer.Option(
        1.0, "--latency", min=0, max=60, help="Seconds per Ollama stand-in answer (one page, one prompt)."
    ),
    targets_file: Path | None = typer.Option(
        None,
        "--prometheus-targets",
        help="Keep a Prometheus file_sd JSON file of the controller and worker metrics addresses.",
    ),
) -> None:
    """Run the whole loop locally: PostgreSQL, emulator, Ollama stand-in, controller, sample decks."""
    from gpuscale.controller.pools import PoolsFileError, load_pools
    from gpuscale.dev.demo.run import DemoOptions, shipped

    if ollama_host is not None and not ollama_host.startswith(("http://", "https://")):
        raise fail(f"--ollama-host must be an http(s) URL, not {ollama_host!r}")
    pools_file = shipped(pools_file)
    try:
        load_pools(pools_file)
    except PoolsFileError as exc:
        raise fail(str(exc)) from None
    options = DemoOptions(
        decks=decks,
        pages=pages,
        pools_file=pools_file,
        data_dir=data_dir,
        ollama_host=ollama_host,
        timeout_s=timeout,
        http_port=http_port,
        replica_start_s=replica_start,
        standin_latency_s=latency,
        targets_file=targets_file,
    )
    # With --json, stdout carries only the JSON document; everything else goes to stderr.
    console = Console(stderr=json_out)
    # A live view needs a terminal; piped into a file it would show nothing until the end.
    headless = headless or json_out or not console.is_terminal
    code = asyncio.run(_main(options, console, headless=headless, json_out=json_out))
    raise typer.Exit(code)


async def _main(options: object, console: Console, *, headless: bool, json_out: bool) -> int:
    from gpuscale.dev.demo.run import Demo, DemoError, DemoOptions
    from gpuscale.dev.demo.summary import render_summary
    from gpuscale.dev.demo.view import Snapshot, render
    from gpuscale.dev.stack import ProcessFailed

    assert isinstance(options, DemoOptions)
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    interrupted: list[int] = []
    stopping = False

    def interrupt(sig: int) -> None:
        interrupted.append(sig)
        # Once the stop has begun, a further Ctrl-C is only noted: cancelling now would make
        # asyncio.run cancel the stop half-way (database, leftovers, lock never cleaned up).
        if not stopping:
            main_task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, interrupt, sig)

    try:
        demo = Demo(options)
    except DemoError as exc:
        console.print(f"error: {exc}", style="red", highlight=False)
        return 2
    for line in demo.rules_lines():
        console.print(line, style="dim", highlight=False, soft_wrap=True)
    summary = None
    try:
        try:
            await demo.start(progress=lambda msg: console.print(f"· {msg}", highlight=False))
            for line in demo.header_lines():
                console.print(line, highlight=False, soft_wrap=True)
            if headless:
                last_phase: dict[str, str] = {}
                seen_events: set[tuple[float, str]] = set()

                def report(snap: Snapshot) -> None:
                    for d in reversed(snap.decisions):
                        key = (d.at, d.pool)
                        if key not in seen_events:
                            seen_events.add(key)
                            console.print(
                                f"[{snap.elapsed_s:6.1f}s] {d.pool}: {d.from_replicas} → {d.to_replicas} "
                                f"({d.reason}) {d.detail}",
                                highlight=False,
                            )
                    line = " | ".join(
                        f"{p.name}: q{p.queued} r{p.running} b{p.blocked} d{p.done} "
                        f"replicas {p.desired}/{p.provider}/{p.registered}"
                        for p in snap.pools
                    )
                    if last_phase.get("line") != line:
                        last_phase["line"] = line
                        console.print(f"[{snap.elapsed_s:6.1f}s] {line}", style="dim", highlight=False)

                snap = await demo.run(report)
            else:
                with Live(
                    render(demo.snapshot), console=console, refresh_per_second=4, transient=False
                ) as live:
                    snap = await demo.run(lambda s: live.update(render(s)))
            summary = await demo.summary(snap)
        finally:
            stopping = True
            console.print("· stopping everything", highlight=False)
            await _stop_to_the_end(demo.stop(), main_task)
            if summary is not None and demo.leftovers:
                summary.ok = False
                summary.problems.append(f"{len(demo.leftovers)} leftover process(es) had to be killed")
    except asyncio.CancelledError:
        console.print("interrupted; everything was stopped", style="yellow")
        return 130
    except (DemoError, ProcessFailed) as exc:
        console.print(f"error: {exc}", style="red", highlight=False)
        return 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    assert summary is not None
    if json_out:
        sys.stdout.write(json.dumps(summary.to_json(), indent=2) + "\n")
        sys.stdout.flush()
    else:
        console.print(render_summary(summary))
    return 0 if summary.ok else 1


async def _stop_to_the_end(stop: Coroutine[Any, Any, None], main_task: asyncio.Task[Any]) -> None:
    """Run ``stop`` to completion even if this task is cancelled meanwhile.

    A cancel requested just before the stop began (a signal racing the end of the run) would
    otherwise end the wait early, and asyncio.run would then cancel the stop itself.  Such a cancel
    is taken back: the run's outcome stands, and the stop finishes.
    """
    task = asyncio.ensure_future(stop)
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled():
                raise
            main_task.uncancel()
    task.result()


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
