"""Dense ops of generated programs, on a rank's local shards; each equals the reference model's module."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lcc.model.transformer import AttentionCore, head_rms_norm


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def head_norm(x: torch.Tensor, weight: torch.Tensor, head_dim: int, eps: float) -> torch.Tensor:
    """RMSNorm of each head of this rank's heads over its head_dim (queries or keys, before rotary)."""
    return head_rms_norm(x, weight, head_dim, eps)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """RoPE + causal attention over this rank's heads (the head counts follow from the widths)."""
    core = AttentionCore(q.shape[-1] // head_dim, k.shape[-1] // head_dim, head_dim, theta)
    return core(q, k, v)


def embedding_shard(tokens: torch.Tensor, weight: torch.Tensor, vocab_start: int) -> torch.Tensor:
    """Vocab-parallel lookup: the rows this rank holds, zeros for tokens outside its vocabulary slice
    (an all-reduce over tp then completes it)."""
    local = tokens - vocab_start
    inside = (local >= 0) & (local < weight.shape[0])
    return F.embedding(local.clamp(0, weight.shape[0] - 1), weight) * inside.unsqueeze(-1).to(weight.dtype)
