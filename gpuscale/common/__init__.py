"""Shared building blocks with no dependency on the rest of gpuscale."""
