"""Memory: ZeRO over dp (dense parameters) and edp (experts), and activation recomputation.

ZeRO 1 shards the optimizer states, 2 also the gradients (reduce-scattered instead of all-reduced), 3
also the parameters: each function of a program all-gathers its parameters just before use (an all-gather
whose backward reduce-scatters the gradient), prefetching the next function's. Activation checkpointing
`selective` recomputes each layer's attention core and its routing and dispatch in backward; `full`
keeps only each layer's input and recomputes the layer. Serve plans use neither.
"""

from __future__ import annotations

from lcc.compiler.state import CompileState
from lcc.compiler.trace import layer_of

NAME = "memory"
DESCRIPTION = ("ZeRO 1-3 over dp (dense) and edp (experts): optimizer states, gradients, parameters sharded; "
               "ZeRO-3 all-gathers per function with prefetch; activation recomputation regions")

RECOMPUTED = {"none": [], "selective": ["attention core", "routing and dispatch (MoE layers)"],
              "full": ["each layer (only its input is kept)"]}


def gather_site(name: str, stage: int, last: int) -> str:
    """The program function that all-gathers parameter `name` on `stage` (a site of the traced graph)."""
    layer = layer_of(name)
    if layer is not None:
        return f"layers.{layer}"
    if name == "embed.weight" and stage == 0:
        return "embed"
    return "head" if stage == last else "embed"


def run(state: CompileState) -> None:
    par = state.spec.parallelism
    train = state.mode == "train"
    zero = par.zero if train else 0
    recompute = par.activation_checkpointing if train else "none"
    parts = {"dp": par.dp, "edp": par.edp}
    if zero:
        for info in state.params.values():
            axis = "edp" if info.expert else "dp"
            info.zero = {"axis": axis, "parts": parts[axis]}
    if zero >= 3:
        last = len(state.stage_bounds) - 1
        counts: dict[tuple[int, str, str], int] = {}
        for name, info in state.params.items():
            for stage in info.stages:
                key = (stage, gather_site(name, stage, last), info.zero["axis"])
                counts[key] = counts.get(key, 0) + 1
        for (stage, site, axis), n in sorted(counts.items()):
            if parts[axis] > 1:
                state.collectives.setdefault(stage, []).append(
                    {"site": site, "op": "all_gather", "axis": axis, "zero": True, "calls": n,
                     "what": f"ZeRO-3: {n} parameters, before use (prefetched)"})
    state.plan["memory"] = {
        "zero": zero, "activation_checkpointing": recompute, "recomputed": RECOMPUTED[recompute],
        "sharded": ["optimizer states", "gradients", "parameters"][:zero],
        "after_step": "all_gather of the updated parameter shards" if zero in (1, 2) else None,
    }
