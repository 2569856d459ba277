"""``python -m controller`` is ``gpuscale``."""

from controller.cli import main

main()
