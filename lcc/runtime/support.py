"""Errors of a run: what `lcc run` reports to the user (the failing rank and its message)."""

from __future__ import annotations


class RunError(RuntimeError):
    """A run that cannot start or that ended with a rank's failure; its text is for the user, `exit_code`
    for `lcc run`'s exit."""

    exit_code = 1


class RunStopped(RunError):
    """A run stopped by a signal (SIGINT, SIGTERM): where it stopped; exit code 128 + the signal's number."""

    def __init__(self, text: str, exit_code: int):
        super().__init__(text)
        self.exit_code = exit_code
