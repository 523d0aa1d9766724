"""Compiled plans priced as they run: predicted against measured step times of small-moe on 4 local CPU ranks,
each layout eager (`train.compile: none`) and compiled (`train.compile: inductor`) side by side.

The cluster section comes from `lcc calibrate --compiled` with 4 ranks measuring at once: the tables of
benchmarks/search_fidelity.py and the `compiled` table (a reference layer's traced part, eager and under
torch.compile). The routing's imbalance is measured apart in a run on one rank, as there. The model is shrunk
as there (train.global_batch=4, train.seq_len=128). Layouts: the --sample best predicted with compilation and
--sample drawn at random from the rest (seed 0, in a fixed order). Each runs eager, then compiled, for
--steps steps; a measured step is the median of the steps after the first two (the first compiles, the second
recompiles the regions whose shapes follow the routing as dynamic), each less the seconds it spent compiling
(`compile_seconds` of its metrics), which are reported apart.
Reported per layout: both predictions and both measurements, and the compiled/eager ratio each way; overall,
the median absolute error of each.

Usage: python -m benchmarks.compiled_fidelity [--steps 5] [--sample 3] [--out FILE]
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
from benchmarks.search_fidelity import ROOT, calibrated_base  # noqa: E402


def measured_step(path: Path, steps: int) -> tuple[float, float] | None:
    """(median seconds of the steps after the first two of `lcc run train`, compiling left out; seconds those
    steps spent compiling again), None where the run failed."""
    metrics = path.with_suffix(".jsonl")
    try:
        subprocess.run([sys.executable, "-m", "lcc", "run", "train", str(path), "--steps", str(steps), "--metrics",
                        str(metrics)], cwd=ROOT, check=True, capture_output=True, timeout=600)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        print(f"  {path.name}: failed ({type(exc).__name__}); left out")
        return None
    records = [json.loads(line) for line in metrics.read_text().splitlines()][2:]
    compiling = [r.get("compile_seconds", 0.0) for r in records]
    return statistics.median(r["seconds"] - c for r, c in zip(records, compiling, strict=True)), sum(compiling)


def main() -> None:
    import yaml

    from lcc.compiler.cost.model import CostModel, step_seconds
    from lcc.search.search import on_cluster, search
    from lcc.spec import load_spec, resolved

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--sample", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=0.2, help="lcc calibrate's time per measured point")
    parser.add_argument("--out")
    args = parser.parse_args()
    began = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="lcc-compiled-fidelity-"))
    rates, cluster, spec, imbalance = calibrated_base(args, work, ["train.compile=inductor"], compiled=True)
    ratios = [f"{row[0]:.0f} tokens: {row[2] / row[1]:.3f}" for row in rates["compiled"]]
    print(f"compiled / eager seconds of the reference layer's traced part: {', '.join(ratios)}", flush=True)
    layouts = list(search(spec, 4, nodes=1, top=10**6, prune=False).top)
    rest = sorted(layouts[args.sample:], key=lambda e: e.layout.overrides())
    chosen = layouts[:args.sample] + random.Random(0).sample(rest, min(args.sample, len(rest)))
    runs = []
    for i, e in enumerate(chosen):
        row = {"layout": e.layout.overrides()}
        for mode in ("none", "inductor"):
            laid = on_cluster(spec, e.layout, 1, 4)
            laid = laid.model_copy(update={"train": laid.train.model_copy(update={"compile": mode})})
            path = work / f"layout{i}-{mode}.yaml"
            path.write_text(yaml.safe_dump(resolved(laid), sort_keys=False))
            measured = measured_step(path, args.steps)
            row[mode] = {"predicted": step_seconds(CostModel(load_spec(path))),
                         "measured": measured[0] if measured else None,
                         "recompile_seconds": measured[1] if measured else None}
        if row["none"]["measured"] is None or row["inductor"]["measured"] is None:
            continue
        runs.append(row)
        eager, comp = row["none"], row["inductor"]
        print(f"  {i + 1}/{len(chosen)} eager: predicted {eager['predicted']:.3f} s, measured {eager['measured']:.3f} s"
              f"; compiled: predicted {comp['predicted']:.3f} s, measured {comp['measured']:.3f} s; compiled / "
              f"eager: predicted {comp['predicted'] / eager['predicted']:.3f}, measured "
              f"{comp['measured'] / eager['measured']:.3f} (compiling again after warm-up: "
              f"{comp['recompile_seconds']:.2f} s)  {' '.join(o.split('.')[-1] for o in row['layout'])}", flush=True)

    def error(mode: str) -> float:
        return statistics.median(abs(r[mode]["predicted"] / r[mode]["measured"] - 1) for r in runs)

    def ratio(r: dict, figure: str) -> float:
        return r["inductor"][figure] / r["none"][figure]

    summary = {"runs": len(runs), "expected_imbalance": imbalance,
               "median_abs_relative_error": {"eager": error("none"), "compiled": error("inductor")},
               "compiled_over_eager": {"predicted": [ratio(r, "predicted") for r in runs],
                                       "measured": [ratio(r, "measured") for r in runs]},
               "compiled_over_eager_median_abs_error": statistics.median(
                   abs(ratio(r, "predicted") / ratio(r, "measured") - 1) for r in runs),
               "minutes": (time.perf_counter() - began) / 60}
    print(json.dumps(summary, indent=2))
    write("compiled_fidelity", {"machine": machine(), "cluster": cluster, "summary": summary, "runs": runs},
          args.out)


if __name__ == "__main__":
    main()
