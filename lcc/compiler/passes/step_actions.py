"""Step actions: what each pipeline rank does after its last backward, as typed actions with the
collectives each issues (docs/plan.md). Every rank runs the same kinds in the same order, so collectives
over the world and over a stage's ranks line up."""

from __future__ import annotations

from lcc.compiler.dims import dims
from lcc.compiler.layout import stage_ranks
from lcc.compiler.passes.data_parallel import owner
from lcc.compiler.state import CompileState
from lcc.plan.types import Collective, StepAction, chunk_size

NAME = "step_actions"
DESCRIPTION = ("after the pipeline: the tied embedding's sum, router statistics, clipping, AdamW, ZeRO 1/2 "
               "parameter gathers (UNSHARD), load biases, metrics")


def run(state: CompileState) -> None:
    if state.mode != "train":
        return
    spec, par = state.spec, state.spec.parallelism
    d = dims(spec, state.mode)
    sizes = {"dp": par.dp, "tp": par.tp, "edp": par.edp, "stage": par.dp * par.tp, "world": par.world_size,
             "kv": max(1, par.tp // spec.model.attention.n_kv_heads)}
    zero = state.memory.zero
    moe = spec.model.moe
    stats = (moe.n_experts + spec.routing.k.max + 1) if moe else 0
    last = state.last_stage
    tied = spec.model.tie_embeddings and "embed.weight" in state.params and state.params["embed.weight"].stages != [0]

    def live(*collectives: Collective) -> list[Collective]:
        return [c for c in collectives if sizes.get(c.axis, 2) > 1]

    state.step = []
    for pp_rank in range(par.pp):
        stages = stage_ranks(par.pp, par.pipeline.virtual_stages, pp_rank, par.pipeline.schedule)
        actions: list[StepAction] = []
        if tied:
            mine = [s for s in (0, last) if s in stages]
            if len(mine) == 1:  # the first and the last stage are on different pipeline ranks (not zbv's V)
                embed = state.params["embed.weight"]
                shape = [chunk_size(embed.local_numel, embed.zero.parts)] if zero >= 2 else embed.local_shape
                what = "the tied embedding's gradient, with the other copy's stage"
                pair = [Collective("send", "pp", "embed.weight", what, shape, d.params),
                        Collective("recv", "pp", "embed.weight", what, shape, d.params)]
                # the first stage sends first, the last receives first: each send meets its receive at once
                # (two sends first can deadlock where a send waits for its receive, as NCCL's large ones do)
                actions.append(StepAction("SUM_TIED_GRAD", mine[0], params=["embed.weight"],
                                          collectives=pair if mine[0] == 0 else pair[::-1]))
        sites = [i for s in stages for i in range(*state.stage_bounds[s]) if spec.model.is_moe(i)]
        if sites:
            actions.append(StepAction("REDUCE_ROUTER_STATS", collectives=live(Collective(
                "all_reduce", "stage", "routers", "loads and k histograms of the rank's MoE layers",
                [len(sites), stats], "float64"))))
        actions.append(StepAction("CLIP_GRAD_NORM", collectives=live(Collective(
            "all_reduce", "world", "gradients", "squared gradient norm", [], "float64"))))
        actions.append(StepAction("OPTIMIZER_STEP"))
        if zero in (1, 2):
            for s in stages:
                for axis in ("dp", "edp"):
                    names = [n for n, p in state.params.items()
                             if owner(p, s, par.pp, par.pipeline.schedule) == s and p.zero.axis == axis]
                    if names and sizes[axis] > 1:
                        chunk = sum(chunk_size(state.params[n].local_numel, sizes[axis]) for n in names)
                        actions.append(StepAction("UNSHARD", s, params=names, collectives=[Collective(
                            "all_gather", axis, "parameters", f"{len(names)} updated pieces", [chunk], d.params)]))
        if sites:
            actions.append(StepAction("UPDATE_BIAS"))
        every_stage = (live(Collective("all_reduce", "world", "routers", "router statistics of every stage",
                                       [len(spec.model.moe_layers), stats], "float64"))
                       if moe and par.pp > 1 else [])
        actions.append(StepAction("REDUCE_METRICS", collectives=live(
            Collective("all_reduce", "world", "loss", "summed cross-entropy", [], "float64"),
            Collective("all_reduce_max", "world", "memory", "peak, model-state and other bytes", [3], "float64"),
        ) + every_stage))
        state.step.append(actions)
