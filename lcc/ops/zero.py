"""ZeRO-3 in generated programs: parameters all-gathered just before use, freed after use, re-gathered
for backward, their gradients reduce-scattered.

A rank holds one flat shard of each parameter: its local tensor (after tp/ep splitting) flattened and cut
into `parts` pieces of ceil(numel / parts) elements, the last padded with zeros; piece i lives on the rank
with coordinate i along the parameter's ZeRO axis (dp for dense parameters, edp for experts).

`zero_gather` all-gathers a function's parameters (an all-gather whose backward is a reduce-scatter into
the shards); `zero_prefetch` starts the next function's all-gathers in the background. While a forward
runs under `offload_gathered()`, autograd keeps a small handle in place of each gathered parameter it
saves for backward and all-gathers the parameter again when backward needs it, so a gathered copy lives
only as long as the function that uses it.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from lcc.ops.collectives import Group, _size
from lcc.plan.types import chunk_size

__all__ = ["chunk_size", "live_gathered", "offload_gathered", "shard_flat", "zero_gather", "zero_prefetch"]


def shard_flat(t: torch.Tensor, parts: int, index: int) -> torch.Tensor:
    """Piece `index` of `parts` of the flattened tensor, zero-padded to chunk_size (a new tensor)."""
    n = t.numel()
    chunk = chunk_size(n, parts)
    out = t.new_zeros(chunk)
    lo, hi = min(index * chunk, n), min((index + 1) * chunk, n)
    out[:hi - lo] = t.reshape(-1)[lo:hi]
    return out


def _buckets(params: dict[str, tuple[str, list[int]]]) -> dict[str, list[tuple[str, list[int]]]]:
    """A function's parameters by ZeRO axis: each axis's are gathered in one collective."""
    out: dict[str, list[tuple[str, list[int]]]] = {}
    for name, (axis, shape) in params.items():
        out.setdefault(axis, []).append((name, shape))
    return out


class _Bucket:
    """Parameters all-gathered together: rank r contributes the concatenation of its pieces."""

    def __init__(self, names: list[str], shards: list[torch.Tensor], shapes: list[list[int]], group: Group):
        self.names, self.shards, self.shapes, self.group = names, shards, shapes, group
        self.parts = _size(group)
        self.chunks = [s.numel() for s in shards]
        self.pending = 0
        self.fulls: list[torch.Tensor] | None = None  # while backward re-gathers

    def start(self, async_op: bool = False) -> tuple[torch.Tensor, Any]:
        local = torch.cat([s.detach().reshape(-1) for s in self.shards])
        buffer = local.new_empty(self.parts * local.numel())
        return buffer, dist.all_gather_single(buffer, local, group=self.group, async_op=async_op)

    def split(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        """Each parameter's full local tensor from the gathered buffer (rank-major pieces)."""
        grid = buffer.view(self.parts, -1)
        out, offset = [], 0
        for chunk, shape in zip(self.chunks, self.shapes, strict=True):
            out.append(grid[:, offset:offset + chunk].reshape(-1)[:math.prod(shape)].view(shape))
            offset += chunk
        return out

    def reduce_scatter(self, grads: list[torch.Tensor | None]) -> list[torch.Tensor]:
        """This rank's piece of the sum over the group of each parameter's gradient."""
        total = sum(self.chunks)
        like = next(g for g in grads if g is not None)
        grid = like.new_zeros(self.parts, total)
        offset = 0
        for chunk, g in zip(self.chunks, grads, strict=True):
            if g is not None:
                padded = g.new_zeros(self.parts * chunk)
                padded[:g.numel()] = g.reshape(-1)
                grid[:, offset:offset + chunk] = padded.view(self.parts, chunk)
            offset += chunk
        out = like.new_empty(total)
        dist.reduce_scatter_single(out, grid.view(-1), group=self.group)
        return list(out.split(self.chunks))

    def unpack(self, index: int, size: torch.Size, stride: tuple[int, ...], offset: int) -> torch.Tensor:
        """A saved use of parameter `index` in backward: the bucket is gathered again on the first."""
        if self.fulls is None:
            self.fulls = self.split(self.start()[0])
        out = self.fulls[index].as_strided(size, stride, offset)
        self.pending -= 1
        if self.pending == 0:
            self.fulls = None
        return out


_GATHERED: dict[int, tuple[weakref.ref, _Bucket, int, int]] = {}  # storage -> (ref, bucket, index, bytes)


def _register(fulls: list[torch.Tensor], bucket: _Bucket) -> None:
    for index, full in enumerate(fulls):
        storage = full.untyped_storage()
        key = storage._cdata
        _GATHERED[key] = (weakref.ref(storage), bucket, index, storage.nbytes())
        weakref.finalize(storage, _GATHERED.pop, key, None)


def live_gathered() -> dict[str, int]:
    """The gathered parameter copies alive on this rank: name -> bytes (empty when only shards remain)."""
    return {entry[1].names[entry[2]]: entry[3] for entry in list(_GATHERED.values()) if entry[0]() is not None}


class _GatherBucket(torch.autograd.Function):
    """Forward: the full parameters from every rank's pieces. Backward: one reduce-scatter of their
    gradients into the pieces."""

    @staticmethod
    def forward(ctx, bucket, buffer, *shards):
        ctx.bucket = bucket
        return tuple(bucket.split(buffer))

    @staticmethod
    def backward(ctx, *grads):
        return None, None, *ctx.bucket.reduce_scatter(list(grads))


def zero_gather(P: dict[str, torch.Tensor], params: dict[str, tuple[str, list[int]]], G: Any,
                ctx: Any) -> dict[str, torch.Tensor]:
    """P with the named parameters all-gathered over their ZeRO axis (G.dp or G.edp) to their full local
    shape, one collective per axis; what `zero_prefetch` started is waited for instead."""
    out = dict(P)
    for axis, members in _buckets(params).items():
        group = getattr(G, axis)
        names = [n for n, _ in members]
        if _size(group) == 1:
            out.update({n: P[n][:math.prod(shape)].view(shape) for n, shape in members})
            continue
        pending = ctx.prefetched.pop(tuple(names), None)
        bucket = _Bucket(list(names), [P[n] for n in names], [shape for _, shape in members], group)
        if pending is None:
            buffer, _ = bucket.start()
        else:
            buffer, work = pending
            work.wait()
        fulls = _GatherBucket.apply(bucket, buffer, *bucket.shards)
        _register(list(fulls), bucket)
        out.update(zip(names, fulls, strict=True))
    return out


def zero_prefetch(P: dict[str, torch.Tensor], params: dict[str, tuple[str, list[int]]], G: Any, ctx: Any) -> None:
    """Start all-gathering the named parameters in the background (not while recomputing in backward)."""
    if ctx.recomputing:
        return
    for axis, members in _buckets(params).items():
        group = getattr(G, axis)
        names = tuple(n for n, _ in members)
        if _size(group) > 1 and names not in ctx.prefetched:
            bucket = _Bucket(list(names), [P[n] for n in names], [shape for _, shape in members], group)
            ctx.prefetched[names] = bucket.start(async_op=True)


def _pack(t: torch.Tensor) -> Any:
    entry = _GATHERED.get(t.untyped_storage()._cdata)
    if entry is None or entry[0]() is None:
        return t
    bucket, index = entry[1], entry[2]
    bucket.pending += 1
    return bucket, index, t.size(), t.stride(), t.storage_offset()


def _unpack(packed: Any) -> torch.Tensor:
    if isinstance(packed, torch.Tensor):
        return packed
    bucket, index, size, stride, offset = packed
    return bucket.unpack(index, size, stride, offset)


@contextlib.contextmanager
def offload_gathered() -> Iterator[None]:
    """Within this block, tensors autograd saves that are gathered parameters (or views of them) are
    kept as handles and all-gathered again in backward."""
    with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
        yield
