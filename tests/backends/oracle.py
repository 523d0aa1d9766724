"""A float64 oracle for the MoE kernels, written from the int4 format's definition (not from lcc's code):
each token's used slots one by one, weights decoded element by element from their bytes."""

from __future__ import annotations

import torch


def decode_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                group_size: int) -> torch.Tensor:
    """`[E, out, in / 2]` bytes (input 2j in the low nibble, 2j + 1 in the high one) -> float64 `[E, out, in]`."""
    b = packed.to(torch.int64)
    codes = torch.empty(*b.shape[:-1], 2 * b.shape[-1], dtype=torch.float64)
    codes[..., 0::2] = (b % 16).to(torch.float64)
    codes[..., 1::2] = (b // 16).to(torch.float64)
    group = torch.arange(codes.shape[-1]) // group_size
    scale = scales.to(torch.float64)[..., group]
    zero = 8.0 if zeros is None else zeros.to(torch.float64)[..., group]
    return (codes - zero) * scale


def silu(v: torch.Tensor) -> torch.Tensor:
    return v / (1 + torch.exp(-v))


def expert(x_D: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, e: int) -> torch.Tensor:
    return (silu(w1[e] @ x_D) * (w3[e] @ x_D)) @ w2[e].T


def moe(x_TD: torch.Tensor, experts_TK: torch.Tensor, gates_TK: torch.Tensor, mask_TK: torch.Tensor,
        w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, first: int) -> torch.Tensor:
    """sum over used local slots of gate * expert(x) (float64 weights `[E, out, in]`)."""
    x = x_TD.to(torch.float64)
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(experts_TK.shape[1]):
            e = int(experts_TK[t, k]) - first
            if bool(mask_TK[t, k]) and 0 <= e < w1.shape[0]:
                out[t] += float(gates_TK[t, k]) * expert(x[t], w1, w3, w2, e)
    return out


def segments(x_SD: torch.Tensor, counts: list[int], w1: torch.Tensor, w3: torch.Tensor,
             w2: torch.Tensor) -> torch.Tensor:
    x = x_SD.to(torch.float64)
    rows, start = [], 0
    for e, n in enumerate(counts):
        rows += [expert(x[start + i], w1, w3, w2, e) for i in range(n)]
        start += n
    return torch.stack(rows) if rows else torch.zeros(0, w2.shape[1], dtype=torch.float64)
