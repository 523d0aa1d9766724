"""Online serving: `lcc run serve` on 127.0.0.1 under Poisson arrivals, time to first token and inter-token
latency, next to the engine's offline figures (benchmarks/serve.py, results/serve.json).

The server: small-moe as in benchmarks/serve.py (`--set serve.max_batch=32 model.moe.n_shared_experts=0`,
world 1, int4 experts, bfloat16). The client (asyncio + httpx, bounded: `--requests` per rate, at most
`--concurrency` open, a deadline per request) sends completions of 32 random token ids, greedy, exactly
`--max-tokens` tokens, streamed, at each `--rates` requests/s (exponential gaps, fixed seed), and measures
per request: time to first token (TTFT: sent -> first event), inter-token latency (ITL: the gaps between
events after the first) and the time per output token after the first (TPOT). p50 and p99 over requests
(ITL: over all gaps).

With --shared-prefix N: prefix caching over HTTP instead. Two servers, serve.prefix_caching true and false;
a prefix of N random token ids (400 of small-moe's 512), then --requests requests, each the prefix and 16
different ids, greedy, --max-tokens tokens, streamed, one at a time, the two servers alternating request by
request. Reported: each server's median and p90 time to first token, their ratio, and whether the replies
are equal.

Where this CPU cannot run lcc's native kernels (they need AVX2 or AVX-512), the servers use PyTorch's
(serve.cpu_kernels=torch); the result says which.

Usage: python -m benchmarks.serve_online [--rates 1,4] [--requests 40] [--max-tokens 64]
       python -m benchmarks.serve_online --shared-prefix 400 --requests 200 --max-tokens 4
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

from lcc.backends.cpu import native

from benchmarks.common import RESULTS, machine, write

ROOT = Path(__file__).resolve().parents[1]
KERNELS = "native" if native.unavailable() is None else "torch"
SETS = ["serve.max_batch=32", "model.moe.n_shared_experts=0", "parallelism.dp=1", "parallelism.ep=1",
        "cluster.gpus_per_node=1", f"serve.cpu_kernels={KERNELS}"]


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


def start(*sets: str) -> tuple[subprocess.Popen, str]:
    """`lcc run serve` of small-moe with SETS and `sets`, once healthy: the process and its base URL."""
    command = [sys.executable, "-m", "lcc", "run", "serve", str(ROOT / "specs" / "small-moe.yaml"),
               *[a for x in (*SETS, *sets) for a in ("--set", x)], "--port", "0", "--max-queued", "1000"]
    server = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = listening_url(server)
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(base + "/health", timeout=5).status_code == 200:
                return server, base
        except httpx.TransportError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            sys.exit("the server did not start")
        time.sleep(0.2)


async def first_token(client: httpx.AsyncClient, base: str, prompt: list[int], max_tokens: int) -> tuple[float, str]:
    """Seconds from sending a streamed completion to its first event, and the reply's text."""
    body = {"model": "small-moe", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    sent, first, text = time.perf_counter(), None, []
    async with client.stream("POST", base + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                first = first or time.perf_counter()
                text.append(json.loads(line[6:])["choices"][0]["text"])
    return first - sent, "".join(text)


def prefix_caching(args: argparse.Namespace) -> dict:
    servers = {name: start(f"serve.prefix_caching={name == 'on'}".lower()) for name in ("off", "on")}
    rng = random.Random(0)
    prefix = [rng.randrange(256) for _ in range(args.shared_prefix)]
    prompts = [prefix + [rng.randrange(256) for _ in range(16)] for _ in range(args.requests + 1)]
    ttft: dict[str, list[float]] = {"off": [], "on": []}
    replies: dict[str, list[str]] = {"off": [], "on": []}

    async def run() -> None:
        async with httpx.AsyncClient(timeout=120) as client:
            for _, base in servers.values():  # warm-up, and the request that fills the cache
                await first_token(client, base, prompts[0], args.max_tokens)
            for i, prompt in enumerate(prompts[1:]):
                for name in (("off", "on") if i % 2 == 0 else ("on", "off")):
                    seconds, text = await first_token(client, servers[name][1], prompt, args.max_tokens)
                    ttft[name].append(seconds)
                    replies[name].append(text)
    try:
        asyncio.run(run())
    finally:
        for server, _ in servers.values():
            server.send_signal(signal.SIGTERM)
            server.wait(60)
    med = {k: statistics.median(v) for k, v in ttft.items()}
    out = {"requests": args.requests, "shared_prefix": args.shared_prefix, "suffix": 16,
           "max_tokens": args.max_tokens, "ttft_median_s": med,
           "ttft_p90_s": {k: percentile(v, 90) for k, v in ttft.items()}, "ttft_off_over_on": med["off"] / med["on"],
           "equal_replies": f"{sum(a == b for a, b in zip(replies['off'], replies['on'], strict=True))} of "
                            f"{args.requests}"}
    print(out, flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rates", default="1,4")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--shared-prefix", type=int, default=0)
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.shared_prefix:
        write("serve_online_prefix", {"machine": machine(), "cpu_kernels": KERNELS, **prefix_caching(args)},
              args.out)
        return
    server, base = start()
    try:
        asyncio.run(at_rate(base + "/v1/completions", 1.0, 4, args.max_tokens, args.concurrency, 0))  # warm-up
        rows = [asyncio.run(at_rate(base + "/v1/completions", float(r), args.requests, args.max_tokens,
                                    args.concurrency, i + 1)) for i, r in enumerate(args.rates.split(","))]
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    offline = RESULTS / "serve.json"
    result = {"machine": machine(), "server": "small-moe --set " + " ".join(SETS[:2]), "cpu_kernels": KERNELS,
              "max_tokens": args.max_tokens,
              "prompt_tokens": 32, "rates": rows,
              "offline": json.loads(offline.read_text())["offline"]["batches"] if offline.is_file() else None}
    write("serve_online", result, args.out)


if __name__ == "__main__":
    main()
