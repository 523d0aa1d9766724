"""Measured peak memory per rank next to the cost model's prediction, for ZeRO, activation checkpointing
and sequence parallelism.

small-moe as shipped (dp 4, ep 2: 4 ranks, float32), one run per setting with live-tensor tracking
(`lcc run train --track-memory`); the figures are those of the last step (optimizer states exist from the
first step on), the highest over ranks. Measured:
- model states: parameters (or their ZeRO pieces), gradients as backward leaves them, AdamW states;
- activations: the step's peak of every other live tensor (saved activations, temporaries, ZeRO-3's
  gathered parameters and whole gradients before their reduce-scatter).
Predicted (the cost model's worst role for the same spec): weights + gradients + optimizer states without
ZeRO-3's gathered copies; activations plus those copies. Sequence parallelism is measured at tp 2 (dp 2,
ep 2: the same 4 ranks), with and without it.
Usage: python -m benchmarks.memory [--steps 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also run as a file: python benchmarks/x.py

from benchmarks.common import machine, write
from lcc.compiler.cost.model import CostModel
from lcc.compiler.cost.report import cost_report
from lcc.compiler.output import write as write_plan
from lcc.compiler.plan import compile_plan
from lcc.runtime.launch import launch, read_metrics
from lcc.spec import load_spec

SPECS = Path(__file__).resolve().parents[1] / "specs"
TP2 = ["parallelism.tp=2", "parallelism.dp=2"]
SETTINGS = {"zero 0, no checkpointing": [], "zero 1": ["parallelism.zero=1"], "zero 2": ["parallelism.zero=2"],
            "zero 3": ["parallelism.zero=3"],
            "zero 3 + selective": ["parallelism.zero=3", "parallelism.activation_checkpointing=selective"],
            "zero 3 + full checkpointing": ["parallelism.zero=3", "parallelism.activation_checkpointing=full"],
            "tp 2": TP2, "tp 2 + sequence parallelism": [*TP2, "parallelism.sequence_parallel=true"]}


def predicted(spec) -> dict[str, float]:
    model = CostModel(spec)
    worst = max((model.role_memory(r) for r in model.roles), key=lambda m: m["total_bytes"])
    gathered = worst["weights_gathered_bytes"] + worst["grads_gathered_bytes"]
    states = worst["weights_bytes"] + worst["grads_bytes"] + worst["optimizer_bytes"] - gathered
    return {"states_bytes": states, "activations_bytes": worst["activations_bytes"] + gathered,
            "total_bytes": worst["total_bytes"]}


def measure(name: str, overrides: list[str], steps: int, work: Path) -> dict[str, object]:
    spec = load_spec(SPECS / "small-moe.yaml", overrides)
    plan = work / name.replace(" ", "-").replace(",", "").replace("+", "and")
    write_plan(compile_plan(spec), plan)
    launch(plan, steps, plan / "metrics.jsonl", quiet=True, track_memory=True)
    last = read_metrics(plan / "metrics.jsonl")[-1]
    measured = {"states_bytes": last["state_memory_bytes"], "activations_bytes": last["activation_memory_bytes"],
                "peak_bytes": last["peak_memory_bytes"]}
    model = predicted(spec)
    par = spec.parallelism
    row = {"zero": par.zero, "activation_checkpointing": par.activation_checkpointing, "tp": par.tp,
           "sequence_parallel": par.sequence_parallel, "measured": measured, "predicted": model,
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
        rows = {name: measure(name, overrides, args.steps, Path(tmp)) for name, overrides in SETTINGS.items()}
    plain, sharded = rows["zero 0, no checkpointing"], rows["zero 3 + full checkpointing"]
    claim = {"measured_small_moe": 1 - sharded["measured"]["peak_bytes"] / plain["measured"]["peak_bytes"],
             "model_small_moe": 1 - sharded["predicted"]["total_bytes"] / plain["predicted"]["total_bytes"],
             "model_longcat_2_0": cost_report(load_spec(SPECS / "longcat-2.0.yaml"))["memory"]["comparison"][
                 "zero3_full_checkpointing_reduction"]}
    print("peak-memory reduction of ZeRO-3 + full checkpointing vs plain data parallelism: "
          f"measured (small-moe) {claim['measured_small_moe']:.1%}, model (small-moe) {claim['model_small_moe']:.1%}, "
          f"model (longcat-2.0) {claim['model_longcat_2_0']:.1%}")
    tp, sp = rows["tp 2"], rows["tp 2 + sequence parallelism"]
    claim["sequence_parallel_activations_measured"] = (sp["measured"]["activations_bytes"]
                                                       / tp["measured"]["activations_bytes"])
    claim["sequence_parallel_activations_model"] = (sp["predicted"]["activations_bytes"]
                                                    / tp["predicted"]["activations_bytes"])
    print(f"activations with sequence parallelism / without, at tp 2: measured "
          f"{claim['sequence_parallel_activations_measured']:.3f}, model "
          f"{claim['sequence_parallel_activations_model']:.3f}")
    write("memory", {"spec": "small-moe", "steps": args.steps, "settings": rows, "reduction": claim,
                     "machine": machine()}, args.out)


if __name__ == "__main__":
    main()
