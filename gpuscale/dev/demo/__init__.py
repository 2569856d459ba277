"""``gpuscale demo``: the whole loop on one machine, no GPU needed.

The demo is an orchestrator of the real programs, each a subprocess started through the real CLI:
the embedded PostgreSQL and ``gpuscale db migrate``, the Ollama stand-in (``python -m
gpuscale.dev.standin``, or a real Ollama with ``--ollama-host``), the DataCrunch emulator (``gpuscale
emulator``, whose replicas are ``gpuscale worker`` processes), and ``gpuscale controller`` with the
demo pool rules.  It submits generated sample decks, shows a live view of the pools, and ends with
a summary.

- :mod:`gpuscale.dev.demo.decks`: sample pitch-deck PDFs (fpdf2);
- :mod:`gpuscale.dev.stack` (shared with the end-to-end tests): brings the child processes up and down;
- :mod:`gpuscale.dev.demo.view`: the live rich view;
- :mod:`gpuscale.dev.demo.summary`: what the run cost and how it went (text and JSON);
- :mod:`gpuscale.dev.demo.run`: the orchestration.
"""
