"""gpuscale worker: the runtime inside the visual and text GPU containers."""

from controller import __version__

__all__ = ["__version__"]
