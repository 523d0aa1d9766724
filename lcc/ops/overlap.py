"""The overlapped expert exchange (parallelism.expert_overlap, docs/runtime.md): a micro-batch's tokens in two
halves per MoE layer, each with its own exchange plan, so that one half's all-to-all travels while the other
half's experts compute. Routing runs once over the whole micro-batch (every decision is per token), so the
halves compute exactly what one exchange computes:

    d = ops.moe_plan_halves(routed, n_experts=E, group=G.ep)       # both halves' counts, one exchange
    rows_a = rows.index_select(0, d.slots_a)                        # half A's slots (B's likewise)
    rows_a, sent_a = ops.all_to_all_start(rows_a, d.a.send, d.a.recv, G.ep)   # dispatch A begins
    rows_b, sent_b = ops.all_to_all_start(rows_b, d.b.send, d.b.recv, G.ep)   # dispatch B begins
    rows_a = ops.exchange_wait(rows_a, sent_a)                      # ... experts of A while B travels
    y_a, back_a = ops.all_to_all_start(y_a, d.a.recv, d.a.send, G.ep)         # combine A begins
    rows_b = ops.exchange_wait(rows_b, sent_b)                      # ... experts of B while A travels back
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from lcc.model.moe import Dispatch, dispatch
from lcc.model.routing import RouteResult, route_counts
from lcc.ops.collectives import exchange_counts
from lcc.ops.groups import Group, group_size
from lcc.ops.moe import MoEPlan, moe_plan, plan_from

__all__ = ["HalvesPlan", "cat_rows", "moe_plan_halves"]


@dataclass
class HalvesPlan:
    """Two exchange plans, for the micro-batch's first and second half of tokens."""

    a: MoEPlan
    b: MoEPlan
    local: Dispatch  # both halves' slots in order (half A's, then B's): token ids in the micro-batch, gates
    slots_a: torch.Tensor  # where half A's slots are among both halves' (0, 1, ...)
    slots_b: torch.Tensor  # and half B's
    native: bool = False  # combine_tokens: the slots were sorted here, not by the native router

    @property
    def token_S(self) -> torch.Tensor:
        return self.local.token_S


def moe_plan_halves(routed: RouteResult, n_experts: int, group: Group) -> HalvesPlan:
    """Each half's exchange plan: both halves' counts in one exchange and one host read."""
    T = routed.experts_TK.shape[0]
    cut = (T + 1) // 2
    halves = [_tokens(routed, lo, hi) for lo, hi in ((0, cut), (cut, T))]
    ep = group_size(group)
    if ep == 1:
        a, b = (moe_plan(h, n_experts, group) for h in halves)
    else:
        per = n_experts // ep
        counts = [route_counts(h, n_experts).view(ep, per) for h in halves]
        received = exchange_counts(torch.cat(counts, dim=1), group).split(per, dim=1)
        host = torch.cat([t for c, r in zip(counts, received, strict=True)
                          for t in (c.sum(1), r.sum(1), r.sum(0))]).tolist()
        size = 2 * ep + per
        a, b = (_plan(h, n_experts, c, r, host[i * size:(i + 1) * size])
                for i, (h, c, r) in enumerate(zip(halves, counts, received, strict=True)))
    local = Dispatch(torch.cat([a.local.token_S, b.local.token_S + cut]),
                     torch.cat([a.local.gate_S, b.local.gate_S]), a.local.counts_E + b.local.counts_E)
    n_a, n = a.local.token_S.numel(), local.token_S.numel()
    return HalvesPlan(a, b, local, torch.arange(n_a, device=local.token_S.device),
                      torch.arange(n_a, n, device=local.token_S.device))


def cat_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Half A's rows, then half B's."""
    return torch.cat([a, b])


def _tokens(routed: RouteResult, lo: int, hi: int) -> RouteResult:
    """The routing decisions of tokens [lo, hi) (their slots, gates and counts; the losses stay whole)."""
    return dataclasses.replace(routed, experts_TK=routed.experts_TK[lo:hi], gates_TK=routed.gates_TK[lo:hi],
                               mask_TK=routed.mask_TK[lo:hi], k_T=routed.k_T[lo:hi], counts_E=None, slots_S=None)


def _plan(half: RouteResult, n_experts: int, counts: torch.Tensor, received: torch.Tensor,
          host: list[int]) -> MoEPlan:
    send, recv, local_counts, order, inverse, received = plan_from(counts, received.contiguous(), host)
    return MoEPlan(dispatch(half, n_experts, n_slots=sum(send)), send, recv, order, inverse, local_counts,
                   received.sum(0))
