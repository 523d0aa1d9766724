"""Hiding communication, measured side by side: the overlapped expert exchange (parallelism.expert_overlap)
against the plain one, and the zero-bubble schedule zb_h1 against 1f1b.

tiny-moe in float32 on 2 local gloo ranks: dp 2 x ep 2 for the exchange, pp 2 (4 micro-batches) for the
schedules. All plans' runs alternate for --rounds rounds; each run trains --steps steps and its tokens/s is the
median over the steps after the first two. Reported: each plan's median, the median of the rounds' ratios
(overlap / plain, zb_h1 / 1f1b), the simulator's bubble of each schedule, and from a traced run of the
overlapped plan (`lcc run train --trace`) the share of the step the exchange spends in flight and the
share of its in-flight time that overlaps the experts' compute on the same rank.
Usage: python benchmarks/overlap.py [--rounds 3] [--steps 8] [--out benchmarks/results/overlap.json]
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
from lcc.compiler.plan import compile_plan
from lcc.runtime.launch import launch, read_metrics
from lcc.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["cluster.gpus_per_node=2", "train.global_batch=16", "train.seq_len=256", "train.dtype=float32"]
LAYOUT = [*COMMON, "parallelism.pp=1", "parallelism.dp=2", "parallelism.ep=2", "parallelism.pipeline.microbatches=2"]
PIPELINE = [*COMMON, "parallelism.pp=2", "parallelism.dp=1", "parallelism.ep=1", "parallelism.pipeline.microbatches=4"]
PLANS = {"plain": LAYOUT, "overlap": [*LAYOUT, "parallelism.expert_overlap=true"],
         "1f1b": PIPELINE, "zb_h1": [*PIPELINE, "parallelism.pipeline.schedule=zb_h1"]}


def run(plan: Path, steps: int, work: Path, trace: Path | None = None) -> float:
    metrics = work / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    launch(plan, steps, metrics, quiet=True, trace=trace)
    return statistics.median(m["tokens_per_second"] for m in read_metrics(metrics)[2:])


def overlap_shares(trace: Path) -> dict[str, float]:
    """From a trace: the exchange's in-flight time as a share of the traced actions' time, and the share of it
    during which the same rank's experts computed."""
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e["ph"] == "X"]
    flight = overlapped = actions = 0.0
    for rank in {e["pid"] for e in events}:
        mine = [e for e in events if e["pid"] == rank]
        compute = [(e["ts"], e["ts"] + e["dur"]) for e in mine if e["tid"] == 1]
        actions += sum(e["dur"] for e in mine if e["tid"] == 0)
        for e in (e for e in mine if e["tid"] == 2):
            a, b = e["ts"], e["ts"] + e["dur"]
            flight += b - a
            overlapped += sum(max(0.0, min(b, d) - max(a, c)) for c, d in compute)
    return {"exchange_in_flight_share_of_step": flight / actions if actions else 0.0,
            "exchange_overlapped_by_experts": overlapped / flight if flight else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lcc-overlap-"))
    plans, bubbles = {}, {}
    for name, overrides in PLANS.items():
        plans[name] = work / name
        plan = compile_plan(load_spec(ROOT / "specs" / "tiny-moe.yaml", overrides))
        write_plan(plan, plans[name])
        bubbles[name] = json.loads((plans[name] / "plan.json").read_text())["schedule"]["simulation"]["bubble_fraction"]
    rates: dict[str, list[float]] = {name: [] for name in plans}
    for r in range(args.rounds):
        for name, plan in plans.items():
            rates[name].append(run(plan, args.steps, work))
        print(f"round {r + 1}: " + ", ".join(f"{n} {v[-1]:,.0f}" for n, v in rates.items()) + " tokens/s", flush=True)
    run(plans["overlap"], 4, work, work / "trace.json")
    shares = overlap_shares(work / "trace.json")

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(rates[a], rates[b], strict=True))

    result = {"plans": PLANS, "steps": args.steps, "rounds": args.rounds,
              "tokens_per_second": {k: statistics.median(v) for k, v in rates.items()}, "runs": rates,
              "overlap_over_plain": ratio("overlap", "plain"), "zb_h1_over_1f1b": ratio("zb_h1", "1f1b"),
              "simulated_bubble": {k: bubbles[k] for k in ("1f1b", "zb_h1")}, **shares, "machine": machine()}
    print(json.dumps({k: v for k, v in result.items() if k not in ("machine", "runs", "plans")}, indent=1))
    write("overlap", result, args.out)


if __name__ == "__main__":
    main()
