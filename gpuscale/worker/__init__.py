"""The worker: the runtime inside the visual and text GPU containers."""
