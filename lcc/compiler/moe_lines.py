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
    if em.take(target, AT, "moe_plan_halves") is not None:
        em.emit(f"{name} = {call('moe_plan_halves', routed, n_experts=str(moe.n_experts), group='G.ep')}",
                "two halves of the tokens: both halves' counts over ep")
        return
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
    if em.take(target, BEFORE, "all_to_all_start") is not None:
        _halves(em, target, name, rows, plan)
        return
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
    _experts(em, target, name, rows, plan)
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


def _experts(em: _Emitter, target: str, name: str, rows: str, plan: str, comment: str = "") -> None:
    w = [f'P["{target}.{p}"]' for p in ("w1_EFD", "w3_EFD", "w2_EDF")]
    int4 = any(em.state.params[f"{target}.{p}"].serve for p in ("w1_EFD", "w3_EFD", "w2_EDF"))
    em.emit(f"{name} = " + call("grouped_swiglu_int4" if int4 else "grouped_swiglu", rows, f"{plan}.local_counts_E",
                                *w),
            comment or ("int4 experts, through the plan's expert kernel" if int4 else
                        "counts on the device: no host read"))


def _halves(em: _Emitter, target: str, name: str, rows: str, plan: str) -> None:
    """The overlapped exchange: both dispatches begun, each half's experts while the other half travels."""
    em.take(target, BEFORE, "all_to_all_start")
    for h in "ab":
        em.emit(f"{rows}_{h} = {rows}.index_select(0, {plan}.slots_{h})", f"half {h.upper()}'s slots")
    for h in "ab":
        em.emit(f"{rows}_{h}, {rows}_{h}_sent = " + call("all_to_all_start", f"{rows}_{h}", f"{plan}.{h}.send",
                                                          f"{plan}.{h}.recv", "G.ep"),
                f"dispatch, half {h.upper()}: begun")
    em.region = None
    em.take(target, AFTER, "all_to_all_start")
    em.take(target, AFTER, "all_to_all_start")
    for h, other in (("a", "B's rows travel"), ("b", "A's outputs travel back")):
        em.emit(f"{rows}_{h} = {call('exchange_wait', f'{rows}_{h}', f'{rows}_{h}_sent')}")
        em.emit(f"{rows}_{h} = {rows}_{h}.index_select(0, {plan}.{h}.order)", "group rows by local expert")
        _experts(em, target, f"{name}_{h}", f"{rows}_{h}", f"{plan}.{h}", f"while half {other}")
        em.emit(f"{name}_{h} = {name}_{h}.index_select(0, {plan}.{h}.inverse)")
        em.emit(f"{name}_{h}, {name}_{h}_back = " + call("all_to_all_start", f"{name}_{h}", f"{plan}.{h}.recv",
                                                          f"{plan}.{h}.send", "G.ep"),
                f"combine, half {h.upper()}: begun")
    for h in "ab":
        em.emit(f"{name}_{h} = {call('exchange_wait', f'{name}_{h}', f'{name}_{h}_back')}")
    em.emit(f"{name} = {call('cat_rows', f'{name}_a', f'{name}_b')}", "both halves' slots, in the plan's order")
