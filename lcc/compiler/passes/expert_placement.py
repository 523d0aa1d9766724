"""Expert placement: groups onto EP ranks in order; the expert -> (EP rank, slot) table as a rule."""

from __future__ import annotations

from lcc.compiler.cost.model import CostModel
from lcc.compiler.layout import experts_per_rank, group_ep_ranks, node_span
from lcc.compiler.state import CompileState
from lcc.model.moe import ExpertFFN
from lcc.plan.types import Experts, Shard

NAME = "expert_placement"
DESCRIPTION = ("expert groups onto EP ranks in order; expert e on EP rank e div (E/ep), slot e mod (E/ep); a node "
               "holds E/nodes consecutive experts: whole groups and whole sets of groups")


def run(state: CompileState) -> None:
    spec, moe = state.spec, state.spec.model.moe
    par = spec.parallelism
    if moe is None:
        return
    for n in state.graph.graph.nodes:  # the experts are the parameters of ExpertFFN call sites
        if n.op != "call_module" or not isinstance(state.graph.get_submodule(str(n.target)), ExpertFFN):
            continue
        for local, _ in state.graph.get_submodule(str(n.target)).named_parameters():
            info = state.params[f"{n.target}.{local}"]
            info.expert = True
            info.grad_reduce = ["edp"]
            if par.ep > 1:
                info.shard = Shard(0, "ep", par.ep)
                info.local_shape = [info.global_shape[0] // par.ep, *info.global_shape[1:]]
    span = node_span(spec)
    state.experts = Experts(
        moe.n_experts, moe.n_groups, par.ep, par.edp, experts_per_rank(moe.n_experts, par.ep),
        "expert e -> (EP rank e // experts_per_rank, slot e % experts_per_rank)",
        [[r.start, r.stop] for r in (group_ep_ranks(moe.n_experts, moe.n_groups, par.ep, g)
                                     for g in range(moe.n_groups))],
        CostModel(spec).ep_links.inter_share, par.expert_exchange, span.nodes, span.ranks_per_node,
        spec.routing.groups.sets, spec.routing.groups.kept_sets, span.token_nodes)
