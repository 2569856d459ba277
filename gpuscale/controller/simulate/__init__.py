"""Replay simulator: replays a task trace against the real scaling policy with a virtual clock.

* :mod:`.trace` — the trace CSV format (read, validate, write).
* :mod:`.generate` — realistic traces from the seeds' numbers (decks of ~30 pages in bursts).
* :mod:`.engine` — the discrete-event replay: replicas with cold starts, processor sharing on
  each replica's GPU, the task graph, and :func:`gpuscale.controller.policy.decide` every tick.
* :mod:`.report` — the summary (costs, waits, completion times, scale events) as text or JSON.
* :mod:`.plot` — queue depth and replicas per pool over time (matplotlib).
"""

from gpuscale.controller.simulate.engine import POLICIES, SimResult, simulate
from gpuscale.controller.simulate.trace import TraceError, TraceTask, read_trace, write_trace

__all__ = ["POLICIES", "SimResult", "TraceError", "TraceTask", "read_trace", "simulate", "write_trace"]
