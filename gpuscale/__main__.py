"""``python -m gpuscale`` is ``gpuscale``."""

from gpuscale.cli.app import main

main()
