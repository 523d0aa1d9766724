"""Measured peak memory per rank next to the cost model's prediction, for ZeRO and activation checkpointing.

small-moe as shipped (dp 4, ep 2: 4 ranks, float32), one run per setting with live-tensor tracking
(`lcc run train --track-memory`); the figures are those of the last step (optimizer states exist from the
first step on), the highest over ranks. Measured:
- model states: parameters (or their ZeRO pieces), gradients as backward leaves them, AdamW states;
- activations: the step's peak of every other live tensor (saved activations, temporaries, ZeRO-3's
  gathered parameters and whole gradients before their reduce-scatter).
Predicted (the cost model's worst role for the same spec): weights + gradients + optimizer states without
ZeRO-3's gathered copies; activations plus those copies.
Usage: python -m benchmarks.memory [--steps 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also run as a file: python benchmarks/x.py

from benchmarks.common import machine, write
from lcc.compiler.cost.report import CostModel, cost_report
from lcc.compiler.output import write as write_plan
from lcc.compiler.plan import compile_plan
from lcc.runtime.launch import launch, read_metrics
from lcc.spec import load_spec

SPECS = Path(__file__).resolve().parents[1] / "specs"
SETTINGS = {"zero 0, no checkpointing": (0, "none"), "zero 1": (1, "none"), "zero 2": (2, "none"),
            "zero 3": (3, "none"), "zero 3 + selective": (3, "selective"), "zero 3 + full checkpointing": (3, "full")}


def predicted(spec) -> dict[str, float]:
    model = CostModel(spec)
    worst = max((model.role_memory(r) for r in model.roles), key=lambda m: m["total_bytes"])
    gathered = worst["weights_gathered_bytes"] + worst["grads_gathered_bytes"]
    states = worst["weights_bytes"] + worst["grads_bytes"] + worst["optimizer_bytes"] - gathered
    return {"states_bytes": states, "activations_bytes": worst["activations_bytes"] + gathered,
            "total_bytes": worst["total_bytes"]}


def measure(name: str, zero: int, checkpointing: str, steps: int, work: Path) -> dict[str, object]:
    spec = load_spec(SPECS / "small-moe.yaml", [f"parallelism.zero={zero}",
                                                 f"parallelism.activation_checkpointing={checkpointing}"])
    plan = work / f"zero{zero}-{checkpointing}"
    write_plan(compile_plan(spec), plan)
    launch(plan, steps, plan / "metrics.jsonl", quiet=True, track_memory=True)
    last = read_metrics(plan / "metrics.jsonl")[-1]
    measured = {"states_bytes": last["state_memory_bytes"], "activations_bytes": last["activation_memory_bytes"],
                "peak_bytes": last["peak_memory_bytes"]}
    model = predicted(spec)
    row = {"zero": zero, "activation_checkpointing": checkpointing, "measured": measured, "predicted": model,
           "states_error": measured["states_bytes"] / model["states_bytes"] - 1,
           "activations_error": measured["activations_bytes"] / model["activations_bytes"] - 1,
           "seconds_per_step": last["seconds"]}
    print(f"{name:28s} states {measured['states_bytes'] / 2**20:8.1f} MiB (model {model['states_bytes'] / 2**20:8.1f},"
          f" {row['states_error']:+.1%})  activations {measured['activations_bytes'] / 2**20:7.1f} MiB (model "
          f"{model['activations_bytes'] / 2**20:7.1f}, {row['activations_error']:+.1%})  peak "
          f"{measured['peak_bytes'] / 2**20:8.1f} MiB", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = {name: measure(name, z, ck, args.steps, Path(tmp)) for name, (z, ck) in SETTINGS.items()}
    plain, sharded = rows["zero 0, no checkpointing"], rows["zero 3 + full checkpointing"]
    claim = {"measured_small_moe": 1 - sharded["measured"]["peak_bytes"] / plain["measured"]["peak_bytes"],
             "model_small_moe": 1 - sharded["predicted"]["total_bytes"] / plain["predicted"]["total_bytes"],
             "model_longcat_2_0": cost_report(load_spec(SPECS / "longcat-2.0.yaml"))["memory"]["comparison"][
                 "zero3_full_checkpointing_reduction"]}
    print("peak-memory reduction of ZeRO-3 + full checkpointing vs plain data parallelism: "
          f"measured (small-moe) {claim['measured_small_moe']:.1%}, model (small-moe) {claim['model_small_moe']:.1%}, "
          f"model (longcat-2.0) {claim['model_longcat_2_0']:.1%}")
    write("memory", {"spec": "small-moe", "steps": args.steps, "settings": rows, "reduction": claim,
                     "machine": machine()}, args.out)


if __name__ == "__main__":
    main()
