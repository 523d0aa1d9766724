"""`lcc calibrate`: this machine's rates as a spec's cluster section, measured with every local rank running at
once (on a CPU they share the cores and the memory bus): each operation class a step is made of, at a ladder
of sizes (lcc.search.probes), as the table `cluster.calibration` that the cost model interpolates
(lcc.compiler.cost.rates), and the datasheet figures read off it. With them the cost model predicts runs
from achieved rates rather than peaks (docs/cost-model.md, "Calibration")."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

from lcc.search.space import Layout
from lcc.spec.models import Spec

JOIN_TIMEOUT_S = 60.0
COMPILE_S = 600.0  # the compiled probe's compilations, every rank at once


def _rank(rank: int, world: int, port: int, seconds: float, dtype: str, threads: int, device: str, compiled: bool,
          out: Any) -> None:
    from lcc.runtime.host_memory import keep_freed_memory

    keep_freed_memory()  # as a training rank does: the probes' freed tensors are reused, not faulted in again
    import torch
    import torch.distributed as dist

    from lcc.runtime.rendezvous import join_group
    from lcc.search.probes import Clock, collective_probes, compiled_probe, compute_probes, concurrency_probe

    torch.set_num_threads(threads)
    kind = getattr(torch, dtype)
    where = torch.device("cuda", rank) if device == "cuda" else torch.device("cpu")
    if device == "cuda":
        torch.cuda.set_device(where)
    if world > 1:
        join_group("nccl" if device == "cuda" else "gloo", rank, world, JOIN_TIMEOUT_S, port)
    clock = Clock(where, seconds, dist.barrier if world > 1 else (lambda: None))
    result = compute_probes(clock, kind, where)
    result["concurrency"] = concurrency_probe(clock, rank, world, kind, where)
    if compiled:
        result["compiled"] = compiled_probe(clock, kind, where)
    if world > 1:
        result["collectives"] = collective_probes(clock, rank, world, where)
        dist.destroy_process_group()
    out.put((rank, result))


def measure(ranks: int = 1, seconds: float = 0.2, dtype: str = "float32", device: str = "cpu",
            compiled: bool = False) -> dict[str, Any]:
    """Every probe (lcc.search.probes) with `ranks` ranks measuring at once, `seconds` a point: per point the
    median over ranks and batches and its spread. `compiled`: the compiled probe too."""
    from lcc.runtime.rendezvous import host_store
    from lcc.runtime.threads import threads_per_rank

    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    threads = threads_per_rank(ranks) if device == "cpu" else 1
    store = host_store(JOIN_TIMEOUT_S) if ranks > 1 else None  # listening before the ranks start, held until they end
    port = store.port if store is not None else 0
    procs = [context.Process(target=_rank, args=(r, ranks, port, seconds, dtype, threads, device, compiled, out),
                             daemon=True) for r in range(ranks)]
    for p in procs:
        p.start()
    results: dict[int, dict] = {}
    deadline = time.monotonic() + 300 + 400 * seconds + COMPILE_S * compiled
    try:
        while len(results) < ranks:
            if time.monotonic() > deadline or any(p.exitcode not in (None, 0) for p in procs):
                raise RuntimeError("a calibration rank failed or did not finish in time")
            try:
                rank, result = out.get(timeout=1.0)
                results[rank] = result
            except Exception:  # noqa: BLE001 - queue.Empty: look at the ranks again
                continue
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    return {"ranks": ranks, "threads_per_rank": threads, "dtype": dtype, "device": device,
            **merged([results[r] for r in range(ranks)])}


def merged(per_rank: list[dict]) -> dict[str, Any]:
    """One table per probe: each point's key columns, then [median, low, high] seconds over every rank's
    batches (the forward alone's median before them where measured)."""
    def rows(tables: list[list]) -> list[list[float]]:
        out = []
        for points in zip(*tables, strict=True):
            timed = [i for i, v in enumerate(points[0]) if isinstance(v, list)]
            row = [v for v in points[0] if not isinstance(v, list)]
            if len(timed) == 2:
                row.append(summary([p[timed[0]] for p in points])[0])
            out.append(row + summary([p[timed[-1]] for p in points]))
        return [[float(round(v, 9)) if isinstance(v, float) else v for v in row] for row in out]

    from lcc.search.probes import summary

    first = per_rank[0]
    table: dict[str, Any] = {name: rows([r[name] for r in per_rank])
                             for name in ("linear", "experts", "attention", "elementwise", "optimizer")}
    table["op_seconds"] = [round(x, 9) for x in summary([r["op"] for r in per_rank])]
    if "compiled" in first:
        table["compiled"] = rows([r["compiled"] for r in per_rank])
    table["concurrency"] = [[busy, *(round(x, 9) for x in summary([r["concurrency"][i][1] for r in per_rank
                                                                   if r["concurrency"][i][1] is not None]))]
                            for i, (busy, _) in enumerate(first["concurrency"])]
    if "collectives" in first:
        table["collectives"] = {kind: [[n, *row] for n in first["collectives"][kind]
                                       for row in rows([r["collectives"][kind][n] for r in per_rank])]
                                for kind in first["collectives"]}
    return table


def cluster_section(rates: dict[str, Any]) -> dict[str, Any]:
    """A spec's cluster section: one node of `ranks` devices with the measured tables (`calibration`), and
    datasheet-style figures read off them: the largest linear's FLOP/s, the largest elementwise pass's
    bytes/s, an all-reduce's bus bandwidth at its largest size and its time at its smallest; each device
    with an equal share of this machine's memory (one machine: the inter-node figures repeat the intra-node
    ones)."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    rows, width = max((r[0], r[1]) for r in rates["linear"] if r[1] == max(x[1] for x in rates["linear"]))
    big = next(r for r in rates["linear"] if r[0] == rows and r[1] == width)
    flops = 6 * rows * width * width / big[4]  # forward and both gradients
    stream = rates["elementwise"][-1]
    ranks = rates["ranks"]
    reduce = [r[1:] for r in rates.get("collectives", {}).get("all_reduce", []) if r[0] == ranks]
    if reduce:
        gbps = 2 * (ranks - 1) / ranks * reduce[-1][0] / reduce[-1][1] * 8 / 1e9
        latency_us = round(reduce[0][1] * 1e6, 1)
    else:
        gbps, latency_us = stream[0] / stream[1] * 8 / 1e9, 0.0
    name = f"{rates['device']} (lcc calibrate, {ranks} rank{'s' * (ranks != 1)} at once)"
    device = {"kind": rates["device"], "name": name, "memory_gib": round(memory / ranks, 3),
              "peak_tflops": round(flops / 1e12, 6), "memory_tbps": round(stream[0] / stream[1] / 1e12, 6)}
    calibration = {"ranks": ranks, "threads_per_rank": rates["threads_per_rank"], "dtype": rates["dtype"],
                   **{k: rates[k] for k in ("linear", "experts", "attention", "elementwise", "optimizer",
                                            "op_seconds", "concurrency")},
                   **({"compiled": rates["compiled"]} if "compiled" in rates else {}),
                   "collectives": rates.get("collectives", {})}
    return {"nodes": 1, "gpus_per_node": ranks, "device": device,
            "network": {"intra_node_gbps": round(gbps, 3), "inter_node_gbps": round(gbps, 3),
                        "intra_node_latency_us": latency_us, "inter_node_latency_us": latency_us},
            "calibration": calibration}


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
