"""Hierarchical routing (docs/model.md, "Routing, as implemented"), step by step and visible in `forward`.

Shapes: T tokens, D model dim, G groups, Gk kept groups per token, P experts per group, C = Gk * P
candidates per token, K = k.max static slots.

Routing issues no host synchronisation (no `.item()`, `.tolist()`, data-dependent shapes) where grouped
matmul runs; counts stay tensors. The exception is the group-major logits in float64 (verification on a
CPU) or with rows grouped_mm cannot take: a loop over the groups, which needs their sizes on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lcc.model.grouped import contiguous_grad, group_ends, grouped_mm_ok
from lcc.spec.models import MoE, Routing


@dataclass
class RouteResult:
    experts_TK: torch.Tensor  # ranked expert ids; slots beyond k(x) (masked) hold lower-ranked candidates
    gates_TK: torch.Tensor  # gate of each slot (0 where masked or dropped)
    mask_TK: torch.Tensor  # bool: slot is used (k(x) slots, minus capacity drops)
    k_T: torch.Tensor  # experts chosen per token before capacity drops
    load_E: torch.Tensor  # routed slots per expert (after drops), float64 counts
    dropped: torch.Tensor  # slots dropped by capacity (0-d int64 tensor: reading it is a host sync)
    aux_loss: torch.Tensor  # Switch load-balancing loss (unscaled)
    z_loss: torch.Tensor  # router z-loss (unscaled)
    # what the Switch loss is made of, when it is used: routed slots per expert, used slots and tokens
    # (no gradient), and the per-expert sum of pi over the tokens (differentiable)
    balance_counts: torch.Tensor | None = None
    pi_sum_E: torch.Tensor | None = None
    counts_E: torch.Tensor | None = None  # load_E as int64 on the device (dispatch and the exchange plan read it)
    # the used slots sorted by expert (token order inside a segment): each slot's token and gate, where the
    # router made them (lcc's native CPU router); dispatch takes them as they are
    slots_S: tuple[torch.Tensor, torch.Tensor] | None = None


def stable_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k along the last dim; equal scores rank the lower index first."""
    values, index = torch.sort(scores, dim=-1, descending=True, stable=True)
    return values[..., :k], index[..., :k]


def route_counts(route: RouteResult, n_experts: int) -> torch.Tensor:
    """Used slots per expert of a routing result: the ones routing counted, or counted now."""
    if route.counts_E is not None:
        return route.counts_E
    return slot_counts(route.experts_TK, route.mask_TK, n_experts)


def slot_counts(experts_TK: torch.Tensor, mask_TK: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Used slots per expert (int64, on the slots' device). A scatter-add into E + 1 bins (the last one
    takes the unused slots): unlike bincount or boolean indexing, it needs no host synchronisation."""
    ids = torch.where(mask_TK, experts_TK, n_experts).reshape(-1)
    bins = torch.zeros(n_experts + 1, dtype=torch.int64, device=ids.device)
    return bins.scatter_add_(0, ids, torch.ones_like(ids))[:n_experts]


class RouterMath:
    """The routing arithmetic on given tensors: what `Router` runs on its own parameters, and what
    compiled programs call (`route`) on their local copies."""

    def __init__(self, centroids_GD: torch.Tensor, weight_ED: torch.Tensor, bias_E: torch.Tensor, cfg: Routing):
        self.centroids_GD, self.weight_ED, self.bias_E, self.cfg = centroids_GD, weight_ED, bias_E, cfg
        self.n_groups, self.n_experts = centroids_GD.shape[0], weight_ED.shape[0]
        self.per_group = self.n_experts // self.n_groups

    def group_scores(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Steps 1-2: kept groups (ascending id) and their weights q (softmax over the kept affinities)."""
        cfg = self.cfg.groups
        affinity_TG = F.normalize(x_TD, dim=-1) @ self.unit_centroids(x_TD.dtype).T / cfg.temperature
        _, kept_TGk = stable_topk(self.set_limited(affinity_TG.detach()), cfg.top)
        kept_TGk, _ = torch.sort(kept_TGk, dim=-1)  # ascending group id -> candidates in ascending expert id
        q_TGk = torch.softmax(affinity_TG.gather(1, kept_TGk), dim=-1)
        return kept_TGk, q_TGk

    def set_limited(self, affinity_TG: torch.Tensor) -> torch.Tensor:
        """Node-limited routing (`groups.max_sets` of `groups.sets`): each set of consecutive groups is scored
        by its best group; the groups outside a token's best `max_sets` sets (ties: the lower set) score -inf,
        so the top groups come from those sets only. Unchanged without a limit."""
        cfg = self.cfg.groups
        if not cfg.node_limited:
            return affinity_TG
        T = affinity_TG.shape[0]
        per_set = self.n_groups // cfg.sets
        best_TS = affinity_TG.view(T, cfg.sets, per_set).amax(dim=-1)
        _, kept_TSk = stable_topk(best_TS, cfg.kept_sets)
        allowed_TS = torch.zeros_like(best_TS, dtype=torch.bool).scatter_(1, kept_TSk, True)
        allowed_TG = allowed_TS.repeat_interleave(per_set, dim=1)
        return affinity_TG.masked_fill(~allowed_TG, float("-inf"))

    def expert_logits(self, x_TD: torch.Tensor, kept_TGk: torch.Tensor) -> torch.Tensor:
        """Step 3: logits of the kept groups' experts only, group-major: each group's tokens meet the
        group's block of router rows in one matmul. Returns z per (token, kept group, expert): T x Gk x P.

        The (token, group) pairs are sorted by group and gathered once, so each group's tokens are one
        contiguous slice. At LongCat shapes this streams the router weights once and is bound by memory
        bandwidth; a padded bmm is no faster on CPU and allocates a buffer per call. One grouped matmul
        takes the group sizes as a device tensor; where it cannot run (float64, or P or D not a multiple of
        16 bytes, such as LongCat's 125 experts per group in float32), a loop over the groups needs them
        on the host: the router's only host synchronisation, and only in that case. When every group is
        kept (one group, as imported models route), the logits are one dense matmul."""
        T, Gk = kept_TGk.shape
        dtype = torch.promote_types(x_TD.dtype, torch.float32)
        if Gk == self.n_groups:  # every group kept (one group, say): all logits, already group-major
            return (x_TD.to(dtype) @ self.weight_ED.to(dtype).T).view(T, Gk, self.per_group)
        flat = kept_TGk.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts_G = torch.zeros(self.n_groups, dtype=torch.int64, device=flat.device).scatter_add_(
            0, flat, torch.ones_like(flat))
        w_GPD = self.group_weights(dtype)
        x_SD = x_TD.index_select(0, order // Gk).to(dtype)  # index_select: several times faster than x[idx]
        if grouped_mm_ok(x_SD, w_GPD, w_GPD):
            offs = group_ends(counts_G, x_SD.device)
            z_SP = contiguous_grad(F.grouped_mm(x_SD.contiguous(), w_GPD.transpose(1, 2), offs=offs))
        else:
            z_SP = self._logits_looped(x_SD, counts_G.tolist(), w_GPD)  # host sync: see the docstring
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return z_SP.index_select(0, inverse).view(T, Gk, self.per_group)

    def unit_centroids(self, dtype: torch.dtype) -> torch.Tensor:
        """The group centroids normalised, in `dtype`."""
        return F.normalize(self.centroids_GD.to(dtype), dim=-1)

    def group_weights(self, dtype: torch.dtype) -> torch.Tensor:
        """The router weights as group-major blocks [groups, experts per group, D] in `dtype`."""
        return self.weight_ED.view(self.n_groups, self.per_group, -1).to(dtype)

    @staticmethod
    def _logits_looped(x_SD: torch.Tensor, counts: list[int], w_GPD: torch.Tensor) -> torch.Tensor:
        w_groups = w_GPD.unbind(0)  # unbound once: no full-size zero gradient per group (see swiglu_loop)
        parts, start = [], 0
        for g, n in enumerate(counts):
            if n:
                parts.append((w_groups[g] @ x_SD[start:start + n].T).T)  # measured faster for few tokens
                start += n
        return torch.cat(parts) if parts else x_SD.new_zeros(0, w_GPD.shape[1])

    def route(self, x_TD: torch.Tensor) -> RouteResult:
        # routing math runs in float32 or wider, also under bfloat16 autocast
        with torch.autocast(x_TD.device.type, enabled=False):
            return self._route(x_TD.to(torch.promote_types(x_TD.dtype, torch.float32)))

    def _route(self, x_TD: torch.Tensor) -> RouteResult:
        cfg = self.cfg
        T = x_TD.shape[0]
        P, K = self.per_group, cfg.k.max
        kept_TGk, q_TGk = self.group_scores(x_TD)
        z_TGkP = self.expert_logits(x_TD, kept_TGk)
        if cfg.score == "softmax":
            p_TGkP = torch.softmax(z_TGkP, dim=-1)
        else:
            s = torch.sigmoid(z_TGkP)
            p_TGkP = s / s.sum(dim=-1, keepdim=True)
        # step 4: joint probability over the C candidates (ascending expert id)
        C = self.cfg.groups.top * P
        pi_TC = (q_TGk.to(p_TGkP.dtype).unsqueeze(-1) * p_TGkP).reshape(T, C)
        cand_TC = (kept_TGk.unsqueeze(-1) * P + torch.arange(P, device=x_TD.device)).reshape(T, C)
        # step 5: rank by pi + load bias (least_loaded) or pi
        rank_score = pi_TC.detach()
        if cfg.experts.selection == "least_loaded":  # the bias is float64: rank in float64
            rank_score = rank_score.to(torch.float64) + self.bias_E[cand_TC]
        _, slot_TK = stable_topk(rank_score, K)
        experts_TK = cand_TC.gather(1, slot_TK)
        pi_TK = pi_TC.gather(1, slot_TK)
        # step 6: k(x) = smallest k whose top-k mass reaches the threshold, clamped to [min, max]
        mass_TK = torch.cumsum(pi_TK.detach(), dim=-1)
        # the mass only grows along the slots (a cumsum of probabilities), so the slots short of the threshold
        # come first and their count + 1 is that k; none reached gives K + 1, clamped to K
        reached = mass_TK >= cfg.k.threshold
        k_T = ((~reached).sum(-1) + 1).clamp(cfg.k.min, K)
        mask_TK = torch.arange(K, device=x_TD.device).unsqueeze(0) < k_T.unsqueeze(1)
        # step 7: gates
        gates_TK = pi_TK * mask_TK
        if cfg.renormalize:  # normalise over the chosen experts, then scale
            gates_TK = gates_TK / gates_TK.sum(-1, keepdim=True)
        gates_TK = cfg.gate_scale * gates_TK
        # step 10: capacity per unit (this call), before dispatch
        dropped = torch.zeros((), dtype=torch.int64, device=x_TD.device)
        if cfg.capacity_factor is not None:
            mask_TK, dropped = self.apply_capacity(experts_TK, mask_TK)
            gates_TK = gates_TK * mask_TK
        counts_E = slot_counts(experts_TK, mask_TK, self.n_experts)
        load_E = counts_E.to(torch.float64)
        # step 9: losses per unit, computed only when they are used
        zero = pi_TC.new_zeros(())
        balance = cfg.balance
        counts, pi_sum_E, aux = None, None, zero
        if balance.aux_loss_coef:
            counts, pi_sum_E = self.balance_terms(pi_TC, cand_TC, experts_TK, mask_TK)
            aux = balance_loss_from(counts, pi_sum_E, self.n_experts)
        z_loss = torch.logsumexp(z_TGkP.reshape(T, C), dim=-1).pow(2).mean() if balance.z_loss_coef else zero
        return RouteResult(experts_TK, gates_TK, mask_TK, k_T, load_E, dropped, aux, z_loss, counts, pi_sum_E, counts_E)

    def apply_capacity(self, experts_TK: torch.Tensor, mask_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep at most ceil(capacity_factor * used slots / E) slots per expert; priority by slot rank,
        then token order (every token's first choice before anyone's second). Returns the kept slots and
        the number dropped; the capacity stays a tensor (float64, as Python's float), so no host sync."""
        used = mask_TK.sum().to(torch.float64)
        capacity = torch.ceil(used * self.cfg.capacity_factor / self.n_experts)
        order_KT = experts_TK.T.reshape(-1)  # priority order: every token's first slot, then second, ...
        live = mask_TK.T.reshape(-1)
        ids = torch.where(live, order_KT, self.n_experts)  # unused slots: a bin of their own
        # 1-based arrival order of each slot at its expert: its rank among the slots of the same id in a
        # stable sort by id (no (slots x E) one-hot)
        by_id = torch.argsort(ids, stable=True)
        per_id = torch.zeros(self.n_experts + 1, dtype=torch.int64, device=ids.device).scatter_add_(
            0, ids, torch.ones_like(ids))
        first = torch.cumsum(per_id, 0) - per_id  # where each id's run starts in the sorted order
        position = torch.empty_like(ids)
        position[by_id] = torch.arange(1, ids.numel() + 1, device=ids.device) - first[ids[by_id]]
        keep = live & (position <= capacity)
        keep_TK = keep.view(experts_TK.shape[1], -1).T
        return keep_TK, live.sum() - keep.sum()

    def balance_terms(self, pi_TC: torch.Tensor, cand_TC: torch.Tensor, experts_TK: torch.Tensor,
                      mask_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(counts: routed slots per expert, used slots, tokens; pi summed per expert over the tokens).
        When a unit's tokens are split over ranks, summing the counts over them (ops.unit_balance) makes
        each rank's Switch loss its share of the unit's: the shares add up to the unit's loss."""
        E = self.n_experts
        slots = mask_TK.sum().to(pi_TC.dtype).reshape(1)
        tokens = torch.full((1,), float(pi_TC.shape[0]), dtype=pi_TC.dtype, device=pi_TC.device)
        counts = torch.cat([slot_counts(experts_TK, mask_TK, E).to(pi_TC.dtype), slots, tokens])
        pi_sum_E = torch.zeros(E, dtype=pi_TC.dtype, device=pi_TC.device).index_add_(0, cand_TC.reshape(-1),
                                                                                    pi_TC.reshape(-1))
        return counts, pi_sum_E


def balance_loss_from(counts: torch.Tensor, pi_sum_E: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Switch: E * sum_e f_e P_e, f the share of routed slots, P the mean joint probability over tokens."""
    E = n_experts
    slots, T = counts[E].clamp(min=1), counts[E + 1]
    return E * (counts[:E] / slots * (pi_sum_E / T)).sum()


def route(x_TD: torch.Tensor, centroids_GD: torch.Tensor, weight_ED: torch.Tensor, bias_E: torch.Tensor,
          cfg: Routing) -> RouteResult:
    return RouterMath(centroids_GD, weight_ED, bias_E, cfg).route(x_TD)


@torch.no_grad()
def update_bias(bias_E: torch.Tensor, load_E: torch.Tensor, cfg: Routing) -> None:
    """Step 8, once per optimizer step, from loads summed over micro-batches and ranks (in place)."""
    if cfg.experts.selection != "least_loaded":
        return
    load = load_E.to(torch.float64)
    bias_E += cfg.balance.bias_rate * torch.sign(load.mean() - load)


class Router(nn.Module):
    """Stage 1: cosine group affinity; stage 2: group-major expert scoring and least-loaded ranking."""

    def __init__(self, d_model: int, moe: MoE, routing: Routing, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.n_groups, self.per_group = moe.n_groups, moe.experts_per_group
        self.n_experts = moe.n_experts
        self.cfg = routing
        self.centroids_GD = nn.Parameter(torch.empty(moe.n_groups, d_model, device=device, dtype=dtype))
        self.weight_ED = nn.Parameter(torch.empty(moe.n_experts, d_model, device=device, dtype=dtype))
        self.register_buffer("bias_E", torch.zeros(moe.n_experts, device=device, dtype=torch.float64))

    @property
    def math(self) -> RouterMath:
        return RouterMath(self.centroids_GD, self.weight_ED, self.bias_E, self.cfg)

    def forward(self, x_TD: torch.Tensor) -> RouteResult:
        return self.math.route(x_TD)

    def group_scores(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.math.group_scores(x_TD)

    def expert_logits(self, x_TD: torch.Tensor, kept_TGk: torch.Tensor) -> torch.Tensor:
        return self.math.expert_logits(x_TD, kept_TGk)

    def update_bias(self, load_E: torch.Tensor) -> None:
        update_bias(self.bias_E, load_E, self.cfg)

