"""Dense ops of generated programs, on a rank's local shards; each equals the reference model's module."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lcc.backends.cpu import dense as native_dense
from lcc.backends.cpu import norm as native_norm
from lcc.backends.cpu.dense import NativeDense
from lcc.backends.cpu.norm import NativeNorm
from lcc.model.transformer import AttentionCore, head_rms_norm
from lcc.ops.collectives import sum_shared


def linear(x: torch.Tensor, weight: torch.Tensor | NativeDense) -> torch.Tensor:
    """`x @ weight.T`; a serving weight prepared for lcc's native dense kernel (the plan's
    `serving.dense_kernel: native_cpu`) runs through it."""
    if isinstance(weight, NativeDense):
        return native_dense.linear(x, weight)
    return F.linear(x, weight)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | NativeNorm, eps: float) -> torch.Tensor:
    """RMS norm over the last dim; a serving weight prepared for lcc's native kernel (the plan's
    `serving.norm_kernel: native_cpu`) runs through it."""
    if isinstance(weight, NativeNorm):
        return native_norm.rms_norm(x, weight, eps)
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def head_norm(x: torch.Tensor, weight: torch.Tensor | NativeNorm, head_dim: int, eps: float) -> torch.Tensor:
    """RMSNorm of each head of this rank's heads over its head_dim (queries or keys, before rotary)."""
    if isinstance(weight, NativeNorm):
        return native_norm.head_norm(x, weight, head_dim, eps)
    return head_rms_norm(x, weight, head_dim, eps)


def rms_norm_tp(x: torch.Tensor, weight: torch.Tensor | NativeNorm, group, eps: float) -> torch.Tensor:  # noqa: ANN001
    """RMSNorm over a width split over the group (every head's queries or keys, of which this rank holds its
    heads' and `weight`'s slice): the mean square sums every rank's share (an all-reduce; backward, another).
    Copies of a key head on several ranks are counted once each: the sum over tp ranks of local width w is
    tp * w elements, the whole width times the copies of each head. A serving weight held for the native
    kernel is used as it is here (the norm spans ranks)."""
    if isinstance(weight, NativeNorm):
        weight = weight.weight
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    total = sum_shared(xf.pow(2).sum(-1, keepdim=True), group)
    size = 1 if group is None else dist.get_world_size(group)
    return (xf * torch.rsqrt(total / (xf.shape[-1] * size) + eps)).to(x.dtype) * weight


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int, theta: float,
              segments: torch.Tensor | None = None) -> torch.Tensor:
    """RoPE + causal attention over this rank's heads (the head counts follow from the widths); with
    `segments` (the document of each position, [B, S]), a position attends only to its own document's."""
    core = AttentionCore(q.shape[-1] // head_dim, k.shape[-1] // head_dim, head_dim, theta)
    return core(q, k, v, segments)


def embedding_shard(tokens: torch.Tensor, weight: torch.Tensor | NativeDense, vocab_start: int) -> torch.Tensor:
    """Vocab-parallel lookup: the rows this rank holds, zeros for tokens outside its vocabulary slice
    (an all-reduce over tp then completes it). A serving weight held for the native dense kernel (a tied
    head multiplies it too) is looked up as it is."""
    if isinstance(weight, NativeDense):
        weight = weight.weight
    local = tokens - vocab_start
    inside = (local >= 0) & (local < weight.shape[0])
    return F.embedding(local.clamp(0, weight.shape[0] - 1), weight) * inside.unsqueeze(-1).to(weight.dtype)
