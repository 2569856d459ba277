"""The container health check: ``python -m gpuscale.worker.healthcheck`` exits 0 when the worker is ready.

It asks the worker's own ``GET /api/health`` on loopback (port ``GPUSCALE_WORKER_PORT``, 8001, or
the port the worker wrote to ``GPUSCALE_WORKER_PORT_FILE`` when that is 0) and
uses only the standard library, so a check every few seconds costs a few milliseconds of CPU.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    port = os.environ.get("GPUSCALE_WORKER_PORT", "8001") or "8001"
    port_file = os.environ.get("GPUSCALE_WORKER_PORT_FILE")
    if port == "0" and port_file:
        # The worker picked a free port and wrote it down.
        try:
            with open(port_file) as fh:
                port = fh.read().strip()
        except OSError:
            print("starting: no port file yet")
            return 1
    url = f"http://127.0.0.1:{port}/api/health"
    try:
        with urllib.request.urlopen(url, timeout=4) as resp:  # a fixed loopback URL
            body = json.loads(resp.read() or b"{}")
            print(body.get("status", "ready"))
            return 0
    except urllib.error.HTTPError as exc:  # 503: starting, draining, Ollama unreachable
        try:
            print(json.loads(exc.read() or b"{}").get("status", exc.code))
        except ValueError:
            print(exc.code)
        return 1
    except (OSError, ValueError) as exc:
        print(f"unreachable: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
