"""What the passes share: the spec, the traced graph, and the plan's typed pieces decided so far.

Communication is recorded as `Comm`s: one per program line that communicates (or whose autograd rule
does), with the collectives that line issues in forward and in backward. A comm's `key` places it
among the stage's lines: the graph position of its call site, then a phase (before the call, the call,
after it), so that a stage's comms sorted by key are in the order its program issues them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from lcc.plan.types import Buffer, Collective, Experts, GradBucket, Memory, Parameter, Partition, Pass, StepAction
from lcc.spec.models import Spec

# phases of a comm at its call site, in issue order
FUNCTION_START = -3  # ZeRO-3 gathers and prefetches at the start of a program function
BEFORE = -2  # entering a region: copy_to_tp, split_tokens, the dispatch all-to-all
REGION_START = -1  # ZeRO-3 gathers at the start of a recomputed region's function
AT = 0
AFTER = 1
LOSS_POSITION = 1 << 30  # the loss runs after the last stage's forward


@dataclass
class Comm:
    key: tuple[int, int, int]  # (graph position, phase, order within the phase)
    line: str  # the lcc.ops function of the program line
    forward: list[Collective]
    backward: list[Collective] = field(default_factory=list)
    region: str | None = None  # what selective checkpointing recomputes: "routing"
    function: str | None = None  # ZeRO-3: the program function whose parameters it gathers
    dim: int | None = None  # sequence parallelism: the dimension it gathers or scatters


@dataclass
class CompileState:
    spec: Spec
    mode: str  # "train" | "serve"
    graph: fx.GraphModule
    params: dict[str, Parameter] = field(default_factory=dict)
    buffers: list[Buffer] = field(default_factory=list)
    stage_bounds: list[tuple[int, int]] = field(default_factory=list)
    comms: dict[int, list[Comm]] = field(default_factory=dict)  # stage -> its comms (sorted when read)
    buckets: dict[int, list[GradBucket]] = field(default_factory=dict)
    experts: Experts | None = None
    partition: Partition | None = None
    memory: Memory | None = None
    step: list[list[StepAction]] = field(default_factory=list)  # per pipeline rank, after the last backward
    applied: list[Pass] = field(default_factory=list)
    _positions: dict[str, int] | None = None

    def position(self, site: str) -> int:
        """Graph position of a call site; for a block (`layers.0.ffn`), of its first call."""
        if self._positions is None:
            self._positions = {str(n.target): i for i, n in enumerate(self.graph.graph.nodes)
                               if n.op == "call_module"}
        exact = self._positions.get(site)
        if exact is not None:
            return exact
        inside = [i for t, i in self._positions.items() if t.startswith(site + ".")]
        if not inside:
            raise KeyError(f"no call site {site!r} in the traced graph")
        return min(inside)

    def add(self, stage: int, site: str, phase: int, line: str, forward: list[Collective],
            backward: list[Collective] | None = None, region: str | None = None, function: str | None = None,
            position: int | None = None, dim: int | None = None) -> None:
        comms = self.comms.setdefault(stage, [])
        if self.mode == "serve":  # inference: no backward
            backward = []
        pos = self.position(site) if position is None else position
        order = sum(1 for c in comms if c.key[:2] == (pos, phase))
        comms.append(Comm((pos, phase, order), line, forward, backward or [], region, function, dim))

    def stage_comms(self, stage: int) -> list[Comm]:
        return sorted(self.comms.get(stage, []), key=lambda c: c.key)

    def stage_of_layer(self) -> dict[int, int]:
        return {i: s for s, (a, b) in enumerate(self.stage_bounds) for i in range(a, b)}

    @property
    def last_stage(self) -> int:
        return len(self.stage_bounds) - 1
