"""Supervising the ranks of a run on this machine: their lives, their heartbeats, their failures.

The processes of a run (Linux): the launcher (`lcc run train`); multiprocessing's fork server, which the
launcher starts with torch imported once; one process per rank, forked by the fork server (so a rank's
parent is the fork server, not the launcher); and multiprocessing's resource tracker. The fork server and
every rank have the kernel kill them when their parent ends (PR_SET_PDEATHSIG), and check right after
arming it that the chain of parents up to the launcher is still there, so that nothing outlives a
launcher however it ends (SIGKILL included); the resource tracker exits when the last process holding
its pipe has gone.

Each rank beats a heartbeat into memory shared with the launcher, at every pipeline and step action (the
step, and what it is doing), writes its failure (its error, the time it failed, whether it failed only
because a peer did) into an unnamed file, and its stderr into another. The launcher polls them with the
ranks' exit codes; it names the rank that failed first on its own, or the rank that hung, writes every
traceback and each rank's stderr to a log, and on SIGINT or SIGTERM stops every rank.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import multiprocessing.connection
import multiprocessing.forkserver
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing import reduction
from pathlib import Path
from typing import Any

from lcc.runtime.support import RunError, RunStopped

LAUNCHER_ENV = "LCC_FORK_SERVER_OF"  # set while the launcher starts its fork server: lcc.runtime.forkserver_guard
POLL_S = 0.2  # how often the launcher looks at its ranks
STOP_GRACE_S = 2.0  # SIGTERM, then SIGKILL after this long
N_VALUES = 4  # per rank: time of the last beat, steps completed, the step in progress, finished
LABEL_BYTES = 96  # per rank: what it is doing
# a peer went away, or did not answer within the timeout (gloo raises these as RuntimeError too)
_PEER_GONE = ("Connection closed by peer", "Connection reset", "Broken pipe", "Timed out waiting")
_ERROR_LINES = 6  # of an error's message, in the report (all of it is in the log)


# ------------------------------------------------------------------------------ dying with the launcher
def _arm_parent_death() -> bool:
    """Linux: have the kernel send this process SIGKILL when the thread that created it ends."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(1, int(signal.SIGKILL), 0, 0, 0) == 0  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after the command name: state, ppid, ... (None without /proc or the process)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def die_with_parent(launcher: int) -> None:
    """End this process (the fork server, or a rank the fork server forked) when its parent ends; exit now
    if the parent has already changed, which is checked after arming: the parent must be the launcher, or a
    process whose parent is the launcher (the fork server)."""
    parent = os.getppid()
    if not _arm_parent_death():
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="lcc-parent").start()
    parent = os.getppid()
    if parent == launcher:
        return
    stat = _stat(parent)
    if stat is not None and int(stat[1]) == launcher:
        return
    if stat is None and parent != 1 and not Path("/proc/self").exists():  # no /proc: the watch thread decides
        return
    os._exit(1)


def adopt_environment(env: dict[str, str]) -> None:
    """In a rank forked from the fork server: the launching process's environment as it is now, exactly. The
    server's own is that of the launch that started it, which may have had more (a variable set then and
    removed since)."""
    os.environ.clear()
    os.environ.update(env)


def start_fork_server(context: Any, preload: list[str]) -> None:
    """Start multiprocessing's fork server (once per launcher process) with `preload` imported, and tied to
    the life of this process (the thread that calls this, which should be the main one)."""
    context.set_forkserver_preload([*preload, "lcc.runtime.forkserver_guard"])
    previous = os.environ.get(LAUNCHER_ENV)
    os.environ[LAUNCHER_ENV] = str(os.getpid())
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        if previous is None:
            del os.environ[LAUNCHER_ENV]
        else:
            os.environ[LAUNCHER_ENV] = previous


# ------------------------------------------------------------------------------------------ heartbeats
def label(text: str) -> bytes:
    return text.encode()[:LABEL_BYTES].ljust(LABEL_BYTES, b"\0")


@dataclass(frozen=True)
class Beat:
    time: float  # time.monotonic() of the last beat; nan: none yet
    completed: float  # steps completed (nan: not known yet)
    step: int  # the step in progress, from 0 (-1: none yet)
    finished: bool
    doing: str

    def where(self) -> str:
        return f"step {self.step + 1}, {self.doing}" if self.step >= 0 else self.doing


class Heartbeat:
    """One rank's heartbeat, in memory its launcher reads: when it last moved (time.monotonic, one clock for
    every process of the machine), the steps it has completed, the step it is in and what it is doing.
    A beat is a few stores: cheap enough for every action."""

    def __init__(self, values: Any, labels: Any, rank: int):
        self.values, self.labels = values, labels
        self.at, self.label_at = rank * N_VALUES, rank * LABEL_BYTES

    def beat(self, doing: bytes | str) -> None:
        self.labels[self.label_at:self.label_at + LABEL_BYTES] = doing if isinstance(doing, bytes) else label(doing)
        self.values[self.at] = time.monotonic()

    def step(self, step: int) -> None:
        """Step `step` (from 0) begins."""
        self.values[self.at + 2] = step
        self.beat("beginning the step")

    def completed(self, steps: int) -> None:
        self.values[self.at + 1] = steps
        self.beat(f"after step {steps}")

    def finished(self) -> None:
        self.values[self.at + 3] = 1.0
        self.beat("finished")


class Beats:
    """The heartbeats of every rank: shared memory for ranks in processes of their own (`context`: the
    multiprocessing context that starts them), plain memory for a rank in this process."""

    def __init__(self, world: int, context: Any = None):
        self.world = world
        if context is not None:
            self.values = context.RawArray("d", world * N_VALUES)
            self.labels = context.RawArray("c", world * LABEL_BYTES)
        else:
            self.values = (ctypes.c_double * (world * N_VALUES))()
            self.labels = ctypes.create_string_buffer(world * LABEL_BYTES)
        for rank in range(world):
            self.values[rank * N_VALUES:rank * N_VALUES + 3] = [math.nan, math.nan, -1.0]

    def rank(self, rank: int) -> Heartbeat:
        return Heartbeat(self.values, self.labels, rank)

    def read(self, rank: int) -> Beat:
        at, label_at = rank * N_VALUES, rank * LABEL_BYTES
        t, completed, step, finished = self.values[at:at + N_VALUES]
        doing = bytes(self.labels[label_at:label_at + LABEL_BYTES]).rstrip(b"\0").decode(errors="replace")
        return Beat(t, completed, int(step), finished > 0, doing)

    def completed(self) -> int | None:
        """Steps every rank has completed; None while a rank has not said (it is still starting)."""
        steps = [self.read(r).completed for r in range(self.world)]
        return None if any(math.isnan(s) for s in steps) else int(min(steps))


class _Beating(list):
    """A list the engine walks once per step (its pipeline actions, its step actions): taking an item is a
    heartbeat saying which."""

    def __init__(self, items: list[Any], heartbeat: Heartbeat, what: str):
        super().__init__(items)
        self.heartbeat = heartbeat
        self.labels = [label(f"{what} {i + 1}/{len(items)}: {getattr(a, 'kind', a)}" if what == "step action"
                             else f"{what} {i + 1}/{len(items)}: {a}") for i, a in enumerate(items)]

    def __iter__(self) -> Iterator[Any]:
        beat = self.heartbeat.beat
        for i, item in enumerate(list.__iter__(self)):
            beat(self.labels[i] if i < len(self.labels) else f"{item}")
            yield item


def watch_engine(engine: Any, heartbeat: Heartbeat) -> None:
    """Beat at every pipeline action and every step action `engine` (a RankEngine) takes."""
    engine.actions = _Beating(engine.actions, heartbeat, "pipeline action")
    engine.step_actions = _Beating(engine.step_actions, heartbeat, "step action")


# ------------------------------------------------------------------------------------------- failures
def secondary(exc: BaseException) -> bool:
    """A rank that fails only because a peer went away or did not answer: not the cause to show while there
    is another."""
    try:
        import torch.distributed as dist

        if isinstance(exc, dist.DistError):
            return True
    except ImportError:
        pass
    return any(s in str(exc) for s in _PEER_GONE)


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
    text = "\n".join(lines[:_ERROR_LINES]) + ("\n  ..." if len(lines) > _ERROR_LINES else "")
    where = f"\n  at {record['where']}" if record.get("where") else ""
    return f"rank {record['rank']} failed: {text}{where}"


class SharedFile:
    """An unnamed file (in memory where the system has memfd) shared with a process the fork server starts,
    passed as a descriptor: nothing is left on disk however the run ends."""

    def __init__(self, fd: int | None = None):
        self.fd = _unnamed_file() if fd is None else fd

    def __reduce__(self) -> tuple[Any, ...]:  # only while starting a process (multiprocessing's DupFd)
        return _attach_file, (reduction.DupFd(self.fd),)

    def read(self) -> bytes:
        size = os.fstat(self.fd).st_size
        return os.pread(self.fd, size, 0) if size else b""

    def write(self, data: bytes) -> None:
        done = 0
        while done < len(data):
            done += os.pwrite(self.fd, data[done:], done)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def _attach_file(dup: Any) -> SharedFile:
    return SharedFile(dup.detach())


def _unnamed_file() -> int:
    if hasattr(os, "memfd_create"):
        with contextlib.suppress(OSError):
            return os.memfd_create("lcc-rank")
    with tempfile.TemporaryFile() as f:
        return os.dup(f.fileno())


@dataclass
class RankLink:
    """What a rank shares with its launcher: its heartbeat and, in a process of its own (`launcher`: the
    launcher's pid), a file for its failure and one for its stderr."""

    heartbeat: Heartbeat
    launcher: int | None = None
    failure: SharedFile | None = None
    stderr: SharedFile | None = None

    def attach(self) -> None:
        """In the rank's own process: die with the launcher, leave SIGINT to the launcher (which stops every
        rank), and send stderr to the launcher's log rather than the terminal (unless LCC_DEBUG=1)."""
        if self.launcher is None:
            return
        die_with_parent(self.launcher)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if self.stderr is not None and not os.environ.get("LCC_DEBUG"):
            sys.stderr.flush()
            os.dup2(self.stderr.fd, 2)

    def report(self, rank: int, exc: BaseException, roots: Sequence[Path]) -> bool:
        """Tell the launcher why this rank fails; False if there is no launcher to tell."""
        if self.failure is None:
            return False
        self.failure.write(json.dumps(failure_record(rank, exc, roots)).encode())
        return True


# ------------------------------------------------------------------------------------------- signals
class _Stop(BaseException):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class _StopSignals:
    """SIGINT and SIGTERM while a run goes on: noted for the watch loop, or (`raising`: a rank in this
    process) raised as _Stop where the run is. Only the main thread can take signals; elsewhere this does
    nothing."""

    def __init__(self, raising: bool):
        self.raising, self.signum = raising, None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self.previous[s] = signal.getsignal(s)
                signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        first = self.signum is None
        if first:
            self.signum = signum
        if self.raising and first:
            raise _Stop(signum)

    def __exit__(self, *exc: object) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


# ------------------------------------------------------------------------------------------- the run
@dataclass
class _Verdict:
    kind: str  # stopped, failed, died, hung, watchdog
    signum: int = 0
    record: dict[str, Any] | None = None
    rank: int = 0
    code: int = 0
    age: float = 0.0
    beat: Beat | None = None
    stopped: bool = False


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
        self._cpu: dict[int, tuple[int, float]] = {}

    def close(self) -> None:
        for link in self.links:
            for f in (link.failure, link.stderr):
                if f is not None:
                    f.close()

    # --------------------------------------------------------------------------- a rank in this process
    @contextlib.contextmanager
    def in_process(self) -> Iterator[RankLink]:
        """Run rank 0 here: SIGINT and SIGTERM stop it (RunStopped), an error becomes the report."""
        with _StopSignals(raising=True):
            try:
                yield self.links[0]
            except _Stop as stop:
                raise self._stopped(stop.signum) from None
            except KeyboardInterrupt:
                raise self._stopped(signal.SIGINT) from None
            except RunError:
                raise
            except Exception as exc:
                record = failure_record(0, exc, self.roots)
                self.records[0] = record
                raise self._report(_Verdict("failed", record=record), [None]) from None

    # ------------------------------------------------------------------------------- ranks of their own
    def supervise(self, target: Callable[..., None], args_of: Callable[[int, RankLink], tuple[Any, ...]],
                  watchdog_s: float, drain_s: float | None = None) -> None:
        """Start one process per rank (`target(*args_of(rank, link))`), watch them until they all finish or
        one fails, hangs or dies, or a signal stops the run; end every one of them; raise the report.
        `drain_s` (a server): a signal goes to rank 0 alone, which ends the run itself (draining its
        requests); the run is over when every rank has exited 0 within `drain_s` seconds and a grace."""
        procs: list[Any] = []
        self.watchdog_s = watchdog_s
        with _StopSignals(raising=False) as stop:
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
            raise self._stopped(verdict.signum)
        raise self._report(verdict, codes)

    def _watch(self, procs: list[Any], stop: _StopSignals) -> _Verdict | None:
        grace = min(5.0, max(1.0, self.timeout_s / 2))  # for the cause, after a failure caused by a peer
        peers_failed_at = None
        while True:
            if stop.signum is not None:
                return _Verdict("stopped", signum=stop.signum)
            codes = [p.exitcode for p in procs]
            self._read_records()  # after the exit codes: a record written before its rank ended is seen
            now = time.monotonic()
            firsts = [r for r in self.records.values() if not r["secondary"]]
            if firsts:
                return _Verdict("failed", record=min(firsts, key=lambda r: r["time"]))
            for rank, code in enumerate(codes):
                if code not in (None, 0) and rank not in self.records:
                    return _Verdict("died", rank=rank, code=code)
            if len(procs) == self.world and all(code == 0 for code in codes):
                return None
            hung = self._hung(procs, [r for r, c in enumerate(codes) if c is None], now, bool(self.records))
            if hung is not None:
                return hung
            if self.records:
                peers_failed_at = peers_failed_at if peers_failed_at is not None else now
                if now - peers_failed_at >= grace:
                    return _Verdict("failed", record=min(self.records.values(), key=lambda r: r["time"]))
            if now - self.start > self.watchdog_s:
                return _Verdict("watchdog")
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

    def _busy(self, rank: int, stat: list[str] | None, now: float) -> bool:
        """Running, or used a fifth of a core since the last look."""
        if stat is None:
            return False
        ticks = int(stat[11]) + int(stat[12])  # utime, stime
        before = self._cpu.get(rank)
        self._cpu[rank] = (ticks, now)
        used = (ticks - before[0]) / os.sysconf("SC_CLK_TCK") if before is not None else 0.0
        return stat[0] in "RD" or (before is not None and now > before[1] and used >= 0.2 * (now - before[1]))

    def _hung(self, procs: list[Any], live: list[int], now: float, peers_failed: bool) -> _Verdict | None:
        """A live rank whose heartbeat has not moved for the collective timeout while others wait for it: one
        stopped (SIGSTOP, a debugger), or computing all that time; once peers have given up waiting, one that
        has not moved for a timeout at all."""
        timeout = self.timeout_s
        beats, stats, busy = {}, {}, {}
        for rank in live:
            beat = self.beats.read(rank)
            stats[rank] = _stat(procs[rank].pid)
            busy[rank] = self._busy(rank, stats[rank], now)
            if not math.isnan(beat.time) and not beat.finished:
                beats[rank] = beat
        waiting = {r for r in beats if not busy[r] and stats[r] is not None and stats[r][0] == "S"}
        found = []
        for rank, beat in beats.items():
            age = now - beat.time
            stopped = stats[rank] is not None and stats[rank][0] in "Tt"
            if stopped and (age >= timeout or peers_failed):
                found.append((0, beat.time, rank, stopped))
            elif (busy[rank] and age >= (timeout / 2 if peers_failed else timeout)
                  and (peers_failed or waiting - {rank})):
                found.append((1, beat.time, rank, stopped))
            elif peers_failed and age >= timeout:
                found.append((2, beat.time, rank, stopped))
        if not found:
            return None
        _, t, rank, stopped = min(found)
        return _Verdict("hung", rank=rank, age=now - t, beat=beats[rank], stopped=stopped)

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

    # ---------------------------------------------------------------------------------------- reports
    def _stopped(self, signum: int) -> RunStopped:
        steps = self.beats.completed()
        done = f"stopped at step {steps}" if steps is not None else "stopped while starting"
        return RunStopped(f"{done}; {self._last_checkpoint()}", 128 + signum)

    def _last_checkpoint(self) -> str:
        if self.checkpoints is None:
            return "no checkpoint (no checkpoint dir)"
        from lcc.runtime.checkpoint import latest

        try:
            path = latest(Path(self.checkpoints))
        except (OSError, ValueError, RunError):
            path = None
        if path is None:
            return f"no checkpoint in {self.checkpoints}"
        step = path.name.removeprefix("step-")
        return f"last checkpoint step {int(step) if step.isdigit() else step} ({path})"

    def _summary(self, verdict: _Verdict) -> str:
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
        return f"the run did not finish within its watchdog time ({self.watchdog_s:.0f} s)"

    def _report(self, verdict: _Verdict, codes: list[int | None]) -> RunError:
        summary = self._summary(verdict)
        return RunError(f"{summary}\nfull tracebacks: {self._write_log(summary, verdict, codes)}")

    def _log_text(self, summary: str, verdict: _Verdict, codes: list[int | None]) -> str:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        ranks = f"{self.world} rank{'s' if self.world != 1 else ''}"
        parts = [f"lcc run train {self.plan_dir} ({ranks}), ended {stamp}", summary, ""]
        for record in sorted(self.records.values(), key=lambda r: r["time"]):
            role = ("the cause" if record is verdict.record
                    else "because of a peer" if record["secondary"] else "a later failure")
            parts += [f"== rank {record['rank']} failed {record['time'] - self.start:+.2f} s after the start "
                      f"({role})", record["traceback"].rstrip(), ""]
        now = time.monotonic()
        parts.append("== heartbeats at the end")
        for rank in range(self.world):
            beat = self.beats.read(rank)
            moved = f"{now - beat.time:.1f} s before" if not math.isnan(beat.time) else "never beat"
            code = f", exit code {codes[rank]}" if rank < len(codes) and codes[rank] is not None else ""
            parts.append(f"rank {rank}: {beat.where() or 'starting'} ({moved}{code})")
        parts.append("")
        for rank, link in enumerate(self.links):
            text = link.stderr.read().decode(errors="replace") if link.stderr is not None else ""
            if text.strip():
                parts += [f"== stderr of rank {rank}", text.rstrip(), ""]
        return "\n".join(parts) + "\n"

    def _write_log(self, summary: str, verdict: _Verdict, codes: list[int | None]) -> str:
        """The log next to the metrics or the checkpoint folder, else in a folder of its own under the
        system's temporary folder (kept: it is the log); its path, or why it could not be written."""
        text = self._log_text(summary, verdict, codes)
        name = f"lcc-run-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{os.getpid()}.log"
        places = []
        if self.metrics is not None and Path(self.metrics).parent.is_dir() and (
                Path(self.metrics).is_file() or not Path(self.metrics).exists()):
            places.append(Path(self.metrics).parent)
        if self.checkpoints is not None and Path(self.checkpoints).parent.is_dir():
            places.append(Path(self.checkpoints).parent)
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
