"""``python -m gpuscale.cli`` is ``gpuscale``."""

from gpuscale.cli.app import main

main()
