"""`lcc plan export`: the plan in other tools' formats.

- `onnx`: one model per role (lcc.inspect.onnx_export), `<role>.onnx` in the `--out` folder, or the
  `--role`'s model in the `--out` file.
- `perfetto`: the simulated step as Chrome / Perfetto trace JSON (Trace Event Format): one process per
  pipeline rank (pid = pipeline rank + 1: trace viewers treat pid 0 apart), named with its stages and
  ranks; threads for compute (forward, backward, and the bubble's idle time), sends and receives;
  complete events with durations from the cost model; a flow arrow from each send to its receive; the
  step actions after the pipeline on a thread of their own; a training step timed with its communication,
  compute and collectives on threads `timed compute` and `comm` (lcc.inspect.comm_timeline).
- `dot`: Graphviz: each pipeline rank's stages, the activations and gradients they send each other, and
  the collective groups a rank belongs to (size, link).
- `csv`: the compute schedule in torch.distributed.pipelining's notation (schedule.csv).
The same plan gives the same bytes.
"""

from __future__ import annotations

import json
from typing import Any

from lcc.inspect.comm_timeline import comm_trace
from lcc.inspect.ranks import RankIndex
from lcc.inspect.target import Target
from lcc.inspect.timeline import Slice, timeline

FORMATS = ("onnx", "perfetto", "dot", "csv")
TRACKS = {"compute": 1, "send": 2, "recv": 3, "step": 4}


def _us(seconds: float) -> float:
    return round(seconds * 1e6, 3)


def _ranks_of_pp(plan: Any, pp: int) -> str:
    per = plan.mesh.size("stage")
    return f"ranks {pp * per}-{(pp + 1) * per - 1}" if per > 1 else f"rank {pp}"


def perfetto(target: Target) -> str:
    plan = target.plan
    spec = json.loads(target.text("spec.json"))
    tl = timeline(plan, spec["cluster"]["network"])
    pp = plan.mesh.size("pp")
    events: list[dict[str, Any]] = []
    for r in range(pp):
        stages = [role.stage for role in plan.roles_of(r)]
        events.append({"ph": "M", "name": "process_name", "pid": r + 1, "tid": 0,
                       "args": {"name": f"pp rank {r}: stage{'s' if len(stages) > 1 else ''} "
                                        f"{', '.join(map(str, stages))} ({_ranks_of_pp(plan, r)})"}})
        events.append({"ph": "M", "name": "process_sort_index", "pid": r + 1, "tid": 0, "args": {"sort_index": r}})
        for track, tid in TRACKS.items():
            events.append({"ph": "M", "name": "thread_name", "pid": r + 1, "tid": tid, "args": {"name": track}})
            events.append({"ph": "M", "name": "thread_sort_index", "pid": r + 1, "tid": tid,
                           "args": {"sort_index": tid}})
    flows: dict[tuple, Slice] = {}
    for s in tl.slices:
        cat = ("idle" if s.name.startswith("bubble") else s.name.split()[0]) if s.track == "compute" else s.track
        args: dict[str, Any] = {}
        if s.stage is not None:
            args.update(stage=s.stage, microbatch=s.mb)
        if s.peer is not None:
            args["peer_pp_rank"] = s.peer
        events.append({"ph": "X", "name": s.name, "cat": cat, "pid": s.pp + 1, "tid": TRACKS[s.track],
                       "ts": _us(s.start), "dur": round(_us(s.end) - _us(s.start), 3), "args": args})
        if s.track in ("send", "recv"):
            flows[(s.track, s.pp, s.stage, s.mb, s.name.split()[1])] = s
    flow_id = 0
    for (track, r, stage, mb, what), s in sorted(flows.items(), key=lambda kv: (kv[1].start, kv[0])):
        if track != "send":
            continue
        consumer = stage + 1 if what == "activations" else stage - 1
        recv = flows.get(("recv", s.peer, consumer, mb, what))
        if recv is None:
            continue
        flow_id += 1
        events.append({"ph": "s", "id": flow_id, "name": what, "cat": "p2p", "pid": r + 1, "tid": TRACKS["send"],
                       "ts": _us(s.start)})
        events.append({"ph": "f", "bp": "e", "id": flow_id, "name": what, "cat": "p2p", "pid": recv.pp + 1,
                       "tid": TRACKS["recv"], "ts": _us(recv.start)})
    seconds = plan.cost["time"]["step_seconds_estimate"] if plan.mode == "train" else tl.makespan
    for r in range(pp if plan.mode == "train" else 0):  # what the step estimate adds to the pipeline's compute
        kinds = [a.kind for a in plan.schedule.step[r]]
        if tl.makespan < seconds:
            events.append({"ph": "X", "name": "rest of the step estimate (exposed communication, step actions)",
                           "cat": "step", "pid": r + 1,
                           "tid": TRACKS["step"], "ts": _us(tl.makespan), "dur": _us(seconds - tl.makespan),
                           "args": {"actions": kinds}})
    other = {"spec": plan.spec_name, "mode": plan.mode, "schedule": plan.schedule.kind,
             "microbatches": plan.schedule.microbatches, "pipeline_seconds": tl.makespan,
             "step_seconds_estimate": seconds, "bubble_fraction": plan.schedule.simulation.bubble_fraction,
             "compute_unit_seconds": tl.unit_seconds, "pipeline_boundaries": tl.boundaries}
    if plan.mode == "train":  # the step timed with its communication: threads `timed compute` and `comm`
        timed, about = comm_trace(plan, target.text("spec.json"), _us)
        events += timed
        other.update(about)
    doc = {"traceEvents": events, "displayTimeUnit": "ms", "otherData": other}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")) + "\n"


def dot(target: Target) -> str:
    plan = target.plan
    index = RankIndex(plan)
    pp = plan.mesh.size("pp")
    lines = [f'digraph "{plan.spec_name} {plan.mode}" {{', "  rankdir=LR;", '  node [shape=box, fontname="Helvetica"];',
             '  edge [fontname="Helvetica", fontsize=10];']
    for r in range(pp):
        lines.append(f'  subgraph "cluster_pp{r}" {{')
        lines.append(f'    label="pp rank {r} ({_ranks_of_pp(plan, r)})";')
        for role in plan.roles_of(r):
            parts = [p for p, on in (("embedding", role.embedding), ("head", role.head)) if on]
            extra = f"\\n{', '.join(parts)}" if parts else ""
            lines.append(f'    "{role.name}" [label="{role.name}\\nlayers [{role.layers[0]}, {role.layers[1]})'
                         f'{extra}\\n{len(role.forward)} fwd / {len(role.backward)} bwd collectives"];')
        lines.append("  }")
    shape = "x".join(map(str, plan.schedule.boundary_shape))
    names = {role.stage: role.name for role in plan.roles}
    for s in range(plan.schedule.n_stages - 1):
        lines.append(f'  "{names[s]}" -> "{names[s + 1]}" [label="activations {shape}"];')
        if plan.mode == "train":
            lines.append(f'  "{names[s + 1]}" -> "{names[s]}" [label="gradients {shape}", style=dashed];')
    groups = []
    for axis in ("tp", "dp", "ep", "edp", "pp", "stage"):
        n = plan.mesh.size(axis)
        if n > 1:
            groups.append(f"{axis}: {n} ranks, {index.link(0, axis).replace('_', ' ')}")
    label = "\\n".join(["collective groups of rank 0", *groups]) if groups else "one rank: no collective groups"
    lines.append(f'  "groups" [shape=note, label="{label}"];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def export(target: Target, fmt: str) -> str:
    if fmt == "perfetto":
        return perfetto(target)
    if fmt == "dot":
        return dot(target)
    return target.text("schedule.csv")
