"""What the passes share: the spec, the traced graph, and the decisions made so far (plain data)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from lcc.spec.models import Spec


@dataclass
class ParamInfo:
    name: str
    shape: tuple[int, ...]
    stages: list[int] = field(default_factory=list)  # global stages that hold it (a tied head: two)
    shard: dict[str, Any] | None = None  # {"dim", "axis", "parts"}; None = replicated
    expert: bool = False
    grad_reduce: list[str] = field(default_factory=list)  # mesh axes its gradient is summed over
    serve: dict[str, Any] | None = None  # serve plans: stored format of the weight
    zero: dict[str, Any] | None = None  # ZeRO: {"axis": "dp" | "edp", "parts"}; None without ZeRO


@dataclass
class CompileState:
    spec: Spec
    mode: str  # "train" | "serve"
    graph: fx.GraphModule
    params: dict[str, ParamInfo] = field(default_factory=dict)
    stage_bounds: list[tuple[int, int]] = field(default_factory=list)
    collectives: dict[int, list[dict[str, Any]]] = field(default_factory=dict)  # stage -> forward collectives
    plan: dict[str, Any] = field(default_factory=dict)  # sections filled by passes
    applied: list[dict[str, str]] = field(default_factory=list)
