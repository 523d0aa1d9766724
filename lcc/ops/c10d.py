"""torch.distributed's single-tensor all-gather and reduce-scatter under their torch 2.13 names
(`all_gather_single`, `reduce_scatter_single`), falling back to the older names where a torch lacks them
(`all_gather_into_tensor`, `reduce_scatter_tensor`: e.g. a GPU machine's own torch 2.11). Looked up at
each call, so that `--transcript` (which wraps torch.distributed's functions) sees them."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def all_gather_single(out: torch.Tensor, inp: torch.Tensor, group: Any = None, async_op: bool = False) -> Any:
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(out, inp, group=group, async_op=async_op)


def reduce_scatter_single(out: torch.Tensor, inp: torch.Tensor, group: Any = None, async_op: bool = False) -> Any:
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(out, inp, group=group, async_op=async_op)
