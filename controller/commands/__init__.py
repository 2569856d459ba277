"""CLI command groups, one module per area; :mod:`controller.cli` assembles them."""
