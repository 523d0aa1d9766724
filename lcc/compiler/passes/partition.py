"""Pipeline partition: layers onto pp x virtual stages, balanced by the cost model's time per layer."""

from __future__ import annotations

from lcc.compiler.cost import CostModel
from lcc.compiler.state import CompileState, ParamInfo
from lcc.compiler.trace import layer_of

NAME = "partition"
DESCRIPTION = "split layers into pipeline stages balanced by estimated time (embedding first, head last)"


def run(state: CompileState) -> None:
    cm = CostModel(state.spec)
    bounds = cm.stage_bounds
    state.stage_bounds = list(bounds)
    last = len(bounds) - 1
    stage_of_layer = {i: s for s, (a, b) in enumerate(bounds) for i in range(a, b)}
    tied = state.spec.model.tie_embeddings
    for name, p in state.graph.named_parameters(remove_duplicate=True):
        layer = layer_of(name)
        if layer is not None:
            stages = [stage_of_layer[layer]]
        elif name.startswith("embed."):
            stages = [0] if not tied or last == 0 else [0, last]  # a tied head on another stage keeps a copy
        else:  # final norm, LM head
            stages = [last]
        state.params[name] = ParamInfo(name, tuple(p.shape), stages)
    state.plan["partition"] = {"stage_layers": [list(b) for b in bounds],
                               "stage_imbalance": cm.stage_imbalance()}
