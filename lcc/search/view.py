"""`lcc plan search` output: the top layouts as a table with why each wins or loses, JSON, and the chosen spec."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from lcc.search.search import Estimate, Result, on_cluster
from lcc.spec.models import Spec


def _layout(e: Estimate) -> str:
    lay = e.layout
    virtual = lay.virtual_stages > 1 and lay.schedule != "zbv"  # zbv always runs 2
    pipe = "" if lay.pp == 1 else f" {lay.schedule}{'/v' + str(lay.virtual_stages) if virtual else ''}"
    exchange = ("h" if lay.exchange == "hierarchical" else "") + ("o" if lay.overlap else "")
    return (f"tp{lay.tp} pp{lay.pp} dp{lay.dp} ep{lay.ep}{exchange} z{lay.zero} "
            f"{lay.recompute}{' sp' if lay.sp else ''}{pipe} m{lay.microbatches}")


def reason(e: Estimate, best: Estimate, objective: str = "step_time") -> str:
    """What bounds this layout, and where it loses most against the best."""
    top = max(e.exposed.items(), key=lambda kv: kv[1], default=("", 0.0))
    bound = f"bound by {top[0]} {top[1]:.3g} s" if top[1] > e.compute_seconds else \
        f"bound by compute {e.compute_seconds:.3g} s"
    if e is best:
        return bound
    if objective == "memory":
        more = e.memory_bytes - best.memory_bytes
        return f"{bound}; {'ties #1' if more <= 0 else f'+{more / 2**30:.3g} GiB against #1'}"
    if e.step_seconds <= best.step_seconds * (1 + 1e-9):
        return f"{bound}; ties #1"
    parts = {"compute": e.compute_seconds - best.compute_seconds,
             "bubble": e.bubble * e.step_seconds - best.bubble * best.step_seconds,
             **{k: v - best.exposed.get(k, 0.0) for k, v in e.exposed.items()}}
    worst = max(parts.items(), key=lambda kv: kv[1])
    return f"{bound}; +{worst[1]:.3g} s of {worst[0]} against #1" if worst[1] > 0 else bound


def table(result: Result) -> list[str]:
    best = result.top[0]
    bound = "step-time" if result.objective == "step_time" else "memory"
    lines = [f"{result.considered:,} layouts of {result.gpus} GPUs ({result.nodes} x {result.per_node}): "
             f"{result.invalid:,} invalid, {result.pruned_memory:,} pruned by memory, {result.pruned_time:,} by "
             f"the {bound} bound; {result.evaluated:,} estimated, {result.fitting:,} fit",
             "", f"{'#':>3}  {'layout':<56} {'step s':>7} {'MFU':>6} {'busy':>6} {'bubble':>7} {'recomp':>7} "
             f"{'headroom':>9} {'a2a x-node s':>12}  why"]
    for i, e in enumerate(result.top, 1):
        lines.append(f"{i:>3}  {_layout(e):<56} {e.step_seconds:>7.3f} {e.mfu:>6.1%} {e.busy:>6.1%} {e.bubble:>7.1%} "
                     f"{e.recompute:>7.1%} {e.headroom:>9.1%} {e.alltoall_inter_seconds:>12.3f}  "
                     f"{reason(e, best, result.objective)}")
    notes = ["busy: the share of the step a GPU computes (what the article's 98% GPU utilisation compares with; "
             "MFU: model FLOPs at peak)"]
    if any(e.layout.exchange == "hierarchical" for e in result.top):
        notes.append("ep<n>h: the hierarchical expert exchange (a token once per node, forwarded inside it); "
                     "a2a x-node: the expert all-to-all's inter-node seconds a step")
    if any(e.layout.overlap for e in result.top):
        notes.append("ep<n>o: the overlapped expert exchange (two halves: one half's all-to-all while the other's "
                     "experts compute)")
    return [*lines, "", *notes]


def as_json(result: Result) -> dict[str, Any]:
    counts = {k: v for k, v in asdict(result).items() if k != "top"}
    return {"schema": "lcc.plan-search/1", **counts,
            "top": [{"layout": asdict(e.layout), "overrides": e.layout.overrides(), "step_seconds": e.step_seconds,
                     "mfu": e.mfu, "memory_bytes": e.memory_bytes, "device_bytes": e.device_bytes,
                     "bubble": e.bubble, "recompute": e.recompute, "compute_seconds": e.compute_seconds,
                     "exposed_seconds": e.exposed, "alltoall_inter_seconds": e.alltoall_inter_seconds,
                     "busy_fraction": e.busy, "hidden_communication_seconds": e.hidden_seconds,
                     "exposed_communication_seconds": e.exposed_seconds}
                    for e in result.top]}


def write_spec(spec: Spec, result: Result, path: Path) -> None:
    """The spec with the best layout (and the cluster's node count), as YAML."""
    import yaml

    from lcc.spec import resolved

    best = result.top[0]
    chosen = on_cluster(spec, best.layout, result.nodes, result.per_node)
    header = (f"# {spec.name}: layout chosen by lcc plan search for {result.gpus} GPUs "
              f"(estimated step {best.step_seconds:.3f} s)\n")
    path.write_text(header + yaml.safe_dump(resolved(chosen), sort_keys=False, default_flow_style=None, width=110))
