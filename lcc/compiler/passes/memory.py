"""Memory: ZeRO over dp (dense parameters) and edp (experts), and activation recomputation.

ZeRO 1 shards the optimizer states, 2 also the gradients (reduce-scattered instead of all-reduced), 3
also the parameters: each function of a program all-gathers its parameters just before use (an all-gather
whose backward reduce-scatters the gradient), prefetching the next function's. ZeRO 2 and 3
reduce-scatter once per step, the gradients accumulating whole over the micro-batches, when the cost
model finds every rank fits with them (`grad_reduce: step`), else in every micro-batch's backward.
Activation checkpointing `selective` recomputes each layer's attention core and its routing and dispatch
in backward; `full` keeps only each layer's input and recomputes the layer. Serve plans use neither.
"""

from __future__ import annotations

from lcc.compiler.cost.model import CostModel
from lcc.compiler.dims import dims, precision
from lcc.compiler.state import FUNCTION_START, REGION_START, CompileState
from lcc.compiler.trace import layer_of
from lcc.plan.types import Collective, Memory, Zero, chunk_size

NAME = "memory"
DESCRIPTION = ("ZeRO 1-3 over dp (dense) and edp (experts): optimizer states, gradients, parameters sharded; "
               "ZeRO-3 all-gathers per function with prefetch; activation recomputation regions")

RECOMPUTED = {"none": [], "selective": ["attention core", "routing and dispatch (MoE layers)"],
              "full": ["each layer (only its input is kept)"]}


def functions(state: CompileState, stage: int, selective: bool) -> list[tuple[str, str, list[str]]]:
    """The program functions of a stage that use parameters, in call order: (name, first call site,
    parameters). A layer's routing is a function of its own (`layer_3_routing`) under selective
    checkpointing; a tied head's LM head uses the embedding."""
    a, b = state.stage_bounds[stage]
    model = state.spec.model
    out: list[tuple[str, str, list[str]]] = []
    if stage == 0:
        out.append(("embedding", "embed", ["embed.weight"]))
    for i in range(a, b):
        mine = [n for n, p in state.params.items() if layer_of(n) == i]
        routing = [n for n in mine if ".ffn.router." in n] if selective else []
        out.append((f"layer_{i}", f"layers.{i}", [n for n in mine if n not in routing]))
        if routing:
            out.append((f"layer_{i}_routing", f"layers.{i}.ffn.router", routing))
    if stage == state.last_stage:
        out.append(("lm_head", "norm", ["norm.weight", "embed.weight" if model.tie_embeddings else "head.weight"]))
    return out


def run(state: CompileState) -> None:
    par = state.spec.parallelism
    train = state.mode == "train"
    zero = par.zero if train else 0
    recompute = par.activation_checkpointing if train else "none"
    parts = {"dp": par.dp, "edp": par.edp}
    if zero:
        for info in state.params.values():
            axis = "edp" if info.expert else "dp"
            info.zero = Zero(axis, parts[axis])
    if zero >= 3:
        for stage in range(len(state.stage_bounds)):
            _gathers(state, stage, recompute == "selective")
    sharded = ["optimizer states", "gradients", "parameters"][:zero]
    params_dtype, compute_dtype = precision(state.spec, state.mode)
    regathered = (["ZeRO-3 parameters"] if zero >= 3 else []) + (
        ["sequence-parallel inputs of column-parallel layers"]
        if par.sequence_parallel and par.tp > 1 and train and params_dtype == compute_dtype else [])
    when = CostModel(state.spec).grad_reduce_when if zero >= 2 else "step"
    state.memory = Memory(zero, recompute, RECOMPUTED[recompute], sharded,
                          "all_gather of the updated parameter shards" if zero in (1, 2) else None, regathered, when)


def _gathers(state: CompileState, stage: int, selective: bool) -> None:
    """ZeRO-3: a function's first line all-gathers its parameters, one collective per ZeRO axis (what the
    previous function prefetched is only waited for); the next line starts the next function's gathers.
    In backward each gather's bucket is gathered again (by recomputation or for a saved use; the
    embedding lookup saves none) and its gradients reduce-scattered."""
    dtype = dims(state.spec, state.mode).params

    def collectives(fn: str, names: list[str]) -> tuple[list[Collective], list[Collective]]:
        gather, scatter = [], []
        for axis in ("dp", "edp"):
            mine = [state.params[n] for n in names if state.params[n].zero.axis == axis]
            n_parts = mine[0].zero.parts if mine else 1
            if n_parts == 1:
                continue
            chunk = sum(chunk_size(p.local_numel, n_parts) for p in mine)
            what = f"ZeRO-3: {len(mine)} parameters of {fn}"
            gather.append(Collective("all_gather", axis, fn, what, [chunk], dtype))
            scatter.append(Collective("reduce_scatter", axis, fn, what + ": gradients", [chunk * n_parts], dtype))
        return gather, scatter

    fns = functions(state, stage, selective)
    top = [f for f in fns if not f[0].endswith("_routing")]
    for name, site, names in fns:
        gather, scatter = collectives(name, names)
        if name.endswith("_routing"):  # gathered where the routing function starts, never prefetched
            if gather:
                state.add(stage, site, REGION_START, "zero_gather", gather, scatter + gather, region="routing",
                          function=name)
            continue
        k = top.index((name, site, names))
        if gather:  # an embedding lookup saves no weight for backward: nothing to gather again
            again = [] if name == "embedding" else gather
            state.add(stage, site, FUNCTION_START, "zero_gather", gather if k == 0 else [], scatter + again,
                      function=name)
        if k + 1 < len(top):
            nxt = top[k + 1]
            ahead, _ = collectives(nxt[0], nxt[2])
            if ahead:
                state.add(stage, site, FUNCTION_START, "zero_prefetch", ahead, function=nxt[0])
