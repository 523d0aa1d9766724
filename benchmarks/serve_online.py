"""Online serving: `lcc run serve` on 127.0.0.1 under Poisson arrivals, time to first token and inter-token
latency, next to the engine's offline figures (benchmarks/serve.py, results/serve.json).

The server: small-moe as in benchmarks/serve.py (`--set serve.max_batch=32 model.moe.n_shared_experts=0`,
world 1, int4 experts, bfloat16). The client (asyncio + httpx, bounded: `--requests` per rate, at most
`--concurrency` open, a deadline per request) sends completions of 32 random token ids, greedy, exactly
`--max-tokens` tokens, streamed, at each `--rates` requests/s (exponential gaps, fixed seed), and measures
per request: time to first token (TTFT: sent -> first event), inter-token latency (ITL: the gaps between
events after the first) and the time per output token after the first (TPOT). p50 and p99 over requests
(ITL: over all gaps).

Usage: python -m benchmarks.serve_online [--rates 1,4] [--requests 40] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also run as a file: python benchmarks/x.py

from benchmarks.common import RESULTS, machine, write

ROOT = Path(__file__).resolve().parents[1]
SETS = ["serve.max_batch=32", "model.moe.n_shared_experts=0", "parallelism.dp=1", "parallelism.ep=1",
        "cluster.gpus_per_node=1"]


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))] if s else float("nan")


async def one(client: httpx.AsyncClient, url: str, prompt: list[int], max_tokens: int, deadline_s: float) -> dict:
    sent = time.perf_counter()
    events: list[float] = []
    body = {"model": "small-moe", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    async with asyncio.timeout(deadline_s), client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(time.perf_counter())
    return {"ttft": events[0] - sent, "gaps": [b - a for a, b in zip(events, events[1:], strict=False)],
            "tpot": (events[-1] - events[0]) / max(1, max_tokens - 1), "e2e": events[-1] - sent}


async def at_rate(url: str, rate: float, n: int, max_tokens: int, concurrency: int, seed: int) -> dict:
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=concurrency)
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:
        async def later(delay: float, prompt: list[int]) -> dict:
            await asyncio.sleep(delay)
            async with gate:
                return await one(client, url, prompt, max_tokens, 300)

        start, t, tasks = time.perf_counter(), 0.0, []
        for _ in range(n):
            t += rng.expovariate(rate)
            tasks.append(asyncio.create_task(later(t, [rng.randrange(256) for _ in range(32)])))
        results = await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    ttft = [r["ttft"] for r in results]
    gaps = [g for r in results for g in r["gaps"]]
    tpot = [r["tpot"] for r in results]
    out = {"rate": rate, "requests": n, "wall_s": wall, "tokens_per_s": n * max_tokens / wall,
           "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
           "itl_p50": percentile(gaps, 50), "itl_p99": percentile(gaps, 99),
           "tpot_p50": percentile(tpot, 50), "tpot_p99": percentile(tpot, 99),
           "e2e_p50": statistics.median(r["e2e"] for r in results)}
    print(f"{rate:4.1f} req/s: TTFT p50 {out['ttft_p50'] * 1e3:7.1f} ms p99 {out['ttft_p99'] * 1e3:7.1f} ms; ITL p50 "
          f"{out['itl_p50'] * 1e3:6.1f} ms p99 {out['itl_p99'] * 1e3:6.1f} ms; TPOT p50 "
          f"{out['tpot_p50'] * 1e3:6.1f} ms; {out['tokens_per_s']:6.1f} tokens/s", flush=True)
    return out


def listening_url(server: subprocess.Popen) -> str:
    """The base URL the server says it listens on (it chose the port: --port 0); its further output is
    drained in the background so that it never blocks on a full pipe."""
    seen = []
    for line in server.stdout:
        seen.append(line)
        found = re.search(r"http://127\.0\.0\.1:([1-9]\d*)", line)
        if found:
            threading.Thread(target=server.stdout.read, daemon=True).start()
            return f"http://127.0.0.1:{found[1]}"
    sys.exit("the server did not start: " + "".join(seen))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rates", default="1,4")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--out")
    args = parser.parse_args()
    command = [sys.executable, "-m", "lcc", "run", "serve", str(ROOT / "specs" / "small-moe.yaml"),
               *[a for x in SETS for a in ("--set", x)], "--port", "0", "--max-queued", "1000"]
    server = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = listening_url(server)
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(base + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                sys.exit("the server did not start")
            time.sleep(0.2)
        asyncio.run(at_rate(base + "/v1/completions", 1.0, 4, args.max_tokens, args.concurrency, 0))  # warm-up
        rows = [asyncio.run(at_rate(base + "/v1/completions", float(r), args.requests, args.max_tokens,
                                    args.concurrency, i + 1)) for i, r in enumerate(args.rates.split(","))]
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    offline = RESULTS / "serve.json"
    result = {"machine": machine(), "server": "small-moe --set " + " ".join(SETS[:2]), "max_tokens": args.max_tokens,
              "prompt_tokens": 32, "rates": rows,
              "offline": json.loads(offline.read_text())["offline"]["batches"] if offline.is_file() else None}
    write("serve_online", result, args.out)


if __name__ == "__main__":
    main()
