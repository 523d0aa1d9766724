"""Serving's dense projections on CPU through lcc's native kernel (lcc.backends.cpu.native,
csrc/dense_bf16.cpp): bfloat16 weights `[out, in]` times a decode step's few rows, each weight row read once
for all of them (AVX512-BF16 dot products where the CPU has them). Past `MAX_ROWS` rows (prefill chunks,
large batches) a GEMM library's blocking pays, and PyTorch's matmul runs instead.

Which weights go through it is decided at load (`lcc.serve.weights`, the plan's `serving.dense_kernel`):
those only ever multiplied by the programs' `ops.linear`, held as `NativeDense`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lcc.backends.cpu.held import HeldWeight
from lcc.backends.cpu.native import load

MAX_ROWS = 32  # measured: 1.7-2.3x PyTorch's bfloat16 matmul (oneDNN, no AMX) at 1-16 rows, 1.3x at 32, slower from 64


class NativeDense(HeldWeight):
    """A bfloat16 weight `[out, in]` (contiguous) for `linear`."""


def prepare(weight: torch.Tensor) -> NativeDense:
    load()  # built (or read from the cache) at load, not at the first step
    return NativeDense(weight.to(torch.bfloat16).contiguous())


def linear(x: torch.Tensor, w: NativeDense) -> torch.Tensor:
    """`x @ w.T` in bfloat16: lcc's kernel for at most MAX_ROWS rows, PyTorch's matmul beyond."""
    if x.dtype != torch.bfloat16 or x.numel() > MAX_ROWS * x.shape[-1]:
        return F.linear(x, w.weight)
    return load().ops.bf16_linear(x, w.weight)


class NativeDenseExperts(HeldWeight):
    """A layer's unquantised bfloat16 expert stack `[E, out, in]` (contiguous) for `swiglu_segments`."""


def prepare_experts(weight: torch.Tensor) -> NativeDenseExperts:
    load()
    return NativeDenseExperts(weight.to(torch.bfloat16).contiguous())


def swiglu_segments(x_SD: torch.Tensor, counts: list[int], w1: NativeDenseExperts, w3: NativeDenseExperts,
                    w2: NativeDenseExperts) -> torch.Tensor:
    """Each expert's SwiGLU over its contiguous segment of x (segments in expert order), in bfloat16 as the
    grouped matmul computes it (each projection rounded to bfloat16, the activation in bfloat16). When no
    segment has more than MAX_ROWS rows (decode steps), the whole layer is one call of lcc's kernel
    (`bf16_swiglu`); otherwise each segment in turn, its projections through lcc's kernel up to MAX_ROWS rows
    and PyTorch's matmul beyond. Experts without rows cost nothing."""
    if len(counts) != w1.shape[0] or sum(counts) != x_SD.shape[0]:
        raise ValueError(f"{x_SD.shape[0]} rows for counts {counts}: one count per expert ({w1.shape[0]})")
    x_SD = x_SD.to(torch.bfloat16)
    if max(counts, default=0) <= MAX_ROWS:  # every segment in the kernel: one call for the layer
        return load().ops.bf16_swiglu(x_SD, counts, w1.weight, w3.weight, w2.weight)
    out = x_SD.new_empty(x_SD.shape[0], w2.shape[1])
    start = 0
    for e, n in enumerate(counts):
        if n:
            x = x_SD[start:start + n]
            h = F.silu(_times(x, w1.weight[e])) * _times(x, w3.weight[e])
            out[start:start + n] = _times(h, w2.weight[e])
            start += n
    return out


def _times(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return load().ops.bf16_linear(x, w) if x.shape[0] <= MAX_ROWS else F.linear(x, w)
