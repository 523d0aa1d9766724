"""Collectives with the autograd rules tensor and expert parallelism need (Megatron's conjugate pairs).

Each takes the process group of one mesh axis (None or size 1: the op is the identity). Forward and
backward are explicit so a generated program shows every communication it will issue.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

Group = dist.ProcessGroup | None


def _size(group: Group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _rank(group: Group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _all_reduce(x: torch.Tensor, group: Group) -> torch.Tensor:
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    return x


def _all_gather(x: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _slice(x: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
    return x.chunk(_size(group), dim=dim)[_rank(group)].contiguous()


class _ReduceFromRegion(torch.autograd.Function):
    """Forward: sum partial results over the group. Backward: identity (downstream is replicated)."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _CopyToRegion(torch.autograd.Function):
    """Forward: identity (the input is replicated). Backward: sum the gradients over the group."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _SplitToRegion(torch.autograd.Function):
    """Forward: keep this rank's slice of a replicated tensor. Backward: all-gather the slices' grads."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _slice(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.group, ctx.dim), None, None


class _GatherFromRegion(torch.autograd.Function):
    """Forward: all-gather the slices. Backward: keep this rank's slice (downstream is replicated)."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _slice(grad, ctx.group, ctx.dim), None, None


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
    return x if _size(group) == 1 else _ReduceFromRegion.apply(x, group)


def copy_to_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Enter a column-parallel region: identity forward; backward: all-reduce of the input gradient."""
    return x if _size(group) == 1 else _CopyToRegion.apply(x, group)


def split_tokens(x: torch.Tensor, group: Group) -> torch.Tensor:
    """This rank's 1/size of the tokens (dim 0); backward: all-gather."""
    return x if _size(group) == 1 else _SplitToRegion.apply(x, group, 0)


def gather_tokens(x: torch.Tensor, group: Group) -> torch.Tensor:
    """All ranks' tokens (dim 0) in rank order; backward: this rank's slice."""
    return x if _size(group) == 1 else _GatherFromRegion.apply(x, group, 0)


def all_to_all(x: torch.Tensor, send: list[int], recv: list[int], group: Group) -> torch.Tensor:
    """Exchange rows: send[i] rows to rank i, recv[i] rows from rank i; backward: the reverse."""
    return x if _size(group) == 1 else _AllToAll.apply(x, send, recv, group)


def exchange_counts(counts: torch.Tensor, group: Group) -> torch.Tensor:
    """Each rank sends row i of `counts` (size x k) to rank i; returns the rows it receives."""
    if _size(group) == 1:
        return counts
    out = torch.empty_like(counts)
    dist.all_to_all_single(out, counts.contiguous(), group=group)
    return out
