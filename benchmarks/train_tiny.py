"""Single-process training of specs/tiny-moe.yaml: held-out loss curve, then int4 experts.

Trains the reference model for --steps optimizer steps (default 300) on the built-in corpus, evaluates
held-out cross-entropy every --every steps, then quantizes the experts to int4 (the spec's
quantization.experts) and evaluates again. Prints and writes JSON.
Usage: python benchmarks/train_tiny.py [--steps 300] [--out benchmarks/results/train_tiny.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import torch

from lcc.model.quantized import quantize_experts
from lcc.model.trainer import ReferenceTrainer
from lcc.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", default=str(ROOT / "specs" / "tiny-moe.yaml"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--eval-sequences", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_tiny.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = load_spec(args.spec, [f"train.steps={args.steps}"])
    trainer = ReferenceTrainer(spec)
    curve = [{"step": 0, "held_out_loss": trainer.evaluate(args.eval_sequences)}]
    print(f"step 0: held-out {curve[0]['held_out_loss']:.4f} (ln vocab = {math.log(spec.model.vocab_size):.4f})")
    start = time.perf_counter()
    last = {}
    for step in range(args.steps):
        last = trainer.train_step(step)
        if (step + 1) % args.every == 0 or step + 1 == args.steps:
            point = {"step": step + 1, "train_loss": last["loss"],
                     "held_out_loss": trainer.evaluate(args.eval_sequences),
                     "experts_per_token": last["router"][0]["experts_per_token"],
                     "imbalance_expert": last["router"][0]["imbalance_expert"]}
            curve.append(point)
            print(f"step {step + 1}: train {point['train_loss']:.4f} held-out {point['held_out_loss']:.4f} "
                  f"k {point['experts_per_token']:.2f} imbalance {point['imbalance_expert']:.2f} "
                  f"({time.perf_counter() - start:.0f} s)")
    seconds = time.perf_counter() - start
    dense = curve[-1]["held_out_loss"]
    packed = quantize_experts(trainer.model, spec.quantization.experts)
    quant = trainer.evaluate(args.eval_sequences)
    result = {
        "benchmark": "train_tiny", "spec": spec.name, "steps": args.steps,
        "tokens_per_step": spec.train.global_batch * spec.train.seq_len,
        "seconds": seconds, "tokens_per_second": args.steps * spec.train.global_batch * spec.train.seq_len / seconds,
        "ln_vocab": math.log(spec.model.vocab_size), "curve": curve,
        "held_out_loss_float32": dense, "held_out_loss_int4": quant,
        "int4_loss_increase": (quant - dense) / dense, "int4_expert_bytes": packed,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads,
                    "torch": torch.__version__},
    }
    print(f"held-out loss {dense:.4f} -> int4 experts {quant:.4f} ({result['int4_loss_increase']:+.2%})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
