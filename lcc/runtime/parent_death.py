"""Dying with the launcher: no process of a run outlives the `lcc run` that started it, however it ends.

The fork server and every rank have the kernel kill them when their parent ends (PR_SET_PDEATHSIG), and
check right after arming it that the chain of parents up to the launcher is still there (SIGKILL of the
launcher included). Without PR_SET_PDEATHSIG a thread watches the parent instead.
"""

from __future__ import annotations

import ctypes
import multiprocessing.forkserver
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

LAUNCHER_ENV = "LCC_FORK_SERVER_OF"  # set while the launcher starts its fork server: lcc.runtime.forkserver_guard


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


def proc_stat(pid: int) -> list[str] | None:
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
    stat = proc_stat(parent)
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
