"""Pictures of a plan (matplotlib, the `plot` extra): memory per role stacked by kind against the device's
memory, and the pipeline timeline of one step (`lcc report --plot`); two plans side by side on shared
axes (`lcc plan diff --plot`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lcc.inspect.ranks import memory, memory_of
from lcc.inspect.target import InspectError, Target
from lcc.inspect.timeline import timeline

COLORS = {"weights": "#4C72B0", "gathered_weights": "#8FAADC", "gradients": "#DD8452", "gathered_gradients": "#F2B98C",
          "optimizer": "#55A868", "activations": "#C44E52", "kv_cache": "#8172B2",
          "workspace": "#937860"}
PHASES = {"forward": "#4C72B0", "backward": "#DD8452"}


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise InspectError("drawing needs matplotlib: pip install -e '.[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _memory_panel(ax: Any, cost: dict[str, Any], mode: str, title: str, ymax: float | None = None) -> None:
    pp = cost["layout"]["pp"]
    rows = [memory_of(cost, mode, r) for r in range(pp)]
    bottoms = [0.0] * pp
    gib = 2**30
    for kind in rows[0]["by_kind"]:
        values = [r["by_kind"][kind] / gib for r in rows]
        ax.bar(range(pp), values, bottom=bottoms, color=COLORS[kind], label=kind.replace("_", " "), width=0.6)
        bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
    if rows[0]["peak_phase"] is not None:  # training: the most held at one moment, below the kinds' sum
        ax.hlines([r["peak_bytes"] / gib for r in rows], [i - 0.3 for i in range(pp)], [i + 0.3 for i in range(pp)],
                  colors="black", linewidth=2, label="peak")
    device = rows[0]["device_bytes"] / gib
    ax.axhline(device, color="black", linestyle="--", linewidth=1, label=f"device memory ({device:.0f} GiB)")
    ax.set_xticks(range(pp), [f"pp{r}" for r in range(pp)])
    ax.set_ylabel("GiB per rank (cost model)")
    ax.set_ylim(0, (ymax or max(device, max(bottoms))) * 1.12)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=3, frameon=False)


def _timeline_panel(ax: Any, t: Target, xmax: float | None = None) -> None:
    plan = t.plan
    tl = timeline(plan, json.loads(t.text("spec.json"))["cluster"]["network"])
    pp = plan.mesh.size("pp")
    scale, unit = (1e3, "ms") if tl.makespan < 10 else (1.0, "s")
    for phase, color in PHASES.items():
        for r in range(pp):
            bars = [((s.start * scale), (s.end - s.start) * scale) for s in tl.slices
                    if s.pp == r and s.track == "compute" and s.name.startswith(phase)]
            ax.broken_barh(bars, (r - 0.35, 0.7), facecolors=color, edgecolors="white", linewidth=0.3,
                           label=phase if r == 0 else None)
    for s in tl.slices:
        if s.track == "compute" and s.mb is not None and (s.end - s.start) * scale > (xmax or tl.makespan * scale) / 40:
            ax.text((s.start + s.end) / 2 * scale, s.pp, str(s.mb), ha="center", va="center", fontsize=6,
                    color="white")
    ax.set_yticks(range(pp), [f"pp{r}" for r in range(pp)])
    ax.invert_yaxis()
    ax.set_xlim(0, (xmax or tl.makespan * scale) * 1.02)
    ax.set_xlabel(f"time in one step's pipeline ({unit}, cost model; labels: micro-batch)")
    bubble = plan.schedule.simulation.bubble_fraction
    ax.set_title(f"pipeline: {plan.schedule.kind}, {plan.schedule.microbatches} micro-batch(es), bubble "
                 f"{bubble:.0%}", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")


def _name(cost: dict[str, Any]) -> str:
    lay = cost["layout"]
    return (f"{cost['spec']}: pp {lay['pp']} x dp {lay['dp']} x tp {lay['tp']}, ep {lay['ep']}, ZeRO {lay['zero']}, "
            f"ckpt {lay['activation_checkpointing']}")


def _save(fig: Any, path: Path) -> None:
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=130, metadata={"Software": None})  # no version or date: the same plan, the same bytes
    except OSError as exc:
        raise InspectError(f"--plot {path}: cannot write it ({exc.strerror})") from None


def report_picture(cost: dict[str, Any], mode: str, t: Target | None, path: Path, why: str = "") -> None:
    """`lcc report --plot`: memory from the report; the pipeline from the compiled plan `t` (None when the
    layout does not compile, `why`: then the panel says so)."""
    plt = _pyplot()
    fig, (mem, pipe) = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [1, 2]})
    _memory_panel(mem, cost, mode, f"memory per role\n{_name(cost)}")
    if t is not None:
        _timeline_panel(pipe, t)
    else:
        pipe.axis("off")
        pipe.text(0.5, 0.5, f"no pipeline timeline: {why}", ha="center", va="center", wrap=True, fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def side_by_side(a: Target, b: Target, path: Path) -> None:
    plt = _pyplot()
    gib = 2**30
    rows = [memory(t.plan, r) for t in (a, b) for r in range(t.plan.mesh.size("pp"))]
    ymax = max(max(m["total_bytes"], m["peak_bytes"]) for m in rows) / gib
    ymax = max(ymax, a.plan.cost["memory"]["device_bytes"] / gib, b.plan.cost["memory"]["device_bytes"] / gib)
    spans = [timeline(t.plan, json.loads(t.text("spec.json"))["cluster"]["network"]).makespan for t in (a, b)]
    scale = 1e3 if max(spans) < 10 else 1.0
    fig, axes = plt.subplots(2, 2, figsize=(15, 10), gridspec_kw={"width_ratios": [1, 2]})
    for row, t in enumerate((a, b)):
        _memory_panel(axes[row][0], t.plan.cost, t.plan.mode, f"{'AB'[row]}: memory per role\n{_name(t.plan.cost)}",
                      ymax)
        _timeline_panel(axes[row][1], t, max(spans) * scale)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
