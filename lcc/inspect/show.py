"""`lcc plan show`: the layout at a glance, one role, or one rank, as rich tables or JSON."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

from rich.console import Console
from rich.table import Table

from lcc.inspect.ranks import RankIndex, memory, rank_facts
from lcc.inspect.target import InspectError, Target
from lcc.plan.types import Plan


def size(n: float | None) -> str:
    if n is None:
        return "varies"
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def overview(plan: Plan) -> dict[str, Any]:
    """The plan as a whole: mesh, roles, memory per role, schedule, experts, the cost model's totals."""
    cost = plan.cost
    sim = plan.schedule.simulation
    roles = []
    for role in plan.roles:
        mem = memory(plan, role.pp_rank)
        roles.append({"role": role.name, "stage": role.stage, "pp_rank": role.pp_rank, "layers": role.layers,
                      "embedding": role.embedding, "head": role.head, "parameters": len(role.parameters),
                      "forward_collectives": len(role.forward), "backward_collectives": len(role.backward),
                      "program": role.program, "compiled": role.compiled, "memory_bytes": mem["peak_bytes"]})
    out: dict[str, Any] = {
        "spec": plan.spec_name, "mode": plan.mode, "world_size": plan.world_size, "device": plan.device,
        "backend": plan.backend, "dtype": plan.dtype,
        "mesh": {**dict(zip(plan.mesh.axes, plan.mesh.sizes, strict=True)), "ep": plan.mesh.ep,
                 "edp": plan.mesh.edp, "gpus_per_node": plan.mesh.gpus_per_node,
                 "nodes": plan.world_size // plan.mesh.gpus_per_node},
        "roles": roles, "device_bytes": cost["memory"]["device_bytes"],
        "schedule": {"kind": plan.schedule.kind, "microbatches": plan.schedule.microbatches,
                     "virtual_stages": plan.schedule.virtual_stages, "makespan_units": sim.makespan,
                     "bubble_fraction": sim.bubble_fraction},
    }
    if plan.mode == "serve":  # a decode step (the report's memory-bound estimate), not a training step
        decode = cost["serve"]["decode_step"]
        out["decode_step"] = {"seconds": decode["seconds"], "tokens_per_second": decode["tokens_per_second"],
                              "batch_per_dp_rank": decode["batch_per_dp_rank"],
                              "worst_rank_bytes": cost["serve"]["worst_rank_bytes"]}
        sv = plan.serving
        out["kernels"] = {"experts": sv.expert_kernel, "attention": sv.attention_kernel, "routing": sv.routing_kernel,
                          "dense": sv.dense_kernel, "norms": sv.norm_kernel, "decode_layers": sv.decode_kernel}
    else:
        out["step_seconds_estimate"] = cost["time"]["step_seconds_estimate"]
        out["communication_bytes_per_step"] = cost["comm"]["bytes_per_step"]
        d = plan.data
        per_rank = d.microbatches * d.sequences_per_unit
        out["data"] = {"seq_len": d.seq_len, "global_batch": d.global_batch, "units_per_step": d.units_per_step,
                       "sequences_per_unit": d.sequences_per_unit, "sequences_per_dp_rank": per_rank,
                       "order": f"step s takes sequences [{d.global_batch} s, {d.global_batch} (s + 1)) of the stream; "
                                f"dp rank i its {d.microbatches} unit(s) of {d.sequences_per_unit}: sequences "
                                f"[{d.global_batch} s + {per_rank} i, {d.global_batch} s + {per_rank} (i + 1))",
                       "validation": None if d.validation is None else
                       {"every": d.validation.every, "batches": d.validation.batches}}
    if plan.experts is not None:
        e = plan.experts
        out["experts"] = {"n_experts": e.n_experts, "n_groups": e.n_groups, "experts_per_rank": e.experts_per_rank,
                          "ep": e.ep, "replicas": e.edp, "alltoall_inter_node_share": e.alltoall_inter_node_share,
                          "exchange": e.exchange, "ep_nodes": e.nodes, "ranks_per_node": e.ranks_per_node,
                          "sets": e.sets, "kept_sets": e.kept_sets, "token_nodes": e.token_nodes}
    return out


def role_facts(plan: Plan, name: str) -> dict[str, Any]:
    role = next((r for r in plan.roles if r.name == name), None)
    if role is None:
        raise InspectError(f"--role {name}: the plan's roles are {', '.join(r.name for r in plan.roles)}")
    index = RankIndex(plan)
    first = next(r for r in range(plan.world_size) if index.coords(r)["pp"] == role.pp_rank)
    facts = rank_facts(plan, first, index)
    return {"role": role.name, "stage": role.stage, "pp_rank": role.pp_rank, "layers": role.layers,
            "program": role.program, "compiled": role.compiled, "ranks": plan.mesh.size("stage"),
            "memory": facts["memory"],
            "parameters": [p for p in facts["parameters"] if role.stage in plan.parameter(p["name"]).stages],
            "collectives": [c for c in facts["collectives"] if c["phase"].split()[-1] == role.name]}


def all_ranks(plan: Plan) -> list[dict[str, Any]]:
    index = RankIndex(plan)
    return [rank_facts(plan, r, index, full=False) for r in range(plan.world_size)]


def check_rank(plan: Plan, rank: int) -> None:
    if not 0 <= rank < plan.world_size:
        raise InspectError(f"--rank {rank}: the plan has ranks 0 to {plan.world_size - 1}")


# ------------------------------------------------------------------------------------------ rendering

def _pattern(name: str) -> str:
    return re.sub(r"^layers\.\d+\.", "layers.*.", name)


def render_overview(console: Console, target: Target, o: dict[str, Any]) -> None:
    mesh = o["mesh"]
    console.print(f"[bold]{target.label}[/bold]: {o['spec']} {o['mode']} plan, {o['world_size']} ranks on "
                  f"{mesh['nodes']} node(s) of {mesh['gpus_per_node']} ({o['device']}, backend {o['backend']}, "
                  f"{o['dtype']})")
    t = Table(title="mesh", title_justify="left")
    for axis in ("pp", "dp", "tp", "ep", "edp"):
        t.add_column(axis, justify="right")
    t.add_row(*(str(mesh[a]) for a in ("pp", "dp", "tp", "ep", "edp")))
    console.print(t)
    t = Table(title=f"roles (memory against {size(o['device_bytes'])} per device)", title_justify="left")
    for col in ("role", "pp rank", "layers", "parts", "params", "collectives fwd/bwd", "memory", "of device"):
        t.add_column(col, justify="right" if col not in ("role", "parts") else "left")
    for r in o["roles"]:
        parts = ", ".join(p for p, on in (("embedding", r["embedding"]), ("head", r["head"])) if on) or "-"
        t.add_row(r["role"], str(r["pp_rank"]), f"[{r['layers'][0]}, {r['layers'][1]})", parts, str(r["parameters"]),
                  f"{r['forward_collectives']}/{r['backward_collectives']}", size(r["memory_bytes"]),
                  f"{r['memory_bytes'] / o['device_bytes']:.0%}")
    console.print(t)
    compiled = [f"{r['role']}: {', '.join(r['compiled'])}" for r in o["roles"] if r["compiled"]]
    if o["mode"] == "train":
        console.print("compiled with torch.compile (Inductor): " + ("; ".join(compiled) if compiled else
                                                                     "nothing, every function runs eagerly"))
    s = o["schedule"]
    if "decode_step" in o:
        d = o["decode_step"]
        console.print(f"serving: the stages in order each step; a decode step of {d['batch_per_dp_rank']} sequences "
                      f"per dp rank {d['seconds'] * 1e3:.3f} ms ({d['tokens_per_second']:,.0f} tokens/s, "
                      "memory-bound estimate)")
        k = o["kernels"]
        fused = ("; a step of decode tokens only runs decode_forward, each MoE layer one native call"
                 if k["decode_layers"] == "native_cpu" else "")
        console.print("kernels: " + ", ".join(f"{part} {name}" for part, name in k.items() if part != "decode_layers")
                      + fused)
    else:
        comm = o["communication_bytes_per_step"]
        console.print(f"schedule: {s['kind']}, {s['microbatches']} micro-batch(es), {s['virtual_stages']} virtual "
                      f"stage(s); bubble {s['bubble_fraction']:.1%}; estimated step {o['step_seconds_estimate']:.3f} s")
        console.print(f"communication per step, all ranks together: {size(comm['total'])} ("
                      + ", ".join(f"{k.replace('_', ' ')} {size(v)}" for k, v in comm["by_link"].items()) + ")")
        d = o["data"]
        check = d["validation"]
        console.print(f"data: sequences of {d['seq_len']} + 1 tokens, cut one after another; {d['order']}"
                      + (f"; validation every {check['every']} steps on {check['batches']} batch(es)" if check else ""))
    if "experts" in o:
        e = o["experts"]
        console.print(f"experts: {e['n_experts']} in {e['n_groups']} groups, {e['experts_per_rank']} per rank over "
                      f"ep {e['ep']}, {e['replicas']} replica(s); {e['alltoall_inter_node_share']:.0%} of all-to-all "
                      "bytes cross nodes")
        limit = f", {e['kept_sets']} of {e['sets']} sets per token" if e["kept_sets"] < e["sets"] else ""
        console.print(f"expert exchange: {e['exchange']}; an EP group spans {e['ep_nodes']} node(s) of "
                      f"{e['ranks_per_node']} rank(s); a token's experts span at most {e['token_nodes']} node(s)"
                      + limit)


def render_rank(console: Console, f: dict[str, Any]) -> None:
    c = f["coords"]
    console.print(f"[bold]rank {f['rank']}[/bold]: pp {c['pp']}, dp {c['dp']}, tp {c['tp']} (ep {c['ep']}, "
                  f"edp {c['edp']}); node {f['node']}; roles {', '.join(f['roles'])}, layers "
                  + ", ".join(f"[{a}, {b})" for a, b in f["layers"]))
    if f["experts"]:
        e = f["experts"]
        console.print(f"experts {e['first']}-{e['last']} ({e['count']}; groups {e['groups']}), each held by "
                      f"{e['replicas']} rank(s)")
    _render_parameters(console, f["parameters"])
    _render_collectives(console, f["collectives"])
    _render_memory(console, f["memory"])
    s = f["schedule"]
    console.print(f"schedule: busy {s['busy_units']} of {s['makespan_units']} units ({s['busy_share']:.0%}; the rest "
                  "waits in the pipeline bubble)")


def render_role(console: Console, f: dict[str, Any]) -> None:
    console.print(f"[bold]role {f['role']}[/bold]: stage {f['stage']} on pipeline rank {f['pp_rank']}, layers "
                  f"[{f['layers'][0]}, {f['layers'][1]}), {f['ranks']} ranks run {f['program']}")
    console.print("compiled with torch.compile (Inductor): " + (", ".join(f["compiled"]) or "nothing (eager)"))
    _render_parameters(console, f["parameters"])
    _render_collectives(console, f["collectives"])
    _render_memory(console, f["memory"])


def _render_parameters(console: Console, params: list[dict[str, Any]]) -> None:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for p in params:
        groups[_pattern(p["name"])].append(p)
    t = Table(title=f"parameter shards held ({len(params)} tensors, {size(sum(p['bytes'] for p in params))})",
              title_justify="left")
    for col in ("parameter", "tensors", "local shape", "split", "bytes"):
        t.add_column(col, justify="right" if col in ("tensors", "bytes") else "left")
    for name, ps in groups.items():
        p = ps[0]
        split = []
        if p["shard"]:
            split.append(f"dim {p['shard']['dim']} over {p['shard']['axis']} ({p['shard']['parts']} parts)")
        if p["zero"]:
            split.append(f"ZeRO over {p['zero']['axis']} ({p['zero']['parts']})")
        t.add_row(name, str(len(ps)), "x".join(map(str, p["local_shape"])), "; ".join(split) or "replicated",
                  size(sum(q["bytes"] for q in ps)))
    console.print(t)


def _render_collectives(console: Console, rows: list[dict[str, Any]]) -> None:
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["phase"].split()[0], r["op"], r["axis"], r["group_size"], r["link"])].append(r)
    total = sum(r["bytes_per_step"] or 0 for r in rows)
    t = Table(title=f"collectives per step ({sum(r['calls_per_step'] for r in rows)} calls, {size(total)} of known "
              "size)", title_justify="left")
    for col in ("phase", "op", "axis", "group", "link", "calls", "bytes"):
        t.add_column(col, justify="right" if col in ("group", "calls", "bytes") else "left")
    for (phase, op, axis, group, link), rs in groups.items():
        known = [r["bytes_per_step"] for r in rs if r["bytes_per_step"] is not None]
        nbytes = ("varies" if not known else size(sum(known)) + ("" if len(known) == len(rs) else " + varies"))
        t.add_row(phase, op, axis, str(group), link.replace("_", " "), str(sum(r["calls_per_step"] for r in rs)),
                  nbytes)
    console.print(t)


def _render_memory(console: Console, m: dict[str, Any]) -> None:
    if m["peak_phase"] is None:  # serving: everything is held at once
        console.print(f"memory (cost model): {size(m['peak_bytes'])} of {size(m['device_bytes'])} "
                      f"({m['share_of_device']:.0%}): weights, KV cache at max batch and workspace")
    else:
        console.print(f"memory (cost model): peak {size(m['peak_bytes'])} of {size(m['device_bytes'])} "
                      f"({m['share_of_device']:.0%}) at the {m['peak_phase']}; the kinds below summed: "
                      f"{size(m['total_bytes'])}")
    t = Table()
    t.add_column("kind")
    t.add_column("bytes", justify="right")
    for kind, n in m["by_kind"].items():
        t.add_row(kind.replace("_", " "), size(n))
    console.print(t)
