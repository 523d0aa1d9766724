"""A rank's own parameter shards, materialised from the deterministic initialisation.

Expert weights are drawn for this rank's experts only (values depend on (seed, name, expert id)), so a
rank never builds the experts it does not hold. Dense parameters are drawn whole and sliced: they are
small next to the experts.
"""

from __future__ import annotations

import torch

from lcc.model.build import init_values
from lcc.plan.types import Parameter, Plan
from lcc.spec.models import Spec


def local_parameters(spec: Spec, plan: Plan, coords: dict[str, int], sizes: dict[str, int],
                     dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The spec gives the initialisation (seed, std, schemes); the plan which slice of what this rank holds."""
    stages = {r.stage for r in plan.roles_of(coords["pp"])}
    out = {}
    for p in plan.parameters:
        if not stages & set(p.stages):
            continue
        shard, shape = p.shard, tuple(p.global_shape)
        if shard is not None and p.expert:
            per = shape[0] // shard.parts
            first = shard.part(coords, sizes) * per
            value = init_values(spec, p.name, shape, dtype, experts=range(first, first + per))
        else:
            value = init_values(spec, p.name, shape, dtype)
            if shard is not None:
                value = value.chunk(shard.parts, dim=shard.dim)[shard.part(coords, sizes)]
        out[p.name] = torch.nn.Parameter(value.contiguous())
    return out


def counts_once(p: Parameter, coords: dict[str, int], sizes: dict[str, int]) -> bool:
    """True on exactly one of the ranks holding each element of parameter p's gradient (for the global
    norm). With ZeRO the ranks along the ZeRO axis (edp for experts, dp for the rest) hold different pieces."""
    sharded = p.zero is not None
    if p.expert:
        return sharded or coords["edp"] == 0
    shard = p.shard
    tp_ok = coords["tp"] == 0 if shard is None else coords["tp"] % (sizes["tp"] // shard.parts) == 0
    return (sharded or coords["dp"] == 0) and tp_ok
