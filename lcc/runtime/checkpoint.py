"""Saving and loading checkpoints with torch.distributed.checkpoint: every rank writes the blocks it holds,
nothing is gathered.

Keys are layout-free (`model/<param>`, `optim/<param>/exp_avg`, ...; lcc.runtime.checkpoint_layout), so a
checkpoint saved under one layout loads under any other of the same spec. Next to DCP's files,
`lcc-checkpoint.json` says what the checkpoint is (lcc.runtime.checkpoint_identity). A resume is refused
before any rank starts when the spec differs in anything but the layout, or a file is not as it was saved
(lcc.runtime.checkpoint_verify, lcc.runtime.checkpoint_resume).

A checkpoint is written into `step-NNNNNN.tmp/`, renamed when every rank is done, and only then named in
`latest`: a crash mid-save leaves the previous checkpoint usable. The identity lists every file DCP wrote
with its size and sha256. The launcher holds the directory's lock for the whole run
(lcc.runtime.checkpoint_lock), removes interrupted saves when it starts, and rank 0 removes checkpoints
beyond the newest `keep` after each save (lcc.runtime.checkpoint_dir).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException

from lcc.runtime.checkpoint_dir import LATEST, prune
from lcc.runtime.checkpoint_files import IDENTITY, CheckpointError, remove, sync_folder, write_synced, written_files
from lcc.runtime.model_files import HF_FOLDER, copy_into, hf_files


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def save(directory: Path, step: int, state: dict[str, Any], rank: int, identity: dict[str, Any],
         keep: int = 0, kept: dict[str, Path] | None = None) -> Path:
    """Write `state` (this rank's part, lcc.runtime.checkpoint_layout.rank_state) as the checkpoint after
    `step` optimizer steps; rank 0 adds `identity` with every file's size and sha256 (each rank hashes the
    files it wrote) as lcc-checkpoint.json, and the RNG state (one copy). A save that fails (a full disk:
    OSError ENOSPC) raises a CheckpointError and leaves `latest` naming the previous checkpoint. `keep`:
    then remove all but the newest `keep`. `kept`: files rank 0 copies in beside the tensors, by name
    (lcc.runtime.model_files)."""
    directory = Path(directory)
    final = directory / f"step-{step:06d}"
    tmp = directory / f"step-{step:06d}.tmp"
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # an earlier attempt's files would be listed as this checkpoint's
            remove(tmp)
    if rank != 0:
        state = {k: v for k, v in state.items() if k != "meta/rng"}
    _barrier()
    try:
        with single_process_quiet():
            dcp.save(state, checkpoint_id=str(tmp), no_dist=not _distributed())
        if rank == 0:
            copy_into(tmp, kept or {})
        files = written_files(tmp, rank, dist.get_world_size() if _distributed() else 1)
    except CheckpointException as exc:  # every rank raises it once all are done, with each failing rank's error
        message = f"{_failed(tmp, step)}:\n{failures_text(exc)}"
        message += disk_full_note(directory, message)
        if rank == 0:  # give back the space the partial files hold
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(message) from None
    except OSError as exc:
        raise CheckpointError(f"{_failed(tmp, step)}: {exc}" + disk_full_note(directory, str(exc))) from None
    if _distributed():
        parts: list[Any] | None = [None] * dist.get_world_size() if rank == 0 else None
        dist.gather_object(files, parts, dst=0)
        files = {name: f for part in parts or [] for name, f in part.items()}
    if rank == 0:
        try:
            record = {**identity, "files": dict(sorted(files.items()))}
            write_synced(tmp / IDENTITY, json.dumps(record, indent=2, sort_keys=True) + "\n")
            _publish(directory, tmp, final)
        except OSError as exc:
            raise CheckpointError(f"{_failed(tmp, step)}: {exc}" + disk_full_note(directory, str(exc))) from None
        try:
            prune(directory, keep, step)
        except OSError as exc:
            raise CheckpointError(f"{directory}: removing the checkpoints beyond the newest {keep} failed: {exc}"
                                  ) from None
    _barrier()
    return final


def _failed(tmp: Path, step: int) -> str:
    pointer = tmp.parent / LATEST
    try:
        name = pointer.read_text().strip()
    except OSError:
        name = ""
    where = (f"{pointer} names it" if name == f"step-{step:06d}" else f"{pointer} still names {name}" if name
             else "there is no earlier checkpoint")
    return f"{tmp}: saving the checkpoint of step {step} failed ({where})"


def _publish(directory: Path, tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`, then name it in `latest`. A `final` already there (a step saved again after
    resuming from an earlier checkpoint) is moved aside first and removed last."""
    aside = final.with_name(final.name + ".old.tmp")
    if final.exists():
        if aside.exists():
            remove(aside)
        os.replace(final, aside)
    try:
        os.replace(tmp, final)
    except OSError:
        if aside.exists():
            os.replace(aside, final)
        raise
    sync_folder(directory)
    pointer = directory / (LATEST + ".tmp")
    write_synced(pointer, final.name + "\n")
    os.replace(pointer, directory / LATEST)
    sync_folder(directory)
    if aside.exists():
        remove(aside)


def disk_full_note(directory: Path, message: str) -> str:
    """A full disk, when an error that it caused does not say so (torch.save's writer reports a failed
    write as `unexpected pos`): a line to add to `message`, or nothing."""
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return ""
    if free >= 1 << 20 or os.strerror(errno.ENOSPC) in message:
        return ""
    return f"\n  {os.strerror(errno.ENOSPC)}: {free} bytes free on the filesystem of {directory}"


def failures_text(exc: CheckpointException) -> str:
    """DCP's per-rank failures, one line each (OSError: [Errno 28] No space left on device: ...)."""
    lines = []
    for rank, (error, _) in sorted(exc.failures.items()):
        text = "".join(traceback.format_exception_only(type(error), error)).strip()
        lines.append(f"  rank {rank}: {text}")
    return "\n".join(lines)


def load(path: Path, state: dict[str, Any]) -> dict[str, Path]:
    """Fill `state` (this rank's blocks, keyed as when saved) from a checkpoint of any layout, in place;
    returns the Hugging Face model files it keeps (lcc.runtime.model_files), for the checkpoints that
    follow to keep too."""
    try:
        with single_process_quiet():
            dcp.load(state, checkpoint_id=str(path), no_dist=not _distributed())
    except CheckpointException as exc:  # a BaseException: made a RunError for the launcher to report
        raise CheckpointError(f"{path}: loading the checkpoint failed:\n{failures_text(exc)}") from None
    return hf_files(path, HF_FOLDER)


@contextlib.contextmanager
def single_process_quiet() -> Iterator[None]:
    """A world of one has no process group: DCP then warns that it assumes one process, which is meant.
    Around any dcp.save or dcp.load of a single process."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield
