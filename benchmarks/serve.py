"""Serving on CPU, side by side in one run (ratios are what to read; the machine is shared and noisy).

1. Offline generation: small-moe with int4 experts (bfloat16 activations, PyTorch's packed int4 kernel)
   served by lcc's engine at world 1 (`--set serve.max_batch=32 model.moe.n_shared_experts=0`), against
   transformers' `generate` on a Qwen3-MoE of the same shape (d_model 512, 8 layers, 8 query and 4 key/value
   heads of 64, 16 experts of width 512, 2 experts per token, bfloat16, random weights). Both: the same
   random prompts of 32 tokens, greedy, exactly 64 new tokens each, the same threads; tokens/s = new tokens
   / wall time of the whole generation (prefill included), batch 1 and 32, runs alternated, median. A third
   side is lcc with unquantised bfloat16 experts (`quantization.experts=null`): the like-for-like ratio;
   the int4 ratio compares int4 experts with transformers' bfloat16 ones.
2. Routing decisions at LongCat-2.0 shapes (d_model 4096, 16,000 experts in 128 groups, 4 kept groups,
   k 1-4) for a decode batch: the plain path (lcc's reference router on the served weights) against the
   precomputed routing tables, deciding through torch and through lcc's native CPU router (what a CPU serve
   plan runs: serving.routing_kernel native_cpu), bfloat16 and float32 served weights.
3. Memory: each rank's measured weight and KV cache bytes against `lcc report --mode serve`, for the
   shipped tiny-moe and small-moe layouts (ranks built in this process, no process group needed).

Needs the bench extra (transformers): pip install -e ".[bench]".
Usage: python -m benchmarks.serve [--repeats 3] [--threads 2] [--only offline,routing,memory]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also run as a file: python benchmarks/x.py

from benchmarks.common import interleaved, machine, write
from lcc.cache import write_atomically
from lcc.compiler.cost import cost_report
from lcc.compiler.plan import compile_plan
from lcc.model.routing import RouterMath
from lcc.ops.serve import RoutingTables, serving_routing
from lcc.serve.engine import Engine
from lcc.serve.rank import ServeRank
from lcc.serve.sampling import SamplingParams
from lcc.spec import load_spec

SPECS = Path(__file__).resolve().parents[1] / "specs"
PROMPT, NEW = 32, 64
SMALL = ["serve.max_batch=32", "model.moe.n_shared_experts=0", "parallelism.dp=1", "parallelism.ep=1",
         "cluster.gpus_per_node=1"]


def qwen3_moe(spec):
    try:
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    except ImportError:
        sys.exit("benchmarks.serve needs transformers: pip install -e \".[bench]\"")
    m = spec.model
    cfg = Qwen3MoeConfig(vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.moe.expert_d_ff,
                         num_hidden_layers=m.n_layers, num_attention_heads=m.attention.n_heads,
                         num_key_value_heads=m.attention.n_kv_heads, head_dim=m.attention.head_dim,
                         num_experts=m.moe.n_experts, num_experts_per_tok=spec.routing.k.max,
                         moe_intermediate_size=m.moe.expert_d_ff, decoder_sparse_step=1, mlp_only_layers=[],
                         max_position_embeddings=m.max_seq_len, tie_word_embeddings=m.tie_embeddings,
                         rope_theta=m.attention.rope_theta)
    torch.manual_seed(0)
    return Qwen3MoeForCausalLM(cfg).to(torch.bfloat16).eval()


def serve_rank(overrides: list[str]) -> ServeRank:
    spec = load_spec(SPECS / "small-moe.yaml", overrides)
    plan_dir = Path(tempfile.mkdtemp()) / "plan"
    write_atomically(compile_plan(spec, "serve"), plan_dir)
    return ServeRank(plan_dir, 0)


def offline(repeats: int) -> dict:
    """lcc with int4 experts (int4 against transformers' bfloat16: not like for like) and lcc with unquantised
    bfloat16 experts (`quantization.experts: null`: like for like), against transformers in bfloat16."""
    spec = load_spec(SPECS / "small-moe.yaml", SMALL)
    ranks = {"lcc": serve_rank(SMALL), "lcc_bf16": serve_rank([*SMALL, "quantization.experts=null"])}
    rank = ranks["lcc"]
    hf = qwen3_moe(spec)
    out = {"spec": "small-moe --set " + " ".join(SMALL[:2]), "prompt_tokens": PROMPT, "new_tokens": NEW,
           "expert_kernel": rank.plan.serving.expert_kernel, "dtype": rank.plan.serving.dtype, "batches": {},
           "lcc_bf16_expert_kernel": ranks["lcc_bf16"].plan.serving.expert_kernel}
    for batch in (1, 32):
        g = torch.Generator().manual_seed(batch)
        prompts = [torch.randint(0, 256, (PROMPT,), generator=g).tolist() for _ in range(batch)]
        ids = torch.tensor(prompts)

        def lcc_run(prompts=prompts, batch=batch, rank=rank) -> int:
            engine = Engine(rank, max_batched_tokens=batch * PROMPT)  # the prefill in one step, as transformers
            for p in prompts:
                engine.submit(p, SamplingParams(max_tokens=NEW))
            return sum(len(u.token_ids) for u in engine.run())

        def lcc_bf16_run(prompts=prompts, batch=batch) -> int:
            return lcc_run(prompts, batch, ranks["lcc_bf16"])

        def hf_run(ids=ids) -> int:
            with torch.no_grad():
                o = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW,
                                do_sample=False, pad_token_id=0)
            return (o.shape[1] - PROMPT) * o.shape[0]

        sides = (("lcc", lcc_run), ("lcc_bf16", lcc_bf16_run), ("transformers", hf_run))
        times: dict[str, list[float]] = {name: [] for name, _ in sides}
        for _, fn in sides:
            fn()  # warm-up
        for _ in range(repeats):
            for name, fn in sides:
                start = time.perf_counter()
                produced = fn()
                times[name].append(time.perf_counter() - start)
                assert produced == batch * NEW, (name, produced)
        rate = {k: batch * NEW / statistics.median(v) for k, v in times.items()}
        out["batches"][str(batch)] = {"lcc_tokens_per_s": rate["lcc"], "transformers_tokens_per_s":
                                      rate["transformers"], "ratio": rate["lcc"] / rate["transformers"],
                                      "lcc_bf16_tokens_per_s": rate["lcc_bf16"],
                                      "ratio_bf16": rate["lcc_bf16"] / rate["transformers"],
                                      "seconds": {k: v for k, v in times.items()}}
        print(f"batch {batch:>2}: lcc int4 experts {rate['lcc']:7.1f} tokens/s, transformers bf16 "
              f"{rate['transformers']:7.1f} tokens/s: {rate['lcc'] / rate['transformers']:.2f}x (int4 against bf16); "
              f"lcc bf16 {rate['lcc_bf16']:7.1f} tokens/s: {rate['lcc_bf16'] / rate['transformers']:.2f}x (like for "
              "like)", flush=True)
    return out


def routing(repeats: int) -> dict:
    spec = load_spec(SPECS / "longcat-2.0.yaml")
    moe, cfg = spec.model.moe, serving_routing(spec.routing)
    D, E, G = spec.model.d_model, moe.n_experts, moe.n_groups
    g = torch.Generator().manual_seed(0)
    centroids = torch.randn(G, D, generator=g)
    weight = torch.randn(E, D, generator=g) / D**0.5
    bias = torch.randn(E, generator=g, dtype=torch.float64) * 1e-3
    out = {}
    for dtype in (torch.bfloat16, torch.float32):
        c, w = centroids.to(dtype), weight.to(dtype)
        routers = {"plain": RouterMath(c, w, bias, cfg), "tables": RoutingTables(c, w, bias, spec.routing),
                   "native": RoutingTables(c, w, bias, spec.routing, native=True)}
        for tokens in (1, 32, 256):
            x = torch.randn(tokens, D, generator=g).to(dtype)
            a = routers["plain"].route(x)
            same = {}
            for name in ("tables", "native"):
                b = routers[name].route(x)
                same[name] = bool(torch.equal(a.experts_TK[a.mask_TK], b.experts_TK[b.mask_TK]))
            t = interleaved({k: lambda x=x, r=r: r.route(x) for k, r in routers.items()}, repeats)
            key = f"{str(dtype).split('.')[-1]}, {tokens} tokens"
            out[key] = {"plain_s": t["plain"], "tables_s": t["tables"], "native_s": t["native"],
                        "reduction": 1 - t["tables"] / t["plain"], "native_reduction": 1 - t["native"] / t["plain"],
                        "same_experts": same["tables"], "native_same_experts": same["native"]}
            print(f"routing {key:>22}: plain {t['plain'] * 1e3:8.2f} ms, tables {t['tables'] * 1e3:8.2f} ms "
                  f"({100 * (1 - t['tables'] / t['plain']):5.1f}% less), native {t['native'] * 1e3:8.2f} ms "
                  f"({100 * (1 - t['native'] / t['plain']):5.1f}% less); same experts {same['tables']}, "
                  f"{same['native']}", flush=True)
    return out


def memory() -> dict:
    out = {}
    for name in ("tiny-moe", "small-moe"):
        spec = load_spec(SPECS / f"{name}.yaml")
        plan_dir = Path(tempfile.mkdtemp()) / "plan"
        write_atomically(compile_plan(spec, "serve"), plan_dir)
        report = {r["role"]: r for r in cost_report(spec)["serve"]["by_role"]}
        rows = []
        for pp in range(spec.parallelism.pp):
            rank = ServeRank(plan_dir, pp * spec.parallelism.dp * spec.parallelism.tp)  # tp 0, dp 0 of each stage
            r = report[f"pp{pp}"]
            rows.append({"rank": rank.mesh.rank, "role": f"pp{pp}", "weights_bytes": rank.weight_bytes,
                         "report_weights_bytes": r["weights_bytes"], "kv_cache_bytes": rank.cache.nbytes,
                         "report_kv_cache_bytes": r["kv_cache_bytes"]})
            print(f"{name} rank {rank.mesh.rank} (pp{pp}): weights {rank.weight_bytes / 2**20:8.2f} MiB (report "
                  f"{r['weights_bytes'] / 2**20:8.2f}), KV cache {rank.cache.nbytes / 2**20:7.2f} MiB (report "
                  f"{r['kv_cache_bytes'] / 2**20:7.2f})", flush=True)
        out[name] = rows
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default="offline,routing,memory")
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    parts = args.only.split(",")
    result = {"machine": machine()}
    if "memory" in parts:
        result["memory"] = memory()
    if "routing" in parts:
        result["routing"] = routing(max(5, args.repeats * 3))
    if "offline" in parts:
        result["offline"] = offline(args.repeats)
    write("serve", result, args.out)
    print(json.dumps({k: v for k, v in result.items() if k == "machine"}))


if __name__ == "__main__":
    main()
