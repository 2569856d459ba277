"""``gpuscale demo``'s parts that run without starting the whole loop: the sample decks, the live
view, the summary, argument errors, and the leftover-process safety net.

The whole demo, run headless with a real Prometheus scraping it, is in
tests/test_dashboard_prometheus.py (one run checks both, to keep CI short).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pypdfium2 as pdfium
import pytest
import yaml
from provider_kit import environs_with
from rich.console import Console

from gpuscale.dev.demo import decks
from gpuscale.dev.demo.run import RUN_MARKER, _deck_view, _server_metrics_addr, _specs_by_pool, kill_leftovers
from gpuscale.dev.demo.summary import PoolSummary, Summary, render_summary
from gpuscale.dev.demo.view import Decision, DeckView, PoolView, Snapshot, render
from gpuscale.queue import ServerInfo
from gpuscale.queue.deck import count_pages

ROOT = Path(__file__).resolve().parent.parent
GPUSCALE = [sys.executable, "-c", "from gpuscale.cli.app import main; main()"]


def test_sample_decks_are_real_multipage_pdfs(tmp_path: Path) -> None:
    paths = decks.write_decks(tmp_path, 4)
    assert [p.name for p in paths] == [
        "01-cardiolytics.pdf",
        "02-fieldgrid.pdf",
        "03-nephro-ai.pdf",
        "04-loomcraft.pdf",
    ]
    for path, company in zip(paths, decks.COMPANIES, strict=False):
        assert count_pages(path) == company.pages  # the queue's own PDF check accepts it
        pdf = pdfium.PdfDocument(str(path))
        try:
            first = pdf[0].get_textpage().get_text_range()
            assert company.name in first
            assert company.round in first
            later = pdf[2].get_textpage().get_text_range()
            assert f"3/{company.pages}" in later  # page numbers
            # Slides with a chart really carry an image.
            objs = [o.type for o in pdf[1].get_objects()]
            assert pdfium.raw.FPDF_PAGEOBJ_IMAGE in objs
        finally:
            pdf.close()
    # Healthcare decks carry the clinical slides the text pool's classification keys on.
    text = " ".join(pdfium.PdfDocument(str(paths[0]))[i].get_textpage().get_text_range() for i in range(1, 8))
    assert "Regulatory pathway" in text


def test_deck_page_override_and_bad_values(tmp_path: Path) -> None:
    (path,) = decks.write_decks(tmp_path, 1, pages=3)
    assert count_pages(path) == 3
    try:
        decks.deck_pdf(decks.COMPANIES[0], pages=-1)
    except ValueError as exc:
        assert "at least one page" in str(exc)
    else:
        raise AssertionError("negative page count accepted")


def test_demo_deployment_specs_are_found_by_pool() -> None:
    specs = _specs_by_pool([ROOT / "deploy/datacrunch/visual.yaml", ROOT / "deploy/datacrunch/text.yaml"])
    assert set(specs) == {"visual", "text"}


def test_view_shows_pools_decisions_decks_and_names_the_standin() -> None:
    snap = Snapshot(
        elapsed_s=75,
        phase="running",
        header=["Ollama: the Ollama STAND-IN at http://127.0.0.1:1 — canned answers"],
        pools=[
            PoolView(
                "visual",
                0,
                3,
                queued=2,
                running=3,
                blocked=1,
                done=4,
                desired=3,
                provider=3,
                registered=2,
                last_decision="0→3 scale_from_zero (4s ago)",
            ),
            PoolView(
                "text",
                0,
                2,
                blocked=9,
                desired=1,
                provider=1,
                registered=0,
                last_decision="0→1 prewarm_dependency (1s ago)",
            ),
        ],
        decisions=[
            Decision(time.time(), "text", 0, 1, "prewarm_dependency", "visual work running", "applied")
        ],
        decks=[DeckView("01-cardiolytics", "d1", 18, 12, 4, 0, 2, 41.5, "visual 2/3 · text 0/9 · 2 running")],
    )
    console = Console(record=True, width=160)
    console.print(render(snap))
    out = console.export_text()
    assert "gpuscale demo — running — 01:15" in out
    assert "STAND-IN" in out
    assert "3 / 3 / 2" in out and "1 / 1 / 0" in out  # desired / running / registered
    assert "prewarm_dependency" in out and "scale_from_zero" in out
    assert "01-cardiolytics" in out and "4/12" in out


def test_deck_view_progress_and_stage() -> None:
    tasks = [
        {"status": "done", "pool": "visual", "progress": 100},
        {"status": "running", "pool": "visual", "progress": 50},
        {"status": "blocked", "pool": "text", "progress": 0},
        {"status": "failed", "pool": "text", "progress": 0},
    ]
    view = _deck_view("deck", "d", 10, tasks)
    assert (view.tasks_total, view.tasks_done, view.tasks_failed, view.tasks_running) == (4, 1, 1, 1)
    assert view.progress == 62.5  # (100 + 100 + 50) / 4
    assert view.stage == "visual 1/2 · text 0/2 · 1 running"
    done = _deck_view("deck", "d", 10, [{"status": "done", "pool": "text", "progress": 100}])
    assert done.stage == "done" and done.progress == 100


def test_worker_metrics_address_from_registration() -> None:
    server = ServerInfo(id="w1", pool="visual", capabilities={"http_port": 40123, "host": "box"})
    assert _server_metrics_addr(server) == "127.0.0.1:40123"
    assert _server_metrics_addr(ServerInfo(id="w2", pool="text")) is None


def test_summary_json_and_text() -> None:
    pool = PoolSummary(0, 3, 0, 0, 3, 90.0, 0.0125, 0.5, 3, 2.9, 11, 0, 1, 2)
    summary = Summary(
        ok=True,
        tasks_total=11,
        tasks_done=11,
        tasks_failed=0,
        tasks_unfinished=0,
        decks=1,
        pages=18,
        wall_s=42.0,
        replica_seconds=90.0,
        cost_usd=0.0125,
        cold_starts=3,
        replicas_final={"visual": 0},
        pools={"visual": pool},
        decisions={"scale_from_zero": 1, "idle_timeout": 2},
        ollama="stand-in",
        provider="datacrunch → emulator",
    )
    data = json.loads(json.dumps(summary.to_json()))
    for key in (
        "tasks_total",
        "tasks_done",
        "tasks_failed",
        "replicas_final",
        "wall_s",
        "cost_usd",
        "cold_starts",
    ):
        assert key in data
    assert data["pools"]["visual"]["replica_seconds"] == 90.0
    console = Console(record=True, width=140)
    console.print(render_summary(summary))
    text = console.export_text()
    assert "every task done" in text and "replica-seconds" in text and "$0.0125" in text


def _demo_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUSCALE_")}
    return subprocess.run(
        [*GPUSCALE, "demo", *args], capture_output=True, text=True, timeout=60, cwd=cwd, env=env
    )


def test_bad_arguments_exit_2_and_start_nothing(tmp_path: Path) -> None:
    data = ["--data-dir", str(tmp_path / "demo")]
    out = _demo_cli("--ollama-host", "localhost:11434", *data, cwd=ROOT)
    assert out.returncode == 2 and "--ollama-host must be an http(s) URL" in out.stderr
    out = _demo_cli("--pools", str(tmp_path / "missing.yaml"), *data, cwd=ROOT)
    assert out.returncode == 2 and "pools file not found" in out.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("visual_container_scaling:\n  min_replicas: 4\n  max_replicas: 1\n")
    out = _demo_cli("--pools", str(bad), *data, cwd=ROOT)
    assert out.returncode == 2 and "min_replicas" in out.stderr
    out = _demo_cli("--decks", "0", *data, cwd=ROOT)
    assert out.returncode == 2
    assert not (tmp_path / "demo").exists()  # nothing was started or written


def test_kill_leftovers_kills_only_this_runs_processes() -> None:
    mine = subprocess.Popen(["sleep", "60"], env={**os.environ, RUN_MARKER: "run-a"})
    other = subprocess.Popen(["sleep", "60"], env={**os.environ, RUN_MARKER: "run-b"})
    try:
        killed = kill_leftovers("run-a")
        assert killed == [mine.pid]
        assert mine.wait(timeout=5) == -9
        assert other.poll() is None
    finally:
        for p in (mine, other):
            p.kill()
            p.wait()


def test_one_demo_per_data_dir(tmp_path: Path) -> None:
    from gpuscale.dev.demo.run import Demo, DemoError, DemoOptions

    options = DemoOptions(data_dir=tmp_path, pools_file=ROOT / "deploy/demo/pools.yaml")
    options.deployment_files = [ROOT / p for p in options.deployment_files]
    first, second = Demo(options), Demo(options)
    first._lock()
    try:
        second._lock()
    except DemoError as exc:
        assert "another demo is running" in str(exc)
    else:
        raise AssertionError("two demos locked the same data dir")
    finally:
        first._lock_fh.close()
    second._lock()  # free again once the first let go
    second._lock_fh.close()


def _demo_env() -> dict[str, str]:
    """This environment without GPUSCALE_/DATACRUNCH_ settings, so the demo runs on its own defaults."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("GPUSCALE_", "DATACRUNCH_"))}


def _start_demo(data_dir: Path, *args: str) -> tuple[subprocess.Popen[str], str]:
    """A headless demo on data_dir (stdout, stderr merged) and the environment entry marking its processes."""
    proc = subprocess.Popen(
        [*GPUSCALE, "demo", "--headless", *args, "--data-dir", str(data_dir)],
        cwd=ROOT, env=_demo_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    return proc, f"GPUSCALE_DATA_DIR={data_dir.absolute()}"


def _assert_everything_stopped(
    proc: subprocess.Popen[str], out: str, marker: str, running: list[int]
) -> None:
    """Exit 130 after a Ctrl-C, said so, and no process of the run left (those seen running included)."""
    assert proc.returncode == 130, out
    assert "everything was stopped" in out
    assert list(environs_with(marker)) == []
    assert not [p for p in running if Path(f"/proc/{p}").exists()]


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_ctrl_c_mid_run_stops_everything(tmp_path: Path) -> None:
    """SIGINT while replicas run: exit 130, and no process of the run is left (replicas included)."""
    data_dir = tmp_path / "demo"
    proc, marker = _start_demo(data_dir, "--decks", "1", "--latency", "1")
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # wait until the visual pool has replicas running
            lines.append(line)
            if "visual: 0 →" in line:
                break
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(environs_with(marker)) < 4:
            time.sleep(0.2)
        running = list(environs_with(marker))
        assert len(running) >= 4, "".join(lines)  # stand-in, emulator, controller, replica(s)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    _assert_everything_stopped(proc, "".join(lines) + out, marker, running)


@pytest.mark.e2e
@pytest.mark.timeout(150)
def test_ollama_host_uses_the_given_ollama_and_starts_no_stand_in(tmp_path: Path) -> None:
    """--ollama-host: the workers talk to that server (here a stand-in this test runs itself,
    standing for a real Ollama) and the demo starts no stand-in of its own."""
    from gpuscale.dev.standin import OllamaStandin

    env = _demo_env()
    # The demo's pools with a short idle timeout: this test is about Ollama, not about waiting.
    pools = yaml.safe_load((ROOT / "deploy/demo/pools.yaml").read_text())
    for key, rules in pools.items():
        if key.endswith("_scaling") and isinstance(rules, dict):
            rules["scale_down_delay"] = "3s"
    pools_file = tmp_path / "pools.yaml"
    pools_file.write_text(yaml.safe_dump(pools))
    with OllamaStandin(latency_s=0.05) as ollama:
        url = ollama.url
        out = subprocess.run(
            [*GPUSCALE, "demo", "--headless", "--json", "--decks", "1", "--pages", "3",
             "--pools", str(pools_file), "--ollama-host", url, "--data-dir", str(tmp_path / "demo"),
             "--timeout", "120"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=140,
        )  # fmt: skip
        calls = dict(ollama.calls)
    assert out.returncode == 0, out.stderr[-4000:]
    summary = json.loads(out.stdout)
    assert summary["tasks_done"] == summary["tasks_total"] == 11  # 1 batch + feedback + 9 text
    assert summary["ollama"] == url
    assert f"real Ollama at {url}" in out.stderr
    assert "STAND-IN" not in out.stderr
    assert not (tmp_path / "demo" / "logs" / "ollama-standin.log").exists()
    assert sum(n for path, n in calls.items() if path in ("/api/chat", "/api/generate")) >= 11


@pytest.mark.e2e
@pytest.mark.timeout(90)
def test_second_ctrl_c_while_stopping_still_stops_everything(tmp_path: Path) -> None:
    """A Ctrl-C that arrives while the demo is already stopping is only noted: the stop runs to the
    end (children, leftovers, database, targets file, lock), and the exit status is still 130."""
    import fcntl

    data_dir = tmp_path / "demo"
    targets = tmp_path / "targets.json"
    proc, marker = _start_demo(
        data_dir, "--decks", "1", "--pages", "2", "--latency", "0.2", "--prometheus-targets", str(targets)
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # the loop is running once the first progress line shows
            lines.append(line)
            if line.startswith("[") and len([x for x in lines if x.startswith("[")]) == 1:
                proc.send_signal(signal.SIGINT)  # the first Ctrl-C starts the stop
            if "stopping everything" in line:
                proc.send_signal(signal.SIGINT)  # the second lands while children are stopping
                break
        assert "stopping everything" in lines[-1], "".join(lines)
        running = list(environs_with(marker))
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        pg_pid = data_dir / "pg" / "postmaster.pid"
        if pg_pid.exists():  # a stop cut short leaves the database running: do not leak it
            with contextlib.suppress(Exception):
                os.kill(int(pg_pid.read_text().split()[0]), signal.SIGQUIT)
    out = "".join(lines) + out
    _assert_everything_stopped(proc, out, marker, running)
    assert json.loads(targets.read_text()) == [], out  # the last step of the stop ran
    assert not pg_pid.exists(), out  # the embedded PostgreSQL was stopped
    with (data_dir / "demo.lock").open("w") as fh:  # and the data dir is free for the next demo
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
