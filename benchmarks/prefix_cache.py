"""Prefix caching (serve.prefix_caching) against none, side by side: time to first token of requests that share
most of their context.

small-moe served at world 1 (int4 experts, --dtype, default bfloat16) by two engines in this process, one
with prefix caching and one without; a shared prefix of --prefix random token ids (400 of small-moe's 512),
then --requests requests, each the prefix and --suffix different random ids, greedy, --max-tokens tokens,
one at a time, the two engines alternating request by request. Time to first token: from submitting the
request until the step that samples its first token has returned. Reported: each engine's median and p90
TTFT, their ratio, the prefix cache's hit share, and whether every request's tokens are equal.
Usage: python benchmarks/prefix_cache.py [--requests 200] [--prefix 400] [--suffix 16] [--max-tokens 4]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also run as a file: python benchmarks/x.py

from benchmarks.common import machine, write
from lcc.cache import write_atomically
from lcc.compiler.plan import compile_plan
from lcc.serve.engine import Engine
from lcc.serve.rank import ServeRank
from lcc.serve.sampling import SamplingParams
from lcc.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
SETS = ["model.moe.n_shared_experts=0", "parallelism.dp=1", "parallelism.ep=1", "cluster.gpus_per_node=1"]


def first_token_seconds(engine: Engine, prompt: list[int], max_tokens: int) -> tuple[float, list[int]]:
    start = time.perf_counter()
    rid = engine.submit(prompt, SamplingParams(max_tokens=max_tokens))
    first, tokens = None, []
    while engine.has_work:
        for u in engine.step():
            if u.request == rid:
                if first is None and u.token_ids:
                    first = time.perf_counter() - start
                tokens += u.token_ids
    return first, tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--prefix", type=int, default=400)
    parser.add_argument("--suffix", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="lcc-prefix-"))
    engines = {}
    for caching in ("off", "on"):
        spec = load_spec(ROOT / "specs" / "small-moe.yaml",
                         [*SETS, f"serve.dtype={args.dtype}", f"serve.prefix_caching={caching == 'on'}".lower()])
        write_atomically(compile_plan(spec, "serve"), work / caching)
        engines[caching] = Engine(ServeRank(work / caching, 0))
    rng = random.Random(0)
    vocab = engines["on"].rank.spec.model.vocab_size
    prefix = [rng.randrange(vocab) for _ in range(args.prefix)]
    prompts = [prefix + [rng.randrange(vocab) for _ in range(args.suffix)] for _ in range(args.requests + 1)]
    for engine in engines.values():  # warm-up, and the request that fills the cache
        first_token_seconds(engine, prompts[0], args.max_tokens)
    ttft: dict[str, list[float]] = {k: [] for k in engines}
    outputs: dict[str, list[list[int]]] = {k: [] for k in engines}
    for i, prompt in enumerate(prompts[1:]):
        for name in (("off", "on") if i % 2 == 0 else ("on", "off")):
            seconds, tokens = first_token_seconds(engines[name], prompt, args.max_tokens)
            ttft[name].append(seconds)
            outputs[name].append(tokens)
    blocks = engines["on"].scheduler.blocks[0]
    equal = sum(a == b for a, b in zip(outputs["on"], outputs["off"], strict=True))
    result = {
        "requests": args.requests, "prefix": args.prefix, "suffix": args.suffix, "dtype": args.dtype,
        "ttft_median_s": {k: statistics.median(v) for k, v in ttft.items()},
        "ttft_p90_s": {k: sorted(v)[int(0.9 * (len(v) - 1))] for k, v in ttft.items()},
        "ttft_off_over_on": statistics.median(ttft["off"]) / statistics.median(ttft["on"]),
        "prefix_hit_share": blocks.hit_tokens / blocks.query_tokens,
        "equal_outputs": f"{equal} of {args.requests}", "machine": machine(),
    }
    for engine in engines.values():
        engine.close()
    print({k: v for k, v in result.items() if k != "machine"})
    write("prefix_cache", result, args.out)


if __name__ == "__main__":
    main()
