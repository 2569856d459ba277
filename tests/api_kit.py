"""A real ``gpuscale api`` process for tests: started on a free port, ready when /api/health is."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

GPUSCALE = str(Path(sys.executable).with_name("gpuscale"))
TOKENS = ("tok-alpha-0123456789", "tok-beta-9876543210")
AUTH = {"Authorization": f"Bearer {TOKENS[0]}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ApiProc:
    """``gpuscale api --port P`` with its output in a log file."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [GPUSCALE, "api", "--port", str(self.port)], env=env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 60.0) -> ApiProc:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"gpuscale api exited {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/api/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"gpuscale api not ready after {timeout_s}s:\n{self.log()}")
            time.sleep(0.05)

    def client(self, token: str | None = TOKENS[0]) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=150)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def api_env(db_env: dict[str, str], root: Path, **extra: str) -> dict[str, str]:
    env = {
        **db_env,
        "GPUSCALE_API_TOKEN": ",".join(TOKENS),
        "GPUSCALE_DOCUMENT_ROOT": str(root),
        "GPUSCALE_LOG_LEVEL": "INFO",
        **extra,
    }
    env.pop("GPUSCALE_API_HOST", None)
    return env
