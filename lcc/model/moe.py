"""The MoE block as explicit parts: router -> dispatch -> experts -> combine (+ shared experts).

Dispatch permutes the used (token, slot) pairs into contiguous per-expert segments; the experts run a
SwiGLU per segment on stacked weights (`w1_EFD`, `w3_EFD`, `w2_EDF`); combine scatters the weighted
outputs back. `ExpertFFN` is the seam where the compiler swaps in fused kernels or int4 weights.

Per-expert counts stay on the device: grouped matmul takes them as a tensor. The host needs a count where
a shape depends on it (the number of used slots, in `dispatch`) and where a Python loop runs over the
experts (`swiglu_loop`: float64 and other dtypes grouped matmul does not take).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lcc.model.grouped import contiguous_grad, group_ends, grouped_mm_ok
from lcc.model.routing import Router, RouteResult, route_counts
from lcc.spec.models import MoE, Routing


@dataclass
class Dispatch:
    """Where each routed slot went: segment order sorted by expert (stable: token order inside)."""

    token_S: torch.Tensor  # source token of each slot, in segment order
    gate_S: torch.Tensor  # gate of each slot, in segment order
    counts_E: torch.Tensor  # slots per expert (int64, on the device)


def dispatch(route: RouteResult, n_experts: int, n_slots: int | None = None) -> Dispatch:
    """`n_slots`: the number of used slots, when the caller already has it on the host (`ops.moe_plan`);
    otherwise it is read here, the reference block's one host synchronisation (it sizes the segments)."""
    if route.slots_S is not None:  # sorted by the router as below
        return Dispatch(*route.slots_S, route_counts(route, n_experts))
    K = route.experts_TK.shape[1]
    # unused slots sort after every expert; the sort is stable, so tokens keep their order in a segment
    key_S = torch.where(route.mask_TK, route.experts_TK, n_experts).reshape(-1)
    if n_slots is None:
        n_slots = int(route.mask_TK.sum())  # host sync: the segments' total length is a shape
    order = torch.argsort(key_S, stable=True)[:n_slots]
    gate_S = route.gates_TK.reshape(-1).index_select(0, order)
    return Dispatch(order // K, gate_S, route_counts(route, n_experts))


def combine(y_SD: torch.Tensor, plan: Dispatch, n_tokens: int) -> torch.Tensor:
    weighted = y_SD * plan.gate_S.unsqueeze(-1).to(y_SD.dtype)
    out = torch.zeros(n_tokens, y_SD.shape[-1], dtype=y_SD.dtype, device=y_SD.device)
    return out.index_add(0, plan.token_S, weighted)


def swiglu_segments(x_SD: torch.Tensor, counts: torch.Tensor | list[int], w1_EFD: torch.Tensor,
                    w3_EFD: torch.Tensor, w2_EDF: torch.Tensor) -> torch.Tensor:
    """SwiGLU of each expert over its contiguous segment of x (segments in expert order). Counts on the
    device cost no host sync where grouped matmul runs; the loop reads them on the host. Under autocast the
    experts compute in autocast's dtype, as its matmuls do (grouped matmul is not on autocast's list)."""
    x_SD, w1_EFD, w3_EFD, w2_EDF = autocast_inputs(x_SD, w1_EFD, w3_EFD, w2_EDF)
    if grouped_mm_ok(x_SD, w1_EFD, w2_EDF):
        return swiglu_grouped(x_SD, counts, w1_EFD, w3_EFD, w2_EDF)
    host = counts.tolist() if isinstance(counts, torch.Tensor) else counts  # host sync (loop path only)
    return swiglu_loop(x_SD, host, w1_EFD, w3_EFD, w2_EDF)


def autocast_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors in autocast's dtype where autocast is on for their device and they are floating point
    below float64 (as autocast casts a matmul's inputs); otherwise as they are."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t.dtype in (torch.float32, torch.bfloat16, torch.float16) else t for t in tensors)


def swiglu_grouped(x_SD: torch.Tensor, counts: torch.Tensor | list[int], w1_EFD: torch.Tensor,
                   w3_EFD: torch.Tensor, w2_EDF: torch.Tensor) -> torch.Tensor:
    """Three grouped matmuls over all experts at once; segment ends are the cumulative counts."""
    offs = group_ends(counts, x_SD.device)
    x_SD = x_SD.contiguous()
    a = contiguous_grad(F.grouped_mm(x_SD, w1_EFD.transpose(1, 2), offs=offs))
    b = contiguous_grad(F.grouped_mm(x_SD, w3_EFD.transpose(1, 2), offs=offs))
    return contiguous_grad(F.grouped_mm(F.silu(a) * b, w2_EDF.transpose(1, 2), offs=offs))


def swiglu_loop(x_SD: torch.Tensor, counts: list[int], w1_EFD: torch.Tensor, w3_EFD: torch.Tensor,
                w2_EDF: torch.Tensor) -> torch.Tensor:
    """One matmul per expert that has tokens (any dtype). The stacks are unbound once: indexing `w[e]`
    per expert would make autograd allocate a full-size zero gradient for every expert used."""
    outs = []
    start = 0
    w1s, w3s, w2s = w1_EFD.unbind(0), w3_EFD.unbind(0), w2_EDF.unbind(0)
    for e, n in enumerate(counts):
        if n == 0:
            continue
        xs = x_SD[start:start + n]
        h = F.silu(xs @ w1s[e].T) * (xs @ w3s[e].T)
        outs.append(h @ w2s[e].T)
        start += n
    if not outs:  # no tokens: still an output connected to x, so that backward visits the same ops on
        # every rank (an expert-parallel all-to-all upstream must run its backward everywhere)
        h = F.silu(x_SD @ w1s[0].T) * (x_SD @ w3s[0].T)
        return h @ w2s[0].T
    return torch.cat(outs)


class ExpertFFN(nn.Module):
    """E stacked SwiGLU experts: w1, w3: D -> F; w2: F -> D."""

    def __init__(self, n_experts: int, d_model: int, d_ff: int, device=None, dtype=None):
        super().__init__()
        self.w1_EFD = nn.Parameter(torch.empty(n_experts, d_ff, d_model, device=device, dtype=dtype))
        self.w3_EFD = nn.Parameter(torch.empty(n_experts, d_ff, d_model, device=device, dtype=dtype))
        self.w2_EDF = nn.Parameter(torch.empty(n_experts, d_model, d_ff, device=device, dtype=dtype))

    def forward(self, x_SD: torch.Tensor, counts: torch.Tensor | list[int]) -> torch.Tensor:
        return swiglu_segments(x_SD, counts, self.w1_EFD, self.w3_EFD, self.w2_EDF)


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, d_ff: int, device=None, dtype=None):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=False, device=device, dtype=dtype)
        self.w3 = nn.Linear(d_model, d_ff, bias=False, device=device, dtype=dtype)
        self.w2 = nn.Linear(d_ff, d_model, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


@dataclass
class MoEStats:
    load_E: torch.Tensor
    k_T: torch.Tensor
    dropped: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor


class Dispatcher(nn.Module):
    """Routed (token, slot) pairs -> contiguous per-expert segments (a module, so it is one call site)."""

    def __init__(self, n_experts: int):
        super().__init__()
        self.n_experts = n_experts

    def forward(self, route: RouteResult) -> Dispatch:
        return dispatch(route, self.n_experts)


class Combiner(nn.Module):
    """Weighted scatter of expert outputs back to their tokens."""

    def forward(self, y_SD: torch.Tensor, plan: Dispatch, x_TD: torch.Tensor) -> torch.Tensor:
        return combine(y_SD, plan, x_TD.shape[0])


class MoEBlock(nn.Module):
    def __init__(self, d_model: int, moe: MoE, routing: Routing, device=None, dtype=None):
        super().__init__()
        self.n_experts = moe.n_experts
        self.router = Router(d_model, moe, routing, device=device, dtype=dtype)
        self.dispatch = Dispatcher(moe.n_experts)
        self.combine = Combiner()
        self.experts = ExpertFFN(moe.n_experts, d_model, moe.expert_d_ff, device=device, dtype=dtype)
        self.shared = (SwiGLU(d_model, moe.n_shared_experts * moe.expert_d_ff, device=device, dtype=dtype)
                       if moe.n_shared_experts else None)
        self.last_stats: MoEStats | None = None

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        shape = x_BSD.shape
        x_TD = x_BSD.reshape(-1, shape[-1])
        route = self.router(x_TD)
        plan = self.dispatch(route)
        y_SD = self.experts(x_TD.index_select(0, plan.token_S), plan.counts_E)
        out_TD = self.combine(y_SD, plan, x_TD)
        if self.shared is not None:
            out_TD = out_TD + self.shared(x_TD)
        self.last_stats = MoEStats(route.load_E, route.k_T, route.dropped, route.aux_loss, route.z_loss)
        return out_TD.view(shape)
