"""One training step of a plan timed with its communication: a compute stream and a communication stream per
pipeline rank, in seconds from the cost model (`lcc plan export --format perfetto`, tracks `timed compute`
and `comm`; docs/inspect.md).

The schedule simulator (lcc.compiler.schedule) orders a step's actions in cost units; this replays that
order with each action's own durations. A compute action (F, B, or a zero-bubble schedule's I and W) of a
stage and micro-batch runs, layer by layer, its share of the layers' rooflines and the collectives its
programs issue there, as the cost model prices them (bandwidth plus one latency per collective):

- forward: each layer's tensor-parallel collectives, then an MoE layer's dispatch, experts and combine; with
  `expert_overlap` the two halves of lcc.compiler.cost.overlap (B's dispatch beside A's experts, A's combine
  beside B's), the only communication that overlaps compute;
- backward (B, or I): recomputation's exchanges, the combine's and the dispatch's transposes, the
  tensor-parallel ones, around the backward's compute; a W only computes;
- ZeRO-3's parameter gathers at the start of each F and B of a stage, and its reduce-scatters after B when
  gradients are reduced every micro-batch;
- a pipeline receive waits until the sender's compute is done and the rank has reached it, then the
  transfer (the runtime's blocking receive); sends complete without waiting (isend);
- the gradient reduction of a stage after its last backward (the runtime's REDUCE_GRAD waits for it), and
  after the pipeline the parameter gathers of ZeRO 1 and 2 and the step's own collectives.

Every collective but the overlapped halves makes the compute wait: the gaps of a `timed compute` track are
communication, the bubble, and waiting for other ranks. The simulated step is the last rank's end; it
differs from the report's analytic estimate (`time.step_seconds_estimate`), which stretches every rank's
communication by the bubble alike.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lcc.actions import Action
from lcc.compiler.cost.exchange import exchange_passes
from lcc.compiler.cost.model import CostModel, Role
from lcc.compiler.cost.overlap import halves
from lcc.compiler.cost.work import act_bytes, expert_forward, layer_collectives
from lcc.compiler.schedule import simulate
from lcc.plan.types import Plan
from lcc.spec.models import Spec

TRACKS = {"timed compute": 5, "comm": 6}  # thread ids beside lcc.inspect.export's


@dataclass(frozen=True)
class Span:
    pp: int
    track: str  # timed compute | comm
    name: str
    start: float
    end: float
    hidden: bool = False  # communication that runs beside compute


@dataclass
class Block:
    """A piece of an action: compute, a collective the compute waits for, or the overlapped MoE forward."""

    kind: str  # compute | comm | halves
    name: str
    seconds: float = 0.0
    parts: tuple[float, float, float] = (0.0, 0.0, 0.0)  # halves: one half's dispatch, combine, experts


class _Prices:
    """Per stage and micro-batch, the blocks of each kind of action, from the cost model."""

    def __init__(self, cm: CostModel):
        self.cm, self.par = cm, cm.par
        self.passes = exchange_passes(self.par.activation_checkpointing)[0]
        self.recompute = self.par.activation_checkpointing

    def _layer(self, layer: int) -> dict[str, Any]:
        cm, spec = self.cm, self.cm.spec
        comm = cm.layer_bytes(layer)
        c = layer_collectives(spec, layer)
        net = spec.cluster.network
        forwards = 2 if self.recompute == "full" else 1
        tp = (cm.ring_seconds("tp", comm.tp) + c.tp * cm.latency("tp")) / (forwards + 1)  # per pass
        ep_lat = c.ep * cm.latency("ep") + c.ep_intra * 1e-6 * net.intra_node_latency_us
        ep = (cm.alltoall_seconds(comm.ep) + ep_lat) / self.passes if comm.ep else 0.0
        w = cm.layer_work(layer).seconds
        share = _shares(spec, layer)
        flops, reads = expert_forward(spec, layer, 0.5 if self._halved(layer) else 1.0)
        experts = max(flops / cm.peak, reads / cm.bandwidth)
        return {"w": w, "share": share, "tp": tp, "ep": ep, "experts": experts, "moe": spec.model.is_moe(layer)}

    def _halved(self, layer: int) -> bool:
        return self.par.expert_overlap and self.par.ep > 1 and self.cm.spec.model.is_moe(layer)

    def forward_blocks(self, layer: int) -> list[Block]:
        return [Block(b.kind, f"layer {layer} {b.name}", b.seconds, b.parts) for b in self._forward(layer)]

    def _forward(self, layer: int) -> list[Block]:
        p = self._layer(layer)
        forward = p["w"] * p["share"][0]
        if not p["moe"] or not p["ep"]:
            return [Block("compute", "forward", forward), Block("comm", "tp collectives", p["tp"])]
        if self._halved(layer):
            rest = max(forward - 2 * p["experts"], 0.0)
            return [Block("compute", "forward", rest), Block("comm", "tp collectives", p["tp"]),
                    Block("halves", "experts", parts=(p["ep"] / 2, p["ep"] / 2, p["experts"]))]
        rest = max(forward - p["experts"], 0.0)
        return [Block("compute", "forward", rest), Block("comm", "tp collectives", p["tp"]),
                Block("comm", "dispatch", p["ep"]), Block("compute", "experts", p["experts"]),
                Block("comm", "combine", p["ep"])]

    def backward_blocks(self, layer: int, kind: str) -> list[Block]:
        """B, or I (the input gradient, with all of the backward's communication) or W (compute only)."""
        return [b if b.name.startswith("layer") else Block(b.kind, f"layer {layer} {b.name}", b.seconds, b.parts)
                for b in self._backward(layer, kind)]

    def _backward(self, layer: int, kind: str) -> list[Block]:
        p = self._layer(layer)
        _, back, recomputed = p["share"]
        if kind == "W":
            return [Block("compute", "weight gradients", p["w"] * back / 2)]
        compute = p["w"] * (back / 2 if kind == "I" else back)
        blocks = []
        if self.recompute == "full":  # the forward again, with its collectives
            blocks += [b if b.kind != "compute" else
                       Block("compute", f"layer {layer} recompute", b.seconds * recomputed)
                       for b in self.forward_blocks(layer)]
        elif self.recompute == "selective" and p["ep"]:
            blocks.append(Block("comm", "dispatch (recomputed)", p["ep"]))
        if p["ep"]:
            blocks += [Block("comm", "combine (transpose)", p["ep"]), Block("compute", "backward", compute / 2),
                       Block("comm", "dispatch (transpose)", p["ep"]), Block("comm", "tp collectives", p["tp"]),
                       Block("compute", "backward", compute / 2)]
        else:
            blocks += [Block("comm", "tp collectives", p["tp"]), Block("compute", "backward", compute)]
        return blocks


def _shares(spec: Spec, layer: int) -> tuple[float, float, float]:
    """(forward, backward, recomputed forward per forward) shares of a layer's roofline, by FLOPs: backward is
    twice the forward plus what recomputation repeats (lcc.compiler.cost.work)."""
    from lcc.compiler.cost.work import layer_forward_flops, recompute_flops

    f, r = layer_forward_flops(spec, layer), recompute_flops(spec, layer)
    total = 3 * f + r
    return f / total, (2 * f + r) / total, r / f if f else 0.0


class _Streams:
    """One pipeline rank's compute and communication streams while blocks run."""

    def __init__(self, pp: int, spans: list[Span]):
        self.pp, self.spans = pp, spans
        self.compute = self.comm = 0.0

    def run(self, blocks: list[Block], start: float, label: str) -> float:
        t = max(self.compute, start)
        for b in blocks:
            if b.kind == "compute" and b.seconds > 0:
                self.spans.append(Span(self.pp, "timed compute", f"{b.name} {label}", t, t + b.seconds))
                t += b.seconds
            elif b.kind == "comm" and b.seconds > 0:
                s = max(t, self.comm)
                self.spans.append(Span(self.pp, "comm", f"{b.name} {label}", s, s + b.seconds))
                t = self.comm = s + b.seconds
            elif b.kind == "halves":
                s = max(t, self.comm)
                parts = halves(*b.parts)
                layer = b.name.removesuffix("experts").strip()  # "layer 3"
                for p in parts:
                    track = "comm" if p.stream == "comm" else "timed compute"
                    hidden = p.stream == "comm" and p.name in ("dispatch B", "combine A")
                    self.spans.append(Span(self.pp, track, f"{layer} {p.name} {label}".strip(), s + p.start,
                                           s + p.end, hidden))
                t = self.comm = s + max(p.end for p in parts)
        self.compute = t
        return t

    def transfer(self, ready: float, seconds: float, name: str) -> float:
        """A blocking receive: from when the data is sent and the rank has reached it, on the comm stream."""
        s = max(self.compute, ready, self.comm)
        self.spans.append(Span(self.pp, "comm", name, s, s + seconds))
        self.compute = self.comm = s + seconds
        return self.compute


@dataclass
class CommTimeline:
    spans: list[Span]
    seconds: float  # the simulated step: the last rank's end


def comm_timeline(plan: Plan, spec: Spec) -> CommTimeline:
    cm = CostModel(spec)
    prices = _Prices(cm)
    par = cm.par
    kind = plan.schedule.kind
    actions = [[Action.parse(a) for a in rank] for rank in plan.schedule.actions]
    actions = [[a for a in rank if a.mb is not None] for rank in actions]
    events: list[tuple[int, Action, int, int]] = []
    simulate(actions, plan.schedule.n_stages, plan.schedule.microbatches, events, placement=kind)
    roles = {r.pp_rank: r for r in cm.roles}
    bounds = cm.stage_bounds
    spans: list[Span] = []
    streams = [_Streams(r, spans) for r in range(par.pp)]
    per_stage = {s: _stage(cm, prices, roles[r], s, bounds) for r in roles for s in roles[r].stages}
    activation = cm.tokens * spec.model.d_model * act_bytes(spec) / (par.tp if par.sequence_parallel else 1)
    hop = cm.ring_seconds("pp", activation) + cm.latency("pp")
    last_grad = {}  # (rank, stage) -> index of the action after which its gradients are complete
    for i, (r, a, _, _) in enumerate(events):
        if a.kind in ("B", "W"):
            last_grad[(r, a.stage)] = i
    done: dict[tuple[str, int, int], float] = {}
    arrived: dict[tuple[str, int, int], float] = {}
    for i, (r, a, _, _) in enumerate(events):
        st = streams[r]
        label = f"stage {a.stage} mb {a.mb}"
        if a.kind in ("RECV_F", "RECV_B"):
            forward = a.kind == "RECV_F"
            source = ("F", a.stage - 1, a.mb) if forward else _grad(done, a.stage + 1, a.mb)
            arrived[("F" if forward else "B", a.stage, a.mb)] = st.transfer(
                done[source], hop, f"recv {'activations' if forward else 'gradients'} {label}")
            continue
        if a.kind.startswith("SEND"):
            continue
        blocks = per_stage[a.stage][a.kind]
        ready = _ready(a, done, arrived, plan.schedule.n_stages)
        if a.kind in ("B", "I", "F") and par.zero >= 3:
            blocks = [Block("comm", "ZeRO-3 gather", per_stage[a.stage]["gather"]), *blocks]
        end = st.run(blocks, ready, label)
        done[(a.kind, a.stage, a.mb)] = end
        if a.kind in ("B", "W") and per_stage[a.stage]["scatter"]:
            st.run([Block("comm", "gradient reduce-scatter", per_stage[a.stage]["scatter"])], end, label)
        if last_grad.get((r, a.stage)) == i and per_stage[a.stage]["reduce"]:
            st.run([Block("comm", "gradient reduction", per_stage[a.stage]["reduce"])], end, f"stage {a.stage}")
    for r, st in enumerate(streams):
        after = _after(cm, roles[r])
        st.run([Block("comm", "after the pipeline: parameter gathers, step collectives", after)], st.compute, "")
    return CommTimeline(sorted(spans, key=lambda s: (s.pp, s.track, s.start)),
                        max((s.compute for s in streams), default=0.0))


def _grad(done: dict, stage: int, mb: int) -> tuple[str, int, int]:
    return ("B", stage, mb) if ("B", stage, mb) in done else ("I", stage, mb)


def _ready(a: Action, done: dict, arrived: dict, n_stages: int) -> float:
    """When a compute action's inputs exist (the simulator's dependencies), in seconds."""
    if a.kind == "W":
        return done[("I", a.stage, a.mb)]
    if a.kind == "F":
        if a.stage == 0:
            return 0.0
        return arrived.get(("F", a.stage, a.mb), done.get(("F", a.stage - 1, a.mb), 0.0))
    own = done[("F", a.stage, a.mb)]
    if a.stage == n_stages - 1:
        return own
    grad = arrived.get(("B", a.stage, a.mb))
    if grad is None:
        grad = done[_grad(done, a.stage + 1, a.mb)]
    return max(own, grad)


def _stage(cm: CostModel, prices: _Prices, role: Role, stage: int, bounds: list) -> dict[str, Any]:
    """The blocks of each action kind of one stage and micro-batch, and its per-micro-batch ZeRO-3 gather,
    reduce-scatter and end-of-step gradient reduction seconds (the rank's, by the stage's share of its
    layers)."""
    a, b = bounds[stage]
    layers = range(a, b)
    out: dict[str, Any] = {"F": [], "B": [], "I": [], "W": []}
    for i in layers:
        out["F"] += prices.forward_blocks(i)
    for i in reversed(layers):
        for kind in ("B", "I", "W"):
            out[kind] += prices.backward_blocks(i, kind)
    if stage == cm.par.n_stages - 1:  # the LM head: a third forward, two thirds backward
        head = cm.head_work().seconds
        out["F"].append(Block("compute", "head", head / 3))
        out["B"].insert(0, Block("compute", "head backward", 2 * head / 3))
        out["I"].insert(0, Block("compute", "head backward", head / 3))
        out["W"].insert(0, Block("compute", "head weight gradients", head / 3))
    share = (b - a) / max(len(role.layers), 1)
    c = cm.role_comm(role)
    dense = cm.dense_share(role)

    def seconds(kind: str) -> float:
        return cm.ring_seconds("dp", c[kind] * dense) + cm.ring_seconds("edp", c[kind] * (1 - dense))

    per_microbatch = cm.par.zero >= 2 and cm.grad_reduce_when == "microbatch"
    out["gather"] = seconds("param_gather") * share / (2 * cm.m) if cm.par.zero >= 3 else 0.0
    out["scatter"] = seconds("grad_reduce") * share / cm.m if per_microbatch else 0.0
    out["reduce"] = 0.0 if per_microbatch else seconds("grad_reduce") * share
    return out


def _after(cm: CostModel, role: Role) -> float:
    """What follows the pipeline on this rank: ZeRO 1-2's parameter gathers and the step's collectives."""
    c = cm.role_comm(role)
    dense = cm.dense_share(role)
    gathers = 0.0
    if cm.par.zero in (1, 2):
        gathers = (cm.ring_seconds("dp", c["param_gather"] * dense)
                   + cm.ring_seconds("edp", c["param_gather"] * (1 - dense)))
    return gathers + cm.role_latency(role)[1]


def comm_trace(plan: Plan, spec_text: str, us: Callable[[float], float]) -> tuple[list[dict], dict[str, Any]]:
    """Trace events (thread names and complete events, pid = pipeline rank + 1) of the step timed with its
    communication, and what the trace's otherData says of it."""
    tl = comm_timeline(plan, Spec.model_validate(json.loads(spec_text)))
    events: list[dict] = []
    for r in range(plan.mesh.size("pp")):
        for track, tid in TRACKS.items():
            events.append({"ph": "M", "name": "thread_name", "pid": r + 1, "tid": tid, "args": {"name": track}})
            events.append({"ph": "M", "name": "thread_sort_index", "pid": r + 1, "tid": tid,
                           "args": {"sort_index": tid}})
    for s in tl.spans:
        cat = "timed" if s.track == "timed compute" else ("comm hidden" if s.hidden else "comm")
        events.append({"ph": "X", "name": s.name, "cat": cat, "pid": s.pp + 1, "tid": TRACKS[s.track],
                       "ts": us(s.start), "dur": round(us(s.end) - us(s.start), 3), "args": {"hidden": s.hidden}})
    return events, {"simulated_step_seconds": tl.seconds, "simulated_hidden_communication_seconds": beside(tl)}


def beside(tl: CommTimeline) -> float:
    """Seconds a rank's communication runs beside its compute, on the rank where it does most."""
    most = 0.0
    for r in {s.pp for s in tl.spans}:
        comm = [s for s in tl.spans if s.pp == r and s.track == "comm"]
        compute = [s for s in tl.spans if s.pp == r and s.track == "timed compute"]
        both, j = 0.0, 0
        for c in comm:  # both lists are sorted by start and neither overlaps itself
            while j < len(compute) and compute[j].end <= c.start:
                j += 1
            k = j
            while k < len(compute) and compute[k].start < c.end:
                both += max(0.0, min(c.end, compute[k].end) - max(c.start, compute[k].start))
                k += 1
        most = max(most, both)
    return most
