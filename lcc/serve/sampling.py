"""Choosing the next token from a sequence's logits: greedy, or temperature and nucleus (top-p) sampling
from a generator seeded per request, so that a request's tokens do not depend on what it is batched with."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

SEEDS = 2**64  # a seed is in [0, 2**64): what torch.Generator.manual_seed takes


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    return_routed_experts: bool = False  # each generated token's experts per MoE layer (lcc.serve.routed)
    grammar: str | None = None  # what the text must follow (lcc.serve.structured: a compiled llguidance grammar)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be positive, not {self.max_tokens}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be at least 0, not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], not {self.top_p}")
        if any(not s for s in self.stop):
            raise ValueError("a stop string is empty")
        if self.seed is not None and not 0 <= self.seed < SEEDS:
            raise ValueError(f"seed must be in [0, 2**64), not {self.seed}")


def generator_for(params: SamplingParams) -> torch.Generator | None:
    if params.temperature == 0:
        return None
    g = torch.Generator()
    g.manual_seed(params.seed if params.seed is not None else random.SystemRandom().randrange(2**63))
    return g


def sample(logits_V: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
           allowed_V: torch.Tensor | None = None) -> int:
    """Greedy: the largest logit (ties: the lower id). Otherwise: softmax(logits / temperature), the
    smallest set of most likely tokens whose mass reaches top_p, one draw. `allowed_V`: only these tokens
    (structured output)."""
    logits = logits_V.to(torch.float64)
    if allowed_V is not None:
        if not bool(allowed_V.any()):
            raise ValueError("the grammar allows no token of the vocabulary here")
        logits = logits.masked_fill(~allowed_V, float("-inf"))
    if params.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax((logits - logits.max()) / params.temperature, dim=-1)  # finite for any temperature > 0
    if params.top_p < 1:
        sorted_p, order = torch.sort(probs, descending=True, stable=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < params.top_p  # mass before each token below top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))
