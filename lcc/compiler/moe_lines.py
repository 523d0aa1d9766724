"""The program lines of an MoE block's exchange (codegen's part for `ffn.dispatch` and `ffn.experts`): the
plan's comms at those call sites become the flat exchange over `G.ep`, or the hierarchical one over
`G.ep_inter` (across nodes, a token once per node) and `G.ep_intra` (inside the node, a row per slot)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lcc.compiler.state import AFTER, AT, BEFORE
from lcc.plan.op_table import render_call as call

if TYPE_CHECKING:
    from lcc.compiler.codegen import _Emitter


def dispatch(em: _Emitter, target: str, name: str, routed: str) -> None:
    """The exchange plan: counts over ep (flat), or the node plan and the node's own plan (hierarchical)."""
    moe = em.state.spec.model.moe
    if em.take(target, AT, "node_plan") is not None:
        nodes = em.state.spec.ep_nodes[0]
        em.emit(f"{name} = {call('node_plan', routed, n_experts=str(moe.n_experts), group='G.ep_inter')}",
                "rows and slots per expert to each node, each slot's row and gate")
        em.take(target, AT, "moe_plan")
        em.emit(f"{name}_node = " + call("moe_plan", f"{name}.forwarded", n_experts=str(moe.n_experts // nodes),
                                         group="G.ep_intra"),
                "the slots this rank forwards to the node's experts: counts over the node's ranks")
        return
    counts = em.take(target, AT, "moe_plan")
    em.emit(f"{name} = {call('moe_plan', routed, n_experts=str(moe.n_experts), group='G.ep')}",
            "exchanges per-expert counts over ep" if counts is not None else "")


def experts(em: _Emitter, target: str, name: str, rows: str, plan: str) -> None:
    """Dispatch the rows, run the experts on them, and send their outputs back (not yet combined)."""
    params = em.state.params
    first = em.take(target, BEFORE, "all_to_all")
    nodes = first is not None and first.forward[0].axis == "ep_inter"
    node_rows, node_plan = rows, plan
    if nodes:
        em.emit(f"{rows} = {call('all_to_all', rows, f'{plan}.send', f'{plan}.recv', 'G.ep_inter')}",
                "dispatch across nodes: a token once per node")
        em.take(target, BEFORE, "all_to_all")
        rows, plan = f"{rows}_node", f"{plan}_node"
        em.emit(f"{rows} = {node_rows}.index_select(0, {plan}.token_S)", "a row per slot")
        em.emit(f"{rows} = {call('all_to_all', rows, f'{plan}.send', f'{plan}.recv', 'G.ep_intra')}",
                "dispatch in the node")
        em.emit(f"{rows} = {rows}.index_select(0, {plan}.order)", "group rows by local expert")
    elif first is not None:
        em.emit(f"{rows} = {call('all_to_all', rows, f'{plan}.send', f'{plan}.recv', 'G.ep')}", "dispatch")
        em.emit(f"{rows} = {rows}.index_select(0, {plan}.order)", "group rows by local expert")
    em.region = None
    w = [f'P["{target}.{p}"]' for p in ("w1_EFD", "w3_EFD", "w2_EDF")]
    int4 = any(params[f"{target}.{p}"].serve for p in ("w1_EFD", "w3_EFD", "w2_EDF"))
    em.emit(f"{name} = " + call("grouped_swiglu_int4" if int4 else "grouped_swiglu", rows, f"{plan}.local_counts_E",
                                *w),
            "int4 experts, through the plan's expert kernel" if int4 else "counts on the device: no host read")
    if em.take(target, AFTER, "all_to_all") is None:
        return
    em.emit(f"{name} = {name}.index_select(0, {plan}.inverse)")
    if not nodes:
        em.emit(f"{name} = {call('all_to_all', name, f'{plan}.recv', f'{plan}.send', 'G.ep')}", "combine")
        return
    em.take(target, AFTER, "all_to_all")
    em.emit(f"{name} = {call('all_to_all', name, f'{plan}.recv', f'{plan}.send', 'G.ep_intra')}",
            "combine in the node")
    em.emit(f"{name} = {call('combine_tokens', name, plan, node_rows)}", "gate-weighted sum per (token, node)")
    em.emit(f"{name} = {call('all_to_all', name, f'{node_plan}.recv', f'{node_plan}.send', 'G.ep_inter')}",
            "combine across nodes: a row per (token, node)")
