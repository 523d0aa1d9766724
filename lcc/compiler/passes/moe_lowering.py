"""MoE lowering: split(tp) -> route -> [unit balance counts over tp] -> expert counts exchange over ep ->
dispatch all-to-all -> local experts -> combine all-to-all -> gather(tp) (parallel folding: the tokens of
a TP group are split over its ranks before routing and gathered after combining). With sequence
parallelism each TP rank already holds its share of the tokens: nothing to split or gather."""

from __future__ import annotations

from lcc.compiler.dims import dims, sequence_parallel
from lcc.compiler.state import AFTER, AT, BEFORE, CompileState
from lcc.plan.types import Collective

NAME = "moe_lowering"
DESCRIPTION = ("MoE calls become split(tp) -> route -> counts all-to-all(ep) -> all-to-all(ep) -> local experts -> "
               "all-to-all(ep) -> gather(tp)")


def run(state: CompileState) -> None:
    spec = state.spec
    par = spec.parallelism
    moe = spec.model.moe
    if moe is None:
        return
    d = dims(spec, state.mode)
    stage_of = state.stage_of_layer()
    balance = spec.routing.balance
    unit_balance = state.mode == "train" and par.tp > 1 and balance.aux_loss_coef > 0
    for layer in spec.model.moe_layers:
        site, s = f"layers.{layer}.ffn", stage_of[layer]
        router, dispatch, experts, combine = (f"{site}.{p}" for p in ("router", "dispatch", "experts", "combine"))
        folding = par.tp > 1 and not sequence_parallel(spec, state.mode)
        if folding:
            state.add(s, router, BEFORE, "split_tokens", [], [Collective(
                "all_gather", "tp", router, "gradients of the TP group's tokens", [d.T_moe, d.D], d.params)])
        if unit_balance:
            state.add(s, router, AFTER, "unit_balance", [Collective(
                "all_reduce", "tp", router, "expert counts of the unit, for the balance loss", [moe.n_experts + 2],
                d.wide)], region="routing")
        if par.ep > 1 and par.expert_overlap:
            _halves(state, s, dispatch, experts, d)
        elif par.ep > 1 and par.expert_exchange == "hierarchical":
            _hierarchical(state, s, dispatch, experts, d)
        elif par.ep > 1:
            state.add(s, dispatch, AT, "moe_plan", [Collective(
                "all_to_all", "ep", dispatch, "rows per (source, expert)", [par.ep, moe.n_experts // par.ep],
                "int64")], region="routing")
            rows = Collective("all_to_all", "ep", experts, "dispatch", [-1, d.D], d.params)
            state.add(s, experts, BEFORE, "all_to_all", [rows], [rows], region="routing")
            # the experts compute in the compute dtype (under bfloat16 autocast, lcc.model.moe casts their
            # inputs as autocast casts a matmul's): their outputs go back in it
            back = Collective("all_to_all", "ep", experts, "combine", [-1, d.D], d.compute)
            state.add(s, experts, AFTER, "all_to_all", [back], [back])
        if folding:
            state.add(s, combine, AFTER, "gather_tokens", [Collective(
                "all_gather", "tp", combine, "the TP group's tokens", [d.T_moe, d.D], d.compute)])


def _hierarchical(state: CompileState, s: int, dispatch: str, experts: str, d) -> None:
    """Two levels (lcc.ops.node_exchange): over ep_inter (one EP rank per node) each token goes once to each
    node it needs, with its slots' rows and gates; over ep_intra the node's ranks forward one row per slot to
    the expert's rank; the combine reverses both, summing inside the node before crossing back."""
    moe = state.spec.model.moe
    nodes, per_node = state.spec.ep_nodes
    node_experts = moe.n_experts // nodes
    gates = Collective("all_to_all", "ep_inter", dispatch, "each slot's gate", [-1], d.wide)
    state.add(s, dispatch, AT, "node_plan", [
        Collective("all_to_all", "ep_inter", dispatch, "rows and slots per expert to each node", [nodes,
                   1 + node_experts], "int64"),
        Collective("all_to_all", "ep_inter", dispatch, "each slot's row", [-1], "int64"), gates], [gates],
        region="routing")
    state.add(s, dispatch, AT, "moe_plan", [Collective(
        "all_to_all", "ep_intra", dispatch, "rows per (source, expert) in the node", [per_node,
                                                                                       node_experts // per_node],
        "int64")], region="routing")
    for axis, what in (("ep_inter", "dispatch to nodes"), ("ep_intra", "dispatch in the node")):
        rows = Collective("all_to_all", axis, experts, what, [-1, d.D], d.params)
        state.add(s, experts, BEFORE, "all_to_all", [rows], [rows], region="routing")
    for axis, what in (("ep_intra", "combine in the node"), ("ep_inter", "combine across nodes")):
        back = Collective("all_to_all", axis, experts, what, [-1, d.D], d.compute)
        state.add(s, experts, AFTER, "all_to_all", [back], [back])


def _halves(state: CompileState, s: int, dispatch: str, experts: str, d) -> None:
    """The overlapped exchange (lcc.ops.overlap): each half's counts, then both halves' dispatches begun at
    once, and each half's combine begun as soon as its experts are done (half A's while B's compute)."""
    par, moe = state.spec.parallelism, state.spec.model.moe
    counts = Collective("all_to_all", "ep", dispatch, "rows per (source, expert), half A's then B's",
                        [par.ep, 2 * moe.n_experts // par.ep], "int64")
    state.add(s, dispatch, AT, "moe_plan_halves", [counts], region="routing")
    for h in "AB":
        rows = Collective("all_to_all", "ep", experts, f"dispatch, half {h} (begun)", [-1, d.D], d.params)
        state.add(s, experts, BEFORE, "all_to_all_start", [rows], [rows], region="routing")
    for h in "AB":
        back = Collective("all_to_all", "ep", experts, f"combine, half {h} (begun)", [-1, d.D], d.compute)
        state.add(s, experts, AFTER, "all_to_all_start", [back], [back])
