"""What `lcc.ops` calls on CUDA serve plans: the experts of a MoE layer through the Triton kernels.

`swiglu_segments` takes rows already grouped by local expert (after the expert-parallel exchange, as the
programs hold them) with the counts on the device; `fused_moe` takes a rank's tokens and their routing
(experts, gates, which slots are used) and returns the gate-weighted sum over each token's experts on
this rank (other ranks' experts are skipped), the combine done in one small reduction over the slots.
Weights are `ExpertStack`s: one stack `[E, out, in]` in bf16 / float32, or lcc's int4 weights, on the
device, prepared once at load.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from lcc.backends.torch_ref.int4 import Int4Weight
from lcc.backends.triton import ops as _ops  # noqa: F401  (defines torch.ops.lcc.triton_*)
from lcc.backends.triton.align import Alignment, align, align_segments
from lcc.backends.triton.configs import tiles_for
from lcc.backends.triton.support import require

KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass
class ExpertStack:
    """One projection of a layer's local experts, for the Triton kernels: dense `[E, out, in]` or int4."""

    w: torch.Tensor | Int4Weight

    @property
    def int4(self) -> bool:
        return isinstance(self.w, Int4Weight)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.w.shape)

    @property
    def nbytes(self) -> int:
        return self.w.nbytes if self.int4 else self.w.numel() * self.w.element_size()

    def operands(self) -> tuple:
        """(weights, scales, zeros, group size, has zeros, strides: expert and row of the weights, then of
        the scales); dense stacks pass themselves where the kernels expect no scales."""
        if self.int4:
            q = self.w
            zeros = q.zeros if q.zeros is not None else q.scales
            return (q.packed, q.scales, zeros, q.group_size, q.zeros is not None,
                    q.packed.stride(0), q.packed.stride(1), q.scales.stride(0), q.scales.stride(1))
        w = self.w
        return w, w, w, 1, False, w.stride(0), w.stride(1), 0, 0


def swiglu_segments(x_SD: torch.Tensor, counts_E: torch.Tensor, w1: ExpertStack, w3: ExpertStack,
                    w2: ExpertStack, out: torch.Tensor | None = None) -> torch.Tensor:
    """Each local expert's SwiGLU over its contiguous segment of x (segments in expert order)."""
    _check(x_SD, w1, w3, w2)
    R, E = x_SD.shape[0], w1.shape[0]
    if out is None:
        out = torch.empty(R, w2.shape[1], dtype=x_SD.dtype, device=x_SD.device)
    if R == 0:
        return out
    al = align_segments(counts_E, R, tiles_for(R, E, x_SD.shape[1], _group(w1)).block_m)
    return down(gate_up(x_SD, al, 1, w1, w3), al, None, w2, out)


def fused_moe(x_TD: torch.Tensor, experts_TK: torch.Tensor, gates_TK: torch.Tensor, mask_TK: torch.Tensor,
              w1: ExpertStack, w3: ExpertStack, w2: ExpertStack, first_expert: int = 0,
              slots: torch.Tensor | None = None) -> torch.Tensor:
    """sum over k of gate[t, k] * expert_{e[t, k]}(x[t]) for the used slots whose expert is one of this
    rank's (global ids first_expert ... first_expert + E - 1). `slots`: an optional float32 `[T * K, D]`
    buffer for the weighted slot outputs (every used local slot is written; the rest are never read)."""
    T, K = experts_TK.shape
    E = w1.shape[0]
    local = experts_TK.to(torch.int64) - first_expert
    used = mask_TK & (local >= 0) & (local < E)
    expert_R = torch.where(used, local, -1).reshape(-1)
    if slots is None:
        slots = torch.empty(T * K, w2.shape[1], dtype=torch.float32, device=x_TD.device)
    y = _experts(x_TD, expert_R, K, gates_TK.reshape(-1).to(torch.float32).contiguous(), w1, w3, w2, slots)
    return torch.where(used.unsqueeze(-1), y.view(T, K, -1), 0.0).sum(1).to(x_TD.dtype)


def _experts(x: torch.Tensor, expert_R: torch.Tensor, top_k: int, weight_R: torch.Tensor | None,
             w1: ExpertStack, w3: ExpertStack, w2: ExpertStack, out: torch.Tensor | None) -> torch.Tensor:
    _check(x, w1, w3, w2)
    R = expert_R.numel()
    E, D = w1.shape[0], w2.shape[1]
    if out is None:
        out = torch.empty(R, D, dtype=x.dtype, device=x.device)
    if R == 0:
        return out
    al = align(expert_R, E, tiles_for(R, E, x.shape[1], _group(w1)).block_m)
    return down(gate_up(x, al, top_k, w1, w3), al, weight_R, w2, out)


def gate_up(x: torch.Tensor, al: Alignment, top_k: int, w1: ExpertStack, w3: ExpertStack,
            h: torch.Tensor | None = None) -> torch.Tensor:
    """The first grouped GEMM (`torch.ops.lcc.triton_gate_up`): `h [blocks * block_m, F]` in x's dtype, row
    p = silu(x[t] @ w1[e].T) * (x[t] @ w3[e].T) for aligned row p (token t = row // top_k); rows of skipped
    blocks are not written."""
    require()
    x = x.contiguous()
    if h is None:
        h = torch.empty(al.rows.numel(), w1.shape[1], dtype=x.dtype, device=x.device)
    a1, a3 = w1.operands(), w3.operands()
    torch.ops.lcc.triton_gate_up(x, al.rows, al.block_expert, al.n_rows, al.block_m, top_k, *a1[:3], *a3[:3],
                                 a1[3], w1.int4, a1[4], h)
    return h


def down(h: torch.Tensor, al: Alignment, weight_R: torch.Tensor | None, w2: ExpertStack,
         out: torch.Tensor) -> torch.Tensor:
    """The second grouped GEMM (`torch.ops.lcc.triton_down`): out[row] = h[p] @ w2[e].T, times
    `weight_R[row]` when given, for each routed row of a local expert (`out [rows, D]`; other rows are not
    written)."""
    require()
    a2 = w2.operands()
    torch.ops.lcc.triton_down(h, al.rows, al.block_expert, al.n_rows, al.block_m, weight_R, *a2[:3], a2[3], w2.int4,
                              a2[4], out)
    return out


def _group(w: ExpertStack) -> int | None:
    return w.w.group_size if w.int4 else None


def _check(x: torch.Tensor, w1: ExpertStack, w3: ExpertStack, w2: ExpertStack) -> None:
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"the Triton MoE kernels take activations in {KERNEL_DTYPES}, not {x.dtype}")
    if w1.int4 != w2.int4 or w1.int4 != w3.int4:
        raise TypeError("w1, w3 and w2 must all be int4 or all dense")
    if w1.operands()[5:] != w3.operands()[5:]:
        raise ValueError("w1 and w3 must have the same layout (shape and strides)")
    if not w1.int4 and not (w1.w.dtype == w3.w.dtype == w2.w.dtype == x.dtype):
        raise TypeError(f"dense expert weights must be in the activations' dtype {x.dtype}")
    if w1.int4 and w1.w.group_size & (w1.w.group_size - 1) or w1.int4 and w1.w.group_size < 16:
        raise ValueError(f"int4 group size {w1.w.group_size}: the Triton kernels take powers of two from 16")
