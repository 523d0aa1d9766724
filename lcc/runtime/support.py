"""Errors of a run: what `lcc run` reports to the user (the failing rank and its message)."""

from __future__ import annotations


class RunError(RuntimeError):
    """A run that cannot start or that ended with a rank's failure; its text is for the user."""
