"""A rank's failure as its launcher records it: the error, when it happened, where in lcc's code or the
plan's programs, and whether the rank failed only because a peer did (so that the cause is named, not the
ranks that gave up waiting for it)."""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lcc.runtime.support import RunError

# a peer went away, or did not answer within the timeout (gloo raises these as RuntimeError too)
PEER_GONE = ("Connection closed by peer", "Connection reset", "Broken pipe", "Timed out waiting")
ERROR_LINES = 6  # of an error's message, in the report (all of it is in the log)


def secondary(exc: BaseException) -> bool:
    """A rank that fails only because a peer went away or did not answer: not the cause to show while there
    is another."""
    try:
        import torch.distributed as dist

        if isinstance(exc, dist.DistError):
            return True
    except ImportError:
        pass
    return any(s in str(exc) for s in PEER_GONE)


def describe(exc: BaseException) -> str:
    """`Type: message`; lcc's own errors for the user (RunError) without the type."""
    text = str(exc).strip()
    if isinstance(exc, RunError):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _shown(path: str) -> str:
    import lcc

    real = os.path.realpath(path)
    for base in (os.path.dirname(os.path.dirname(os.path.realpath(lcc.__file__))), os.getcwd()):
        if real.startswith(base + os.sep):
            return os.path.relpath(real, base)
    return path


def innermost(exc: BaseException, roots: Sequence[Path]) -> str | None:
    """The innermost frame of `exc`'s traceback in lcc's own code or in the plan's programs (under `roots`),
    as `file:line in function`."""
    bases = [os.path.realpath(r) + os.sep for r in roots]
    found = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if any(os.path.realpath(frame.filename).startswith(b) for b in bases):
            found = frame
    return f"{_shown(found.filename)}:{found.lineno} in {found.name}" if found is not None else None


def failure_record(rank: int, exc: BaseException, roots: Sequence[Path]) -> dict[str, Any]:
    return {"rank": rank, "time": time.monotonic(), "secondary": secondary(exc), "error": describe(exc),
            "where": None if isinstance(exc, RunError) else innermost(exc, roots),
            "traceback": "".join(traceback.format_exception(exc))}


def failure_text(record: dict[str, Any]) -> str:
    """`rank R failed: Type: message`, and where in lcc's code or the plan's programs."""
    lines = record["error"].splitlines() or [""]
    text = "\n".join(lines[:ERROR_LINES]) + ("\n  ..." if len(lines) > ERROR_LINES else "")
    where = f"\n  at {record['where']}" if record.get("where") else ""
    return f"rank {record['rank']} failed: {text}{where}"
