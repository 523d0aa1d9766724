"""The resume policy, decided by the launcher before any rank starts: which checkpoint a run continues from
(the one `latest` names, checked; with `fallback`, the newest older one that passes), and what the ranks
are told to do with the checkpoint directory (`Resume`)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lcc.runtime.checkpoint_dir import COMPLETE, LATEST, complete, latest_name, remove_partial
from lcc.runtime.checkpoint_files import CheckpointError
from lcc.runtime.checkpoint_lock import locked
from lcc.runtime.checkpoint_verify import SpecMismatch, check_resumable


@dataclass(frozen=True)
class Resume:
    """What the ranks do with the checkpoint directory, as the launcher decided before they started: load
    checkpoint folder `path` (None: start at step 0), and keep the newest `keep` checkpoints after each save
    (0: all). `init_from`: starting at step 0, take the weights (and load biases) of this checkpoint folder,
    with a fresh optimizer."""

    path: str | None = None
    keep: int = 0
    init_from: str | None = None


def check_resume(directory: Path, spec: dict[str, Any], fallback: bool = False) -> Path | None:
    """Before any rank starts: the checkpoint a resume from `directory` loads (None if there is none yet);
    see `resume_point`."""
    return resume_point(directory, spec, fallback)[0]


def resume_point(directory: Path, spec: dict[str, Any], fallback: bool = False) -> tuple[Path | None, list[str]]:
    """The checkpoint `latest` names in `directory` (None if there is no `latest`), checked: an lcc checkpoint
    of this spec up to the layout, and every file with the size and sha256 it was saved with. With
    `fallback`, a checkpoint that fails the files' check (or is missing, or unreadable) gives way to the newest
    older complete one that passes; the second value then says what was passed over and why. Raises
    CheckpointError naming the file or every differing field."""
    directory = Path(directory)
    pointer = directory / LATEST
    if not pointer.is_file():
        return None, []
    try:
        name, bad = latest_name(directory), None
    except CheckpointError as exc:  # not a name lcc writes there: every complete checkpoint is older
        name, bad = None, exc
    named = COMPLETE.fullmatch(name) if name is not None else None
    older = [path for s, path in reversed(complete(directory))
             if path.name != name and (named is None or s < int(named[1]))]
    hint = ("\n  (--fallback resumes from the newest older checkpoint that passes this check: "
            f"{older[0].name} is the newest older one)" if older else "")
    passed: list[str] = []
    if bad is not None:
        if not fallback:
            raise CheckpointError(f"{bad}{hint}")
        passed.append(str(bad))
    for path in [*([directory / name] if name is not None else []), *(older if fallback else [])]:
        try:
            if not path.is_dir():
                raise CheckpointError(f"{pointer}: names {name!r}, which is missing")
            check_resumable(path, spec)
        except SpecMismatch:
            raise
        except CheckpointError as exc:
            if not fallback:
                raise CheckpointError(f"{exc}{hint}") from None
            passed.append(str(exc))
            continue
        return path, passed
    raise CheckpointError(f"{directory}: no checkpoint passes its checks:\n" + "\n".join(f"  {p}" for p in passed))


@contextlib.contextmanager
def prepare(directory: Path, spec: dict[str, Any], resume: bool = False, resume_if_any: bool = False,
            fallback: bool = False, keep: int = 3, leader: bool = True) -> Iterator[Resume]:
    """The launcher's part, before any rank starts and for as long as the run lasts: hold the directory's
    lock and remove interrupted saves (`leader`: the launcher, or rank 0 under torchrun), then choose the
    checkpoint to continue from (`resume`: one must exist; `resume_if_any`: start at step 0 when there is
    none; `fallback`: see `resume_point`). Yields what the ranks do (`Resume`); says on stderr what it
    removed or passed over."""
    directory = Path(directory)
    if resume and not directory.is_dir():  # a mistyped directory is not created by the lock
        raise CheckpointError(f"{directory}: no checkpoint to resume from (no such directory); --resume-if-any "
                              "starts at step 0 when there is none")
    with contextlib.ExitStack() as held:
        try:
            if leader:
                held.enter_context(locked(directory))
                for partial in remove_partial(directory):
                    _say(f"removed {partial} (an interrupted save)")
            path = None
            if resume or resume_if_any:
                path, passed = resume_point(directory, spec, fallback)
                if path is None and resume:
                    raise CheckpointError(f"{directory}: no checkpoint to resume from (no {LATEST} file in it); "
                                          "--resume-if-any starts at step 0 when there is none")
                if passed and leader:
                    _say("\n".join(passed) + f"\nresuming from {path} instead (--fallback)")
        except OSError as exc:  # not writable, a full disk, ...
            raise CheckpointError(f"{directory}: cannot use it as the checkpoint directory: {exc}") from None
        yield Resume(str(path) if path is not None else None, keep)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
