"""Spans for `lcc run train --trace` (lcc.runtime.trace): when a runtime turns recording on, the overlapped
exchange notes when each all-to-all begins and when its rows have arrived (a callback on the work's future,
so the span ends when the data is there, not when the program next looks), and the experts their compute.
Off, it costs one check per call."""

from __future__ import annotations

import time
from typing import Any

SPANS: list[tuple[str, str, int, int]] | None = None  # (track, name, start ns, end ns), wall clock


def now() -> int:
    """Wall-clock nanoseconds: comparable between the ranks' processes on one machine."""
    return time.time_ns()


def record(track: str, name: str, start: int, end: int) -> None:
    if SPANS is not None:
        SPANS.append((track, name, start, end))


def on_arrival(work: Any, name: str) -> None:
    """Record the span of an exchange from now until its work completes."""
    if SPANS is None or work is None:
        return
    start = now()
    work.get_future().add_done_callback(lambda _: record("exchange", name, start, now()))
