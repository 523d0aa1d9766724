"""The Triton kernels as PyTorch operators (`torch.library.triton_op`): `torch.ops.lcc.triton_gate_up`,
`triton_down` and `triton_align_segments`. Each launches its kernel through `torch.library.wrap_triton`, so
torch.compile and torch.fx trace through the operator to the kernel itself (Inductor schedules it with the
code around it) instead of stopping at an opaque Python call. The operators take plain tensors and
numbers; `lcc.backends.triton.experts` maps expert stacks onto them and checks them first. Defining them
needs no Triton: the kernels' module is imported by an operator's first call.
"""

from __future__ import annotations

import torch
from lcc.backends.triton.configs import tiles_for
from lcc.backends.triton.support import interpreting
from torch.library import triton_op, wrap_triton


def _strides(w: torch.Tensor, s: torch.Tensor, int4: bool) -> tuple[int, int, int, int]:
    """The weights' expert and row strides, then the scales' (none for dense weights)."""
    return (w.stride(0), w.stride(1), *((s.stride(0), s.stride(1)) if int4 else (0, 0)))


@triton_op("lcc::triton_gate_up", mutates_args={"h"})
def gate_up(x: torch.Tensor, rows: torch.Tensor, block_expert: torch.Tensor, n_rows: int, block_m: int, top_k: int,
            w1: torch.Tensor, s1: torch.Tensor, z1: torch.Tensor, w3: torch.Tensor, s3: torch.Tensor,
            z3: torch.Tensor, group: int, int4: bool, has_zeros: bool, h: torch.Tensor) -> None:
    """h `[blocks * block_m, F]`: row p = silu(x[t] @ w1[e].T) * (x[t] @ w3[e].T) for aligned row p (token
    t = row // top_k). int4 weights: packed codes with scales `s` and zero points `z` in groups of `group`;
    dense weights pass themselves as `s` and `z`."""
    import triton
    from lcc.backends.triton.kernels import gate_up_swiglu_kernel

    E, F, D = w1.shape[0], h.shape[1], x.shape[1]
    tiles = tiles_for(n_rows, E, D, group if int4 else None, x.element_size(), 0.5 if int4 else w1.element_size(),
                      weight_tiles=2)
    grid = (block_expert.numel(), triton.cdiv(F, tiles.block_n))
    wrap_triton(gate_up_swiglu_kernel)[grid](
        x, rows, block_expert, h, w1, s1, z1, w3, s3, z3, n_rows, F, D, top_k, x.stride(0), h.stride(0),
        *_strides(w1, s1, int4), INT4=int4, HAS_ZEROS=has_zeros, GROUP=group, IEEE=x.dtype == torch.float32,
        UPCAST=interpreting(), BLOCK_M=block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages)


@triton_op("lcc::triton_down", mutates_args={"out"})
def down(h: torch.Tensor, rows: torch.Tensor, block_expert: torch.Tensor, n_rows: int, block_m: int,
         weight: torch.Tensor | None, w2: torch.Tensor, s2: torch.Tensor, z2: torch.Tensor, group: int, int4: bool,
         has_zeros: bool, out: torch.Tensor) -> None:
    """out[row] = h[p] @ w2[e].T, times `weight[row]` when given, for each routed row of a local expert."""
    import triton
    from lcc.backends.triton.kernels import down_kernel

    E, D, F = w2.shape[0], out.shape[1], h.shape[1]
    tiles = tiles_for(n_rows, E, F, group if int4 else None, h.element_size(), 0.5 if int4 else w2.element_size())
    grid = (block_expert.numel(), triton.cdiv(D, tiles.block_n))
    wrap_triton(down_kernel)[grid](
        h, rows, block_expert, out, weight if weight is not None else h, w2, s2, z2, n_rows, D, F, h.stride(0),
        out.stride(0), *_strides(w2, s2, int4), INT4=int4, HAS_ZEROS=has_zeros, GROUP=group,
        IEEE=h.dtype == torch.float32, UPCAST=interpreting(), HAS_WEIGHT=weight is not None, BLOCK_M=block_m,
        BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, num_warps=tiles.num_warps, num_stages=tiles.num_stages)


@triton_op("lcc::triton_align_segments", mutates_args={"rows", "block_expert"})
def align_segments(counts: torch.Tensor, n_rows: int, block_m: int, rows: torch.Tensor,
                   block_expert: torch.Tensor) -> None:
    """`rows` `[blocks * block_m]` and `block_expert` `[blocks]` for rows already grouped by expert."""
    import triton
    from lcc.backends.triton.kernels import align_segments_kernel

    E = counts.numel()
    wrap_triton(align_segments_kernel)[(1,)](counts, rows, block_expert, E, n_rows, block_expert.numel(),
                                             BLOCK_M=block_m, EXPERTS=max(16, triton.next_power_of_2(E)), CHUNK=32)
