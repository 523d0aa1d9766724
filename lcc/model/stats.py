"""Router statistics per MoE layer over one optimizer step (summed over its units)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from lcc.model.moe import MoEStats


@dataclass
class LayerRouting:
    n_experts: int
    n_groups: int
    k_max: int
    load_E: torch.Tensor = field(init=False)
    k_hist: torch.Tensor = field(init=False)
    dropped: int = 0

    def __post_init__(self) -> None:
        self.load_E = torch.zeros(self.n_experts, dtype=torch.float64)
        self.k_hist = torch.zeros(self.k_max + 1, dtype=torch.int64)

    def add(self, stats: MoEStats) -> None:
        self.load_E += stats.load_E.detach().cpu()
        self.k_hist += torch.bincount(stats.k_T.detach().cpu(), minlength=self.k_max + 1)
        self.dropped += int(stats.dropped)

    def summary(self, ep: int = 1) -> dict[str, Any]:
        tokens = int(self.k_hist.sum())
        load = self.load_E
        per_group = load.view(self.n_groups, -1).sum(-1)
        per_rank = load.view(ep, -1).sum(-1)
        return {
            "tokens": tokens,
            "experts_per_token": float((self.k_hist * torch.arange(self.k_max + 1)).sum() / max(tokens, 1)),
            "k_histogram": self.k_hist[1:].tolist(),
            "dropped": self.dropped,
            "load_per_expert": load.tolist(),
            "load_per_group": per_group.tolist(),
            "imbalance_expert": imbalance(load),
            "imbalance_group": imbalance(per_group),
            "imbalance_ep_rank": imbalance(per_rank),
        }


def imbalance(load: torch.Tensor) -> float:
    """max / mean of a load vector (1.0 = perfectly even; 0 load counts as even)."""
    mean = float(load.mean())
    return float(load.max()) / mean if mean > 0 else 1.0
