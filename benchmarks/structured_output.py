"""Structured output's cost per generated token in the engine, side by side with free generation.

small-moe served at world 1 (int4 experts, --dtype, default bfloat16; lcc's native CPU kernels where the
CPU runs them, else PyTorch's), one engine; rounds of --batch
requests at once, sampled (temperature 1, seeded), alternating between free generation and generation held to
SCHEMA (`response_format` json_schema, compiled by llguidance as the server compiles it), --rounds rounds of
each. A constrained request ends when its JSON is complete, so the comparison is per generated token: the
seconds of each round over the tokens it generated. Also measured inside the constrained rounds: the time in
the grammar itself (the allowed-token mask and advancing the matcher), per constrained token.
Usage: python benchmarks/structured_output.py [--batch 1,16] [--rounds 6] [--max-tokens 96] [--dtype bfloat16]
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

from lcc.backends.cpu import native

from benchmarks.common import machine, write
from benchmarks.grammar_libraries import SCHEMA  # the schema the libraries were chosen on
from lcc.cache import write_atomically
from lcc.compiler.plan import compile_plan
from lcc.serve import structured
from lcc.serve.engine import Engine
from lcc.serve.rank import ServeRank
from lcc.serve.sampling import SamplingParams
from lcc.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
SETS = ["model.moe.n_shared_experts=0", "parallelism.dp=1", "parallelism.ep=1", "cluster.gpus_per_node=1",
        "serve.prefix_caching=false"]


class GrammarClock:
    """Seconds spent in Constraint.allowed and Constraint.advance, and how many of each."""

    def __init__(self) -> None:
        self.seconds, self.calls = 0.0, 0
        for name in ("allowed", "advance"):
            real = getattr(structured.Constraint, name)
            setattr(structured.Constraint, name, self._timed(real))

    def _timed(self, real):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1
        return timed


def round_seconds(engine: Engine, batch: int, params: SamplingParams, seed: int) -> tuple[float, int]:
    prompts = [list(f"record {seed}-{i}: ".encode()) for i in range(batch)]
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.submit(p, SamplingParams(**{**params.__dict__, "seed": seed * 1000 + i}))
    tokens = sum(len(u.token_ids) for u in engine.run())
    return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", default="1,16")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="lcc-structured-"))
    kernels = "native" if native.unavailable() is None else "torch"  # lcc's need AVX2 or AVX-512
    spec = load_spec(ROOT / "specs" / "small-moe.yaml", [*SETS, f"serve.dtype={args.dtype}", "serve.max_batch=16",
                                                         f"serve.cpu_kernels={kernels}"])
    write_atomically(compile_plan(spec, "serve"), work)
    engine = Engine(ServeRank(work, 0))
    clock = GrammarClock()
    grammar = engine.grammars.compile("json_schema", SCHEMA)
    free = SamplingParams(max_tokens=args.max_tokens, temperature=1.0)
    held = SamplingParams(max_tokens=args.max_tokens, temperature=1.0, grammar=grammar)
    rows = []
    for batch in (int(b) for b in args.batch.split(",")):
        round_seconds(engine, batch, free, 0)  # warm-up
        round_seconds(engine, batch, held, 0)
        per_token: dict[str, list[float]] = {"free": [], "json_schema": []}
        grammar_s = grammar_calls = 0.0
        for r in range(args.rounds):
            for name in (("free", "json_schema") if r % 2 == 0 else ("json_schema", "free")):
                before = (clock.seconds, clock.calls)
                seconds, tokens = round_seconds(engine, batch, held if name == "json_schema" else free, r + 1)
                per_token[name].append(seconds / tokens)
                if name == "json_schema":
                    grammar_s += clock.seconds - before[0]
                    grammar_calls += (clock.calls - before[1]) / 2
        free_ms, held_ms = (statistics.median(per_token[k]) * 1e3 for k in ("free", "json_schema"))
        rows.append({"batch": batch, "ms_per_token_free": free_ms, "ms_per_token_json_schema": held_ms,
                     "overhead_ms_per_token": held_ms - free_ms, "ratio": held_ms / free_ms,
                     "grammar_us_per_constrained_token": grammar_s / grammar_calls * 1e6})
        print(rows[-1], flush=True)
    engine.close()
    write("structured_output", {"rows": rows, "dtype": args.dtype, "cpu_kernels": kernels, "rounds": args.rounds,
                                "max_tokens": args.max_tokens, "machine": machine()}, args.out)


if __name__ == "__main__":
    main()
