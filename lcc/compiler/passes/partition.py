"""Pipeline partition: layers onto pp x virtual stages, balanced by the cost model's time per layer."""

from __future__ import annotations

from lcc.compiler.cost import CostModel
from lcc.compiler.layout import partition
from lcc.compiler.state import CompileState
from lcc.compiler.trace import layer_of
from lcc.plan.types import Buffer, Parameter, Partition

NAME = "partition"
DESCRIPTION = "split layers into pipeline stages balanced by estimated time (embedding first, head last)"


def run(state: CompileState) -> None:
    spec = state.spec
    cm = CostModel(spec)
    costs = [cm.layer_seconds(i) for i in range(spec.model.n_layers)]
    costs[-1] += cm.head_seconds()
    bounds = partition(costs, spec.parallelism.n_stages)
    state.stage_bounds = list(bounds)
    times = [sum(costs[a:b]) for a, b in bounds]
    last = len(bounds) - 1
    stage_of_layer = state.stage_of_layer()
    tied = spec.model.tie_embeddings
    for name, p in state.graph.named_parameters(remove_duplicate=True):
        layer = layer_of(name)
        if layer is not None:
            stages = [stage_of_layer[layer]]
        elif name.startswith("embed."):
            stages = [0] if not tied or last == 0 else [0, last]  # a tied head on another stage keeps a copy
        else:  # final norm, LM head
            stages = [last]
        state.params[name] = Parameter(name, list(p.shape), list(p.shape), stages)
    for name, b in state.graph.named_buffers():
        state.buffers.append(Buffer(name, list(b.shape), str(b.dtype).removeprefix("torch."),
                                    [stage_of_layer[layer_of(name)]]))
    state.partition = Partition([list(b) for b in bounds], max(times) / (sum(times) / len(times)))
