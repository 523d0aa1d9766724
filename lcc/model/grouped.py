"""torch's grouped matmul (`F.grouped_mm`), shared by the router's group-major logits and the experts.

Its group ends (`offs`) are a device tensor, so a grouped matmul needs no host synchronisation, where a
Python loop over groups must first copy the group sizes to the host.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def grouped_mm_ok(x_SD: torch.Tensor, w1_EFD: torch.Tensor, w2_EDF: torch.Tensor) -> bool:
    """torch's grouped matmul takes float32 / bfloat16 / float16 with rows aligned to 16 bytes: x's rows (D)
    and the rows of its output (w1's F), which its backward multiplies again."""
    if x_SD.dtype not in (torch.float32, torch.bfloat16, torch.float16) or not hasattr(F, "grouped_mm"):
        return False
    if w1_EFD.dtype != x_SD.dtype or w2_EDF.dtype != x_SD.dtype:
        return False
    align = 16 // x_SD.element_size()
    return x_SD.shape[-1] % align == 0 and w1_EFD.shape[1] % align == 0


def group_ends(counts: torch.Tensor | list[int], device: torch.device) -> torch.Tensor:
    """grouped_mm's `offs`: cumulative row counts as int32 (a device tensor stays on its device)."""
    return torch.as_tensor(counts, device=device).cumsum(0).to(torch.int32)


def contiguous_grad(t: torch.Tensor) -> torch.Tensor:
    if t.requires_grad:  # the grouped matmul's backward needs a dense incoming gradient
        t.register_hook(lambda g: g.contiguous())
    return t
