"""What ended a run, for the user: one line naming the rank that failed first on its own, died or hung (or
the signal that stopped the run, or its watchdog), and a log with every traceback, each rank's last
heartbeat and its stderr, written where the user will look (next to the metrics or checkpoints)."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lcc.runtime.heartbeat import Beat
from lcc.runtime.rank_failures import failure_text
from lcc.runtime.support import RunError, RunStopped

if TYPE_CHECKING:
    from lcc.runtime.supervise import Run


@dataclass
class Verdict:
    """Why the watch loop ended a run: `kind` (stopped, failed, died, hung, watchdog) and what it knows."""

    kind: str
    signum: int = 0
    record: dict[str, Any] | None = None
    rank: int = 0
    code: int = 0
    age: float = 0.0
    beat: Beat | None = None
    stopped: bool = False


def stopped(run: Run, signum: int) -> RunStopped:
    """A run a signal stopped: at which step, and the checkpoint to resume from."""
    steps = run.beats.completed()
    done = f"stopped at step {steps}" if steps is not None else "stopped while starting"
    return RunStopped(f"{done}; {_last_checkpoint(run.checkpoints)}", 128 + signum)


def _last_checkpoint(checkpoints: Path | None) -> str:
    if checkpoints is None:
        return "no checkpoint (no checkpoint dir)"
    from lcc.runtime.checkpoint_dir import latest

    try:
        path = latest(Path(checkpoints))
    except (OSError, ValueError, RunError):
        path = None
    if path is None:
        return f"no checkpoint in {checkpoints}"
    step = path.name.removeprefix("step-")
    return f"last checkpoint step {int(step) if step.isdigit() else step} ({path})"


def _summary(run: Run, verdict: Verdict) -> str:
    if verdict.kind == "failed":
        return failure_text(verdict.record)
    if verdict.kind == "died":
        name = ""
        if verdict.code < 0:
            with contextlib.suppress(ValueError):
                name = f" (killed by {signal.Signals(-verdict.code).name})"
        return f"rank {verdict.rank} exited with code {verdict.code}{name}"
    if verdict.kind == "hung":
        state = "; its process is stopped (SIGSTOP, or a debugger)" if verdict.stopped else ""
        return (f"rank {verdict.rank} hung: no progress for {verdict.age:.1f} s (last at "
                f"{verdict.beat.where()}){state}")
    return f"the run did not finish within its watchdog time ({run.watchdog_s:.0f} s)"


def report(run: Run, verdict: Verdict, codes: list[int | None]) -> RunError:
    """The error that ends the launch: the summary line, and where the full log is."""
    summary = _summary(run, verdict)
    return RunError(f"{summary}\nfull tracebacks: {_write_log(run, summary, verdict, codes)}")


def _log_text(run: Run, summary: str, verdict: Verdict, codes: list[int | None]) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    ranks = f"{run.world} rank{'s' if run.world != 1 else ''}"
    parts = [f"lcc run train {run.plan_dir} ({ranks}), ended {stamp}", summary, ""]
    for record in sorted(run.records.values(), key=lambda r: r["time"]):
        role = ("the cause" if record is verdict.record
                else "because of a peer" if record["secondary"] else "a later failure")
        parts += [f"== rank {record['rank']} failed {record['time'] - run.start:+.2f} s after the start "
                  f"({role})", record["traceback"].rstrip(), ""]
    now = time.monotonic()
    parts.append("== heartbeats at the end")
    for rank in range(run.world):
        beat = run.beats.read(rank)
        moved = f"{now - beat.time:.1f} s before" if not math.isnan(beat.time) else "never beat"
        code = f", exit code {codes[rank]}" if rank < len(codes) and codes[rank] is not None else ""
        parts.append(f"rank {rank}: {beat.where() or 'starting'} ({moved}{code})")
    parts.append("")
    for rank, link in enumerate(run.links):
        text = link.stderr.read().decode(errors="replace") if link.stderr is not None else ""
        if text.strip():
            parts += [f"== stderr of rank {rank}", text.rstrip(), ""]
    return "\n".join(parts) + "\n"


def _write_log(run: Run, summary: str, verdict: Verdict, codes: list[int | None]) -> str:
    """The log next to the metrics or the checkpoint folder, else in a folder of its own under the
    system's temporary folder (kept: it is the log); its path, or why it could not be written."""
    text = _log_text(run, summary, verdict, codes)
    name = f"lcc-run-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{os.getpid()}.log"
    places = []
    if run.metrics is not None and Path(run.metrics).parent.is_dir() and (
            Path(run.metrics).is_file() or not Path(run.metrics).exists()):
        places.append(Path(run.metrics).parent)
    if run.checkpoints is not None and Path(run.checkpoints).parent.is_dir():
        places.append(Path(run.checkpoints).parent)
    problem: OSError | None = None
    for place in [*places, None]:
        try:
            if place is None:
                place = Path(tempfile.mkdtemp(prefix=name.removesuffix(".log") + "-"))
            (place / name).write_text(text)
            return str(place / name)
        except OSError as exc:
            problem = exc
    return f"not written ({problem})"
