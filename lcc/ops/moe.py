"""MoE ops of generated programs: routing, the expert-parallel exchange plan, experts, combine."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from lcc.backends.cpu import dense as native_dense
from lcc.backends.cpu import int4 as int4_cpu
from lcc.backends.cpu import int4_native
from lcc.backends.cpu.dense import NativeDenseExperts
from lcc.backends.cpu.int4 import PackedInt4
from lcc.backends.cpu.int4_native import NativeInt4
from lcc.backends.cpu.native import load as native_rows
from lcc.backends.torch_ref.int4 import Int4Weight, int4_swiglu_segments
from lcc.backends.triton import experts as triton_experts
from lcc.backends.triton.experts import ExpertStack
from lcc.model import routing
from lcc.model.moe import Dispatch, combine, dispatch, swiglu_segments
from lcc.model.routing import RouteResult
from lcc.ops import timing
from lcc.ops.collectives import exchange_counts
from lcc.ops.groups import Group, all_reduce_copy, group_size

NATIVE_COMBINE = (torch.float32, torch.bfloat16)  # what lcc's native combine takes

__all__ = ["MoEPlan", "combine_tokens", "grouped_swiglu", "grouped_swiglu_int4", "moe_plan", "route", "unit_balance"]


@dataclass
class MoEPlan:
    """Where this rank's routed slots go and where the slots its experts receive come from."""

    local: Dispatch  # this rank's slots sorted by global expert id
    send: list[int]  # rows to each EP rank
    recv: list[int]  # rows from each EP rank
    order: torch.Tensor  # received rows (source-major) -> local-expert-major
    inverse: torch.Tensor  # and back
    local_counts: list[int]  # rows per local expert
    local_counts_E: torch.Tensor  # the same on the device: what grouped matmul takes without a host sync
    native: bool = False  # lcc's native CPU router sorted the slots: its kernel combines them

    @property
    def token_S(self) -> torch.Tensor:
        return self.local.token_S


def route(x_TD: torch.Tensor, centroids_GD: torch.Tensor, weight_ED: torch.Tensor, bias_E: torch.Tensor,
          cfg: routing.Routing) -> RouteResult:
    """Hierarchical routing of this rank's tokens."""
    return routing.route(x_TD, centroids_GD, weight_ED, bias_E, cfg)


def unit_balance(route: RouteResult, group: Group) -> RouteResult:
    """When a unit's tokens are split over `group` (tp): the Switch loss from the unit's expert counts
    (an all-reduce of counts, no gradient), so the ranks' losses add up to the unit's."""
    if group_size(group) == 1 or route.pi_sum_E is None:
        return route
    counts = all_reduce_copy(route.balance_counts, group)
    aux = routing.balance_loss_from(counts, route.pi_sum_E, route.pi_sum_E.shape[0])
    return dataclasses.replace(route, balance_counts=counts, aux_loss=aux)


def moe_plan(routed: RouteResult | Dispatch, n_experts: int, group: Group) -> MoEPlan:
    """Sort the slots by expert and exchange per-expert counts with the EP group (a small all-to-all).
    Everything stays on the device except one small tensor read once on the host (see below). `routed`
    is a routing result, or (the hierarchical exchange's second level) the slots a node plan forwards,
    already sorted by the node's experts."""
    ep = group_size(group)
    counts = routed.counts_E if isinstance(routed, Dispatch) else routing.route_counts(routed, n_experts)
    native = isinstance(routed, RouteResult) and routed.slots_S is not None
    if ep == 1:  # nothing to exchange: the rows stay in expert order, and the counts are read once
        local_counts = counts.tolist()
        rows = sum(local_counts)
        identity = torch.arange(rows, device=counts.device)
        local = routed if isinstance(routed, Dispatch) else dispatch(routed, n_experts, n_slots=rows)
        return MoEPlan(local, [rows], [rows], identity, identity, local_counts, counts, native)
    send, recv, local_counts, order, inverse, received = exchange_plan(counts.view(ep, n_experts // ep), group)
    local = routed if isinstance(routed, Dispatch) else dispatch(routed, n_experts, n_slots=sum(send))
    return MoEPlan(local, send, recv, order, inverse, local_counts, received.sum(0), native)


def exchange_plan(counts: torch.Tensor, group: Group) -> tuple[list[int], list[int], list[int], torch.Tensor,
                                                                 torch.Tensor, torch.Tensor]:
    """`counts` [members, k]: rows this rank sends to each member's k buckets (experts). Exchanges them
    (a small all-to-all) and returns (rows to each member, rows from each member, rows per local bucket;
    order: received rows, source-major, -> bucket-major; its inverse; the received counts [members, k])."""
    received = exchange_counts(counts, group)  # row s: what source s sends to my buckets
    # The one host synchronisation: the all-to-all's split sizes (rows to and from each member) are host
    # ints, and so are the shapes that follow from them; one read brings all of it.
    return plan_from(counts, received, torch.cat([counts.sum(1), received.sum(1), received.sum(0)]).tolist())


def plan_from(counts: torch.Tensor, received: torch.Tensor, host: list[int]) -> tuple[
        list[int], list[int], list[int], torch.Tensor, torch.Tensor, torch.Tensor]:
    """exchange_plan's result from the exchanged counts and their sums read on the host (rows sent to each
    member, rows received from each, rows per local bucket)."""
    n = counts.shape[0]
    send, recv, local_counts = host[:n], host[n:2 * n], host[2 * n:]
    device, rows = received.device, sum(recv)
    # received rows are source-major (source s, then its buckets); order lists them bucket-major
    starts = (torch.cumsum(received.view(-1), 0) - received.view(-1)).view(received.shape)
    sizes, firsts = received.t().reshape(-1), starts.t().reshape(-1)  # blocks (e, s) in bucket-major order
    block = torch.repeat_interleave(torch.arange(sizes.numel(), device=device), sizes, output_size=rows)
    block_start = torch.cumsum(sizes, 0) - sizes
    order = firsts[block] + torch.arange(rows, device=device) - block_start[block]
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(rows, device=device)
    return send, recv, local_counts, order, inverse, received


def grouped_swiglu(x_SD: torch.Tensor, counts: torch.Tensor | list[int], w1_EFD: torch.Tensor | ExpertStack,
                   w3_EFD: torch.Tensor | ExpertStack, w2_EDF: torch.Tensor | ExpertStack) -> torch.Tensor:
    """The experts over their segments; pass `plan.local_counts_E` (device) so that grouped matmul needs no
    host sync: a list is copied to the device, which on a GPU waits for the stream. Weights prepared for
    the Triton kernels (`ExpertStack`, CUDA serve plans) run there."""
    if timing.SPANS is None:
        return _grouped_swiglu(x_SD, counts, w1_EFD, w3_EFD, w2_EDF)
    start = timing.now()  # lcc run train --trace: the experts' compute as a span
    try:
        return _grouped_swiglu(x_SD, counts, w1_EFD, w3_EFD, w2_EDF)
    finally:
        timing.record("compute", "experts", start, timing.now())


def _grouped_swiglu(x_SD: torch.Tensor, counts: torch.Tensor | list[int], w1_EFD: torch.Tensor | ExpertStack,
                    w3_EFD: torch.Tensor | ExpertStack, w2_EDF: torch.Tensor | ExpertStack) -> torch.Tensor:
    if isinstance(w1_EFD, ExpertStack):
        return triton_experts.swiglu_segments(x_SD, _on(counts, x_SD), w1_EFD, w3_EFD, w2_EDF)
    if isinstance(w1_EFD, NativeDenseExperts):  # bfloat16 serving on CPU: lcc's dense kernel for few rows
        host = counts.tolist() if isinstance(counts, torch.Tensor) else counts
        return native_dense.swiglu_segments(x_SD, host, w1_EFD, w3_EFD, w2_EDF)
    return swiglu_segments(x_SD, counts, w1_EFD, w3_EFD, w2_EDF)


Int4Experts = Int4Weight | NativeInt4 | PackedInt4 | ExpertStack


def grouped_swiglu_int4(x_SD: torch.Tensor, counts: torch.Tensor | list[int], w1: Int4Experts, w3: Int4Experts,
                        w2: Int4Experts) -> torch.Tensor:
    """Serve plans: the same experts from int4 weights, through the kernel the weights were prepared for
    (the plan's `serving.expert_kernel`): the Triton W4A16 kernels, lcc's native CPU kernel, PyTorch's
    packed CPU int4 matmul, or lcc's reference op."""
    if isinstance(w1, ExpertStack):
        return triton_experts.swiglu_segments(x_SD, _on(counts, x_SD), w1, w3, w2)
    if isinstance(w1, (NativeInt4, PackedInt4)):
        host = counts.tolist() if isinstance(counts, torch.Tensor) else counts
        cpu = int4_native if isinstance(w1, NativeInt4) else int4_cpu
        return cpu.swiglu_segments(x_SD, host, w1, w3, w2)
    return int4_swiglu_segments(x_SD, counts, w1, w3, w2)


def _on(counts: torch.Tensor | list[int], x: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(counts, device=x.device)


def combine_tokens(y_SD: torch.Tensor, plan: MoEPlan, x_TD: torch.Tensor) -> torch.Tensor:
    """Gate-weighted sum of each token's expert outputs (rows back in this rank's slot order). Slots that
    lcc's native CPU router sorted (the plan's `serving.routing_kernel: native_cpu`) are combined by its
    kernel too, with the same roundings."""
    if plan.local.token_S.device.type == "cpu" and y_SD.dtype in NATIVE_COMBINE and plan.native:
        return native_rows().ops.combine(y_SD, plan.local.token_S, plan.local.gate_S, x_TD.shape[0])
    return combine(y_SD, plan.local, x_TD.shape[0])
