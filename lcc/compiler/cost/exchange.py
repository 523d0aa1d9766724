"""The expert exchange of one MoE layer: how many nodes a token's routed slots reach, and the bytes one rank sends
on intra- and inter-node links, flat or hierarchical (docs/cost-model.md, "The expert exchange").

- flat: every routed slot (token, expert) goes to its expert's EP rank (one all-to-all over the EP group);
  `lcc.compiler.cost.work.layer_comm` prices it, `traffic.links` splits it over links by peer pairs.
- hierarchical: a token goes once to each node that holds one of its experts (an all-to-all among the EP
  ranks with the same position on each node), with a gate and a row index per slot; that rank forwards one row
  per slot to the node's rank holding the expert (an all-to-all inside the node). The combine runs in
  reverse: rows per slot back inside the node, summed with their gates per (token, node), one row per
  (token, node) back between nodes.

Routing is assumed uniform within what a token may use: each of its k slots (k.planned) falls on any of the
nodes it can reach with equal chance, independently, and which nodes those are does not depend on the node
the token lives on. A token then reaches `D(k, n) = n (1 - (1 - 1/n)^k)` distinct nodes on average, n the
nodes it can reach, and by symmetry a share `1 - 1/N` of them (and of its slots) lies off its own node, N
the nodes one EP group spans.
"""

from __future__ import annotations

from dataclasses import dataclass

from lcc.compiler.layout import node_span
from lcc.spec.models import Spec

INDEX_BYTES = 8  # an int64 row index per slot, sent with the token in a hierarchical dispatch


def distinct_nodes(k: float, n: int) -> float:
    """Expected distinct nodes k slots reach when each falls on one of n nodes uniformly and independently
    (a fractional k interpolates between whole ones)."""
    return n * (1 - (1 - 1 / n) ** k) if k > 0 else 0.0


@dataclass(frozen=True)
class TokenSpread:
    """Where one token's routed slots go, by the routing and the expert placement (uniform routing)."""

    slots: float  # routed slots per token (k.planned)
    nodes: int  # nodes one EP group spans (N)
    ranks_per_node: int  # its ranks on each node (R)
    reachable: int  # nodes its slots can fall on (n): min(N, top groups x nodes a group, kept sets x nodes a set)
    token_nodes: int  # the most nodes a token's experts can span (n, and at most k.max)
    distinct: float  # expected distinct destination nodes per token, D(k, n)

    @property
    def dedup_ratio(self) -> float:
        """Slots per destination node: the inter-node rows a flat exchange sends per row a hierarchical one sends."""
        return self.slots / self.distinct if self.distinct else 1.0

    @property
    def off_node(self) -> float:
        """Share of a token's destination nodes (and of its slots) that are not its own node: 1 - 1/N."""
        return 1 - 1 / self.nodes


def token_spread(spec: Spec) -> TokenSpread:
    """The nodes one token's experts reach under the spec's routing and layout. A node holds E / N consecutive
    experts (whole groups, whole sets: `lcc.compiler.layout.node_span`); without a node limit a token's slots
    spread over the EP group's nodes, bounded by its top groups times the nodes one group spans; with one,
    over its kept sets times the nodes one set spans."""
    span = node_span(spec)
    k = spec.routing.k.planned
    groups = spec.routing.groups
    per_set = max(1, span.nodes // groups.sets)
    reachable = min(span.nodes, groups.top * span.nodes_per_group, groups.kept_sets * per_set)
    return TokenSpread(k, span.nodes, span.ranks_per_node, reachable, span.token_nodes,
                       distinct_nodes(k, reachable))


def exchange_passes(policy: str) -> tuple[int, int]:
    """(all-to-alls one MoE layer makes per micro-batch, of them forward dispatches) under a recompute policy:
    dispatch and combine forward, their two transposes backward; selective recomputation repeats the
    dispatch, full recomputation both."""
    extra = {"none": 0, "selective": 1, "full": 2}[policy]
    return 4 + extra, 1 + (extra > 0)


@dataclass(frozen=True)
class ExchangeBytes:
    """Bytes one rank sends for one MoE layer and one micro-batch, forward + backward (+ recomputation)."""

    intra: float
    inter: float

    @property
    def total(self) -> float:
        return self.intra + self.inter

    @property
    def inter_share(self) -> float:
        return self.inter / self.total if self.total else 0.0


def hierarchical_bytes(spec: Spec, tokens: float, row_bytes: float, gate_bytes: float) -> ExchangeBytes:
    """The hierarchical exchange of `tokens` tokens (one rank's share of a micro-batch), each a row of
    `row_bytes`, on each link. Every pass (dispatch, combine, their backward and recomputed copies) sends
    between nodes one row per (token, destination node off its own), `tokens D (1 - 1/N)`, and inside the
    node one row per slot whose expert is not on the forwarding rank, `tokens k (R - 1) / R`. Each forward
    dispatch also carries a gate and a row index per slot that crosses, `tokens k (1 - 1/N)`, and backward
    returns a gate gradient per such slot."""
    s = token_spread(spec)
    passes, dispatches = exchange_passes(spec.parallelism.activation_checkpointing)
    rows_inter = tokens * s.distinct * s.off_node
    rows_intra = tokens * s.slots * (s.ranks_per_node - 1) / s.ranks_per_node
    slots_inter = tokens * s.slots * s.off_node
    meta = slots_inter * (dispatches * (gate_bytes + INDEX_BYTES) + gate_bytes)
    return ExchangeBytes(passes * rows_intra * row_bytes, passes * rows_inter * row_bytes + meta)
