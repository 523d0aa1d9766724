"""One run at a time per checkpoint directory: the launcher holds an flock on DIR/.lock for the whole run,
which the system releases however the process ends; the file names the holder for the one refused."""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from lcc.runtime.checkpoint_files import CheckpointError

LOCK = ".lock"


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[Path]:
    """Hold checkpoint directory `directory` (created if missing) while the block runs: an flock on
    DIR/.lock, which the system releases when this process ends however it ends; the file names the
    holder. A directory another process holds is refused, naming that process."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise CheckpointError(f"{directory} is in use by {_holder(path)}; one run at a time may use a "
                                  f"checkpoint directory (the lock: {path})") from None
        started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started}) + "\n")
                 .encode())
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def _holder(path: Path) -> str:
    try:
        data = json.loads(path.read_text())
        return f"pid {data['pid']} (started {data['started']} on {data['host']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (which has not written its pid yet)"
