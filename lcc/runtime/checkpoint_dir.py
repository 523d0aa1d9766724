"""A checkpoint directory: its complete checkpoint folders (`step-NNNNNN`), the `latest` pointer that names
one of them, the leftovers of interrupted saves, and pruning to the newest `keep`."""

from __future__ import annotations

import re
from pathlib import Path

from lcc.runtime.checkpoint_files import IDENTITY, CheckpointError, remove

LATEST = "latest"
COMPLETE = re.compile(r"step-(\d+)")  # a checkpoint folder; `step-N.tmp` and others are not complete


def complete(directory: Path) -> list[tuple[int, Path]]:
    """The complete checkpoint folders (`step-N`, not `step-N.tmp`) in `directory`, by step."""
    found = []
    for path in Path(directory).glob("step-*"):
        match = COMPLETE.fullmatch(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def prune(directory: Path, keep: int, step: int) -> list[Path]:
    """Remove the complete checkpoints up to `step` but the newest `keep` (0: keep all). Later ones, saved
    by a run that went past the checkpoint this one resumed from, stay until a save replaces them."""
    if keep <= 0:
        return []
    old = [path for s, path in complete(directory) if s <= step][:-keep]
    for path in old:
        remove(path)
    return old


def remove_partial(directory: Path) -> list[Path]:
    """Remove what interrupted saves left in `directory` (`step-N.tmp`, `latest.tmp`); returns the folders."""
    removed = []
    for path in sorted(Path(directory).glob("step-*.tmp")):
        remove(path)
        removed.append(path)
    pointer = Path(directory) / (LATEST + ".tmp")
    if pointer.is_file():
        pointer.unlink()
    return removed


def latest_name(directory: Path) -> str | None:
    """The checkpoint folder `DIR/latest` names (None when there is no `latest`): the name of a complete
    checkpoint in DIR (`step-NNNNNN`), the only thing lcc writes there. Anything else (a path, `..`) is a
    CheckpointError, so that the pointer never leads out of DIR."""
    pointer = Path(directory) / LATEST
    if not pointer.is_file():
        return None
    try:
        name = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{pointer}: unreadable ({exc})") from None
    if not COMPLETE.fullmatch(name):
        raise CheckpointError(f"{pointer}: names {name!r}, which is not a checkpoint folder of {directory} (lcc "
                              "writes the name of one there, step-NNNNNN)")
    return name


def latest(directory: Path) -> Path | None:
    """The folder `DIR/latest` names, if it is there (see `latest_name`)."""
    name = latest_name(directory)
    path = Path(directory) / name if name is not None else None
    return path if path is not None and path.is_dir() else None


def resolve(path: Path) -> Path:
    """A checkpoint folder (`step-NNNNNN`), or a checkpoint directory's latest one."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint (a file, not a folder)")
    if not (path / IDENTITY).exists() and (path / LATEST).is_file():
        found = latest(path)
        if found is None:
            raise CheckpointError(f"{path / LATEST}: names {latest_name(path)!r}, which is missing")
        return found
    return path
