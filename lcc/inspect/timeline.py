"""One step of a plan's pipeline schedule as timed slices: the schedule simulator's timeline (the same run
that measured the plan's bubble), in seconds from the cost model.

A compute unit (a forward of one stage and micro-batch; a backward is two, its input-gradient half I and its
weight-gradient half W one each) lasts the rank's compute time per step over its busy units (serve plans:
the report's memory-bound decode step over the stages); a send or receive lasts the boundary activation's
bytes over the pipeline link's bandwidth. Gaps on a rank's compute track are its share of the bubble: busy
plus idle is the step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lcc.actions import Action, stage_rank
from lcc.compiler.schedule import COST, simulate
from lcc.inspect.ranks import RankIndex, dtype_bytes
from lcc.plan.types import Plan

# compute slices' names: "<name> stage s mb m"
NAMES = {"F": "forward", "B": "backward", "I": "backward input", "W": "backward weights"}


@dataclass(frozen=True)
class Slice:
    pp: int
    track: str  # compute | idle | send | recv
    name: str
    start: float  # seconds
    end: float
    stage: int | None = None
    mb: int | None = None
    peer: int | None = None  # send / recv: the other pipeline rank


@dataclass
class Timeline:
    slices: list[Slice]
    makespan: float  # seconds
    unit_seconds: float
    boundaries: dict[str, dict[str, Any]]  # "r-peer": the link between two pipeline ranks and one transfer's time


def timeline(plan: Plan, network: dict[str, float]) -> Timeline:
    """`network`: the spec's `cluster.network` (Gbit/s per device within and across nodes)."""
    pp, kind = plan.mesh.size("pp"), plan.schedule.kind
    actions = [[Action.parse(a) for a in rank] for rank in plan.schedule.actions]
    actions = [[a for a in rank if a.mb is not None] for rank in actions]  # REDUCE_GRAD: the step's, after it
    events: list[tuple[int, Action, int, int]] = []
    if plan.mode == "train":
        simulate(actions, plan.schedule.n_stages, plan.schedule.microbatches, events, placement=kind)
        units = plan.schedule.simulation.busy
    else:  # serve: one decode step's batch through the stages in order
        clock = 0
        for stage in range(plan.schedule.n_stages):
            home = stage_rank(stage, pp, kind)
            for a in (a for a in actions[home] if a.stage == stage):
                events.append((home, a, clock, clock + (COST["F"] if a.kind == "F" else 0)))
                clock += COST["F"] if a.kind == "F" else 0
        units = [COST["F"] * sum(a.kind == "F" for a in rank) for rank in actions]
    if plan.mode == "train":
        unit = plan.cost["time"]["compute_seconds"] / max(max(units), 1)
    else:  # the report's memory-bound decode step, shared by the stages
        unit = plan.cost["serve"]["decode_step"]["seconds"] / plan.schedule.n_stages
    index = RankIndex(plan)
    boundary = 1
    for d in plan.schedule.boundary_shape:  # serve: -1 tokens, a full step's max_batched_tokens
        boundary *= d if d >= 0 else plan.serving.max_batched_tokens
    nbytes = boundary * dtype_bytes(plan, "params" if plan.mode == "train" else plan.dtype)  # as the runtime sends

    def transfer(r: int, peer: int) -> tuple[float, str]:
        """Seconds and link of one boundary transfer between pipeline ranks r and peer, as their dp 0, tp 0
        ranks see it (`lcc plan show --rank` gives any other rank's own link)."""
        a, b = index.rank_of(r, 0, 0), index.rank_of(peer, 0, 0)
        link = "intra_node" if a // index.gpus == b // index.gpus else "inter_node"
        return nbytes / (network[f"{link.split('_')[0]}_node_gbps"] * 1e9 / 8), link

    slices, links = [], {}
    for r, a, start, end in events:
        if a.kind in COST:
            name = f"{NAMES[a.kind]} stage {a.stage} mb {a.mb}"
            slices.append(Slice(r, "compute", name, start * unit, end * unit, a.stage, a.mb))
        else:
            send = a.kind.startswith("SEND")
            peer = stage_rank(a.stage + (1 if a.kind in ("SEND_F", "RECV_B") else -1), pp, kind)
            what = "activations" if a.kind.endswith("_F") else "gradients"
            seconds, link = transfer(r, peer)
            links[f"{min(r, peer)}-{max(r, peer)}"] = {"link": link, "seconds": seconds}
            slices.append(Slice(r, "send" if send else "recv", f"{'send' if send else 'recv'} {what} mb {a.mb}",
                                start * unit, start * unit + seconds, a.stage, a.mb, peer))
    makespan = max((s.end for s in slices if s.track == "compute"), default=0.0)
    slices = _clip(slices) + _idle(slices, pp, makespan)
    return Timeline(sorted(slices, key=lambda s: (s.pp, s.track, s.start)), makespan, unit, dict(sorted(links.items())))


def _clip(slices: list[Slice]) -> list[Slice]:
    """A transfer track never overlaps itself: a transfer is cut where the rank's next one starts."""
    out = []
    by_track: dict[tuple[int, str], list[Slice]] = {}
    for s in slices:
        by_track.setdefault((s.pp, s.track), []).append(s)
    for (_, track), items in sorted(by_track.items()):
        items.sort(key=lambda s: s.start)
        for s, nxt in zip(items, [*items[1:], None], strict=True):
            end = s.end if track == "compute" or nxt is None else min(s.end, nxt.start)
            out.append(Slice(s.pp, s.track, s.name, s.start, end, s.stage, s.mb, s.peer))
    return out


def _idle(slices: list[Slice], pp: int, makespan: float) -> list[Slice]:
    """The gaps of each rank's compute track up to the step's end: its part of the bubble."""
    out = []
    for r in range(pp):
        t = 0.0
        for s in sorted((s for s in slices if s.pp == r and s.track == "compute"), key=lambda s: s.start):
            if s.start > t:
                out.append(Slice(r, "compute", "bubble (idle)", t, s.start))
            t = max(t, s.end)
        if t < makespan:
            out.append(Slice(r, "compute", "bubble (idle)", t, makespan))
    return out
