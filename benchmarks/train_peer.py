"""A training step of lcc against transformers' own, on the same Qwen3-MoE weights and the same tokens.

The model (made here with transformers, random weights, float32): 4 layers, d_model 512, 8 query and 4
key-value heads of 64, 64 experts of width 256, top 4 renormalised, vocabulary 4096; sequences of 256
tokens, 8 per step. lcc imports it with `lcc import hf` and `lcc checkpoint import-hf`.

- World 1, in one process: lcc's rank engine (the compiled plan's program; eager, and with
  `train.compile: inductor`, its compile time reported apart) and transformers' Qwen3MoeForCausalLM (its
  default experts implementation) with the optimizer transformers' Trainer uses by default
  (torch.optim.AdamW, fused), clipping to the same norm. Steps alternate, each side fed the sequences of
  lcc's step; float32, and bfloat16 under autocast on both sides (float32 master weights). The sides'
  first-step losses are printed: they must agree, or the comparison is void.
- Two gloo ranks: lcc at dp 2 and at ep 2 x dp 2 (`lcc run train`'s launcher) against transformers under
  FSDP2 (`torch.distributed.fsdp.fully_shard` per decoder layer and at the root), each rank fed its half of
  the step's sequences. Launches alternate; each reports its steps' wall times on rank 0.

Tokens/s are per process: tokens of a step / median step seconds (after warm-up) / processes.
Needs the bench extra: pip install -e ".[bench]".
Both sides' processes run with the same host memory setting (`--host-malloc`, default `reuse`: freed
memory kept for the next step, as lcc's ranks run; docs/runtime.md, "Host memory").
Usage: python -m benchmarks.train_peer [--steps 6] [--warmup 2] [--threads 2] [--skip-multi] [--skip-compile]
       [--hf-experts grouped_mm] [--host-malloc reuse|system] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also run as a file: python benchmarks/x.py

from benchmarks.common import machine, write  # noqa: E402

CONFIG = dict(vocab_size=4096, hidden_size=512, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
              num_hidden_layers=4, num_experts=64, moe_intermediate_size=256, num_experts_per_tok=4,
              norm_topk_prob=True, intermediate_size=1024, max_position_embeddings=1024, rms_norm_eps=1e-6,
              tie_word_embeddings=False)
SEQ_LEN, BATCH = 256, 8
# lcc's expert gradient shaping has no counterpart in transformers: the same update rule on both sides
COMMON = [f"train.seq_len={SEQ_LEN}", f"train.global_batch={BATCH}", "train.gradient_shaping.experts=none"]
TWO = ["parallelism.dp=2", "cluster.gpus_per_node=2"]
LAYOUTS = {"dp2": TWO, "ep2_dp2": [*TWO, "parallelism.ep=2"]}


def make_model(base: Path) -> tuple[Path, Path, Path]:
    """The transformers model saved in base/hf, lcc's spec of it and its weights as an lcc checkpoint."""
    import transformers as tf

    from lcc.cli import app

    hf_dir, spec, ckpt = base / "hf", base / "spec.yaml", base / "ckpt"
    torch.manual_seed(0)
    model = tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(**CONFIG))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0.0, 0.02)
    model.save_pretrained(hf_dir)
    for args in (["import", "hf", hf_dir, "--out", spec],
                 ["checkpoint", "import-hf", hf_dir, "--spec", spec, "--out", ckpt]):
        try:
            app([str(a) for a in args], standalone_mode=False)
        except SystemExit as exc:
            if exc.code:
                raise
    return hf_dir, spec, ckpt


def compiled(spec_path: Path, overrides: list[str], out: Path) -> Path:
    from lcc.compiler.output import write as write_plan
    from lcc.compiler.plan import compile_plan
    from lcc.spec import load_spec

    write_plan(compile_plan(load_spec(spec_path, overrides)), out)
    return out


HF_EXPERTS = "grouped_mm"  # transformers' default experts implementation; --hf-experts picks another


def hf_model(hf_dir: Path, experts: str) -> torch.nn.Module:
    import transformers as tf

    tf.utils.logging.disable_progress_bar()
    return tf.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                   experts_implementation=experts).train()


def hf_optimizer(model: torch.nn.Module, spec) -> torch.optim.Optimizer:
    """What transformers' Trainer builds by default (adamw_torch_fused), with the spec's settings."""
    opt = spec.train.optimizer
    return torch.optim.AdamW(model.parameters(), lr=opt.lr, betas=opt.betas, eps=opt.eps,
                             weight_decay=opt.weight_decay, fused=True)


def hf_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, tokens: torch.Tensor, clip: float,
            bf16: bool) -> float:
    """One training step as transformers trains: forward, cross-entropy, backward, clip, AdamW."""
    context = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with context:
        logits = model(input_ids=tokens[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def step_tokens(engine, step: int) -> torch.Tensor:
    """The sequences of lcc's step `step` (every unit of it: world 1)."""
    from lcc.data.stream import units_of_step

    data = engine.plan.data
    return torch.cat(units_of_step(engine.stream, data.global_batch, data.units_per_step, step))


def world_one(base: Path, hf_dir: Path, spec_path: Path, ckpt: Path, dtype: str, steps: int, warmup: int,
              experts: str, compile_too: bool) -> dict:
    """lcc's engine (eager, and compiled with `compile_too`) and transformers, round-robin step by step."""
    from lcc.runtime.engine import RankEngine
    from lcc.spec import load_spec

    overrides = [*COMMON, f"train.dtype={dtype}"]
    spec = load_spec(spec_path, overrides)
    engines = {}
    for side, mode in (("lcc", "none"), ("lcc_inductor", "inductor"))[:2 if compile_too else 1]:
        plan = compiled(spec_path, [*overrides, f"train.compile={mode}"], base / f"plan-{dtype}-{mode}")
        engines[side] = RankEngine(plan, 0, spec_dir=spec_path.parent)
        engines[side].load_weights(ckpt)
    model = hf_model(hf_dir, experts)
    optimizer = hf_optimizer(model, spec)
    times: dict[str, list[float]] = {side: [] for side in (*engines, "transformers")}
    losses: dict[str, list[float]] = {side: [] for side in times}
    compile_seconds = 0.0
    for step in range(warmup + steps):
        tokens = step_tokens(engines["lcc"], step)
        for side, engine in engines.items():
            start = time.perf_counter()
            record = engine.train_step(step)
            times[side].append(time.perf_counter() - start - record.get("compile_seconds", 0.0))
            compile_seconds += record.get("compile_seconds", 0.0)
            losses[side].append(record["loss"])
        start = time.perf_counter()
        losses["transformers"].append(hf_step(model, optimizer, tokens, spec.train.optimizer.grad_clip,
                                              dtype == "bfloat16"))
        times["transformers"].append(time.perf_counter() - start)
    out = summary(times, losses, warmup, BATCH * SEQ_LEN, processes=1)
    if compile_too:
        tps = out["tokens_per_second_per_process"]
        out["lcc_inductor_over_transformers"] = tps["lcc_inductor"] / tps["transformers"]
        out["lcc_inductor_compile_seconds"] = compile_seconds
    return out


def summary(times: dict[str, list[float]], losses: dict[str, list[float]], warmup: int, tokens: int,
            processes: int) -> dict:
    seconds = {side: statistics.median(t[warmup:]) for side, t in times.items()}
    per_process = {side: tokens / s / processes for side, s in seconds.items()}
    return {"step_seconds": seconds, "tokens_per_second_per_process": per_process,
            "lcc_over_transformers": per_process["lcc"] / per_process["transformers"],
            "first_losses": {side: v[0] for side, v in losses.items()},
            "last_losses": {side: v[-1] for side, v in losses.items()}}


# ------------------------------------------------------------------------------------- two ranks
def _fsdp_rank(rank: int, rendezvous: str, hf_dir: str, experts: str, spec_path: str, steps: int, out: str) -> None:
    import json

    from lcc.runtime.host_memory import keep_freed_memory

    keep_freed_memory()  # as lcc's ranks do (LCC_HOST_MALLOC, set by --host-malloc, decides for both sides)

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from lcc.data.stream import TokenStream, corpus_tokens, split_corpus, units_of_step
    from lcc.spec import load_spec

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    spec = load_spec(spec_path, [*COMMON, *LAYOUTS["dp2"]])
    model = hf_model(Path(hf_dir), experts)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = hf_optimizer(model, spec)
    train, _ = split_corpus(corpus_tokens(spec, Path(spec_path).parent))
    stream = TokenStream(train, SEQ_LEN)
    units = 2 * spec.parallelism.pipeline.microbatches
    times, losses = [], []
    for step in range(steps):
        tokens = units_of_step(stream, BATCH, units, step)[rank]  # lcc's dp rank `rank` trains on this unit
        start = time.perf_counter()
        loss = hf_step(model, optimizer, tokens, spec.train.optimizer.grad_clip, False)
        times.append(time.perf_counter() - start)
        mean = torch.tensor(loss / 2)  # the step's loss over both ranks' tokens, as lcc reports it
        dist.all_reduce(mean)
        losses.append(float(mean))
    if rank == 0:
        Path(out).write_text(json.dumps({"seconds": times, "losses": losses}))
    dist.destroy_process_group()


def two_ranks(base: Path, hf_dir: Path, spec_path: Path, ckpt: Path, steps: int, warmup: int, rounds: int,
              experts: str) -> dict:
    import json

    import torch.multiprocessing as mp

    from lcc.runtime.launch import launch, read_metrics

    results = {}
    for name, layout in LAYOUTS.items():
        plan = compiled(spec_path, [*COMMON, *layout], base / f"plan-{name}")
        times: dict[str, list[float]] = {"lcc": [], "transformers": []}
        losses: dict[str, list[float]] = {"lcc": [], "transformers": []}
        for r in range(rounds):
            metrics = base / f"{name}-{r}.jsonl"
            launch(plan, warmup + steps, metrics, quiet=True, init_from=ckpt)
            records = read_metrics(metrics)
            times["lcc"] += [rec["seconds"] for rec in records][warmup:]
            losses["lcc"] = [rec["loss"] for rec in records]
            out = base / f"fsdp-{name}-{r}.json"
            rendezvous = base / f"fsdp-{name}-{r}.rendezvous"
            mp.spawn(_fsdp_rank, args=(str(rendezvous), str(hf_dir), experts, str(spec_path), warmup + steps, str(out)),
                     nprocs=2)
            fsdp = json.loads(out.read_text())
            times["transformers"] += fsdp["seconds"][warmup:]
            losses["transformers"] = fsdp["losses"]
        results[name] = summary(times, losses, 0, BATCH * SEQ_LEN, processes=2)
        results[name]["transformers_side"] = "FSDP2 (fully_shard per decoder layer and the root), dp 2"
    return results


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per side (after warm-up)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="alternating launches per side at two ranks")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--skip-multi", action="store_true")
    parser.add_argument("--skip-compile", action="store_true", help="leave out lcc with train.compile: inductor")
    parser.add_argument("--hf-experts", default=HF_EXPERTS, help="transformers' experts implementation: "
                        "grouped_mm (its default), eager or batched_mm")
    parser.add_argument("--host-malloc", choices=("reuse", "system"), default="reuse",
                        help="glibc's malloc thresholds for both sides' processes: reuse (what lcc's ranks run "
                             "with) or system (glibc's defaults); docs/runtime.md, \"Host memory\"")
    parser.add_argument("--out")
    args = parser.parse_args()
    os.environ["LCC_HOST_MALLOC"] = args.host_malloc  # lcc's ranks, the FSDP2 ranks and this process alike
    from lcc.runtime.host_memory import keep_freed_memory

    keep_freed_memory()
    try:
        import transformers  # noqa: F401
    except ImportError:
        sys.exit("transformers is not installed: pip install -e '.[bench]'")
    torch.set_num_threads(args.threads)
    result: dict = {"machine": {**machine(), "cpu": cpu_name()}, "model": CONFIG, "seq_len": SEQ_LEN,
                    "global_batch": BATCH, "hf_experts": args.hf_experts, "host_malloc": args.host_malloc,
                    "world1": {}, "two_ranks": {}}
    with tempfile.TemporaryDirectory(prefix="lcc-train-peer-") as tmp:
        base = Path(tmp)
        hf_dir, spec_path, ckpt = make_model(base)
        for dtype in args.dtypes:
            r = world_one(base, hf_dir, spec_path, ckpt, dtype, args.steps, args.warmup, args.hf_experts,
                          not args.skip_compile)
            result["world1"][dtype] = r
            tps = r["tokens_per_second_per_process"]
            print(f"world 1, {dtype}: lcc {tps['lcc']:.0f} tokens/s, transformers {tps['transformers']:.0f} "
                  f"tokens/s: {r['lcc_over_transformers']:.2f}x (first losses: lcc "
                  f"{r['first_losses']['lcc']:.5f}, transformers {r['first_losses']['transformers']:.5f})")
            if "lcc_inductor" in tps:
                print(f"  lcc compiled (train.compile: inductor): {tps['lcc_inductor']:.0f} tokens/s, "
                      f"{r['lcc_inductor_over_transformers']:.2f}x; compiling took "
                      f"{r['lcc_inductor_compile_seconds']:.1f} s (not in its step times)")
        if not args.skip_multi:
            result["two_ranks"] = two_ranks(base, hf_dir, spec_path, ckpt, args.steps, args.warmup, args.rounds,
                                           args.hf_experts)
            for name, r in result["two_ranks"].items():
                tps = r["tokens_per_second_per_process"]
                print(f"2 ranks, lcc {name} against transformers FSDP2: lcc {tps['lcc']:.0f}, transformers "
                      f"{tps['transformers']:.0f} tokens/s per process: {r['lcc_over_transformers']:.2f}x "
                      f"(first losses {r['first_losses']['lcc']:.5f} / {r['first_losses']['transformers']:.5f})")
    write("train_peer", result, args.out)


if __name__ == "__main__":
    main()
