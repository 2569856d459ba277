"""Development tools: the DataCrunch emulator, the Ollama stand-in, the demo stack, ``replay`` and
the queue and fleet benchmarks.

No product module imports this package (only the CLI does, to offer ``demo`` and ``emulator``), and
the worker images leave it out.
"""
