"""Errors that any layer may raise and the CLI turns into a one-line message and exit 2."""


class ConfigError(Exception):
    """Bad configuration or arguments found after parsing: printed, then exit 2."""
