"""One rank of a plan as facts: its coordinates and node, its stages, the parameter shards and experts it
holds, the collectives it issues in a step (with bytes and the link they cross), its memory by kind
against the device, and its share of the simulated schedule. All from the plan alone."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from lcc.actions import Action, stage_rank
from lcc.plan.types import Collective, Plan, chunk_size, is_zero3_scatter
from lcc.spec.models import DTYPE_BYTES

GROUPED = ("pp", "dp", "tp", "ep", "edp", "stage", "world", "kv")


class RankIndex:
    """Rank coordinates and the members of each mesh group, computed from the plan's rank order (never by
    scanning every rank, so that a 2,048-rank plan answers at once)."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.sizes = plan.axis_sizes()
        self.gpus = plan.mesh.gpus_per_node
        self.columns = plan.ranks.columns

    def coords(self, rank: int) -> dict[str, int]:
        return self.plan.ranks.coords(rank)

    def rank_of(self, pp: int, dp: int, tp: int) -> int:
        return (pp * self.sizes["dp"] + dp) * self.sizes["tp"] + tp

    def members(self, rank: int, axis: str) -> list[int]:
        c, s = self.coords(rank), self.sizes
        if axis == "world":
            return list(range(s["world"]))
        if axis == "pp":
            return [self.rank_of(p, c["dp"], c["tp"]) for p in range(s["pp"])]
        if axis == "dp":
            return [self.rank_of(c["pp"], d, c["tp"]) for d in range(s["dp"])]
        if axis == "tp":
            return [self.rank_of(c["pp"], c["dp"], t) for t in range(s["tp"])]
        if axis == "stage":
            return [self.rank_of(c["pp"], d, t) for d in range(s["dp"]) for t in range(s["tp"])]
        if axis == "kv":
            kv = self.plan.mesh.kv
            first = c["tp"] // kv * kv
            return [self.rank_of(c["pp"], c["dp"], t) for t in range(first, first + kv)]
        ep = s["ep"]  # f = dp * tp_size + tp; ep = f % ep_size; edp = f // ep_size
        fs = ([c["edp"] * ep + e for e in range(ep)] if axis == "ep" else [d * ep + c["ep"] for d in range(s["edp"])])
        return [self.rank_of(c["pp"], f // s["tp"], f % s["tp"]) for f in fs]

    def link(self, rank: int, axis: str) -> str:
        """`intra_node` when every member of the rank's group on `axis` is on its node, else `inter_node`."""
        nodes = {r // self.gpus for r in self.members(rank, axis)}
        return "intra_node" if len(nodes) == 1 else "inter_node"


def dtype_bytes(plan: Plan, dtype: str | None) -> int:
    name = {"params": plan.precision.params, "compute": plan.precision.compute}.get(dtype or "", dtype or "float32")
    return DTYPE_BYTES.get(name, 8 if name in ("int64",) else 4)


def collective_row(plan: Plan, index: RankIndex, rank: int, c: Collective, calls: int, phase: str) -> dict[str, Any]:
    known = c.shape is not None and all(d >= 0 for d in c.shape)
    per_call = math.prod(c.shape) * dtype_bytes(plan, c.dtype) if known else None
    axis = c.axis if c.axis in GROUPED else "world"
    return {"phase": phase, "op": c.op, "axis": c.axis, "group_size": plan.mesh.size(axis), "site": c.site,
            "what": c.what, "shape": c.shape, "dtype": c.dtype, "calls_per_step": calls, "bytes_per_call": per_call,
            "bytes_per_step": None if per_call is None else per_call * calls, "link": index.link(rank, axis)}


def collectives(plan: Plan, index: RankIndex, rank: int) -> list[dict[str, Any]]:
    """What the rank issues in one step: its roles' forward and backward collectives per micro-batch (ZeRO-3's
    gradient reduce-scatters once per step when the plan reduces per step), its gradient buckets, its
    pipeline sends and receives (per peer), the step actions', and a serve plan's exchanges with rank 0.
    Rows of data-dependent size (all-to-all rows) have no bytes (`null`); the cost report estimates them."""
    c = index.coords(rank)
    mb = plan.data.microbatches if plan.mode == "train" else 1
    once = plan.memory.zero >= 3 and plan.memory.grad_reduce == "step"
    out: list[dict[str, Any]] = []
    if plan.serving is not None:
        out += [collective_row(plan, index, rank, x, 1, f"serve {a.kind}") for a in plan.serving.before
                for x in a.collectives]
    for role in plan.roles_of(c["pp"]):
        out += [collective_row(plan, index, rank, x, mb, f"forward {role.name}") for x in role.forward]
        if plan.mode == "train":
            out += [collective_row(plan, index, rank, x, 1 if once and is_zero3_scatter(x) else mb,
                                   f"backward {role.name}") for x in role.backward]
            for b in role.grad_buckets:
                calls = mb if b.when == "microbatch" else 1
                piece = chunk_size(b.elements, plan.mesh.size(b.axes[0])) if b.op == "reduce_scatter" else b.elements
                out += [collective_row(plan, index, rank, x, calls, f"gradients {role.name}")
                        for x in b.collectives(piece, plan.precision.params)]
    out += _p2p(plan, index, rank)
    for action in plan.schedule.step[c["pp"]] if plan.schedule.step else []:  # serve plans have no step actions
        out += [collective_row(plan, index, rank, x, 1, f"step {action.kind}") for x in action.collectives]
    if plan.serving is not None and plan.serving.after:  # RETURN_LOGITS: the last stage's tp rank 0 -> rank 0
        last = stage_rank(plan.schedule.n_stages - 1, c_pp(plan), plan.schedule.kind)
        sources = [index.rank_of(last, d, 0) for d in range(plan.mesh.size("dp"))]
        for a in plan.serving.after:
            for x in a.collectives:
                if rank in sources and rank != 0:
                    out.append(collective_row(plan, index, rank, x, 1, f"serve {a.kind}"))
                if rank == 0 and any(s != 0 for s in sources):
                    recv = Collective("recv", x.axis, x.site, x.what, x.shape, x.dtype)
                    out.append(collective_row(plan, index, rank, recv, sum(s != 0 for s in sources),
                                              f"serve {a.kind}"))
    return out


def c_pp(plan: Plan) -> int:
    return plan.mesh.size("pp")


def _p2p(plan: Plan, index: RankIndex, rank: int) -> list[dict[str, Any]]:
    """The pipeline's sends and receives, one row per (kind, peer): the boundary activation as the runtime
    sends it (the parameters' dtype in training, the serve dtype in serving), over the link to that peer."""
    c = index.coords(rank)
    pp = c_pp(plan)
    counts: Counter = Counter()
    for text in plan.schedule.actions[c["pp"]]:
        if "SEND" not in text and "RECV" not in text:
            continue
        a = Action.parse(text)
        forward = a.kind.endswith("_F")
        step = 1 if (a.kind == "SEND_F" or a.kind == "RECV_B") else -1
        counts[(a.kind, stage_rank(a.stage + step, pp, plan.schedule.kind), forward)] += 1
    shape = [d if d >= 0 else plan.serving.max_batched_tokens for d in plan.schedule.boundary_shape] \
        if plan.serving is not None else plan.schedule.boundary_shape
    nbytes = math.prod(shape) * dtype_bytes(plan, "params" if plan.mode == "train" else plan.dtype)
    rows = []
    for (kind, peer_pp, forward), n in sorted(counts.items()):
        peer = index.rank_of(peer_pp, c["dp"], c["tp"])
        link = "intra_node" if peer // index.gpus == rank // index.gpus else "inter_node"
        rows.append({"phase": "pipeline", "op": "send" if kind.startswith("SEND") else "recv", "axis": "pp",
                     "group_size": 2, "site": "pipeline", "what": "activations" if forward else "activation gradients",
                     "shape": shape, "dtype": plan.precision.params if plan.mode == "train" else plan.dtype,
                     "calls_per_step": n, "bytes_per_call": nbytes, "bytes_per_step": nbytes * n, "link": link,
                     "peer": peer})
    return rows


def memory(plan: Plan, pp: int) -> dict[str, Any]:
    """The cost model's bytes for the rank's pipeline role, by kind, against the device."""
    return memory_of(plan.cost, plan.mode, pp)


def memory_of(cost: dict[str, Any], mode: str, pp: int) -> dict[str, Any]:
    """`memory` from a cost report (`lcc.report/1`) alone. `total_bytes` sums the kinds; `peak_bytes` is the
    most held at one moment of a training step (`peak_phase` says which), or serving's total (the weights, the
    KV cache at max batch and the workspace held at once)."""
    role = f"pp{pp}"
    device = cost["memory"]["device_bytes"]
    if mode == "serve":
        row = next(r for r in cost["serve"]["by_role"] if r["role"] == role)
        kinds = {"weights": row["weights_bytes"], "kv_cache": row["kv_cache_bytes"],
                 "workspace": row["workspace_bytes"]}
        peak, phase = row["total_bytes"], None
    else:
        row = next(r for r in cost["memory"]["by_role"] if r["role"] == role)
        kinds = {"weights": row["weights_bytes"] - row["weights_gathered_bytes"],  # the report counts them in
                 "gathered_weights": row["weights_gathered_bytes"],
                 "gradients": row["grads_bytes"] - row["grads_gathered_bytes"],
                 "gathered_gradients": row["grads_gathered_bytes"],
                 "optimizer": row["optimizer_bytes"], "activations": row["activations_bytes"]}
        peak, phase = row["peak_bytes"], row["peak_phase"]
    return {"by_kind": kinds, "total_bytes": row["total_bytes"], "peak_bytes": peak, "peak_phase": phase,
            "device_bytes": device, "share_of_device": peak / device if device else None}


def parameters(plan: Plan, rank: int, index: RankIndex) -> list[dict[str, Any]]:
    """The shards the rank holds: local shape, how it is split, and its bytes (a ZeRO piece when sharded)."""
    c = index.coords(rank)
    stages = {r.stage for r in plan.roles_of(c["pp"])}
    sizes = plan.axis_sizes()
    out = []
    for p in plan.parameters:
        if not stages & set(p.stages):
            continue
        numel = p.local_numel
        if p.serve is not None:
            nbytes = math.prod(p.serve.packed) // p.shard.parts if p.shard else math.prod(p.serve.packed)
            nbytes += 2 * (math.prod(p.serve.scales) // (p.shard.parts if p.shard else 1))
        else:
            held = chunk_size(numel, p.zero.parts) if p.zero is not None and plan.memory.zero >= 3 else numel
            nbytes = held * DTYPE_BYTES[plan.precision.params]
        out.append({"name": p.name, "local_shape": p.local_shape, "global_shape": p.global_shape,
                    "shard": None if p.shard is None else {"axis": p.shard.axis, "dim": p.shard.dim,
                                                           "part": p.shard.part(c, sizes), "parts": p.shard.parts},
                    "zero": None if p.zero is None else {"axis": p.zero.axis, "parts": p.zero.parts},
                    "expert": p.expert, "bytes": nbytes})
    return out


def experts(plan: Plan, rank: int, index: RankIndex) -> dict[str, Any] | None:
    e = plan.experts
    if e is None:
        return None
    c = index.coords(rank)
    first = c["ep"] * e.experts_per_rank
    groups = [g for g, (start, stop) in enumerate(e.group_ep_ranks) if start <= c["ep"] < stop]
    return {"first": first, "count": e.experts_per_rank, "last": first + e.experts_per_rank - 1, "groups": groups,
            "replicas": e.edp, "rule": e.rule}


def rank_facts(plan: Plan, rank: int, index: RankIndex | None = None, full: bool = True) -> dict[str, Any]:
    """Everything `lcc plan show --rank` says of one rank (`full`: with its parameters and collectives)."""
    index = index or RankIndex(plan)
    c = index.coords(rank)
    sim = plan.schedule.simulation
    roles = plan.roles_of(c["pp"])
    out: dict[str, Any] = {
        "rank": rank, "coords": {k: c[k] for k in ("pp", "dp", "tp", "ep", "edp")}, "node": c["node"],
        "roles": [r.name for r in roles], "stages": [r.stage for r in roles],
        "layers": [r.layers for r in roles], "experts": experts(plan, rank, index), "memory": memory(plan, c["pp"]),
        "schedule": {"busy_units": sim.busy[c["pp"]], "makespan_units": sim.makespan,
                     "busy_share": sim.busy[c["pp"]] / sim.makespan if sim.makespan else 0.0},
    }
    if full:
        out["parameters"] = parameters(plan, rank, index)
        out["collectives"] = collectives(plan, index, rank)
    return out
