"""The files of a checkpoint folder: written durably (fsync'd, renames synced), listed with their size and
sha256 per writing rank, and removed. Everything here is below the checkpoint's meaning: no identity, no
policy."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path
from typing import Any

from lcc.runtime.support import RunError

IDENTITY = "lcc-checkpoint.json"


class CheckpointError(RunError):
    """A path that is not a checkpoint lcc can read, or one this run may not resume from."""


def write_synced(path: Path, text: str) -> None:
    """Write `text` to `path` and fsync it: the file is on disk before anything that names it."""
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def sync_folder(path: Path) -> None:
    """Make the renames in folder `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def written_files(folder: Path, rank: int = 0, world: int = 1) -> dict[str, dict[str, Any]]:
    """{relative path: {bytes, sha256}} of the files in checkpoint folder `folder` that `rank` wrote (DCP's
    `__R_N.distcp`); rank 0 also takes every other file but the identity (`.metadata`)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        writer = re.match(r"__(\d+)_", name)
        owner = int(writer[1]) if writer and int(writer[1]) < world else 0
        if path.is_file() and name != IDENTITY and owner == rank:
            out[name] = {"bytes": path.stat().st_size, "sha256": sha256(path)}
    return out


def remove(path: Path) -> None:
    """Remove a folder with everything in it, or a file."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
