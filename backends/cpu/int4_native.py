"""Int4 experts on CPU through lcc's native kernel (lcc.backends.cpu.native, csrc/int4_experts.cpp).

One kernel call runs a layer's experts: every expert's segment through gate and up together (one packed
stack), the SwiGLU activation, then the down projection. lcc's int4 weights
(lcc.backends.torch_ref.int4) convert once, at load, into the kernel's layout: codes in column tiles of 16
outputs, and per (group, output) a float32 scale and, for asymmetric weights, a shift
`(8 - zero point) x scale`, so the kernel's `(code - 8) x scale + shift` is lcc's reference value
`(code - zero point) x scale`. Nothing is dequantised per call beyond the tile in registers.

Activations in float32 run the AVX-512 path: float32 throughout (per scale group the products of x and
the codes sum, then the scale applies).
bfloat16 activations run segments of at least AMX_MIN_ROWS rows on AMX tiles (weights and activations
rounded to bfloat16, float32 accumulation) where the CPU has AMX, shorter segments on the AVX-512 path.
Between the projections everything stays float32 (the gate, the up projection and the activation); the
output is rounded to the activations' dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from lcc.backends.cpu.native import load, require
from lcc.backends.torch_ref.int4 import Int4Weight, unpack_codes

AMX_MIN_ROWS = 16  # below, dequantising into tiles costs more than AVX-512's register blocks


@dataclass
class NativeInt4:
    """A stack of expert weights `[E, out, in]` in the native kernel's layout. `gate_up`: the stack holds an
    expert's gate (w1) and up (w3) projections one after the other along `out`."""

    codes: torch.Tensor  # uint8 [E, out / 16, in / 2, 16]
    scales: torch.Tensor  # float32 [E, out / 16, in / group, 16]
    shifts: torch.Tensor | None  # float32, likewise: (8 - zero point) x scale; None when symmetric
    group_size: int
    shape: tuple[int, ...]
    gate_up: bool = False

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.shifts) if t is not None)


def pack(q: Int4Weight) -> NativeInt4:
    E, N, K = q.shape
    g = q.group_size
    if N % 16:
        raise ValueError(f"output width {N}: the native int4 kernel needs a multiple of 16")
    require()
    codes = unpack_codes(q.packed).view(E, N // 16, 16, K // 2, 2)
    tiles = (codes[..., 0] | (codes[..., 1] << 4)).permute(0, 1, 3, 2).contiguous()

    def by_tile(t: torch.Tensor) -> torch.Tensor:  # [E, N, K / g] -> [E, N / 16, K / g, 16]
        return t.to(torch.float32).view(E, N // 16, 16, K // g).permute(0, 1, 3, 2).contiguous()

    scales = by_tile(q.scales)
    shifts = None if q.zeros is None else ((8.0 - by_tile(q.zeros)) * scales).contiguous()
    return NativeInt4(tiles, scales, shifts, g, (E, N, K))


def pack_gate_up(w1: Int4Weight, w3: Int4Weight) -> NativeInt4:
    """w1 and w3 `[E, F, D]` as one stack `[E, 2F, D]`."""
    both = Int4Weight(torch.cat([w1.packed, w3.packed], 1), torch.cat([w1.scales, w3.scales], 1),
                      None if w1.zeros is None else torch.cat([w1.zeros, w3.zeros], 1), w1.group_size,
                      (w1.shape[0], 2 * w1.shape[1], w1.shape[2]))
    out = pack(both)
    out.gate_up = True
    return out


def matmul_segments(x_SK: torch.Tensor, counts: list[int], w: NativeInt4, amx_min_rows: int = 0) -> torch.Tensor:
    """`x[segment e] @ w[e].T` for every expert's segment, float32 in and out; segments of at least
    `amx_min_rows` rows (0: none) on AMX where this machine has it."""
    lib = load()
    return lib.ops.int4_matmul(x_SK.to(torch.float32), counts, w.codes, w.scales, w.shifts, w.group_size,
                               amx_min_rows if lib.amx else 0)


def swiglu_segments(x_SD: torch.Tensor, counts: list[int], w1: NativeInt4, w3: NativeInt4,
                    w2: NativeInt4) -> torch.Tensor:
    """Each expert's SwiGLU over its contiguous segment of x (segments in expert order), in one kernel call:
    gate and up, the activation, the down projection. w1 holds both projections (`pack_gate_up`); w3 is
    the same stack."""
    if not w1.gate_up or w3 is not w1:
        raise ValueError("the native kernel takes the gate and up projections as one stack (pack_gate_up)")
    lib = load()
    bf16 = x_SD.dtype == torch.bfloat16
    return lib.ops.int4_swiglu(x_SD, counts, w1.codes, w1.scales, w1.shifts, w2.codes, w2.scales, w2.shifts,
                               w1.group_size, AMX_MIN_ROWS if bf16 and lib.amx else 0)
