"""Checkpoints with torch.distributed.checkpoint: every rank writes its shards, nothing is gathered.

Keys name the shard a tensor is (`layers.0.attn.wq.weight#tp1of2`), so replicas of the same shard share
a key and are written once. A checkpoint is written into `step-NNNNNN.tmp/`, renamed when every rank is
done, and only then named in `latest`: a crash mid-save leaves the previous checkpoint usable.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from lcc.plan.types import Parameter

LATEST = "latest"


def shard_key(meta: Parameter, coords: dict[str, int], sizes: dict[str, int]) -> str:
    shard = meta.shard
    if shard is None:
        return meta.name
    return f"{meta.name}#{shard.axis}{shard.part(coords, sizes)}of{shard.parts}"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def save(directory: Path, step: int, state: dict[str, torch.Tensor], rank: int) -> Path:
    """Write `state` (this rank's part) as the checkpoint after `step` optimizer steps."""
    directory = Path(directory)
    final = directory / f"step-{step:06d}"
    tmp = directory / f"step-{step:06d}.tmp"
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
    _barrier()
    dcp.save(state, checkpoint_id=str(tmp))
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


def load(path: Path, state: dict[str, torch.Tensor]) -> None:
    """Fill `state` (tensors of the right shapes, keyed as when saved) from a checkpoint, in place."""
    dcp.load(state, checkpoint_id=str(path))


def _remove(path: Path) -> None:
    for child in sorted(path.rglob("*"), reverse=True):
        child.rmdir() if child.is_dir() else child.unlink()
    path.rmdir()
