"""Stop strings over text that arrives a token's piece at a time.

A sequence's text is searched only where a stop string can still begin: the new piece and the characters
held back before it (at most the longest stop string's length - 1, which could be the start of one).
Everything before those has been searched and handed out already, so the work per token does not grow
with the length of the text.
"""

from __future__ import annotations

from collections.abc import Sequence


def first_stop(window: str, stops: Sequence[str]) -> int:
    """Where the earliest of `stops` begins in `window`; -1 if none is in it."""
    return min((i for i in (window.find(s) for s in stops) if i >= 0), default=-1)


class StopScan:
    """One sequence's text on its way out: what can be handed out now, what is held back because it could
    still become the beginning of a stop string, and whether a stop string has ended the text."""

    def __init__(self, stops: Sequence[str]):
        self.stops = list(stops)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.held = ""

    def add(self, new: str) -> tuple[str, bool]:
        """The text that can go out now, and True when a stop string ended the text (the text ends before
        it; what follows is dropped)."""
        window = self.held + new
        at = first_stop(window, self.stops) if self.stops else -1
        if at >= 0:
            self.held = ""
            return window[:at], True
        safe = max(0, len(window) - self.hold)
        self.held = window[safe:]
        return window[:safe], False

    def flush(self) -> str:
        """What was held back (the sequence ends without a stop string)."""
        out, self.held = self.held, ""
        return out
