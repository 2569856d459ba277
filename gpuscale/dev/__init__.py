"""Development tools: the DataCrunch emulator, the Ollama stand-in and the demo stack.

No product module imports this package (only the CLI does, to offer ``demo`` and ``emulator``), and
the worker images leave it out.
"""
