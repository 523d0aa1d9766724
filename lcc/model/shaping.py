"""Adaptive gradient shaping for sparse expert updates (docs/model.md, "Gradient shaping").

Over an optimizer step, expert e's weight gradient is multiplied by T / n_e: T tokens in the step, n_e
slots routed to e, both summed over micro-batches and ranks by the caller. An expert that received no
token keeps a zero gradient. Applied after accumulation and before clipping.
"""

from __future__ import annotations

import torch

from lcc.model.moe import ExpertFFN


def token_count_factors(load_E: torch.Tensor, total_tokens: int) -> torch.Tensor:
    load = load_E.to(torch.float64)
    return torch.where(load > 0, total_tokens / load.clamp(min=1), torch.zeros_like(load))


@torch.no_grad()
def shape_expert_grads(experts: ExpertFFN, load_E: torch.Tensor, total_tokens: int) -> None:
    factors = token_count_factors(load_E, total_tokens)
    for p in (experts.w1_EFD, experts.w3_EFD, experts.w2_EDF):
        if p.grad is not None:
            p.grad.mul_(factors.to(p.grad.dtype).view(-1, 1, 1))
