"""Cross-entropy over vocab-parallel logits, as steps a program writes one per line: each TP rank holds a
slice of the vocabulary; the maximum and two sums over tp are the collectives between the steps."""

from __future__ import annotations

import torch
import torch.distributed as dist

from lcc.ops.groups import Group, group_size


def flatten_logits(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens x vocab slice) logits in float32 or wider, and the targets flattened alike."""
    wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return wide.reshape(-1, wide.shape[-1]), targets.reshape(-1)


def row_max(logits_TV: torch.Tensor) -> torch.Tensor:
    return logits_TV.detach().max(dim=-1).values


def all_reduce_max(x: torch.Tensor, group: Group) -> torch.Tensor:
    """The maximum over the group (no gradient: it only shifts the exponentials)."""
    if group_size(group) > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
    return x


def sum_exp(logits_TV: torch.Tensor, peak_T: torch.Tensor) -> torch.Tensor:
    """This slice's sum of exp(logit - peak) per token."""
    with torch.autocast(logits_TV.device.type, enabled=False):
        return (logits_TV - peak_T.unsqueeze(-1)).exp().sum(-1)


def target_logit(logits_TV: torch.Tensor, peak_T: torch.Tensor, targets_T: torch.Tensor,
                 vocab_start: int) -> torch.Tensor:
    """Each token's shifted target logit if the target is in this rank's slice of the vocabulary, else 0."""
    local = targets_T - vocab_start
    mine = (local >= 0) & (local < logits_TV.shape[-1])
    picked = logits_TV.gather(1, local.clamp(0, logits_TV.shape[-1] - 1).unsqueeze(1)).squeeze(1)
    return (picked - peak_T) * mine


def cross_entropy(sum_exp_T: torch.Tensor, target_T: torch.Tensor, targets_T: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """Summed cross-entropy from the whole vocabulary's sums; with `targets_T`, over the tokens whose target
    is a token id (a loss mask marks the others -1)."""
    with torch.autocast(sum_exp_T.device.type, enabled=False):
        per_token = sum_exp_T.log() - target_T
        return (per_token if targets_T is None else per_token * (targets_T >= 0)).sum()
