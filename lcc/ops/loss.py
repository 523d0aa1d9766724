"""Cross-entropy over vocab-parallel logits: each TP rank holds a slice of the vocabulary."""

from __future__ import annotations

import torch
import torch.distributed as dist

from lcc.ops.collectives import Group, _size, all_reduce


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, group: Group,
                                 vocab_start: int) -> torch.Tensor:
    """Summed cross-entropy of (..., V/tp) logits; the same value on every rank of the group."""
    logits = logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits
    flat, tgt = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    peak = flat.detach().max(dim=-1).values
    if _size(group) > 1:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    shifted = flat - peak.unsqueeze(-1)
    sum_exp = all_reduce(shifted.exp().sum(-1), group)
    local = tgt - vocab_start
    mine = (local >= 0) & (local < flat.shape[-1])
    picked = shifted.gather(1, local.clamp(0, flat.shape[-1] - 1).unsqueeze(1)).squeeze(1) * mine
    target_logit = all_reduce(picked, group)
    return (sum_exp.log() - target_logit).sum()
