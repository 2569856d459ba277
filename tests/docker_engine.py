"""A real Docker engine for the tests: its own ``dockerd`` in a temporary folder, and a tiny image.

``DockerEngine.start()`` runs Debian's ``dockerd`` as root with no iptables, no bridge and its own
data root, exec root, pid file and socket, so several test sessions (and the host's own engine,
if any) never meet.  Image pulls cannot work here (no registry), so ``import_busybox()`` builds
an image from a busybox-static root filesystem with ``docker import``.  Containers must use
``network_mode`` ``host`` or ``none`` (there is no bridge).

``docker_engine`` is the session fixture: it fails (not skips) when ``CI=true`` and the engine
cannot start, and skips with the reason otherwise.  Import it from a test module, or use
``pytest_plugins = ["tests.docker_engine"]``.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

BUSYBOX_IMAGE = "gpuscale-test-busybox:latest"
# Applets the tests' containers use; each becomes a symlink to the static busybox binary.
APPLETS = ("sh", "sleep", "true", "false", "echo", "cat", "env", "kill", "ps")


class EngineUnavailable(RuntimeError):
    """dockerd is missing or did not come up."""


@dataclass
class DockerEngine:
    root: Path
    process: subprocess.Popen[bytes] | None = None
    storage_driver: str = "overlay2"

    @property
    def socket(self) -> Path:
        return self.root / "docker.sock"

    @property
    def base_url(self) -> str:
        return f"unix://{self.socket}"

    def start(self, timeout_s: float = 30.0, storage_driver: str = "overlay2") -> None:
        dockerd = shutil.which("dockerd")
        if dockerd is None:
            raise EngineUnavailable("dockerd is not installed (apt-get install docker.io)")
        if os.geteuid() != 0:
            raise EngineUnavailable("dockerd needs root here")
        for sub in ("data", "exec"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        log = open(self.root / "dockerd.log", "ab")  # dockerd keeps its own copy
        self.process = subprocess.Popen(
            [
                dockerd,
                "--iptables=false",
                "--ip6tables=false",
                "--bridge=none",
                f"--storage-driver={storage_driver}",
                f"--data-root={self.root / 'data'}",
                f"--exec-root={self.root / 'exec'}",
                f"--pidfile={self.root / 'dockerd.pid'}",
                "-H",
                self.base_url,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        import docker

        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EngineUnavailable(f"dockerd exited ({self.process.returncode}): {self.log_tail()}")
            if self.socket.exists():
                try:
                    client = docker.DockerClient(base_url=self.base_url, timeout=5)
                    client.ping()
                    client.close()
                    return
                except Exception:
                    pass
            time.sleep(0.05)
        self.stop()
        raise EngineUnavailable(f"dockerd did not answer within {timeout_s:.0f}s: {self.log_tail()}")

    def log_tail(self, lines: int = 8) -> str:
        try:
            return " | ".join((self.root / "dockerd.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def client(self):  # type: ignore[no-untyped-def]
        import docker

        return docker.DockerClient(base_url=self.base_url, timeout=60)

    def import_busybox(self, tag: str = BUSYBOX_IMAGE) -> str:
        """A minimal image: the static busybox binary as /bin/busybox plus applet symlinks."""
        busybox = Path("/bin/busybox") if Path("/bin/busybox").exists() else shutil.which("busybox")
        if busybox is None:
            raise EngineUnavailable("busybox is not installed (apt-get install busybox-static)")
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for folder in ("bin", "tmp", "proc", "sys", "dev", "etc"):
                info = tarfile.TarInfo(folder)
                info.type = tarfile.DIRTYPE
                info.mode = 0o1777 if folder == "tmp" else 0o755
                tar.addfile(info)
            tar.add(str(busybox), arcname="bin/busybox")
            for applet in APPLETS:
                info = tarfile.TarInfo(f"bin/{applet}")
                info.type = tarfile.SYMTYPE
                info.linkname = "busybox"
                tar.addfile(info)
        repository, _, version = tag.partition(":")
        client = self.client()
        try:
            client.api.import_image_from_data(
                buffer.getvalue(), repository=repository, tag=version or "latest"
            )
        finally:
            client.close()
        return tag

    def remove_all_containers(self) -> None:
        client = self.client()
        try:
            for container in client.containers.list(all=True):
                with contextlib.suppress(Exception):
                    container.remove(force=True)
        finally:
            client.close()

    def stop(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(Exception):
            self.remove_all_containers()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None


@contextlib.contextmanager
def running_engine() -> Iterator[DockerEngine]:
    """dockerd with overlay2 (measured here: up in under a second); where the kernel refuses
    overlay2, a fresh engine with vfs (slower, always works).  Stopped and removed on exit."""
    errors = []
    for driver in ("overlay2", "vfs"):
        # A short path: the socket path must fit in a sockaddr_un (108 bytes).
        root = Path(tempfile.mkdtemp(prefix="gsdk-", dir="/tmp"))
        engine = DockerEngine(root)
        try:
            try:
                engine.start(storage_driver=driver)
                engine.storage_driver = driver
            except EngineUnavailable as exc:
                errors.append(f"{driver}: {exc}")
                continue
            engine.import_busybox()
            yield engine
            return
        finally:
            engine.stop()
            # dockerd unmounts its layers on shutdown; anything left is not worth failing over.
            subprocess.run(["umount", "-R", str(root / "data")], capture_output=True, check=False)
            shutil.rmtree(root, ignore_errors=True)
    raise EngineUnavailable("; ".join(errors))


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[DockerEngine]:
    """A running dockerd with the busybox image; CI=true makes a failure to start a test failure."""
    try:
        context = running_engine()
        engine = context.__enter__()
    except EngineUnavailable as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"the Docker engine is required in CI and could not start: {exc}")
        pytest.skip(f"no Docker engine here: {exc}")
    try:
        yield engine
    finally:
        context.__exit__(None, None, None)
