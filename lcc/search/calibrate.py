"""`lcc calibrate`: this machine's rates as a spec's cluster section, measured with every local rank running at
once (on a CPU they share the cores and the memory bus): a matmul's FLOP/s, a copy's bytes/s, a gloo
all-reduce's bus bandwidth per rank and a one-element one's latency. With them the cost model predicts
local runs from measured rates rather than datasheet ones."""

from __future__ import annotations

import multiprocessing
import os
import statistics
import time
from pathlib import Path
from typing import Any

from lcc.search.space import Layout
from lcc.spec.models import Spec

MATMUL_N = 512
COPY_BYTES = 64 << 20
REDUCE_BYTES = 8 << 20
JOIN_TIMEOUT_S = 60.0


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

    from lcc.runtime.rendezvous import join_group

    torch.set_num_threads(threads)
    kind = getattr(torch, dtype)
    if world > 1:
        join_group("gloo", rank, world, JOIN_TIMEOUT_S, port)
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


def measure(ranks: int = 1, seconds: float = 1.0, dtype: str = "float32") -> dict[str, Any]:
    """The median rank's rates with `ranks` ranks measuring at once (about 4 x `seconds`)."""
    from lcc.runtime.rendezvous import host_store
    from lcc.runtime.threads import threads_per_rank

    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    threads = threads_per_rank(ranks)
    store = host_store(JOIN_TIMEOUT_S) if ranks > 1 else None  # listening before the ranks start, held until they end
    port = store.port if store is not None else 0
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


def calibrated_spec(base: Spec, cluster: dict[str, Any], ranks: int) -> str:
    """`base` with the measured cluster section, as YAML, its layout as it was."""
    import yaml

    from lcc.spec import resolved

    data = {**resolved(base), "cluster": cluster}
    return f"# {base.name} with the cluster measured by lcc calibrate ({ranks} ranks)\n" + yaml.safe_dump(
        data, sort_keys=False, default_flow_style=None, width=110)


def written(out: Path, base: Spec | None, cluster: dict[str, Any], ranks: int) -> str:
    """What `lcc calibrate --out` wrote, and for a spec whether its layout runs on the `ranks` measured: the
    spec keeps its own layout, which `lcc validate` refuses on a cluster of another size, so the line says
    which parallelism settings would run it here."""
    from lcc.spec import SpecError, load_spec

    measured = f"measured on {ranks} rank{'s' * (ranks != 1)}"
    if base is None:
        return f"wrote {out}: the cluster section {measured}"
    head = f"wrote {out}: spec {base.name} with the cluster {measured}"
    try:
        spec = load_spec(out)
    except SpecError as exc:
        par = base.parallelism
        if par.world_size == ranks:
            return f"{head}; lcc validate refuses it: {exc.problems[0].message}"
        return (f"{head}; its layout needs {par.world_size} ranks (pp {par.pp} x dp {par.dp} x tp {par.tp}), so lcc "
                f"validate refuses it on this cluster: {_layout_advice(base, cluster, ranks)}")
    par = spec.parallelism
    return f"{head}; its layout (pp {par.pp} x dp {par.dp} x tp {par.tp}) runs on them"


def _layout_advice(base: Spec, cluster: dict[str, Any], ranks: int) -> str:
    """The settings that lay `base`'s model out on `ranks` ranks: those of the layout `lcc plan search` ranks
    first on the measured cluster, where they differ from the spec's."""
    from lcc.search.search import SearchError, search
    from lcc.spec.models import Cluster

    measured = base.model_copy(update={"cluster": Cluster.model_validate(cluster)})
    try:
        best = search(measured, ranks, 1, top=1).top[0].layout
    except SearchError as exc:
        return f"no layout of its model runs on {ranks} ranks ({exc})"
    mine = Layout.of(base.parallelism).overrides()
    sets = " ".join(f"--set {o}" for o in best.overrides() if o not in mine)
    return (f"run it here with {sets} (the layout lcc plan search ranks first for {ranks} ranks), or set those "
            "fields in the file")
