"""Int4 experts behind the same seam as `ExpertFFN`: serve plans and int4 evaluation swap them in."""

from __future__ import annotations

import torch
from torch import nn

from lcc.backends.torch_ref.int4 import Int4Weight, int4_swiglu_segments, quantize
from lcc.model.moe import ExpertFFN, MoEBlock
from lcc.spec.models import ExpertQuant


class Int4ExpertFFN(nn.Module):
    def __init__(self, w1: Int4Weight, w3: Int4Weight, w2: Int4Weight):
        super().__init__()
        self.w1, self.w3, self.w2 = w1, w3, w2

    @classmethod
    def from_dense(cls, experts: ExpertFFN, cfg: ExpertQuant) -> Int4ExpertFFN:
        q = [quantize(w.detach(), cfg.group_size, cfg.symmetric)
             for w in (experts.w1_EFD, experts.w3_EFD, experts.w2_EDF)]
        return cls(*q)

    @property
    def nbytes(self) -> int:
        return self.w1.nbytes + self.w3.nbytes + self.w2.nbytes

    def forward(self, x_SD: torch.Tensor, counts: torch.Tensor | list[int]) -> torch.Tensor:
        return int4_swiglu_segments(x_SD, counts, self.w1, self.w3, self.w2)


def quantize_experts(model: nn.Module, cfg: ExpertQuant) -> int:
    """Replace every MoE block's experts by int4 ones in place; returns the packed bytes."""
    total = 0
    for module in model.modules():
        if isinstance(module, MoEBlock) and isinstance(module.experts, ExpertFFN):
            module.experts = Int4ExpertFFN.from_dense(module.experts, cfg)
            total += module.experts.nbytes
    return total
