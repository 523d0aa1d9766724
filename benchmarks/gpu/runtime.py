"""lcc's runtimes on a CUDA GPU against the CPU: (a) `lcc run train` small-moe at world 1 for 20 steps in
float32 (TF32 off), each step's loss against the CPU's committed losses; (b) greedy `lcc run generate` of
small-moe in float64 (torch path, the reference int4 op) token for token against the CPU's committed
tokens. Both run the spec with `cluster.device.kind: cuda`, through the same CLI a user runs.

`--record-cpu` runs both on this machine's CPU and writes benchmarks/gpu/cpu_reference.json (commit it);
on a GPU machine the script compares against that file and writes runtime.json under --out.
Usage: python -m benchmarks.gpu.runtime --out DIR | --record-cpu
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = Path(__file__).resolve().parent / "cpu_reference.json"
WORLD1 = ["parallelism.dp=1", "parallelism.ep=1", "cluster.gpus_per_node=1"]
STEPS = 20
LOSS_RTOL = 2e-3  # float32 on two devices: other reduction orders, compounded over 20 AdamW steps
PROMPT = list(b"The teacher said")
NEW_TOKENS = 32
INIT_STD = 0.2  # initial weights varied enough that each greedy token is a decision (0.02 repeats one token)


def lcc(*args: str, device: str) -> subprocess.CompletedProcess:
    sets = [a for s in [*WORLD1, f"cluster.device.kind={device}"] for a in ("--set", s)]
    cmd = [sys.executable, "-m", "lcc", *args, *sets]
    print("$", " ".join(cmd[2:]), flush=True)
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, env=os.environ.copy())
    except subprocess.TimeoutExpired as exc:
        return subprocess.CompletedProcess(cmd, 124, str(exc.stdout or ""), f"timed out after {exc.timeout} s")
    if done.returncode != 0:
        print(done.stdout[-4000:], done.stderr[-4000:], sep="\n", flush=True)
    return done


def train(device: str, folder: Path) -> dict:
    metrics = folder / f"train-{device}.jsonl"
    start = time.perf_counter()
    done = lcc("run", "train", "specs/small-moe.yaml", "--steps", str(STEPS), "--metrics", str(metrics),
               device=device)
    if done.returncode != 0:
        return {"ok": False, "error": done.stderr[-2000:]}
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    return {"ok": True, "losses": [r["loss"] for r in records], "seconds": time.perf_counter() - start,
            "step_seconds": [r["seconds"] for r in records], "peak_memory_bytes": records[-1]["peak_memory_bytes"]}


def generate(device: str) -> dict:
    start = time.perf_counter()
    done = lcc("run", "generate", "specs/small-moe.yaml", "--prompt-ids", ",".join(map(str, PROMPT)), "--max-tokens",
               str(NEW_TOKENS), "--json", "--set", "serve.dtype=float64", "--set", f"train.init.std={INIT_STD}",
               device=device)
    if done.returncode != 0:
        return {"ok": False, "error": done.stderr[-2000:]}
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("{"))
    return {"ok": True, "token_ids": json.loads(line)["token_ids"], "seconds": time.perf_counter() - start}


def record_cpu() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        result = {"train": train("cpu", Path(tmp)), "generate": generate("cpu"), "steps": STEPS,
                  "prompt": PROMPT, "new_tokens": NEW_TOKENS}
    REFERENCE.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {REFERENCE}")
    return 0 if result["train"]["ok"] and result["generate"]["ok"] else 1


def compare(out: Path) -> int:
    import torch

    out.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        why = "no CUDA device (torch.cuda.is_available() is False)"
        print(f"runtime: PENDING, {why}: lcc run train / generate on CUDA need a GPU", flush=True)
        (out / "runtime.json").write_text(json.dumps({"status": "pending", "why": why}) + "\n")
        return 2
    ref = json.loads(REFERENCE.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        gpu_train = train("cuda", Path(tmp))
    result: dict = {"device": torch.cuda.get_device_name(0), "train": gpu_train, "loss_rtol": LOSS_RTOL}
    if gpu_train["ok"]:
        errors = [abs(a - b) / abs(b) for a, b in zip(gpu_train["losses"], ref["train"]["losses"], strict=True)]
        result["train_max_loss_rel_error"] = max(errors)
        result["train_ok"] = max(errors) <= LOSS_RTOL
    (out / "runtime.json").write_text(json.dumps(result, indent=1) + "\n")  # before the next part, in case it hangs
    gpu_gen = generate("cuda")
    result["generate"] = gpu_gen
    result["generate_ok"] = gpu_gen["ok"] and gpu_gen["token_ids"] == ref["generate"]["token_ids"]
    (out / "runtime.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"  train: {STEPS} steps, max loss relative error vs CPU {result.get('train_max_loss_rel_error', 'n/a')} "
          f"(<= {LOSS_RTOL}): {'ok' if result.get('train_ok') else 'FAILED'}", flush=True)
    print(f"  generate float64: {NEW_TOKENS} greedy tokens equal to the CPU's: "
          f"{'ok' if result['generate_ok'] else 'FAILED'}", flush=True)
    return 0 if result.get("train_ok") and result["generate_ok"] else 1


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/gpu/out")
    parser.add_argument("--record-cpu", action="store_true")
    args = parser.parse_args()
    return record_cpu() if args.record_cpu else compare(Path(args.out))


if __name__ == "__main__":
    sys.exit(main())
