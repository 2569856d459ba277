"""The ``gpuscale`` command line: typer commands, one module per area.  Nothing imports it."""
