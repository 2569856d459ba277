"""An emulator of the DataCrunch container API whose replicas are local worker processes.

It lets the real ``datacrunch`` provider (and the official SDK) run end to end on a laptop and in
the tests; see :mod:`gpuscale.dev.emulator.app` for what it serves and :mod:`.faults` for the faults
it can inject.
"""

from __future__ import annotations

from gpuscale.dev.emulator.app import EmulatorConfig, create_app
from gpuscale.dev.emulator.faults import Faults, FaultSpecError, parse_faults
from gpuscale.dev.emulator.server import Emulator, serve_forever

__all__ = [
    "Emulator",
    "EmulatorConfig",
    "FaultSpecError",
    "Faults",
    "create_app",
    "parse_faults",
    "serve_forever",
]
