"""The end-to-end tests' stack: real processes around the test's PostgreSQL.

The bring-up is the demo's (:class:`gpuscale.dev.stack.Stack`); this adds what only the tests
need.  :class:`Stack` starts the DataCrunch emulator (``gpuscale emulator``, replicas are real
``gpuscale worker`` processes), creates the deployments with ``gpuscale deploy apply``, and runs
one or more ``gpuscale controller`` processes with the ``datacrunch`` provider pointed at the
emulator, all with short leases and heartbeats so that failures heal within seconds.  Work is
``noop`` tasks on the ``bench`` pool (no Ollama needed).  It also installs an audit trigger that
records every status change into or out of ``done``, so tests can prove that no task was
completed twice, and it knows the secrets it handed out so tests can search for them.

Every child carries ``GPUSCALE_DEMO_RUN=<id>``; :meth:`Stack.stop` stops them and kills (and
reports) anything of the run still alive.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import yaml

from gpuscale.common.processes import ProcessGroup
from gpuscale.controller import deployspec
from gpuscale.db.connector import init_connection
from gpuscale.dev.stack import Stack as DevStack
from gpuscale.queue import NewTask, Priority, Queue

ROOT = Path(__file__).resolve().parent.parent
CLIENT_SECRET = "e2e-client-secret-0c1f9a77"
WORKER_TOKEN = "e2e-worker-token-5d2b8e10"
DB_PASSWORD = "e2e-db-password-7e41b2c9"
DB_USER = "gpuscale_e2e"
SECRETS = (CLIENT_SECRET, WORKER_TOKEN, DB_PASSWORD)
BENCH = "e2e-bench"

POOLS = """
bench_scaling:
  min_replicas: 0
  max_replicas: 4
  scale_up_threshold: 1
  scale_up_delay: 1s
  scale_down_delay: 5s
  startup_timeout: 30s
  tasks_per_replica: 4
  deployment: e2e-bench
  cold_start: 2s
  default_task_duration: 0.5s
  drain_target: 5s
  startup_backoff: 2s
  max_startup_backoff: 10s
visual_container_scaling:
  min_replicas: 0
  max_replicas: 1
  deployment: e2e-visual
text_container_scaling:
  min_replicas: 0
  max_replicas: 1
  deployment: e2e-text
reconcile_interval: 1s
"""

AUDIT_SQL = """
CREATE TABLE e2e_done_audit (
    task_id bigint NOT NULL,
    old_status text NOT NULL,
    new_status text NOT NULL,
    old_result jsonb,
    new_result jsonb,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE FUNCTION e2e_done_audit_fn() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status::text = 'done' OR OLD.status::text = 'done' THEN
        INSERT INTO e2e_done_audit (task_id, old_status, new_status, old_result, new_result)
        VALUES (NEW.id, OLD.status::text, NEW.status::text, OLD.result, NEW.result);
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER e2e_done_audit AFTER UPDATE ON processing_queue
    FOR EACH ROW EXECUTE FUNCTION e2e_done_audit_fn();
"""


# A short leader lease, so a failover takes seconds (the defaults are client-go's 15/10/2 s).
# GPUSCALE_E2E_LEASE="15,10,2" runs the tests with other timings (to measure takeovers).
LEASE_DURATION_S, RENEW_DEADLINE_S, RETRY_PERIOD_S = (
    float(x) for x in os.environ.get("GPUSCALE_E2E_LEASE", "3,2,0.5").split(",")
)
LEASE_ENV = {
    "GPUSCALE_LEADER_LEASE_DURATION_S": str(LEASE_DURATION_S),
    "GPUSCALE_LEADER_RENEW_DEADLINE_S": str(RENEW_DEADLINE_S),
    "GPUSCALE_LEADER_RETRY_PERIOD_S": str(RETRY_PERIOD_S),
}

SHARED_VOLUME = "e2e-shared"
# (pool, deployment, worker concurrency, spot) of the stack's deployments.
DEPLOYMENTS: tuple[tuple[str, str, int, bool], ...] = (
    ("bench", BENCH, 4, False),
    ("visual", "e2e-visual", 1, False),
    ("text", "e2e-text", 1, False),
)


def _spec(pool: str, name: str, concurrency: int, spot: bool = False) -> dict[str, Any]:
    spec = deployspec.load_file(ROOT / "deploy" / "datacrunch" / "visual.yaml")
    spec.pop(deployspec.SLOTS_KEY, None)  # one plain deployment each: the tests read its replicas
    spec["name"] = name
    spec["is_spot"] = spot  # the template is the preferred (spot) visual deployment
    env = [
        e for e in spec["containers"][0]["env"] if e["name"] not in ("GPUSCALE_POOL", "GPUSCALE_LOG_FORMAT")
    ]
    env += [
        {"name": "GPUSCALE_POOL", "value_or_reference_to_secret": pool, "type": "plain"},
        {
            "name": "GPUSCALE_WORKER_CONCURRENCY",
            "value_or_reference_to_secret": str(concurrency),
            "type": "plain",
        },
    ]
    spec["containers"][0]["env"] = env
    return spec


@dataclass
class Outcome:
    statuses: dict[str, int]
    attempts: int
    entered_done: list[int]  # task ids, once per transition into 'done'
    touched_after_done: list[dict[str, Any]]  # audit rows of updates to a task already done


class Stack(DevStack):
    def __init__(
        self,
        dsn: str,
        workdir: Path,
        *,
        pools_yaml: str = POOLS,
        controllers: int = 1,
        deployments: Sequence[tuple[str, str, int, bool]] = DEPLOYMENTS,
        standin_models: Sequence[str] = (),
        standin_latency_s: float = 1.0,
    ) -> None:
        self.deployments = tuple(deployments)
        self.standin_models = tuple(standin_models)
        self.standin_latency_s = standin_latency_s
        # The shared filesystem the deployments mount, as the emulator maps it on this host: a
        # deck submitted with this as its document root is read by the replicas through theirs.
        self.document_root = workdir / "shared" / SHARED_VOLUME / "uploads"
        self.dsn = dsn
        self.workdir = workdir
        self.pools_yaml = pools_yaml
        self.n_controllers = controllers
        self.db: asyncpg.Pool | None = None
        self.queue: Queue | None = None
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUSCALE_", "DATACRUNCH_"))}
        env.update(
            {
                "GPUSCALE_DATABASE_URL": dsn,
                "GPUSCALE_WORKER_TOKEN": WORKER_TOKEN,
                "GPUSCALE_WORKER_HOST": "127.0.0.1",
                "GPUSCALE_WORKER_PORT": "0",
                # Short leases and heartbeats, so a dead worker's tasks come back within seconds.
                "GPUSCALE_LEASE_SECONDS": "3",
                "GPUSCALE_HEARTBEAT_INTERVAL_S": "0.5",
                "GPUSCALE_POLL_INTERVAL_S": "0.5",
                "GPUSCALE_DRAIN_GRACE_S": "5",
                "PYTHONUNBUFFERED": "1",
                # `deploy apply` fills the specs' shared-volume placeholder with it.
                "GPUSCALE_SHARED_VOLUME_ID": SHARED_VOLUME,
            }
        )
        super().__init__(log_dir=workdir / "logs", env=env, client_id="e2e", client_secret=CLIENT_SECRET)
        self.controller_env = {
            "GPUSCALE_POOLS_FILE": str(workdir / "pools.yaml"),
            "GPUSCALE_HEARTBEAT_TIMEOUT_S": "3",
            "GPUSCALE_REAPER_INTERVAL_S": "1",
            **LEASE_ENV,
        }

    @property
    def emulator(self) -> str:
        return self.emulator_url

    async def start(self) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            await conn.execute(AUDIT_SQL)
            # Every process connects as a role with a password, so a DSN printed anywhere would
            # show it (the embedded server trusts local connections; the password still travels).
            exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", DB_USER)
            if not exists:
                await conn.execute(f"CREATE ROLE {DB_USER} LOGIN SUPERUSER PASSWORD '{DB_PASSWORD}'")
        finally:
            await conn.close()
        parts = urlsplit(self.dsn)
        host = parts.netloc.rpartition("@")[2]
        self.dsn = urlunsplit(
            (parts.scheme, f"{DB_USER}:{DB_PASSWORD}@{host}", parts.path, parts.query, parts.fragment)
        )
        self.env["GPUSCALE_DATABASE_URL"] = self.dsn
        (self.workdir / "pools.yaml").write_text(self.pools_yaml)
        spec_files = []
        for pool, name, conc, spot in self.deployments:
            path = self.workdir / f"{name}.yaml"
            path.write_text(yaml.safe_dump(_spec(pool, name, conc, spot), sort_keys=False))
            spec_files.append(path)

        if self.standin_models:
            await self.start_standin(self.standin_models, latency_s=self.standin_latency_s)
        await self.start_emulator(cold_start_s=1, grace_s=8, shared_dir=self.workdir / "shared")
        await self.apply_deployments(spec_files)
        for i in range(self.n_controllers):
            await self.start_controller(f"controller-{i + 1}")
        for name in self.controllers:
            await self.wait_controller(name)
        self.db = await asyncpg.create_pool(self.dsn, min_size=1, max_size=3, init=init_connection)
        assert self.db is not None
        self.queue = Queue(self.db)

    async def start_controller(
        self, name: str = "controller", *, env: Mapping[str, str] | None = None, port: int = 0
    ) -> ProcessGroup:
        return await super().start_controller(name, env={**self.controller_env, **(env or {})}, port=port)

    # ------------------------------------------------------------------ work

    async def enqueue_noop(self, n: int, *, seed: int = 7, low: float = 0.2, high: float = 1.2) -> list[int]:
        assert self.queue is not None
        rnd = random.Random(seed)
        tasks = [
            NewTask(
                "noop",
                {"sleep_s": round(rnd.uniform(low, high), 2)},
                priority=Priority.high if i % 10 == 0 else Priority.normal,
                max_attempts=25,  # a task may be caught in several failures; it must still finish
            )
            for i in range(n)
        ]
        return await self.queue.enqueue_many(tasks)

    async def unfinished(self, ids: Sequence[int]) -> int:
        assert self.db is not None
        return int(
            await self.db.fetchval(
                "SELECT count(*) FROM processing_queue WHERE id = ANY($1::bigint[])"
                " AND status NOT IN ('done', 'failed', 'dead', 'cancelled')",
                list(ids),
            )
        )

    async def claimable(self, pool: str = "bench") -> int:
        assert self.db is not None
        return int(
            await self.db.fetchval(
                "SELECT count(*) FROM processing_queue WHERE pool = $1 AND status = 'queued'"
                " AND (not_before IS NULL OR not_before <= now())",
                pool,
            )
        )

    async def replicas(self, deployment: str = BENCH) -> list[dict[str, Any]]:
        return await super().replicas(deployment)

    async def wait_replicas_zero(
        self, timeout_s: float = 60.0, deployment: str = BENCH
    ) -> list[dict[str, Any]]:
        for _ in range(int(timeout_s / 0.5)):
            left = await self.replicas(deployment)
            if not left:
                return []
            await asyncio.sleep(0.5)
        return await self.replicas(deployment)

    async def outcome(self, ids: Sequence[int]) -> Outcome:
        assert self.db is not None
        rows = await self.db.fetch(
            "SELECT status::text AS status, attempts FROM processing_queue WHERE id = ANY($1::bigint[])",
            list(ids),
        )
        audit = await self.db.fetch(
            "SELECT task_id, old_status, new_status FROM e2e_done_audit WHERE task_id = ANY($1::bigint[])",
            list(ids),
        )
        statuses: dict[str, int] = {}
        for r in rows:
            statuses[r["status"]] = statuses.get(r["status"], 0) + 1
        return Outcome(
            statuses=statuses,
            attempts=sum(r["attempts"] for r in rows),
            entered_done=[
                a["task_id"] for a in audit if a["new_status"] == "done" and a["old_status"] != "done"
            ],
            touched_after_done=[dict(a) for a in audit if a["old_status"] == "done"],
        )

    async def role(self, controller: str) -> str | None:
        """'leader' or 'standby' from /readyz, None when it does not answer."""
        try:
            return str((await self.http.get(self.controller_urls[controller] + "/readyz")).json()["role"])
        except (httpx.HTTPError, ValueError, KeyError):
            return None

    # ------------------------------------------------------------------ secrets

    async def api_texts(self) -> list[str]:
        """Every ops answer a person or Prometheus could read: the live controllers' and the
        registered workers' HTTP APIs."""
        urls = [
            url + path
            for url in self.controller_urls.values()
            for path in ("/metrics", "/api/pools", "/api/servers", "/api/events?limit=200", "/readyz")
        ]
        if self.queue is not None:
            for server in await self.queue.list_servers():
                port = (server.capabilities or {}).get("http_port")
                if port:
                    urls += [f"http://127.0.0.1:{port}{path}" for path in ("/metrics", "/api/health")]
        texts = []
        for url in urls:
            try:
                texts.append((await self.http.get(url)).text)
            except httpx.HTTPError:
                pass
        return texts

    def leaked(self, texts: list[str]) -> list[str]:
        """Which secrets (by name) show up in any of ``texts``."""
        names = {
            "client secret": CLIENT_SECRET,
            "worker token": WORKER_TOKEN,
            "database password": DB_PASSWORD,
        }
        return sorted(name for name, value in names.items() if any(value in t for t in texts))

    # ------------------------------------------------------------------ the end

    async def stop(self) -> list[int]:
        """Stop everything; returns the pids of processes of this run that had to be killed after."""
        if self.db is not None:
            await self.db.close()
            self.db = None
        return await super().stop()
