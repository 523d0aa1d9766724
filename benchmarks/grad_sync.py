"""What bucketing gradients and issuing each bucket during backward buy: step time of small-moe (dp 4,
ep 2: 4 CPU ranks, float32, as shipped) with the plan's gradient buckets of three sizes, compiled and run
side by side in one invocation:

- per parameter: one bucket per parameter, each issued as soon as its gradient is complete;
- 25M elements (the compiler's default): a few buckets, each issued as soon as it is complete;
- one bucket per reduction: issued when the last gradient is complete, i.e. after backward (no overlap).

Median seconds per step over the steps after the first two (process start and first-touch excluded),
alternating the variants `--rounds` times so that drift on a shared machine hits each alike.
Usage: python -m benchmarks.grad_sync [--steps 6] [--rounds 2] [--set FIELD=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also run as a file: python benchmarks/x.py

from benchmarks.common import machine, write
from lcc.compiler.output import write as write_plan
from lcc.compiler.passes import data_parallel
from lcc.compiler.plan import compile_plan
from lcc.runtime.launch import launch, read_metrics
from lcc.spec import load_spec

SPECS = Path(__file__).resolve().parents[1] / "specs"
VARIANTS = {"per parameter": 1, "25M elements (default)": data_parallel.BUCKET_ELEMENTS,
            "one bucket (after backward)": 1 << 62}


def compile_with(spec, elements: int, out: Path) -> int:
    default = data_parallel.BUCKET_ELEMENTS
    data_parallel.BUCKET_ELEMENTS = elements
    try:
        files = compile_plan(spec)
    finally:
        data_parallel.BUCKET_ELEMENTS = default
    write_plan(files, out)
    plan = json.loads(files["plan.json"])
    return sum(len(r["grad_buckets"]) for r in plan["roles"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--set", nargs="*", default=[])
    parser.add_argument("--out")
    args = parser.parse_args()
    spec = load_spec(SPECS / "small-moe.yaml", args.set)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    buckets = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, elements in VARIANTS.items():
            buckets[name] = compile_with(spec, elements, Path(tmp) / str(elements))
        for _ in range(args.rounds):
            for name, elements in VARIANTS.items():
                plan = Path(tmp) / str(elements)
                launch(plan, args.steps, plan / "metrics.jsonl", quiet=True)
                times[name] += [m["seconds"] for m in read_metrics(plan / "metrics.jsonl")[2:]]
    base = statistics.median(times["one bucket (after backward)"])
    rows = {}
    for name in VARIANTS:
        median = statistics.median(times[name])
        rows[name] = {"buckets": buckets[name], "seconds_per_step": median, "vs_after_backward": median / base}
        print(f"{name:30s} {buckets[name]:4d} buckets  {median:.3f} s/step  ({median / base:.3f}x the step time "
              "with one bucket after backward)")
    write("grad_sync", {"spec": "small-moe", "overrides": args.set, "steps": args.steps, "rounds": args.rounds,
                        "variants": rows, "machine": machine()}, args.out)


if __name__ == "__main__":
    main()
