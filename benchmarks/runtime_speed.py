"""Training throughput of compiled plans on this machine's CPU ranks, and the runtime's overhead.

1. Overhead at world 1: the runtime's rank engine and the single-process reference trainer, the same
   tiny-moe spec, steps alternating in one process (same threads), median seconds per step.
2. tokens/s per layout (`lcc run train` on local gloo ranks, process start excluded: steps after the
   first two), for tiny-moe and small-moe.
Usage: python -m benchmarks.runtime_speed [--steps 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also run as a file: python benchmarks/x.py

from benchmarks.common import machine, write
from lcc.compiler.output import write as write_plan
from lcc.compiler.plan import compile_plan
from lcc.model.trainer import ReferenceTrainer
from lcc.runtime.engine import RankEngine
from lcc.runtime.launch import launch, read_metrics
from lcc.spec import load_spec

SPECS = Path(__file__).resolve().parents[1] / "specs"
WORLD1 = ["parallelism.pp=1", "parallelism.dp=1", "parallelism.ep=1", "cluster.gpus_per_node=1"]
LAYOUTS = {
    "tiny-moe": {"as shipped (pp 2 x dp 4, ep 4)": [], "dp 2 x ep 2": ["parallelism.pp=1", "parallelism.dp=2",
                                                                        "parallelism.ep=2", "cluster.gpus_per_node=2"],
                 "tp 2": ["parallelism.tp=2", "parallelism.pp=1", "parallelism.dp=1", "parallelism.ep=1",
                          "cluster.gpus_per_node=2"]},
    "small-moe": {"as shipped (dp 4, ep 2)": [], "pp 2 x dp 2, ep 2": ["parallelism.pp=2", "parallelism.dp=2",
                                                                       "parallelism.pipeline.microbatches=2"]},
}


def overhead(steps: int) -> dict[str, float]:
    torch.set_num_threads(2)
    spec = load_spec(SPECS / "tiny-moe.yaml", WORLD1)
    with tempfile.TemporaryDirectory() as tmp:
        write_plan(compile_plan(spec), Path(tmp))
        engine, reference = RankEngine(Path(tmp), 0), ReferenceTrainer(spec)
        times: dict[str, list[float]] = {"runtime": [], "reference": []}
        for step in range(steps):
            for name, fn in (("runtime", engine.train_step), ("reference", reference.train_step)):
                start = time.perf_counter()
                fn(step)
                if step >= 2:
                    times[name].append(time.perf_counter() - start)
    result = {name: statistics.median(t) for name, t in times.items()}
    result["overhead"] = result["runtime"] / result["reference"] - 1
    print(f"world 1, tiny-moe: runtime {result['runtime']:.3f} s/step, reference {result['reference']:.3f} s/step, "
          f"overhead {result['overhead']:+.1%}")
    return result


def layouts(steps: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name, variants in LAYOUTS.items():
        for label, overrides in variants.items():
            spec = load_spec(SPECS / f"{name}.yaml", overrides)
            with tempfile.TemporaryDirectory() as tmp:
                write_plan(compile_plan(spec), Path(tmp) / "plan")
                launch(Path(tmp) / "plan", steps, Path(tmp) / "m.jsonl", quiet=True)
                records = read_metrics(Path(tmp) / "m.jsonl")[2:]
            tps = statistics.median(r["tokens_per_second"] for r in records)
            peak = max(r["peak_memory_bytes"] for r in records)
            out[f"{name}: {label}"] = {"tokens_per_second": tps, "world_size": spec.parallelism.world_size,
                                       "peak_memory_bytes": peak}
            print(f"{name}: {label:34s} world {spec.parallelism.world_size}  {tps:8.0f} tokens/s  "
                  f"peak rank memory {peak / 2**20:.0f} MiB")
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    result = {"benchmark": "runtime_speed", "overhead_world1": overhead(args.steps + 4),
              "layouts": layouts(args.steps), "machine": machine()}
    write("runtime_speed", result)


if __name__ == "__main__":
    main()
