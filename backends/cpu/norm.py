"""Serving's RMS norms on CPU through lcc's native kernel (lcc.backends.cpu.native, csrc/rows.cpp): one call
per norm where PyTorch's version is nine small operators (eleven for a norm of each head). The same
roundings as lcc.ops.rms_norm: the row's mean square in float32, the normalised row rounded to the
activations' dtype, then times the weight; only the order of the sum of squares differs.

Which weights go through it is decided at load (`lcc.serve.weights`, the plan's `serving.norm_kernel`): the
norms' weights, held as `NativeNorm` in the serve dtype."""

from __future__ import annotations

import torch
from lcc.backends.cpu.held import HeldWeight
from lcc.backends.cpu.native import load


class NativeNorm(HeldWeight):
    """An RMS norm's weight `[D]` (contiguous, in the serve dtype)."""


def prepare(weight: torch.Tensor, dtype: torch.dtype) -> NativeNorm:
    load()  # built (or read from the cache) at load, not at the first step
    return NativeNorm(weight.to(dtype).contiguous())


def rms_norm(x: torch.Tensor, w: NativeNorm, eps: float) -> torch.Tensor:
    """RMS norm of each row of x over its last dim (its width: w's size)."""
    return load().ops.rms_norm(x, w.weight, eps)


def head_norm(x: torch.Tensor, w: NativeNorm, head_dim: int, eps: float) -> torch.Tensor:
    """RMS norm of each head of x's rows (heads of head_dim after one another along the last dim)."""
    if w.weight.shape[0] != head_dim:
        raise ValueError(f"a norm of each head of {head_dim} takes {head_dim} weights, not {w.weight.shape[0]}")
    return load().ops.rms_norm(x, w.weight, eps)  # the kernel norms each slice of the weight's size
