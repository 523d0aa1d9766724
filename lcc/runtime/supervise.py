"""Supervising the ranks of a run on this machine: the launcher's watch loop.

The processes of a run (Linux): the launcher (`lcc run train`); multiprocessing's fork server, which the
launcher starts with torch imported once; one process per rank, forked by the fork server (so a rank's
parent is the fork server, not the launcher); and multiprocessing's resource tracker. None outlives the
launcher (lcc.runtime.parent_death); the resource tracker exits when the last process holding its pipe has
gone.

Each rank beats a heartbeat into memory shared with the launcher (lcc.runtime.heartbeat), writes its
failure (lcc.runtime.rank_failures) and its stderr into unnamed files (lcc.runtime.rank_link). The launcher
polls them with the ranks' exit codes; it names the rank that failed first on its own, or the rank that
hung (lcc.runtime.hang), writes every traceback and each rank's stderr to a log (lcc.runtime.run_report),
and on SIGINT or SIGTERM stops every rank (lcc.runtime.stop_signals).
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing.connection
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lcc.runtime.hang import HangWatch
from lcc.runtime.heartbeat import Beats
from lcc.runtime.rank_failures import failure_record
from lcc.runtime.rank_link import RankLink, SharedFile
from lcc.runtime.run_report import Verdict, report, stopped
from lcc.runtime.stop_signals import Stop, StopSignals
from lcc.runtime.support import RunError

POLL_S = 0.2  # how often the launcher looks at its ranks
STOP_GRACE_S = 2.0  # SIGTERM, then SIGKILL after this long


class Run:
    """The launcher's side of one run: the links to its ranks, the watch loop, and the report of what ended
    it. `context`: the multiprocessing context that starts the ranks (None: one rank, in this process)."""

    def __init__(self, world: int, timeout_s: float, plan_dir: Path, metrics: Path | None = None,
                 checkpoints: Path | None = None, context: Any = None):
        import lcc

        self.world, self.timeout_s, self.context = world, timeout_s, context
        self.plan_dir, self.metrics, self.checkpoints = Path(plan_dir), metrics, checkpoints
        self.roots = (Path(lcc.__file__).parent, self.plan_dir)
        self.beats = Beats(world, context)
        if context is None:
            self.links = [RankLink(self.beats.rank(r)) for r in range(world)]
        else:
            self.links = [RankLink(self.beats.rank(r), os.getpid(), SharedFile(), SharedFile()) for r in range(world)]
        self.start = time.monotonic()
        self.watchdog_s = math.inf
        self.records: dict[int, dict[str, Any]] = {}
        self.hangs = HangWatch(self.beats, timeout_s)

    def close(self) -> None:
        for link in self.links:
            for f in (link.failure, link.stderr):
                if f is not None:
                    f.close()

    # --------------------------------------------------------------------------- a rank in this process
    @contextlib.contextmanager
    def in_process(self) -> Iterator[RankLink]:
        """Run rank 0 here: SIGINT and SIGTERM stop it (RunStopped), an error becomes the report."""
        with StopSignals(raising=True):
            try:
                yield self.links[0]
            except Stop as stop:
                raise stopped(self, stop.signum) from None
            except KeyboardInterrupt:
                raise stopped(self, signal.SIGINT) from None
            except RunError:
                raise
            except Exception as exc:
                record = failure_record(0, exc, self.roots)
                self.records[0] = record
                raise report(self, Verdict("failed", record=record), [None]) from None

    # ------------------------------------------------------------------------------- ranks of their own
    def supervise(self, target: Callable[..., None], args_of: Callable[[int, RankLink], tuple[Any, ...]],
                  watchdog_s: float, drain_s: float | None = None) -> None:
        """Start one process per rank (`target(*args_of(rank, link))`), watch them until they all finish or
        one fails, hangs or dies, or a signal stops the run; end every one of them; raise the report.
        `drain_s` (a server): a signal goes to rank 0 alone, which ends the run itself (draining its
        requests); the run is over when every rank has exited 0 within `drain_s` seconds and a grace."""
        procs: list[Any] = []
        self.watchdog_s = watchdog_s
        with StopSignals(raising=False) as stop:
            try:
                for rank, link in enumerate(self.links):
                    if stop.signum is not None:
                        break
                    proc = self.context.Process(target=target, args=args_of(rank, link), name=f"lcc-rank{rank}")
                    proc.start()
                    procs.append(proc)
                verdict = self._watch(procs, stop)
                if verdict is not None and verdict.kind == "stopped" and drain_s is not None and \
                        len(procs) == self.world and self._drained(procs, drain_s + STOP_GRACE_S + 5):
                    verdict = None
            finally:
                self._end(procs, gentle=stop.signum is not None)
        codes = [p.exitcode for p in procs]
        if verdict is None:
            for link in self.links:  # warnings and the like, as the ranks wrote them
                text = link.stderr.read() if link.stderr is not None else b""
                if text:
                    sys.stderr.write(text.decode(errors="replace"))
            return
        if verdict.kind == "stopped":
            raise stopped(self, verdict.signum)
        raise report(self, verdict, codes)

    def _watch(self, procs: list[Any], stop: StopSignals) -> Verdict | None:
        grace = min(5.0, max(1.0, self.timeout_s / 2))  # for the cause, after a failure caused by a peer
        peers_failed_at = None
        while True:
            if stop.signum is not None:
                return Verdict("stopped", signum=stop.signum)
            codes = [p.exitcode for p in procs]
            self._read_records()  # after the exit codes: a record written before its rank ended is seen
            now = time.monotonic()
            firsts = [r for r in self.records.values() if not r["secondary"]]
            if firsts:
                return Verdict("failed", record=min(firsts, key=lambda r: r["time"]))
            for rank, code in enumerate(codes):
                if code not in (None, 0) and rank not in self.records:
                    return Verdict("died", rank=rank, code=code)
            if len(procs) == self.world and all(code == 0 for code in codes):
                return None
            hung = self.hangs.hung(procs, [r for r, c in enumerate(codes) if c is None], now, bool(self.records))
            if hung is not None:
                return hung
            if self.records:
                peers_failed_at = peers_failed_at if peers_failed_at is not None else now
                if now - peers_failed_at >= grace:
                    return Verdict("failed", record=min(self.records.values(), key=lambda r: r["time"]))
            if now - self.start > self.watchdog_s:
                return Verdict("watchdog")
            live = [p.sentinel for p in procs if p.exitcode is None]
            if live:
                multiprocessing.connection.wait(live, timeout=POLL_S)
            else:
                time.sleep(POLL_S)

    def _read_records(self) -> None:
        for rank, link in enumerate(self.links):
            if rank in self.records or link.failure is None:
                continue
            data = link.failure.read()
            if data:
                with contextlib.suppress(ValueError):  # still being written: read it next time
                    self.records[rank] = json.loads(data)

    def _drained(self, procs: list[Any], within_s: float) -> bool:
        """SIGTERM to rank 0, then wait for every rank to exit; True if they all exited 0 in time."""
        if procs[0].exitcode is None:
            procs[0].terminate()
        deadline = time.monotonic() + within_s
        while any(p.exitcode is None for p in procs) and time.monotonic() < deadline:
            multiprocessing.connection.wait([p.sentinel for p in procs if p.exitcode is None], timeout=POLL_S)
        return all(p.exitcode == 0 for p in procs)

    def _end(self, procs: list[Any], gentle: bool) -> None:
        """Every rank ends: SIGTERM first when the run was stopped, SIGKILL after a short grace (or at once)."""
        if gentle:
            for p in procs:
                if p.exitcode is None:
                    p.terminate()
            deadline = time.monotonic() + STOP_GRACE_S
            for p in procs:
                p.join(max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.exitcode is None:
                p.kill()
        for p in procs:
            p.join(10)
