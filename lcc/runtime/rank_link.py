"""What a rank in a process of its own shares with its launcher: its heartbeat, an unnamed file for its
failure and one for its stderr (the launcher's log gets them), passed as descriptors so that nothing is
left on disk however the run ends."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing import reduction
from pathlib import Path
from typing import Any

from lcc.runtime.heartbeat import Heartbeat
from lcc.runtime.parent_death import die_with_parent
from lcc.runtime.rank_failures import failure_record


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
