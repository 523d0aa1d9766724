"""Collectives with the autograd rules tensor and expert parallelism need (Megatron's conjugate pairs).

Each takes the process group of one mesh axis (None or size 1: the op is the identity). Forward and
backward are explicit so a generated program shows every communication it will issue.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from lcc.ops import c10d, timing
from lcc.ops.groups import Group, all_reduce_copy, group_rank, group_size
from lcc.ops.regather import register


def _slice(x: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
    return x.chunk(group_size(group), dim=dim)[group_rank(group)].contiguous()


class _ReduceFromRegion(torch.autograd.Function):
    """Forward: sum partial results over the group. Backward: identity (downstream is replicated)."""

    @staticmethod
    def forward(ctx, x, group):
        return all_reduce_copy(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _SumEverywhere(torch.autograd.Function):
    """Forward: sum over the group. Backward: sum the gradients over the group (every rank's own computation
    uses the sum)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_reduce_copy(x, group)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce_copy(grad, ctx.group), None


class _CopyToRegion(torch.autograd.Function):
    """Forward: identity (the input is replicated). Backward: sum the gradients over the group."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return all_reduce_copy(grad, ctx.group), None


class _SplitToRegion(torch.autograd.Function):
    """Forward: keep this rank's slice of a replicated tensor. Backward: all-gather the slices' grads."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _slice(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _gather_along(grad, ctx.group, ctx.dim), None, None


class _GatherFromRegion(torch.autograd.Function):
    """Forward: all-gather the slices. Backward: keep this rank's slice (downstream is replicated)."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _gather_along(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _slice(grad, ctx.group, ctx.dim), None, None


def _gather_along(x: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
    """All ranks' slices of `dim` in rank order: one all-gather of the slices moved to dim 0."""
    local = x.movedim(dim, 0).contiguous()
    out = local.new_empty((local.shape[0] * group_size(group), *local.shape[1:]))
    c10d.all_gather_single(out, local, group=group)
    return out.movedim(0, dim)


def _reduce_scatter_along(x: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
    """The sum over the group of this rank's slice of `dim`: one reduce-scatter with `dim` moved to dim 0."""
    full = x.movedim(dim, 0).contiguous()
    out = full.new_empty((full.shape[0] // group_size(group), *full.shape[1:]))
    c10d.reduce_scatter_single(out, full, group=group)
    return out.movedim(0, dim).contiguous()


class _Slices:
    """A sequence-parallel all-gather's source for `lcc.ops.regather`: this rank's slice, gathered again
    in backward for the column-parallel layers' weight gradients."""

    names = ["sequence-parallel input"]

    def __init__(self, local: torch.Tensor, group: Group, dim: int):
        self.local, self.group, self.dim = local, group, dim
        self.pending = 0
        self.full: torch.Tensor | None = None

    def unpack(self, index: int, size: torch.Size, stride: tuple[int, ...], offset: int) -> torch.Tensor:
        if self.full is None:
            self.full = _gather_along(self.local, self.group, self.dim).contiguous()
        out = self.full.as_strided(size, stride, offset)
        self.pending -= 1
        if self.pending == 0:
            self.full = None
        return out


class _GatherSequence(torch.autograd.Function):
    """Forward: all-gather the sequence slices (registered, so that autograd keeps the slice and backward
    gathers again). Backward: reduce-scatter the gradient into the slices (each rank's copy of the
    gathered tensor fed its own part of the column-parallel layer)."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        full = _gather_along(x, group, dim).contiguous()
        register([full], _Slices(x.detach(), group, dim))
        return full

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_along(grad, ctx.group, ctx.dim), None, None


class _ReduceScatterSequence(torch.autograd.Function):
    """Forward: sum partial results over the group, keeping this rank's slice of the sequence. Backward:
    all-gather the slices' gradients."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _reduce_scatter_along(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _gather_along(grad, ctx.group, ctx.dim), None, None


class _AllToAll(torch.autograd.Function):
    """Forward: rows [sum send[:i], ...) go to rank i. Backward: the reverse exchange."""

    @staticmethod
    def forward(ctx, x, send, recv, group):
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty((sum(recv), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out = grad.new_empty((sum(ctx.send), *grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), ctx.send, ctx.recv, group=ctx.group)
        return out, None, None, None


def all_reduce(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Sum partial results of a row-parallel layer; backward: identity."""
    return x if group_size(group) == 1 else _ReduceFromRegion.apply(x, group)


def sum_shared(x: torch.Tensor, group: Group) -> torch.Tensor:
    """A sum over the group that every rank goes on computing with; backward: all-reduce of its gradient."""
    return x if group_size(group) == 1 else _SumEverywhere.apply(x, group)


def copy_to_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Enter a column-parallel region: identity forward; backward: all-reduce of the input gradient."""
    return x if group_size(group) == 1 else _CopyToRegion.apply(x, group)


def split_tokens(x: torch.Tensor, group: Group) -> torch.Tensor:
    """This rank's 1/size of the tokens (dim 0); backward: all-gather. Where the tokens do not divide by the
    group's size (a serve step: no backward), the first `rows % size` ranks take one token more."""
    size = group_size(group)
    if size == 1:
        return x
    if x.shape[0] % size:
        return x.tensor_split(size)[group_rank(group)]
    return _SplitToRegion.apply(x, group, 0)


def gather_tokens(x: torch.Tensor, group: Group, rows: int | None = None) -> torch.Tensor:
    """All ranks' tokens (dim 0) in rank order; backward: this rank's slice. `rows`: the whole count, where
    the ranks' shares may differ (split_tokens of a count that does not divide by the group's size)."""
    size = group_size(group)
    if size == 1:
        return x
    if rows is None or rows % size == 0:
        return _GatherFromRegion.apply(x, group, 0)
    sizes = [rows // size + (i < rows % size) for i in range(size)]
    padded = x.new_zeros((sizes[0], *x.shape[1:]))
    padded[:x.shape[0]] = x
    out = x.new_empty((sizes[0] * size, *x.shape[1:]))
    c10d.all_gather_single(out, padded, group=group)
    return torch.cat([piece[:n] for piece, n in zip(out.chunk(size), sizes, strict=True)])


def gather_sequence(x: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
    """Sequence parallelism, entering a column-parallel region: every rank's slice of the sequence (`dim`);
    backward: reduce-scatter."""
    return x if group_size(group) == 1 else _GatherSequence.apply(x, group, dim)


def reduce_scatter_sequence(x: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
    """Sequence parallelism, after a row-parallel layer: the summed partial results, this rank's slice of
    the sequence (`dim`); backward: all-gather."""
    return x if group_size(group) == 1 else _ReduceScatterSequence.apply(x, group, dim)


def all_to_all(x: torch.Tensor, send: list[int], recv: list[int], group: Group) -> torch.Tensor:
    """Exchange rows: send[i] rows to rank i, recv[i] rows from rank i; backward: the reverse."""
    return x if group_size(group) == 1 else _AllToAll.apply(x, send, recv, group)


def exchange_counts(counts: torch.Tensor, group: Group) -> torch.Tensor:
    """Each rank sends row i of `counts` (size x k) to rank i; returns the rows it receives."""
    if group_size(group) == 1:
        return counts
    out = torch.empty_like(counts)
    dist.all_to_all_single(out, counts.contiguous(), group=group)
    return out


def gather_vocab(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Serve plans: every rank's slice of the vocabulary (the last dim) in rank order: whole logits."""
    return x if group_size(group) == 1 else _gather_along(x, group, x.dim() - 1).contiguous()


class _AllToAllStart(torch.autograd.Function):
    """Forward: start the exchange (rows [sum send[:i], ...) to rank i) and return its output buffer, not yet
    filled, with the pending work; `exchange_wait` waits. Backward: the reverse exchange, at once."""

    @staticmethod
    def forward(ctx, x, send, recv, group):
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty((sum(recv), *x.shape[1:]))
        work = dist.all_to_all_single(out, x.contiguous(), recv, send, group=group, async_op=True)
        timing.on_arrival(work, "all_to_all")
        return out, work

    @staticmethod
    def backward(ctx, grad, _):
        out = grad.new_empty((sum(ctx.send), *grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), ctx.send, ctx.recv, group=ctx.group)
        return out, None, None, None


class _Wait(torch.autograd.Function):
    """Forward: wait for an exchange `all_to_all_start` began; its rows as a tensor of their own. Backward:
    identity."""

    @staticmethod
    def forward(ctx, x, work):
        work.wait()
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def all_to_all_start(x: torch.Tensor, send: list[int], recv: list[int], group: Group) -> tuple[torch.Tensor, Any]:
    """Begin exchanging rows as `all_to_all` does and return (the output, its pending work) at once, so that
    computation can run while the rows travel; read the output only through `exchange_wait`. Backward: the
    reverse exchange (synchronous)."""
    if group_size(group) == 1:
        return x, None
    return _AllToAllStart.apply(x, send, recv, group)


def exchange_wait(x: torch.Tensor, work: Any) -> torch.Tensor:
    """The rows of an exchange `all_to_all_start` began, once they have arrived."""
    return x if work is None else _Wait.apply(x, work)
