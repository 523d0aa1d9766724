"""ZeRO-3 in generated programs: parameters all-gathered just before use, freed after use, re-gathered
for backward, their gradients reduce-scattered.

A rank holds one flat shard of each parameter: its local tensor (after tp/ep splitting) flattened and cut
into `parts` pieces of ceil(numel / parts) elements, the last padded with zeros; piece i lives on the rank
with coordinate i along the parameter's ZeRO axis (dp for dense parameters, edp for experts).

`zero_gather` all-gathers a function's parameters (an all-gather whose backward is a reduce-scatter into
the shards); `zero_prefetch` starts the next function's all-gathers in the background. While a forward
runs under `offload_gathered()`, autograd keeps a small handle in place of each gathered parameter it
saves for backward and all-gathers the parameter again when backward needs it (`lcc.ops.regather`), so a
gathered copy lives only as long as the function that uses it.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lcc.ops import c10d
from lcc.ops.groups import Group, group_size
from lcc.ops.regather import live_gathered, offload_gathered, register
from lcc.plan.types import chunk_size

__all__ = ["chunk_size", "live_gathered", "offload_gathered", "shard_flat", "zero_gather", "zero_prefetch"]


def shard_flat(t: torch.Tensor, parts: int, index: int) -> torch.Tensor:
    """Piece `index` of `parts` of the flattened tensor, zero-padded to chunk_size (a new tensor)."""
    n = t.numel()
    chunk = chunk_size(n, parts)
    out = t.new_empty(chunk)
    lo, hi = min(index * chunk, n), min((index + 1) * chunk, n)
    out[:hi - lo] = t.reshape(-1)[lo:hi]
    out[hi - lo:].zero_()
    return out


def piece_grid(grads: list[torch.Tensor | None], chunks: list[int], parts: int) -> torch.Tensor:
    """Gradients laid out for one reduce-scatter into pieces: row r holds piece r of every gradient
    (`chunks` elements each, zero-padded; None counts as zeros). One copy per gradient; only the padding
    is filled."""
    like = next(g for g in grads if g is not None)
    grid = like.new_empty(parts, sum(chunks))
    offset = 0
    for chunk, g in zip(chunks, grads, strict=True):
        column = grid[:, offset:offset + chunk]
        if g is None:
            column.zero_()
        else:
            flat = g.reshape(-1)
            rows, rest = divmod(flat.numel(), chunk)
            column[:rows].copy_(flat[:rows * chunk].view(rows, chunk))
            if rows < parts:
                column[rows, :rest].copy_(flat[rows * chunk:])
                column[rows, rest:].zero_()
                column[rows + 1:].zero_()
        offset += chunk
    return grid


def _buckets(params: dict[str, tuple[str, list[int]]]) -> dict[str, list[tuple[str, list[int]]]]:
    """A function's parameters by ZeRO axis: each axis's are gathered in one collective."""
    out: dict[str, list[tuple[str, list[int]]]] = {}
    for name, (axis, shape) in params.items():
        out.setdefault(axis, []).append((name, shape))
    return out


class GatherBucket:
    """Parameters all-gathered together: rank r contributes the concatenation of its pieces. A source of
    gathered tensors for `lcc.ops.regather` (names, pending, unpack)."""

    def __init__(self, names: list[str], shards: list[torch.Tensor], shapes: list[list[int]], group: Group,
                 ctx: Any = None):
        self.names, self.shards, self.shapes, self.group, self.ctx = names, shards, shapes, group, ctx
        self.parts = group_size(group)
        self.chunks = [s.numel() for s in shards]
        self.pending = 0
        self.fulls: list[torch.Tensor] | None = None  # while backward re-gathers

    def start(self, async_op: bool = False) -> tuple[torch.Tensor, Any]:
        local = torch.cat([s.detach().reshape(-1) for s in self.shards])
        buffer = local.new_empty(self.parts * local.numel())
        return buffer, c10d.all_gather_single(buffer, local, group=self.group, async_op=async_op)

    def split(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        """Each parameter's full local tensor from the gathered buffer (rank-major pieces)."""
        grid = buffer.view(self.parts, -1)
        out, offset = [], 0
        for chunk, shape in zip(self.chunks, self.shapes, strict=True):
            out.append(grid[:, offset:offset + chunk].reshape(-1)[:math.prod(shape)].view(shape))
            offset += chunk
        return out

    def copy_into(self, buffer: torch.Tensor, targets: list[torch.Tensor]) -> None:
        """`split`, written straight into each parameter's contiguous tensor in `targets`: one strided copy
        of its rank-major pieces, no intermediate tensor."""
        grid = buffer.view(self.parts, -1)
        offset = 0
        for chunk, target in zip(self.chunks, targets, strict=True):
            flat = target.view(-1)
            rows, rest = divmod(flat.numel(), chunk)
            if rows:
                flat[:rows * chunk].view(rows, chunk).copy_(grid[:rows, offset:offset + chunk])
            if rest:
                flat[rows * chunk:].copy_(grid[rows, offset:offset + rest])
            offset += chunk

    def reduce_scatter(self, grads: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """This rank's piece of the sum over the group of each parameter's gradient; while the program
        context accumulates (a backward before the stage's last, reducing once per step), the gradients are
        added to what earlier backwards held instead, and no piece is produced yet."""
        grid = piece_grid(grads, self.chunks, self.parts)
        held = self.ctx.held_grads if self.ctx is not None else {}
        key = tuple(self.names)
        if key in held:
            grid += held.pop(key)
        if self.ctx is not None and self.ctx.accumulating:
            held[key] = grid
            return [None] * len(grads)
        out = grid.new_empty(sum(self.chunks))
        c10d.reduce_scatter_single(out, grid.view(-1), group=self.group)
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
        if group_size(group) == 1:
            out.update({n: P[n][:math.prod(shape)].view(shape) for n, shape in members})
            continue
        pending = ctx.prefetched.pop(tuple(names), None)
        bucket = GatherBucket(list(names), [P[n] for n in names], [shape for _, shape in members], group, ctx)
        if pending is None:
            buffer, _ = bucket.start()
        else:
            buffer, work = pending
            work.wait()
        fulls = _GatherBucket.apply(bucket, buffer, *bucket.shards)
        register(list(fulls), bucket)
        out.update(zip(names, fulls, strict=True))
    return out


def zero_prefetch(P: dict[str, torch.Tensor], params: dict[str, tuple[str, list[int]]], G: Any, ctx: Any) -> None:
    """Start all-gathering the named parameters in the background (not while recomputing in backward)."""
    if ctx.recomputing:
        return
    for axis, members in _buckets(params).items():
        group = getattr(G, axis)
        names = tuple(n for n, _ in members)
        if group_size(group) > 1 and names not in ctx.prefetched:
            bucket = GatherBucket(list(names), [P[n] for n in names], [shape for _, shape in members], group)
            ctx.prefetched[names] = bucket.start(async_op=True)
