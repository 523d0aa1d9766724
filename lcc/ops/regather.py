"""Gathered tensors that backward gathers again instead of keeping: ZeRO-3's parameters and, with
sequence parallelism, the all-gathered inputs of column-parallel layers.

A gathering op registers its output with its source (an object with `names`, a `pending` count and
`unpack(index, size, stride, offset)`). While a forward runs under `offload_gathered()`, autograd keeps a
small handle in place of each registered tensor (or view of one) it saves for backward; backward's first
use gathers again (one collective, shared by the uses of that forward) and the copy is freed after the
last. What activation checkpointing recomputes is saved by the checkpoint instead, and is not gathered
again.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import torch

_GATHERED: dict[int, tuple[weakref.ref, Any, int, int]] = {}  # storage -> (ref, source, index, bytes)


def register(fulls: list[torch.Tensor], source: Any) -> None:
    for index, full in enumerate(fulls):
        storage = full.untyped_storage()
        key = storage._cdata
        _GATHERED[key] = (weakref.ref(storage), source, index, storage.nbytes())
        weakref.finalize(storage, _GATHERED.pop, key, None)


def live_gathered() -> dict[str, int]:
    """The gathered copies alive on this rank: name -> bytes (empty when only shards remain)."""
    return {entry[1].names[entry[2]]: entry[3] for entry in list(_GATHERED.values()) if entry[0]() is not None}


def _pack(t: torch.Tensor) -> Any:
    entry = _GATHERED.get(t.untyped_storage()._cdata)
    if entry is None or entry[0]() is None:
        return t
    source, index = entry[1], entry[2]
    source.pending += 1
    return source, index, t.size(), t.stride(), t.storage_offset()


def _unpack(packed: Any) -> torch.Tensor:
    if isinstance(packed, torch.Tensor):
        return packed
    source, index, size, stride, offset = packed
    return source.unpack(index, size, stride, offset)


@contextlib.contextmanager
def offload_gathered() -> Iterator[None]:
    """Within this block, tensors autograd saves that are registered gathered tensors (or views of them)
    are kept as handles and gathered again in backward."""
    with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
        yield
