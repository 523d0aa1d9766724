"""What generated programs receive as `ctx`: the rank's TP index, the routing settings, where router
results go, and the state of recomputation and ZeRO-3 prefetching."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from lcc.model.routing import RouteResult


@dataclass
class ProgramContext:
    routing: Any
    tp_rank: int = 0
    routes: dict[str, list[RouteResult]] = field(default_factory=dict)
    recomputing: bool = False  # true while activation checkpointing reruns a function in backward
    prefetched: dict[str, Any] = field(default_factory=dict)  # ZeRO-3: parameter -> (buffer, pending gather)
    # ZeRO-3 reducing once per step: true in a stage's backwards before its last, whose gathers' gradients
    # accumulate whole (by gathered parameters) instead of being reduce-scattered
    accumulating: bool = False
    held_grads: dict[tuple[str, ...], Any] = field(default_factory=dict)
    # train.data.document_mask: the document of each position of the micro-batch being run (int64 [B, S]); set
    # by the runtime before each forward and backward action, read by the attention lines
    segments: Any = None

    @torch.compiler.disable
    def observe(self, site: str, route: RouteResult) -> None:
        """Record a router call's result (loads, k per token, losses); a recomputation records nothing,
        so every token counts once in the load-bias update and the statistics. Never traced by torch.compile
        (train.compile): a traced append would guard on the list's length and recompile every micro-batch."""
        if not self.recomputing:
            self.routes.setdefault(site, []).append(route)
