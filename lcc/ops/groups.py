"""Process groups as the ops see them: a mesh axis's group, or None for an axis of one rank (where every
collective is the identity), and the plain (no autograd rule) helpers the ops and the runtime share.
Not part of a program's vocabulary (lcc.ops): programs call the collectives of lcc.ops.collectives."""

from __future__ import annotations

import torch
import torch.distributed as dist

Group = dist.ProcessGroup | None


def group_size(group: Group) -> int:
    """The ranks in `group` (1 for None)."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: Group) -> int:
    """This rank's place in `group` (0 for None)."""
    return 0 if group is None else dist.get_rank(group)


def all_reduce_copy(x: torch.Tensor, group: Group) -> torch.Tensor:
    """The sum over `group` of `x`, in a new tensor; no autograd rule (counts, statistics, and the forward or
    backward of the collectives that have one)."""
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    return x
