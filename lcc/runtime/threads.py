"""How many intra-op threads each local rank runs: the cores this process may use (its CPU affinity, which
taskset and container CPU sets narrow; not the machine's count) shared among the ranks, at least one.

`LCC_THREADS` sets the number per rank instead, for a machine shared with other jobs: threads that spin
waiting for a core another process holds make a step many times slower than one thread would.
"""

from __future__ import annotations

import os

ENV = "LCC_THREADS"


def usable_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def threads_per_rank(ranks: int) -> int:
    """Intra-op threads for each of `ranks` processes on this machine (`LCC_THREADS`, or the usable cores
    divided among them)."""
    chosen = os.environ.get(ENV)
    if chosen is not None:
        if not chosen.strip().isdigit() or int(chosen) < 1:
            from lcc.runtime.preflight import LaunchRefused  # which imports this module

            raise LaunchRefused(f"{ENV}={chosen!r}: the threads per rank must be a positive whole number")
        return int(chosen)
    return max(1, usable_cores() // max(1, ranks))
