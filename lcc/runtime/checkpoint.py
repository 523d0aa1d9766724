"""Checkpoints with torch.distributed.checkpoint: every rank writes the blocks it holds, nothing is gathered.

Keys are layout-free (`model/<param>`, `optim/<param>/exp_avg`, ...; lcc.runtime.checkpoint_layout), so a
checkpoint saved under one layout loads under any other of the same spec. Next to DCP's files,
`lcc-checkpoint.json` says what the checkpoint is: its format, the step, the resolved spec it was
trained from and the layout it was saved in. A resume is refused before any rank starts when the spec
differs in anything but the layout (`check_resume`).

A checkpoint is written into `step-NNNNNN.tmp/`, renamed when every rank is done, and only then named in
`latest`: a crash mid-save leaves the previous checkpoint usable.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from lcc.runtime.support import RunError

LATEST = "latest"
IDENTITY = "lcc-checkpoint.json"
SCHEMA = "lcc.checkpoint/1"
# spec fields that are layout, or that do not change what training computes (top-level sections, and
# how often to save and how long to wait on a collective)
LAYOUT_SECTIONS = ("name", "parallelism", "cluster", "serve")
OPERATIONAL = ("train.checkpoint_every", "train.collective_timeout_s")
KINDS = ("model", "optim", "bias", "meta")


class CheckpointError(RunError):
    """A path that is not a checkpoint lcc can read, or one this run may not resume from."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        dist.barrier()


# ------------------------------------------------------------------------------------ save and load
def save(directory: Path, step: int, state: dict[str, Any], rank: int, identity: dict[str, Any]) -> Path:
    """Write `state` (this rank's part, lcc.runtime.checkpoint_layout.rank_state) as the checkpoint after
    `step` optimizer steps; rank 0 adds `identity` as lcc-checkpoint.json and the RNG state (one copy)."""
    directory = Path(directory)
    final = directory / f"step-{step:06d}"
    tmp = directory / f"step-{step:06d}.tmp"
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
    if rank != 0:
        state = {k: v for k, v in state.items() if k != "meta/rng"}
    _barrier()
    with _single_process_quiet():
        dcp.save(state, checkpoint_id=str(tmp), no_dist=not _distributed())
    if rank == 0:
        (tmp / IDENTITY).write_text(json.dumps(identity, indent=2, sort_keys=True) + "\n")
    _barrier()
    if rank == 0:
        if final.exists():
            _remove(final)
        os.replace(tmp, final)
        pointer = directory / (LATEST + ".tmp")
        pointer.write_text(final.name + "\n")
        os.replace(pointer, directory / LATEST)
    _barrier()
    return final


def latest(directory: Path) -> Path | None:
    pointer = Path(directory) / LATEST
    if not pointer.is_file():
        return None
    path = Path(directory) / pointer.read_text().strip()
    return path if path.is_dir() else None


def load(path: Path, state: dict[str, Any]) -> None:
    """Fill `state` (this rank's blocks, keyed as when saved) from a checkpoint of any layout, in place."""
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=str(path), no_dist=not _distributed())


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """A world of one has no process group: DCP then warns that it assumes one process, which is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _remove(path: Path) -> None:
    for child in sorted(path.rglob("*"), reverse=True):
        child.rmdir() if child.is_dir() else child.unlink()
    path.rmdir()


# ------------------------------------------------------------------------------------------ identity
def layout_of(spec: dict[str, Any]) -> dict[str, Any]:
    """The layout a run of the resolved spec (as in a plan's spec.json) is in: its parallelism section,
    the world size and where it ran."""
    par, cluster = spec["parallelism"], spec["cluster"]
    return {**par, "world_size": par["pp"] * par["dp"] * par["tp"], "edp": par["dp"] * par["tp"] // par["ep"],
            "nodes": cluster["nodes"], "gpus_per_node": cluster["gpus_per_node"], "device": cluster["device"]["kind"]}


def identity(spec: dict[str, Any], step: int) -> dict[str, Any]:
    """lcc-checkpoint.json: deterministic (no times, no paths), from the plan's spec.json."""
    return {"schema": SCHEMA, "step": step, "spec": spec, "layout": layout_of(spec)}


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
            raise CheckpointError(f"{path / LATEST}: names {(path / LATEST).read_text().strip()!r}, which is missing")
        return found
    return path


def read_identity(path: Path) -> dict[str, Any]:
    """The lcc-checkpoint.json of checkpoint folder `path`, checked for its format."""
    file = Path(path) / IDENTITY
    if not file.is_file():
        raise CheckpointError(f"{path}: not an lcc checkpoint ({IDENTITY} is missing)")
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{file}: unreadable ({exc})") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        found = data.get("schema") if isinstance(data, dict) else None
        raise CheckpointError(f"{file}: checkpoint format {found!r}; this lcc reads {SCHEMA!r}")
    return data


def spec_differences(saved: Any, current: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    """(field path, saved, current) for every field that differs, outside the layout sections."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current), key=str):
            sub = f"{path}.{key}" if path else str(key)
            if (not path and key in LAYOUT_SECTIONS) or sub in OPERATIONAL:
                continue
            out += spec_differences(saved.get(key, _ABSENT), current.get(key, _ABSENT), sub)
        return out
    if isinstance(saved, list) and isinstance(current, list) and len(saved) == len(current):
        return [d for i, (a, b) in enumerate(zip(saved, current, strict=True))
                for d in spec_differences(a, b, f"{path}[{i}]")]
    return [] if saved == current else [(path, saved, current)]


class _Absent:
    def __repr__(self) -> str:
        return "absent"


_ABSENT = _Absent()


def _value(v: Any) -> str:
    return "absent" if v is _ABSENT else json.dumps(v)


def check_resume(directory: Path, spec: dict[str, Any]) -> Path | None:
    """Before any rank starts: the latest checkpoint in `directory` (None if there is none yet) must be an
    lcc checkpoint of this spec, up to the layout. Raises CheckpointError naming every field that differs."""
    path = latest(directory)
    if path is None:
        return None
    saved = read_identity(path)
    diffs = spec_differences(saved.get("spec", {}), spec)
    if diffs:
        was, now = saved.get("spec", {}).get("name"), spec.get("name")
        of = f"a checkpoint of {was}, not of {now}" if was != now else "a checkpoint of another run"
        lines = [f"  {p}: {_value(a)} in the checkpoint, {_value(b)} in this run" for p, a, b in diffs]
        raise CheckpointError(f"{path}: cannot resume from {of}: its spec differs in more than the layout "
                              "(parallelism, cluster; train.checkpoint_every and collective_timeout_s may change "
                              "too):\n" + "\n".join(lines))
    return path


# ---------------------------------------------------------------------------------------------- info
def describe(path: Path) -> dict[str, Any]:
    """What `lcc checkpoint info` shows: the identity, and per key the global shape, dtype, bytes and how
    many chunks it was saved in, from DCP's metadata."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = resolve(path)
    ident = read_identity(path)
    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as exc:  # noqa: BLE001 - DCP raises what its reader meets; the user gets one line
        raise CheckpointError(f"{path}: torch.distributed.checkpoint metadata unreadable "
                              f"({type(exc).__name__}: {exc})") from None
    tensors = []
    for key, md in sorted(metadata.state_dict_metadata.items()):
        if isinstance(md, TensorStorageMetadata):
            shape, dtype = list(md.size), md.properties.dtype
            tensors.append({"key": key, "shape": shape, "dtype": str(dtype).removeprefix("torch."),
                            "bytes": math.prod(shape) * dtype.itemsize, "chunks": len(md.chunks)})
        else:
            tensors.append({"key": key, "shape": None, "dtype": "bytes", "bytes": 0, "chunks": 1})
    holds: dict[str, dict[str, int]] = {}
    for t in tensors:
        kind = t["key"].split("/", 1)[0]
        entry = holds.setdefault(kind, {"tensors": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["bytes"] += t["bytes"]
    holds = dict(sorted(holds.items(), key=lambda kv: (KINDS.index(kv[0]) if kv[0] in KINDS else len(KINDS), kv[0])))
    return {"schema": "lcc.checkpoint-info/1", "path": str(path), "step": ident["step"],
            "spec_name": ident["spec"].get("name"), "spec": ident["spec"], "layout": ident["layout"],
            "holds": holds, "tensors": tensors}
