"""`lcc calibrate`: this machine's rates as a spec's cluster section, measured with every local rank running at
once (on a CPU they share the cores and the memory bus): a matmul's FLOP/s, a copy's bytes/s, a gloo
all-reduce's bus bandwidth per rank and a one-element one's latency. With them the cost model predicts
local runs from measured rates rather than datasheet ones."""

from __future__ import annotations

import datetime
import multiprocessing
import os
import socket
import statistics
import time
from typing import Any

MATMUL_N = 512
COPY_BYTES = 64 << 20
REDUCE_BYTES = 8 << 20


def _timed(fn: Any, seconds: float) -> float:
    """Seconds per call of fn, over calls for about `seconds` after one warm-up call."""
    fn()
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return elapsed / calls


def _timed_together(fn: Any, seconds: float) -> float:
    """`_timed` of a collective: every rank makes the same number of calls (from the slowest first call)."""
    import torch
    import torch.distributed as dist

    start = time.perf_counter()
    fn()
    first = torch.tensor([time.perf_counter() - start])
    dist.all_reduce(first, op=dist.ReduceOp.MAX)
    calls = max(1, int(seconds / max(float(first), 1e-6)))
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def _rank(rank: int, world: int, port: int, seconds: float, dtype: str, threads: int, out: Any) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    kind = getattr(torch, dtype)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
    sync = dist.barrier if world > 1 else (lambda: None)
    a, b = torch.randn(MATMUL_N, MATMUL_N, dtype=kind), torch.randn(MATMUL_N, MATMUL_N, dtype=kind)
    sync()
    flops = 2 * MATMUL_N**3 / _timed(lambda: a @ b, seconds)
    x, y = torch.empty(COPY_BYTES // 4), torch.empty(COPY_BYTES // 4)
    x.fill_(1.0)
    sync()
    copy = 2 * COPY_BYTES / _timed(lambda: y.copy_(x), seconds)  # read and written
    bus = latency = 0.0
    if world > 1:
        t = torch.ones(REDUCE_BYTES // 4)
        sync()
        bus = 2 * (world - 1) / world * REDUCE_BYTES / _timed_together(lambda: dist.all_reduce(t), seconds)
        one = torch.ones(1)
        sync()
        latency = _timed_together(lambda: dist.all_reduce(one), seconds)
        dist.destroy_process_group()
    out.put((rank, flops, copy, bus, latency))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(ranks: int = 1, seconds: float = 1.0, dtype: str = "float32") -> dict[str, Any]:
    """The median rank's rates with `ranks` ranks measuring at once (about 4 x `seconds`)."""
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    threads = max(1, (os.cpu_count() or 1) // ranks)
    port = _free_port()
    procs = [context.Process(target=_rank, args=(r, ranks, port, seconds, dtype, threads, out), daemon=True)
             for r in range(ranks)]
    for p in procs:
        p.start()
    results = []
    deadline = time.monotonic() + 120 + 6 * seconds
    try:
        while len(results) < ranks:
            if time.monotonic() > deadline or any(p.exitcode not in (None, 0) for p in procs):
                raise RuntimeError("a calibration rank failed or did not finish in time")
            try:
                results.append(out.get(timeout=1.0))
            except Exception:  # noqa: BLE001 - queue.Empty: look at the ranks again
                continue
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    flops = statistics.median(r[1] for r in results)
    copy = statistics.median(r[2] for r in results)
    bus = statistics.median(r[3] for r in results) if ranks > 1 else copy
    return {"ranks": ranks, "threads_per_rank": threads, "dtype": dtype, "matmul_flops": flops,
            "copy_bytes_per_second": copy, "all_reduce_bus_bytes_per_second": bus,
            "collective_latency_seconds": statistics.median(r[4] for r in results)}


def cluster_section(rates: dict[str, Any]) -> dict[str, Any]:
    """A spec's cluster section: one node of `ranks` CPU devices at the measured rates, each with an equal
    share of this machine's memory (one machine: the inter-node figures repeat the intra-node ones)."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gbps = rates["all_reduce_bus_bytes_per_second"] * 8 / 1e9
    latency_us = round(rates["collective_latency_seconds"] * 1e6, 1)
    device = {"kind": "cpu", "name": f"cpu (lcc calibrate, {rates['ranks']} ranks at once)",
              "memory_gib": round(memory / rates["ranks"], 3),
              "peak_tflops": round(rates["matmul_flops"] / 1e12, 6),
              "memory_tbps": round(rates["copy_bytes_per_second"] / 1e12, 6)}
    return {"nodes": 1, "gpus_per_node": rates["ranks"], "device": device,
            "network": {"intra_node_gbps": round(gbps, 3), "inter_node_gbps": round(gbps, 3),
                        "intra_node_latency_us": latency_us, "inter_node_latency_us": latency_us}}
