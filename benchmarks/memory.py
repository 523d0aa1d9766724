"""Measured peak memory per rank next to the cost model's predicted peak: training under ZeRO 0-3, each without
and with full activation checkpointing (and at tp 2 without and with sequence parallelism), and serving.

Training: small-moe as shipped (dp 4, ep 2: 4 ranks, float32), one run per layout with live-tensor tracking
(`lcc run train --track-memory`); the figures are those of the last step (optimizer states exist from the
first step on), the highest over ranks:
- peak: the most bytes of live tensors at any moment of the step (model states, activations, gradients,
  ZeRO's gathered copies, gradient buckets and other temporaries);
- activations: the peak of everything but the model states (parameters, optimizer states, gradients once
  accumulated): activations and temporaries, and ZeRO's gathered copies, gradient buckets and pieces before
  they become the step's gradients (so with full checkpointing mostly the gradient buckets);
- states: parameters, optimizer states and gradients at the end of the step.
Predicted: the cost model's worst rank for the same spec: `peak_bytes` and the moment it is at, its
activations (`activations_bytes`), and its states without ZeRO-3's gathered copies. The routers' imbalance
(the busiest EP rank's tokens over the mean, the most over the layers) is shown beside: the model routes
uniformly.
Serving: small-moe on one rank (dp 1, ep 1; PyTorch's CPU kernels), the engine in this process: a full batch of
prompts of `max_seq_len - 8` tokens, 8 generated each; live tensor bytes from the weights and KV cache on, their
peak over the steps, against the report's serve `worst_rank_bytes` (weights + KV cache + workspace).
Usage: python -m benchmarks.memory [--steps 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also run as a file: python benchmarks/x.py

from benchmarks.common import machine, write
from lcc.compiler.cost.model import CostModel
from lcc.compiler.cost.report import cost_report
from lcc.compiler.output import write as write_plan
from lcc.compiler.plan import compile_plan
from lcc.runtime.launch import launch, read_metrics
from lcc.spec import load_spec

SPECS = Path(__file__).resolve().parents[1] / "specs"
MIB = 2**20
TP2 = ["parallelism.tp=2", "parallelism.dp=2"]
FULL = ["parallelism.activation_checkpointing=full"]
SETTINGS = {**{f"zero {z}{' + full' if full else ''}": [f"parallelism.zero={z}", *(FULL if full else [])]
               for z in range(4) for full in (False, True)},
            "tp 2": TP2, "tp 2 + sequence parallelism": [*TP2, "parallelism.sequence_parallel=true"]}
SERVE = ["parallelism.dp=1", "parallelism.ep=1", "cluster.gpus_per_node=1", "serve.cpu_kernels=torch"]


def predicted(spec) -> dict[str, Any]:
    """The cost model's worst rank: its peak and where it is, its activations and its states."""
    model = CostModel(spec)
    worst = max((model.role_memory(r) for r in model.roles), key=lambda m: m["peak_bytes"])
    gathered = worst["weights_gathered_bytes"] + worst["grads_gathered_bytes"]
    states = worst["weights_bytes"] + worst["grads_bytes"] + worst["optimizer_bytes"] - gathered
    return {"peak_bytes": worst["peak_bytes"], "peak_phase": worst["peak_phase"],
            "activations_bytes": worst["activations_bytes"], "states_bytes": states}


def measure(name: str, overrides: list[str], steps: int, work: Path) -> dict[str, Any]:
    """One training run with live-tensor tracking, next to the prediction."""
    spec = load_spec(SPECS / "small-moe.yaml", overrides)
    plan = work / name.replace(" ", "-").replace(",", "").replace("+", "and")
    write_plan(compile_plan(spec), plan)
    launch(plan, steps, plan / "metrics.jsonl", quiet=True, track_memory=True)
    last = read_metrics(plan / "metrics.jsonl")[-1]
    measured = {"peak_bytes": last["peak_memory_bytes"], "activations_bytes": last["activation_memory_bytes"],
                "states_bytes": last["state_memory_bytes"]}
    model = predicted(spec)
    par = spec.parallelism
    imbalance = max((r["imbalance_ep_rank"] for r in last["router"].values()), default=1.0)
    row = {"zero": par.zero, "activation_checkpointing": par.activation_checkpointing, "tp": par.tp,
           "sequence_parallel": par.sequence_parallel, "measured": measured, "predicted": model,
           "peak_error": model["peak_bytes"] / measured["peak_bytes"] - 1,
           "activations_error": model["activations_bytes"] / measured["activations_bytes"] - 1,
           "states_error": model["states_bytes"] / measured["states_bytes"] - 1,
           "router_imbalance_ep_rank": imbalance, "seconds_per_step": last["seconds"]}
    print(f"{name:28s} peak {measured['peak_bytes'] / MIB:7.1f} MiB, model {model['peak_bytes'] / MIB:7.1f} "
          f"({row['peak_error']:+.1%}, {model['peak_phase']}); activations {measured['activations_bytes'] / MIB:6.1f}"
          f", model {model['activations_bytes'] / MIB:6.1f}; states {row['states_error']:+.2%}; "
          f"EP imbalance {imbalance:.2f}", flush=True)
    return row


def resident(rank) -> list:
    """The tensors a serving rank holds between steps: its weights (packed experts' tensors included) and
    its KV cache."""
    import torch
    from torch.utils._pytree import tree_leaves

    out = [*rank.cache.k.values(), *rank.cache.v.values()]
    for w in {id(w): w for w in rank.params.values()}.values():
        out += [t for t in tree_leaves(w if isinstance(w, torch.Tensor) else vars(w)) if isinstance(t, torch.Tensor)]
    return out


def measure_serve(work: Path) -> dict[str, Any]:
    """Serving small-moe on one rank in this process: live tensor bytes from the weights and KV cache on, their
    peak over every step of a full batch, next to the report's serve memory."""
    import torch

    from lcc.runtime.memory import LiveTensorBytes
    from lcc.serve.engine import Engine
    from lcc.serve.rank import ServeRank
    from lcc.serve.sampling import SamplingParams

    spec = load_spec(SPECS / "small-moe.yaml", SERVE)
    write_plan(compile_plan(spec, "serve"), work / "serve")
    rank = ServeRank(work / "serve", 0)
    engine = Engine(rank)
    serve = spec.serve
    g = torch.Generator().manual_seed(0)
    for _ in range(serve.max_batch):
        prompt = torch.randint(0, spec.model.vocab_size, (serve.max_seq_len - 8,), generator=g).tolist()
        engine.submit(prompt, SamplingParams(max_tokens=8))
    memory = LiveTensorBytes()
    memory.track(resident(rank))
    held = memory.live
    with memory:
        while engine.has_work:
            engine.step()
    report = cost_report(spec)["serve"]
    role = report["by_role"][0]
    row = {"measured": {"peak_bytes": memory.peak, "weights_and_kv_cache_bytes": held,
                        "workspace_bytes": memory.peak - held},
           "predicted": {"peak_bytes": report["worst_rank_bytes"], "weights_bytes": role["weights_bytes"],
                         "kv_cache_bytes": role["kv_cache_bytes"], "workspace_bytes": role["workspace_bytes"]},
           "peak_error": report["worst_rank_bytes"] / memory.peak - 1,
           "max_batch": serve.max_batch, "max_seq_len": serve.max_seq_len,
           "max_batched_tokens": serve.max_batched_tokens, "dtype": serve.dtype}
    print(f"{'serve':28s} peak {memory.peak / MIB:7.1f} MiB, model {report['worst_rank_bytes'] / MIB:7.1f} "
          f"({row['peak_error']:+.1%}); workspace {(memory.peak - held) / MIB:.2f} MiB, model "
          f"{role['workspace_bytes'] / MIB:.2f}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = {name: measure(name, overrides, args.steps, Path(tmp)) for name, overrides in SETTINGS.items()}
        serve = measure_serve(Path(tmp))
    print(f"\n{'layout':28s} {'measured MiB':>12s} {'predicted MiB':>13s} {'error':>7s}")
    for name, row in [*rows.items(), ("serve", serve)]:
        print(f"{name:28s} {row['measured']['peak_bytes'] / MIB:12.1f} {row['predicted']['peak_bytes'] / MIB:13.1f} "
              f"{row['peak_error']:+7.1%}")
    plain, sharded = rows["zero 0"], rows["zero 3 + full"]
    claim = {"measured_small_moe": 1 - sharded["measured"]["peak_bytes"] / plain["measured"]["peak_bytes"],
             "model_small_moe": 1 - sharded["predicted"]["peak_bytes"] / plain["predicted"]["peak_bytes"],
             "model_longcat_2_0": cost_report(load_spec(SPECS / "longcat-2.0.yaml"))["memory"]["comparison"][
                 "zero3_full_checkpointing_reduction"]}
    print("peak-memory reduction of ZeRO-3 + full checkpointing vs plain data parallelism: "
          f"measured (small-moe) {claim['measured_small_moe']:.1%}, model (small-moe) {claim['model_small_moe']:.1%}, "
          f"model (longcat-2.0) {claim['model_longcat_2_0']:.1%}")
    tp, sp = rows["tp 2"], rows["tp 2 + sequence parallelism"]
    for side in ("measured", "predicted"):
        claim[f"sequence_parallel_activations_{side}"] = (sp[side]["activations_bytes"]
                                                          / tp[side]["activations_bytes"])
    print(f"activations with sequence parallelism / without, at tp 2: measured "
          f"{claim['sequence_parallel_activations_measured']:.3f}, model "
          f"{claim['sequence_parallel_activations_predicted']:.3f}")
    write("memory", {"spec": "small-moe", "steps": args.steps, "settings": rows, "serve": serve,
                     "reduction": claim, "machine": machine()}, args.out)


if __name__ == "__main__":
    main()
