"""The parallel layout as pure functions: rank order, process groups, expert placement, stage partition.

These are shared by the cost model and the compiler, and never import torch. The rank order is fixed
(docs/cost-model.md): `rank = (pp_i * dp + dp_i) * tp + tp_i`, tp fastest so that a TP group sits in a node;
experts fold over `f = dp_i * tp + tp_i` as `ep_i = f mod ep`, `edp_i = f div ep`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from lcc.actions import stage_rank
from lcc.spec.models import Parallelism, Spec

AXES = ("pp", "dp", "tp", "ep", "edp")


@dataclass(frozen=True)
class RankCoords:
    rank: int
    pp: int
    dp: int
    tp: int
    ep: int
    edp: int
    node: int


def coords(par: Parallelism, gpus_per_node: int, rank: int) -> RankCoords:
    if not 0 <= rank < par.world_size:
        raise ValueError(f"rank {rank} outside world of {par.world_size}")
    tp_i = rank % par.tp
    dp_i = rank // par.tp % par.dp
    pp_i = rank // (par.tp * par.dp)
    f = dp_i * par.tp + tp_i
    return RankCoords(rank, pp_i, dp_i, tp_i, f % par.ep, f // par.ep, rank // gpus_per_node)


def rank_of(par: Parallelism, pp: int, dp: int, tp: int) -> int:
    return (pp * par.dp + dp) * par.tp + tp


def groups(par: Parallelism, axis: str) -> list[tuple[int, ...]]:
    """Every process group along `axis`, each as its ranks in group order; groups in order of first rank."""
    return list(_groups(par.pp, par.dp, par.tp, par.ep, axis))


@lru_cache(maxsize=64)
def _groups(pp: int, dp: int, tp: int, ep: int, axis: str) -> tuple[tuple[int, ...], ...]:
    folded = dp * tp
    out: list[tuple[int, ...]] = []
    for p in range(pp):
        base = p * folded
        if axis == "tp":
            out += [tuple(base + d * tp + t for t in range(tp)) for d in range(dp)]
        elif axis == "dp":
            out += [tuple(base + d * tp + t for d in range(dp)) for t in range(tp)]
        elif axis == "ep":  # consecutive folded indices
            out += [tuple(base + e * ep + i for i in range(ep)) for e in range(folded // ep)]
        elif axis == "edp":  # same ep_i, stride ep
            out += [tuple(base + i + ep * e for e in range(folded // ep)) for i in range(ep)]
        elif axis == "pp":
            if p == 0:
                out += [tuple(q * folded + f for q in range(pp)) for f in range(folded)]
        else:
            raise ValueError(f"unknown mesh axis {axis!r}; expected one of {AXES}")
    return tuple(out)


# ----------------------------------------------------------------------------------------- experts


def experts_per_rank(n_experts: int, ep: int) -> int:
    return n_experts // ep


def expert_home(n_experts: int, ep: int, expert: int) -> tuple[int, int]:
    """Expert id -> (EP rank, local slot). Experts are contiguous per group, so groups land on EP ranks
    in order (group g on EP rank g div (n_groups / ep)), or spread over ep / n_groups ranks each."""
    per = n_experts // ep
    return expert // per, expert % per


def group_ep_ranks(n_experts: int, n_groups: int, ep: int, group: int) -> range:
    """The EP ranks that hold the experts of `group`."""
    per_group, per_rank = n_experts // n_groups, n_experts // ep
    first = group * per_group
    return range(first // per_rank, (first + per_group - 1) // per_rank + 1)


@dataclass(frozen=True)
class NodeSpan:
    """How one expert-parallel group sits on nodes, and what that means for a token (docs/cost-model.md)."""

    nodes: int  # nodes one EP group spans
    ranks_per_node: int  # its ranks on each of them
    nodes_per_group: int  # nodes one expert group spans (1: each group inside one node)
    token_nodes: int  # the most nodes one token's experts can span


def node_span(spec: Spec) -> NodeSpan:
    """Where the EP groups sit on nodes. Experts lie contiguously on the EP ranks in order, and an EP group is
    consecutive ranks, so a node holds E / nodes consecutive experts: whole groups when n_groups divides by
    the nodes, and whole sets of groups when the sets do (the spec checks refuse sets that would not). A
    token's experts then span at most min(nodes, k.max, top groups x nodes per group, kept sets x nodes per
    set) nodes. Irregular spans (refused for sets and the hierarchical exchange) count every rank's node."""
    moe, routing = spec.model.moe, spec.routing
    span = spec.ep_nodes
    nodes, per_node = span if span is not None else (spec.parallelism.ep, 1)
    if moe is None or routing is None:
        return NodeSpan(nodes, per_node, 1, 1)
    per_group = max(1, nodes // moe.n_groups) if nodes >= moe.n_groups else 1
    groups = routing.groups
    per_set = max(1, nodes // groups.sets)
    token = min(nodes, routing.k.max, groups.top * per_group, groups.kept_sets * per_set)
    return NodeSpan(nodes, per_node, per_group, token)


# ------------------------------------------------------------------------------------ the pipeline


def stage_ranks(pp: int, virtual_stages: int, pp_rank: int, schedule: str = "1f1b") -> list[int]:
    """Global (virtual) stages run by a pipeline rank, in ascending order: stage s runs on pp rank
    `lcc.actions.stage_rank(s, pp, schedule)`, s mod pp except zbv's V (rank r: stages r and 2 pp - 1 - r).
    Serve plans (schedule kind `serve`) keep s mod pp whatever the spec's training schedule."""
    return [s for s in range(pp * virtual_stages) if stage_rank(s, pp, schedule) == pp_rank]


def partition(costs: list[float], n_stages: int) -> list[tuple[int, int]]:
    """Split items (layers) into n_stages contiguous, non-empty [start, end) ranges minimising the most
    expensive stage; among those, the most even split (least sum of squared stage costs); among those,
    the lexicographically first. Deterministic; O(n_stages * n^2), each split of the same costs computed once
    (the layout search asks for the same ones many times)."""
    return list(_partition(tuple(costs), n_stages))


@lru_cache(maxsize=4096)
def _partition(costs: tuple[float, ...], n_stages: int) -> tuple[tuple[int, int], ...]:
    n = len(costs)
    if not 1 <= n_stages <= n:
        raise ValueError(f"cannot split {n} layers into {n_stages} stages")
    if not all(math.isfinite(c) and c >= 0 for c in costs):
        raise ValueError("stage costs must be finite and non-negative")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    bottleneck = _solve(prefix, n_stages, lambda acc, c: max(acc, c), limit=float("inf"))[0]
    limit = bottleneck * (1 + 1e-9) + 1e-300
    _, bounds = _solve(prefix, n_stages, lambda acc, c: acc + c * c, limit)
    return tuple(bounds)


def _solve(prefix: list[float], n_stages: int, combine, limit: float) -> tuple[float, list[tuple[int, int]]]:
    """Dynamic programme over contiguous splits with stage cost <= limit, minimising combine(...)."""
    n = len(prefix) - 1
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(n_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, n_stages + 1):
        for i in range(s, n - (n_stages - s) + 1):
            for j in range(s - 1, i):  # ascending j: the first optimum wins, so earlier cuts are preferred
                c = prefix[i] - prefix[j]
                if best[s - 1][j] == inf or c > limit:
                    continue
                cand = combine(best[s - 1][j], c)
                if cand < best[s][i]:
                    best[s][i], cut[s][i] = cand, j
    bounds, i = [], n
    for s in range(n_stages, 0, -1):
        j = cut[s][i]
        bounds.append((j, i))
        i = j
    return best[n_stages][n], bounds[::-1]


def inflight_chunks(schedule: str, pp: int, virtual_stages: int, microbatches: int, pp_rank: int) -> int:
    """Most (micro-batch, stage) forward activations a pipeline rank holds at once.

    gpipe keeps every micro-batch; 1f1b keeps pp - rank (its warm-up plus one); interleaved 1f1b warms up
    with 2 (pp - rank - 1) + (v - 1) pp chunks, plus one. The zero-bubble schedules keep a forward's
    activations until its W: zb_h1 pp on every rank (1F1B's peak), zbv m + rank + 1 up to 2 pp chunks of half
    a rank's layers (also 1F1B's peak) (tests/compiler/test_schedule.py counts them on the schedules).
    """
    if schedule == "gpipe":
        return microbatches * virtual_stages
    if schedule == "1f1b":
        return min(microbatches, pp - pp_rank)
    if schedule == "zb_h1":
        return min(microbatches, pp)
    if schedule == "zbv":
        return min(2 * pp, microbatches + pp_rank + 1)
    return min(microbatches * virtual_stages, 2 * (pp - pp_rank - 1) + (virtual_stages - 1) * pp + 1)


def bubble_fraction(pp: int, virtual_stages: int, microbatches: int, schedule: str = "1f1b") -> float:
    """Idle share of a pipeline step, in the schedule simulator's units (F = I = W = 1, B = 2), which is what
    `lcc.compiler.schedule.simulate` measures on the generated schedules (tests/plan_views/test_search.py):

    - gpipe, 1f1b, interleaved 1f1b: (p - 1) / (v m + p - 1) (Narayanan et al. 2021);
    - zb_h1: the W passes fill the drain, a rank is idle p - 1 units against 3 m busy (F, I, W of each
      micro-batch): (p - 1) / (3 m + p - 1), a third of 1F1B's for large m (Qi et al. 2024);
    - zbv: 2 half-size stages a rank, 6 m busy units; idle max(p - 1, 2 (2 p - 1 - m)) units (the warm-up's
      forwards cannot all run before the V turns when m < 2 p - 1)."""
    if schedule == "zb_h1":
        return (pp - 1) / (3 * microbatches + pp - 1)
    if schedule == "zbv":
        idle = max(pp - 1, 2 * (2 * pp - 1 - microbatches))
        return idle / (6 * microbatches + idle)
    return (pp - 1) / (virtual_stages * microbatches + pp - 1)
