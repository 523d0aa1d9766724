"""The hierarchical expert exchange's first level (parallelism.expert_exchange: hierarchical, docs/runtime.md).

An EP group spans nodes x ranks per node. `ep_inter` joins the EP ranks at the same place on each node,
`ep_intra` the EP ranks of one node; node b holds the experts [b * E/nodes, (b + 1) * E/nodes).

A token goes once to each node that holds one of its experts (its row to this rank's peer there), with
each of its slots there described by the row's index in the message and its gate. The peer forwards one
row per slot to the node's rank holding the expert (ops.moe_plan over ep_intra, on `NodePlan.forwarded`),
sums the expert outputs of each row, gate-weighted, and sends one row back; the token's rank adds its
nodes' rows. The program lists every step:

    d = ops.node_plan(routed, n_experts=E, group=G.ep_inter)    # counts, slot rows and gates to each node
    dn = ops.moe_plan(d.forwarded, n_experts=E / nodes, group=G.ep_intra)
    x = ops.all_to_all(x[d.token_S], d.send, d.recv, G.ep_inter)      # a token once per node
    rows = ops.all_to_all(x[dn.token_S], dn.send, dn.recv, G.ep_intra)  # a row per slot, to its expert
    ... experts, and back over ep_intra ...
    y = ops.combine_tokens(y, dn, x)                                  # gate-weighted sum per (token, node)
    y = ops.all_to_all(y, d.recv, d.send, G.ep_inter)                # one row per (token, node) back
    out = ops.combine_tokens(y, d, tokens)                            # summed over the nodes
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lcc.model.moe import Dispatch, dispatch
from lcc.model.routing import RouteResult
from lcc.ops.collectives import all_to_all, exchange_counts
from lcc.ops.groups import Group, group_size

__all__ = ["NodePlan", "node_plan"]


@dataclass
class NodePlan:
    """Where this rank's tokens go (one row per token and destination node) and which slots of the node's
    experts this rank forwards for its peers."""

    local: Dispatch  # rows sent, sorted by (node, token): each row's token; gates 1 (the nodes' sums add)
    send: list[int]  # rows to each node's peer
    recv: list[int]  # rows from each node's peer
    forwarded: Dispatch  # the slots of this node's experts that this rank received, sorted by expert:
    # each slot's row among the received rows, its gate, and the slots per expert of the node
    native: bool = False  # combine_tokens: no native kernel sorted these slots

    @property
    def token_S(self) -> torch.Tensor:
        return self.local.token_S


def node_plan(routed: RouteResult, n_experts: int, group: Group) -> NodePlan:
    """The first level over `group` (ep_inter, one member per node): three all-to-alls (counts, each slot's
    row index, each slot's gate; the gates' has a backward) and one host read of the split sizes."""
    nodes = group_size(group)
    per_node = n_experts // nodes
    slots = dispatch(routed, n_experts)  # this rank's slots sorted by expert (token order inside): a host read
    T = routed.experts_TK.shape[0]
    device = slots.token_S.device
    expert_S = torch.repeat_interleave(torch.arange(n_experts, device=device), slots.counts_E,
                                       output_size=slots.token_S.numel())
    node_S = expert_S // per_node
    # one row per (node, token) pair that has a slot; pairs sorted by node, then token
    pair_key, pair_S = torch.unique(node_S * T + slots.token_S, sorted=True, return_inverse=True)
    pair_node = pair_key // T
    rows_per_node = torch.zeros(nodes, dtype=torch.int64, device=device).scatter_add_(
        0, pair_node, torch.ones_like(pair_node))
    first_row = torch.cumsum(rows_per_node, 0) - rows_per_node
    row_S = pair_S - first_row[node_S]  # each slot's row in its node's message
    counts = torch.cat([rows_per_node.unsqueeze(1), slots.counts_E.view(nodes, per_node)], dim=1)
    received = exchange_counts(counts, group)  # row b: rows, then slots per expert of my node, from node b
    host = torch.cat([rows_per_node, received[:, 0], counts[:, 1:].sum(1), received[:, 1:].sum(1)]).tolist()
    send, recv = host[:nodes], host[nodes:2 * nodes]
    slots_send, slots_recv = host[2 * nodes:3 * nodes], host[3 * nodes:]
    # the slots' rows and gates go with them (source-major on arrival, each source's sorted by expert)
    row_R = _exchange_rows(row_S, slots_send, slots_recv, group)
    gate_R = all_to_all(slots.gate_S, slots_send, slots_recv, group)
    source_R = torch.repeat_interleave(torch.arange(nodes, device=device),
                                       torch.tensor(slots_recv, device=device), output_size=sum(slots_recv))
    recv_first = torch.cumsum(torch.tensor(recv, device=device), 0) - torch.tensor(recv, device=device)
    row_R = row_R + recv_first[source_R]  # index among all received rows
    expert_R = torch.repeat_interleave(torch.arange(per_node, device=device).repeat(nodes),
                                       received[:, 1:].reshape(-1), output_size=sum(slots_recv))
    by_expert = torch.argsort(expert_R, stable=True)
    forwarded = Dispatch(row_R.index_select(0, by_expert), gate_R.index_select(0, by_expert),
                         received[:, 1:].sum(0))
    ones = torch.ones(pair_key.numel(), dtype=slots.gate_S.dtype, device=device)
    return NodePlan(Dispatch(pair_key % T, ones, rows_per_node), send, recv, forwarded)


def _exchange_rows(row_S: torch.Tensor, send: list[int], recv: list[int], group: Group) -> torch.Tensor:
    """Integers (no gradient) with the given row splits."""
    out = row_S.new_empty(sum(recv))
    torch.distributed.all_to_all_single(out, row_S.contiguous(), recv, send, group=group)
    return out
