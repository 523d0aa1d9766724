"""Int4 expert matmuls on CPU through PyTorch's packed int4 kernel (`aten._weight_int4pack_mm_for_cpu`).

The kernel takes activations in float32, bfloat16 or float16, group sizes 32 to 256 and output widths
divisible by 16 (serve plans refuse others before launch), and computes `x @ w.T` with
`w = (code - 8) * scale + zero` per (input group, output). lcc's int4 weights (lcc.backends.torch_ref.int4)
convert once, at load: codes into the kernel's own packing, and per group `zero = (8 - zero_point) * scale`
(0 when symmetric), scales in the activations' dtype (bfloat16 rounds lcc's float16 scales: a relative
error of at most 2^-9 per group). Nothing is dequantised per call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from lcc.backends.torch_ref.int4 import Int4Weight, unpack_codes

GROUP_SIZES = (32, 64, 128, 256)


@dataclass
class PackedInt4:
    """One stack of expert weights `[E, out, in]` in the kernel's format, per expert. `gate_up`: the stack
    holds an expert's gate (w1) and up (w3) projections one after the other along `out`, which one kernel
    call then computes together."""

    packed: list[torch.Tensor]  # uint8 [out, in / 2], the kernel's packing
    scales_zeros: list[torch.Tensor]  # [in / group_size, out, 2] in the activations' dtype
    group_size: int
    shape: tuple[int, ...]
    gate_up: bool = False

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.packed, *self.scales_zeros))


def pack(q: Int4Weight, dtype: torch.dtype) -> PackedInt4:
    if q.group_size not in GROUP_SIZES:
        raise ValueError(f"group size {q.group_size}: the CPU int4 kernel takes {GROUP_SIZES}")
    packed, sz = [], []
    for e in range(q.shape[0]):
        codes = unpack_codes(q.packed[e]).to(torch.int32)
        packed.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))
        scales = q.scales[e].to(torch.float32)
        zero = torch.zeros_like(scales) if q.zeros is None else (8.0 - q.zeros[e].to(torch.float32)) * scales
        sz.append(torch.stack([scales.t(), zero.t()], -1).to(dtype).contiguous())
    return PackedInt4(packed, sz, q.group_size, tuple(q.shape))


def pack_gate_up(w1: Int4Weight, w3: Int4Weight, dtype: torch.dtype) -> PackedInt4:
    """w1 and w3 `[E, F, D]` as one packed stack `[E, 2F, D]`."""
    both = Int4Weight(torch.cat([w1.packed, w3.packed], 1), torch.cat([w1.scales, w3.scales], 1),
                      None if w1.zeros is None else torch.cat([w1.zeros, w3.zeros], 1), w1.group_size,
                      (w1.shape[0], 2 * w1.shape[1], w1.shape[2]))
    out = pack(both, dtype)
    out.gate_up = True
    return out


_MM = torch.ops.aten._weight_int4pack_mm_for_cpu.default  # resolved once: a decode step calls it hundreds of times


def matmul(x: torch.Tensor, w: PackedInt4, e: int) -> torch.Tensor:
    """`x @ w[e].T` for x `[rows, in]`."""
    return _MM(x.contiguous(), w.packed[e], w.group_size, w.scales_zeros[e])


def swiglu_segments(x_SD: torch.Tensor, counts: list[int], w1: PackedInt4, w3: PackedInt4,
                    w2: PackedInt4) -> torch.Tensor:
    """Each expert's SwiGLU over its contiguous segment of x (segments in expert order). With `w1.gate_up`
    (`pack_gate_up`), w1 holds both projections and w3 is not read. The kernel runs per expert; the
    activation between the two projections runs once over every segment (elementwise, so the same values
    as per segment, in a handful of calls instead of a few per expert)."""
    segments, start = [], 0
    for e, n in enumerate(counts):
        if n:
            segments.append((e, start, n))
            start += n
    if not segments:
        return x_SD.new_zeros(0, w2.shape[1])
    x_SD = x_SD.contiguous()
    if w1.gate_up:
        gate, up = torch.cat([matmul(x_SD[s:s + n], w1, e) for e, s, n in segments]).chunk(2, dim=-1)
    else:
        gate = torch.cat([matmul(x_SD[s:s + n], w1, e) for e, s, n in segments])
        up = torch.cat([matmul(x_SD[s:s + n], w3, e) for e, s, n in segments])
    h = F.silu(gate) * up
    return torch.cat([matmul(h[s:s + n], w2, e) for e, s, n in segments])
