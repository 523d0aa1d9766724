"""What keeping freed host memory buys a training step (lcc.runtime.host_memory): small-moe's step with each
rank's freed memory kept for the next step (`LCC_HOST_MALLOC=reuse`, the default) against glibc's own
thresholds (`system`), side by side in one invocation.

Layouts (small-moe shrunk to train.global_batch=4, train.seq_len=128, float32): one rank (dp 1, ep 1), and
4 ranks at tp 2 x dp 2 x ep 4 under ZeRO 0 and ZeRO 3. Each run is `lcc run train` in a process of its own
(the thresholds are a process's); the figure is the median step after the first two, and the two settings
alternate `--rounds` times so that drift on a shared machine hits each alike.
Usage: python -m benchmarks.host_malloc [--steps 6] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also run as a file: python benchmarks/x.py

from benchmarks.common import machine, write

ROOT = Path(__file__).resolve().parents[1]
SHRINK = ["train.global_batch=4", "train.seq_len=128"]
LAYOUTS = {
    "1 rank": ["parallelism.dp=1", "parallelism.ep=1", "cluster.gpus_per_node=1"],
    "4 ranks, tp 2 x dp 2 x ep 4, ZeRO 0": ["parallelism.tp=2", "parallelism.dp=2", "parallelism.ep=4"],
    "4 ranks, tp 2 x dp 2 x ep 4, ZeRO 3": ["parallelism.tp=2", "parallelism.dp=2", "parallelism.ep=4",
                                             "parallelism.zero=3"],
}
SETTINGS = ("reuse", "system")


def step_seconds(plan: Path, setting: str, steps: int, work: Path) -> float:
    """The median step after the first two of one `lcc run train` with LCC_HOST_MALLOC=`setting`."""
    metrics = work / f"{plan.name}-{setting}.jsonl"
    subprocess.run([sys.executable, "-m", "lcc", "run", "train", str(plan), "--steps", str(steps), "--metrics",
                    str(metrics)], cwd=ROOT, check=True, capture_output=True, timeout=600,
                   env={**os.environ, "LCC_HOST_MALLOC": setting})
    seconds = [json.loads(line)["seconds"] for line in metrics.read_text().splitlines()]
    return statistics.median(seconds[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lcc-host-malloc-"))
    rows = {}
    for i, (name, overrides) in enumerate(LAYOUTS.items()):
        plan = work / f"layout{i}"
        sets = [a for o in [*SHRINK, *overrides] for a in ("--set", o)]
        subprocess.run([sys.executable, "-m", "lcc", "compile", str(ROOT / "specs" / "small-moe.yaml"), *sets,
                        "--out", str(plan)], cwd=ROOT, check=True, capture_output=True)
        times: dict[str, list[float]] = {s: [] for s in SETTINGS}
        for r in range(args.rounds):
            for setting in SETTINGS if r % 2 == 0 else reversed(SETTINGS):
                times[setting].append(step_seconds(plan, setting, args.steps, work))
        medians = {s: statistics.median(t) for s, t in times.items()}
        rows[name] = {"seconds": times, "median_seconds": medians,
                      "reuse_speedup": medians["system"] / medians["reuse"]}
        print(f"{name:40s} reuse {medians['reuse']:.3f} s, system {medians['system']:.3f} s: "
              f"{medians['system'] / medians['reuse']:.2f}x  (rounds: "
              f"{', '.join(f'{a:.2f}/{b:.2f}' for a, b in zip(times['reuse'], times['system'], strict=True))})",
              flush=True)
    write("host_malloc", {"machine": machine(), "steps": args.steps, "rounds": args.rounds, "layouts": rows},
          args.out)


if __name__ == "__main__":
    main()
