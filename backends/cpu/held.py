"""A serving weight held for one of lcc's native CPU kernels: the tensor, as the kernel takes it, wrapped so
that the op receiving it knows which kernel runs it (`isinstance` on the subclass) and the rank's memory
figures can count it like a tensor."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class HeldWeight:
    weight: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()
