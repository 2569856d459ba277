"""gpuscale: an autoscaling controller for on-demand GPU containers, driven by a PostgreSQL task queue.

Packages import one way, each only from those listed before it:

- :mod:`gpuscale.common`: settings, logging, errors, the ASGI server and process-group helpers;
- :mod:`gpuscale.db`: the database seam (named SQL, one connector, migrations, embedded server);
- :mod:`gpuscale.queue`: tasks, the replica registry and the task-type catalogue;
- :mod:`gpuscale.controller` and :mod:`gpuscale.worker`: the two processes of the product;
- :mod:`gpuscale.dev`: development tools (emulator, Ollama stand-in, demo stack), not in the images;
- :mod:`gpuscale.cli`: the ``gpuscale`` command, imported by nothing.
"""

__version__ = "0.2.0"
