"""Group-wise int4 expert weights: two values per byte, a float16 scale per `group_size` inputs, and a
uint8 zero-point per group when asymmetric.

Layout of a weight `w[..., out, in]`: `packed[..., out, in / 2]` (uint8; element 2j in the low nibble,
2j+1 in the high one), `scales[..., out, in / group_size]` (float16), `zeros` likewise (uint8) or None.
Symmetric codes are q + 8 for q in [-8, 7]; asymmetric codes are in [0, 15] around the zero-point.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Int4Weight:
    packed: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    group_size: int
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        extra = 0 if self.zeros is None else self.zeros.numel()
        return self.packed.numel() + 2 * self.scales.numel() + extra


def quantize(w: torch.Tensor, group_size: int, symmetric: bool = True) -> Int4Weight:
    *lead, n_in = w.shape
    if n_in % group_size or group_size % 2:
        raise ValueError(f"group_size {group_size} must be even and divide the input dim {n_in}")
    g = w.detach().to(torch.float32).reshape(*lead, n_in // group_size, group_size)
    if symmetric:
        scale = _fp16_at_least(g.abs().amax(-1, keepdim=True) / 7)
        codes = (torch.round(g / scale).clamp(-8, 7) + 8).to(torch.uint8)
        zeros = None
    else:
        lo, hi = g.amin(-1, keepdim=True).clamp(max=0), g.amax(-1, keepdim=True).clamp(min=0)
        scale = _fp16_at_least((hi - lo) / 15)
        zero = torch.round(-lo / scale).clamp(0, 15)
        codes = (torch.round(g / scale) + zero).clamp(0, 15).to(torch.uint8)
        zeros = zero.squeeze(-1).to(torch.uint8)
    codes = codes.reshape(*lead, n_in)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return Int4Weight(packed, scale.squeeze(-1).to(torch.float16), zeros, group_size, tuple(w.shape))


def _fp16_at_least(scale: torch.Tensor) -> torch.Tensor:
    """The float16 value at or just above each scale (rounding down would push the range's end one
    code past the last one, and the clamp would then exceed half a step), as float32."""
    tiny = torch.finfo(torch.float16).tiny
    s16 = scale.clamp(min=tiny).to(torch.float16)
    low = s16.to(torch.float32) < scale
    s16 = torch.where(low, torch.nextafter(s16, torch.full_like(s16, float("inf"))), s16)
    return s16.to(torch.float32)


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    low, high = packed & 0x0F, packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)


def dequantize(q: Int4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    codes = unpack_codes(q.packed).to(torch.float32)
    *lead, n_in = codes.shape
    codes = codes.reshape(*lead, n_in // q.group_size, q.group_size)
    offset = 8.0 if q.zeros is None else q.zeros.to(torch.float32).unsqueeze(-1)
    w = (codes - offset) * q.scales.to(torch.float32).unsqueeze(-1)
    return w.reshape(q.shape).to(dtype)


def int4_swiglu_segments(x_SD: torch.Tensor, counts: torch.Tensor | list[int], w1: Int4Weight, w3: Int4Weight,
                         w2: Int4Weight) -> torch.Tensor:
    """Grouped SwiGLU from packed weights: each expert's weights are unpacked only when it has tokens
    (a loop on the host: counts given as a tensor are read there)."""
    if isinstance(counts, torch.Tensor):
        counts = counts.tolist()
    outs, start = [], 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        xs = x_SD[start:start + n]
        a, b, c = (dequantize(_expert(w, e), x_SD.dtype) for w in (w1, w3, w2))
        outs.append((F.silu(xs @ a.T) * (xs @ b.T)) @ c.T)
        start += n
    return torch.cat(outs) if outs else x_SD.new_zeros(0, w2.shape[1])


def _expert(w: Int4Weight, e: int) -> Int4Weight:
    return Int4Weight(w.packed[e], w.scales[e], None if w.zeros is None else w.zeros[e], w.group_size,
                      w.shape[1:])
