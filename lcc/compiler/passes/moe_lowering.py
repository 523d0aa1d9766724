"""MoE lowering: route -> dispatch all-to-all -> local grouped experts -> combine all-to-all, with the
tokens of a TP group split over its ranks before dispatch and gathered after (parallel folding)."""

from __future__ import annotations

from lcc.compiler.state import CompileState

NAME = "moe_lowering"
DESCRIPTION = "MoE calls become split(tp) -> route -> all-to-all(ep) -> local experts -> all-to-all(ep) -> gather(tp)"


def run(state: CompileState) -> None:
    spec = state.spec
    par = spec.parallelism
    if spec.model.moe is None:
        return
    stage_of_layer = {i: s for s, (a, b) in enumerate(state.stage_bounds) for i in range(a, b)}
    for layer in spec.model.moe_layers:
        site = f"layers.{layer}.ffn"
        ops = []
        if par.tp > 1 and not par.sequence_parallel:
            ops.append({"site": site, "op": "split_tokens", "axis": "tp", "what": "this rank's 1/tp of the tokens"})
        if par.ep > 1:
            ops.append({"site": f"{site}.dispatch", "op": "all_to_all", "axis": "ep", "what": "dispatch"})
            ops.append({"site": f"{site}.combine", "op": "all_to_all", "axis": "ep", "what": "combine"})
        if par.tp > 1 and not par.sequence_parallel:
            ops.append({"site": site, "op": "all_gather", "axis": "tp", "what": "tokens of the TP group"})
        state.collectives.setdefault(stage_of_layer[layer], []).extend(ops)
