"""Expert placement: groups onto EP ranks in order; the expert -> (EP rank, slot) table as a rule."""

from __future__ import annotations

from lcc.compiler.cost.traffic import links
from lcc.compiler.layout import experts_per_rank, group_ep_ranks
from lcc.compiler.state import CompileState

NAME = "expert_placement"
DESCRIPTION = "expert groups onto EP ranks in order; expert e on EP rank e div (E/ep), slot e mod (E/ep)"


def run(state: CompileState) -> None:
    spec, moe = state.spec, state.spec.model.moe
    par = spec.parallelism
    if moe is None:
        state.plan["experts"] = None
        return
    for info in state.params.values():
        if info.name.endswith(("w1_EFD", "w3_EFD", "w2_EDF")):
            info.expert = True
            info.shard = {"dim": 0, "axis": "ep", "parts": par.ep} if par.ep > 1 else None
            info.grad_reduce = ["edp"]
    state.plan["experts"] = {
        "n_experts": moe.n_experts, "n_groups": moe.n_groups, "ep": par.ep, "edp": par.edp,
        "experts_per_rank": experts_per_rank(moe.n_experts, par.ep),
        "rule": "expert e -> (EP rank e // experts_per_rank, slot e % experts_per_rank)",
        "group_ep_ranks": [[r.start, r.stop] for r in
                           (group_ep_ranks(moe.n_experts, moe.n_groups, par.ep, g) for g in range(moe.n_groups))],
        "alltoall_inter_node_share": links(spec, "ep").inter_share,
    }
