"""``gpuscale demo``: the whole loop on one machine, no GPU needed.

The demo is an orchestrator of the real programs, each a subprocess started through the real CLI:
the embedded PostgreSQL and ``gpuscale db migrate``, the Ollama stand-in (``python -m
worker.standin``, or a real Ollama with ``--ollama-host``), the DataCrunch emulator (``gpuscale
emulator``, whose replicas are ``gpuscale worker`` processes), and ``gpuscale controller`` with the
demo pool rules.  It submits generated sample decks, shows a live view of the pools, and ends with
a summary.

- :mod:`controller.demo.decks`: sample pitch-deck PDFs (fpdf2);
- :mod:`controller.demo.procs`: child processes, each in its own process group, always stopped;
- :mod:`controller.demo.view`: the live rich view;
- :mod:`controller.demo.summary`: what the run cost and how it went (text and JSON);
- :mod:`controller.demo.run`: the orchestration.
"""
