"""How far `lcc plan search` can be trusted: predicted against measured step times of small-moe on 4 local CPU
ranks.

The cluster section comes from `lcc calibrate` with 4 ranks measuring at once, since they share the cores:
its table of achieved rates by operation class and size, which the cost model interpolates. The calibration
measures operations and collectives alone, never the runs predicted. The routing's load imbalance
(`routing.balance.expected_imbalance`, the busiest expert's load over the mean) is measured apart too, in a
run of the same model on one rank: every layout routes the same tokens to the same experts, so this run's
routing is that of all the layouts, and it is none of them.
The model is shrunk to keep each step short (train.global_batch=4, train.seq_len=128). Every valid layout that fits
is predicted (`lcc plan search --no-prune`). The 12 best predicted and 12 others drawn at random (seed 0, from the
others in a fixed order, so that the draw does not depend on the calibration) are then run with `lcc run train` for
--steps steps. The measured step is the median of the steps after the first. Reported: Spearman's rank correlation,
the median absolute relative error, whether the predicted best is within 10% of the measured best, and how many
measured steps fall in the predicted range (`time.step_seconds_low` .. `high`). A scatter plot goes to
docs/search_fidelity.png.
At most 15 minutes: each run is bounded.

Usage: python -m benchmarks.search_fidelity [--steps 4] [--sample 12] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, write  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHRINK = ["train.global_batch=4", "train.seq_len=128"]
PLOT = ROOT / "docs" / "search_fidelity.png"


def ranks_of(values: list[float]) -> list[float]:
    """Ranks (1-based, ties averaged)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = ranks_of(a), ranks_of(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    return cov / (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5


ONE_RANK = ["parallelism.tp=1", "parallelism.pp=1", "parallelism.dp=1", "parallelism.ep=1", "parallelism.zero=0",
            "parallelism.sequence_parallel=false", "parallelism.expert_overlap=false",
            "parallelism.pipeline.schedule=1f1b", "parallelism.pipeline.microbatches=1",
            "parallelism.pipeline.virtual_stages=1", "cluster.nodes=1", "cluster.gpus_per_node=1"]


def routing_imbalance(spec_path: Path, work: Path, steps: int) -> float:
    """The busiest expert's load over the mean (`imbalance_expert`), averaged over the MoE layers and the steps
    after the first, in a run of the spec's model on one rank."""
    import yaml

    from lcc.spec import load_spec, resolved

    path, metrics = work / "routing.yaml", work / "routing.jsonl"
    path.write_text(yaml.safe_dump(resolved(load_spec(spec_path, ONE_RANK)), sort_keys=False))
    subprocess.run([sys.executable, "-m", "lcc", "run", "train", str(path), "--steps", str(steps), "--metrics",
                    str(metrics)], cwd=ROOT, check=True, capture_output=True, timeout=300)
    figures = [layer["imbalance_expert"] for line in metrics.read_text().splitlines()[1:]
               for layer in json.loads(line)["router"].values()]
    return statistics.mean(figures)


def calibrated_base(args: argparse.Namespace, work: Path, overrides: list[str], compiled: bool = False) -> tuple:
    """(rates, cluster section, spec, expected imbalance): `lcc calibrate` on 4 ranks (`args.seconds` a point;
    `compiled`: its compiled probe too), then small-moe shrunk (SHRINK, `overrides`) on that cluster with the
    routing imbalance measured on one rank, written to `work`/small-moe.yaml."""
    import yaml

    from lcc.search.calibrate import cluster_section, measure
    from lcc.spec import load_spec, resolved

    began = time.perf_counter()
    rates = measure(4, args.seconds, compiled=compiled)
    cluster = cluster_section(rates)
    print(f"calibrated ({(time.perf_counter() - began) / 60:.1f} min): {json.dumps(cluster['device'])} "
          f"{json.dumps(cluster['network'])}", flush=True)
    base_path = work / "small-moe.yaml"
    base = load_spec(ROOT / "specs" / "small-moe.yaml", [*SHRINK, *overrides])
    base_path.write_text(yaml.safe_dump({**resolved(base), "cluster": cluster}, sort_keys=False))
    imbalance = routing_imbalance(base_path, work, args.steps)
    base = load_spec(base_path, [f"routing.balance.expected_imbalance={imbalance:.3f}"])
    base_path.write_text(yaml.safe_dump(resolved(base), sort_keys=False))
    print(f"routing measured on one rank: the busiest expert takes {imbalance:.2f}x the mean load", flush=True)
    return rates, cluster, load_spec(base_path), imbalance


def main() -> None:
    import yaml

    from lcc.compiler.cost.report import cost_report
    from lcc.search.search import on_cluster, search
    from lcc.spec import load_spec, resolved

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--sample", type=int, default=12)
    parser.add_argument("--seconds", type=float, default=0.2, help="lcc calibrate's time per measured point")
    parser.add_argument("--out")
    args = parser.parse_args()
    began = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="lcc-fidelity-"))
    rates, cluster, spec, imbalance = calibrated_base(args, work, [])
    result = search(spec, 4, nodes=1, top=10**6, prune=False)
    layouts = [e for e in result.top]
    print(f"{result.considered} layouts, {result.considered - result.invalid} valid, {len(layouts)} fit")
    chosen = layouts[:args.sample]
    rest = sorted(layouts[args.sample:], key=lambda e: e.layout.overrides())  # the draw depends on no prediction
    chosen += random.Random(0).sample(rest, min(args.sample, len(rest)))
    runs = []
    for i, e in enumerate(chosen):
        path = work / f"layout{i}.yaml"
        path.write_text(yaml.safe_dump(resolved(on_cluster(spec, e.layout, 1, 4)), sort_keys=False))
        metrics = work / f"layout{i}.jsonl"
        try:
            subprocess.run([sys.executable, "-m", "lcc", "run", "train", str(path), "--steps", str(args.steps),
                            "--metrics", str(metrics)], cwd=ROOT, check=True, capture_output=True, timeout=180)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            print(f"  {e.layout}: failed ({type(exc).__name__}); left out")
            continue
        seconds = [json.loads(line)["seconds"] for line in metrics.read_text().splitlines()][1:]
        measured = statistics.median(seconds)
        time_figures = cost_report(load_spec(path))["time"]
        low, high = time_figures["step_seconds_low"], time_figures["step_seconds_high"]
        runs.append({"layout": e.layout.overrides(), "predicted": e.step_seconds, "low": low, "high": high,
                     "measured": measured, "top": i < args.sample})
        print(f"  {i + 1:>2}/{len(chosen)} predicted {e.step_seconds:.3f} s [{low:.3f}, {high:.3f}] measured "
              f"{measured:.3f} s ({measured / e.step_seconds - 1:+.0%})  "
              f"{' '.join(o.split('.')[-1] for o in e.layout.overrides())}", flush=True)
    predicted, measured = [r["predicted"] for r in runs], [r["measured"] for r in runs]
    rho = spearman(predicted, measured)
    errors = [abs(p - m) / m for p, m in zip(predicted, measured, strict=True)]
    best_predicted = min(runs, key=lambda r: r["predicted"])
    best_measured = min(r["measured"] for r in runs)
    inside = sum(r["low"] <= r["measured"] <= r["high"] for r in runs)
    summary = {"spearman": rho, "median_abs_relative_error": statistics.median(errors),
               "max_abs_relative_error": max(errors), "measured_within_range": inside,
               "predicted_best_measured_seconds": best_predicted["measured"], "measured_best_seconds": best_measured,
               "predicted_best_within_10_percent": best_predicted["measured"] <= 1.1 * best_measured,
               "runs": len(runs), "valid_fitting_layouts": len(layouts), "expected_imbalance": imbalance,
               "minutes": (time.perf_counter() - began) / 60}
    print(json.dumps(summary, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.5, 5))
        for top, label, marker in ((True, f"the {args.sample} best predicted", "o"), (False, "drawn at random", "x")):
            pts = [r for r in runs if r["top"] == top]
            ax.errorbar([r["predicted"] for r in pts], [r["measured"] for r in pts], fmt=marker, label=label,
                        xerr=[[r["predicted"] - r["low"] for r in pts], [r["high"] - r["predicted"] for r in pts]],
                        elinewidth=0.6, capsize=2)
        lo, hi = min(predicted + measured), max(predicted + measured)
        ax.plot([lo, hi], [lo, hi], color="grey", linewidth=0.8, label="predicted = measured")
        for scale in (0.75, 1.25):
            ax.plot([lo, hi], [lo * scale, hi * scale], color="grey", linewidth=0.5, linestyle=":")
        ax.set_xlabel("predicted step (s), calibrated; bars: the calibration's spread")
        ax.set_ylabel("measured step (s)")
        ax.set_title(f"small-moe, 4 CPU ranks: Spearman {rho:.2f}, median error {statistics.median(errors):.0%}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(PLOT, dpi=110)
        print(f"wrote {PLOT}")
    except ImportError:
        print("matplotlib is missing: no plot (pip install 'lcc[plot]')")
    write("search_fidelity", {"machine": machine(), "cluster": cluster, "rates": rates, "summary": summary,
                              "runs": runs}, args.out)


if __name__ == "__main__":
    main()
